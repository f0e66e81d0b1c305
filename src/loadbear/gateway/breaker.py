"""Circuit breakers per provider+model, and the recent health figures shown by ``/admin/providers``.

A breaker opens after ``threshold`` consecutive failures, lets one probe through after
``cooldown`` seconds (half-open), and closes on the probe's success (a failed probe opens it
again for another cooldown). An open breaker makes the fallback chain skip the model at once
instead of waiting on a provider that is down. A probe that never reports back (its request
was cancelled, or failed for a reason that says nothing about the upstream, such as a bad
request) is released; one that vanished with its process expires after ``probe_timeout``.

State lives in a :class:`BreakerStore`:

* :class:`MemoryBreakerStore` — in the process (``breaker_store = "memory"``, or library use
  without a database);
* :class:`RedisBreakerStore` — shared by every worker and replica that points at the same Redis
  (``LOADBEAR_REDIS_URL``). Each transition is one Lua script, so concurrent replicas agree on
  who gets the half-open probe. If Redis is unreachable the store degrades to in-process state
  (and says so in the snapshot) rather than failing requests;
* :class:`~loadbear.gateway.breaker_db.DatabaseBreakerStore` — shared by every worker and replica
  on the same database (table ``breaker_state``), with a local view refreshed every 250 ms so
  the hot path makes no round trip; the default when Redis is not configured.

``BreakerRegistry.from_settings`` picks one from ``breaker_store`` ("auto": Redis when
``redis_url`` is set, else the database).

Keys are ``"{provider}/{model}"`` (see :func:`breaker_key`). The hot-path calls (``allow``,
``record``, ``release``) are async; ``snapshot``/``state``/``total_trips`` are sync (admin pages,
the CLI, tests).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from loadbear.gateway.redis_scripts import RedisScripts

log = logging.getLogger("loadbear.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STORE_KINDS = ("auto", "memory", "database", "redis")
HEALTH_WINDOW_S = 300.0
HEALTH_MAX_CALLS = 200


def breaker_key(model: Any) -> str:
    """The breaker of one catalog model: per provider + model."""
    return f"{model.provider}/{model.name}"


# -- the state machine (in memory) ------------------------------------------------------------


@dataclass
class Breaker:
    threshold: int = 5
    cooldown: float = 30.0
    probe_timeout: float = 60.0
    state: str = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    trips: int = 0
    probe_at: float | None = None  # when the current half-open probe was let through

    def allow(self, now: float) -> bool:
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if now - self.opened_at < self.cooldown:
                return False
            self.state = HALF_OPEN
            self.probe_at = None
        # half-open: exactly one probe at a time; a lost probe expires
        if self.probe_at is None or now - self.probe_at >= self.probe_timeout:
            self.probe_at = now
            return True
        return False

    def success(self) -> None:
        self.state = CLOSED
        self.failures = 0
        self.probe_at = None

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.threshold):
            self.trips += 1
            self.state = OPEN
            self.opened_at = now
            self.probe_at = None

    def release(self) -> None:
        """The probe ended without a verdict: let the next request probe."""
        if self.state == HALF_OPEN:
            self.probe_at = None


def health_summary(calls: Iterable[tuple[float, bool, int]], now: float, window: float = HEALTH_WINDOW_S) -> dict[str, Any]:
    recent = [c for c in calls if now - c[0] <= window]
    if not recent:
        return {"calls": 0, "error_rate": None, "p50_latency_ms": None, "p95_latency_ms": None}
    lat = sorted(c[2] for c in recent)
    errors = sum(1 for c in recent if not c[1])
    return {
        "calls": len(recent),
        "error_rate": round(errors / len(recent), 4),
        "p50_latency_ms": lat[len(lat) // 2],
        "p95_latency_ms": lat[min(len(lat) - 1, int(len(lat) * 0.95))],
    }


@dataclass
class ModelHealth:
    # (clock time, ok, latency ms) of recent calls, bounded.
    recent: deque = field(default_factory=lambda: deque(maxlen=HEALTH_MAX_CALLS))

    def add(self, ok: bool, latency_ms: int, now: float) -> None:
        self.recent.append((now, ok, latency_ms))

    def summary(self, now: float, window: float = HEALTH_WINDOW_S) -> dict[str, Any]:
        return health_summary(self.recent, now, window)


# -- stores -----------------------------------------------------------------------------------


class BreakerStore(Protocol):
    """Where breaker state lives. ``now`` always comes from the registry's clock."""

    name: str

    async def allow(self, key: str, now: float) -> bool: ...

    async def record(self, key: str, ok: bool, latency_ms: int, now: float) -> str: ...

    async def release(self, key: str) -> None: ...

    def snapshot(self, key: str, now: float) -> dict[str, Any]: ...

    def keys(self) -> list[str]: ...

    def reset(self, key: str | None = None) -> None: ...

    async def aclose(self) -> None: ...


