"""The cache lookup's hot path costs one statement (SQLite) / one round trip (PostgreSQL), and the
one-round-trip read (``Database.tenant_fetch``) keeps tenant work's isolation: the app role, the
tenant set in the read's own transaction (RLS), nothing left behind, no session with temporary
objects reused."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest

from loadbear.gateway.cache import ResponseCache
from loadbear.knowledge.store import KnowledgeStore
from loadbear.knowledge.types import ChunkDraft
from loadbear.storage.db import app_conninfo, open_database
from loadbear.tenancy.service import TenantService
from loadbear.testing.pg_round_trips import PgRoundTripCounter

SYSTEM = "You are Acme's support assistant."
Q = "How do I get a refund for the Team plan?"


def conv(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


class Embedder:
    """Deterministic vectors: these tests count round trips, not similarities."""

    name = "test-embedder"

    def embed(self, texts):
        out = []
        for t in texts:
            v = np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(8).astype(np.float32)
            out.append(v / np.linalg.norm(v))
        return np.stack(out)


def _doc(db, tenant: str, name: str, text: str):
    v = np.ones((1, 384), dtype=np.float32) / np.sqrt(384)
    return KnowledgeStore(db).upsert_document(
        tenant, title=name, external_id=name, embedding_model="test",
        chunks=[ChunkDraft(text=text, start=0, end=len(text), heading_path=[], token_count=5)], vectors=v)


def test_a_lookup_is_one_statement_on_sqlite(tmp_path):
    from loadbear.storage.migrate import migrate

    db = open_database(f"sqlite:///{tmp_path / 'lb.db'}")
    try:
        migrate(db)
        acme = TenantService(db).create_tenant("acme", "Acme", {}).id
        doc = _doc(db, acme, "refunds.md", "Refunds within 30 days.")
        cache = ResponseCache(db, embedder_factory=Embedder, static=False, background=False)
        versions = {doc.id: doc.version}
        for grounded in (None, versions):
            cache.store_sync(cache.key_for(acme, "helpdesk", conv(Q), "simple", grounded), answer_text="A.", model="m")
        stmts: list[str] = []
        db._conn().set_trace_callback(stmts.append)
        for grounded, question, kind in ((None, Q, "exact"), (versions, Q, "exact"), (None, "Something else?", None)):
            stmts.clear()
            hit = cache.lookup_sync(cache.key_for(acme, "helpdesk", conv(question), "simple", grounded))
            assert (hit.kind if hit else None) == kind
            assert len(stmts) == 1, stmts
        db._conn().set_trace_callback(None)
    finally:
        db.close()


def test_tenant_fetch_binds_parameters_on_both_backends(db):
    svc = TenantService(db)
    acme, globex = svc.create_tenant("acme", "Acme", {}).id, svc.create_tenant("globex", "Globex", {}).id
    rows = db.tenant_fetch(acme, "SELECT id, slug FROM tenants WHERE id = ?", (acme,))
    assert [(str(r["id"]), r["slug"]) for r in rows] == [(acme, "acme")]
    assert db.tenant_fetch(globex, "SELECT id FROM tenants WHERE id = ?", (acme,)) in ([], None) or db.dialect == "sqlite"


# -- PostgreSQL ---------------------------------------------------------------------------------

pg = pytest.mark.postgres


@pytest.fixture
def pg_url(pg_server) -> str:
    return pg_server.fresh_url()


@pg
def test_a_lookup_is_one_round_trip_on_postgres(pg_url):
    parts = urlsplit(pg_url)
    proxy = PgRoundTripCounter(parts.hostname, parts.port or 5432)
    url = urlunsplit((parts.scheme, f"{parts.username}@127.0.0.1:{proxy.port}", parts.path, parts.query, ""))
    db = open_database(url, app_url=app_conninfo(url, "loadbear_app"), pool_size=1)
    try:
        acme = TenantService(db).create_tenant("acme", "Acme", {}).id
        doc = _doc(db, acme, "refunds.md", "Refunds within 30 days.")
        cache = ResponseCache(db, embedder_factory=Embedder, static=False, background=False)
        versions = {doc.id: doc.version}
        for grounded in (None, versions):
            cache.store_sync(cache.key_for(acme, "helpdesk", conv(Q), "simple", grounded), answer_text="A.", model="m")
        cases = ((None, Q, "exact"), (versions, Q, "exact"), (None, "Something else?", None))
        for _ in range(6):  # past psycopg's prepare threshold: prepared or not, one trip
            for grounded, question, kind in cases:
                scope = cache.key_for(acme, "helpdesk", conv(question), "simple", grounded)
                proxy.take()
                hit = cache.lookup_sync(scope)
                assert (hit.kind if hit else None) == kind
                assert proxy.take() == 1
        # psycopg prepares a statement from its 6th execution on a connection (prepare_threshold 5):
        # the lookup's statement (one text per backend) is planned once per pooled connection.
        prepared = db.tenant_fetch(acme, "SELECT statement FROM pg_prepared_statements")
        assert any("cache_keys" in r["statement"] for r in prepared), prepared
        proxy.take()
        # a plain tenant transaction, for scale: BEGIN, the tenant, the read, COMMIT
        with db.tenant_tx(acme, write=False) as c:
            c.fetchall("SELECT id FROM cache_entries")
        assert proxy.take() == 4
    finally:
        db.close()
        proxy.close()


@pg
def test_tenant_fetch_is_held_by_rls_and_leaves_no_tenant_behind(pg_url):
    db = open_database(pg_url, pool_size=1)  # one connection: every call below reuses it
    try:
        svc = TenantService(db)
        acme, globex = svc.create_tenant("acme", "Acme", {}).id, svc.create_tenant("globex", "Globex", {}).id
        # no tenant filter, on purpose: row-level security answers
        assert [str(r["id"]) for r in db.tenant_fetch(acme, "SELECT id FROM tenants")] == [acme]
        assert [str(r["id"]) for r in db.tenant_fetch(globex, "SELECT id FROM tenants")] == [globex]
        rows = db.tenant_fetch(acme, "SELECT current_user AS u, current_setting('loadbear.tenant_id') AS t")
        assert rows == [{"u": "loadbear_app", "t": acme}]
        with db.app_tx() as c:  # the setting ended with the read's transaction
            assert c.fetchall("SELECT id FROM tenants") == []
            assert c.scalar("SELECT current_setting('loadbear.tenant_id', true)") == ""
        # a read only: even a write that RLS would allow is refused
        with pytest.raises(Exception, match="read-only transaction"):
            db.tenant_fetch(globex, "UPDATE tenants SET name = name RETURNING id")
        with pytest.raises(Exception, match="read-write mode must be set before any query"):
            db.tenant_fetch(globex, "SELECT set_config('transaction_read_only', 'off', true), 1 AS n")
    finally:
        db.close()


@pg
def test_tenant_fetch_errors_leave_a_usable_connection(pg_url):
    import psycopg

    db = open_database(pg_url, pool_size=1)
    try:
        acme = TenantService(db).create_tenant("acme", "Acme", {}).id
        with pytest.raises(psycopg.errors.UndefinedColumn):
            db.tenant_fetch(acme, "SELECT no_such_column FROM tenants")
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):  # not mistaken for a dirty session
            db.tenant_fetch(acme, "SELECT 'x'::int AS n")
        assert db.tenant_fetch(acme, "SELECT 1 AS n") == [{"n": 1}]
        with db.tenant_tx(acme) as c:
            assert c.scalar("SELECT COUNT(*) FROM tenants") == 1
    finally:
        db.close()


@pg
def test_tenant_fetch_never_reads_through_a_temporary_table(pg_url):
    db = open_database(pg_url, pool_size=1)
    try:
        svc = TenantService(db)
        acme, globex = svc.create_tenant("acme", "Acme", {}).id, svc.create_tenant("globex", "Globex", {}).id
        planted = str(uuid.uuid4())
        with db.tenant_tx(acme) as c:
            pid = c.scalar("SELECT pg_backend_pid()")
            # Left in the session, this table would come first in the search path for the next read.
            c.execute("CREATE TEMP TABLE tenants (id uuid)")
            c.execute("INSERT INTO tenants VALUES (?)", (planted,))
        rows = db.tenant_fetch(globex, "SELECT id, pg_backend_pid() AS pid FROM tenants")
        assert [str(r["id"]) for r in rows] == [globex]
        assert rows[0]["pid"] != pid  # that session was thrown away before the read was parsed
    finally:
        db.close()


# -- hit notes ------------------------------------------------------------------------------------


def _hits(db, tenant: str) -> int:
    with db.tenant_tx(tenant, write=False) as c:
        return int(c.scalar("SELECT COALESCE(SUM(hits), 0) FROM cache_entries WHERE tenant_id = ?", (tenant,)))


async def test_hit_notes_are_merged_off_the_request_path(db):
    from loadbear.gateway.cache import CacheSettings

    acme = TenantService(db).create_tenant("acme", "Acme", {}).id
    cache = ResponseCache(db, embedder_factory=Embedder, static=False,
                          settings=CacheSettings(hit_note_delay_s=60.0))
    try:
        cache.store_sync(cache.key_for(acme, "helpdesk", conv(Q), "simple"), answer_text="A.", model="m")
        for _ in range(5):
            assert (await cache.lookup(cache.key_for(acme, "helpdesk", conv(Q), "simple"))).kind == "exact"
        assert _hits(db, acme) == 0  # held by the writer, not written per hit
        assert cache.flush(30)  # ... until asked
        assert _hits(db, acme) == 5
        with db.tenant_tx(acme, write=False) as c:
            assert c.scalar("SELECT last_hit_at FROM cache_entries WHERE tenant_id = ?", (acme,)) is not None
    finally:
        cache.close()


async def test_held_hit_notes_are_written_after_the_delay_and_at_close(db):
    import asyncio

    from loadbear.gateway.cache import CacheSettings

    acme = TenantService(db).create_tenant("acme", "Acme", {}).id
    cache = ResponseCache(db, embedder_factory=Embedder, static=False, settings=CacheSettings(hit_note_delay_s=0.2))
    try:
        cache.store_sync(cache.key_for(acme, "helpdesk", conv(Q), "simple"), answer_text="A.", model="m")
        for _ in range(3):
            assert await cache.lookup(cache.key_for(acme, "helpdesk", conv(Q), "simple")) is not None
        for _ in range(100):
            if _hits(db, acme) == 3:
                break
            await asyncio.sleep(0.05)
        assert _hits(db, acme) == 3
    finally:
        cache.close()
    slow = ResponseCache(db, embedder_factory=Embedder, static=False, settings=CacheSettings(hit_note_delay_s=60.0))
    assert await slow.lookup(slow.key_for(acme, "helpdesk", conv(Q), "simple")) is not None
    slow.close()  # writes what it holds
    assert _hits(db, acme) == 4


@pg
def test_tenant_fetch_replaces_connections_the_server_dropped(pg_url):
    import psycopg

    db = open_database(pg_url, pool_size=2)
    try:
        acme = TenantService(db).create_tenant("acme", "Acme", {}).id
        assert db.tenant_fetch(acme, "SELECT 1 AS n") == [{"n": 1}]
        with psycopg.connect(pg_url, autocommit=True) as admin:  # a server restart, as the pool sees it
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert [str(r["id"]) for r in db.tenant_fetch(acme, "SELECT id FROM tenants")] == [acme]
    finally:
        db.close()
