"""Calling a model chain: retries, backoff, breakers, failover, and one attempt row per call.

Policy, by :class:`~loadbear.providers.base.ErrorKind`:

* client faults (bad request, context too long) stop at once and reach the client as a 4xx —
  another model would fail the same way, so they must not burn through the chain;
* auth / not-found fail over to the next model at once (our configuration, not a blip);
* everything else retryable (429, 5xx, connection, timeouts, cut or malformed streams,
  in-band errors) retries the same model with jittered exponential backoff, honouring
  ``Retry-After``, then fails over — all within the request's total deadline. A wait that
  would not fit in what is left of the deadline (or a ``Retry-After`` longer than
  ``RetryPolicy.max_retry_after``) fails over at once instead of sleeping;
* a model whose breaker is open is skipped without a call; a failure that opens the breaker
  stops the retries of that model.

Every upstream call becomes exactly one :class:`AttemptRecord` (ok, error or cancelled) —
skipped models are not calls and are listed in ``CallState.skipped`` instead.

For streams, the first content token *commits* the attempt: before it, failover is invisible
to the client; after it, a failure surfaces as :class:`MidStreamFailure` (the caller decides
between an error event and a continuation, see :func:`continuation_request`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import AsyncIterator

from loadbear.gateway.breaker import CLOSED, BreakerRegistry, breaker_key
from loadbear.ledger.records import AttemptRecord
from loadbear.providers.base import (
    ChatRequest,
    Completion,
    ErrorKind,
    ModelConfig,
    ProviderError,
    StreamDelta,
    Timeouts,
    Usage,
)
from loadbear.providers.tokens import count_messages, count_text

_log = logging.getLogger("loadbear.executor")
_MODEL_SLOTS = tuple(f.name for f in dataclasses.fields(ModelConfig))
_new_model = object.__new__

FAIL_OVER_AT_ONCE = frozenset({ErrorKind.AUTH, ErrorKind.NOT_FOUND})

CONTINUE_PROMPT = (
    "Your previous answer was cut off. Continue it exactly from where it stopped: do not repeat "
    "anything already written and do not add any preamble."
)


class ClientFault(Exception):
    """The request itself is at fault; the chain stops here."""

    def __init__(self, error: ProviderError) -> None:
        super().__init__(error.message)
        self.error = error


class ChainExhausted(Exception):
    """Every model in the chain failed or was skipped (or the deadline passed)."""

    def __init__(self, last: ProviderError | None, skipped: list[str]) -> None:
        super().__init__(last.message if last else "every model in the chain was unavailable")
        self.last = last
        self.skipped = skipped


class MidStreamFailure(Exception):
    """A stream failed after content had already reached the client."""

    def __init__(self, error: ProviderError, model: ModelConfig | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.model = model


@dataclass
class CallState:
    """What happened during one request's calls; becomes the ledger row."""

    attempts: list[AttemptRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    served: ModelConfig | None = None
    committed: bool = False
    usage: Usage | None = None
    finish_reason: str | None = None
    text_parts: list[str] = field(default_factory=list)
    last_error: ProviderError | None = None


@dataclass
class RetryPolicy:
    """Backoff between tries of the same model: ``uniform(0, min(max, base * 2**n))`` ("full
    jitter"), but never less than the upstream's ``Retry-After``."""

    base_delay: float = 0.2
    max_delay: float = 8.0
    # A Retry-After longer than this fails over instead of waiting.
    max_retry_after: float = 20.0
    # Do not start a call with less than this left of the deadline: it could only time out.
    min_attempt_s: float = 0.05

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        backoff = rng.uniform(0, min(self.max_delay, self.base_delay * (2 ** attempt)))
        return max(backoff, retry_after or 0.0)

    @classmethod
    def from_settings(cls, settings) -> "RetryPolicy":
        return cls(
            base_delay=float(getattr(settings, "retry_base_delay_s", 0.2)),
            max_delay=float(getattr(settings, "retry_max_delay_s", 8.0)),
            max_retry_after=float(getattr(settings, "retry_after_max_s", 20.0)),
        )


def continuation_request(req: ChatRequest, partial: str) -> ChatRequest:
    """The request that asks another model to continue ``partial`` (an answer cut mid-stream)."""
    messages = [*req.messages, {"role": "assistant", "content": partial}, {"role": "user", "content": CONTINUE_PROMPT}]
    max_tokens = req.max_tokens
    if max_tokens is not None:
        max_tokens = max(1, max_tokens - count_text(partial))
    return dataclasses.replace(req, messages=messages, max_tokens=max_tokens)


class Executor:
    def __init__(self, providers, breakers: BreakerRegistry, policy: RetryPolicy | None = None, seed: int | None = None):
        self.providers = providers
        self.breakers = breakers
        self.policy = policy or RetryPolicy()
        self.rng = random.Random(seed)

    # -- shared bookkeeping -------------------------------------------------------------

    def _clamped(self, model: ModelConfig, deadline: float) -> ModelConfig:
        """The model with its total timeout cut to what is left of the request's deadline."""
        remaining = max(0.001, deadline - time.monotonic())
        t = model.timeouts
        total = t.total
        if total is not None and total <= remaining:
            return model
        # The usual case (catalog timeouts longer than the request deadline) runs per attempt:
        # a slot-by-slot copy costs a fifth of two dataclasses.replace calls.
        clone = _new_model(ModelConfig)
        for name in _MODEL_SLOTS:
            setattr(clone, name, getattr(model, name))
        clone.timeouts = Timeouts(t.connect, t.first_token, t.idle, remaining)
        return clone

    def _no_time_left(self, deadline: float) -> bool:
        return deadline - time.monotonic() < self.policy.min_attempt_s

    async def _record(
        self, st: CallState, model: ModelConfig, started: float, started_at: datetime, status: str,
        usage: Usage | None, ttft: float | None, error: ProviderError | None = None,
    ) -> str:
        """Append the attempt row and tell the breaker; returns the breaker state after it."""
        latency_ms = int((time.monotonic() - started) * 1000)
        u = usage or Usage()
        st.attempts.append(
            AttemptRecord(
                attempt_no=len(st.attempts) + 1,
                provider=model.provider,
                model=model.name,
                upstream_model=model.upstream_model,
                status=status,
                started_at=started_at,
                latency_ms=latency_ms,
                ttft_ms=None if ttft is None else int((ttft - started) * 1000),
                error_type=error.kind.value if error else None,
                error=error.message[:1000] if error else None,
                http_status=error.status if error else None,
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                cached_input_tokens=u.cached_tokens,
                tokens_estimated=u.estimated,
                cost_micro_usd=model.cost_micro_usd(u),
            )
        )
        key = breaker_key(model)
        if status == "cancelled" or (error is not None and error.client_fault):
            # Says nothing about the upstream's health: free a half-open probe, count nothing.
            await self.breakers.release(key)
            return CLOSED
        return await self.breakers.record(key, status == "ok", latency_ms)

    async def _wait_before_retry(self, try_no: int, err: ProviderError, deadline: float) -> bool:
        """Sleep before retrying the same model; False (fail over) when the wait does not fit."""
        if err.retry_after is not None and err.retry_after > self.policy.max_retry_after:
            return False
        delay = self.policy.delay(try_no, err.retry_after, self.rng)
        if time.monotonic() + delay + self.policy.min_attempt_s >= deadline:
            return False
        await asyncio.sleep(delay)
        return True

    def _next_step(self, err: ProviderError, try_no: int, tries: int, breaker: str) -> str:
        if err.client_fault:
            return "raise"
        if err.kind in FAIL_OVER_AT_ONCE or not err.retryable or try_no + 1 >= tries or breaker != CLOSED:
            return "failover"
        return "retry"

    # -- non-streaming ------------------------------------------------------------------

    async def complete(self, chain: list[ModelConfig], req: ChatRequest, st: CallState, deadline: float) -> Completion:
        for model in chain:
            if self._no_time_left(deadline):
                break
            if not await self.breakers.allow(breaker_key(model)):
                st.skipped.append(model.name)
                continue
            provider = self.providers.get(model)
            tries = model.max_retries + 1
            for try_no in range(tries):
                if self._no_time_left(deadline):
                    raise ChainExhausted(st.last_error or _deadline_error(), st.skipped)
                started, started_at = time.monotonic(), datetime.now(timezone.utc)
                try:
                    result = await provider.complete(req, self._clamped(model, deadline))
                except Exception as exc:  # noqa: BLE001  (see _as_provider_error)
                    err = _as_provider_error(exc, model)
                    st.last_error = err
                    breaker = await self._record(st, model, started, started_at, "error", err.usage, None, err)
                    step = self._next_step(err, try_no, tries, breaker)
                    if step == "raise":
                        raise ClientFault(err) from None
                    if step == "retry" and await self._wait_before_retry(try_no, err, deadline):
                        continue
                    break
                except asyncio.CancelledError:
                    await self._record(st, model, started, started_at, "cancelled", _estimate(req, ""), None)
                    raise
                now = time.monotonic()
                await self._record(st, model, started, started_at, "ok", result.usage, now)
                st.served, st.usage, st.finish_reason = model, result.usage, result.finish_reason
                st.text_parts = [result.text]
                return result
        raise ChainExhausted(st.last_error or (_deadline_error() if self._no_time_left(deadline) else None), st.skipped)

    # -- streaming ----------------------------------------------------------------------

    async def stream(
        self, chain: list[ModelConfig], req: ChatRequest, st: CallState, deadline: float
    ) -> AsyncIterator[StreamDelta]:
        """Yield the deltas of the first model that answers. ``st.committed`` must be False on
        entry: it turns True at the first content (or at an empty answer's finish)."""
        for model in chain:
            if self._no_time_left(deadline):
                break
            if not await self.breakers.allow(breaker_key(model)):
                st.skipped.append(model.name)
                continue
            provider = self.providers.get(model)
            tries = model.max_retries + 1
            for try_no in range(tries):
                if self._no_time_left(deadline):
                    raise ChainExhausted(st.last_error or _deadline_error(), st.skipped)
                started, started_at = time.monotonic(), datetime.now(timezone.utc)
                ttft: float | None = None
                parts: list[str] = []
                usage: Usage | None = None
                upstream = provider.stream(req, self._clamped(model, deadline))
                try:
                    async for delta in upstream:
                        if delta.text:
                            if ttft is None:
                                ttft = time.monotonic()
                                st.committed = True
                                st.served = model
                            parts.append(delta.text)
                        if delta.usage is not None:
                            usage = delta.usage
                        if delta.finish_reason is not None:
                            st.finish_reason = delta.finish_reason
                            if not st.committed:  # an empty answer is still an answer
                                st.committed = True
                                st.served = model
                        if delta.text or delta.finish_reason:
                            yield delta
                except Exception as exc:  # noqa: BLE001  (see _as_provider_error)
                    err = _as_provider_error(exc, model)
                    st.last_error = err
                    used = err.usage or (_estimate(req, "".join(parts)) if parts else None)
                    breaker = await self._record(st, model, started, started_at, "error", used, ttft, err)
                    if st.committed:
                        st.text_parts = parts
                        st.usage = used
                        raise MidStreamFailure(err, model) from None
                    step = self._next_step(err, try_no, tries, breaker)
                    if step == "raise":
                        raise ClientFault(err) from None
                    if step == "retry" and await self._wait_before_retry(try_no, err, deadline):
                        continue
                    break
                except (asyncio.CancelledError, GeneratorExit):
                    used = _estimate(req, "".join(parts))
                    await self._record(st, model, started, started_at, "cancelled", used, ttft)
                    st.text_parts, st.usage = parts, used
                    raise
                finally:
                    await upstream.aclose()
                if usage is None:
                    usage = _estimate(req, "".join(parts))
                await self._record(st, model, started, started_at, "ok", usage, ttft)
                st.served, st.usage, st.text_parts = model, usage, parts
                st.committed = True
                return
        raise ChainExhausted(st.last_error or (_deadline_error() if self._no_time_left(deadline) else None), st.skipped)


def _as_provider_error(exc: Exception, model: ModelConfig) -> ProviderError:
    """Any other exception out of a provider (an upstream answer shaped in a way its mapping did
    not foresee) is a malformed answer: a failure like any other, retried or failed over and
    ledgered, never a 500 without a ledger row."""
    if isinstance(exc, ProviderError):
        return exc
    # Kept visible: it may as well be a bug in the provider's mapping.
    _log.warning("unexpected %s from %s/%s", type(exc).__name__, model.provider, model.name, exc_info=exc)
    return ProviderError(ErrorKind.MALFORMED, f"{model.provider}: unexpected {type(exc).__name__} reading the "
                         f"answer: {exc}")


def _estimate(req: ChatRequest, text: str) -> Usage:
    return Usage(prompt_tokens=count_messages(req.messages), completion_tokens=count_text(text) if text else 0, estimated=True)


def _deadline_error() -> ProviderError:
    return ProviderError(ErrorKind.TIMEOUT, "the request's total deadline passed before any model answered")