class MemoryBreakerStore:
    """State in this process only."""

    name = "memory"

    def __init__(self, threshold: int = 5, cooldown: float = 30.0, probe_timeout: float = 60.0) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.probe_timeout = probe_timeout
        self._breakers: dict[str, Breaker] = {}
        self._health: dict[str, ModelHealth] = {}

    def _get(self, key: str) -> Breaker:
        b = self._breakers.get(key)
        if b is None:
            b = self._breakers[key] = Breaker(self.threshold, self.cooldown, self.probe_timeout)
        return b

    # sync versions (the async ones below are what the executor awaits)
    def allow_now(self, key: str, now: float) -> bool:
        return self._get(key).allow(now)

    def record_now(self, key: str, ok: bool, latency_ms: int, now: float) -> str:
        b = self._get(key)
        if ok:
            b.success()
        else:
            b.failure(now)
        h = self._health.get(key)
        if h is None:
            h = self._health[key] = ModelHealth()
        h.add(ok, latency_ms, now)
        return b.state

    async def allow(self, key: str, now: float) -> bool:
        return self.allow_now(key, now)

    async def record(self, key: str, ok: bool, latency_ms: int, now: float) -> str:
        return self.record_now(key, ok, latency_ms, now)

    async def release(self, key: str) -> None:
        b = self._breakers.get(key)
        if b is not None:
            b.release()

    def snapshot(self, key: str, now: float) -> dict[str, Any]:
        b = self._breakers.get(key)
        state = b.state if b else CLOSED
        if b is not None and state == OPEN and now - b.opened_at >= self.cooldown:
            state = HALF_OPEN  # what the next request will find
        out: dict[str, Any] = {
            "breaker": state,
            "consecutive_failures": b.failures if b else 0,
            "trips": b.trips if b else 0,
            "opened_seconds_ago": round(now - b.opened_at, 3) if b and b.state != CLOSED else None,
        }
        h = self._health.get(key)
        out.update(h.summary(now) if h else health_summary((), now))
        return out

    def keys(self) -> list[str]:
        return list(self._breakers)

    def reset(self, key: str | None = None) -> None:
        if key is None:
            self._breakers.clear()
            self._health.clear()
        else:
            self._breakers.pop(key, None)
            self._health.pop(key, None)

    async def aclose(self) -> None:
        return None


# Lua: one round trip per transition, atomic across replicas. Missing hash fields read as false.
_ALLOW_LUA = """
local s = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'probe_at')
local state = s[1] or 'closed'
if state == 'closed' then return 1 end
local now = tonumber(ARGV[1])
if state == 'open' then
  if now - tonumber(s[2] or '0') < tonumber(ARGV[2]) then return 0 end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return 1
end
local probe = s[3]
if (not probe) or probe == '' or now - tonumber(probe) >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'probe_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return 1
end
return 0
"""

_RECORD_LUA = """
redis.call('LPUSH', KEYS[2], ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[5]) - 1)
redis.call('EXPIRE', KEYS[2], ARGV[6])
local s = redis.call('HMGET', KEYS[1], 'state', 'failures')
local state = s[1] or 'closed'
if ARGV[2] == '1' then
  if state ~= 'closed' or tonumber(s[2] or '0') ~= 0 then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'probe_at', '')
    redis.call('EXPIRE', KEYS[1], ARGV[6])
  end
  return 'closed'
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if state == 'half_open' or (state == 'closed' and failures >= tonumber(ARGV[4])) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1], 'probe_at', '')
  redis.call('HINCRBY', KEYS[1], 'trips', 1)
  state = 'open'
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
return state
"""

