"""The knowledge store on SQLite: sqlite-vec ``vec0`` for vectors, FTS5 for keywords.

Layout (migration ``0003_knowledge``): ``chunks.seq`` is the rowid shared by a chunk's rows in
``chunk_vectors`` (float32 bytes, the source of truth), ``vec_chunks_<dim>`` (a ``vec0`` table
per dimension, created on demand for dimensions other than 384: the tenant as partition key,
cosine distance, the embedding model as an integer metadata column ``model_key``, a 64-bit
hash of its name) and ``chunks_fts`` (contentless FTS5 over text, headings and title, with the
tenant as a stored UNINDEXED column).

Vector search:

* with metadata filters: exact cosine over ``chunk_vectors`` of the matching documents;
* otherwise ``vec0`` KNN on the tenant's partition (exact too: sqlite-vec scans the partition);
* when the tenant has at least ``cache_min_chunks`` vectors of the query's model, an in-process
  copy of them (a float32 matrix, loaded from ``chunk_vectors``) is scanned with one BLAS
  matrix-vector product instead: several times faster than ``vec0`` at 100k chunks. The copy
  is tagged with the tenant's ``kb_state.version`` read in the same transaction as the search,
  so it is only used when nothing changed since it was loaded; a stale copy is reloaded in a
  background thread while queries fall back to ``vec0``. ``cache_max_bytes`` bounds the memory
  (least recently used copies are dropped).
* from ``compact_min_chunks`` vectors on, the copy also holds a PCA projection of its rows
  (``compact_dims``, a third of the dimension by default, fitted on the tenant's own vectors
  each time the copy is loaded, so it never outlives the rows it was fitted on). A query scans
  the projection first and re-scores the best ``compact_candidates`` rows exactly on the float32
  rows: the exact scan of 100k x 384 floats reads 150 MB per query and is memory-bound, the
  projection reads a third of that. This pass is approximate (recall@10 0.999–1.0 measured on
  MiniLM vectors of real text, see docs/benchmarks.md); every other path is exact.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from loadbear.knowledge.store import (
    KnowledgeStore,
    _check_filters,
    _check_k,
    _check_query_vector,
    _context,
    fts_terms,
)
from loadbear.knowledge.types import ChunkDraft, KnowledgeError
from loadbear.storage.db import Conn, Database
from loadbear.storage.values import dumps, uuid7

log = logging.getLogger("loadbear.knowledge")

VEC_CHUNK_SIZE = 128

LOAD_BATCH = 4096  # rows per fetch while loading a matrix

# "+tenant_id": without it SQLite walks the tenant's whole (tenant_id, ...) index instead of
# looking the seqs up by primary key: 14 ms per query at 100k chunks instead of ~0.1 ms.
SEQ_IDS_SQL = "SELECT seq, id FROM chunks WHERE +tenant_id = ? AND seq IN (SELECT value FROM json_each(?))"


def vec_table(dim: int) -> str:
    return f"vec_chunks_{int(dim)}"


def model_key(name: str) -> int:
    """The vec0 metadata value of an embedding model: a signed 64-bit hash of its name."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big", signed=True)


@dataclass
class _Matrix:
    version: int
    seqs: np.ndarray  # int64, one per row
    rows: np.ndarray  # float32, unit rows, C order: exact scans and re-scoring gather rows
    loaded_at: float
    # The reduced first pass (None below compact_min_chunks): an orthonormal PCA basis (dim x p)
    # and the rows projected on it, stored transposed (p x n) because OpenBLAS's sgemv streams
    # that layout about twice as fast as the row-major product here.
    basis: np.ndarray | None = None
    proj_t: np.ndarray | None = None
    explained: float = 1.0  # share of the variance the basis keeps (for the benchmark's report)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.proj_t is None else int(self.proj_t.nbytes + self.basis.nbytes)  # type: ignore[union-attr]
        return int(self.rows.nbytes + self.seqs.nbytes) + extra


