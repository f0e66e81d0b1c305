"""Fault vocabulary of the upstream simulator, the seeded plan that decides each request's
outcome, and the provider-shaped error bodies.

Kept apart from the HTTP server so the decision logic (script first, then seeded rate draws)
can be reasoned about and tested without sockets.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

FAULT_KINDS: tuple[str, ...] = (
    "rate_limit",
    "server_error",
    "unavailable",
    "refused",
    "no_headers",
    "stall_first_token",
    "cut_mid_stream",
    "malformed_chunk",
    "inband_error",
    "bad_request",
    "context_length",
)

# Kinds drawn when ``fault_rate > 0`` and ``faults`` is None: the transient upstream failures a
# gateway should retry or fail over on. Left out: ``stall_first_token`` (a 60 s stall would
# swamp any benchmark) and the two 400s (deterministic client errors, not upstream flakiness).
DEFAULT_RATE_FAULTS: tuple[str, ...] = (
    "rate_limit",
    "server_error",
    "unavailable",
    "refused",
    "no_headers",
    "cut_mid_stream",
    "malformed_chunk",
    "inband_error",
)

# Kinds answered with an HTTP error status before any body is streamed.
STATUS_FAULTS: dict[str, int] = {
    "rate_limit": 429,
    "server_error": 500,
    "unavailable": 503,
    "bad_request": 400,
    "context_length": 400,
}

CONTEXT_WINDOW = 128_000


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected failure.

    ``after_chunks``: content chunks streamed before a mid-stream fault fires.
    ``retry_after`` / ``stall_s``: override the simulator-wide defaults when not None.
    ``status``: overrides the HTTP status of the status faults (e.g. 529 for Anthropic
    overload); ignored by the other kinds. ``message``: overrides the error message.
    """

    kind: str
    after_chunks: int = 3
    retry_after: float | None = None
    stall_s: float | None = None
    status: int | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        if self.after_chunks < 0:
            raise ValueError("after_chunks must be >= 0")

    @classmethod
    def coerce(cls, entry: "Fault | str | Mapping[str, Any] | None") -> "Fault | None":
        """Accept the shorthand forms a script may hold: None, a kind name, or a JSON object."""
        if entry is None or isinstance(entry, Fault):
            return entry
        if isinstance(entry, str):
            return cls(entry)
        if isinstance(entry, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = set(entry) - known
            if unknown:
                raise ValueError(f"unknown fault fields: {sorted(unknown)}")
            return cls(**dict(entry))
        raise TypeError(f"cannot make a Fault from {entry!r}")

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def validate_kinds(kinds: Iterable[str] | None) -> tuple[str, ...] | None:
    if kinds is None:
        return None
    result = tuple(kinds)
    for kind in result:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
    return result


_NO_MODEL = object()  # key of the script that applies to every model


class FaultPlan:
    """Decides each request's fault and latency: the script first, then seeded rate draws.

    Every request consumes exactly three draws from the RNG, whatever the outcome, so the
    rate-based sequence does not shift when a scripted entry or a config change intervenes.
    All methods are thread-safe: the test thread scripts while the server thread draws.
    """

    def __init__(self, seed: int) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        self._rng = random.Random(seed)
        self._scripts: dict[object, deque[Fault | None]] = {}

    def reseed(self, seed: int | None = None) -> None:
        with self._lock:
            if seed is not None:
                self._seed = seed
            self._rng = random.Random(self._seed)

    def set_script(self, entries: Iterable[Any], model: str | None = None) -> int:
        """Replace the script for ``model`` (None: any model). Returns its length."""
        queue = deque(Fault.coerce(e) for e in entries)
        with self._lock:
            key = _NO_MODEL if model is None else model
            if queue:
                self._scripts[key] = queue
            else:
                self._scripts.pop(key, None)
            return len(queue)

    def clear(self) -> None:
        with self._lock:
            self._scripts.clear()

    def pending(self) -> dict[str, int]:
        with self._lock:
            return {("*" if k is _NO_MODEL else str(k)): len(q) for k, q in self._scripts.items()}

    def draw(
        self,
        model: str | None,
        fault_rate: float,
        kinds: tuple[str, ...],
        latency_ms: tuple[float, float],
    ) -> tuple[Fault | None, float, bool]:
        """Return (fault, latency in seconds, scripted?) for the next request."""
        with self._lock:
            rng = self._rng
            u_fault, u_kind, u_latency = rng.random(), rng.random(), rng.random()
            scripted, fault = self._pop_script(model)
        if not scripted and fault_rate > 0.0 and kinds and u_fault < fault_rate:
            fault = Fault(kinds[int(u_kind * len(kinds))])
        low, high = latency_ms
        return fault, (low + (high - low) * u_latency) / 1000.0, scripted

    def _pop_script(self, model: str | None) -> tuple[bool, Fault | None]:
        # A model-scoped script wins over the catch-all one.
        for key in (model, _NO_MODEL):
            if key is None:
                continue
            queue = self._scripts.get(key)
            if queue:
                entry = queue.popleft()
                if not queue:
                    del self._scripts[key]
                return True, entry
        return False, None


# --- provider error bodies -------------------------------------------------------------------

_OPENAI_ERRORS: dict[str, tuple[str, str | None, str | None, str]] = {
    # kind: (type, param, code, message)
    "rate_limit": (
        "requests",
        None,
        "rate_limit_exceeded",
        "Rate limit reached for requests (simulated). Please try again in {retry_after}s.",
    ),
    "server_error": (
        "server_error",
        None,
        None,
        "The server had an error while processing your request. Sorry about that! (simulated)",
    ),
    "unavailable": (
        "server_error",
        None,
        "service_unavailable",
        "The engine is currently overloaded, please try again later. (simulated)",
    ),
    "bad_request": (
        "invalid_request_error",
        "temperature",
        "invalid_value",
        "Invalid value for 'temperature': expected a number between 0 and 2. (simulated)",
    ),
    "context_length": (
        "invalid_request_error",
        "messages",
        "context_length_exceeded",
        "This model's maximum context length is {window} tokens. However, your messages resulted "
        "in {prompt_tokens} tokens. Please reduce the length of the messages. (simulated)",
    ),
    "inband_error": (
        "server_error",
        None,
        "server_error",
        "The server had an error while processing your request. (simulated in-band error)",
    ),
}

_ANTHROPIC_ERRORS: dict[str, tuple[str, str]] = {
    "rate_limit": ("rate_limit_error", "Number of requests has exceeded your rate limit (simulated)."),
    "server_error": ("api_error", "Internal server error (simulated)."),
    "unavailable": ("overloaded_error", "Overloaded (simulated)."),
    "bad_request": ("invalid_request_error", "temperature: Input should be less than or equal to 1 (simulated)."),
    "context_length": (
        "invalid_request_error",
        "prompt is too long: {prompt_tokens} tokens > {window} maximum (simulated).",
    ),
    "inband_error": ("overloaded_error", "Overloaded (simulated in-band error)."),
}


def _fill(template: str, *, retry_after: float, prompt_tokens: int) -> str:
    return template.format(
        retry_after=format_seconds(retry_after),
        window=CONTEXT_WINDOW,
        prompt_tokens=max(prompt_tokens, CONTEXT_WINDOW + 1),
    )


def openai_error(
    kind: str, message: str | None = None, *, retry_after: float = 1.0, prompt_tokens: int = 0
) -> dict[str, Any]:
    """``{"error": {...}}`` as OpenAI sends it, both as an HTTP body and in-band."""
    err_type, param, code, template = _OPENAI_ERRORS[kind]
    text = message or _fill(template, retry_after=retry_after, prompt_tokens=prompt_tokens)
    return {"error": {"message": text, "type": err_type, "param": param, "code": code}}


def anthropic_error(
    kind: str,
    message: str | None = None,
    *,
    retry_after: float = 1.0,
    prompt_tokens: int = 0,
    request_id: str | None = None,
) -> dict[str, Any]:
    """``{"type": "error", "error": {...}}`` as Anthropic sends it, over HTTP and as an SSE event."""
    err_type, template = _ANTHROPIC_ERRORS[kind]
    text = message or _fill(template, retry_after=retry_after, prompt_tokens=prompt_tokens)
    body: dict[str, Any] = {"type": "error", "error": {"type": err_type, "message": text}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def plain_error(status: int, err_type: str, message: str, *, anthropic: bool) -> dict[str, Any]:
    """An error that is not an injected fault (bad JSON, unknown route), in the API's own shape."""
    if anthropic:
        return {"type": "error", "error": {"type": err_type, "message": message}}
    return {"error": {"message": message, "type": err_type, "param": None, "code": None}}


def format_seconds(seconds: float) -> str:
    """Retry-After text: an integer when whole (the RFC form), else a short decimal."""
    if float(seconds).is_integer():
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0").rstrip(".")
