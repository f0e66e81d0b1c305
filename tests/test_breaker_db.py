"""Circuit breakers shared through the database (``breaker_state``, gateway/breaker_db.py), on
SQLite and PostgreSQL: two stores on one database play two replicas (each with its own
connections), then two gateways with their own servers in front of the upstream simulator.

Most store tests set ``refresh_s=0`` so every ``allow`` re-reads the table and the assertions do
not depend on timing; ``test_local_view_*`` checks the cached hot path itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from loadbear.config.settings import Settings
from loadbear.gateway.breaker import CLOSED, HALF_OPEN, OPEN, BreakerRegistry
from loadbear.gateway.breaker_db import DatabaseBreakerStore
from loadbear.storage.db import open_database
from loadbear.testing import Fault
from test_breaker import FakeClock

K = "openai/gpt-4o-mini"


@pytest.fixture
def replicas(db_url):
    """make(n, ...) -> n registries, each on its own connection(s) to the same database."""
    made: list = []

    def make(n: int = 2, threshold: int = 3, cooldown: float = 10.0, probe_timeout: float = 60.0,
             refresh_s: float = 0.0, clock: FakeClock | None = None) -> list[BreakerRegistry]:
        clock = clock or FakeClock()
        regs = []
        for _ in range(n):
            db = open_database(db_url)
            store = DatabaseBreakerStore(db, threshold, cooldown, probe_timeout, refresh_s=refresh_s, timeout_s=5)
            reg = BreakerRegistry(threshold, cooldown, clock=clock, store=store)
            made.append((reg, db))
            regs.append(reg)
        return regs

    yield make
    for reg, db in made:
        asyncio.run(reg.aclose())
        db.close()


def run(coro):
    return asyncio.run(coro)


async def fail(reg: BreakerRegistry, n: int = 1, key: str = K) -> str:
    state = CLOSED
    for _ in range(n):
        state = await reg.record(key, False, 100)
    return state


def row(reg: BreakerRegistry, key: str = K) -> dict | None:
    with reg.store.db.system_tx(write=False) as c:
        return c.fetchone("SELECT * FROM breaker_state WHERE breaker_key = ?", (key,))


# -- the schema ------------------------------------------------------------------------------


def test_breaker_state_table_is_a_system_table_the_app_role_can_use(db):
    from test_migrations import columns

    assert {"breaker_key", "state", "failures", "opened_at", "probe_until", "trips", "updated_at"} <= columns(
        db, "breaker_state")
    with db.system_tx() as c:
        with pytest.raises(Exception):
            c.execute("INSERT INTO breaker_state (breaker_key, state) VALUES (?, ?)", ("x/y", "ajar"))
    if db.dialect == "postgres":
        with db.system_tx(write=False) as c:
            privs = c.fetchone(
                "SELECT has_table_privilege('loadbear_app', 'breaker_state', 'SELECT') AS s,"
                " has_table_privilege('loadbear_app', 'breaker_state', 'INSERT') AS i,"
                " has_table_privilege('loadbear_app', 'breaker_state', 'UPDATE') AS u,"
                " has_table_privilege('loadbear_app', 'breaker_state', 'DELETE') AS d,"
                " relrowsecurity AS rls FROM pg_class WHERE relname = 'breaker_state'")
        assert privs == {"s": True, "i": True, "u": True, "d": True, "rls": False}


# -- two replicas on one database ---------------------------------------------------------------


def test_failures_through_one_replica_open_the_breaker_for_the_other(replicas):
    async def go():
        a, b = replicas(threshold=3)
        assert await a.allow(K) and await b.allow(K)
        assert await fail(a, 2) == CLOSED
        assert await b.record(K, True, 20) == CLOSED  # b sees the count and resets it (one write)
        assert row(a)["failures"] == 0
        assert await fail(a, 2) == CLOSED
        assert await fail(b) == OPEN  # consecutive across replicas: 2 from a + 1 from b
        assert not await a.allow(K) and not await b.allow(K)
        assert a.state(K) == OPEN and b.state(K) == OPEN
        snap = b.snapshot(K)
        assert (snap["trips"], snap["consecutive_failures"], snap["breaker_store"]) == (1, 3, "database")
        # Health figures are per process: b saw one success and one failure.
        assert (snap["calls"], snap["error_rate"], snap["health_scope"]) == (2, 0.5, "process")
        assert await b.allow("anthropic/claude-3-5-haiku-latest")  # other models unaffected
    run(go())


def test_after_the_cooldown_exactly_one_replica_gets_the_probe(replicas):
    async def go():
        clock = FakeClock()
        a, b = replicas(threshold=2, cooldown=10, clock=clock)
        await fail(a, 2)
        clock.advance(9.9)
        assert not await b.allow(K)
        clock.advance(0.1)
        assert b.state(K) == HALF_OPEN  # what the next request finds
        assert [await a.allow(K), await b.allow(K), await a.allow(K), await b.allow(K)] == [True, False, False, False]
        assert row(a)["state"] == HALF_OPEN
        # The probe succeeds: closed for everyone.
        assert await a.record(K, True, 30) == CLOSED
        assert b.state(K) == CLOSED and await b.allow(K) and await b.allow(K)
        assert row(b)["failures"] == 0 and b.snapshot(K)["trips"] == 1
    run(go())


def test_concurrent_allow_calls_on_many_replicas_grant_one_probe(replicas):
    clock = FakeClock()
    regs = replicas(4, threshold=1, cooldown=5, clock=clock)
    run(fail(regs[0]))
    clock.advance(5)

    def storm(reg: BreakerRegistry) -> list[bool]:
        async def many():
            return await asyncio.gather(*[reg.allow(K) for _ in range(8)])
        return asyncio.run(many())

    # One event loop per replica, each in its own thread: the claims really race in the database.
    with ThreadPoolExecutor(len(regs)) as pool:
        grants = [g for per in pool.map(storm, regs) for g in per]
    assert len(grants) == 32 and sum(grants) == 1
    assert row(regs[0])["state"] == HALF_OPEN


def test_failed_probe_reopens_for_everyone(replicas):
    async def go():
        clock = FakeClock()
        a, b = replicas(threshold=2, cooldown=10, clock=clock)
        await fail(a, 2)
        clock.advance(10)
        assert await b.allow(K)
        assert await fail(b) == OPEN  # one failure is enough in half-open
        assert not await a.allow(K)
        clock.advance(9)
        assert not await a.allow(K) and not await b.allow(K)
        clock.advance(1)
        assert await a.allow(K) and not await b.allow(K)
        assert b.snapshot(K)["trips"] == 2
    run(go())


def test_an_expired_probe_claim_can_be_claimed_again(replicas):
    """The prober's process died: its claim must not wedge the breaker half-open."""
    async def go():
        clock = FakeClock()
        a, b = replicas(threshold=1, cooldown=10, probe_timeout=30, clock=clock)
        await fail(a)
        clock.advance(10)
        assert await a.allow(K)  # a's process "dies" here and never reports
        assert row(a)["probe_until"] == pytest.approx(clock.now + 30)
        clock.advance(29)
        assert not await b.allow(K)
        clock.advance(1)
        assert await b.allow(K)
        assert not await a.allow(K)
        assert await b.record(K, True, 10) == CLOSED and a.state(K) == CLOSED
    run(go())