_RELEASE_LUA = """
if redis.call('HGET', KEYS[1], 'state') == 'half_open' then
  redis.call('HSET', KEYS[1], 'probe_at', '')
end
return 1
"""


class RedisBreakerStore(RedisScripts):
    """Breaker state in Redis, shared by every worker and replica using the same ``prefix``.

    Keys: ``{prefix}{key}`` (a hash: state, failures, opened_at, probe_at, trips) and
    ``{prefix}{key}:calls`` (a capped list of recent calls for the health figures). Times are
    the registry clock's (wall-clock seconds by default, comparable across machines).
    """

    name = "redis"
    unavailable_warning = "breaker store: Redis unavailable (%s); using in-process breaker state"
    _logger = log

    def __init__(
        self,
        url: str,
        threshold: int = 5,
        cooldown: float = 30.0,
        probe_timeout: float = 60.0,
        prefix: str = "loadbear:breaker:",
        ttl_s: int = 86_400,
        timeout_s: float = 0.25,
    ) -> None:
        super().__init__(url, prefix=prefix, ttl_s=ttl_s, timeout_s=timeout_s,
                         scripts={"allow": _ALLOW_LUA, "record": _RECORD_LUA, "release": _RELEASE_LUA})
        self.threshold = threshold
        self.cooldown = cooldown
        self.probe_timeout = probe_timeout
        # Used while Redis is unreachable, so requests never fail because of the breaker store.
        self.fallback = MemoryBreakerStore(threshold, cooldown, probe_timeout)
        self._seen: set[str] = set()

    # -- plumbing

    def _k(self, key: str) -> tuple[str, str]:
        return self.prefix + key, self.prefix + key + ":calls"

    # -- the store API

    async def allow(self, key: str, now: float) -> bool:
        self._seen.add(key)
        try:
            state_key, _ = self._k(key)
            return bool(await self._script("allow", [state_key], [repr(now), self.cooldown, self.probe_timeout, self.ttl_s]))
        except Exception as exc:  # noqa: BLE001 - any Redis failure: degrade, never fail the request
            self._failed(exc)
            return await self.fallback.allow(key, now)

    async def record(self, key: str, ok: bool, latency_ms: int, now: float) -> str:
        self._seen.add(key)
        try:
            return str(await self._script(
                "record", list(self._k(key)),
                [repr(now), "1" if ok else "0", int(latency_ms), self.threshold, HEALTH_MAX_CALLS, self.ttl_s],
            ))
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return await self.fallback.record(key, ok, latency_ms, now)

    async def release(self, key: str) -> None:
        try:
            await self._script("release", [self._k(key)[0]], [])
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            await self.fallback.release(key)

    def snapshot(self, key: str, now: float) -> dict[str, Any]:
        state_key, calls_key = self._k(key)
        try:
            pipe = self._sync.pipeline(transaction=False)
            pipe.hgetall(state_key)
            pipe.lrange(calls_key, 0, HEALTH_MAX_CALLS - 1)
            raw, calls_raw = pipe.execute()
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return {**self.fallback.snapshot(key, now), "store": "memory (redis unavailable)"}
        state = raw.get("state") or CLOSED
        opened_at = float(raw.get("opened_at") or 0.0)
        if state == OPEN and now - opened_at >= self.cooldown:
            state = HALF_OPEN
        calls = []
        for entry in calls_raw:
            try:
                t, ok, lat = entry.split(" ")
                calls.append((float(t), ok == "1", int(lat)))
            except ValueError:
                continue
        out: dict[str, Any] = {
            "breaker": state,
            "consecutive_failures": int(raw.get("failures") or 0),
            "trips": int(raw.get("trips") or 0),
            "opened_seconds_ago": round(now - opened_at, 3) if (raw.get("state") or CLOSED) != CLOSED else None,
        }
        out.update(health_summary(calls, now))
        return out

    def keys(self) -> list[str]:
        found = set(self._seen)
        try:
            for k in self._sync.scan_iter(match=self.prefix + "*", count=500):
                if not k.endswith(":calls"):
                    found.add(k[len(self.prefix):])
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
        return sorted(found)

    def reset(self, key: str | None = None) -> None:
        """Forget state (all keys under the prefix when ``key`` is None)."""
        self.fallback.reset(key)
        self._delete(None if key is None else self._k(key))

    async def aclose(self) -> None:
        await self._close_clients()