class VectorCache:
    """In-process copies of large tenants' vectors, keyed by (tenant, dim, model), LRU-bounded."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: "OrderedDict[tuple, _Matrix]" = OrderedDict()
        self._lock = threading.Lock()
        self._loading: set[tuple] = set()

    def get(self, key: tuple) -> _Matrix | None:
        with self._lock:
            m = self._items.get(key)
            if m is not None:
                self._items.move_to_end(key)
            return m

    def put(self, key: tuple, m: _Matrix) -> None:
        if m.nbytes > self.max_bytes and m.proj_t is not None:
            # Rows that fit the budget only without their projection keep the exact scan rather
            # than fall back to vec0 for good.
            m = replace(m, basis=None, proj_t=None, explained=1.0)
        with self._lock:
            old = self._items.get(key)
            if old is not None and old.version > m.version:
                return
            self._items[key] = m
            self._items.move_to_end(key)
            total = sum(x.nbytes for x in self._items.values())
            while total > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                total -= dropped.nbytes
            if total > self.max_bytes:
                self._items.clear()

    def claim(self, key: tuple) -> bool:
        with self._lock:
            if key in self._loading:
                return False
            self._loading.add(key)
            return True

    def release(self, key: tuple) -> None:
        with self._lock:
            self._loading.discard(key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class SQLiteKnowledgeStore(KnowledgeStore):
    dialect = "sqlite"

    def __init__(self, db: Database, *, exact_max: int | None = None, cache_min_chunks: int = 5_000,
                 cache_max_bytes: int = 512 * 1024 * 1024, compact_min_chunks: int = 20_000,
                 compact_dims: int | None = None, compact_candidates: int = 1_000) -> None:
        super().__init__(db, exact_max=exact_max)
        if compact_dims is not None and (not isinstance(compact_dims, int) or compact_dims < 1):
            raise ValueError("compact_dims must be a positive integer or None")
        if not isinstance(compact_candidates, int) or compact_candidates < 1:
            raise ValueError("compact_candidates must be a positive integer")
        self.cache_min_chunks = cache_min_chunks
        self.cache = VectorCache(cache_max_bytes)
        # Below ~20k rows the exact scan costs about as much as projection + re-scoring.
        self.compact_min_chunks = compact_min_chunks
        self.compact_dims = compact_dims
        self.compact_candidates = compact_candidates

    # -- structure ----------------------------------------------------------------------

    def ensure_dimension(self, dim: int) -> None:
        dim = int(dim)
        if dim in self._dims:
            return
        with self.db.system_tx() as c:
            c.execute(
                f"CREATE VIRTUAL TABLE IF NOT EXISTS {vec_table(dim)} USING vec0("
                f"tenant_id text partition key, embedding float[{dim}] distance_metric=cosine,"
                f" model_key integer, chunk_size={VEC_CHUNK_SIZE})"
            )
        self._dims.add(dim)

    def _has_dim(self, c: Conn, dim: int) -> bool:
        if dim in self._dims:
            return True
        return c.fetchone("SELECT name FROM sqlite_master WHERE name = ?", (vec_table(dim),)) is not None

    # -- writes -------------------------------------------------------------------------

    def _insert_chunks(self, c: Conn, tenant_id: str, doc_id: str, version: int, title: str,
                       chunks: Sequence[ChunkDraft], vectors: np.ndarray, model: str, now: Any) -> None:
        dim = int(vectors.shape[1])
        base = int(c.scalar("SELECT COALESCE(MAX(seq), 0) FROM chunks"))
        created = self._t(now)
        mkey = model_key(model)
        chunk_rows, vector_rows, vec_rows, fts_rows = [], [], [], []
        for i, (ch, v) in enumerate(zip(chunks, vectors)):
            seq = base + 1 + i
            blob = v.tobytes()
            chunk_rows.append((seq, uuid7(), tenant_id, doc_id, version, i, ch.text, int(ch.start), int(ch.end),
                               dumps(list(ch.heading_path)), int(ch.token_count), model, dim, created))
            vector_rows.append((seq, tenant_id, doc_id, model, dim, blob))
            vec_rows.append((seq, tenant_id, blob, mkey))
            fts_rows.append((seq, ch.text, " / ".join(ch.heading_path), title, tenant_id))
        c.executemany(
            "INSERT INTO chunks (seq, id, tenant_id, document_id, document_version, ordinal, text, start_char,"
            " end_char, heading_path, token_count, embedding_model, embedding_dim, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", chunk_rows)
        c.executemany(
            "INSERT INTO chunk_vectors (chunk_seq, tenant_id, document_id, embedding_model, embedding_dim, embedding)"
            " VALUES (?, ?, ?, ?, ?, ?)", vector_rows)
        c.executemany(f"INSERT INTO {vec_table(dim)} (rowid, tenant_id, embedding, model_key) VALUES (?, ?, ?, ?)",
                      vec_rows)
        c.executemany("INSERT INTO chunks_fts (rowid, text, headings, title, tenant_id) VALUES (?, ?, ?, ?, ?)",
                      fts_rows)

    def _delete_chunks(self, c: Conn, tenant_id: str, doc_id: str) -> int:
        rows = c.fetchall("SELECT seq, embedding_model, embedding_dim FROM chunks WHERE tenant_id = ? AND document_id = ?",
                          (tenant_id, doc_id))
        if not rows:
            return 0
        groups: dict[tuple[str, int], list[int]] = {}
        for r in rows:
            groups.setdefault((r["embedding_model"], int(r["embedding_dim"])), []).append(int(r["seq"]))
        for (model, dim), seqs in groups.items():
            if self._has_dim(c, dim):
                c.executemany(f"DELETE FROM {vec_table(dim)} WHERE rowid = ?", [(s,) for s in seqs])
            self._add_stats(c, tenant_id, model, dim, -len(seqs))
        c.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(int(r["seq"]),) for r in rows])
        c.execute("DELETE FROM chunk_vectors WHERE tenant_id = ? AND document_id = ?", (tenant_id, doc_id))
        c.execute("DELETE FROM chunks WHERE tenant_id = ? AND document_id = ?", (tenant_id, doc_id))
        return len(rows)

    def _replace_vector_rows(self, c: Conn, tenant_id: str, rows: list[dict[str, Any]], vectors: np.ndarray,
                             model: str) -> None:
        dim = int(vectors.shape[1])
        seq_rows = c.fetchall(
            "SELECT seq, id, embedding_dim FROM chunks WHERE tenant_id = ? AND id IN (SELECT value FROM json_each(?))",
            (tenant_id, dumps([str(r["id"]) for r in rows])))
        seq_of = {str(r["id"]): (int(r["seq"]), int(r["embedding_dim"])) for r in seq_rows}
        for r, v in zip(rows, vectors):
            seq, old_dim = seq_of[str(r["id"])]
            blob = v.tobytes()
            if self._has_dim(c, old_dim):
                c.execute(f"DELETE FROM {vec_table(old_dim)} WHERE rowid = ?", (seq,))
            c.execute(f"INSERT INTO {vec_table(dim)} (rowid, tenant_id, embedding, model_key) VALUES (?, ?, ?, ?)",
                      (seq, tenant_id, blob, model_key(model)))
            c.execute("UPDATE chunk_vectors SET embedding_model = ?, embedding_dim = ?, embedding = ?"
                      " WHERE chunk_seq = ? AND tenant_id = ?", (model, dim, blob, seq, tenant_id))
            c.execute("UPDATE chunks SET embedding_model = ?, embedding_dim = ? WHERE seq = ? AND tenant_id = ?",
                      (model, dim, seq, tenant_id))

    # -- filters ------------------------------------------------------------------------

    def _doc_filter_sql(self, filters: list[tuple[str, list[Any]]]) -> tuple[str, list[Any]]:
        """Equality on top-level metadata keys (JSON types must agree: "1" is not 1)."""
        clauses, params = [], []
        for key, values in filters:
            alts, alt_params = [], []
            for v in values:
                if v is None:
                    alts.append("j.type = 'null'")
                elif v is True or v is False:
                    alts.append("j.type = ?")
                    alt_params.append("true" if v else "false")
                elif isinstance(v, (int, float)):
                    alts.append("(j.type IN ('integer', 'real') AND j.atom = ?)")
                    alt_params.append(v)
                else:
                    alts.append("(j.type = 'text' AND j.atom = ?)")
                    alt_params.append(v)
            clauses.append(f"EXISTS (SELECT 1 FROM json_each(d.metadata) j WHERE j.key = ? AND ({' OR '.join(alts)}))")
            params += [key, *alt_params]
        return " AND ".join(clauses) or "1", params

    def _ids_param_sql(self) -> str:
        return "c.id IN (SELECT value FROM json_each(?))"

    def _ids_param(self, ids: list[str]) -> Any:
        return dumps(ids)

    def _tenant_eq(self, column: str) -> str:
        # "+": with the tenant's index SQLite walked all of a 100k tenant's chunks to find 10 ids
        # (80 ms per get_chunks); the filter still applies, on the rows found by id.
        return f"+{column} = ?"

    def _seq_to_ids(self, c: Conn, tenant_id: str, scored: list[tuple[int, float]]) -> list[tuple[str, float]]:
        if not scored:
            return []
        rows = c.fetchall(SEQ_IDS_SQL, (tenant_id, dumps([s for s, _ in scored])))
        ids = {int(r["seq"]): str(r["id"]) for r in rows}
        return [(ids[s], score) for s, score in scored if s in ids]

    # -- search -------------------------------------------------------------------------

    def vector_search(self, tenant_id: str, query_vec: Any, k: int, filters: dict[str, Any] | None = None,
                      embedding_model: str | None = None) -> list[tuple[str, float]]:
        tenant_id = str(tenant_id)
        q = _check_query_vector(query_vec)
        k = _check_k(k)
        flt = _check_filters(filters)
        dim = int(q.shape[0])
        with self.db.tenant_tx(tenant_id, write=False) as c:
            if flt:
                docs, _ = self._matching_documents(c, tenant_id, flt)
                if not docs:
                    return []
                return self._seq_to_ids(c, tenant_id, self._exact(c, tenant_id, q, k, docs, embedding_model))
            if not self._has_dim(c, dim):
                return []
            n = self._vector_count(c, tenant_id, dim, embedding_model)
            if n == 0:
                return []
            if n >= self.cache_min_chunks:
                scored = self._cached_search(c, tenant_id, q, k, embedding_model)
                if scored is not None:
                    return self._seq_to_ids(c, tenant_id, scored)
            return self._seq_to_ids(c, tenant_id, self._vec0(c, tenant_id, q, k, embedding_model))

    def _vec0(self, c: Conn, tenant_id: str, q: np.ndarray, k: int, model: str | None) -> list[tuple[int, float]]:
        sql = (f"SELECT rowid, distance FROM {vec_table(q.shape[0])}"
               " WHERE embedding MATCH ? AND k = ? AND tenant_id = ?")
        params: list[Any] = [q.tobytes(), k, tenant_id]
        if model is not None:
            sql += " AND model_key = ?"
            params.append(model_key(model))
        rows = c.execute(sql, params).fetchall()
        return [(int(r[0]), 1.0 - float(r[1])) for r in rows]

    def _exact(self, c: Conn, tenant_id: str, q: np.ndarray, k: int, docs: list[str],
               model: str | None) -> list[tuple[int, float]]:
        sql = ("SELECT chunk_seq, vec_distance_cosine(embedding, ?) AS d FROM chunk_vectors"
               " WHERE tenant_id = ? AND embedding_dim = ? AND document_id IN (SELECT value FROM json_each(?))")
        params: list[Any] = [q.tobytes(), tenant_id, int(q.shape[0]), dumps(docs)]
        if model is not None:
            sql += " AND embedding_model = ?"
            params.append(model)
        sql += " ORDER BY d, chunk_seq LIMIT ?"
        params.append(k)
        return [(int(r[0]), 1.0 - float(r[1])) for r in c.execute(sql, params).fetchall()]

    # -- the in-process matrix ------------------------------------------------------------

    def _version(self, c: Conn, tenant_id: str) -> int:
        return int(c.scalar("SELECT version FROM kb_state WHERE tenant_id = ?", (tenant_id,)) or 0)

    def _cached_search(self, c: Conn, tenant_id: str, q: np.ndarray, k: int,
                       model: str | None) -> list[tuple[int, float]] | None:
        key = (tenant_id, int(q.shape[0]), model)
        version = self._version(c, tenant_id)
        m = self.cache.get(key)
        if m is None or m.version != version:
            if m is None:
                # First use: load now, in this transaction (its snapshot matches `version`).
                if not self.cache.claim(key):
                    return None
                try:
                    m = self._load_matrix(c, tenant_id, int(q.shape[0]), model, version)
                    self.cache.put(key, m)
                finally:
                    self.cache.release(key)
            else:
                self._refresh_later(key)
                return None
        return _top_k(m, q, k, self.compact_candidates)

    def _load_matrix(self, c: Conn, tenant_id: str, dim: int, model: str | None, version: int) -> _Matrix:
        where = "WHERE tenant_id = ? AND embedding_dim = ?"
        params: list[Any] = [tenant_id, dim]
        if model is not None:
            where += " AND embedding_model = ?"
            params.append(model)
        # The count and the rows come from one read transaction (one snapshot), so the rows are
        # copied straight into a preallocated matrix: joining every blob first tripled the peak
        # memory of a load (580 MB of RSS for a 150 MB matrix at 100k chunks).
        n = int(c.scalar(f"SELECT COUNT(*) FROM chunk_vectors {where}", params))
        seqs = np.empty(n, dtype=np.int64)
        mat = np.empty((n, dim), dtype=np.float32)
        cur = c.execute(f"SELECT chunk_seq, embedding FROM chunk_vectors {where}", params)
        i = 0
        while i < n:
            batch = cur.fetchmany(LOAD_BATCH)
            if not batch:
                break
            j = min(n, i + len(batch))
            batch = batch[: j - i]
            seqs[i:j] = [r[0] for r in batch]
            mat[i:j] = np.frombuffer(b"".join(r[1] for r in batch), dtype=np.float32).reshape(len(batch), dim)
            i = j
        cur.close()
        return _make_matrix(version, seqs[:i], mat[:i], self.compact_min_chunks, self.compact_dims)

    def _refresh_later(self, key: tuple) -> None:
        if not self.cache.claim(key):
            return

        def run() -> None:
            tenant_id, dim, model = key
            try:
                with self.db.tenant_tx(tenant_id, write=False) as c:
                    version = self._version(c, tenant_id)
                    self.cache.put(key, self._load_matrix(c, tenant_id, dim, model, version))
            except Exception:  # the next query retries; vec0 keeps answering meanwhile
                log.exception("reloading the vector cache of tenant %s failed", tenant_id)
            finally:
                self.cache.release(key)

        threading.Thread(target=run, name="loadbear-kb-cache", daemon=True).start()

    # -- keywords -----------------------------------------------------------------------

    def keyword_search(self, tenant_id: str, query: str, k: int,
                       filters: dict[str, Any] | None = None) -> list[tuple[str, float]]:
        tenant_id = str(tenant_id)
        k = _check_k(k)
        flt = _check_filters(filters)
        terms = fts_terms(query)
        if not terms:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        with self.db.tenant_tx(tenant_id, write=False) as c:
            sql = ("SELECT f.rowid, bm25(chunks_fts, 1.0, 2.0, 2.0) AS s FROM chunks_fts f"
                   " WHERE chunks_fts MATCH ? AND f.tenant_id = ?")
            params: list[Any] = [match, tenant_id]
            if flt:
                docs, _ = self._matching_documents(c, tenant_id, flt)
                if not docs:
                    return []
                sql += (" AND f.rowid IN (SELECT seq FROM chunks WHERE tenant_id = ?"
                        " AND document_id IN (SELECT value FROM json_each(?)))")
                params += [tenant_id, dumps(docs)]
            sql += " ORDER BY s, f.rowid LIMIT ?"
            params.append(k)
            try:
                rows = c.execute(sql, params).fetchall()
            except Exception as exc:  # pragma: no cover - the terms are quoted words; never expected
                raise KnowledgeError(f"keyword search failed: {exc}", code="invalid_query", param="query") from None
            return self._seq_to_ids(c, tenant_id, [(int(r[0]), -float(r[1])) for r in rows])


def _make_matrix(version: int, seqs: np.ndarray, mat: np.ndarray, compact_min_chunks: int,
                 compact_dims: int | None) -> _Matrix:
    """Normalise the rows in place and add the projection when there are enough of them."""
    # einsum, not np.linalg.norm: that squares the whole matrix into a temporary first (+150 MB)
    norms = np.sqrt(np.einsum("ij,ij->i", mat, mat))[:, None]
    mat /= np.where(norms == 0, np.float32(1), norms)
    m = _Matrix(version=version, seqs=seqs, rows=mat, loaded_at=time.monotonic())
    n, dim = mat.shape
    p = compact_dims or _default_compact_dims(dim)
    if n >= max(compact_min_chunks, 1) and p < dim:
        m.basis, m.explained = _fit_pca(mat, p)
        m.proj_t = np.dot(m.basis.T, mat.T)  # (p, n), C order
    return m


def _default_compact_dims(dim: int) -> int:
    """A third of the dimension, in multiples of 8 (128 for MiniLM's 384)."""
    return max(8, -(-dim // 24) * 8)


PCA_SAMPLE = 20_000


def _fit_pca(rows: np.ndarray, p: int) -> tuple[np.ndarray, float]:
    """The top ``p`` principal directions of the rows (dim x p, orthonormal columns) and their share of variance.

    Fitted on up to PCA_SAMPLE evenly spaced rows (the covariance of 20k rows is as good as
    that of 100k for ranking, at a fifth of the cost of a reload).
    """
    n = rows.shape[0]
    sample = rows[:: max(1, n // PCA_SAMPLE)]
    centred = sample - sample.mean(axis=0, dtype=np.float64).astype(np.float32)
    cov = (centred.T @ centred).astype(np.float64)
    vals, vecs = np.linalg.eigh(cov)  # ascending
    top = vecs[:, ::-1][:, :p]
    total = float(vals.sum())
    explained = float(vals[::-1][:p].sum() / total) if total > 0 else 1.0
    return np.ascontiguousarray(top, dtype=np.float32), explained


def _top_k(m: _Matrix, q: np.ndarray, k: int, candidates: int = 1_000) -> list[tuple[int, float]]:
    n = m.rows.shape[0]
    if n == 0:
        return []
    k = min(k, n)
    c = max(candidates, 8 * k)
    if m.proj_t is not None and 4 * c <= n:
        # First pass on the projection (q's constant part along the mean does not change the
        # order, so the rows need no centring), then exact scores for the candidates only.
        approx = (q @ m.basis) @ m.proj_t
        cand = np.argpartition(approx, n - c)[n - c:]
        sims = m.rows[cand] @ q
        seqs = m.seqs[cand]
    else:
        sims = m.rows @ q
        seqs = m.seqs
    nc = sims.shape[0]
    idx = np.argpartition(sims, nc - k)[nc - k:] if k < nc else np.arange(nc)
    idx = idx[np.lexsort((seqs[idx], -sims[idx]))]
    return [(int(seqs[i]), float(sims[i])) for i in idx]
