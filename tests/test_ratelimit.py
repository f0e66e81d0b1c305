"""Rate limits per tenant: requests and tokens per minute, 429 with Retry-After, adjustments
after the fact, shared between replicas through Redis (same tests on the in-process store).

Redis tests use ``LOADBEAR_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``), each under
its own key prefix.
"""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from loadbear.api.responses import error_response
from loadbear.gateway.errors import ApiError
from loadbear.gateway.ratelimit import MemoryRateStore, RateLimiter, RedisRateStore
from loadbear.tenancy.models import Tenant, TenantSettings
from conftest import REDIS_UP, REDIS_URL, needs_redis



class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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
async def make_limiter(request, redis_prefix):
    """Limiters ("replicas") sharing one store kind and one fake clock."""
    clock = FakeClock()
    memory = MemoryRateStore()
    made: list[RateLimiter] = []

    def make(**kw) -> RateLimiter:
        store = memory if request.param == "memory" else RedisRateStore(REDIS_URL, prefix=redis_prefix,
                                                                         timeout_s=2.0)
        lim = RateLimiter(store, clock=clock, **kw)
        made.append(lim)
        return lim

    make.clock = clock
    yield make
    for lim in made:
        await lim.aclose()


def tenant(**settings) -> Tenant:
    return Tenant(str(uuid.uuid4()), "acme", "Acme", TenantSettings(**settings))


async def test_requests_per_minute_answer_429_with_retry_after(make_limiter):
    lim, clock = make_limiter(), make_limiter.clock
    t = tenant(rpm_limit=3)
    for _ in range(3):
        assert await lim.check(t) is not None
    with pytest.raises(ApiError) as exc:
        await lim.check(t)
    err = exc.value
    assert err.status == 429 and err.code == "rate_limit_exceeded" and err.type == "rate_limit_error"
    # 3 per minute: one request comes back every 20 s.
    assert err.headers["retry-after"] == "20"
    assert err.headers["x-ratelimit-limit-requests"] == "3" and err.headers["x-ratelimit-remaining-requests"] == "0"
    assert "3 requests per minute" in err.message and "Retry after 20 seconds" in err.message
    # The HTTP answer carries the header and OpenAI's error shape.
    resp = error_response(err)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "20"
    assert orjson.loads(resp.body)["error"]["code"] == "rate_limit_exceeded"
    clock.now += 15
    with pytest.raises(ApiError) as exc:
        await lim.check(t)
    assert exc.value.headers["retry-after"] == "5"
    clock.now += 5
    assert await lim.check(t) is not None
    with pytest.raises(ApiError):
        await lim.check(t)


async def test_tokens_per_minute_and_retry_after(make_limiter):
    lim, clock = make_limiter(), make_limiter.clock
    t = tenant(tpm_limit=1000)
    p = await lim.check(t, prompt_tokens=400, max_tokens=200)
    assert p.tokens == 600 and p.decision.remaining_tokens == 400
    with pytest.raises(ApiError) as exc:
        await lim.check(t, prompt_tokens=400, max_tokens=200)
    err = exc.value
    # 200 tokens short at 1000 per minute: 12 s.
    assert err.headers["retry-after"] == "12" and "1000 tokens per minute" in err.message
    assert err.headers["x-ratelimit-remaining-tokens"] == "400"
    # Without max_tokens the estimate uses the expected completion size (256 by default).
    clock.now += 12
    p2 = await lim.check(t, prompt_tokens=344)
    assert p2.tokens == 600


async def test_adjust_refunds_and_charges_the_difference(make_limiter):
    lim, clock = make_limiter(), make_limiter.clock
    t = tenant(tpm_limit=1000)
    p = await lim.check(t, prompt_tokens=500, max_tokens=400)  # 900 held, 100 left
    await lim.adjust(p, 100)  # used 100: 800 back
    await lim.adjust(p, 100)  # once only
    p2 = await lim.check(t, prompt_tokens=800, max_tokens=100)
    assert p2.decision.remaining_tokens == pytest.approx(0)
    await lim.adjust(p2, 1500)  # used more than estimated: 600 of debt
    with pytest.raises(ApiError) as exc:
        await lim.check(t, prompt_tokens=50, max_tokens=50)
    assert exc.value.headers["retry-after"] == "42"  # (100 + 600) tokens at 1000/min
    clock.now += 42
    assert await lim.check(t, prompt_tokens=50, max_tokens=50) is not None


