"""Schema migrations: a fresh database, an upgraded one, idempotence, and what PostgreSQL adds."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from loadbear.ledger.records import AttemptRecord, InteractionRecord
from loadbear.ledger.writer import LedgerWriter
from loadbear.storage.db import Database, open_database
from loadbear.storage.migrate import applied, available, is_current, migrate, pending
from loadbear.storage.values import db_day, db_time, uuid7
from loadbear.tenancy.service import user_uuid

FOUNDATION_TABLES = ("tenants", "users", "api_keys", "ai_interactions", "ai_attempts", "usage_daily")
INTERACTION_COLUMNS = {
    # the original ledger row ...
    "id", "tenant_id", "user_id", "feature", "model", "prompt_tokens", "completion_tokens", "latency_ms",
    "cached", "error", "created_at",
    # ... and what the gateway needs on top
    "request_id", "provider", "requested_model", "route_reason", "status", "streamed", "ttft_ms",
    "finish_reason", "cached_input_tokens", "cost_micro_usd", "cache_kind", "metadata",
}
ATTEMPT_COLUMNS = {
    "id", "interaction_id", "tenant_id", "attempt_no", "provider", "model", "status", "error_type", "error",
    "http_status", "prompt_tokens", "completion_tokens", "cached_input_tokens", "cost_micro_usd",
    "latency_ms", "ttft_ms", "started_at",
}
ROLLUP_COLUMNS = {
    "tenant_id", "day", "feature", "model", "user_external_id", "requests", "errors", "prompt_tokens",
    "completion_tokens", "cost_micro_usd", "latency_ms_sum",
}


@pytest.fixture
def empty_db(empty_db_url: str):
    database = open_database(empty_db_url)
    yield database
    database.close()


def tables(db: Database) -> set[str]:
    with db.system_tx(write=False) as c:
        if db.dialect == "sqlite":
            rows = c.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
        else:
            rows = c.fetchall("SELECT tablename AS name FROM pg_tables WHERE schemaname = 'public'")
    return {r["name"] for r in rows}


def columns(db: Database, table: str) -> set[str]:
    with db.system_tx(write=False) as c:
        if db.dialect == "sqlite":
            return {r["name"] for r in c.fetchall(f"PRAGMA table_info({table})")}
        return {r["column_name"] for r in c.fetchall(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' AND table_name = ?",
            (table,))}


def indexes(db: Database, table: str) -> dict[str, str]:
    with db.system_tx(write=False) as c:
        if db.dialect == "sqlite":
            rows = c.fetchall("SELECT name, sql AS definition FROM sqlite_master WHERE type = 'index' AND tbl_name = ?",
                              (table,))
        else:
            rows = c.fetchall("SELECT indexname AS name, indexdef AS definition FROM pg_indexes WHERE tablename = ?",
                              (table,))
    return {r["name"]: r["definition"] or "" for r in rows}


def test_fresh_database_gets_the_whole_schema_once(empty_db, tmp_path: Path):
    db = empty_db
    versions = [m.version for m in available(db.dialect)]
    assert versions and versions == sorted(versions)
    assert [m.version for m in pending(db)] == versions and not is_current(db)
    assert migrate(db) == versions
    assert set(FOUNDATION_TABLES) <= tables(db)
    assert INTERACTION_COLUMNS <= columns(db, "ai_interactions")
    assert ATTEMPT_COLUMNS <= columns(db, "ai_attempts")
    assert ROLLUP_COLUMNS <= columns(db, "usage_daily")
    assert {"id", "tenant_id", "prefix", "key_hash", "scopes", "revoked_at", "last_used_at"} <= columns(db, "api_keys")
    assert {"id", "slug", "name", "settings", "active"} <= columns(db, "tenants")
    assert {"id", "tenant_id", "external_id"} <= columns(db, "users")
    assert pending(db) == [] and is_current(db)
    assert applied(db) == versions

    # The tenant-day index that keeps per-tenant day scans of raw rows cheap.
    definition = indexes(db, "ai_interactions").get("idx_ai_interactions_tenant_day", "")
    assert "tenant_id" in definition
    if db.dialect == "postgres":
        assert "AT TIME ZONE 'UTC'" in definition and "::date" in definition
        with db.system_tx(write=False) as c:
            assert c.scalar("SELECT extname FROM pg_extension WHERE extname = 'vector'") == "vector"
            assert c.scalar("SELECT '[1,2,3]'::vector <-> '[1,2,4]'::vector") == 1.0
    else:
        assert "substr(created_at, 1, 10)" in definition
    assert "idx_ai_attempts_interaction" in indexes(db, "ai_attempts")
    # The rollups' storage is tuned for reports and upserts (0005).
    with db.system_tx(write=False) as c:
        if db.dialect == "sqlite":
            assert "WITHOUT ROWID" in c.scalar("SELECT sql FROM sqlite_master WHERE name = 'usage_daily'")
        else:
            assert "fillfactor=70" in c.scalar("SELECT array_to_string(reloptions, ',') FROM pg_class"
                                               " WHERE relname = 'usage_daily'")

    # A second run is a no-op.
    with db.system_tx(write=False) as c:
        before = c.fetchall("SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
    schema_before = {t: columns(db, t) for t in FOUNDATION_TABLES}
    assert migrate(db) == []
    with db.system_tx(write=False) as c:
        assert c.fetchall("SELECT version, name, applied_at FROM schema_migrations ORDER BY version") == before
    assert {t: columns(db, t) for t in FOUNDATION_TABLES} == schema_before

    if db.dialect == "postgres":
        # Both backends stay in step: same versions, same columns, same named indexes.
        lite = open_database(f"sqlite:///{tmp_path / 'same.db'}")
        try:
            migrate(lite)
            assert [m.version for m in available("sqlite")] == versions
            for table in FOUNDATION_TABLES:
                assert columns(lite, table) == columns(db, table), table
                named = {n for n in indexes(lite, table) if not n.startswith("sqlite_autoindex")}
                assert named <= set(indexes(db, table)), table
        finally:
            lite.close()


def test_upgraded_database_keeps_its_data(empty_db, tmp_path: Path):
    db = empty_db
    d = db.dialect
    assert migrate(db, target=1) == [1]
    assert applied(db) == [1]
    assert [m.version for m in pending(db)] == [m.version for m in available(d) if m.version > 1]
    # Data written by a version-1 deployment.
    tenant, key, inter, att = (str(uuid.uuid4()) for _ in range(4))
    user = user_uuid(tenant, "u-1")  # end-user ids are derived, so the writer never looks them up
    when = datetime(2026, 1, 15, 10, 30, tzinfo=timezone.utc)
    with db.system_tx() as c:
        c.execute("INSERT INTO tenants (id, slug, name) VALUES (?, ?, ?)", (tenant, "legacy", "Legacy Co"))
        c.execute("INSERT INTO users (id, tenant_id, external_id) VALUES (?, ?, ?)", (user, tenant, "u-1"))
        c.execute("INSERT INTO api_keys (id, tenant_id, prefix, key_hash, scopes) VALUES (?, ?, ?, ?, ?)",
                  (key, tenant, "lb_legacy0", "a" * 64, '["chat"]'))
        c.execute(
            "INSERT INTO ai_interactions (id, tenant_id, user_id, feature, model, prompt_tokens, completion_tokens,"
            " latency_ms, cached, created_at, requested_model, status, cost_micro_usd, metadata)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (inter, tenant, user, "chat", "gpt-4o", 100, 20, 250, False, db_time(d, when), "auto", "ok", 1234, '{"v": 1}'),
        )
        c.execute(
            "INSERT INTO ai_attempts (id, interaction_id, tenant_id, attempt_no, provider, model, status, latency_ms,"
            " started_at, cost_micro_usd) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (att, inter, tenant, 1, "openai", "gpt-4o", "ok", 240, db_time(d, when), 1234),
        )
        c.execute(
            "INSERT INTO usage_daily (tenant_id, day, feature, model, user_external_id, requests, cost_micro_usd)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (tenant, db_day(d, when.date()), "chat", "gpt-4o", "u-1", 1, 1234),
        )
    ran = migrate(db)
    assert ran == [m.version for m in available(d) if m.version > 1]
    assert pending(db) == [] and is_current(db)
    with db.system_tx(write=False) as c:
        row = c.fetchone("SELECT * FROM ai_interactions WHERE CAST(id AS TEXT) = ?", (inter,))
        assert (row["prompt_tokens"], row["completion_tokens"], row["cost_micro_usd"], row["model"]) == (100, 20, 1234, "gpt-4o")
        assert str(row["user_id"]) == user
        assert c.fetchone("SELECT attempt_no, cost_micro_usd FROM ai_attempts WHERE CAST(id AS TEXT) = ?", (att,)) == {
            "attempt_no": 1, "cost_micro_usd": 1234}
        assert c.scalar("SELECT slug FROM tenants WHERE CAST(id AS TEXT) = ?", (tenant,)) == "legacy"
        assert c.scalar("SELECT prefix FROM api_keys WHERE CAST(id AS TEXT) = ?", (key,)) == "lb_legacy0"
        assert int(c.scalar("SELECT requests FROM usage_daily WHERE CAST(tenant_id AS TEXT) = ?", (tenant,))) == 1
    # The upgraded schema takes new ledger rows, and the rollup row keeps counting.
    writer = LedgerWriter(db, flush_interval=0.01, dead_letter_path=tmp_path / "dl.jsonl")
    try:
        r = InteractionRecord(id=uuid7(), tenant_id=tenant, feature="chat", requested_model="auto", model="gpt-4o",
                              status="ok", created_at=when, latency_ms=10, cost_micro_usd=6, user_external_id="u-1")
        r.attempts.append(AttemptRecord(attempt_no=1, provider="openai", model="gpt-4o", upstream_model=None,
                                        status="ok", started_at=when, latency_ms=9))
        writer.submit(r)
        assert writer.flush(10) and writer.dead_lettered == 0
    finally:
        writer.close(10)
    with db.system_tx(write=False) as c:
        assert c.fetchone("SELECT requests, cost_micro_usd FROM usage_daily WHERE CAST(tenant_id AS TEXT) = ?",
                          (tenant,)) == {"requests": 2, "cost_micro_usd": 1240}