# -- the registry the executor talks to -------------------------------------------------------


class BreakerRegistry:
    """Breakers for every model, over a store. ``clock`` gives ``now`` to every transition.

    ``record`` returns the state after the call, so the executor can stop retrying a model
    whose breaker just opened.
    """

    def __init__(
        self,
        threshold: int = 5,
        cooldown: float = 30.0,
        clock=None,
        store: BreakerStore | None = None,
        probe_timeout: float = 60.0,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.store: BreakerStore = store or MemoryBreakerStore(threshold, cooldown, probe_timeout)
        # Wall clock for a shared store (replicas must agree on "now"); monotonic in a process.
        shared = self.store.name in ("redis", "database")
        self.clock = clock or (time.time if shared else time.monotonic)

    @classmethod
    def from_settings(cls, settings: Any, probe_timeout: float | None = None, db: Any = None) -> "BreakerRegistry":
        """The store named by ``breaker_store``: "auto" is Redis when ``redis_url`` is set, else
        the database ``db`` (in-process state when no database is given, e.g. library use)."""
        threshold = int(getattr(settings, "breaker_threshold", 5))
        cooldown = float(getattr(settings, "breaker_cooldown_s", 30.0))
        probe = float(probe_timeout if probe_timeout is not None else getattr(settings, "request_deadline_s", 60.0))
        url = getattr(settings, "redis_url", None)
        kind = (getattr(settings, "breaker_store", "auto") or "auto").strip().lower()
        if kind not in STORE_KINDS:
            raise ValueError(f"breaker_store = {kind!r}: expected one of {', '.join(STORE_KINDS)}")
        store: BreakerStore | None = None
        if kind == "redis" or (kind == "auto" and url):
            if not url:
                raise ValueError("breaker_store = 'redis' needs redis_url (LOADBEAR_REDIS_URL)")
            store = RedisBreakerStore(url, threshold, cooldown, probe,
                                      prefix=getattr(settings, "breaker_key_prefix", "loadbear:breaker:"))
        elif kind == "database" or (kind == "auto" and db is not None):
            if db is None:
                raise ValueError("breaker_store = 'database' needs a database")
            from loadbear.gateway.breaker_db import DatabaseBreakerStore

            store = DatabaseBreakerStore(db, threshold, cooldown, probe,
                                         refresh_s=float(getattr(settings, "breaker_refresh_s", 0.25)))
        return cls(threshold, cooldown, store=store, probe_timeout=probe)

    @property
    def backend(self) -> str:
        return self.store.name

    async def allow(self, key: str) -> bool:
        return await self.store.allow(key, self.clock())

    async def record(self, key: str, ok: bool, latency_ms: int) -> str:
        return await self.store.record(key, ok, latency_ms, self.clock())

    async def release(self, key: str) -> None:
        await self.store.release(key)

    def state(self, key: str) -> str:
        return self.snapshot(key)["breaker"]

    def snapshot(self, key: str) -> dict[str, Any]:
        return {**self.store.snapshot(key, self.clock()), "breaker_store": self.store.name}

    def total_trips(self, keys: Iterable[str] | None = None) -> int:
        return sum(self.store.snapshot(k, self.clock())["trips"] for k in (keys or self.store.keys()))

    def reset(self, key: str | None = None) -> None:
        self.store.reset(key)

    async def aclose(self) -> None:
        await self.store.aclose()
