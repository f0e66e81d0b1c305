"""The knowledge store on PostgreSQL: pgvector (HNSW) for vectors, tsvector + GIN for keywords.

Layout (migration ``0003_knowledge``): ``chunk_vectors`` holds one unconstrained ``vector``
per chunk with its model and dimension (several models and dimensions coexist while a tenant
re-embeds). ``chunks.tsv`` is a generated tsvector of the title and headings (weight A) and the
text (weight B), indexed by GIN together with the tenant (btree_gin).

Vector search and the tenant filter. An HNSW graph over the *whole* table answers "nearest
rows of any tenant"; the tenant filter runs after the graph walk, so a filtered top-k comes
back short or with worse neighbours for any tenant that is a small part of the table.
pgvector 0.8's iterative scan fixes the count but not the quality: measured here with 1M
chunks, a 100k-chunk tenant (10% of rows) got recall@10 0.92-0.94 at ef_search 40-200 and a
10k-chunk tenant (1%) 0.97 at 160-240 ms, some queries with none of the true neighbours.
So each tenant is searched on its own:

* up to ``exact_max`` candidate chunks (the tenant's chunks of the query's model, from
  ``kb_vector_stats``, or the chunks of the documents matching the filters): exact search, a
  btree scan on the tenant with the distance computed per row (the expression cannot match an
  HNSW index); recall 1.0;
* above it, the tenant's **own** HNSW index, a partial index
  ``... USING hnsw ((embedding::vector(d)) vector_cosine_ops) WHERE tenant_id = '<id>' AND
  embedding_dim = d`` (``halfvec`` above 2000 dims, none above 4000). It is built in the
  background (``CREATE INDEX CONCURRENTLY``, one builder per index across processes through
  an advisory lock) when a write takes the tenant past ``exact_max``, or by
  :meth:`PostgresKnowledgeStore.build_tenant_index`; until it is valid the tenant is searched
  exactly. The query names the tenant as a literal (a validated UUID) so the planner can prove
  the partial predicate, forbids the sort plan, and runs with ``hnsw.iterative_scan =
  relaxed_order`` (model and document filters still apply inside the scan) and ``ef_search``
  raised; rows are re-sorted by exact distance afterwards;
* if the index still returns fewer rows than the candidate set could supply, the query is
  answered exactly instead: top-k is always k when the tenant has k matching chunks.

Many large tenants mean many partial indexes on one table: each INSERT checks every partial
predicate and the planner tests them per query, which is cheap for dozens to hundreds of
indexes; past that, hash-partitioning ``chunk_vectors`` by tenant is the next step.

Every search runs in ``tenant_tx``: row-level security applies under the SQL filters.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import uuid
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
from loadbear.knowledge.types import ChunkDraft
from loadbear.storage.db import Conn, Database
from loadbear.storage.values import dumps, uuid7

log = logging.getLogger("loadbear.knowledge")

MAX_VECTOR_INDEX_DIM = 2000  # pgvector's HNSW limit for vector
MAX_HALFVEC_INDEX_DIM = 4000  # and for halfvec
INDEX_RECHECK_S = 30.0  # how long "this tenant has no index yet" is believed


class PgVector:
    """A float32 array sent to PostgreSQL as a pgvector ``vector`` in binary form."""

    __slots__ = ("a",)

    def __init__(self, a: np.ndarray) -> None:
        self.a = a


def _vector_dumper(oid: int) -> type:
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class VectorDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj: PgVector) -> bytes:
            a = obj.a
            return struct.pack(">HH", a.shape[0], 0) + a.astype(">f4", copy=False).tobytes()

    VectorDumper.oid = oid
    return VectorDumper


def index_cast(dim: int) -> str | None:
    """The type an HNSW index over this dimension casts to, or None when none can index it."""
    if dim <= MAX_VECTOR_INDEX_DIM:
        return f"vector({dim})"
    if dim <= MAX_HALFVEC_INDEX_DIM:
        return f"halfvec({dim})"
    return None


def tenant_index_name(tenant_id: str, dim: int) -> str:
    return f"idx_cv_hnsw_{int(dim)}_{uuid.UUID(str(tenant_id)).hex}"


def tenant_index_sql(tenant_id: str, dim: int, concurrently: bool = True) -> str:
    cast = index_cast(dim)
    if cast is None:
        raise ValueError(f"no HNSW index for {dim} dimensions")
    ops = "vector_cosine_ops" if cast.startswith("vector") else "halfvec_cosine_ops"
    tid = uuid.UUID(str(tenant_id))  # validated: it is written into the SQL as a literal
    return (f"CREATE INDEX {'CONCURRENTLY ' if concurrently else ''}IF NOT EXISTS {tenant_index_name(tid, dim)}"
            f" ON chunk_vectors USING hnsw ((embedding::{cast}) {ops}) WITH (m = 16, ef_construction = 128)"
            f" WHERE tenant_id = '{tid}'::uuid AND embedding_dim = {int(dim)}")


class PostgresKnowledgeStore(KnowledgeStore):
    dialect = "postgres"

    exact_max = 5_000

    def __init__(self, db: Database, *, exact_max: int | None = None, ef_search: int = 200,
                 max_scan_tuples: int = 40_000, auto_index: bool = True,
                 index_maintenance_work_mem: str = "1GB") -> None:
        super().__init__(db, exact_max=exact_max)
        self.ef_search = ef_search
        self.max_scan_tuples = max_scan_tuples
        self.auto_index = auto_index
        self.index_maintenance_work_mem = index_maintenance_work_mem
        self.last_path = ""  # "exact", "hnsw" or "hnsw+exact" (the index came up short): for tests and benches
        self._dumper: type | None = None
        self._has_index: dict[tuple[str, int], float] = {}  # (tenant, dim) -> when a missing index was seen (0: valid)
        self._building: set[tuple[str, int]] = set()
        self._builders: list[threading.Thread] = []
        self._lock = threading.Lock()

    # -- adapters and structure -------------------------------------------------------

    def _adapt(self, c: Conn) -> None:
        if self._dumper is None:
            oid = c.scalar("SELECT 'vector'::regtype::oid")
            self._dumper = _vector_dumper(int(oid))
        c.raw.adapters.register_dumper(PgVector, self._dumper)

    def ensure_dimension(self, dim: int) -> None:
        # Nothing to create per dimension: HNSW indexes are per tenant (and dimension).
        self._dims.add(int(dim))

    def _index_ready(self, c: Conn, tenant_id: str, dim: int) -> bool:
        key = (tenant_id, dim)
        seen = self._has_index.get(key)
        if seen == 0.0:
            return True
        if seen is not None and time.monotonic() - seen < INDEX_RECHECK_S:
            return False
        ok = c.fetchone(
            "SELECT 1 AS x FROM pg_class i JOIN pg_index x ON x.indexrelid = i.oid"
            " WHERE i.relname = ? AND x.indisvalid AND x.indisready", (tenant_index_name(tenant_id, dim),))
        self._has_index[key] = 0.0 if ok else time.monotonic()
        return bool(ok)

    def build_tenant_index(self, tenant_id: str, dim: int = 384, *, concurrently: bool = True) -> float:
        """Build the tenant's HNSW index for ``dim`` now (idempotent); returns the seconds it took.

        Runs as the owner on a connection of its own (``CREATE INDEX CONCURRENTLY`` cannot run
        in a transaction), under an advisory lock so that one process builds it; an invalid
        leftover of an interrupted build is dropped first.
        """
        import psycopg

        name = tenant_index_name(tenant_id, dim)
        t0 = time.perf_counter()
        with psycopg.connect(self.db.url, autocommit=True) as conn:  # type: ignore[attr-defined]
            conn.execute(f"SET maintenance_work_mem = '{self.index_maintenance_work_mem}'")
            conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (name,))
            try:
                row = conn.execute("SELECT x.indisvalid FROM pg_class i JOIN pg_index x ON x.indexrelid = i.oid"
                                   " WHERE i.relname = %s", (name,)).fetchone()
                if row is not None and not row[0]:
                    conn.execute(f"DROP INDEX {'CONCURRENTLY ' if concurrently else ''}IF EXISTS {name}")
                conn.execute(tenant_index_sql(tenant_id, dim, concurrently))
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (name,))
        self._has_index.pop((str(tenant_id), int(dim)), None)
        return time.perf_counter() - t0

    def _maybe_index(self, tenant_id: str, dim: int, n: int) -> None:
        """Start building the tenant's index in the background once it passes exact_max."""
        if not self.auto_index or n <= self.exact_max or index_cast(dim) is None:
            return
        key = (tenant_id, dim)
        with self._lock:
            if key in self._building or self._has_index.get(key) == 0.0:
                return
            self._building.add(key)

        def run() -> None:
            try:
                self.build_tenant_index(tenant_id, dim)
            except Exception:  # searches stay exact meanwhile; the next write retries
                log.exception("building the HNSW index of tenant %s (%d dims) failed", tenant_id, dim)
            finally:
                with self._lock:
                    self._building.discard(key)

        th = threading.Thread(target=run, name="loadbear-kb-index", daemon=True)
        with self._lock:
            self._builders = [b for b in self._builders if b.is_alive()] + [th]
        th.start()

    def wait_indexing(self, timeout: float | None = None) -> None:
        """Block until background index builds started by this store have finished."""
        with self._lock:
            builders = list(self._builders)
        for th in builders:
            th.join(timeout)

    # -- writes -------------------------------------------------------------------------

    def upsert_document(self, tenant_id: str, **kwargs: Any) -> Any:  # type: ignore[override]
        doc = super().upsert_document(tenant_id, **kwargs)
        self._after_write(str(tenant_id))
        return doc

    def replace_vectors(self, tenant_id: str, chunk_ids: Sequence[str], vectors: Any, embedding_model: str) -> int:
        n = super().replace_vectors(tenant_id, chunk_ids, vectors, embedding_model)
        self._after_write(str(tenant_id))
        return n

    def _after_write(self, tenant_id: str) -> None:
        if not self.auto_index:
            return
        with self.db.tenant_tx(tenant_id, write=False) as c:
            rows = c.fetchall("SELECT embedding_dim, SUM(chunk_count) AS n FROM kb_vector_stats WHERE tenant_id = ?"
                              " GROUP BY embedding_dim", (tenant_id,))
        for r in rows:
            self._maybe_index(tenant_id, int(r["embedding_dim"]), int(r["n"] or 0))

    def _insert_chunks(self, c: Conn, tenant_id: str, doc_id: str, version: int, title: str,
                       chunks: Sequence[ChunkDraft], vectors: np.ndarray, model: str, now: Any) -> None:
        self._adapt(c)
        dim = int(vectors.shape[1])
        chunk_rows, vector_rows = [], []
        for i, (ch, v) in enumerate(zip(chunks, vectors)):
            cid = uuid7()
            chunk_rows.append((cid, tenant_id, doc_id, version, i, ch.text, int(ch.start), int(ch.end),
                               dumps(list(ch.heading_path)), int(ch.token_count), model, dim,
                               _context(title, ch.heading_path), now))
            vector_rows.append((cid, tenant_id, doc_id, model, dim, PgVector(v)))
        c.executemany(
            "INSERT INTO chunks (id, tenant_id, document_id, document_version, ordinal, text, start_char, end_char,"
            " heading_path, token_count, embedding_model, embedding_dim, search_context, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", chunk_rows)
        c.executemany(
            "INSERT INTO chunk_vectors (chunk_id, tenant_id, document_id, embedding_model, embedding_dim, embedding)"
            " VALUES (?, ?, ?, ?, ?, ?)", vector_rows)

    def _delete_chunks(self, c: Conn, tenant_id: str, doc_id: str) -> int:
        groups = c.fetchall(
            "SELECT embedding_model, embedding_dim, COUNT(*) AS n FROM chunks WHERE tenant_id = ? AND document_id = ?"
            " GROUP BY embedding_model, embedding_dim", (tenant_id, doc_id))
        if not groups:
            return 0
        c.execute("DELETE FROM chunk_vectors WHERE tenant_id = ? AND document_id = ?", (tenant_id, doc_id))
        c.execute("DELETE FROM chunks WHERE tenant_id = ? AND document_id = ?", (tenant_id, doc_id))
        for g in groups:
            self._add_stats(c, tenant_id, g["embedding_model"], int(g["embedding_dim"]), -int(g["n"]))
        return sum(int(g["n"]) for g in groups)

    def _replace_vector_rows(self, c: Conn, tenant_id: str, rows: list[dict[str, Any]], vectors: np.ndarray,
                             model: str) -> None:
        self._adapt(c)
        dim = int(vectors.shape[1])
        c.executemany(
            "UPDATE chunk_vectors SET embedding_model = ?, embedding_dim = ?, embedding = ?"
            " WHERE chunk_id = ? AND tenant_id = ?",
            [(model, dim, PgVector(v), str(r["id"]), tenant_id) for r, v in zip(rows, vectors)])
        c.executemany(
            "UPDATE chunks SET embedding_model = ?, embedding_dim = ? WHERE id = ? AND tenant_id = ?",
            [(model, dim, str(r["id"]), tenant_id) for r in rows])

    # -- filters ------------------------------------------------------------------------

    def _doc_filter_sql(self, filters: list[tuple[str, list[Any]]]) -> tuple[str, list[Any]]:
        """Equality on top-level metadata keys (JSON types must agree: "1" is not 1)."""
        clauses, params = [], []
        for key, values in filters:
            alts = []
            for v in values:
                alts.append("d.metadata -> ? = ?::jsonb")
                params += [key, dumps(v)]
            clauses.append("(" + " OR ".join(alts) + ")")
        return " AND ".join(clauses) or "TRUE", params

    def _ids_param_sql(self) -> str:
        return "c.id = ANY(?::uuid[])"

    def _ids_param(self, ids: list[str]) -> Any:
        return list(ids)

    # -- search -------------------------------------------------------------------------

    def vector_search(self, tenant_id: str, query_vec: Any, k: int, filters: dict[str, Any] | None = None,
                      embedding_model: str | None = None) -> list[tuple[str, float]]:
        tenant_id = str(tenant_id)
        q = _check_query_vector(query_vec)
        k = _check_k(k)
        flt = _check_filters(filters)
        dim = int(q.shape[0])
        with self.db.tenant_tx(tenant_id, write=False) as c:
            self._adapt(c)
            c.execute("SET LOCAL jit = off")  # searches are short; compiling a plan cost ~0.5 s here
            docs: list[str] | None = None
            if flt:
                docs, n = self._matching_documents(c, tenant_id, flt)
                if not docs:
                    return []
            else:
                n = self._vector_count(c, tenant_id, dim, embedding_model)
                if n == 0:
                    return []
            if n > self.exact_max and index_cast(dim) is not None and self._index_ready(c, tenant_id, dim):
                rows = self._hnsw(c, tenant_id, q, k, docs, embedding_model)
                self.last_path = "hnsw"
                if len(rows) < min(k, n):
                    rows = self._exact(c, tenant_id, q, k, docs, embedding_model)
                    self.last_path = "hnsw+exact"
            else:
                rows = self._exact(c, tenant_id, q, k, docs, embedding_model)
                self.last_path = "exact"
        if n > self.exact_max and self.last_path == "exact" and not flt:
            self._maybe_index(tenant_id, dim, n)  # e.g. data loaded before this version, or a failed build
        return [(str(r[0]), 1.0 - float(r[1])) for r in rows]

    def _where(self, tenant_id: str, dim: int, docs: list[str] | None, model: str | None) -> tuple[str, list[Any]]:
        sql = f"tenant_id = ? AND embedding_dim = {int(dim)}"
        params: list[Any] = [tenant_id]
        if model is not None:
            sql += " AND embedding_model = ?"
            params.append(model)
        if docs is not None:
            sql += " AND document_id = ANY(?::uuid[])"
            params.append(docs)
        return sql, params

    def _exact(self, c: Conn, tenant_id: str, q: np.ndarray, k: int, docs: list[str] | None,
               model: str | None) -> list[tuple]:
        # `embedding <=> q` (no cast) cannot match the HNSW index expression: always exact.
        where, params = self._where(tenant_id, int(q.shape[0]), docs, model)
        return c.execute(
            f"SELECT chunk_id, embedding <=> ? AS d FROM chunk_vectors WHERE {where} ORDER BY d, chunk_id LIMIT ?",
            [PgVector(q), *params, k]).fetchall()

    def _hnsw(self, c: Conn, tenant_id: str, q: np.ndarray, k: int, docs: list[str] | None,
              model: str | None) -> list[tuple]:
        dim = int(q.shape[0])
        cast = index_cast(dim)
        ef = max(int(self.ef_search), k)
        # The distance operator is costed as cheap, so the planner likes "btree on the tenant, then
        # sort" even for tenants far past exact_max; this path exists to use the graph: forbid the
        # sort. (The penalty inflates the plan's cost far past jit_above_cost: JIT is off, above.)
        c.execute(
            f"SET LOCAL hnsw.ef_search = {ef}; SET LOCAL hnsw.iterative_scan = relaxed_order;"
            f" SET LOCAL hnsw.max_scan_tuples = {int(self.max_scan_tuples)};"
            " SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL enable_sort = off"
        )
        where, params = self._where(tenant_id, dim, docs, model)
        # The tenant as a literal (validated UUID): the planner must prove the partial index's predicate.
        where = where.replace("tenant_id = ?", f"tenant_id = '{uuid.UUID(tenant_id)}'::uuid", 1)
        params = params[1:]
        # relaxed_order may return rows slightly out of order: re-sort by the exact distance.
        return c.execute(
            f"WITH hits AS MATERIALIZED (SELECT chunk_id, embedding::{cast} <=> ?::{cast} AS d FROM chunk_vectors"
            f" WHERE {where} ORDER BY d LIMIT ?) SELECT chunk_id, d FROM hits ORDER BY d, chunk_id",
            [PgVector(q), *params, k]).fetchall()

    def keyword_search(self, tenant_id: str, query: str, k: int,
                       filters: dict[str, Any] | None = None) -> list[tuple[str, float]]:
        tenant_id = str(tenant_id)
        k = _check_k(k)
        flt = _check_filters(filters)
        terms = fts_terms(query)
        if not terms:
            return []
        with self.db.tenant_tx(tenant_id, write=False) as c:
            c.execute("SET LOCAL jit = off")
            docs: list[str] | None = None
            if flt:
                docs, _ = self._matching_documents(c, tenant_id, flt)
                if not docs:
                    return []
            # kb_keyword_search (migration 0003): filters by this tenant AND the transaction's
            # tenant, as the owner so the GIN index serves both the tenant and the terms (RLS
            # would keep the non-leakproof @@ out of the index scan). websearch_to_tsquery never
            # raises; the words are joined with its `or`.
            rows = c.execute("SELECT chunk_id, score FROM kb_keyword_search(?::uuid, ?, ?, ?::uuid[])",
                             (tenant_id, " or ".join(terms), k, docs)).fetchall()
        return [(str(r[0]), float(r[1])) for r in rows]