def test_released_probe_goes_to_the_next_request_and_release_without_a_claim_writes_nothing(replicas):
    async def go():
        clock = FakeClock()
        a, b = replicas(threshold=1, cooldown=10, clock=clock)
        await fail(a)
        clock.advance(10)
        assert await a.allow(K)
        writes = b.store.writes
        await b.release(K)  # b holds no probe: nothing to free, no write
        assert b.store.writes == writes and not await b.allow(K)
        await a.release(K)  # a's probe was cancelled: it says nothing about the upstream
        assert row(a)["probe_until"] is None
        assert await b.allow(K)
        assert not await a.allow(K)
    run(go())


def test_reset_clears_state_for_every_replica(replicas):
    async def go():
        a, b = replicas(threshold=1)
        await fail(a)
        await fail(a, key="anthropic/claude-3-5-haiku-latest")
        assert set(b.store.keys()) == {K, "anthropic/claude-3-5-haiku-latest"}
        a.reset(K)
        assert b.state(K) == CLOSED and await b.allow(K)
        assert b.state("anthropic/claude-3-5-haiku-latest") == OPEN
        b.reset()
        assert row(a, "anthropic/claude-3-5-haiku-latest") is None
        assert await a.allow("anthropic/claude-3-5-haiku-latest")
        assert a.total_trips() == 0
    run(go())


# -- the local view: no round trip on the hot path ------------------------------------------------


def test_local_view_serves_the_hot_path_and_refreshes_within_the_bound(replicas):
    async def go():
        a, b = replicas(threshold=1, cooldown=30, refresh_s=0.25)
        assert await b.allow(K)
        reads = b.store.reads
        for _ in range(200):
            assert await b.allow(K)
            await b.record(K, True, 5)  # a success on a healthy model writes nothing
        assert b.store.reads == reads and b.store.writes == 0 and row(b) is None
        await fail(a)  # a trips the breaker; b's view is at most 250 ms old
        deadline = time.monotonic() + 2
        while await b.allow(K):
            assert time.monotonic() < deadline, "b never saw the open breaker"
            await asyncio.sleep(0.01)
        assert b.store.reads <= reads + 2
        # Open and cooling down: b skips from its view, without reading again for a while.
        reads = b.store.reads
        assert not any([await b.allow(K) for _ in range(100)])
        assert b.store.reads - reads <= 1
    run(go())


