"""Rate limits per tenant: requests per minute and tokens per minute (``rpm_limit``, ``tpm_limit``).

Two token buckets per tenant, checked and charged together in one atomic step: the request
bucket holds up to ``rpm`` and refills at ``rpm / 60`` per second, the token bucket likewise
with ``tpm``. A request costs 1 request and its **estimated** tokens (prompt tokens plus
``max_tokens``, or ``expected_completion_tokens`` when it sets none); when it ends,
:meth:`RateLimiter.adjust` charges or refunds the difference to the tokens it really used. A
request bigger than the whole token bucket is let through when the bucket is full and leaves
it in debt (it would otherwise never pass), so the average still holds.

When a bucket is short, nothing is charged and the answer says how long until the request
would fit: :meth:`RateLimiter.check` raises an :class:`ApiError` 429 ``rate_limit_exceeded``
with ``Retry-After`` (whole seconds, rounded up, at least 1) and ``x-ratelimit-*`` headers.

Stores: :class:`MemoryRateStore` (this process) or :class:`RedisRateStore` (one Lua script per
check, shared by every replica on the same Redis, ``LOADBEAR_REDIS_URL``); if Redis is
unreachable the Redis store degrades to in-process buckets (per replica) and says so in the
logs rather than failing requests. Times come from the limiter's clock (wall clock by default,
so replicas agree).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from loadbear.gateway.errors import ApiError
from loadbear.gateway.redis_scripts import RedisScripts

log = logging.getLogger("loadbear.ratelimit")

DEFAULT_EXPECTED_COMPLETION_TOKENS = 256
WINDOW_S = 60.0


@dataclass
class RateDecision:
    """The verdict of one check. ``retry_after`` is in seconds (0 when allowed)."""

    allowed: bool
    retry_after: float = 0.0
    limited_by: str | None = None  # "requests" | "tokens"
    rpm: int | None = None
    tpm: int | None = None
    remaining_requests: float | None = None
    remaining_tokens: float | None = None

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after - 1e-9)))

    def headers(self) -> dict[str, str]:
        h: dict[str, str] = {}
        if not self.allowed:
            h["retry-after"] = self.retry_after_header
        if self.rpm is not None:
            h["x-ratelimit-limit-requests"] = str(self.rpm)
            h["x-ratelimit-remaining-requests"] = str(max(0, math.floor(self.remaining_requests or 0)))
        if self.tpm is not None:
            h["x-ratelimit-limit-tokens"] = str(self.tpm)
            h["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(self.remaining_tokens or 0)))
        return h


@dataclass
class Permit:
    """An admitted request: its estimate, to correct with :meth:`RateLimiter.adjust`."""

    tenant_id: str
    tokens: int
    tpm: int | None
    decision: RateDecision
    adjusted: bool = False


class RateStore(Protocol):
    name: str

    async def take(self, tenant_id: str, rpm: int, tpm: int, tokens: int, now: float) -> RateDecision:
        """``rpm``/``tpm`` of 0 mean unlimited."""

    async def give_back(self, tenant_id: str, tpm: int, tokens: int, now: float) -> None:
        """Add ``tokens`` (negative: charge more) to the token bucket."""

    def reset(self, tenant_id: str | None = None) -> None: ...

    async def aclose(self) -> None: ...


def _take(state: list[float] | None, rpm: int, tpm: int, tokens: int, now: float
          ) -> tuple[RateDecision, list[float]]:
    """The bucket arithmetic shared by the memory store and (in Lua) the Redis one.
    ``state`` is [requests left, tokens left, last refill time]."""
    r, t, ts = state if state is not None else (float(rpm), float(tpm), now)
    dt = max(0.0, now - ts)
    if rpm:
        r = min(float(rpm), r + dt * rpm / WINDOW_S)
    if tpm:
        t = min(float(tpm), t + dt * tpm / WINDOW_S)
    wait, which = 0.0, None
    if rpm and r < 1.0:
        wait, which = (1.0 - r) * WINDOW_S / rpm, "requests"
    if tpm:
        need = min(float(tokens), float(tpm))
        if t < need:
            w = (need - t) * WINDOW_S / tpm
            if w > wait:
                wait, which = w, "tokens"
    d = RateDecision(wait <= 0, wait, which, rpm or None, tpm or None, r if rpm else None, t if tpm else None)
    if d.allowed:
        if rpm:
            r -= 1.0
        if tpm:
            t -= tokens
        d.remaining_requests = r if rpm else None
        d.remaining_tokens = t if tpm else None
    # An unlimited dimension keeps no level (inf): enabling it later starts with a full bucket.
    return d, [r if rpm else math.inf, t if tpm else math.inf, now]


class MemoryRateStore:
    name = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, list[float]] = {}

    def take_now(self, tenant_id: str, rpm: int, tpm: int, tokens: int, now: float) -> RateDecision:
        with self._lock:
            d, state = _take(self._buckets.get(tenant_id), rpm, tpm, tokens, now)
            self._buckets[tenant_id] = state
            return d

    async def take(self, tenant_id: str, rpm: int, tpm: int, tokens: int, now: float) -> RateDecision:
        return self.take_now(tenant_id, rpm, tpm, tokens, now)

    async def give_back(self, tenant_id: str, tpm: int, tokens: int, now: float) -> None:
        with self._lock:
            state = self._buckets.get(tenant_id)
            if state is not None and tpm:
                # No refill here (the next take refills from the stored time and caps at tpm).
                state[1] = min(float(tpm), state[1] + tokens)

    def reset(self, tenant_id: str | None = None) -> None:
        with self._lock:
            if tenant_id is None:
                self._buckets.clear()
            else:
                self._buckets.pop(tenant_id, None)

    async def aclose(self) -> None:
        return None


# KEYS[1]: hash {r, t, ts}. ARGV: now, rpm, tpm, tokens, ttl. Numbers go back as strings (Lua
# numbers would be truncated to integers in the reply).
_TAKE_LUA = """
local now = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local s = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local ts = tonumber(s[3] or ARGV[1])
local dt = now - ts
if dt < 0 then dt = 0 end
local r = tonumber(s[1] or ARGV[2])
local t = tonumber(s[2] or ARGV[3])
if rpm > 0 then r = math.min(rpm, r + dt * rpm / 60) end
if tpm > 0 then t = math.min(tpm, t + dt * tpm / 60) end
local wait = 0
local which = ''
if rpm > 0 and r < 1 then wait = (1 - r) * 60 / rpm; which = 'requests' end
if tpm > 0 then
  local need = math.min(cost, tpm)
  if t < need then
    local w = (need - t) * 60 / tpm
    if w > wait then wait = w; which = 'tokens' end
  end
