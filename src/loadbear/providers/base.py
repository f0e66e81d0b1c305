"""The one small interface every provider implements, and the types it speaks.

Every provider module follows the same private skeleton:
``_map_messages`` (our OpenAI-shaped messages -> the wire format),
``_map_error`` (wire failure -> :class:`ProviderError` with a kind),
``_map_usage`` (wire usage -> :class:`Usage`).
Streaming and non-streaming paths must yield the same :class:`Usage`, so the ledger row
is the same whichever path served the request.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, runtime_checkable


@dataclass(slots=True)
class Timeouts:
    """Per-model deadlines, in seconds. ``None`` means no limit for that phase."""

    connect: float | None = 5.0
    first_token: float | None = 30.0
    idle: float | None = 30.0
    total: float | None = 120.0


@dataclass(slots=True)
class ModelConfig:
    """One entry of the model catalog."""

    name: str  # what clients ask for, e.g. "gpt-4o-mini"
    provider: str  # "openai", "anthropic", "local", "scripted"
    upstream_model: str  # the id sent on the wire
    base_url: str | None = None
    api_key: str | None = None
    # USD per 1M tokens. Cost is computed at write time, in integer micro-USD.
    input_price: float = 0.0
    cached_input_price: float | None = None
    output_price: float = 0.0
    tier: str = "standard"
    fallbacks: list[str] = field(default_factory=list)
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_retries: int = 2
    tokenizer: str = "o200k_base"
    extra_headers: dict[str, str] = field(default_factory=dict)

    def cost_micro_usd(self, usage: "Usage") -> int:
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        cached_price = self.input_price if self.cached_input_price is None else self.cached_input_price
        # price per 1M tokens in USD == price per token in micro-USD
        total = (
            (usage.prompt_tokens - cached) * self.input_price
            + cached * cached_price
            + usage.completion_tokens * self.output_price
        )
        return int(round(total))


@dataclass(slots=True)
class ChatRequest:
    """A provider-agnostic chat request. ``messages`` are OpenAI-shaped dicts."""

    messages: list[dict[str, Any]]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    user: str | None = None
    # Grounding context (retrieved chunks) for models that answer from it, e.g. ``local``.
    context: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # True when we counted the tokens ourselves because the provider did not report them.
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    upstream_model: str


@dataclass(slots=True)
class StreamDelta:
    """One piece of a streamed answer. The last delta carries ``finish_reason`` and usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


class ErrorKind(str, enum.Enum):
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 5xx
    CONNECTION = "connection"  # refused, reset, no response headers
    TIMEOUT = "timeout"  # connect / total
    FIRST_TOKEN_TIMEOUT = "first_token_timeout"
    IDLE_TIMEOUT = "idle_timeout"  # stalled between chunks
    STREAM_CUT = "stream_cut"  # stream ended without a finish
    MALFORMED = "malformed"  # unparseable body or chunk
    UPSTREAM_ERROR = "upstream_error"  # in-band error event
    AUTH = "auth"  # 401/403: our credentials, not the client's fault
    NOT_FOUND = "not_found"  # upstream model unknown
    BAD_REQUEST = "bad_request"  # 400/413/422 caused by the request itself
    CONTEXT_LENGTH = "context_length"
    CANCELLED = "cancelled"


# Failures that may succeed if the same model is tried again.
RETRYABLE = frozenset(
    {
        ErrorKind.RATE_LIMITED,
        ErrorKind.SERVER_ERROR,
        ErrorKind.CONNECTION,
        ErrorKind.TIMEOUT,
        ErrorKind.FIRST_TOKEN_TIMEOUT,
        ErrorKind.IDLE_TIMEOUT,
        ErrorKind.STREAM_CUT,
        ErrorKind.MALFORMED,
        ErrorKind.UPSTREAM_ERROR,
    }
)
# Failures caused by the request itself: trying another model would fail the same way.
CLIENT_FAULT = frozenset({ErrorKind.BAD_REQUEST, ErrorKind.CONTEXT_LENGTH})


class ProviderError(Exception):
    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        usage: Usage | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        # Tokens consumed before the failure (e.g. a stream cut mid-way); they cost money.
        self.usage = usage

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    @property
    def client_fault(self) -> bool:
        return self.kind in CLIENT_FAULT

    def __repr__(self) -> str:
        return f"ProviderError({self.kind.value}, status={self.status}, {self.message!r})"


@runtime_checkable
class Provider(Protocol):
    """One wire API. Implementations are stateless apart from connection pools."""

    name: str

    async def complete(self, request: ChatRequest, model: ModelConfig) -> Completion: ...

    def stream(self, request: ChatRequest, model: ModelConfig) -> AsyncIterator[StreamDelta]: ...

    async def embed(self, texts: list[str], model: ModelConfig) -> list[list[float]]: ...

    async def aclose(self) -> None: ...
