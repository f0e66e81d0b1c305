"""The SQLite store's reduced first pass: a PCA projection of a large tenant's in-process matrix,
then exact re-scoring of the best candidates.

Vectors come from a synthetic distribution shaped like MiniLM's on real text (a power-law
spectrum, eigenvalue i ~ 1/i, with a mean direction and clusters), not a low-rank one: a
projection recovers a low-rank set exactly and would prove nothing.
"""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from loadbear.knowledge import store_sqlite
from loadbear.knowledge.embeddings import set_blas_threads
from loadbear.knowledge.store import KnowledgeStore
from loadbear.knowledge.store_sqlite import SEQ_IDS_SQL, _make_matrix, _top_k
from loadbear.knowledge.types import ChunkDraft
from loadbear.storage.db import open_database
from loadbear.storage.migrate import migrate

MODEL = "compact-test"
DIM = 64


def spectrum_vectors(n: int, seed: int, dim: int = DIM, clusters: int = 32) -> np.ndarray:
    g = np.random.default_rng(1234 + dim)  # the distribution (rotation, mean, clusters) is fixed per dim
    rot, _ = np.linalg.qr(g.standard_normal((dim, dim)))
    mean = g.standard_normal(dim)
    mean *= 0.36 / np.linalg.norm(mean)
    sd = np.sqrt(1.0 / np.arange(1, dim + 1))
    sd *= np.sqrt(0.87 / (sd ** 2).sum())
    centres = g.standard_normal((clusters, dim)) * sd * np.sqrt(0.5)
    rng = np.random.default_rng(seed)
    z = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)) * sd * np.sqrt(0.5)
    x = (mean + z @ rot.T).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def db(tmp_path):
    database = open_database(f"sqlite:///{tmp_path / 'kb.db'}")
    migrate(database)
    yield database
    database.close()


