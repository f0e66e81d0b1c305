"""0010_cache_exact_key: a database that ran 0008's cache tables keeps its entries, their keys and
documents, and gets the unique (tenant_id, exact_hash) key and the scope_hash index."""

from __future__ import annotations

import uuid

import pytest

from loadbear.storage.db import open_database
from loadbear.storage.migrate import applied, migrate
from loadbear.storage.values import db_time, utcnow


@pytest.fixture
def empty_db(empty_db_url: str):
    database = open_database(empty_db_url)
    yield database
    database.close()


def _index_defs(db, table: str) -> dict[str, str]:
    with db.system_tx(write=False) as c:
        if db.dialect == "sqlite":
            rows = c.fetchall("SELECT name, sql AS definition FROM sqlite_master WHERE type = 'index' AND tbl_name = ?",
                              (table,))
        else:
            rows = c.fetchall("SELECT indexname AS name, indexdef AS definition FROM pg_indexes WHERE tablename = ?",
                              (table,))
    return {r["name"]: r["definition"] or "" for r in rows}


def _unique_keys(db) -> set[tuple[str, ...]]:
    """The column lists of cache_entries' unique constraints."""
    with db.system_tx(write=False) as c:
        if db.dialect == "sqlite":
            out = set()
            for idx in c.fetchall("PRAGMA index_list(cache_entries)"):
                if idx["unique"] and idx["origin"] == "u":
                    out.add(tuple(r["name"] for r in c.fetchall(f"PRAGMA index_info({idx['name']})")))
            return out
        rows = c.fetchall(
            "SELECT con.conname, array_agg(a.attname::text ORDER BY k.ord) AS cols FROM pg_constraint con"
            " CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)"
            " JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum"
            " WHERE con.conrelid = 'cache_entries'::regclass AND con.contype = 'u' GROUP BY con.conname")
        return {tuple(r["cols"]) for r in rows}


def test_upgrade_from_0009_keeps_cache_entries_and_changes_the_keys(empty_db):
    db = empty_db
    d = db.dialect
    migrate(db, target=9)
    assert applied(db)[-1] == 9
    assert ("tenant_id", "scope_hash", "exact_hash") in _unique_keys(db)
    tenant, entry, doc = (str(uuid.uuid4()) for _ in range(3))
    now = utcnow()
    with db.system_tx() as c:
        c.execute("INSERT INTO tenants (id, slug, name) VALUES (?, ?, ?)", (tenant, "legacy", "Legacy"))
        c.execute(
            "INSERT INTO cache_entries (id, tenant_id, scope_hash, exact_hash, feature, tier, query_text, answer_text,"
            " model, prompt_tokens, completion_tokens, cost_micro_usd, grounded, embedding_model, embedding,"
            " hits, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (entry, tenant, "s" * 32, "e" * 32, "chat", "simple", "what is x?", "x is y.", "gpt-4o-mini", 12, 3, 9,
             True, "m", b"\x00\x00\x80\x3f", 4, db_time(d, now), db_time(d, now)))
        c.execute("INSERT INTO cache_keys (tenant_id, key, entry_id) VALUES (?, ?, ?)", (tenant, 42, entry))
        c.execute("INSERT INTO cache_entry_documents (entry_id, tenant_id, document_id, version) VALUES (?, ?, ?, ?)",
                  (entry, tenant, doc, 2))

    ran = migrate(db)
    assert 10 in ran and applied(db)[-1] >= 10

    with db.system_tx(write=False) as c:
        row = c.fetchone("SELECT * FROM cache_entries WHERE CAST(id AS TEXT) = ?", (entry,))
        assert (row["answer_text"], row["model"], row["hits"], row["prompt_tokens"], bytes(row["embedding"])) == (
            "x is y.", "gpt-4o-mini", 4, 12, b"\x00\x00\x80\x3f")
        assert c.scalar("SELECT key FROM cache_keys WHERE CAST(entry_id AS TEXT) = ?", (entry,)) == 42
        assert c.scalar("SELECT version FROM cache_entry_documents WHERE CAST(entry_id AS TEXT) = ?", (entry,)) == 2
        if d == "sqlite":
            assert c.fetchall("PRAGMA foreign_key_check") == []
    uniques = _unique_keys(db)
    assert ("tenant_id", "exact_hash") in uniques
    assert ("tenant_id", "scope_hash", "exact_hash") not in uniques
    scope_idx = _index_defs(db, "cache_entries")["idx_cache_entries_scope_created"]
    assert "(scope_hash, created_at)" in scope_idx and "tenant_id" not in scope_idx
    assert {"idx_cache_entries_expires"} <= set(_index_defs(db, "cache_entries"))
    assert {"idx_cache_keys_entry"} <= set(_index_defs(db, "cache_keys"))
    assert {"idx_cache_entry_documents_document"} <= set(_index_defs(db, "cache_entry_documents"))

    # The new key holds, and the children still cascade from their (rebuilt) parent.
    with pytest.raises(Exception):
        with db.system_tx() as c:
            c.execute(
                "INSERT INTO cache_entries (id, tenant_id, scope_hash, exact_hash, feature, query_text, answer_text,"
                " model, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (str(uuid.uuid4()), tenant, "t" * 32, "e" * 32, "chat", "q", "a", "m", db_time(d, now),
                 db_time(d, now)))
    with db.system_tx() as c:
        c.execute("DELETE FROM cache_entries WHERE CAST(id AS TEXT) = ?", (entry,))
        assert c.scalar("SELECT COUNT(*) FROM cache_keys") == 0
        assert c.scalar("SELECT COUNT(*) FROM cache_entry_documents") == 0
    if d == "postgres":
        with db.system_tx(write=False) as c:
            secured = {r["relname"]: r["relrowsecurity"] for r in c.fetchall(
                "SELECT relname, relrowsecurity FROM pg_class WHERE relname LIKE 'cache_%' AND relkind = 'r'")}
        assert secured == {"cache_entries": True, "cache_keys": True, "cache_entry_documents": True}
