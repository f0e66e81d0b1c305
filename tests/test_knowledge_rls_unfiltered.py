"""PostgreSQL: the knowledge base's own code, with every tenant filter cut out of its SQL.

The issue asks that row-level security alone keep tenants apart. Rather than hand-writing
queries that resemble the application's, this rewrites the SQL the store and service really
send: each ``tenant_id = ?`` becomes ``?::text IS NOT NULL`` (the parameter stays, the filter
goes) and the tenant literal of the HNSW query becomes ``TRUE``. Every attack then runs through
the real methods. A control run on the owner's connection (no RLS) shows the same rewritten SQL
does leak, so the test can fail.
"""

from __future__ import annotations

import re
import uuid

import numpy as np
import pytest

from loadbear.knowledge.service import KnowledgeService
from loadbear.knowledge.store import KnowledgeStore
from loadbear.knowledge.types import ChunkDraft, KnowledgeError
from loadbear.storage import db as dbmod

pytestmark = pytest.mark.postgres

DIM = 16
MODEL = "m16"
CANARY = {"a": "CANARY-ALPHA-5d1e", "b": "CANARY-BRAVO-0c9a"}
_PARAM_FILTER = re.compile(r"\b(?:\w+\.)?tenant_id\s*=\s*\?")
_LITERAL_FILTER = re.compile(r"\b(?:\w+\.)?tenant_id\s*=\s*'[0-9a-f-]{36}'::uuid")


@pytest.fixture
def unfiltered(monkeypatch):
    """Strip the tenant predicates from every statement; count how many were cut."""
    cut = {"n": 0}
    original = dbmod.Conn._sql

    def strip(self, sql: str) -> str:
        sql, n1 = _PARAM_FILTER.subn("?::text IS NOT NULL", sql)
        sql, n2 = _LITERAL_FILTER.subn("TRUE", sql)
        cut["n"] += n1 + n2
        return original(self, sql)

    monkeypatch.setattr(dbmod.Conn, "_sql", strip)
    return cut


def unit(rng, n):
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def put(store, tenant, texts, vecs, external_id):
    drafts, pos = [], 0
    for i, t in enumerate(texts):
        drafts.append(ChunkDraft(text=t, start=pos, end=pos + len(t), heading_path=["Policy"], token_count=5, ordinal=i))
        pos += len(t) + 2
    return store.upsert_document(tenant, title="Secrets", char_count=pos, external_id=external_id, metadata={"k": "v"},
                                 chunks=drafts, vectors=vecs, embedding_model=MODEL)


@pytest.fixture
def two(db, backend):
    if backend != "postgres":
        pytest.skip("row-level security is PostgreSQL's")
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    with db.system_tx() as c:
        for t in (a, b):
            c.execute("INSERT INTO tenants (id, slug, name) VALUES (?, ?, ?)", (t, f"rls-{t[:8]}", t[:8]))
    store = KnowledgeStore(db, exact_max=5, auto_index=False)
    rng = np.random.default_rng(5)
    vecs = {a: unit(rng, 8), b: unit(rng, 8)}
    docs = {}
    for t, key in ((a, "a"), (b, "b")):
        texts = [f"the escalation code is {CANARY[key]}", "refund policy within 14 days", "shipping times",
                 "password reset steps", "billing portal", "api keys rotate", "office hours", "data export"]
        docs[t] = put(store, t, texts, vecs[t], external_id="policies/secret.md")
    store.build_tenant_index(a, DIM)  # so A's searches take the HNSW path too
    return store, a, b, vecs, docs


def test_rls_alone_holds_with_the_tenant_filters_cut_from_the_store_sql(db, two, unfiltered):
    store, a, b, vecs, docs = two
    theirs = docs[b]
    their_chunks = [c.id for c in store.document_chunks(b, theirs.id)]
    assert len(their_chunks) == 8

    # reads by id, listing, counting
    assert store.get_document(a, theirs.id) is None
    assert store.document_chunks(a, theirs.id) == []
    assert store.get_chunks(a, their_chunks) == []
    listed, cursor = store.list_documents(a, limit=100)
    assert [d.id for d in listed] == [docs[a].id] and cursor is None
    assert store.counts(a) == {"documents": 1, "chunks": 8}
    assert {c.document_id for c in store.chunks_needing_embedding(a, "another-model")} == {docs[a].id}

    # searches with B's own vector and B's canary: exact, HNSW, keyword, filtered
    for exact_max in (1000, 5):
        store.exact_max = exact_max
        hits = store.vector_search(a, vecs[b][0], 50, embedding_model=MODEL)
        assert store.last_path == ("exact" if exact_max == 1000 else "hnsw")
        assert len(hits) == 8 and {c.document_id for c in store.get_chunks(a, [h[0] for h in hits])} == {docs[a].id}
        assert not set(h[0] for h in hits) & set(their_chunks)
    hits = store.vector_search(a, vecs[b][0], 50, filters={"k": "v"}, embedding_model=MODEL)
    assert hits and not set(h[0] for h in hits) & set(their_chunks)
    kw = store.keyword_search(a, f"escalation {CANARY['b']}", 50)
    assert kw and not set(h[0] for h in kw) & set(their_chunks)
    texts = " ".join(c.text for c in store.get_chunks(a, [h[0] for h in kw]))
    assert CANARY["a"] in texts and CANARY["b"] not in texts

    # writes: delete, re-embed and re-ingest aimed at B's rows change nothing of B's
    assert store.delete_document(a, theirs.id) is False
    assert store.replace_vectors(a, their_chunks, np.ones((8, DIM), np.float32), "hijack") == 0
    mine = put(store, a, ["acme replacement"], vecs[a][:1], external_id="policies/secret.md")
    assert mine.id == docs[a].id and mine.version == 2
    after = store.get_document(b, theirs.id)
    assert after is not None and after.version == 1 and after.chunk_count == 8
    assert {c.embedding_model for c in store.document_chunks(b, theirs.id)} == {MODEL}

    # ingestion jobs: B's job id is not found from A
    with db.tenant_tx(b) as c:
        job = str(uuid.uuid4())
        c.execute("INSERT INTO ingest_jobs (id, tenant_id, status, params, created_at, updated_at)"
                  " VALUES (?, ?, 'succeeded', '{}', now(), now())", (job, b))
    service = KnowledgeService(db, lambda: None)
    with pytest.raises(KnowledgeError) as err:
        service.get_job(a, job)
    assert err.value.status == 404
    assert service.get_job(b, job)["status"] == "succeeded"

    assert unfiltered["n"] > 30, "the tenant predicates were really cut"


def test_control_the_cut_sql_leaks_without_row_level_security(db, two, unfiltered, monkeypatch):
    """The same rewritten SQL on the owner's connection (which RLS does not bind) sees B's rows."""
    store, a, b, vecs, docs = two
    monkeypatch.setattr(db, "tenant_tx", lambda tenant_id, write=True: db.system_tx(write))
    assert store.get_document(a, docs[b].id) is not None
    assert {d.id for d in store.list_documents(a, limit=100)[0]} == {docs[a].id, docs[b].id}
    store.exact_max = 1000
    hits = store.vector_search(a, vecs[b][0], 50, embedding_model=MODEL)
    assert len(hits) == 16