def make_tenants(db, n: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with db.system_tx() as c:
        c.executemany("INSERT INTO tenants (id, slug, name) VALUES (?, ?, ?)",
                      [(t, f"compact-{t[:8]}", t) for t in ids])
    return ids


def put(store, tenant, texts, vecs, external_id):
    chunks = [ChunkDraft(text=t, start=0, end=len(t), heading_path=[], token_count=1, ordinal=i)
              for i, t in enumerate(texts)]
    return store.upsert_document(tenant, title=external_id, external_id=external_id, chunks=chunks, vectors=vecs,
                                 embedding_model=MODEL)


def fill(store, tenant, vecs, prefix="d", per_doc=100):
    for i in range(0, len(vecs), per_doc):
        put(store, tenant, [f"{prefix}{j}" for j in range(i, min(len(vecs), i + per_doc))], vecs[i:i + per_doc],
            f"{prefix}-{i}")


def wait_for_refresh() -> None:
    for th in list(threading.enumerate()):
        if th.name == "loadbear-kb-cache":
            th.join(20)


def compact_store(db, **kw):
    # 4 x 40 candidates <= the tenants' 600+ rows: the projection pass is the one taken
    opts = dict(cache_min_chunks=100, compact_min_chunks=300, compact_dims=16, compact_candidates=40)
    opts.update(kw)
    return KnowledgeStore(db, **opts)


def texts_of(store, tenant, hits):
    return [c.text for c in store.get_chunks(tenant, [h for h, _ in hits])]


# -- the first pass on its own ------------------------------------------------------------------


def test_recall_at_10_on_20k_vectors_with_the_default_settings():
    # One BLAS thread, as the process runs once MiniLM has loaded: two threads spin against the
    # rest of a busy 2-core machine and made this test 3-7x slower in wall time.
    set_blas_threads(1)
    n = 20_000
    x = spectrum_vectors(n, 1, dim=384, clusters=256)
    m = _make_matrix(1, np.arange(n, dtype=np.int64), x.copy(), 20_000, None)
    assert m.proj_t is not None and m.proj_t.shape == (128, n) and m.proj_t.flags.c_contiguous
    assert m.basis.shape == (384, 128)
    assert np.allclose(m.basis.T @ m.basis, np.eye(128), atol=1e-4)
    recalls, exact_scores = [], True
    queries = spectrum_vectors(50, 2, dim=384, clusters=256)
    truth = np.argpartition(-(queries @ x.T), 10, axis=1)[:, :10]
    for q, true in zip(queries, truth):
        got = _top_k(m, q, 10)
        recalls.append(len({s for s, _ in got} & set(true.tolist())) / 10)
        # re-scored on the float32 rows: the scores are exact cosines, in descending order
        exact_scores &= np.allclose([s for _, s in got], x[[s for s, _ in got]] @ q, atol=1e-5)
        exact_scores &= all(a[1] >= b[1] for a, b in zip(got, got[1:]))
    assert exact_scores
    assert np.mean(recalls) >= 0.98, np.mean(recalls)


def test_small_matrices_and_large_k_use_the_exact_scan():
    x = spectrum_vectors(2_000, 3)
    small = _make_matrix(1, np.arange(2_000, dtype=np.int64), x.copy(), 5_000, 16)
    assert small.proj_t is None  # below compact_min_chunks
    big = _make_matrix(1, np.arange(2_000, dtype=np.int64), x.copy(), 1_000, 16)
    assert big.proj_t is not None
    for q in spectrum_vectors(5, 4):
        exact = [(int(i), float(x[i] @ q)) for i in np.argsort(-(x @ q), kind="stable")[:100]]
        # 8 x 100 candidates x 4 > 2,000 rows: the projection would not save anything
        got = _top_k(big, q, 100, candidates=10)
        assert [s for s, _ in got] == [s for s, _ in exact]
        assert np.allclose([v for _, v in got], [v for _, v in exact], atol=1e-5)


def test_compact_settings_are_validated(db):
    with pytest.raises(ValueError, match="compact_dims"):
        KnowledgeStore(db, compact_dims=0)
    with pytest.raises(ValueError, match="compact_candidates"):
        KnowledgeStore(db, compact_candidates=0)


def test_lookups_by_chunk_id_use_the_id_indexes_not_the_tenants(db):
    # With the tenant's index SQLite walked every chunk of the tenant to find 10 ids: 14 ms
    # (seq -> id after a vector search) and 80 ms (get_chunks) per query at 100k chunks.
    t, = make_tenants(db, 1)
    store = compact_store(db)
    fill(store, t, spectrum_vectors(200, 13))
    statements: list[str] = []
    conn = db._conn()
    conn.set_trace_callback(statements.append)
    try:
        hits = store.vector_search(t, spectrum_vectors(1, 14)[0], 5, embedding_model=MODEL)
        assert len(store.get_chunks(t, [h for h, _ in hits])) == 5
    finally:
        conn.set_trace_callback(None)
    lookups = [sql for sql in statements if "FROM chunks" in sql and "json_each" in sql]
    assert len(lookups) == 2 and SEQ_IDS_SQL.split("?")[0] in lookups[0]
    for sql in lookups:
        plan = " ".join(str(r[3]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall())
        assert "idx_chunks_tenant_model" not in plan and ("PRIMARY KEY" in plan or "autoindex_chunks" in plan), plan


# -- through the store ----------------------------------------------------------------------------


def test_small_tenant_results_are_identical_to_vec0(db):
    t, = make_tenants(db, 1)
    x = spectrum_vectors(250, 5)
    fast = compact_store(db)  # 250 rows: in-process matrix, below compact_min_chunks
    fill(fast, t, x)
    slow = KnowledgeStore(db, cache_min_chunks=10**9)
    for q in spectrum_vectors(10, 6):
        a = fast.vector_search(t, q, 10, embedding_model=MODEL)
        b = slow.vector_search(t, q, 10, embedding_model=MODEL)
        assert [h for h, _ in a] == [h for h, _ in b]
        assert np.allclose([s for _, s in a], [s for _, s in b], atol=1e-5)
    m = fast.cache.get((t, DIM, MODEL))
    assert m is not None and m.proj_t is None


def test_writes_and_deletes_are_visible_at_once_and_after_the_projection_is_rebuilt(db):
    t, = make_tenants(db, 1)
    store = compact_store(db)
    x = spectrum_vectors(600, 7)
    fill(store, t, x)
    q0 = spectrum_vectors(1, 8)[0]
    store.vector_search(t, q0, 10, embedding_model=MODEL)
    m = store.cache.get((t, DIM, MODEL))
    assert m is not None and m.proj_t is not None and m.proj_t.shape == (16, 600)

    # an added chunk is the best match of its own vector: at once (the stale copy is skipped) ...
    target = spectrum_vectors(1, 9)[0]
    put(store, t, ["brand new"], target[None, :], "new")
    assert texts_of(store, t, store.vector_search(t, target, 1, embedding_model=MODEL)) == ["brand new"]
    # ... and from the rebuilt copy, whose projection is refitted with the new row in it
    wait_for_refresh()
    assert texts_of(store, t, store.vector_search(t, target, 1, embedding_model=MODEL)) == ["brand new"]
    m2 = store.cache.get((t, DIM, MODEL))
    assert m2.version == int(store.kb_version(t)) and m2.proj_t.shape == (16, 601) and m2.basis is not m.basis

    # a deleted document's chunks never come back: not now, not from the rebuilt copy
    victim = 123  # in document d-100
    doc = next(d for d in store.list_documents(t, limit=100)[0] if d.external_id == "d-100")
    assert texts_of(store, t, store.vector_search(t, x[victim], 1, embedding_model=MODEL)) == [f"d{victim}"]
    assert store.delete_document(t, doc.id)
    for _ in range(2):
        hits = texts_of(store, t, store.vector_search(t, x[victim], 20, embedding_model=MODEL))
        assert len(hits) == 20 and not any(h.startswith("d1") and len(h) == 4 for h in hits), hits
        wait_for_refresh()
    m3 = store.cache.get((t, DIM, MODEL))
    assert m3.version == int(store.kb_version(t)) and m3.proj_t.shape == (16, 501)

    # a replaced document: the new text answers, the old chunk ids are gone
    put(store, t, ["replaced"], x[0][None, :], "d-0")
    for _ in range(2):
        got = texts_of(store, t, store.vector_search(t, x[0], 3, embedding_model=MODEL))
        assert got[0] == "replaced" and "d0" not in got
        wait_for_refresh()


def test_tenants_never_share_a_matrix_or_results(db):
    a, b = make_tenants(db, 2)
    store = compact_store(db)
    xa, xb = spectrum_vectors(500, 10), spectrum_vectors(500, 11)
    fill(store, a, xa, prefix="a")
    fill(store, b, xb, prefix="b")
    for q in xb[:10]:  # tenant b's own vectors, asked by tenant a
        hits = store.vector_search(a, q, 10, embedding_model=MODEL)
        assert len(hits) == 10 and all(h.startswith("a") for h in texts_of(store, a, hits))
        assert store.get_chunks(b, [h for h, _ in hits]) == []
    store.vector_search(b, xb[0], 10, embedding_model=MODEL)
    ma, mb = store.cache.get((a, DIM, MODEL)), store.cache.get((b, DIM, MODEL))
    assert ma.proj_t is not None and mb.proj_t is not None and ma.basis is not mb.basis
    with db.system_tx(write=False) as c:
        for tenant, m in ((a, ma), (b, mb)):
            seqs = {int(r[0]) for r in c.execute("SELECT seq FROM chunks WHERE tenant_id = ?", (tenant,)).fetchall()}
            assert set(m.seqs.tolist()) == seqs
    assert not set(ma.seqs.tolist()) & set(mb.seqs.tolist())


def test_the_load_copies_rows_in_batches(db, monkeypatch):
    # a tenant larger than one fetch batch: every row lands once, in the right place
    t, = make_tenants(db, 1)
    store = compact_store(db, compact_min_chunks=10**9)
    x = spectrum_vectors(700, 12)
    fill(store, t, x)
    monkeypatch.setattr(store_sqlite, "LOAD_BATCH", 64)
    with db.tenant_tx(t, write=False) as c:
        m = store._load_matrix(c, t, DIM, MODEL, 1)
        rows = {int(r[0]): int(str(r[1]).split("-")[1]) + int(r[2]) for r in c.execute(
            "SELECT c.seq, d.external_id, c.ordinal FROM chunks c JOIN documents d ON d.id = c.document_id"
            " WHERE c.tenant_id = ?", (t,)).fetchall()}
    assert len(rows) == 700 and m.rows.shape == (700, DIM) and sorted(m.seqs.tolist()) == sorted(rows)
    assert np.allclose(m.rows, x[[rows[int(s)] for s in m.seqs]], atol=1e-6)


def test_a_copy_too_big_with_its_projection_is_kept_without_it(db):
    t, = make_tenants(db, 1)
    x = spectrum_vectors(600, 15)
    rows_bytes = 600 * DIM * 4 + 600 * 8
    store = compact_store(db, cache_max_bytes=rows_bytes + 1_000)  # the 16-dim projection adds 38 kB
    fill(store, t, x)
    slow = KnowledgeStore(db, cache_min_chunks=10**9)
    q = spectrum_vectors(1, 16)[0]
    assert [h for h, _ in store.vector_search(t, q, 10, embedding_model=MODEL)] == \
        [h for h, _ in slow.vector_search(t, q, 10, embedding_model=MODEL)]
    m = store.cache.get((t, DIM, MODEL))
    assert m is not None and m.proj_t is None and m.basis is None and m.nbytes == rows_bytes
