"""The ledger writer on both backends: no loss under concurrency and backpressure, flush/close,
outages retried, refused rows dead-lettered, cost stored as given, rollups equal to raw rows."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

from loadbear.ledger.records import AttemptRecord, InteractionRecord
from loadbear.ledger.writer import LedgerWriter, _sqlite_time
from loadbear.storage.db import Database, SQLiteDatabase, open_database
from loadbear.storage.migrate import migrate
from loadbear.storage.values import db_time, uuid7
from loadbear.tenancy.service import TenantService

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


def rec(tenant_id: str, *, attempts: int = 1, when: datetime = T0, **kw) -> InteractionRecord:
    r = InteractionRecord(
        id=uuid7(), tenant_id=tenant_id, feature=kw.pop("feature", "chat"), requested_model="auto",
        model=kw.pop("model", "gpt-4o-mini"), status=kw.pop("status", "ok"), created_at=when,
        latency_ms=kw.pop("latency_ms", 120), prompt_tokens=kw.pop("prompt_tokens", 10),
        completion_tokens=kw.pop("completion_tokens", 5), cost_micro_usd=kw.pop("cost_micro_usd", 42),
        provider="openai", **kw,
    )
    r.attempts = [
        AttemptRecord(attempt_no=n + 1, provider="openai", model=r.model, upstream_model=None,
                      status="ok" if n == attempts - 1 else "error", started_at=when, latency_ms=50 + n,
                      cost_micro_usd=7 * (n + 1), error_type=None if n == attempts - 1 else "timeout")
        for n in range(attempts)
    ]
    return r


@pytest.fixture(scope="module")
def shared_pg_url(pg_server) -> str:
    return pg_server.fresh_url()


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request) -> str:
    """conftest's ``db_url``, except that this module's PostgreSQL tests share one database:
    creating and dropping a database per test costs about a second each. Every test writes
    for tenants of its own and looks only at their rows."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'loadbear.db'}"
        database = open_database(url)
        migrate(database)
        database.close()
        return url
    return request.getfixturevalue("shared_pg_url")


@pytest.fixture
def tenants(db: Database) -> list[str]:
    svc = TenantService(db)
    run = uuid.uuid4().hex[:8]
    return [svc.create_tenant(f"{slug}-{run}").id for slug in ("acme", "globex", "initech")]


