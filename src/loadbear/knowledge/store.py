"""The knowledge base's storage: documents, chunks, vectors and full text, per tenant.

``KnowledgeStore(db)`` returns the implementation for the database's backend
(:mod:`loadbear.knowledge.store_sqlite` or :mod:`loadbear.knowledge.store_postgres`); both
keep the same behaviour, and the storage tests run on each.

Rules every method follows:

* Every statement carries the tenant filter in its SQL *and* runs in ``db.tenant_tx(tenant)``,
  so on PostgreSQL row-level security still holds if a filter were ever missing.
* Writes are atomic: a document, its chunks, their vectors and full-text rows change in one
  transaction. Re-sending a document with the same ``external_id`` replaces it (same id,
  ``version + 1``, old chunks gone) or leaves the old version intact if anything fails.
* Every write bumps the tenant's ``kb_state.version`` (first, so a tenant's knowledge-base
  writes are serialised); :meth:`KnowledgeStore.kb_version` exposes it for cache keys.
* Searches apply the tenant, the embedding model and metadata filters *inside* the search, so
  a top-k returns k rows when the tenant has k matching chunks.
* Vectors are compared by cosine; ``vector_search`` returns ``1 - cosine distance``.
"""

from __future__ import annotations

import math
import re
import uuid
from typing import Any, Iterable, Sequence

import numpy as np

from loadbear.knowledge.types import ChunkDraft, Document, Embedder, KnowledgeError, StoredChunk
from loadbear.storage.db import Conn, Database
from loadbear.storage.values import db_time, dumps, iso, loads, utcnow, uuid7

__all__ = ["KnowledgeStore", "fts_terms", "MAX_FILTER_KEYS"]

MAX_FILTER_KEYS = 16
MAX_DIM = 16000
MAX_K = 1000

# Words that match almost every chunk: dropped from keyword queries when other words remain.
STOPWORDS = frozenset(
    "a an and are as at be but by for from has have he her his how i if in into is it its me my no not of on "
    "or our she so than that the their them then there these they this to us was we were what when where which "
    "who why will with you your do does did can could should would".split()
)
_WORD = re.compile(r"\w+", re.UNICODE)
MAX_TERMS = 32
MAX_TERM_LEN = 64


def fts_terms(query: str) -> list[str]:
    """The words of a user's query, safe to quote into FTS5 MATCH or websearch_to_tsquery.

    Only runs of letters, digits and underscores survive: quotes, operators, parentheses,
    ``-``/``+``/``*``/``:``/``^`` and any other punctuation are separators, so no input can
    raise a syntax error. Stopwords are dropped when other words remain; at most 32 words.
    """
    if not isinstance(query, str):
        return []
    seen: dict[str, None] = {}
    for w in _WORD.findall(query.lower()):
        w = w.strip("_")
        if w and len(w) <= MAX_TERM_LEN:
            seen.setdefault(w, None)
    words = list(seen)
    content = [w for w in words if w not in STOPWORDS]
    return content[:MAX_TERMS]


def _uuid_or_none(value: Any) -> str | None:
    try:
        return str(uuid.UUID(str(value)))
    except (ValueError, TypeError, AttributeError):
        return None


def _check_filters(filters: Any) -> list[tuple[str, list[Any]]]:
    """``{"key": value}`` or ``{"key": [v1, v2]}`` (any of) → [(key, [values])], validated."""
    if not filters:
        return []
    if not isinstance(filters, dict):
        raise KnowledgeError("'filters' must be an object", code="invalid_type", param="filters")
    if len(filters) > MAX_FILTER_KEYS:
        raise KnowledgeError(f"at most {MAX_FILTER_KEYS} filter keys", code="invalid_value", param="filters")
    out = []
    for key, value in filters.items():
        if not isinstance(key, str) or not key:
            raise KnowledgeError("filter keys must be non-empty strings", code="invalid_type", param="filters")
        values = value if isinstance(value, list) else [value]
        if not values or len(values) > 100:
            raise KnowledgeError("a filter list must have 1 to 100 values", code="invalid_value", param="filters")
        for v in values:
            if not (v is None or isinstance(v, (str, bool, int, float))) or (isinstance(v, float) and not math.isfinite(v)):
                raise KnowledgeError("filter values must be strings, numbers, booleans or null",
                                     code="invalid_type", param="filters")
        out.append((key, values))
    return out


