"""The knowledge store on PostgreSQL: pgvector (HNSW) for vectors, tsvector + GIN for keywords.

Layout (migration ``0003_knowledge``): ``chunk_vectors`` holds one unconstrained ``vector``
per chunk with its model and dimension; each dimension has a partial HNSW index over the
cast expression (``(embedding::vector(384)) vector_cosine_ops WHERE embedding_dim = 384``;
other dimensions are indexed on first use, ``halfvec`` above 2000 dimensions, none above
4000). ``chunks.tsv`` is a generated tsvector of the title and headings (weight A) and the
text (weight B), indexed by GIN together with the tenant (btree_gin).

Vector search and the tenant filter. An HNSW scan returns the nearest rows of the *whole*
table; the tenant (and model, and document) filters run after it, so a plain filtered top-k
can return fewer than k rows, or worse neighbours, for any tenant that is a small part of
the table. Three things keep top-k complete and exact-quality:

* the candidate set is sized first (``kb_vector_stats``, or the chunk counts of the documents
  matching the filters): up to ``exact_max`` chunks are searched exactly (a btree scan on the
  tenant, the distance computed for each; the expression cannot use the HNSW index);
* larger ones use the HNSW index with pgvector 0.8's iterative scan
  (``hnsw.iterative_scan = relaxed_order``) which keeps walking the graph until the LIMIT is
  met by rows that pass the filters, with ``hnsw.ef_search`` raised for recall; the rows are
  re-sorted by exact distance afterwards;
* if the index still returns fewer rows than the candidate set could supply, the query is
  answered exactly instead.

Every search runs in ``tenant_tx``: row-level security applies under the SQL filters.
"""

from __future__ import annotations

import logging
import struct
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


def hnsw_index_name(dim: int) -> str:
    return f"idx_chunk_vectors_hnsw_{int(dim)}"


def hnsw_index_sql(dim: int) -> str:
    cast = index_cast(dim)
    ops = "vector_cosine_ops" if cast and cast.startswith("vector") else "halfvec_cosine_ops"
    return (f"CREATE INDEX IF NOT EXISTS {hnsw_index_name(dim)} ON chunk_vectors"
            f" USING hnsw ((embedding::{cast}) {ops}) WHERE embedding_dim = {int(dim)}")


class PostgresKnowledgeStore(KnowledgeStore):
    dialect = "postgres"

    def __init__(self, db: Database, *, exact_max: int | None = None, ef_search: int = 100,
                 max_scan_tuples: int = 40_000) -> None:
        super().__init__(db, exact_max=exact_max)
        self.ef_search = ef_search
        self.max_scan_tuples = max_scan_tuples
        self._dumper: type | None = None
        self._indexed: set[int] = set()

    # -- adapters and structure -------------------------------------------------------

    def _adapt(self, c: Conn) -> None:
        if self._dumper is None:
            oid = c.scalar("SELECT 'vector'::regtype::oid")
            self._dumper = _vector_dumper(int(oid))
        c.raw.adapters.register_dumper(PgVector, self._dumper)

    def ensure_dimension(self, dim: int) -> None:
        dim = int(dim)
        if dim in self._dims:
            return
        if index_cast(dim) is not None:
            with self.db.system_tx() as c:
                exists = c.fetchone("SELECT 1 AS x FROM pg_indexes WHERE indexname = ?", (hnsw_index_name(dim),))
            if not exists:
                # Built once per new dimension, by the owner; the table's rows of other dimensions
                # are skipped by the partial predicate.
                try:
                    with self.db.system_tx() as c:
                        c.execute(hnsw_index_sql(dim))
                except Exception:
                    with self.db.system_tx() as c:  # another process may have created it meanwhile
                        if not c.fetchone("SELECT 1 AS x FROM pg_indexes WHERE indexname = ?", (hnsw_index_name(dim),)):
                            raise
            self._indexed.add(dim)
        self._dims.add(dim)

    # -- writes -------------------------------------------------------------------------

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
            if dim not in self._indexed and index_cast(dim) is not None:
                # Reads never build indexes (writes do, in ensure_dimension); they only look.
                if c.fetchone("SELECT 1 AS x FROM pg_indexes WHERE indexname = ?", (hnsw_index_name(dim),)):
                    self._indexed.add(dim)
            docs: list[str] | None = None
            if flt:
                docs, n = self._matching_documents(c, tenant_id, flt)
                if not docs:
                    return []
            else:
                n = self._vector_count(c, tenant_id, dim, embedding_model)
                if n == 0:
                    return []
            if n > self.exact_max and dim in self._indexed:
                rows = self._hnsw(c, tenant_id, q, k, docs, embedding_model)
                if len(rows) < min(k, n):
                    rows = self._exact(c, tenant_id, q, k, docs, embedding_model)
            else:
                rows = self._exact(c, tenant_id, q, k, docs, embedding_model)
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
        # sort" even for tenants far past exact_max; this path exists to use the graph: forbid the sort.
        c.execute(
            f"SET LOCAL hnsw.ef_search = {ef}; SET LOCAL hnsw.iterative_scan = relaxed_order;"
            f" SET LOCAL hnsw.max_scan_tuples = {int(self.max_scan_tuples)};"
            " SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL enable_sort = off"
        )
        where, params = self._where(tenant_id, dim, docs, model)
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
            sql = ("SELECT c.id, ts_rank_cd(c.tsv, q) AS s FROM chunks c, websearch_to_tsquery('english', ?) q"
                   " WHERE c.tenant_id = ? AND c.tsv @@ q")
            # websearch_to_tsquery never raises; the words are joined with its `or`.
            params: list[Any] = [" or ".join(terms), tenant_id]
            if flt:
                docs, _ = self._matching_documents(c, tenant_id, flt)
                if not docs:
                    return []
                sql += " AND c.document_id = ANY(?::uuid[])"
                params.append(docs)
            sql += " ORDER BY s DESC, c.id LIMIT ?"
            params.append(k)
            rows = c.execute(sql, params).fetchall()
        return [(str(r[0]), float(r[1])) for r in rows]
