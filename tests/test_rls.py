"""Row-level security on PostgreSQL: application SQL that forgets the tenant filter still cannot
see or write another tenant's rows. These tests run raw SQL as the application role, the way a
buggy query would."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Iterator

import pytest

from loadbear.ledger.records import AttemptRecord, InteractionRecord
from loadbear.ledger.reports import tenant_usage
from loadbear.ledger.writer import LedgerWriter
from loadbear.storage.db import Database, open_database
from loadbear.storage.values import uuid7
from loadbear.tenancy.service import TenantService

pytestmark = pytest.mark.postgres

APP_ROLE = "loadbear_app"
# Every table that holds tenant rows, and the column naming the tenant.
TENANT_TABLES = {
    "tenants": "id",
    "users": "tenant_id",
    "api_keys": "tenant_id",
    "ai_interactions": "tenant_id",
    "ai_attempts": "tenant_id",
    "usage_daily": "tenant_id",
    "usage_daily_models": "tenant_id",
    "usage_daily_users": "tenant_id",
}
WHEN = datetime(2026, 4, 2, 9, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def db(pg_server) -> Iterator[Database]:
    database = open_database(pg_server.fresh_url())
    yield database
    database.close()


@pytest.fixture(scope="module")
def seeded(db: Database, tmp_path_factory) -> dict[str, str]:
    """Two tenants with keys, end users, interactions, attempts and rollups."""
    svc = TenantService(db)
    a = svc.create_tenant("rls-a").id
    b = svc.create_tenant("rls-b").id
    for slug in ("rls-a", "rls-b"):
        svc.create_key(slug, "k1")
        svc.create_key(slug, "k2")
    writer = LedgerWriter(db, flush_interval=0.01, dead_letter_path=tmp_path_factory.mktemp("dl") / "dl.jsonl")
    try:
        for i in range(30):
            tenant = a if i % 3 else b
            r = InteractionRecord(id=uuid7(), tenant_id=tenant, feature="chat", requested_model="auto", model="m",
                                  status="ok", created_at=WHEN, latency_ms=10, prompt_tokens=i, cost_micro_usd=100,
                                  user_external_id=f"user-{i % 4}")
            r.attempts.append(AttemptRecord(attempt_no=1, provider="p", model="m", upstream_model=None, status="ok",
                                            started_at=WHEN, latency_ms=9))
            writer.submit(r)
        assert writer.flush(10) and writer.dead_lettered == 0
    finally:
        writer.close(10)
    return {"a": a, "b": b}


def rows_as_app(db: Database, tenant_id: str | None, table: str) -> list[dict]:
    tx = db.app_tx() if tenant_id is None else db.tenant_tx(tenant_id)
    with tx as c:
        return c.fetchall(f"SELECT * FROM {table}")  # no tenant filter, on purpose


def test_every_tenant_table_has_row_level_security(db):
    with db.system_tx(write=False) as c:
        with_tenant = {r["table_name"] for r in c.fetchall(
            "SELECT table_name FROM information_schema.columns WHERE table_schema = 'public'"
            " AND column_name = 'tenant_id'")}
        secured = {r["relname"]: r for r in c.fetchall(
            "SELECT c.relname, c.relrowsecurity, pg_get_userbyid(c.relowner) AS owner FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')")}
        policies = {r["tablename"] for r in c.fetchall("SELECT tablename FROM pg_policies WHERE schemaname = 'public'")}
    # Including tables other features add later: anything with a tenant_id column.
    for table in with_tenant | set(TENANT_TABLES):
        if table not in secured:
            continue  # a view, not a table
        assert secured[table]["relrowsecurity"], f"{table} has no row-level security"
        assert table in policies, f"{table} has no policy"
        assert secured[table]["owner"] != APP_ROLE, f"{table} is owned by the application role"


def test_app_role_cannot_bypass_row_level_security(db):
    with db.system_tx(write=False) as c:
        role = c.fetchone("SELECT rolsuper, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = ?", (APP_ROLE,))
    # It logs in itself (tenant work has no owner session underneath to go back to).
    assert role == {"rolsuper": False, "rolbypassrls": False, "rolcanlogin": True}
    with db.tenant_tx(str(uuid.uuid4())) as c:
        assert c.scalar("SELECT current_user") == APP_ROLE
        assert c.scalar("SELECT rolbypassrls FROM pg_roles WHERE rolname = current_user") is False


@pytest.mark.parametrize("table", sorted(TENANT_TABLES))
def test_unfiltered_select_sees_only_the_current_tenant(db, seeded, table):
    col = TENANT_TABLES[table]
    for me, other in (("a", "b"), ("b", "a")):
        rows = rows_as_app(db, seeded[me], table)
        assert rows, f"no {table} rows for tenant {me}: the test would prove nothing"
        assert {str(r[col]) for r in rows} == {seeded[me]}
        with db.system_tx(write=False) as c:
            assert len(rows) == c.scalar(f"SELECT COUNT(*) FROM {table} WHERE {col} = ?", (seeded[me],))
            assert c.scalar(f"SELECT COUNT(*) FROM {table} WHERE {col} = ?", (seeded[other],)) > 0


@pytest.mark.parametrize("table", sorted(TENANT_TABLES))
def test_no_tenant_set_means_no_rows(db, seeded, table):
    assert rows_as_app(db, None, table) == []


def _foreign_row(table: str, tenant_id: str) -> tuple[str, tuple]:
    new = str(uuid.uuid4())
    return {
        "tenants": ("INSERT INTO tenants (id, slug, name) VALUES (?, ?, ?)", (new, "rls-x", "x")),
        "users": ("INSERT INTO users (id, tenant_id, external_id) VALUES (?, ?, ?)", (new, tenant_id, "intruder")),
        "api_keys": ("INSERT INTO api_keys (id, tenant_id, prefix, key_hash) VALUES (?, ?, ?, ?)",
                     (new, tenant_id, "lb_x", "f" * 64)),
        "ai_interactions": (
            "INSERT INTO ai_interactions (id, tenant_id, feature, model, prompt_tokens, completion_tokens, latency_ms,"
            " requested_model, status, created_at) VALUES (?, ?, 'f', 'm', 1, 1, 1, 'm', 'ok', now())", (new, tenant_id)),
        "ai_attempts": (
            "INSERT INTO ai_attempts (id, interaction_id, tenant_id, attempt_no, provider, model, status, latency_ms,"
            " started_at) VALUES (?, ?, ?, 1, 'p', 'm', 'ok', 1, now())", (new, str(uuid.uuid4()), tenant_id)),
        "usage_daily": ("INSERT INTO usage_daily (tenant_id, day, feature, model, requests) VALUES (?, ?, 'f', 'm', 1)",
                        (tenant_id, "2026-04-02")),
        "usage_daily_models": ("INSERT INTO usage_daily_models (tenant_id, day, feature, model, requests)"
                               " VALUES (?, ?, 'f', 'm', 1)", (tenant_id, "2026-04-02")),
        "usage_daily_users": ("INSERT INTO usage_daily_users (tenant_id, day, user_external_id, requests)"
                              " VALUES (?, ?, 'u', 1)", (tenant_id, "2026-04-02")),
    }[table]


@pytest.mark.parametrize("table", sorted(TENANT_TABLES))
def test_writing_another_tenants_row_is_refused(db, seeded, table):
    import psycopg

    sql, params = _foreign_row(table, seeded["b"])
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        with db.tenant_tx(seeded["a"]) as c:
            c.execute(sql, params)
    # Also refused with no tenant at all.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        with db.app_tx() as c:
            c.execute(sql, params)


@pytest.mark.parametrize("table", sorted(TENANT_TABLES))
def test_updates_and_deletes_cannot_reach_another_tenant(db, seeded, table):
    import psycopg

    col = TENANT_TABLES[table]

    def owned_by_b() -> int:
        with db.system_tx(write=False) as c:
            return c.scalar(f"SELECT COUNT(*) FROM {table} WHERE {col} = ?", (seeded["b"],))

    class Undo(Exception):
        """Rolls the transaction back: even if RLS were broken, nothing is really deleted."""

    before = owned_by_b()
    with pytest.raises(Undo):
        with db.tenant_tx(seeded["a"]) as c:
            assert c.execute(f"UPDATE {table} SET {col} = {col} WHERE {col} = ?", (seeded["b"],)).rowcount == 0
            assert c.execute(f"DELETE FROM {table} WHERE {col} = ?", (seeded["b"],)).rowcount == 0
            raise Undo
    assert owned_by_b() == before
    # Moving one's own row to another tenant is refused too.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        with db.tenant_tx(seeded["a"]) as c:
            c.execute(f"UPDATE {table} SET {col} = ? WHERE {col} = ?", (seeded["b"], seeded["a"]))


def test_tenant_setting_does_not_leak_through_the_pool(db, seeded):
    with db.tenant_tx(seeded["a"]) as c:
        assert c.scalar("SELECT COUNT(*) FROM ai_interactions") > 0
    # Same pool, next transactions: no tenant and no role left behind.
    with db.app_tx() as c:
        assert c.scalar("SELECT COUNT(*) FROM ai_interactions") == 0
        assert c.scalar("SELECT current_setting('loadbear.tenant_id', true)") in (None, "")
    with db.system_tx(write=False) as c:
        assert c.scalar("SELECT current_user") != APP_ROLE


def test_a_malformed_tenant_setting_fails_instead_of_matching(db, seeded):
    import psycopg

    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        with db.tenant_tx("not-a-uuid") as c:
            c.fetchall("SELECT * FROM ai_interactions")


def test_reports_under_rls_match_the_tenants_own_rows(db, seeded):
    day = WHEN.date()
    for me in ("a", "b"):
        report = tenant_usage(db, seeded[me], day, day)
        with db.system_tx(write=False) as c:
            raw = c.scalar("SELECT COUNT(*) FROM ai_interactions WHERE tenant_id = ?", (seeded[me],))
        assert report["totals"]["requests"] == raw > 0
        # A report asked for another tenant's id inside this tenant's transaction finds nothing.
        with db.tenant_tx(seeded[me]) as c:
            other = seeded["b" if me == "a" else "a"]
            assert c.scalar("SELECT COUNT(*) FROM usage_daily WHERE tenant_id = ?", (other,)) == 0