def _check_vectors(vectors: Any, n: int) -> np.ndarray:
    arr = np.asarray(vectors, dtype=np.float32)
    if n == 0 and arr.size == 0:
        return arr.reshape(0, arr.shape[-1] if arr.ndim == 2 else 0)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise KnowledgeError(f"expected {n} vectors, got an array of shape {arr.shape}", code="invalid_vectors")
    if not 1 <= arr.shape[1] <= MAX_DIM:
        raise KnowledgeError(f"vector dimension must be 1..{MAX_DIM}", code="invalid_vectors")
    if not np.isfinite(arr).all():
        raise KnowledgeError("vectors must be finite", code="invalid_vectors")
    if n and (np.linalg.norm(arr, axis=1) == 0).any():
        raise KnowledgeError("a zero vector has no direction: cosine is undefined", code="invalid_vectors")
    return np.ascontiguousarray(arr)


def _check_query_vector(vec: Any) -> np.ndarray:
    q = np.asarray(vec, dtype=np.float32)
    if q.ndim == 2 and q.shape[0] == 1:
        q = q[0]
    if q.ndim != 1 or not 1 <= q.shape[0] <= MAX_DIM or not np.isfinite(q).all():
        raise KnowledgeError("the query vector must be one finite vector", code="invalid_vectors")
    norm = float(np.linalg.norm(q))
    if norm == 0.0:
        raise KnowledgeError("the query vector is zero", code="invalid_vectors")
    return np.ascontiguousarray(q / norm, dtype=np.float32)


def _check_k(k: Any) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise KnowledgeError(f"k must be an integer in 1..{MAX_K}", code="invalid_value", param="top_k")
    return k


def _check_model(model: Any) -> str:
    if not isinstance(model, str) or not model or len(model) > 200:
        raise KnowledgeError("embedding_model must be a non-empty name", code="invalid_value")
    return model


def _context(title: str, heading_path: Sequence[str]) -> str:
    return " / ".join(p for p in [title, *heading_path] if p)


