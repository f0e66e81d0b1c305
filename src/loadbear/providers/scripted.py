"""``scripted``: a deterministic test double for the :class:`Provider` interface.

    provider = ScriptedProvider()
    provider.script(["hello there", ProviderError(ErrorKind.SERVER_ERROR, "boom"),
                     Step(text="slow", delay_s=0.2), Step(fail_after_chunks=2)])
    provider.script([...], model="gpt-4o-mini")   # only for calls to that model

Each call to ``complete``/``stream`` pops the next outcome: from the queue of its model
(``ModelConfig.name``, then ``upstream_model``) first, else from the shared queue, else
the default reply. Outcomes:

* ``str``: that reply;
* :class:`ProviderError`: raised (a fresh copy) before any output;
* :class:`Step`: ``delay_s`` before the first chunk (or the response), ``chunk_delay_s``
  between chunks, ``fail_after_chunks=N`` streams N word chunks then raises ``error``
  (default: ``STREAM_CUT``) with the usage of the text so far attached (``complete``
  raises the same error), ``error`` without ``fail_after_chunks`` fails after the delay,
  ``usage`` overrides the counted usage, ``finish_reason`` defaults to "stop".

Replies stream word by word (leading spaces). Usage is counted with ``tokens.py``
(``estimated=True``) unless the step gives one. ``max_tokens`` truncates at a word
boundary (finish_reason "length"). ``calls`` records every chat call.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Iterable

from .base import ChatRequest, Completion, ErrorKind, ModelConfig, ProviderError, StreamDelta, Usage
from .local import hash_embedding
from .tokens import count_messages, count_text, truncate_to_tokens

__all__ = ["ScriptedProvider", "Step", "Call", "DEFAULT_REPLY"]

DEFAULT_REPLY = "This is a scripted reply."


@dataclass(slots=True)
class Step:
    text: str | None = None  # None: the provider's default reply
    delay_s: float = 0.0
    fail_after_chunks: int | None = None
    error: ProviderError | None = None
    chunk_delay_s: float = 0.0
    usage: Usage | None = None
    finish_reason: str = "stop"


@dataclass(slots=True)
class Call:
    model: str
    request: ChatRequest
    stream: bool


_ANY = object()


def _fresh(err: ProviderError, usage: Usage | None) -> ProviderError:
    return ProviderError(
        err.kind,
        err.message,
        status=err.status,
        retry_after=err.retry_after,
        usage=err.usage if err.usage is not None else usage,
    )


class ScriptedProvider:
    """Queued, deterministic outcomes; records its calls (see the module doc)."""

    name = "scripted"

    def __init__(self, replies: Iterable[Any] | None = None, *, default: str = DEFAULT_REPLY) -> None:
        self.default = default
        self.calls: list[Call] = []
        self.embed_calls: list[tuple[str, list[str]]] = []
        self._queues: dict[object, deque[Any]] = {}
        if replies is not None:
            self.script(replies)

    # ------------------------------------------------------------------ scripting

    def script(self, outcomes: Iterable[Any], model: str | None = None) -> None:
        """Append outcomes for the next calls (to ``model`` only, when given)."""
        key = _ANY if model is None else model
        self._queues.setdefault(key, deque()).extend(outcomes)

    def pending(self, model: str | None = None) -> int:
        queue = self._queues.get(_ANY if model is None else model)
        return len(queue) if queue else 0

    def reset(self) -> None:
        self._queues.clear()
        self.calls.clear()
        self.embed_calls.clear()

    def _next(self, model: ModelConfig) -> Step:
        outcome: Any = None
        for key in (model.name, model.upstream_model, _ANY):
            queue = self._queues.get(key)
            if queue:
                outcome = queue.popleft()
                break
        if outcome is None:
            return Step(text=self.default)
        if isinstance(outcome, str):
            return Step(text=outcome)
        if isinstance(outcome, ProviderError):
            return Step(error=outcome)
        if isinstance(outcome, Step):
            return outcome if outcome.text is not None else replace(outcome, text=self.default)
        raise TypeError(f"cannot script {outcome!r}: expected str, ProviderError or Step")

    # ------------------------------------------------------------------ provider

    @staticmethod
    def _pieces(text: str) -> list[str]:
        if not text:
            return []
        words = text.split(" ")
        return [words[0]] + [" " + w for w in words[1:]]

    @staticmethod
    def _usage(request: ChatRequest, model: ModelConfig, text: str, step: Step) -> Usage:
        if step.usage is not None:
            return step.usage
        return Usage(count_messages(request.messages, model.tokenizer), count_text(text, model.tokenizer), 0, True)

    def _failure(self, step: Step, request: ChatRequest, model: ModelConfig, produced: str) -> ProviderError:
        err = step.error or ProviderError(ErrorKind.STREAM_CUT, "scripted: stream cut")
        usage = None
        if produced:
            usage = Usage(count_messages(request.messages, model.tokenizer), count_text(produced, model.tokenizer), 0, True)
        return _fresh(err, usage)

    async def complete(self, request: ChatRequest, model: ModelConfig) -> Completion:
        self.calls.append(Call(model.name, request, False))
        step = self._next(model)
        if step.delay_s:
            await asyncio.sleep(step.delay_s)
        text, truncated = truncate_to_tokens(step.text or "", request.max_tokens, model.tokenizer)
        if step.fail_after_chunks is not None:
            produced = "".join(self._pieces(text)[: step.fail_after_chunks])
            raise self._failure(step, request, model, produced)
        if step.error is not None:
            raise self._failure(step, request, model, "")
        finish = "length" if truncated else step.finish_reason
        return Completion(text, finish, self._usage(request, model, text, step), model.upstream_model)

    async def stream(self, request: ChatRequest, model: ModelConfig) -> AsyncIterator[StreamDelta]:
        self.calls.append(Call(model.name, request, True))
        step = self._next(model)
        if step.delay_s:
            await asyncio.sleep(step.delay_s)
        text, truncated = truncate_to_tokens(step.text or "", request.max_tokens, model.tokenizer)
        if step.error is not None and step.fail_after_chunks is None:
            raise self._failure(step, request, model, "")
        pieces = self._pieces(text)
        limit = step.fail_after_chunks
        for i, piece in enumerate(pieces):
            if limit is not None and i >= limit:
                break
            if i and step.chunk_delay_s:
                await asyncio.sleep(step.chunk_delay_s)
            yield StreamDelta(piece)
        if limit is not None:
            raise self._failure(step, request, model, "".join(pieces[:limit]))
        finish = "length" if truncated else step.finish_reason
        yield StreamDelta("", finish, self._usage(request, model, text, step))

    async def embed(self, texts: list[str], model: ModelConfig) -> list[list[float]]:
        self.embed_calls.append((model.name, list(texts)))
        return [hash_embedding(t) for t in texts]

    async def aclose(self) -> None:
        return None
