"""Circuit breakers: the state machine with a fake clock (in memory and in Redis — the same
tests run on both stores), and two gateways that share breaker state through Redis.

Redis tests use ``LOADBEAR_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) and are
skipped when nothing answers there. Every test uses its own key prefix and deletes it.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from loadbear.gateway.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerRegistry,
    MemoryBreakerStore,
    RedisBreakerStore,
)
from conftest import REDIS_UP, REDIS_URL, needs_redis



class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def redis_prefix():
    prefix = f"loadbear:test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    if REDIS_UP:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def make_registry(request, redis_prefix):
    made: list[BreakerRegistry] = []

    def make(threshold: int = 3, cooldown: float = 10.0, probe_timeout: float = 60.0, clock=None) -> BreakerRegistry:
        clock = clock or FakeClock()
        if request.param == "memory":
            store = MemoryBreakerStore(threshold, cooldown, probe_timeout)
        else:
            store = RedisBreakerStore(REDIS_URL, threshold, cooldown, probe_timeout, prefix=redis_prefix)
        reg = BreakerRegistry(threshold, cooldown, clock=clock, store=store)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        asyncio.run(reg.aclose())


def run(coro):
    return asyncio.run(coro)


K = "openai/gpt-4o-mini"


async def fail(reg: BreakerRegistry, n: int = 1, key: str = K) -> str:
    state = CLOSED
    for _ in range(n):
        state = await reg.record(key, False, 100)
    return state


def test_opens_after_threshold_consecutive_failures(make_registry):
    async def go():
        reg = make_registry(threshold=3)
        assert await reg.allow(K)
        assert await fail(reg, 2) == CLOSED and reg.state(K) == CLOSED
        await reg.record(K, True, 50)  # a success resets the count
        assert await fail(reg, 2) == CLOSED
        assert await fail(reg) == OPEN
        assert reg.state(K) == OPEN
        snap = reg.snapshot(K)
        assert (snap["trips"], snap["consecutive_failures"], snap["calls"]) == (1, 3, 6)
        assert snap["error_rate"] == round(5 / 6, 4)
    run(go())


def test_open_breaker_skips_without_waiting(make_registry):
    async def go():
        clock = FakeClock()
        reg = make_registry(threshold=2, cooldown=10, clock=clock)
        await fail(reg, 2)
        for _ in range(5):
            assert not await reg.allow(K)
        clock.advance(9.9)
        assert not await reg.allow(K)
        assert reg.state(K) == OPEN
        # Other models are not affected.
        assert await reg.allow("anthropic/claude-3-5-haiku-latest")
    run(go())


def test_half_open_lets_exactly_one_probe_through_then_closes_on_success(make_registry):
    async def go():
        clock = FakeClock()
        reg = make_registry(threshold=2, cooldown=10, clock=clock)
        await fail(reg, 2)
        clock.advance(10)
        assert reg.state(K) == HALF_OPEN  # what the next request will find
        assert await reg.allow(K)  # the probe
        assert not await reg.allow(K)  # everyone else still skips
        assert not await reg.allow(K)
        assert await reg.record(K, True, 80) == CLOSED
        assert reg.state(K) == CLOSED
        assert all([await reg.allow(K) for _ in range(3)])
        assert reg.snapshot(K)["trips"] == 1
    run(go())


def test_failed_probe_reopens_for_another_cooldown(make_registry):
    async def go():
        clock = FakeClock()
        reg = make_registry(threshold=2, cooldown=10, clock=clock)
        await fail(reg, 2)
        clock.advance(10)
        assert await reg.allow(K)
        assert await fail(reg) == OPEN  # one failure is enough in half-open
        assert not await reg.allow(K)
        clock.advance(5)
        assert not await reg.allow(K)
        clock.advance(5)
        assert await reg.allow(K)
        assert reg.snapshot(K)["trips"] == 2
    run(go())


def test_released_probe_lets_the_next_request_probe(make_registry):
    """A probe that was cancelled (or hit a client fault) says nothing: the next request probes."""
    async def go():
        clock = FakeClock()
        reg = make_registry(threshold=1, cooldown=10, clock=clock)
        await fail(reg)
        clock.advance(10)
        assert await reg.allow(K)
        assert not await reg.allow(K)
        await reg.release(K)
        assert await reg.allow(K)
        assert not await reg.allow(K)
    run(go())


def test_lost_probe_expires(make_registry):
    async def go():
        clock = FakeClock()
        reg = make_registry(threshold=1, cooldown=10, probe_timeout=30, clock=clock)
        await fail(reg)
        clock.advance(10)
        assert await reg.allow(K)  # this probe's process dies and never reports
        clock.advance(29)
        assert not await reg.allow(K)
        clock.advance(1)
        assert await reg.allow(K)
    run(go())


def test_health_summary_and_window(make_registry):
    async def go():
        clock = FakeClock()
        reg = make_registry(threshold=100, clock=clock)
        for i in range(10):
            await reg.record(K, i % 5 != 0, 100 + i)
        snap = reg.snapshot(K)
        assert (snap["calls"], snap["error_rate"], snap["p50_latency_ms"]) == (10, 0.2, 105)
        assert snap["p95_latency_ms"] == 109
        clock.advance(301)  # outside the 5-minute window
        assert reg.snapshot(K)["calls"] == 0 and reg.snapshot(K)["error_rate"] is None
        assert reg.total_trips([K]) == 0
    run(go())


def test_unknown_key_is_closed(make_registry):
    reg = make_registry()
    snap = reg.snapshot("openai/never-called")
    assert (snap["breaker"], snap["trips"], snap["calls"]) == (CLOSED, 0, 0)


# -- Redis specifics ----------------------------------------------------------------------------


@needs_redis
def test_two_registries_share_state_through_redis(redis_prefix):
    """Two workers/replicas: one sees failures, the other skips the model."""
    async def go():
        clock = FakeClock()
        a = BreakerRegistry(2, 10, clock=clock, store=RedisBreakerStore(REDIS_URL, 2, 10, prefix=redis_prefix))
        b = BreakerRegistry(2, 10, clock=clock, store=RedisBreakerStore(REDIS_URL, 2, 10, prefix=redis_prefix))
        await fail(a, 2)
        assert b.state(K) == OPEN
        assert not await b.allow(K)
        clock.advance(10)
        # Exactly one probe across both replicas.
        assert [await a.allow(K), await b.allow(K), await a.allow(K)] == [True, False, False]
        await b.record(K, True, 10)
        assert a.state(K) == CLOSED and await a.allow(K)
        await a.aclose()
        await b.aclose()
    run(go())


@needs_redis
def test_concurrent_half_open_probe_is_granted_once(redis_prefix):
    async def go():
        clock = FakeClock()
        regs = [BreakerRegistry(1, 5, clock=clock, store=RedisBreakerStore(REDIS_URL, 1, 5, prefix=redis_prefix))
                for _ in range(4)]
        await fail(regs[0])
        clock.advance(5)
        grants = await asyncio.gather(*[r.allow(K) for r in regs for _ in range(5)])
        assert sum(grants) == 1
        for r in regs:
            await r.aclose()
    run(go())


def test_redis_down_degrades_to_in_process_state():
    """An unreachable Redis must never fail a request: the store falls back to memory."""
    async def go():
        store = RedisBreakerStore("redis://127.0.0.1:1/0", threshold=2, cooldown=10, timeout_s=0.2)
        reg = BreakerRegistry(2, 10, clock=FakeClock(), store=store)
        assert await reg.allow(K)
        await fail(reg, 2)
        assert not await reg.allow(K)
        snap = reg.snapshot(K)
        assert snap["breaker"] == OPEN and "unavailable" in snap["store"]
        assert store.errors > 0
        await reg.aclose()
    run(go())


def test_registry_from_settings_picks_the_store():
    from loadbear.config.settings import Settings

    s = Settings.load(env={}, breaker_threshold=7, breaker_cooldown_s=3.5)
    reg = BreakerRegistry.from_settings(s)
    assert (reg.backend, reg.threshold, reg.cooldown) == ("memory", 7, 3.5)
    s = Settings.load(env={"LOADBEAR_REDIS_URL": REDIS_URL, "LOADBEAR_BREAKER_KEY_PREFIX": "x:"})
    reg = BreakerRegistry.from_settings(s)
    assert reg.backend == "redis" and reg.store.prefix == "x:"
    run(reg.aclose())
