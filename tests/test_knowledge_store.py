"""KnowledgeStore on both backends: documents, replacement, atomicity, deletion, isolation, search.

Vectors are deterministic synthetic unit vectors (seeded numpy); PostgreSQL-only tests at the end
prove top-k completeness under HNSW + tenant filtering and that RLS alone keeps tenants apart.
"""

from __future__ import annotations

import threading
import uuid
import zlib

import numpy as np
import pytest

from loadbear.knowledge.store import KnowledgeStore, fts_terms
from loadbear.knowledge.types import ChunkDraft, KnowledgeError

DIM = 384
MODEL = "test-model"


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def drafts(texts: list[str], headings: list[str] | None = None) -> list[ChunkDraft]:
    out, pos = [], 0
    for i, t in enumerate(texts):
        out.append(ChunkDraft(text=t, start=pos, end=pos + len(t), heading_path=list(headings or ["Guide", f"Part {i}"]),
                              token_count=len(t.split()), ordinal=i))
        pos += len(t) + 2
    return out


def make_tenants(db, n: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with db.system_tx() as c:
        for i, t in enumerate(ids):
            c.execute("INSERT INTO tenants (id, slug, name) VALUES (?, ?, ?)", (t, f"kb-tenant-{i}-{t[:6]}", f"T{i}"))
    return ids


@pytest.fixture
def store(db):
    return KnowledgeStore(db)


@pytest.fixture
def tenants(db):
    return make_tenants(db, 3)


def put(store, tenant, texts, vecs, *, external_id=None, title="Doc", metadata=None, model=MODEL):
    return store.upsert_document(tenant, title=title, char_count=sum(map(len, texts)), external_id=external_id,
                                 source_url="https://example.test/doc", metadata=metadata or {},
                                 content_type="text/markdown", chunks=drafts(texts), vectors=vecs,
                                 embedding_model=model)


def raw_counts(db, doc_id: str | None = None) -> dict[str, int]:
    """Rows in every knowledge structure, read as the owner (no RLS, no tenant filter)."""
    with db.system_tx(write=False) as c:
        out = {
            "documents": c.scalar("SELECT COUNT(*) FROM documents"),
            "chunks": c.scalar("SELECT COUNT(*) FROM chunks"),
            "chunk_vectors": c.scalar("SELECT COUNT(*) FROM chunk_vectors"),
        }
        if db.dialect == "sqlite":
            out["vec0"] = c.scalar("SELECT COUNT(*) FROM vec_chunks_384")
            out["fts"] = c.scalar("SELECT COUNT(*) FROM chunks_fts")
        if doc_id is not None:
            out["doc_chunks"] = c.scalar("SELECT COUNT(*) FROM chunks WHERE CAST(document_id AS TEXT) = ?", (doc_id,))
    return {k: int(v) for k, v in out.items()}


# -- documents ----------------------------------------------------------------------------------


def test_upsert_get_and_chunks_record_model_and_dim(store, tenants):
    rng = np.random.default_rng(1)
    t = tenants[0]
    doc = put(store, t, ["alpha text", "beta text", "gamma text"], unit(rng, 3), external_id="guide.md",
              title="Guide", metadata={"product": "billing", "tier": 2})
    assert doc.version == 1 and doc.chunk_count == 3 and doc.external_id == "guide.md"
    got = store.get_document(t, doc.id)
    assert got is not None
    assert (got.id, got.title, got.version, got.metadata, got.content_type, got.source_url) == (
        doc.id, "Guide", 1, {"product": "billing", "tier": 2}, "text/markdown", "https://example.test/doc")
    assert got.char_count == len("alpha text") + len("beta text") + len("gamma text")
    chunks = store.document_chunks(t, doc.id)
    assert [c.text for c in chunks] == ["alpha text", "beta text", "gamma text"]
    assert [c.ordinal for c in chunks] == [0, 1, 2]
    assert chunks[1].start == len("alpha text") + 2 and chunks[1].end == chunks[1].start + len("beta text")
    assert chunks[2].heading_path == ["Guide", "Part 2"]
    assert {(c.embedding_model, c.embedding_dim) for c in chunks} == {(MODEL, DIM)}
    assert {(c.document_title, c.source_url, c.document_version, c.external_id) for c in chunks} == {
        ("Guide", "https://example.test/doc", 1, "guide.md")}
    assert store.counts(t) == {"documents": 1, "chunks": 3}


def test_same_external_id_replaces_the_document(store, tenants, db):
    rng = np.random.default_rng(2)
    t, other = tenants[0], tenants[1]
    v1 = unit(rng, 3)
    d1 = put(store, t, ["obsoleteword one", "obsoleteword two", "obsoleteword three"], v1, external_id="faq")
    old_ids = [c.id for c in store.document_chunks(t, d1.id)]
    d_other = put(store, other, ["unrelated"], unit(rng, 1), external_id="faq")  # same external id, other tenant
    assert d_other.id != d1.id and d_other.version == 1

    v2 = unit(rng, 2)
    d2 = put(store, t, ["freshword one", "freshword two"], v2, external_id="faq", title="FAQ v2")
    assert d2.id == d1.id and d2.version == 2 and d2.chunk_count == 2
    assert store.get_document(t, d1.id).title == "FAQ v2"
    assert store.get_chunks(t, old_ids) == []
    new = store.document_chunks(t, d1.id)
    assert [c.text for c in new] == ["freshword one", "freshword two"] and {c.document_version for c in new} == {2}
    # the old chunks are gone from every structure
    assert store.keyword_search(t, "obsoleteword", 10) == []
    assert [c for c, _ in store.vector_search(t, v1[0], 10)] != [] and all(
        c not in old_ids for c, _ in store.vector_search(t, v1[0], 10))
    assert raw_counts(db, d1.id)["doc_chunks"] == 2
    counts = raw_counts(db)
    assert counts["chunks"] == counts["chunk_vectors"] == 3  # 2 + the other tenant's 1
    if db.dialect == "sqlite":
        assert counts["vec0"] == counts["fts"] == 3
    # the other tenant's document with the same external id is untouched
    assert store.get_document(other, d_other.id).version == 1
    assert store.document_chunks(other, d_other.id)[0].text == "unrelated"


def test_a_failed_replace_leaves_the_old_version_intact(store, tenants, db, monkeypatch):
    rng = np.random.default_rng(3)
    t = tenants[0]
    v1 = unit(rng, 2)
    d1 = put(store, t, ["keepme alpha", "keepme beta"], v1, external_id="policy")
    old_ids = [c.id for c in store.document_chunks(t, d1.id)]
    version_before = store.kb_version(t)
    before = raw_counts(db)

    real = type(store)._insert_chunks

    def half_then_fail(self, *a, **kw):
        real(self, *a, **kw)  # old chunks deleted, new ones written ... then the crash
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(store), "_insert_chunks", half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        put(store, t, ["replacement text"], unit(rng, 1), external_id="policy", title="New")
    monkeypatch.undo()

    doc = store.get_document(t, d1.id)
    assert doc.version == 1 and doc.title == "Doc" and doc.chunk_count == 2
    assert [c.id for c in store.get_chunks(t, old_ids)] == old_ids
    assert raw_counts(db) == before
    assert store.kb_version(t) == version_before
    assert {c for c, _ in store.keyword_search(t, "keepme", 10)} == set(old_ids)
    assert store.keyword_search(t, "replacement", 10) == []
    assert store.vector_search(t, v1[0], 1)[0][0] == old_ids[0]


def test_concurrent_replacements_of_one_document_serialise(store, tenants):
    t = tenants[0]
    rng = np.random.default_rng(4)
    vecs = [unit(rng, 3) for _ in range(6)]
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            put(store, t, [f"writer {i} part {j}" for j in range(3)], vecs[i], external_id="shared")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    docs, _ = store.list_documents(t)
    assert len(docs) == 1 and docs[0].version == 6
    texts = [c.text for c in store.document_chunks(t, docs[0].id)]
    assert len(texts) == 3 and len({x.split()[1] for x in texts}) == 1  # all chunks from one writer


def test_delete_removes_chunks_vectors_and_full_text(store, tenants, db):
    rng = np.random.default_rng(5)
    t = tenants[0]
    v = unit(rng, 3)
    keep = put(store, t, ["survivor text"], unit(rng, 1), external_id="keep")
    gone = put(store, t, ["doomed one", "doomed two", "doomed three"], v, external_id="gone")
    assert store.delete_document(t, gone.id) is True
    assert store.get_document(t, gone.id) is None
    assert store.document_chunks(t, gone.id) == []
    assert store.keyword_search(t, "doomed", 10) == []
    assert all(c != gone.id for c, _ in store.vector_search(t, v[0], 10))
    counts = raw_counts(db)
    assert counts["documents"] == 1 and counts["chunks"] == counts["chunk_vectors"] == 1
    if db.dialect == "sqlite":
        assert counts["vec0"] == counts["fts"] == 1
    assert store.delete_document(t, gone.id) is False
    assert store.get_document(t, keep.id) is not None
    assert store.counts(t) == {"documents": 1, "chunks": 1}


def test_another_tenants_ids_are_invisible(store, tenants):
    rng = np.random.default_rng(6)
    a, b = tenants[0], tenants[1]
    doc_b = put(store, b, ["tenant b secret"], unit(rng, 1), external_id="x")
    chunk_b = store.document_chunks(b, doc_b.id)[0].id
    assert store.get_document(a, doc_b.id) is None
    assert store.delete_document(a, doc_b.id) is False
    assert store.get_chunks(a, [chunk_b]) == []
    assert store.document_chunks(a, doc_b.id) == []
    assert store.get_document(b, doc_b.id) is not None  # untouched
    for bad in ["", "not-a-uuid", "1 OR 1=1", "'; DROP TABLE documents; --", "0" * 36, str(uuid.uuid4()), None, 42]:
        assert store.get_document(a, bad) is None
        assert store.delete_document(a, bad) is False
    assert store.get_chunks(a, ["nope", "'; --", chunk_b]) == []


def test_list_documents_pages_newest_first(store, tenants):
    rng = np.random.default_rng(7)
    a, b = tenants[0], tenants[1]
    made = [put(store, a, [f"doc {i}"], unit(rng, 1), external_id=f"d{i}") for i in range(5)]
    put(store, b, ["other"], unit(rng, 1))
    page1, cur = store.list_documents(a, limit=2)
    page2, cur2 = store.list_documents(a, limit=2, cursor=cur)
    page3, cur3 = store.list_documents(a, limit=2, cursor=cur2)
    # newest first by UUIDv7 id (millisecond clock): every document once, no page overlaps
    assert [d.id for d in page1 + page2 + page3] == sorted((d.id for d in made), reverse=True)
    assert cur3 is None and cur and cur2
    assert all(d.tenant_id == a for d in page1 + page2 + page3)
    with pytest.raises(KnowledgeError):
        store.list_documents(a, cursor="garbage")


def test_kb_version_changes_on_every_change_and_only_for_its_tenant(store, tenants):
    rng = np.random.default_rng(8)
    a, b = tenants[0], tenants[1]
    seen = [store.kb_version(a)]
    assert seen[0] == "0"
    d = put(store, a, ["v1"], unit(rng, 1), external_id="e")
    seen.append(store.kb_version(a))
    put(store, a, ["v2"], unit(rng, 1), external_id="e")
    seen.append(store.kb_version(a))
    put(store, a, ["another"], unit(rng, 1))
    seen.append(store.kb_version(a))
    b_before = store.kb_version(b)
    assert store.delete_document(b, d.id) is False  # b cannot delete a's document: nothing changes
    assert store.kb_version(a) == seen[-1] and store.kb_version(b) == b_before
    assert store.delete_document(a, d.id)
    seen.append(store.kb_version(a))
    assert len(set(seen)) == len(seen)
    assert store.kb_version(b) == b_before == "0"


def test_input_validation(store, tenants):
    rng = np.random.default_rng(9)
    t = tenants[0]
    with pytest.raises(KnowledgeError):
        put(store, t, ["a", "b"], unit(rng, 1))  # 2 chunks, 1 vector
    with pytest.raises(KnowledgeError):
        put(store, t, ["a"], np.zeros((1, DIM), dtype=np.float32))
    with pytest.raises(KnowledgeError):
        put(store, t, ["a"], np.full((1, DIM), np.nan, dtype=np.float32))
    with pytest.raises(KnowledgeError):
        put(store, t, ["a"], unit(rng, 1), model="")
    with pytest.raises(KnowledgeError):
        store.vector_search(t, np.zeros(DIM), 5)
    with pytest.raises(KnowledgeError):
        store.vector_search(t, unit(rng, 1)[0], 0)
    with pytest.raises(KnowledgeError):
        store.keyword_search(t, "x", 5, filters={"k": {"nested": 1}})
    assert store.counts(t) == {"documents": 0, "chunks": 0}


# -- search -----------------------------------------------------------------------------------


CANARIES = ["CANARY-ALPHA-7f3a", "CANARY-BRAVO-91bd", "CANARY-CHARLIE-2c44"]


@pytest.fixture
def seeded(store, tenants):
    """Three tenants, each with a canary document and ordinary documents; vectors per tenant."""
    rng = np.random.default_rng(10)
    vecs = {}
    for i, t in enumerate(tenants):
        v = unit(rng, 6)
        vecs[t] = v
        put(store, t, [f"the escalation code is {CANARIES[i]}", "refund policy within 14 days",
                       "shipping and delivery times"], v[:3], external_id="canary", title="Secrets")
        put(store, t, ["billing portal and invoices", "password reset steps", "api keys rotate"], v[3:],
            external_id="other", title="Help")
    return vecs


def test_searches_never_return_another_tenants_chunks(store, tenants, seeded):
    for i, t in enumerate(tenants):
        own = {c.id for d in store.list_documents(t)[0] for c in store.document_chunks(t, d.id)}
        assert len(own) == 6
        for other in tenants:
            for q in seeded[other]:  # even another tenant's exact vectors
                hits = store.vector_search(t, q, 10)
                assert hits and {c for c, _ in hits} <= own
            for j, canary in enumerate(CANARIES):
                kw = store.keyword_search(t, canary, 10)
                assert {c for c, _ in kw} <= own
                texts = " ".join(c.text for c in store.get_chunks(t, [c for c, _ in kw]))
                if j == i:
                    assert canary in texts
                else:
                    assert canary not in texts
        assert len(store.vector_search(t, seeded[t][0], 100)) == 6  # top-k never pads from others


def test_vector_search_is_exact_for_a_small_tenant(store, tenants):
    rng = np.random.default_rng(11)
    t = tenants[0]
    v = unit(rng, 300)
    for i in range(0, 300, 50):
        put(store, t, [f"chunk {j}" for j in range(i, i + 50)], v[i:i + 50], external_id=f"doc{i}")
    ids = {}
    for d in store.list_documents(t, limit=100)[0]:
        base = int(d.external_id[3:])
        for c in store.document_chunks(t, d.id):
            ids[c.id] = base + c.ordinal
    for q in unit(rng, 5):
        hits = store.vector_search(t, q, 10)
        truth = np.argsort(-(v @ q))[:10]
        assert [ids[c] for c, _ in hits] == truth.tolist()
        assert np.allclose([s for _, s in hits], (v @ q)[truth], atol=1e-4)


def test_metadata_filters_apply_inside_the_search(store, tenants):
    rng = np.random.default_rng(12)
    t, other = tenants[0], tenants[1]
    q = unit(rng, 1)[0]
    near = (q + 0.05 * unit(rng, 8)).astype(np.float32)  # the 8 nearest chunks are all "sales"
    far = unit(rng, 8)
    put(store, t, [f"sales pitch {i}" for i in range(8)], near, metadata={"product": "sales"}, external_id="s")
    put(store, t, [f"billing note {i}" for i in range(4)], far[:4], metadata={"product": "billing", "tier": 2},
        external_id="b1")
    put(store, t, [f"billing memo {i}" for i in range(4)], far[4:],
        metadata={"product": "billing", "tier": "2", "beta": True, "owner": None}, external_id="b2")
    put(store, other, ["billing of the other tenant"], unit(rng, 1), metadata={"product": "billing"})

    def texts(hits):
        return sorted(c.text for c in store.get_chunks(t, [c for c, _ in hits]))

    unfiltered = store.vector_search(t, q, 5)
    assert all(x.startswith("sales") for x in texts(unfiltered))
    billing = store.vector_search(t, q, 5, filters={"product": "billing"})
    assert len(billing) == 5 and all(x.startswith("billing") for x in texts(billing))  # k rows, not 0
    assert len(store.vector_search(t, q, 100, filters={"product": "billing"})) == 8
    assert texts(store.vector_search(t, q, 10, filters={"product": "billing", "tier": 2})) == [
        f"billing note {i}" for i in range(4)]
    assert texts(store.vector_search(t, q, 10, filters={"tier": "2"})) == [f"billing memo {i}" for i in range(4)]
    assert len(store.vector_search(t, q, 10, filters={"tier": [2, "2"]})) == 8
    assert len(store.vector_search(t, q, 10, filters={"beta": True})) == 4
    assert store.vector_search(t, q, 10, filters={"beta": False}) == []
    assert len(store.vector_search(t, q, 10, filters={"owner": None})) == 4
    assert store.vector_search(t, q, 10, filters={"product": "nope"}) == []
    assert store.vector_search(t, q, 10, filters={"missing": "x"}) == []
    kw = store.keyword_search(t, "billing sales", 20, filters={"product": "billing"})
    assert len(kw) == 8 and all(x.startswith("billing") for x in texts(kw))
    assert store.keyword_search(t, "billing", 20, filters={"product": "sales"}) == []


NASTY = [
    '"', '""', '"unbalanced', "'", "a AND", "OR OR OR", "NOT", "NEAR(a b)", "NEAR", "*", "a*", "-refund", "+refund",
    "refund -policy", "title:refund", "tenant_id:x", "text:refund", "(((", ")", "{refund}", "[x]", "^refund",
    "refund^2", "col:", ":", "\\", "%", "%_%", "?", "$1", "&&||!", "<->", "a <-> b", "!refund", "refund:*",
    "'; DROP TABLE chunks; --", "1=1", "\x00", "\u200b", "🔥 refund 🔥", "退款政策", "Ünïcödé réfund", "a" * 5000,
    " ".join(["refund"] * 500), "   ", "", "\n\t", "and or not the", 'refund" OR "1"="1',
]


def test_keyword_queries_are_sanitised(store, tenants, seeded):
    t = tenants[0]
    for q in NASTY:
        hits = store.keyword_search(t, q, 5)
        assert isinstance(hits, list), q
    assert store.keyword_search(t, "", 5) == [] and store.keyword_search(t, "the and of", 5) == []
    found = store.keyword_search(t, '"refund" -policy (days)', 5)
    assert found and "refund policy" in store.get_chunks(t, [found[0][0]])[0].text


def test_fts_terms():
    assert fts_terms('How do I "reset" my password?! (urgent)') == ["reset", "password", "urgent"]
    assert fts_terms("CANARY-ACME-7f3a") == ["canary", "acme", "7f3a"]
    assert fts_terms("the and of") == []
    assert fts_terms("x" * 65) == []
    assert len(fts_terms(" ".join(f"w{i}" for i in range(100)))) == 32


def test_keyword_search_ranks_title_and_text(store, tenants):
    rng = np.random.default_rng(13)
    t = tenants[0]
    put(store, t, ["how to rotate api keys safely", "unrelated paragraph about lunch"], unit(rng, 2), title="Security")
    hits = store.keyword_search(t, "rotate keys", 5)
    assert len(hits) == 1 and hits[0][1] > 0
    titled = store.keyword_search(t, "security", 5)  # the title is searchable for every chunk
    assert len(titled) == 2


# -- re-embedding and dimensions -----------------------------------------------------------------


def test_reembed_with_another_model_and_dimension(store, tenants, db):
    rng = np.random.default_rng(14)
    t, other = tenants[0], tenants[1]
    d = put(store, t, ["one", "two", "three"], unit(rng, 3), external_id="x")
    put(store, other, ["theirs"], unit(rng, 1))
    v_before = store.kb_version(t)
    todo = store.chunks_needing_embedding(t, "small-8")
    assert len(todo) == 3 and all(c.document_title == "Doc" for c in todo)
    new = unit(rng, 3, dim=8)
    assert store.replace_vectors(t, [c.id for c in todo], new, "small-8") == 3
    assert store.kb_version(t) != v_before
    assert store.chunks_needing_embedding(t, "small-8") == []
    chunks = store.document_chunks(t, d.id)
    assert {(c.embedding_model, c.embedding_dim) for c in chunks} == {("small-8", 8)}
    hits = store.vector_search(t, new[1], 3, embedding_model="small-8")
    assert hits[0][0] == todo[1].id
    assert store.vector_search(t, unit(rng, 1)[0], 3, embedding_model=MODEL) == []  # no 384-dim vectors left
    assert store.vector_search(t, new[0], 3, embedding_model="other-8") == []
    # another tenant's chunks cannot be re-embedded through this tenant
    theirs = store.chunks_needing_embedding(other, "small-8")
    assert store.replace_vectors(t, [c.id for c in theirs], unit(rng, 1, dim=8), "small-8") == 0
    assert store.chunks_needing_embedding(other, "small-8")[0].embedding_model == MODEL
    if db.dialect == "sqlite":
        assert raw_counts(db)["vec0"] == 1  # only the other tenant's 384-dim row is left in vec_chunks_384


class _FakeEmbedder:
    name = "fake-16"
    dim = 16

    def embed(self, texts):
        out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(16) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def test_store_reembed_loop(store, tenants):
    rng = np.random.default_rng(15)
    t = tenants[0]
    for i in range(3):
        put(store, t, [f"text {i} {j}" for j in range(5)], unit(rng, 5), external_id=f"d{i}")
    assert store.reembed(t, _FakeEmbedder(), batch_size=4) == 15
    assert store.reembed(t, _FakeEmbedder(), batch_size=4) == 0
    assert len(store.vector_search(t, unit(rng, 1, dim=16)[0], 20, embedding_model="fake-16")) == 15


def test_sqlite_in_process_matrix_matches_vec0_and_follows_writes(db, tenants):
    if db.dialect != "sqlite":
        pytest.skip("the in-process matrix is the SQLite store's")
    rng = np.random.default_rng(16)
    t = tenants[0]
    fast = KnowledgeStore(db, cache_min_chunks=10)
    slow = KnowledgeStore(db, cache_min_chunks=10**9)
    v = unit(rng, 60)
    for i in range(0, 60, 20):
        put(fast, t, [f"c{j}" for j in range(i, i + 20)], v[i:i + 20], external_id=f"d{i}")
    for q in unit(rng, 5):
        a = fast.vector_search(t, q, 10, embedding_model=MODEL)
        b = slow.vector_search(t, q, 10, embedding_model=MODEL)
        assert [x for x, _ in a] == [x for x, _ in b]
        assert np.allclose([s for _, s in a], [s for _, s in b], atol=1e-5)
    assert fast.cache.get((t, DIM, MODEL)) is not None
    # a new chunk is found at once (the stale copy is not used), then the copy catches up
    target = unit(rng, 1)
    put(fast, t, ["brand new"], target, external_id="new")
    hit = fast.vector_search(t, target[0], 1, embedding_model=MODEL)
    assert fast.get_chunks(t, [hit[0][0]])[0].text == "brand new"
    for th in list(threading.enumerate()):
        if th.name == "loadbear-kb-cache":
            th.join(10)
    m = fast.cache.get((t, DIM, MODEL))
    assert m is not None and int(fast.kb_version(t)) == m.version and m.rows.shape[0] == 61
    hit = fast.vector_search(t, target[0], 1, embedding_model=MODEL)
    assert fast.get_chunks(t, [hit[0][0]])[0].text == "brand new"


# -- PostgreSQL: HNSW + tenant filter, and RLS on its own ------------------------------------------


def _pg_bulk(db, store, tenants_sizes: dict[str, int], dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for t, n in tenants_sizes.items():
        v = unit(rng, n, dim)
        out[t] = v
        for i in range(0, n, 500):
            put(store, t, [f"row {j}" for j in range(i, min(n, i + 500))], v[i:i + 500], external_id=f"b{i}",
                model="m32")
    return out


@pytest.mark.postgres
def test_pg_top_k_is_complete_and_exact_for_small_and_large_tenants_among_many(db, backend):
    if backend != "postgres":
        pytest.skip("PostgreSQL only")
    from loadbear.knowledge.store_postgres import PgVector, tenant_index_name

    dim = 32
    ts = make_tenants(db, 9)
    small, big, rest = ts[0], ts[1], ts[2:]
    store = KnowledgeStore(db, exact_max=100, auto_index=False)
    vecs = _pg_bulk(db, store, {big: 1200, small: 30, **{t: 250 for t in rest}}, dim, 20)
    with db.system_tx() as c:
        c.execute("ANALYZE chunk_vectors")

    def ordinal_map(t):
        m = {}
        for d in store.list_documents(t, limit=100)[0]:
            for c in store.document_chunks(t, d.id):
                m[c.id] = int(d.external_id[1:]) + c.ordinal
        return m

    rng = np.random.default_rng(21)
    queries = unit(rng, 20, dim)
    small_ids, big_ids = ordinal_map(small), ordinal_map(big)

    def check(t, ids, min_recall):
        recall = []
        for q in queries:
            hits = store.vector_search(t, q, 10, embedding_model="m32")
            assert len(hits) == 10
            truth = np.argsort(-(vecs[t] @ q))[:10].tolist()
            got = [ids[c] for c, _ in hits]
            if min_recall == 1.0:
                assert got == truth  # exactly the exact answer, in order
            recall.append(len(set(truth) & set(got)) / 10)
        assert np.mean(recall) >= min_recall, recall

    check(small, small_ids, 1.0)
    assert store.last_path == "exact"
    check(big, big_ids, 1.0)  # past exact_max but no index of its own yet: still exact
    assert store.last_path == "exact"
    store.build_tenant_index(big, dim)
    with db.system_tx(write=False) as c:
        assert c.fetchone("SELECT 1 AS x FROM pg_indexes WHERE indexname = ?", (tenant_index_name(big, dim),))
    check(big, big_ids, 0.98)  # its own HNSW graph: recall@10 against exact search
    assert store.last_path == "hnsw"
    check(small, small_ids, 1.0)
    assert store.last_path == "exact"

    # Why not one table-wide index: filtered by a small tenant, an HNSW scan comes up short
    # without iterative scan, and needs it to return k rows at all (owner, SQL filter only).
    with db.system_tx() as c:
        c.execute("CREATE INDEX tmp_global_hnsw_32 ON chunk_vectors USING hnsw ((embedding::vector(32))"
                  " vector_cosine_ops) WHERE embedding_dim = 32")

    def raw(q, iterative: str) -> tuple[int, str]:
        with db.system_tx() as c:
            store._adapt(c)
            c.execute(f"SET LOCAL hnsw.iterative_scan = {iterative}; SET LOCAL hnsw.ef_search = 40;"
                      " SET LOCAL enable_sort = off; SET LOCAL jit = off")
            sql = ("SELECT chunk_id FROM chunk_vectors WHERE embedding_dim = 32 AND tenant_id::text = ?"
                   " ORDER BY embedding::vector(32) <=> ?::vector(32) LIMIT 10")
            plan = "\n".join(r[0] for r in c.execute("EXPLAIN " + sql, (small, PgVector(q))).fetchall())
            return len(c.execute(sql, (small, PgVector(q))).fetchall()), plan

    counts_off = [raw(q, "off") for q in queries[:5]]
    counts_on = [raw(q, "relaxed_order") for q in queries[:5]]
    assert all("tmp_global_hnsw_32" in plan for _, plan in counts_off + counts_on), counts_off[0][1]
    assert all(n < 10 for n, _ in counts_off)
    assert all(n == 10 for n, _ in counts_on)


@pytest.mark.postgres
def test_pg_tenant_index_is_built_in_the_background(db, backend):
    if backend != "postgres":
        pytest.skip("PostgreSQL only")
    from loadbear.knowledge.store_postgres import tenant_index_name

    (t,) = make_tenants(db, 1)
    store = KnowledgeStore(db, exact_max=40)
    rng = np.random.default_rng(22)
    v = unit(rng, 60, 16)
    put(store, t, [f"a{i}" for i in range(30)], v[:30], external_id="a", model="m16")
    store.wait_indexing(60)
    with db.system_tx(write=False) as c:
        assert not c.fetchone("SELECT 1 AS x FROM pg_indexes WHERE indexname = ?", (tenant_index_name(t, 16),))
    put(store, t, [f"b{i}" for i in range(30)], v[30:], external_id="b", model="m16")  # 60 > exact_max
    store.wait_indexing(120)
    with db.system_tx(write=False) as c:
        assert c.fetchone("SELECT 1 AS x FROM pg_indexes WHERE indexname = ?", (tenant_index_name(t, 16),))
    hits = store.vector_search(t, v[45], 5, embedding_model="m16")
    assert store.last_path == "hnsw" and len(hits) == 5
    assert store.get_chunks(t, [hits[0][0]])[0].text == "b15"


@pytest.mark.postgres
def test_pg_rls_alone_keeps_tenants_apart(db, backend, store, tenants, seeded):
    if backend != "postgres":
        pytest.skip("PostgreSQL only")
    from loadbear.knowledge.store_postgres import PgVector

    a, b, _ = tenants
    with db.system_tx(write=False) as c:
        owner = {str(r["id"]): str(r["tenant_id"]) for r in c.fetchall("SELECT id, tenant_id FROM chunks")}
    assert len(set(owner.values())) == 3
    q = seeded[b][0]  # b's own vector, searched from a's transaction
    with db.tenant_tx(a, write=False) as c:
        store._adapt(c)
        # the search SQL with the tenant predicate removed: exact, HNSW (iterative), keyword
        exact = c.execute("SELECT chunk_id FROM chunk_vectors ORDER BY embedding <=> ? LIMIT 50",
                          (PgVector(q),)).fetchall()
        c.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        hnsw = c.execute("SELECT chunk_id FROM chunk_vectors WHERE embedding_dim = 384"
                         " ORDER BY embedding::vector(384) <=> ?::vector(384) LIMIT 50", (PgVector(q),)).fetchall()
        kw = c.execute("SELECT id, text FROM chunks WHERE tsv @@ websearch_to_tsquery('english', ?)",
                       (" or ".join(["canary", "refund", "escalation"]),)).fetchall()
        docs = c.fetchall("SELECT tenant_id FROM documents")
        stats = c.fetchall("SELECT tenant_id FROM kb_vector_stats")
        state = c.fetchall("SELECT tenant_id FROM kb_state")
        joined = c.fetchall("SELECT c.text FROM chunks c JOIN documents d ON d.id = c.document_id")
    assert len(exact) == 6 and {owner[str(r[0])] for r in exact} == {a}
    assert len(hnsw) == 6 and {owner[str(r[0])] for r in hnsw} == {a}
    assert kw and {owner[str(r[0])] for r in kw} == {a}
    texts = " ".join(r[1] for r in kw) + " ".join(r["text"] for r in joined)
    assert CANARIES[0] in texts and CANARIES[1] not in texts and CANARIES[2] not in texts
    assert {str(r["tenant_id"]) for r in docs + stats + state} == {a}
    # writes under another tenant's id are refused by the policies' WITH CHECK
    import psycopg

    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        with db.tenant_tx(a) as c:
            c.execute("INSERT INTO documents (id, tenant_id, title) VALUES (?, ?, 'planted')", (str(uuid.uuid4()), b))
    # the keyword-search function (SECURITY DEFINER, for the GIN index) needs both tenants to agree
    terms = "canary or escalation or refund"
    with db.tenant_tx(a, write=False) as c:
        mine = c.fetchall("SELECT chunk_id FROM kb_keyword_search(?::uuid, ?, 50)", (a, terms))
        theirs = c.fetchall("SELECT chunk_id FROM kb_keyword_search(?::uuid, ?, 50)", (b, terms))
    assert mine and {owner[str(r["chunk_id"])] for r in mine} == {a} and theirs == []
    with db.app_tx(write=False) as c:
        assert c.fetchall("SELECT chunk_id FROM kb_keyword_search(?::uuid, ?, 50)", (a, terms)) == []
    # and with no tenant set, the application role sees nothing at all
    with db.app_tx(write=False) as c:
        assert c.scalar("SELECT COUNT(*) FROM chunks") == 0
        assert c.scalar("SELECT COUNT(*) FROM chunk_vectors") == 0
        assert c.scalar("SELECT COUNT(*) FROM documents") == 0