def test_own_writes_update_the_view_at_once(replicas):
    async def go():
        (a,) = replicas(1, threshold=2, refresh_s=60)
        assert await a.allow(K)
        await fail(a, 2)
        assert not await a.allow(K)  # no refresh needed to see its own trip
        assert a.store.reads == 1
    run(go())


@contextmanager
def writers_blocked(db_url: str, key: str = K):
    """Another transaction holds what a breaker write needs: SQLite's write lock, or the
    breaker's row on PostgreSQL. Reads still go through (WAL / MVCC)."""
    if db_url.startswith("sqlite"):
        import sqlean

        conn = sqlean.connect(db_url[len("sqlite:///"):], isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
    else:
        import psycopg

        with psycopg.connect(db_url) as conn:
            assert conn.execute("SELECT 1 FROM breaker_state WHERE breaker_key = %s FOR UPDATE", (key,)).fetchone()
            try:
                yield
            finally:
                conn.rollback()


async def eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_a_slow_database_never_stalls_the_request_path(replicas, db_url):
    """Writes that take longer than timeout_s: the caller goes on at once; the write lands
    later and updates the view, and a probe claim nobody waited for is given back."""
    async def go():
        clock = FakeClock()
        (a,) = replicas(1, threshold=1, cooldown=10, clock=clock)
        a.store.timeout_s = 0.2
        await fail(a)
        clock.advance(10)
        with writers_blocked(db_url):
            started = time.monotonic()
            assert not await a.allow(K)  # the claim did not answer in time: skip the model
            assert time.monotonic() - started < 1.0
        # The claim lands once the lock is gone, and is released: the next request may probe.
        await eventually(lambda: row(a)["state"] == HALF_OPEN and row(a)["probe_id"] is None)
        assert await a.allow(K) and row(a)["probe_id"] is not None
        with writers_blocked(db_url):
            started = time.monotonic()
            assert await a.record(K, False, 10) == HALF_OPEN  # the view's state: the write is pending
            assert time.monotonic() - started < 1.0
        await eventually(lambda: a.store._views[K].state == OPEN)
        assert row(a)["trips"] == 2 and a.snapshot(K)["breaker"] == OPEN
    run(go())


def test_unmigrated_database_degrades_to_in_process_state(tmp_path):
    """A database without the table (or one that is down) never fails a request."""
    async def go():
        db = open_database(f"sqlite:///{tmp_path / 'bare.db'}")
        store = DatabaseBreakerStore(db, threshold=2, cooldown=10, refresh_s=0)
        reg = BreakerRegistry(2, 10, clock=FakeClock(), store=store)
        try:
            assert await reg.allow(K)
            await fail(reg, 2)
            assert not await reg.allow(K)
            snap = reg.snapshot(K)
            assert snap["breaker"] == OPEN and "unavailable" in snap["store"]
            assert store.errors > 0 and store.degraded
        finally:
            await reg.aclose()
            db.close()
    run(go())


# -- choosing the store ------------------------------------------------------------------------


def test_breaker_store_setting(db, tmp_path):
    s = Settings.load(env={}, breaker_threshold=4, breaker_cooldown_s=2.5)
    assert s.breaker_store == "auto"
    reg = BreakerRegistry.from_settings(s, db=db)
    assert (reg.backend, reg.threshold, reg.store.cooldown, reg.clock) == ("database", 4, 2.5, time.time)
    assert BreakerRegistry.from_settings(s).backend == "memory"  # library use without a database
    s = Settings.load(env={"LOADBEAR_BREAKER_STORE": "memory", "LOADBEAR_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert BreakerRegistry.from_settings(s, db=db).backend == "memory"
    s = Settings.load(env={"LOADBEAR_BREAKER_STORE": "database", "LOADBEAR_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert BreakerRegistry.from_settings(s, db=db).backend == "database"
    reg = BreakerRegistry.from_settings(Settings.load(env={"LOADBEAR_REDIS_URL": "redis://127.0.0.1:1/0"}), db=db)
    assert reg.backend == "redis"
    run(reg.aclose())
    with pytest.raises(ValueError, match="expected one of auto, memory, database, redis"):
        BreakerRegistry.from_settings(Settings.load(env={"LOADBEAR_BREAKER_STORE": "etcd"}), db=db)
    with pytest.raises(ValueError, match="needs redis_url"):
        BreakerRegistry.from_settings(Settings.load(env={"LOADBEAR_BREAKER_STORE": "redis"}), db=db)
    with pytest.raises(ValueError, match="needs a database"):
        BreakerRegistry.from_settings(Settings.load(env={"LOADBEAR_BREAKER_STORE": "database"}))


# -- end to end: two gateways, two servers, one database -----------------------------------------


def test_two_gateways_on_one_database_share_breakers(db_url, simulator):
    """Replica A's failures trip the breaker; replica B then skips the primary without calling
    it; after the cooldown the two replicas send one probe between them."""
    import openai

    from loadbear import Gateway
    from loadbear.api.app import create_app
    from loadbear.testing.server import ServerThread
    from conftest import sim_models

    models = sim_models(simulator.url)
    simulator.set_reply("from mini", model="gpt-4o-mini")
    simulator.set_reply("from haiku", model="claude-3-5-haiku-latest")
    gateways, servers = [], []
    try:
        for _ in range(2):
            s = Settings.load(env={}, config_path=None, database_url=db_url, admin_key="adm", models=models,
                              ledger_flush_interval_ms=5, breaker_threshold=2, breaker_cooldown_s=0.6)
            gw = Gateway(s)
            assert gw.breakers.backend == "database"  # the default without Redis
            gateways.append(gw)
        a, b = gateways
        a.tenants.create_tenant("acme", "Acme", {})
        _, key = a.tenants.create_key("acme", "test")
        servers = [ServerThread(create_app(gw)).start() for gw in gateways]
        clients = [openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0) for srv in servers]

        def ask(client) -> str:
            return client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]).model

        def mini_calls() -> int:
            return sum(1 for r in simulator.requests if r.model == "gpt-4o-mini")

        simulator.script([Fault("server_error")] * 10, model="gpt-4o-mini")
        assert ask(clients[0]) == "claude-3-5-haiku-latest"  # a: 2 failures (1 retry), breaker opens
        assert mini_calls() == 2
        for _ in range(3):
            assert ask(clients[1]) == "claude-3-5-haiku-latest"
        assert mini_calls() == 2, "replica B called the primary behind an open breaker"
        health = httpx.get(servers[1].url + "/admin/providers", headers={"Authorization": "Bearer adm"}).json()
        mini = next(m for m in health["data"] if m["model"] == "gpt-4o-mini")
        assert (mini["breaker"], mini["breaker_store"], mini["trips"]) == ("open", "database", 1)
        from typer.testing import CliRunner

        from loadbear.cli import app

        res = CliRunner().invoke(app, ["providers", "--url", servers[1].url, "--admin-key", "adm"])
        assert res.exit_code == 0 and "breaker state: database" in res.output.replace("\n", " ")

        time.sleep(0.65)  # cooldown over: one probe between both replicas, and it fails
        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(ask, [clients[i % 2] for i in range(8)]))
        assert served == ["claude-3-5-haiku-latest"] * 8
        assert mini_calls() == 3
        assert b.breakers.snapshot("openai/gpt-4o-mini")["trips"] == 2
    finally:
        for srv in servers:
            srv.stop()
        for gw in gateways:
            gw.close()


def test_cli_providers_reads_the_shared_state(db_url, tmp_path, monkeypatch):
    """Without --url, `loadbear providers` shows the breakers every server on the database shares."""
    from typer.testing import CliRunner

    from loadbear.cli import app

    cfg = tmp_path / "loadbear.toml"
    cfg.write_text('[models.fast]\nprovider = "openai"\nbase_url = "http://127.0.0.1:9/v1"\nfallbacks = ["local"]\n')
    monkeypatch.setenv("LOADBEAR_CONFIG", str(cfg))
    monkeypatch.setenv("LOADBEAR_DATABASE_URL", db_url)
    monkeypatch.setenv("LOADBEAR_BREAKER_THRESHOLD", "1")
    monkeypatch.delenv("LOADBEAR_REDIS_URL", raising=False)
    monkeypatch.delenv("LOADBEAR_BREAKER_STORE", raising=False)
    db = open_database(db_url)
    try:
        reg = BreakerRegistry(1, 30, store=DatabaseBreakerStore(db, 1, 30))
        run(fail(reg, key="openai/fast"))
    finally:
        db.close()
    res = CliRunner().invoke(app, ["providers", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["model"]: r for r in json.loads(res.output)}
    assert (rows["fast"]["breaker"], rows["fast"]["trips"], rows["fast"]["breaker_store"]) == ("open", 1, "database")
    assert rows["local"]["breaker"] == "closed"
    res = CliRunner().invoke(app, ["providers"])
    assert res.exit_code == 0 and "open" in res.output and "from the database" in res.output
