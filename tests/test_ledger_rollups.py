"""The narrow rollups the usage reports read (migration 0012): usage_daily_models (no end user)
and usage_daily_users (only the end user) always hold usage_daily's sums regrouped, whether the
writer made them or the migration filled them from an existing ledger. Both backends."""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta, timezone

from loadbear.ledger.records import AttemptRecord, InteractionRecord
from loadbear.ledger.reports import admin_usage, tenant_usage
from loadbear.storage.db import Database, open_database
from loadbear.storage.migrate import migrate
from loadbear.storage.values import db_day, uuid7
from loadbear.tenancy.service import TenantService
from conftest import write_ledger

SUMS = ("requests", "errors", "degraded", "cancelled", "cached_requests", "streamed_requests", "prompt_tokens",
        "completion_tokens", "cached_input_tokens", "cost_micro_usd", "saved_micro_usd", "latency_ms_sum")
SPLIT = ("saved_cache_micro_usd", "saved_routing_micro_usd")  # migration 0014 (tests/test_savings_*.py)
DAY0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _regrouped(db: Database, keys: tuple[str, ...]) -> dict[tuple, tuple]:
    """usage_daily summed by ``keys``, as {key: sums}."""
    cols = ", ".join(keys)
    sums = ", ".join(f"CAST(SUM({c}) AS BIGINT)" for c in SUMS)
    with db.system_tx(write=False) as c:
        rows = c.execute(f"SELECT {cols}, {sums} FROM usage_daily GROUP BY {cols}").fetchall()
    return {tuple(str(v) for v in r[:len(keys)]): tuple(int(v) for v in r[len(keys):]) for r in rows}


def _table(db: Database, table: str, keys: tuple[str, ...]) -> dict[tuple, tuple]:
    with db.system_tx(write=False) as c:
        rows = c.execute(f"SELECT {', '.join(keys)}, {', '.join(SUMS)} FROM {table}").fetchall()
    return {tuple(str(v) for v in r[:len(keys)]): tuple(int(v) for v in r[len(keys):]) for r in rows}


def assert_rollups_agree(db: Database) -> None:
    models = ("tenant_id", "day", "feature", "model")
    users = ("tenant_id", "day", "user_external_id")
    assert _table(db, "usage_daily_models", models) == _regrouped(db, models)
    assert _table(db, "usage_daily_users", users) == _regrouped(db, users)


def _record(rng: random.Random, tenant_id: str, when: datetime, **kw) -> InteractionRecord:
    status = rng.choice(("ok", "ok", "ok", "error", "degraded", "cancelled"))
    r = InteractionRecord(
        id=uuid7(), tenant_id=tenant_id, feature=rng.choice(("chat", "summarize")), requested_model="auto",
        model=rng.choice(("m1", "m2", "m3")), status=status, created_at=when, latency_ms=rng.randint(5, 500),
        prompt_tokens=rng.randint(1, 900), completion_tokens=rng.randint(0, 300), cached_input_tokens=rng.randint(0, 5),
        cost_micro_usd=rng.randint(0, 10_000), saved_micro_usd=rng.randint(0, 50), cached=rng.random() < 0.2,
        streamed=rng.random() < 0.5, user_external_id=rng.choice((None, "", "u-1", "u-2", "u-3")), **kw)
    r.attempts.append(AttemptRecord(attempt_no=1, provider="p", model=r.model, upstream_model=None, status="ok",
                                    started_at=when, latency_ms=r.latency_ms))
    return r


def _write(db: Database, records: list[InteractionRecord], tmp_path, batch_size: int = 37) -> None:
    write_ledger(db, records, tmp_path, batch_size=batch_size)