end
local allowed = 0
if wait <= 0 then
  allowed = 1
  if rpm > 0 then r = r - 1 end
  if tpm > 0 then t = t - cost end
end
redis.call('HSET', KEYS[1], 'ts', ARGV[1])
-- an unlimited dimension keeps no level, so enabling it later starts with a full bucket
if rpm > 0 then redis.call('HSET', KEYS[1], 'r', tostring(r)) else redis.call('HDEL', KEYS[1], 'r') end
if tpm > 0 then redis.call('HSET', KEYS[1], 't', tostring(t)) else redis.call('HDEL', KEYS[1], 't') end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {allowed, tostring(wait), which, tostring(r), tostring(t)}
"""

_GIVE_BACK_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = redis.call('HGET', KEYS[1], 't')
if not t then return 0 end
-- no refill here: the next take refills from the stored time and caps at tpm
redis.call('HSET', KEYS[1], 't', tostring(math.min(tonumber(ARGV[2]), tonumber(t) + tonumber(ARGV[3]))))
return 1
"""


class RedisRateStore(RedisScripts):
    """Buckets in Redis (``{prefix}{tenant}``), shared by every replica using the same prefix.

    The request bucket is refilled on every check even when it does not change, so ``ts``
    always moves forward with both buckets; each check is one script, atomic across replicas.
    """

    name = "redis"
    unavailable_warning = "rate limit store: Redis unavailable (%s); using per-replica limits"
    _logger = log

    def __init__(self, url: str, *, prefix: str = "loadbear:ratelimit:", ttl_s: int = 600,
                 timeout_s: float = 0.25) -> None:
        super().__init__(url, prefix=prefix, ttl_s=ttl_s, timeout_s=timeout_s,
                         scripts={"take": _TAKE_LUA, "give_back": _GIVE_BACK_LUA})
        self.fallback = MemoryRateStore()

    async def take(self, tenant_id: str, rpm: int, tpm: int, tokens: int, now: float) -> RateDecision:
        try:
            allowed, wait, which, r, t = await self._script(
                "take", [self.prefix + tenant_id], [repr(float(now)), int(rpm), int(tpm), int(tokens), self.ttl_s])
        except Exception as exc:  # noqa: BLE001 - any Redis failure: degrade, never fail the request
            self._failed(exc)
            return await self.fallback.take(tenant_id, rpm, tpm, tokens, now)
        return RateDecision(bool(int(allowed)), float(wait), which or None, rpm or None, tpm or None,
                            float(r) if rpm else None, float(t) if tpm else None)

    async def give_back(self, tenant_id: str, tpm: int, tokens: int, now: float) -> None:
        if not tpm:
            return
        try:
            await self._script("give_back", [self.prefix + tenant_id], [repr(float(now)), int(tpm), int(tokens)])
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            await self.fallback.give_back(tenant_id, tpm, tokens, now)

    def reset(self, tenant_id: str | None = None) -> None:
        self.fallback.reset(tenant_id)
        self._delete(None if tenant_id is None else [self.prefix + tenant_id])

    async def aclose(self) -> None:
        await self._close_clients()


