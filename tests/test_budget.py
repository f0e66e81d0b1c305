"""Monthly budgets: worst-case estimates, atomic reservations under 50 concurrent requests on
every store (memory, Redis, SQLite, PostgreSQL — two "replicas" where the store is shared),
the ledger as the starting point and the re-sync, expired leases, the soft-threshold event and
its webhook, downgrade-then-refuse (402) and the usage status.

Redis tests use ``LOADBEAR_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``), each under
its own key prefix; PostgreSQL tests need ``LOADBEAR_TEST_POSTGRES_URL`` (see conftest).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from loadbear.config.catalog import Catalog
from loadbear.gateway.budget import (
    BudgetGuard,
    DatabaseBudgetStore,
    MemoryBudgetStore,
    RedisBudgetStore,
    Refusal,
    Reservation,
    current_month,
    month_bounds,
    month_spend,
    prompt_tokens,
    worst_case_micro_usd,
)
from loadbear.gateway.errors import ApiError
from loadbear.gateway.router import Router
from loadbear.storage.db import open_database
from loadbear.storage.migrate import migrate
from loadbear.tenancy.models import Tenant, TenantSettings
from loadbear.tenancy.service import TenantService
from conftest import REDIS_UP, REDIS_URL, needs_redis

MONTH = "2026-05"




class Env:
    """Guards ("replicas") over one shared budget store of a kind, and a tenant row when a database is involved."""

    def __init__(self, kind: str, db_url: str | None, prefix: str) -> None:
        self.kind = kind
        self.db_url = db_url
        self.prefix = prefix
        self.dbs = []
        self.guards: list[BudgetGuard] = []
        self.memory = MemoryBudgetStore()
        self.tenant_id = str(uuid.uuid4())
        if db_url:
            db = self._db()
            self.tenant_id = TenantService(db).create_tenant("acme", "Acme").id

    def _db(self):
        db = open_database(self.db_url)
        self.dbs.append(db)
        return db

    def guard(self, **kw) -> BudgetGuard:
        if self.kind == "memory":
            g = BudgetGuard(None, self.memory, **kw)
        elif self.kind == "redis":
            g = BudgetGuard(None, RedisBudgetStore(REDIS_URL, prefix=self.prefix, timeout_s=2.0), **kw)
        else:
            g = BudgetGuard(self._db(), **kw)  # the database store
        self.guards.append(g)
        return g

    def tenant(self, **settings) -> Tenant:
        return Tenant(self.tenant_id, "acme", "Acme", TenantSettings(**settings))

    def ledger_spend(self, micro: int, day: str = MONTH + "-03") -> None:
        """Spend that reached the ledger without going through a guard."""
        db = self.dbs[0]
        with db.tenant_tx(self.tenant_id) as c:
            c.execute(
                "INSERT INTO usage_daily (tenant_id, day, feature, model, requests, cost_micro_usd)"
                " VALUES (?, ?, 'chat', 'm', 1, ?) ON CONFLICT (tenant_id, day, feature, model, user_external_id)"
                " DO UPDATE SET cost_micro_usd = usage_daily.cost_micro_usd + excluded.cost_micro_usd",
                (self.tenant_id, day, micro))

    async def close(self) -> None:
        for g in self.guards:
            await g.aclose()
        for db in self.dbs:
            db.close()


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


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis), "sqlite",
                        pytest.param("postgres", marks=pytest.mark.postgres)])
async def env(request, tmp_path, redis_prefix):
    kind = request.param
    url = None
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'budget.db'}"
        db = open_database(url)
        migrate(db)
        db.close()
    elif kind == "postgres":
        url = request.getfixturevalue("pg_server").fresh_url()
    e = Env(kind, url, redis_prefix)
    yield e
    await e.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_env(request, tmp_path, redis_prefix):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'budget.db'}"
        db = open_database(url)
        migrate(db)
        db.close()
    else:
        url = request.getfixturevalue("pg_server").fresh_url()
    e = Env(request.param, url, redis_prefix)
    yield e
    await e.close()


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- estimates ------------------------------------------------------------------------------


def test_worst_case_is_the_priciest_model_of_the_chain_with_a_full_answer():
    catalog = Catalog.from_settings({
        "big": {"provider": "openai", "input_price": 2.5, "output_price": 10.0, "fallbacks": ["small"]},
        "small": {"provider": "openai", "input_price": 0.15, "output_price": 0.6},
    }, env={})
    chain = catalog.chain("big")
    assert worst_case_micro_usd(chain, 1000, 500) == 1000 * 2.5 + 500 * 10
    assert worst_case_micro_usd(chain, 1000, None, default_max_tokens=100) == 2500 + 1000
    assert worst_case_micro_usd(catalog.chain("small"), 3, 1) == 2  # 0.45 + 0.6 rounded up
    assert worst_case_micro_usd([catalog.get("local")], 1000, 1000) == 0
    assert BudgetGuard(default_max_tokens=10).estimate(chain, 0, None) == 100
    assert prompt_tokens([{"role": "user", "content": "hello there"}]) > 2


def test_months():
    assert month_bounds("2026-12")[1].isoformat() == "2027-01-01"
    assert current_month(1_780_000_000) == "2026-05"
    with pytest.raises(ValueError):
        month_bounds("May")


# -- the invariant: concurrent requests never overspend -------------------------------------


async def test_50_concurrent_requests_never_overspend(env):
    """Budget $0.01, every request may cost up to $0.001 and really costs $0.0006-0.001: about
    ten fit at once. 50 clients race on two replicas (one for the in-process store), each
    retrying twice after a refusal, so reservations, settlements and refusals interleave."""
    budget, worst = 10_000, 1_000
    tenant = env.tenant(monthly_budget_usd=budget / 1e6)
    replicas = [env.guard()] if env.kind == "memory" else [env.guard(), env.guard()]
    rng = random.Random(7)
    start = asyncio.Event()
    peak = {"held": 0}
    refused = []

    async def client(i: int) -> list[int]:
        await start.wait()
        guard = replicas[i % len(replicas)]
        paid = []
        for attempt in range(3):
            r = await guard.reserve(tenant, MONTH, worst)
            if isinstance(r, Refusal):
                assert r.hard and r.limit == budget and r.spent + r.reserved + worst > budget
                refused.append(i)
                await asyncio.sleep(rng.random() * 0.01)
                continue
            assert r.spent + r.reserved <= budget
            peak["held"] = max(peak["held"], r.spent + r.reserved)
            await asyncio.sleep(rng.random() * 0.02)
            cost = rng.randint(600, worst)
            await guard.settle(r, cost)
            paid.append(cost)
        return paid

    tasks = [asyncio.create_task(client(i)) for i in range(50)]
    start.set()
    done = [c for paid in await asyncio.gather(*tasks) for c in paid]
    spent = sum(done)
    assert spent <= budget  # (the issue allows budget + one request's worst case)
    assert len(done) >= 10 and refused  # the budget was used, and it held
    snap = replicas[0].store.snapshot((tenant.id, MONTH))
    assert snap["spent"] == spent and snap["reserved"] == 0 and snap["in_flight"] == 0
    assert peak["held"] <= budget
    assert all(getattr(g.store, "errors", 0) == 0 for g in replicas)  # no silent fallback
    # Settling twice changes nothing.
    r = await replicas[0].reserve(tenant, MONTH, 0)
    await replicas[0].settle(r, 5)
    await replicas[0].settle(r, 5)
    assert replicas[0].store.snapshot((tenant.id, MONTH))["spent"] == spent + 5


async def test_threads_on_two_databases_never_overspend(db_env):
    """The database store from plain threads (replicas without an event loop in common)."""
    tenant = db_env.tenant(monthly_budget_usd=0.005)
    guards = [db_env.guard(), db_env.guard()]
    store_of = [g.store for g in guards]
    results: list[bool] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        store: DatabaseBudgetStore = store_of[i % 2]
        ans = store.reserve_now((tenant.id, MONTH), str(uuid.uuid4()), 1000, 5000, 4000, 0.0, 1e12)
        with lock:
            results.append(bool(ans and ans.ok))

    store_of[0].init_now((tenant.id, MONTH), 0)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 5
    assert store_of[1].snapshot((tenant.id, MONTH))["reserved"] == 5000


# -- the ledger is the source of truth ------------------------------------------------------


async def test_month_starts_from_the_ledger_and_resyncs(db_env):
    tenant = db_env.tenant(monthly_budget_usd=0.01)
    db_env.ledger_spend(9_000)
    db_env.ledger_spend(50_000, day="2026-04-30")  # another month
    assert month_spend(db_env.dbs[0], tenant.id, MONTH) == 9_000
    guard = db_env.guard(sync_interval_s=0)
    assert isinstance(await guard.reserve(tenant, MONTH, 1_000), Reservation)
    assert isinstance(await guard.reserve(tenant, MONTH, 1), Refusal)
    # A fresh month for the same tenant starts from its own ledger spend.
    assert isinstance(await guard.reserve(tenant, "2026-04", 1), Refusal)

    other = db_env.tenant(monthly_budget_usd=0.01)
    other.id = TenantService(db_env.dbs[0]).create_tenant("other").id
    r = await guard.reserve(other, MONTH, 4_000)
    assert isinstance(r, Reservation) and r.spent == 0
    await guard.settle(r, 4_000)
    # Spend that reached the ledger some other way: the next sync takes max(counter, ledger).
    with db_env.dbs[0].tenant_tx(other.id) as c:
        c.execute("INSERT INTO usage_daily (tenant_id, day, feature, model, cost_micro_usd) VALUES (?, ?, 'f', 'm', ?)",
                  (other.id, MONTH + "-09", 8_000))
    await guard.sync((other.id, MONTH))
    snap = guard.store.snapshot((other.id, MONTH))
    assert snap["spent"] == 8_000
    assert isinstance(await guard.reserve(other, MONTH, 2_001), Refusal)
    assert isinstance(await guard.reserve(other, MONTH, 2_000), Reservation)


async def test_abandoned_reservations_expire(env):
    clock = FakeClock(1_780_000_000.0)
    guard = env.guard(clock=clock, lease_s=300, sync_interval_s=0)
    tenant = env.tenant(monthly_budget_usd=0.01)
    assert isinstance(await guard.reserve(tenant, None, 9_000), Reservation)  # never settled: a dead replica
    assert isinstance(await guard.reserve(tenant, None, 2_000), Refusal)
    clock.now += 301
    await guard.sync((tenant.id, current_month(clock.now)))
    r = await guard.reserve(tenant, None, 2_000)
    assert isinstance(r, Reservation) and r.reserved == 2_000
    # A reservation settled after its lease ran out still counts its cost, once.
    clock.now += 301
    await guard.sync((tenant.id, current_month(clock.now)))
    await guard.settle(r, 1_500)
    snap = guard.store.snapshot((tenant.id, current_month(clock.now)))
    assert snap["spent"] == 1_500 and snap["reserved"] == 0


# -- soft threshold and hard limit events ---------------------------------------------------


class Hooks:
    def __init__(self) -> None:
        self.received: list[dict] = []
        self.got = threading.Event()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                hooks.received.append({"event_header": self.headers["x-loadbear-event"], **json.loads(body)})
                hooks.got.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/budget"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks():
    h = Hooks()
    yield h
    h.close()


async def test_soft_threshold_fires_once_with_a_webhook_and_a_log(env, hooks, caplog):
    events: list[tuple[str, dict]] = []
    guard = env.guard(on_event=lambda e, p: events.append((e, p)))
    other = env.guard()  # another replica: the flag is shared where the store is
    tenant = env.tenant(monthly_budget_usd=0.01, budget_soft_ratio=0.5, budget_webhook_url=hooks.url)
    caplog.set_level("WARNING", logger="loadbear.budget")
    r1 = await guard.reserve(tenant, MONTH, 4_000)
    assert isinstance(r1, Reservation) and not r1.soft and events == []
    r2 = await guard.reserve(tenant, MONTH, 2_000)
    assert r2.soft and [e for e, _ in events] == ["budget.soft_threshold"]
    await (other if env.kind != "memory" else guard).reserve(tenant, MONTH, 1_000)
    await guard.reserve(tenant, MONTH, 1_000)
    assert [e for e, _ in events] == ["budget.soft_threshold"]
    await guard.drain()
    assert hooks.got.wait(5)
    assert len(hooks.received) == 1
    hook = hooks.received[0]
    assert hook["event"] == hook["event_header"] == "budget.soft_threshold"
    assert hook["tenant_id"] == tenant.id and hook["month"] == MONTH and hook["monthly_budget_usd"] == 0.01
    assert hook["soft_threshold_usd"] == 0.005 and hook["spent_usd"] + hook["reserved_usd"] == 0.006
    assert any("budget.soft_threshold" in rec.getMessage() for rec in caplog.records)
    # The hard limit: one event on the first refusal.
    assert isinstance(await guard.reserve(tenant, MONTH, 3_000), Refusal)
    assert isinstance(await guard.reserve(tenant, MONTH, 3_000), Refusal)
    assert [e for e, _ in events] == ["budget.soft_threshold", "budget.hard_limit"]
    await guard.drain()
    assert [h["event"] for h in hooks.received] == ["budget.soft_threshold", "budget.hard_limit"]


async def test_a_broken_webhook_never_hurts(caplog):
    guard = BudgetGuard(webhook_timeout_s=0.5)
    tenant = Tenant(str(uuid.uuid4()), "t", "t", TenantSettings(monthly_budget_usd=0.001, budget_soft_ratio=0.1,
                                                                budget_webhook_url="http://127.0.0.1:9/nothing"))
    caplog.set_level("WARNING", logger="loadbear.budget")
    assert isinstance(await guard.reserve(tenant, MONTH, 500), Reservation)
    await guard.drain()
    assert any("budget webhook http://127.0.0.1:9/nothing failed" in r.getMessage() for r in caplog.records)


# -- the request path: admit, downgrade, 402 ------------------------------------------------


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.from_settings({
        "gpt-4o-mini": {"provider": "openai", "input_price": 0.15, "output_price": 0.6, "tier": "simple",
                        "fallbacks": ["local"]},
        "gpt-4o": {"provider": "openai", "input_price": 2.5, "output_price": 10.0, "tier": "complex",
                   "fallbacks": ["gpt-4o-mini"]},
    }, env={}, default_model="gpt-4o-mini")


async def test_hard_limit_downgrades_then_refuses_with_402(catalog):
    router, guard = Router(), BudgetGuard()
    tenant = Tenant(str(uuid.uuid4()), "acme", "Acme", TenantSettings(monthly_budget_usd=0.01,
                                                                       support_contact="billing@acme.test"))
    strong = router.tenant_chain(catalog, tenant.settings, "gpt-4o")
    down = lambda: router.downgrade_chain(catalog, tenant.settings, strong)  # noqa: E731
    # 1000 prompt + 500 answer: gpt-4o up to 7500 µ$, gpt-4o-mini up to 450 µ$.
    a = await guard.admit(tenant, strong, 1000, 500, downgrade=down)
    assert not a.downgraded and a.reservation.amount == 7_500 and a.chain[0].name == "gpt-4o"
    await guard.settle(a.reservation, 7_000)
    b = await guard.admit(tenant, strong, 1000, 500, downgrade=down)
    assert b.downgraded and [m.name for m in b.chain] == ["gpt-4o-mini", "local"]
    assert b.reservation.amount == 450 and b.note.startswith("budget: downgraded gpt-4o → gpt-4o-mini")
    await guard.settle(b.reservation, 450)
    for _ in range(5):
        c = await guard.admit(tenant, strong, 1000, 500, downgrade=down)
        await guard.settle(c.reservation, 450)
    with pytest.raises(ApiError) as exc:
        await guard.admit(tenant, strong, 1000, 500, downgrade=down)
    err = exc.value
    assert err.status == 402 and err.code == "budget_exceeded" and err.type == "insufficient_quota"
    assert "monthly budget of $0.01" in err.message and "resets on" in err.message
    assert "billing@acme.test" in err.message
    status = guard.status(tenant)
    assert status["hard_limit_reached"] and status["soft_threshold_reached"]
    assert status["spent_usd"] == 0.00970 and status["remaining_usd"] == 0.0003


async def test_refuse_action_and_unlimited_tenants(catalog):
    guard = BudgetGuard()
    chain = catalog.chain("gpt-4o")
    tenant = Tenant(str(uuid.uuid4()), "a", "A", TenantSettings(monthly_budget_usd=0.005, budget_hard_action="refuse"))
    with pytest.raises(ApiError) as exc:
        await guard.admit(tenant, chain, 1000, 500, downgrade=catalog.chain("gpt-4o-mini"))
    assert exc.value.status == 402
    free = Tenant(str(uuid.uuid4()), "b", "B", TenantSettings())
    a = await guard.admit(free, chain, 10**6, 10**6)
    assert a.reservation is None and guard.status(free) is None
    r = await guard.reserve(free, None, 10**9)
    assert isinstance(r, Reservation) and r.unlimited
    await guard.settle(r, 10**9)  # nothing to do


async def test_settle_nowait_from_sync_code():
    guard = BudgetGuard()
    tenant = Tenant(str(uuid.uuid4()), "a", "A", TenantSettings(monthly_budget_usd=1))
    r = await guard.reserve(tenant, MONTH, 100)
    guard.settle_nowait(r, 40)  # inside a loop: a task
    await guard.drain()
    assert guard.store.snapshot((tenant.id, MONTH))["spent"] == 40
    r2 = await guard.reserve(tenant, MONTH, 100)
    await asyncio.to_thread(guard.settle_nowait, r2, 60)  # no loop in that thread: a worker thread
    await guard.drain()
    assert guard.store.snapshot((tenant.id, MONTH)) == {"spent": 100, "reserved": 0, "soft_notified": -1,
                                                         "hard_notified": -1, "in_flight": 0}


async def test_redis_down_falls_back_without_failing():
    store = RedisBudgetStore("redis://127.0.0.1:1/0", timeout_s=0.05)
    guard = BudgetGuard(None, store)
    tenant = Tenant(str(uuid.uuid4()), "a", "A", TenantSettings(monthly_budget_usd=0.001))
    r = await guard.reserve(tenant, MONTH, 800)
    assert isinstance(r, Reservation) and r.via == "memory"
    assert isinstance(await guard.reserve(tenant, MONTH, 800), Refusal)
    await guard.settle(r, 100)
    assert store.errors >= 3 and store.fallback.snapshot((tenant.id, MONTH))["spent"] == 100
    await guard.aclose()


def test_store_from_settings(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    db = open_database(url)
    try:
        s = SimpleNamespace(redis_url=None, request_deadline_s=30.0)
        g = BudgetGuard.from_settings(s, db)
        assert g.store.name == "database" and g.lease_s == 120.0
        g = BudgetGuard.from_settings(SimpleNamespace(redis_url="redis://127.0.0.1:6379/0", budget_lease_s=50), db)
        assert g.store.name == "redis" and g.store.fallback.name == "database" and g.lease_s == 50
        g = BudgetGuard.from_settings(SimpleNamespace(redis_url=None, budget_store="memory"), db)
        assert g.store.name == "memory"
    finally:
        db.close()