@pytest.fixture
def writer_factory(db: Database, tmp_path: Path):
    made: list[LedgerWriter] = []

    def make(**kw) -> LedgerWriter:
        kw.setdefault("dead_letter_path", tmp_path / "deadletter.jsonl")
        kw.setdefault("flush_interval", 0.01)
        w = LedgerWriter(db, **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close(timeout=10)


def _in(tenant_ids: list[str]) -> str:
    return "tenant_id IN (" + ", ".join(f"'{t}'" for t in tenant_ids) + ")"


def count(db: Database, table: str, tenant_ids: list[str]) -> int:
    with db.system_tx(write=False) as c:
        return int(c.scalar(f"SELECT COUNT(*) FROM {table} WHERE {_in(tenant_ids)}"))


def ids(db: Database, tenant_ids: list[str]) -> set[str]:
    with db.system_tx(write=False) as c:
        return {str(r["id"]) for r in c.fetchall(f"SELECT id FROM ai_interactions WHERE {_in(tenant_ids)}")}


def total(db: Database, column: str, tenant_ids: list[str]) -> int:
    with db.system_tx(write=False) as c:
        return int(c.scalar(f"SELECT COALESCE(SUM({column}), 0) FROM usage_daily WHERE {_in(tenant_ids)}"))


@contextmanager
def writes_held(db: Database) -> Iterator[None]:
    """Another connection holds the write lock (SQLite) / an exclusive table lock (PostgreSQL)."""
    if db.dialect == "sqlite":
        import sqlean

        other = sqlean.connect(db.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
            other.close()
    else:
        import psycopg

        with psycopg.connect(db.url) as other:
            other.execute("LOCK TABLE ai_interactions IN ACCESS EXCLUSIVE MODE")
            yield
            other.rollback()


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# -- no loss -------------------------------------------------------------------------------


def test_concurrent_threads_write_every_row_and_attempt(db, tenants, writer_factory):
    w = writer_factory(batch_size=64)
    rng = random.Random(3)
    per_thread = [[rec(rng.choice(tenants), attempts=rng.randint(0, 3)) for _ in range(150)] for _ in range(8)]

    def produce(records):
        for r in records:
            w.submit(r)

    threads = [threading.Thread(target=produce, args=(p,)) for p in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert w.flush(30)
    everything = [r for p in per_thread for r in p]
    assert count(db, "ai_interactions", tenants) == len(everything) == 1200
    assert ids(db, tenants) == {r.id for r in everything}
    assert w.written == 1200 and w.dead_lettered == 0 and w.pending == 0
    # Every attempt row belongs to its interaction, numbered as submitted.
    with db.system_tx(write=False) as c:
        got = {(str(r["interaction_id"]), r["attempt_no"], str(r["tenant_id"])) for r in c.fetchall(
            f"SELECT interaction_id, attempt_no, tenant_id FROM ai_attempts WHERE {_in(tenants)}")}
        counts = {str(r["id"]): r["attempt_count"] for r in c.fetchall(
            f"SELECT id, attempt_count FROM ai_interactions WHERE {_in(tenants)}")}
    want = {(r.id, a.attempt_no, r.tenant_id) for r in everything for a in r.attempts}
    assert got == want and len(want) == sum(len(r.attempts) for r in everything)
    assert counts == {r.id: len(r.attempts) for r in everything}


async def test_concurrent_asubmit_writes_every_row(db, tenants, writer_factory):
    # A queue smaller than the burst: asubmit falls back to a thread instead of blocking the loop.
    w = writer_factory(batch_size=16, queue_max=8)
    records = [rec(tenants[i % 3], attempts=1 + i % 2) for i in range(200)]
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    tick_task = asyncio.create_task(ticker())
    await asyncio.gather(*(w.asubmit(r) for r in records))
    tick_task.cancel()
    assert await asyncio.to_thread(w.flush, 30)
    assert ids(db, tenants) == {r.id for r in records}
    assert count(db, "ai_attempts", tenants) == sum(len(r.attempts) for r in records)
    assert ticks > 0  # the event loop kept running while submitters waited


def test_backpressure_blocks_submitters_and_loses_nothing(db, tenants, writer_factory):
    w = writer_factory(batch_size=2, queue_max=2)
    records = [rec(tenants[0]) for _ in range(20)]
    done = threading.Event()

    def produce():
        for r in records:
            w.submit(r)
        done.set()

    with writes_held(db):
        t = threading.Thread(target=produce)
        t.start()
        # The writer holds one batch it cannot commit and the queue is full: the producer waits.
        assert not done.wait(0.5)
        assert w.pending > 0
    t.join(10)
    assert done.is_set()
    assert w.flush(30)
    assert ids(db, tenants) == {r.id for r in records}


def test_tiny_queue_many_producers_lose_nothing(db, tenants, writer_factory):
    w = writer_factory(batch_size=3, queue_max=1)
    per_thread = [[rec(tenants[i % 3]) for _ in range(10)] for i in range(6)]
    threads = [threading.Thread(target=lambda p=p: [w.submit(r) for r in p]) for p in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert w.flush(30)
    assert ids(db, tenants) == {r.id for p in per_thread for r in p}


# -- flush and close -----------------------------------------------------------------------


def test_flush_waits_for_durable_rows_and_honours_timeout(db, tenants, writer_factory):
    w = writer_factory()
    first = [rec(tenants[0]) for _ in range(5)]
    for r in first:
        w.submit(r)
    assert w.flush(10) is True
    assert ids(db, tenants) == {r.id for r in first}  # visible to any new transaction once flush returns
    assert w.pending == 0

    late = rec(tenants[1])
    with writes_held(db):
        w.submit(late)
        assert w.flush(timeout=0.3) is False  # cannot be durable while the database is held
        assert w.pending == 1
    assert w.flush(10) is True
    assert late.id in ids(db, tenants)


async def test_close_writes_everything_queued_then_refuses(db, tenants, writer_factory):
    w = writer_factory(flush_interval=1.0, batch_size=1000)  # would linger a long time
    records = [rec(tenants[i % 3]) for i in range(50)]
    for r in records:
        w.submit(r)
    w.close(timeout=30)  # no explicit flush
    assert ids(db, tenants) == {r.id for r in records}
    assert not any(lane.thread.is_alive() for lane in w._lanes)
    with pytest.raises(RuntimeError):
        w.submit(rec(tenants[0]))
    with pytest.raises(RuntimeError):
        await w.asubmit(rec(tenants[0]))
    w.close()  # twice is fine


def test_on_written_hook_sees_every_row(db, tenants, writer_factory):
    seen: list[str] = []
    w = writer_factory(on_written=lambda batch: seen.extend(r.id for r in batch))
    records = [rec(tenants[0]) for _ in range(30)]
    for r in records:
        w.submit(r)
    assert w.flush(10)
    assert sorted(seen) == sorted(r.id for r in records)


# -- outages and refused rows --------------------------------------------------------------


class _ImpatientSQLite(SQLiteDatabase):
    """Gives up on a held write lock after 20 ms instead of 30 s: the writer sees a real
    'database is locked' error from SQLite instead of waiting."""

    def _conn(self):
        conn = super()._conn()
        conn.execute("PRAGMA busy_timeout=20")
        return conn


def test_sqlite_locked_database_is_retried_until_rows_land(tmp_path):
    db = _ImpatientSQLite(str(tmp_path / "locked.db"))
    migrate(db)
    tenants = [TenantService(db).create_tenant("acme").id]
    w = LedgerWriter(db, flush_interval=0.01, dead_letter_path=tmp_path / "dl.jsonl")
    try:
        records = [rec(tenants[0]) for _ in range(10)]
        with writes_held(db):
            for r in records:
                w.submit(r)
            wait_until(lambda: w.retries >= 2)
            assert w.written == 0
        assert w.flush(30)
        assert ids(db, tenants) == {r.id for r in records}
        assert w.dead_lettered == 0
    finally:
        w.close(10)
        db.close()


@pytest.fixture
def pg_db(shared_pg_url) -> Iterator[Database]:
    database = open_database(shared_pg_url)
    yield database
    database.close()


@pytest.mark.postgres
def test_postgres_refused_writes_are_retried_until_rows_land(pg_db, tmp_path):
    import psycopg

    db = pg_db
    tenants = [TenantService(db).create_tenant(f"refused-{uuid.uuid4().hex[:8]}").id]
    w = LedgerWriter(db, flush_interval=0.01, dead_letter_path=tmp_path / "dl.jsonl")
    records = [rec(tenants[0]) for _ in range(10)]
    with psycopg.connect(db.url, autocommit=True) as admin:
        # The server refuses the writer's statements (permission denied) until the grant is back.
        admin.execute("REVOKE INSERT ON ai_interactions FROM loadbear_app")
        try:
            for r in records:
                w.submit(r)
            wait_until(lambda: w.retries >= 2)
            assert count(db, "ai_interactions", tenants) == 0
        finally:
            admin.execute("GRANT INSERT ON ai_interactions TO loadbear_app")
    assert w.flush(30)
    assert ids(db, tenants) == {r.id for r in records}
    assert w.dead_lettered == 0
    w.close(10)


@pytest.mark.postgres
def test_postgres_dropped_connections_are_retried(pg_db, tmp_path):
    import psycopg

    db = pg_db
    svc = TenantService(db)
    tenants = [svc.create_tenant(f"dropped-{uuid.uuid4().hex[:8]}").id, svc.create_tenant(f"back-{uuid.uuid4().hex[:8]}").id]
    w = LedgerWriter(db, flush_interval=0.01, dead_letter_path=tmp_path / "dl.jsonl")
    w.submit(rec(tenants[0]))
    assert w.flush(10)  # the pool now holds a connection the writer will reuse
    with psycopg.connect(db.url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    assert killed >= 1
    records = [rec(tenants[1]) for _ in range(10)]
    for r in records:
        w.submit(r)
    assert w.flush(30)
    assert {r.id for r in records} <= ids(db, tenants)
    # The dead connections are replaced when they are checked out (storage/db.py), so the writer
    # may not even see a failure; a failure it does see is retried (the test above).
    assert w.dead_lettered == 0
    w.close(10)


def test_refused_rows_go_to_the_dead_letter_file_and_the_rest_is_written(db, tenants, tmp_path, writer_factory):
    dl = tmp_path / "refused.jsonl"
    good = [rec(tenants[i % 3], cost_micro_usd=100) for i in range(40)]
    unknown_tenant = rec(str(uuid.uuid4()))  # foreign key: no such tenant
    bad_status = rec(tenants[0])
    bad_status.status = "exploded"  # bypasses the dataclass check; the database CHECK refuses it
    unencodable = rec(tenants[1], metadata={"handle": object()})
    bad = [unknown_tenant, bad_status, unencodable]
    if db.dialect == "postgres":
        bad.append(rec(tenants[2], feature="x" * 101))  # longer than the column allows
    batch = good[:20] + bad + good[20:]
    # One batch: the writer takes it as a whole (batch_size reached) and has to split it.
    w = writer_factory(batch_size=len(batch), flush_interval=5.0, dead_letter_path=dl)
    for r in batch:
        w.submit(r)
    assert w.flush(30)
    assert ids(db, tenants) == {r.id for r in good}
    assert w.dead_lettered == len(bad) and w.written == len(batch)
    lines = [json.loads(line) for line in dl.read_text().splitlines()]
    assert sorted(line["row"]["id"] for line in lines) == sorted(r.id for r in bad)
    assert all(line["error"] for line in lines)
    # The rollups count only what was written.
    assert total(db, "requests", tenants) == len(good)
    assert total(db, "cost_micro_usd", tenants) == 100 * len(good)


def test_a_row_already_stored_is_not_written_twice(db, tenants, writer_factory):
    w = writer_factory()
    r = rec(tenants[0], cost_micro_usd=500)
    w.submit(r)
    assert w.flush(10)
    w.submit(r)  # e.g. a retry after the acknowledgement of a commit was lost
    w.submit(rec(tenants[0], cost_micro_usd=1))
    assert w.flush(10)
    assert count(db, "ai_interactions", tenants) == 2 and w.dead_lettered == 0
    assert total(db, "requests", tenants) == 2
    assert total(db, "cost_micro_usd", tenants) == 501


# -- what is stored ------------------------------------------------------------------------


def test_cost_is_stored_as_given_never_recomputed(db, tenants, writer_factory):
    w = writer_factory()
    big = 2**53 + 1  # not representable as a float: proves no float/JSON-number rounding
    r = rec(tenants[0], prompt_tokens=1_000_000, completion_tokens=1, cost_micro_usd=big, saved_micro_usd=3)
    r.attempts[0].cost_micro_usd = 1_234_567
    odd = rec(tenants[0], prompt_tokens=0, completion_tokens=0, cost_micro_usd=999_999, attempts=2)
    w.submit(r)
    w.submit(odd)
    assert w.flush(10)
    with db.system_tx(write=False) as c:
        rows = {str(x["id"]): x for x in c.fetchall(
            f"SELECT id, cost_micro_usd, saved_micro_usd FROM ai_interactions WHERE {_in(tenants)}")}
        att = {(str(x["interaction_id"]), x["attempt_no"]): x["cost_micro_usd"] for x in c.fetchall(
            f"SELECT interaction_id, attempt_no, cost_micro_usd FROM ai_attempts WHERE {_in(tenants)}")}
    rollup = total(db, "cost_micro_usd", tenants)
    assert rows[r.id]["cost_micro_usd"] == big and isinstance(rows[r.id]["cost_micro_usd"], int)
    assert rows[r.id]["saved_micro_usd"] == 3
    assert rows[odd.id]["cost_micro_usd"] == 999_999  # zero tokens, and still the cost it was given
    assert att == {(r.id, 1): 1_234_567, (odd.id, 1): 7, (odd.id, 2): 14}
    assert rollup == big + 999_999


def test_times_are_utc_whatever_the_record_carries(db, tenants, writer_factory):
    w = writer_factory()
    eastern = timezone(timedelta(hours=-5))
    late_evening = rec(tenants[0], when=datetime(2026, 1, 1, 23, 30, tzinfo=eastern))  # 04:30 UTC next day
    naive = rec(tenants[0], when=datetime(2026, 1, 5, 8, 0, 0))  # naive means UTC
    w.submit(late_evening)
    w.submit(naive)
    assert w.flush(10)
    with db.system_tx(write=False) as c:
        stored = {str(r["id"]): r["created_at"] for r in c.fetchall(
            f"SELECT id, created_at FROM ai_interactions WHERE {_in(tenants)}")}
        days = sorted(str(r["day"])[:10] for r in c.fetchall(f"SELECT day FROM usage_daily WHERE {_in(tenants)}"))
    if db.dialect == "sqlite":
        assert stored[late_evening.id] == "2026-01-02T04:30:00.000000"
        assert stored[naive.id] == "2026-01-05T08:00:00.000000"
    else:
        assert stored[late_evening.id] == datetime(2026, 1, 2, 4, 30, tzinfo=timezone.utc)
        assert stored[naive.id] == datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)
    assert days == ["2026-01-02", "2026-01-05"]


def test_sqlite_time_text_matches_values_db_time():
    for dt in (datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 2, 28, 23, 59, 59, 999999, tzinfo=timezone.utc),
               datetime(2026, 6, 1, 1, 0, 0, 5, tzinfo=timezone(timedelta(hours=3)))):
        assert _sqlite_time(dt) == db_time("sqlite", dt)


def test_rollups_equal_aggregates_over_raw_rows(db, tenants, writer_factory):
    rng = random.Random(11)
    w = writer_factory(batch_size=37)  # many batches: rollups are added up across transactions
    statuses = ("ok", "ok", "ok", "error", "degraded", "cancelled")
    records = []
    for i in range(600):
        when = datetime(2026, 2, 1, tzinfo=timezone.utc) + timedelta(minutes=rng.randrange(6 * 24 * 60))
        if i % 7 == 0:
            when = when.astimezone(timezone(timedelta(hours=9)))
        r = rec(rng.choice(tenants), when=when, feature=rng.choice(("chat", "search", "summarize")),
                model=rng.choice(("gpt-4o", "gpt-4o-mini", "claude")), status=rng.choice(statuses),
                prompt_tokens=rng.randrange(3000), completion_tokens=rng.randrange(900),
                latency_ms=rng.randrange(20, 5000), cost_micro_usd=rng.randrange(10**7),
                user_external_id=rng.choice((None, "", "alice", "bob", "carol")),
                cached=rng.random() < 0.2, streamed=rng.random() < 0.5, attempts=rng.randint(0, 2))
        r.cached_input_tokens = rng.randrange(100)
        r.saved_micro_usd = rng.randrange(1000) if r.cached else 0
        records.append(r)
    for r in records:
        w.submit(r)
    assert w.flush(30)
    day = "substr(i.created_at, 1, 10)" if db.dialect == "sqlite" else "(i.created_at AT TIME ZONE 'UTC')::date"
    flag = "CASE WHEN i.{} THEN 1 ELSE 0 END"
    raw_sql = (
        f"SELECT i.tenant_id, {day} AS day, i.feature, i.model, COALESCE(u.external_id, '') AS user_external_id,"
        " COUNT(*) AS requests, SUM(CASE WHEN i.status = 'error' THEN 1 ELSE 0 END) AS errors,"
        " SUM(CASE WHEN i.status = 'degraded' THEN 1 ELSE 0 END) AS degraded,"
        " SUM(CASE WHEN i.status = 'cancelled' THEN 1 ELSE 0 END) AS cancelled,"
        f" SUM({flag.format('cached')}) AS cached_requests, SUM({flag.format('streamed')}) AS streamed_requests,"
        " SUM(i.prompt_tokens) AS prompt_tokens, SUM(i.completion_tokens) AS completion_tokens,"
        " SUM(i.cached_input_tokens) AS cached_input_tokens, SUM(i.cost_micro_usd) AS cost_micro_usd,"
        " SUM(i.saved_micro_usd) AS saved_micro_usd, SUM(i.latency_ms) AS latency_ms_sum"
        f" FROM ai_interactions i LEFT JOIN users u ON u.id = i.user_id WHERE i.{_in(tenants)}"
        f" GROUP BY i.tenant_id, {day}, i.feature, i.model, COALESCE(u.external_id, '')"
    )
    rollup_sql = (
        "SELECT tenant_id, day, feature, model, user_external_id, requests, errors, degraded, cancelled,"
        " cached_requests, streamed_requests, prompt_tokens, completion_tokens, cached_input_tokens,"
        f" cost_micro_usd, saved_micro_usd, latency_ms_sum FROM usage_daily WHERE {_in(tenants)}"
    )

    def norm(rows):
        return sorted(
            tuple(str(v)[:10] if k == "day" else str(v) if k in ("tenant_id", "feature", "model", "user_external_id")
                  else int(v) for k, v in r.items())
            for r in rows
        )

    with db.system_tx(write=False) as c:
        raw = norm(c.fetchall(raw_sql))
        rolled = norm(c.fetchall(rollup_sql))
    assert rolled == raw
    assert sum(r[5] for r in rolled) == len(records)


def test_key_touches_are_written_by_flush(db, writer_factory):
    svc = TenantService(db)
    slug = f"touchy-{uuid.uuid4().hex[:8]}"
    svc.create_tenant(slug)
    key, _ = svc.create_key(slug)
    w = writer_factory()
    w.touch_key(key.id, key.tenant_id)
    assert w.flush(10)
    [stored] = svc.list_keys(slug)
    assert stored.last_used_at is not None


def test_lanes_keep_each_tenant_on_one_writer(db, tenants, writer_factory):
    w = writer_factory(lanes=3)
    if db.dialect == "sqlite":
        assert len(w._lanes) == 1  # one SQLite writer at a time
    else:
        assert len(w._lanes) == 3
        lanes = [w._lane(t) for t in tenants]
        assert len({id(lane) for lane in lanes}) == 3  # dealt out in turn
        assert all(w._lane(t) is lane for t, lane in zip(tenants, lanes))  # and stays put
    records = [rec(tenants[i % 3]) for i in range(90)]
    for r in records:
        w.submit(r)
    assert w.flush(10)
    assert ids(db, tenants) == {r.id for r in records}


def test_generated_attempt_ids_are_uuid7_and_kept(db, tenants, writer_factory):
    w = writer_factory()
    r = rec(tenants[0], attempts=2)
    assert all(a.id is None for a in r.attempts)
    w.submit(r)
    assert w.flush(10)
    generated = [a.id for a in r.attempts]
    assert all(uuid.UUID(i).version == 7 for i in generated) and len(set(generated)) == 2
    with db.system_tx(write=False) as c:
        stored = [str(x["id"]) for x in c.fetchall(
            "SELECT id FROM ai_attempts WHERE CAST(interaction_id AS TEXT) = ? ORDER BY attempt_no", (r.id,))]
    assert stored == generated


def test_a_queue_smaller_than_a_batch_does_not_wait_for_a_full_batch(db, tenants, writer_factory):
    # batch_size can never be reached with a 4-row queue: the writer must not linger for it.
    w = writer_factory(batch_size=1000, queue_max=4, flush_interval=0.5)
    records = [rec(tenants[0]) for _ in range(40)]
    started = time.monotonic()
    for r in records:
        w.submit(r)
    assert w.flush(30)
    assert time.monotonic() - started < 4  # 10+ lingering batches would take 5 s
    assert ids(db, tenants) == {r.id for r in records}


def test_without_a_dead_letter_file_the_log_gets_the_row_but_never_its_content(db, tenants, tmp_path, writer_factory,
                                                                               caplog):
    refused = rec(str(uuid.uuid4()), prompt_text="my secret question", response_text="the secret answer")
    # A directory where the file should be: opening it for append fails, as on a full or read-only disk.
    w = writer_factory(dead_letter_path=tmp_path)
    with caplog.at_level(logging.CRITICAL, logger="loadbear"):
        w.submit(refused)
        assert w.flush(30)
    assert w.dead_lettered == 1
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(logged) == 1 and refused.id in logged[0]
    assert "secret" not in logged[0]