class RateLimiter:
    """Per-tenant limits over a store. One per gateway."""

    def __init__(self, store: RateStore | None = None, *, clock: Callable[[], float] | None = None,
                 expected_completion_tokens: int = DEFAULT_EXPECTED_COMPLETION_TOKENS) -> None:
        self.store: RateStore = store or MemoryRateStore()
        self.clock = clock or time.time
        self.expected_completion_tokens = int(expected_completion_tokens)
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    def from_settings(cls, settings: Any, **kw: Any) -> "RateLimiter":
        """Redis when ``redis_url`` is set (``ratelimit_key_prefix``), else in-process."""
        url = getattr(settings, "redis_url", None)
        store: RateStore | None = None
        if url:
            store = RedisRateStore(url, prefix=getattr(settings, "ratelimit_key_prefix", "loadbear:ratelimit:"))
        kw.setdefault("expected_completion_tokens",
                      int(getattr(settings, "ratelimit_expected_completion_tokens", DEFAULT_EXPECTED_COMPLETION_TOKENS)))
        return cls(store, **kw)

    @property
    def backend(self) -> str:
        return self.store.name

    def estimate_tokens(self, prompt_tokens: int, max_tokens: int | None) -> int:
        return int(prompt_tokens) + int(max_tokens if max_tokens and max_tokens > 0 else self.expected_completion_tokens)

    async def acquire(self, tenant_id: str, rpm: int | None, tpm: int | None, tokens: int = 0) -> RateDecision:
        """Take one request and ``tokens`` if both fit; otherwise take nothing and say how long to wait."""
        if not rpm and not tpm:
            return RateDecision(True)
        return await self.store.take(str(tenant_id), int(rpm or 0), int(tpm or 0), max(0, int(tokens)), self.clock())

    async def check(self, tenant: Any, prompt_tokens: int = 0, max_tokens: int | None = None) -> Permit | None:
        """The request path: None when the tenant has no limits, a :class:`Permit` when admitted,
        else :class:`ApiError` 429 with ``Retry-After``."""
        s = tenant.settings
        rpm, tpm = getattr(s, "rpm_limit", None), getattr(s, "tpm_limit", None)
        if not rpm and not tpm:
            return None
        tokens = self.estimate_tokens(prompt_tokens, max_tokens) if tpm else 0
        d = await self.acquire(tenant.id, rpm, tpm, tokens)
        if not d.allowed:
            raise rate_limit_error(d)
        return Permit(str(tenant.id), tokens, tpm or None, d)

    async def adjust(self, permit: Permit | None, actual_tokens: int) -> None:
        """Charge or refund the difference between the estimate and what the request used."""
        if permit is None or permit.adjusted or not permit.tpm:
            return
        permit.adjusted = True
        delta = permit.tokens - max(0, int(actual_tokens))
        if delta:
            try:
                await self.store.give_back(permit.tenant_id, permit.tpm, delta, self.clock())
            except Exception:  # noqa: BLE001 - a finished request never fails here
                log.exception("rate limit: adjusting %s failed", permit.tenant_id)

    def adjust_nowait(self, permit: Permit | None, actual_tokens: int) -> None:
        """:meth:`adjust` from synchronous code (``ChatCall.finish``)."""
        if permit is None or permit.adjusted or not permit.tpm:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self.adjust(permit, actual_tokens))
            return
        task = loop.create_task(self.adjust(permit, actual_tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        await self.store.aclose()


def rate_limit_error(d: RateDecision) -> ApiError:
    if d.limited_by == "tokens":
        what = f"{d.tpm} tokens per minute"
    else:
        what = f"{d.rpm} requests per minute"
    msg = (f"Rate limit reached for this tenant: {what}. "
           f"Retry after {d.retry_after_header} second{'s' if d.retry_after_header != '1' else ''}.")
    return ApiError(429, msg, type="rate_limit_error", code="rate_limit_exceeded", headers=d.headers())