def test_the_writer_keeps_the_narrow_rollups_equal_to_usage_daily(db, tmp_path):
    rng = random.Random(5)
    svc = TenantService(db)
    tenants = [svc.create_tenant(f"roll-{i}").id for i in range(3)]
    records = [_record(rng, rng.choice(tenants), DAY0 + timedelta(hours=rng.randint(0, 24 * 4))) for _ in range(400)]
    # Evaluation traffic stays out of every rollup alike.
    records += [_record(rng, tenants[0], DAY0, metadata={"eval_run": "run-1"}) for _ in range(5)]
    _write(db, records, tmp_path)
    assert_rollups_agree(db)
    product = [r for r in records if not (r.metadata or {}).get("eval_run")]
    with db.system_tx(write=False) as c:
        assert int(c.scalar("SELECT SUM(requests) FROM usage_daily_models")) == len(product)
        assert int(c.scalar("SELECT SUM(requests) FROM usage_daily_users")) == len(product)
    # Every report grouping gives the same totals, and they match the records.
    start, end = DAY0.date(), DAY0.date() + timedelta(days=5)
    for t in tenants:
        mine = [r for r in product if r.tenant_id == t]
        totals = {g: tenant_usage(db, t, start, end, g)["totals"] for g in ("day", "feature", "model", "user")}
        assert len({tuple(sorted(v.items())) for v in totals.values()}) == 1
        assert totals["day"]["requests"] == len(mine)
        assert totals["day"]["cost_micro_usd"] == sum(r.cost_micro_usd for r in mine)
        assert totals["day"]["errors"] == sum(r.status == "error" for r in mine)
        by_user = {row["user"]: row["requests"] for row in tenant_usage(db, t, start, end, "user")["data"]}
        assert by_user == {u: sum((r.user_external_id or "") == u for r in mine)
                           for u in {(r.user_external_id or "") for r in mine}}
    admin = admin_usage(db, start, end, "user")
    assert admin["totals"]["requests"] == len(product)
    assert {row["tenant"] for row in admin_usage(db, start, end, "tenant")["data"]} == {
        t.slug for t in svc.list_tenants()}


def test_migration_0012_fills_the_narrow_rollups_from_an_existing_ledger(empty_db_url, tmp_path):
    db = open_database(empty_db_url)
    try:
        migrate(db, target=11)  # a ledger from before the narrow rollups
        d = db.dialect
        svc = TenantService(db)
        tenants = [svc.create_tenant(f"legacy-{i}").id for i in range(2)]
        rng = random.Random(9)
        day = DAY0.date()
        with db.system_tx() as c:
            for i in range(60):
                values = [rng.randint(0, 1000) for _ in SUMS]
                c.execute(
                    f"INSERT INTO usage_daily (tenant_id, day, feature, model, user_external_id, {', '.join(SUMS)})"
                    f" VALUES (?, ?, ?, ?, ?, {', '.join('?' for _ in SUMS)})"
                    " ON CONFLICT DO NOTHING",
                    (tenants[i % 2], db_day(d, day + timedelta(days=i % 3)), f"f{i % 2}", f"m{i % 3}",
                     f"u-{i % 4}" if i % 5 else "", *values),
                )
        with db.system_tx(write=False) as c:
            legacy_requests = int(c.scalar("SELECT SUM(requests) FROM usage_daily"))
        assert 12 in migrate(db)
        assert_rollups_agree(db)
        report = tenant_usage(db, tenants[0], day, day + timedelta(days=2), "user")
        with db.system_tx(write=False) as c:
            assert report["totals"]["requests"] == int(c.scalar(
                "SELECT SUM(requests) FROM usage_daily WHERE tenant_id = ?", (tenants[0],)))
        # New ledger rows add to the filled rows.
        _write(db, [_record(rng, tenants[1], DAY0 + timedelta(hours=h)) for h in range(0, 72, 3)], tmp_path)
        assert_rollups_agree(db)
        with db.system_tx(write=False) as c:
            assert int(c.scalar("SELECT SUM(requests) FROM usage_daily_models")) == legacy_requests + 24
    finally:
        db.close()


def test_a_fresh_database_reports_nothing_until_rows_arrive(db):
    tenant = TenantService(db).create_tenant("roll-empty").id
    report = tenant_usage(db, tenant, date(2026, 1, 1), date(2026, 1, 31), "user")
    assert report["data"] == [] and report["totals"]["requests"] == 0
    assert _table(db, "usage_daily_models", ("tenant_id",)) == {}
    assert _table(db, "usage_daily_users", ("tenant_id",)) == {}


def test_fresh_schema_has_the_narrow_rollups_tuned_like_usage_daily(db):
    expected = {
        "usage_daily_models": {"tenant_id", "day", "feature", "model", *SUMS, *SPLIT},
        "usage_daily_users": {"tenant_id", "day", "user_external_id", *SUMS, *SPLIT},
    }
    with db.system_tx(write=False) as c:
        for table, cols in expected.items():
            if db.dialect == "sqlite":
                assert {r["name"] for r in c.fetchall(f"PRAGMA table_info({table})")} == cols
                assert "WITHOUT ROWID" in c.scalar("SELECT sql FROM sqlite_master WHERE name = ?", (table,))
            else:
                assert {r["column_name"] for r in c.fetchall(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,))} == cols
                assert "fillfactor=70" in c.scalar(
                    "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE relname = ?", (table,))
