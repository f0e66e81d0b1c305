"""Calling a model chain: retries, backoff, breakers, failover, and one attempt row per call.

Policy, by :class:`~loadbear.providers.base.ErrorKind`:

* client faults (bad request, context too long) stop at once and reach the client as a 4xx —
  another model would fail the same way, so they must not burn through the chain;
* auth / not-found fail over to the next model at once (our configuration, not a blip);
* everything else retryable (429, 5xx, connection, timeouts, cut or malformed streams,
  in-band errors) retries the same model with jittered exponential backoff, honouring
  ``Retry-After``, then fails over — all within the request's total deadline.

For streams, the first content token *commits* the attempt: before it, failover is invisible
to the client; after it, a failure surfaces as :class:`MidStreamFailure`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import AsyncIterator

from loadbear.gateway.breaker import BreakerRegistry
from loadbear.ledger.records import AttemptRecord
from loadbear.providers.base import (
    ChatRequest,
    Completion,
    ErrorKind,
    ModelConfig,
    ProviderError,
    StreamDelta,
    Usage,
)
from loadbear.providers.tokens import count_messages, count_text

FAIL_OVER_AT_ONCE = frozenset({ErrorKind.AUTH, ErrorKind.NOT_FOUND})


class ClientFault(Exception):
    """The request itself is at fault; the chain stops here."""

    def __init__(self, error: ProviderError) -> None:
        super().__init__(error.message)
        self.error = error


class ChainExhausted(Exception):
    """Every model in the chain failed or was skipped."""

    def __init__(self, last: ProviderError | None, skipped: list[str]) -> None:
        super().__init__(last.message if last else "every model in the chain was unavailable")
        self.last = last
        self.skipped = skipped


class MidStreamFailure(Exception):
    """A stream failed after content had already reached the client."""

    def __init__(self, error: ProviderError) -> None:
        super().__init__(error.message)
        self.error = error


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
    base_delay: float = 0.2
    max_delay: float = 8.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        backoff = rng.uniform(0, min(self.max_delay, self.base_delay * (2 ** attempt)))
        return max(backoff, retry_after or 0.0)


class Executor:
    def __init__(self, providers, breakers: BreakerRegistry, policy: RetryPolicy | None = None, seed: int | None = None):
        self.providers = providers
        self.breakers = breakers
        self.policy = policy or RetryPolicy()
        self.rng = random.Random(seed)

    # -- shared bookkeeping -------------------------------------------------------------

    def _clamped(self, model: ModelConfig, deadline: float) -> ModelConfig:
        remaining = max(0.001, deadline - time.monotonic())
        total = model.timeouts.total
        if total is not None and total <= remaining:
            return model
        return dataclasses.replace(model, timeouts=dataclasses.replace(model.timeouts, total=remaining))

    def _record(
        self, st: CallState, model: ModelConfig, started: float, started_at: datetime, status: str,
        usage: Usage | None, ttft: float | None, error: ProviderError | None = None,
    ) -> None:
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
        if status != "cancelled" and not (error and error.client_fault):
            self.breakers.record(model.name, status == "ok", latency_ms)

    async def _wait_before_retry(self, try_no: int, err: ProviderError, deadline: float) -> bool:
        """Sleep before retrying the same model; False when the deadline leaves no room."""
        delay = self.policy.delay(try_no, err.retry_after, self.rng)
        if time.monotonic() + delay >= deadline:
            return False
        await asyncio.sleep(delay)
        return True

    def _next_step(self, err: ProviderError, try_no: int, tries: int) -> str:
        if err.client_fault:
            return "raise"
        if err.kind in FAIL_OVER_AT_ONCE or not err.retryable or try_no + 1 >= tries:
            return "failover"
        return "retry"

    # -- non-streaming ------------------------------------------------------------------

    async def complete(self, chain: list[ModelConfig], req: ChatRequest, st: CallState, deadline: float) -> Completion:
        for model in chain:
            if not self.breakers.allow(model.name):
                st.skipped.append(model.name)
                continue
            provider = self.providers.get(model)
            tries = model.max_retries + 1
            for try_no in range(tries):
                if time.monotonic() >= deadline:
                    raise ChainExhausted(st.last_error or _deadline_error(), st.skipped)
                started, started_at = time.monotonic(), datetime.now(timezone.utc)
                try:
                    result = await provider.complete(req, self._clamped(model, deadline))
                except ProviderError as err:
                    st.last_error = err
                    self._record(st, model, started, started_at, "error", err.usage, None, err)
                    step = self._next_step(err, try_no, tries)
                    if step == "raise":
                        raise ClientFault(err) from None
                    if step == "retry" and await self._wait_before_retry(try_no, err, deadline):
                        continue
                    break
                except asyncio.CancelledError:
                    self._record(st, model, started, started_at, "cancelled", _estimate(req, ""), None)
                    raise
                now = time.monotonic()
                self._record(st, model, started, started_at, "ok", result.usage, now)
                st.served, st.usage, st.finish_reason = model, result.usage, result.finish_reason
                st.text_parts = [result.text]
                return result
        raise ChainExhausted(st.last_error, st.skipped)

    # -- streaming ----------------------------------------------------------------------

    async def stream(
        self, chain: list[ModelConfig], req: ChatRequest, st: CallState, deadline: float
    ) -> AsyncIterator[StreamDelta]:
        for model in chain:
            if not self.breakers.allow(model.name):
                st.skipped.append(model.name)
                continue
            provider = self.providers.get(model)
            tries = model.max_retries + 1
            for try_no in range(tries):
                if time.monotonic() >= deadline:
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
                except ProviderError as err:
                    st.last_error = err
                    used = err.usage or (_estimate(req, "".join(parts)) if parts else None)
                    self._record(st, model, started, started_at, "error", used, ttft, err)
                    if st.committed:
                        st.text_parts = parts
                        st.usage = used
                        raise MidStreamFailure(err) from None
                    step = self._next_step(err, try_no, tries)
                    if step == "raise":
                        raise ClientFault(err) from None
                    if step == "retry" and await self._wait_before_retry(try_no, err, deadline):
                        continue
                    break
                except (asyncio.CancelledError, GeneratorExit):
                    used = _estimate(req, "".join(parts))
                    self._record(st, model, started, started_at, "cancelled", used, ttft)
                    st.text_parts, st.usage = parts, used
                    raise
                finally:
                    await upstream.aclose()
                if usage is None:
                    usage = _estimate(req, "".join(parts))
                self._record(st, model, started, started_at, "ok", usage, ttft)
                st.served, st.usage, st.text_parts = model, usage, parts
                st.committed = True
                return
        raise ChainExhausted(st.last_error, st.skipped)


def _estimate(req: ChatRequest, text: str) -> Usage:
    return Usage(prompt_tokens=count_messages(req.messages), completion_tokens=count_text(text) if text else 0, estimated=True)


def _deadline_error() -> ProviderError:
    return ProviderError(ErrorKind.TIMEOUT, "the request's total deadline passed before any model answered")