class KnowledgeStore:
    """Documents, chunks, vectors and full text of every tenant's knowledge base.

    ``exact_max``: a search whose candidate set (the tenant's chunks of the query's model, or
    the chunks of the documents matching the filters) is at most this many chunks is exact.
    """

    dialect = ""
    exact_max = 10_000

    def __new__(cls, db: Database, **kwargs: Any) -> "KnowledgeStore":
        if cls is KnowledgeStore:
            if db.dialect == "sqlite":
                from loadbear.knowledge.store_sqlite import SQLiteKnowledgeStore as impl
            elif db.dialect == "postgres":
                from loadbear.knowledge.store_postgres import PostgresKnowledgeStore as impl
            else:  # pragma: no cover - no third backend
                raise ValueError(f"no knowledge store for {db.dialect!r}")
            return super().__new__(impl)
        return super().__new__(cls)

    def __init__(self, db: Database, *, exact_max: int | None = None) -> None:
        self.db = db
        if exact_max is not None:
            self.exact_max = exact_max
        self._dims: set[int] = set()

    # -- backend parts -------------------------------------------------------------------

    def ensure_dimension(self, dim: int) -> None:
        """Create the vector structures for a dimension (idempotent, cached per process)."""
        raise NotImplementedError

    def _insert_chunks(self, c: Conn, tenant_id: str, doc_id: str, version: int, title: str,
                       chunks: Sequence[ChunkDraft], vectors: np.ndarray, model: str, now: Any) -> None:
        raise NotImplementedError

    def _delete_chunks(self, c: Conn, tenant_id: str, doc_id: str) -> int:
        raise NotImplementedError

    def _replace_vector_rows(self, c: Conn, tenant_id: str, rows: list[dict[str, Any]], vectors: np.ndarray,
                             model: str) -> None:
        raise NotImplementedError

    def _doc_filter_sql(self, filters: list[tuple[str, list[Any]]]) -> tuple[str, list[Any]]:
        raise NotImplementedError

    def vector_search(self, tenant_id: str, query_vec: Any, k: int, filters: dict[str, Any] | None = None,
                      embedding_model: str | None = None) -> list[tuple[str, float]]:
        raise NotImplementedError

    def keyword_search(self, tenant_id: str, query: str, k: int,
                       filters: dict[str, Any] | None = None) -> list[tuple[str, float]]:
        raise NotImplementedError

    # -- shared SQL ---------------------------------------------------------------------

    def _t(self, dt: Any) -> Any:
        return db_time(self.db.dialect, dt)

    def _bump(self, c: Conn, tenant_id: str, now: Any) -> int:
        """Lock the tenant's knowledge base for this transaction and bump its version."""
        return int(c.scalar(
            "INSERT INTO kb_state (tenant_id, version, updated_at) VALUES (?, 1, ?)"
            " ON CONFLICT (tenant_id) DO UPDATE SET version = kb_state.version + 1, updated_at = excluded.updated_at"
            " RETURNING version",
            (tenant_id, self._t(now)),
        ))

    def _add_stats(self, c: Conn, tenant_id: str, model: str, dim: int, delta: int) -> None:
        if delta == 0:
            return
        c.execute(
            "INSERT INTO kb_vector_stats (tenant_id, embedding_model, embedding_dim, chunk_count) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (tenant_id, embedding_model, embedding_dim)"
            " DO UPDATE SET chunk_count = kb_vector_stats.chunk_count + excluded.chunk_count",
            (tenant_id, model, dim, delta),
        )
        if delta < 0:
            c.execute("DELETE FROM kb_vector_stats WHERE tenant_id = ? AND embedding_model = ? AND embedding_dim = ?"
                      " AND chunk_count <= 0", (tenant_id, model, dim))

    def _vector_count(self, c: Conn, tenant_id: str, dim: int, model: str | None) -> int:
        if model is None:
            n = c.scalar("SELECT SUM(chunk_count) FROM kb_vector_stats WHERE tenant_id = ? AND embedding_dim = ?",
                         (tenant_id, dim))
        else:
            n = c.scalar("SELECT chunk_count FROM kb_vector_stats WHERE tenant_id = ? AND embedding_model = ?"
                         " AND embedding_dim = ?", (tenant_id, model, dim))
        return int(n or 0)

    def _matching_documents(self, c: Conn, tenant_id: str,
                            filters: list[tuple[str, list[Any]]]) -> tuple[list[str], int]:
        """Ids and total chunk count of the tenant's documents whose metadata matches every filter."""
        where, params = self._doc_filter_sql(filters)
        rows = c.fetchall(f"SELECT d.id, d.chunk_count FROM documents d WHERE d.tenant_id = ? AND {where}",
                          [tenant_id, *params])
        return [str(r["id"]) for r in rows], sum(int(r["chunk_count"]) for r in rows)

    @staticmethod
    def _doc(row: dict[str, Any]) -> Document:
        return Document(
            id=str(row["id"]), tenant_id=str(row["tenant_id"]), title=row["title"], external_id=row["external_id"],
            source_url=row["source_url"], metadata=loads(row["metadata"]) or {}, version=int(row["version"]),
            content_type=row["content_type"], char_count=int(row["char_count"]), chunk_count=int(row["chunk_count"]),
            created_at=iso(row["created_at"]), updated_at=iso(row["updated_at"]),
        )

    @staticmethod
    def _chunk(row: dict[str, Any]) -> StoredChunk:
        return StoredChunk(
            id=str(row["id"]), document_id=str(row["document_id"]), ordinal=int(row["ordinal"]), text=row["text"],
            start=int(row["start_char"]), end=int(row["end_char"]), heading_path=list(loads(row["heading_path"]) or []),
            token_count=int(row["token_count"]), embedding_model=row["embedding_model"],
            embedding_dim=int(row["embedding_dim"]), document_title=row["title"], source_url=row["source_url"],
            document_version=int(row["document_version"]), external_id=row["external_id"],
        )

    # -- documents ----------------------------------------------------------------------

    def upsert_document(self, tenant_id: str, *, title: str, char_count: int = 0, external_id: str | None = None,
                        source_url: str | None = None, metadata: dict[str, Any] | None = None,
                        content_type: str = "text/plain", chunks: Sequence[ChunkDraft], vectors: Any,
                        embedding_model: str) -> Document:
        """Store a document with its chunks and vectors, or replace the one with this ``external_id``."""
        tenant_id = str(tenant_id)
        chunks = list(chunks)
        vecs = _check_vectors(vectors, len(chunks))
        model = _check_model(embedding_model)
        metadata = dict(metadata or {})
        try:
            meta_json = dumps(metadata)
        except TypeError as exc:
            raise KnowledgeError(f"metadata is not JSON: {exc}", code="invalid_type", param="metadata") from None
        title = title or ""
        dim = int(vecs.shape[1]) if chunks else 0
        if chunks:
            self.ensure_dimension(dim)
        now = utcnow()
        with self.db.tenant_tx(tenant_id) as c:
            self._bump(c, tenant_id, now)
            old = None
            if external_id is not None:
                old = c.fetchone("SELECT id, version, created_at FROM documents WHERE tenant_id = ? AND external_id = ?",
                                 (tenant_id, external_id))
            if old is not None:
                doc_id, version, created = str(old["id"]), int(old["version"]) + 1, old["created_at"]
                self._delete_chunks(c, tenant_id, doc_id)
                c.execute(
                    "UPDATE documents SET title = ?, source_url = ?, metadata = ?, content_type = ?, version = ?,"
                    " char_count = ?, chunk_count = ?, updated_at = ? WHERE id = ? AND tenant_id = ?",
                    (title, source_url, meta_json, content_type, version, int(char_count), len(chunks),
                     self._t(now), doc_id, tenant_id),
                )
            else:
                doc_id, version, created = uuid7(), 1, self._t(now)
                c.execute(
                    "INSERT INTO documents (id, tenant_id, external_id, title, source_url, metadata, content_type,"
                    " version, char_count, chunk_count, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (doc_id, tenant_id, external_id, title, source_url, meta_json, content_type, version,
                     int(char_count), len(chunks), created, self._t(now)),
                )
            if chunks:
                self._insert_chunks(c, tenant_id, doc_id, version, title, chunks, vecs, model, now)
                self._add_stats(c, tenant_id, model, dim, len(chunks))
        return Document(
            id=doc_id, tenant_id=tenant_id, title=title, external_id=external_id, source_url=source_url,
            metadata=metadata, version=version, content_type=content_type, char_count=int(char_count),
            chunk_count=len(chunks), created_at=iso(created), updated_at=iso(self._t(now)),
        )

    def get_document(self, tenant_id: str, doc_id: str) -> Document | None:
        doc_id = _uuid_or_none(doc_id)
        if doc_id is None:
            return None
        with self.db.tenant_tx(str(tenant_id), write=False) as c:
            row = c.fetchone("SELECT * FROM documents WHERE id = ? AND tenant_id = ?", (doc_id, str(tenant_id)))
        return None if row is None else self._doc(row)

    def list_documents(self, tenant_id: str, limit: int = 20,
                       cursor: str | None = None) -> tuple[list[Document], str | None]:
        """Newest first (by UUIDv7 id: millisecond order); ``cursor`` is opaque to clients (the last id)."""
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise KnowledgeError("'limit' must be between 1 and 1000", code="invalid_value", param="limit")
        after = None
        if cursor is not None:
            after = _uuid_or_none(cursor)
            if after is None:
                raise KnowledgeError("'cursor' is not a cursor this API returned", code="invalid_value", param="cursor")
        sql = "SELECT * FROM documents WHERE tenant_id = ?"
        params: list[Any] = [str(tenant_id)]
        if after is not None:
            sql += " AND id < ?"
            params.append(after)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit + 1)
        with self.db.tenant_tx(str(tenant_id), write=False) as c:
            rows = c.fetchall(sql, params)
        docs = [self._doc(r) for r in rows[:limit]]
        return docs, (docs[-1].id if len(rows) > limit else None)

    def delete_document(self, tenant_id: str, doc_id: str) -> bool:
        """Delete a document with its chunks, vectors and full-text rows; False if the tenant has no such id."""
        tenant_id = str(tenant_id)
        doc_id = _uuid_or_none(doc_id)
        if doc_id is None:
            return False
        with self.db.tenant_tx(tenant_id) as c:
            if c.fetchone("SELECT id FROM documents WHERE id = ? AND tenant_id = ?", (doc_id, tenant_id)) is None:
                return False
            self._bump(c, tenant_id, utcnow())
            self._delete_chunks(c, tenant_id, doc_id)
            n = c.execute("DELETE FROM documents WHERE id = ? AND tenant_id = ?", (doc_id, tenant_id)).rowcount
        return bool(n)

    def kb_version(self, tenant_id: str) -> str:
        """Changes whenever a document of the tenant is added, replaced, deleted or re-embedded."""
        with self.db.tenant_tx(str(tenant_id), write=False) as c:
            v = c.scalar("SELECT version FROM kb_state WHERE tenant_id = ?", (str(tenant_id),))
        return str(int(v or 0))

    def counts(self, tenant_id: str) -> dict[str, int]:
        with self.db.tenant_tx(str(tenant_id), write=False) as c:
            row = c.fetchone("SELECT COUNT(*) AS documents, COALESCE(SUM(chunk_count), 0) AS chunks FROM documents"
                             " WHERE tenant_id = ?", (str(tenant_id),))
        return {"documents": int(row["documents"]), "chunks": int(row["chunks"])}

    # -- chunks -------------------------------------------------------------------------

    _CHUNK_COLUMNS = (
        "c.id, c.document_id, c.document_version, c.ordinal, c.text, c.start_char, c.end_char, c.heading_path,"
        " c.token_count, c.embedding_model, c.embedding_dim, d.title, d.source_url, d.external_id"
    )

    def _ids_param_sql(self) -> str:
        """SQL matching ``c.id`` against one parameter holding a list of ids."""
        raise NotImplementedError

    def _ids_param(self, ids: list[str]) -> Any:
        raise NotImplementedError

    def _tenant_eq(self, column: str) -> str:
        """The tenant filter of a lookup by id (SQLite must not pick the tenant index for it)."""
        return f"{column} = ?"

    def get_chunks(self, tenant_id: str, ids: Iterable[str]) -> list[StoredChunk]:
        """The tenant's chunks with these ids, in the order given (unknown or foreign ids are skipped)."""
        wanted = [u for u in (_uuid_or_none(i) for i in ids) if u is not None]
        if not wanted:
            return []
        with self.db.tenant_tx(str(tenant_id), write=False) as c:
            rows = c.fetchall(
                f"SELECT {self._CHUNK_COLUMNS} FROM chunks c JOIN documents d ON d.id = c.document_id"
                f" WHERE {self._tenant_eq('c.tenant_id')} AND {self._tenant_eq('d.tenant_id')} AND {self._ids_param_sql()}",
                (str(tenant_id), str(tenant_id), self._ids_param(wanted)),
            )
        by_id = {str(r["id"]): self._chunk(r) for r in rows}
        return [by_id[i] for i in dict.fromkeys(wanted) if i in by_id]

    def document_chunks(self, tenant_id: str, doc_id: str) -> list[StoredChunk]:
        doc_id = _uuid_or_none(doc_id)
        if doc_id is None:
            return []
        with self.db.tenant_tx(str(tenant_id), write=False) as c:
            rows = c.fetchall(
                f"SELECT {self._CHUNK_COLUMNS} FROM chunks c JOIN documents d ON d.id = c.document_id"
                " WHERE c.tenant_id = ? AND c.document_id = ? ORDER BY c.ordinal",
                (str(tenant_id), doc_id),
            )
        return [self._chunk(r) for r in rows]

    # -- re-embedding -------------------------------------------------------------------

    def chunks_needing_embedding(self, tenant_id: str, model: str, limit: int = 256) -> list[StoredChunk]:
        """Chunks of the tenant whose vectors were not made by ``model`` (with title and headings)."""
        with self.db.tenant_tx(str(tenant_id), write=False) as c:
            rows = c.fetchall(
                f"SELECT {self._CHUNK_COLUMNS} FROM chunks c JOIN documents d ON d.id = c.document_id"
                " WHERE c.tenant_id = ? AND c.embedding_model <> ? ORDER BY c.id LIMIT ?",
                (str(tenant_id), model, int(limit)),
            )
        return [self._chunk(r) for r in rows]

    def replace_vectors(self, tenant_id: str, chunk_ids: Sequence[str], vectors: Any, embedding_model: str) -> int:
        """Swap the vectors of these chunks for ones made by ``embedding_model``; returns how many changed.

        Chunks deleted meanwhile (or not the tenant's) are skipped. Atomic per call.
        """
        tenant_id = str(tenant_id)
        ids = [_uuid_or_none(i) for i in chunk_ids]
        vecs = _check_vectors(vectors, len(ids))
        model = _check_model(embedding_model)
        if not ids:
            return 0
        if any(i is None for i in ids):
            raise KnowledgeError("malformed chunk id", code="invalid_value")
        self.ensure_dimension(int(vecs.shape[1]))
        with self.db.tenant_tx(tenant_id) as c:
            self._bump(c, tenant_id, utcnow())
            rows = c.fetchall(
                f"SELECT c.id, c.document_id, c.embedding_model, c.embedding_dim FROM chunks c"
                f" WHERE c.tenant_id = ? AND {self._ids_param_sql()}",
                (tenant_id, self._ids_param(ids)),  # type: ignore[arg-type]
            )
            found = {str(r["id"]): r for r in rows}
            keep = [j for j, i in enumerate(ids) if i in found]
            if not keep:
                return 0
            rows = [found[ids[j]] for j in keep]  # type: ignore[index]
            for r in rows:
                self._add_stats(c, tenant_id, r["embedding_model"], int(r["embedding_dim"]), -1)
            self._add_stats(c, tenant_id, model, int(vecs.shape[1]), len(rows))
            self._replace_vector_rows(c, tenant_id, rows, vecs[keep], model)
        return len(rows)

    def reembed(self, tenant_id: str, embedder: Embedder, batch_size: int = 64,
                text_of: Any = None) -> int:
        """Re-embed every chunk of the tenant not made by ``embedder``; returns how many.

        ``text_of(chunk)`` gives the text to embed (default: title and headings, then the text).
        """
        done = 0
        while True:
            batch = self.chunks_needing_embedding(tenant_id, embedder.name, limit=batch_size)
            if not batch:
                return done
            texts = [text_of(ch) if text_of else _embed_text(ch) for ch in batch]
            # chunks deleted meanwhile are skipped (n < len(batch)); they will not come back
            done += self.replace_vectors(tenant_id, [ch.id for ch in batch], embedder.embed(texts), embedder.name)


def _embed_text(ch: StoredChunk) -> str:
    prefix = " > ".join(p for p in [ch.document_title or "", *ch.heading_path] if p)
    return f"{prefix}\n{ch.text}" if prefix else ch.text