async def test_adjust_nowait_from_sync_code(make_limiter):
    lim = make_limiter()
    t = tenant(tpm_limit=1000)
    p = await lim.check(t, prompt_tokens=900, max_tokens=100)
    lim.adjust_nowait(p, 0)
    await asyncio.sleep(0)
    await asyncio.gather(*lim._tasks)
    assert (await lim.check(t, prompt_tokens=900, max_tokens=100)) is not None


async def test_both_limits_are_checked_together(make_limiter):
    lim = make_limiter()
    t = tenant(rpm_limit=10, tpm_limit=100)
    await lim.check(t, prompt_tokens=90, max_tokens=10)
    with pytest.raises(ApiError) as exc:
        await lim.check(t, prompt_tokens=10, max_tokens=10)
    assert "tokens per minute" in exc.value.message
    # The refused request took no request slot: 9 remain.
    p = await lim.acquire(t.id, 10, 0, 0)
    assert p.allowed and p.remaining_requests == pytest.approx(8)


async def test_a_request_bigger_than_the_bucket_passes_when_full_and_leaves_debt(make_limiter):
    lim, clock = make_limiter(), make_limiter.clock
    t = tenant(tpm_limit=1000)
    assert await lim.check(t, prompt_tokens=1800, max_tokens=200) is not None  # 2000 > 1000
    with pytest.raises(ApiError) as exc:
        await lim.check(t, prompt_tokens=1, max_tokens=1)
    assert exc.value.headers["retry-after"] == "61"  # from -1000 back to 2: 1002 tokens at 1000/min
    clock.now += 60.2
    assert await lim.check(t, prompt_tokens=1, max_tokens=1) is not None


async def test_tenants_are_independent_and_unlimited_costs_nothing(make_limiter):
    lim = make_limiter()
    a, b = tenant(rpm_limit=1), tenant(rpm_limit=1)
    await lim.check(a)
    await lim.check(b)
    with pytest.raises(ApiError):
        await lim.check(a)
    assert await lim.check(tenant()) is None
    assert (await lim.acquire("x", None, None, 10**9)).allowed


async def test_replicas_share_limits(make_limiter, request):
    if "redis" not in request.node.callspec.id:
        pytest.skip("one process: the in-process store is not shared by replicas")
    one, two = make_limiter(), make_limiter()
    t = tenant(rpm_limit=4)
    for lim in (one, two, one, two):
        await lim.check(t)
    for lim in (one, two):
        with pytest.raises(ApiError) as exc:
            await lim.check(t)
        assert exc.value.headers["retry-after"] == "15"


async def test_concurrent_requests_get_exactly_the_limit(make_limiter):
    lims = [make_limiter(), make_limiter()]
    t = tenant(rpm_limit=10)

    async def one(i: int) -> bool:
        try:
            await lims[i % 2].check(t)
            return True
        except ApiError as exc:
            assert exc.status == 429 and int(exc.headers["retry-after"]) >= 1
            return False

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert sum(results) == 10
    assert all(getattr(lim.store, "errors", 0) == 0 for lim in lims)  # Redis answered every time


async def test_redis_down_falls_back_to_this_replica():
    lim = RateLimiter(RedisRateStore("redis://127.0.0.1:1/0", timeout_s=0.05), clock=FakeClock())
    t = tenant(rpm_limit=1)
    assert await lim.check(t) is not None
    with pytest.raises(ApiError):
        await lim.check(t)
    assert lim.store.errors >= 2
    await lim.aclose()


def test_from_settings():
    from types import SimpleNamespace

    assert RateLimiter.from_settings(SimpleNamespace(redis_url=None)).backend == "memory"
    lim = RateLimiter.from_settings(SimpleNamespace(redis_url=REDIS_URL, ratelimit_key_prefix="p:"))
    assert lim.backend == "redis" and lim.store.prefix == "p:"
