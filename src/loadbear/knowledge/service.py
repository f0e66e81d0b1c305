"""The knowledge base as a service: ingest (parse → chunk → embed → store), query, manage.

Small inputs are ingested inline. Large uploads become ingestion jobs: the upload is kept in
``ingest_jobs`` (so a restart does not lose it) and a background worker processes it, while the
API answers 202 with the job's id at once.
"""

from __future__ import annotations

import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import numpy as np

from loadbear.knowledge.chunking import chunk_document
from loadbear.knowledge.parse import parse_file, parse_text
from loadbear.knowledge.retrieval import Reranker, Retriever
from loadbear.knowledge.store import KnowledgeStore
from loadbear.knowledge.types import Document, Embedder, KnowledgeError, ParsedDocument, StoredChunk
from loadbear.storage.db import Database
from loadbear.storage.values import db_time, dumps, iso, loads, utcnow, uuid7

log = logging.getLogger("loadbear.knowledge")

TEXT_TYPES = {"text/plain", "text/markdown", "text/html"}
MAX_TITLE = 500
MAX_EXTERNAL_ID = 256
JOB_HEARTBEAT_S = 30.0
JOB_STALE_S = 120.0  # four missed heartbeats: the job's process is gone


@dataclass
class KnowledgeSettings:
    chunk_tokens: int = 350
    chunk_overlap: float = 0.15
    max_upload_bytes: int = 20 * 1024 * 1024
    # Uploads above this size are ingested by a background job (202 + job id).
    inline_max_bytes: int = 256 * 1024
    embed_batch: int = 32


def _validate_meta(title: Any, external_id: Any, source_url: Any, metadata: Any) -> None:
    if title is not None and (not isinstance(title, str) or len(title) > MAX_TITLE):
        raise KnowledgeError(f"'title' must be a string of at most {MAX_TITLE} characters", code="invalid_type", param="title")
    if external_id is not None and (not isinstance(external_id, str) or not external_id or len(external_id) > MAX_EXTERNAL_ID):
        raise KnowledgeError(f"'external_id' must be a non-empty string of at most {MAX_EXTERNAL_ID} characters",
                             code="invalid_type", param="external_id")
    if source_url is not None and (not isinstance(source_url, str) or len(source_url) > 2048):
        raise KnowledgeError("'source_url' must be a string of at most 2048 characters", code="invalid_type", param="source_url")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
            raise KnowledgeError("'metadata' must be an object", code="invalid_type", param="metadata")
        if not all(v is None or isinstance(v, (str, int, float, bool)) for v in metadata.values()):
            raise KnowledgeError("'metadata' values must be strings, numbers, booleans or null",
                                 code="invalid_type", param="metadata")


class KnowledgeService:
    def __init__(self, db: Database, embedder_factory: Callable[[], Embedder],
                 settings: KnowledgeSettings | None = None,
                 on_change: Callable[[str], None] | None = None, reranker: Reranker | None = None) -> None:
        self.db = db
        # The reranking hook for every query of this service (the API's and grounded chat's):
        # ``reranker(query, chunks) -> chunks``; settable later (``gateway.knowledge.reranker = f``).
        self.reranker = reranker
        self.store = KnowledgeStore(db)
        self._embedder_factory = embedder_factory
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()
        self.settings = settings or KnowledgeSettings()
        self.on_change = on_change
        self._jobs: ThreadPoolExecutor | None = None

    @property
    def embedder(self) -> Embedder:
        # Loaded on first use: the model weights cost time and memory a chat-only replica never needs.
        if self._embedder is None:
            with self._lock:
                if self._embedder is None:
                    self._embedder = self._embedder_factory()
        return self._embedder

    @property
    def retriever(self) -> Retriever:
        return Retriever(self.store, self.embedder, self.reranker)

    # -- ingestion -------------------------------------------------------------------------

    def ingest_text(self, tenant_id: str, *, text: Any, title: Any = None, external_id: Any = None,
                    source_url: Any = None, metadata: Any = None, content_type: str = "text/plain") -> Document:
        _validate_meta(title, external_id, source_url, metadata)
        if not isinstance(text, str):
            raise KnowledgeError("'text' is required and must be a string", code="invalid_type", param="text")
        if content_type not in TEXT_TYPES:
            raise KnowledgeError(f"'content_type' must be one of {', '.join(sorted(TEXT_TYPES))}",
                                 code="unsupported_type", param="content_type", status=415)
        if len(text.encode("utf-8", "surrogatepass")) > self.settings.max_upload_bytes:
            raise KnowledgeError(f"the document exceeds {self.settings.max_upload_bytes} bytes",
                                 code="file_too_large", status=413, param="text")
        parsed = parse_text(text, content_type)
        return self._store(tenant_id, parsed, title, external_id, source_url, metadata or {})

    def ingest_file(self, tenant_id: str, *, filename: str, data: bytes, content_type: str | None = None,
                    title: Any = None, external_id: Any = None, source_url: Any = None,
                    metadata: Any = None) -> Document:
        _validate_meta(title, external_id, source_url, metadata)
        parsed = parse_file(filename, data, content_type, max_bytes=self.settings.max_upload_bytes)
        return self._store(tenant_id, parsed, title or parsed.title or filename, external_id, source_url,
                           metadata or {})

    def _store(self, tenant_id: str, parsed: ParsedDocument, title: str | None, external_id: str | None,
               source_url: str | None, metadata: dict[str, Any]) -> Document:
        s = self.settings
        drafts = chunk_document(parsed, max_tokens=s.chunk_tokens, overlap=s.chunk_overlap)
        if not drafts:
            raise KnowledgeError("the document has no text to index", code="empty_file")
        doc_title = title or parsed.title or (parsed.text.strip().splitlines() or ["Untitled"])[0][:120]
        vectors = self.embed_passages([_embed_text(doc_title, d.heading_path, d.text) for d in drafts])
        doc = self.store.upsert_document(
            tenant_id, title=doc_title, char_count=len(parsed.text), external_id=external_id,
            source_url=source_url, metadata=metadata, content_type=parsed.content_type, chunks=drafts,
            vectors=vectors, embedding_model=self.embedder.name,
        )
        self._changed(tenant_id)
        return doc

    def embed_passages(self, texts: list[str]) -> np.ndarray:
        e = self.embedder
        b = self.settings.embed_batch
        parts = [e.embed(texts[i:i + b]) for i in range(0, len(texts), b)]
        return np.vstack(parts) if parts else np.zeros((0, e.dim), dtype=np.float32)

    def _changed(self, tenant_id: str) -> None:
        if self.on_change is not None:
            self.on_change(tenant_id)

    # -- background jobs ---------------------------------------------------------------

    def submit_job(self, tenant_id: str, *, filename: str, data: bytes, content_type: str | None,
                   title: Any = None, external_id: Any = None, source_url: Any = None,
                   metadata: Any = None) -> dict[str, Any]:
        """Queue a large upload; validate what can be validated now so bad input is a 4xx, not a failed job."""
        _validate_meta(title, external_id, source_url, metadata)
        if len(data) > self.settings.max_upload_bytes:
            raise KnowledgeError(f"the upload exceeds {self.settings.max_upload_bytes} bytes",
                                 code="file_too_large", status=413, param="file")
        job_id = uuid7()
        now = db_time(self.db.dialect, utcnow())
        params = {"filename": filename, "content_type": content_type, "title": title, "external_id": external_id,
                  "source_url": source_url, "metadata": metadata}
        with self.db.tenant_tx(tenant_id) as c:
            c.execute(
                "INSERT INTO ingest_jobs (id, tenant_id, status, params, payload, created_at, updated_at)"
                " VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, tenant_id, dumps(params), data, now, now),
            )
        self._executor().submit(self._run_job, tenant_id, job_id)
        return self.get_job(tenant_id, job_id)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._jobs is None:
                self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loadbear-ingest")
            return self._jobs

    def _run_job(self, tenant_id: str, job_id: str) -> None:
        # Claim the job in one statement: replicas resuming the same jobs never run one twice.
        with self.db.tenant_tx(tenant_id) as c:
            claimed = c.execute(
                "UPDATE ingest_jobs SET status = 'running', updated_at = ? WHERE id = ? AND tenant_id = ?"
                " AND status = 'queued'", (db_time(self.db.dialect, utcnow()), job_id, tenant_id)).rowcount
            row = c.fetchone("SELECT params, payload FROM ingest_jobs WHERE id = ? AND tenant_id = ?",
                             (job_id, tenant_id)) if claimed else None
        if row is None:
            return
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(tenant_id, job_id, stop), daemon=True,
                                name="loadbear-ingest-heartbeat")
        beat.start()
        try:
            self._process_job(tenant_id, job_id, row)
        finally:
            stop.set()
            beat.join()

    def _heartbeat(self, tenant_id: str, job_id: str, stop: threading.Event) -> None:
        # A running job's updated_at stays fresh while its process lives, so a restart can tell a
        # job orphaned by a dead process (stale) from one another replica is still working on.
        while not stop.wait(JOB_HEARTBEAT_S):
            try:
                with self.db.tenant_tx(tenant_id) as c:
                    c.execute("UPDATE ingest_jobs SET updated_at = ? WHERE id = ? AND tenant_id = ? AND status = 'running'",
                              (db_time(self.db.dialect, utcnow()), job_id, tenant_id))
            except Exception:  # a missed beat only risks an early resume after a restart
                log.warning("ingestion job %s: heartbeat failed", job_id, exc_info=True)

    def _process_job(self, tenant_id: str, job_id: str, row: dict[str, Any]) -> None:
        params = loads(row["params"])
        try:
            doc = self.ingest_file(tenant_id, filename=params["filename"], data=bytes(row["payload"]),
                                   content_type=params.get("content_type"), title=params.get("title"),
                                   external_id=params.get("external_id"), source_url=params.get("source_url"),
                                   metadata=params.get("metadata"))
        except KnowledgeError as exc:
            self._set_job(tenant_id, job_id, "failed", error={"code": exc.code, "message": exc.message})
        except Exception as exc:  # keep the job honest about unexpected failures too
            log.exception("ingestion job %s failed", job_id)
            self._set_job(tenant_id, job_id, "failed", error={"code": "internal_error", "message": str(exc)})
        else:
            self._set_job(tenant_id, job_id, "succeeded", document_id=doc.id)

    def _set_job(self, tenant_id: str, job_id: str, status: str, *, document_id: str | None = None,
                 error: dict[str, Any] | None = None) -> None:
        with self.db.tenant_tx(tenant_id) as c:
            c.execute(
                "UPDATE ingest_jobs SET status = ?, document_id = ?, error = ?, updated_at = ?"
                + (", payload = NULL" if status in ("succeeded", "failed") else "")
                + " WHERE id = ? AND tenant_id = ?",
                (status, document_id, dumps(error) if error else None, db_time(self.db.dialect, utcnow()),
                 job_id, tenant_id),
            )

    def get_job(self, tenant_id: str, job_id: str) -> dict[str, Any]:
        if not _is_uuid(job_id):
            raise KnowledgeError(f"no ingestion job {job_id!r}", code="job_not_found", status=404)
        with self.db.tenant_tx(tenant_id, write=False) as c:
            row = c.fetchone(
                "SELECT id, status, params, document_id, error, created_at, updated_at FROM ingest_jobs"
                " WHERE id = ? AND tenant_id = ?", (job_id, tenant_id))
        if row is None:
            raise KnowledgeError(f"no ingestion job {job_id!r}", code="job_not_found", status=404)
        params = loads(row["params"]) or {}
        return {
            "id": str(row["id"]), "object": "ingest_job", "status": row["status"],
            "filename": params.get("filename"), "document_id": str(row["document_id"]) if row["document_id"] else None,
            "error": loads(row["error"]), "created_at": iso(row["created_at"]), "updated_at": iso(row["updated_at"]),
        }

    def resume_jobs(self, stale_after_s: float = JOB_STALE_S) -> int:
        """Run the jobs a previous process left behind (their uploads are kept): queued ones, and
        running ones whose heartbeat stopped ``stale_after_s`` ago (their process died). Returns how many."""
        cutoff = db_time(self.db.dialect, utcnow() - timedelta(seconds=stale_after_s))
        with self.db.system_tx() as c:
            c.execute("UPDATE ingest_jobs SET status = 'queued' WHERE status = 'running' AND updated_at < ?", (cutoff,))
            rows = c.fetchall("SELECT id, tenant_id FROM ingest_jobs WHERE status = 'queued' ORDER BY id")
        for r in rows:
            self._executor().submit(self._run_job, str(r["tenant_id"]), str(r["id"]))
        return len(rows)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until queued jobs have run (tests, CLI)."""
        ex = self._jobs
        if ex is not None:
            ex.submit(lambda: None).result(timeout)

    def close(self) -> None:
        if self._jobs is not None:
            self._jobs.shutdown(wait=True)
            self._jobs = None

    # -- reading -----------------------------------------------------------------------

    def get(self, tenant_id: str, doc_id: str) -> Document:
        doc = self.store.get_document(tenant_id, doc_id) if _is_uuid(doc_id) else None
        if doc is None:
            raise KnowledgeError(f"no document {doc_id!r}", code="document_not_found", status=404)
        return doc

    def delete(self, tenant_id: str, doc_id: str) -> None:
        if not (_is_uuid(doc_id) and self.store.delete_document(tenant_id, doc_id)):
            raise KnowledgeError(f"no document {doc_id!r}", code="document_not_found", status=404)
        self._changed(tenant_id)

    def list(self, tenant_id: str, limit: int = 20, cursor: str | None = None) -> tuple[list[Document], str | None]:
        if not 1 <= limit <= 100:
            raise KnowledgeError("'limit' must be between 1 and 100", code="invalid_value", param="limit")
        return self.store.list_documents(tenant_id, limit=limit, cursor=cursor)

    def query(self, tenant_id: str, query: Any, top_k: Any = 5, filters: Any = None,
              mode: str = "hybrid") -> list[StoredChunk]:
        if not isinstance(query, str) or not query.strip():
            raise KnowledgeError("'query' must be a non-empty string", code="invalid_type", param="query")
        if len(query) > 4000:
            raise KnowledgeError("'query' is longer than 4000 characters", code="invalid_value", param="query")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 50:
            raise KnowledgeError("'top_k' must be an integer between 1 and 50", code="invalid_value", param="top_k")
        if filters is not None and (not isinstance(filters, dict) or not all(
                isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool))) for k, v in filters.items())):
            raise KnowledgeError("'filters' must map metadata keys to a string, number or boolean",
                                 code="invalid_type", param="filters")
        if mode not in ("hybrid", "vector", "keyword"):
            raise KnowledgeError("'mode' must be hybrid, vector or keyword", code="invalid_value", param="mode")
        return self.retriever.search(tenant_id, query, top_k=top_k, filters=filters or None, mode=mode)

    def reembed(self, tenant_id: str, progress: Callable[[int], None] | None = None) -> int:
        """Re-embed every chunk not embedded with the current model; returns how many.

        ``progress(done)`` is called after each batch with the number of chunks re-embedded so far."""
        e = self.embedder
        done = 0
        while True:
            batch = self.store.chunks_needing_embedding(tenant_id, e.name, limit=256)
            if not batch:
                break
            vectors = self.embed_passages([_embed_text(c.document_title or "", c.heading_path, c.text) for c in batch])
            self.store.replace_vectors(tenant_id, [c.id for c in batch], vectors, e.name)
            done += len(batch)
            if progress:
                progress(done)
        if done:
            self._changed(tenant_id)
        return done


def chunk_public(c: StoredChunk) -> dict[str, Any]:
    return {
        "id": c.id, "object": "chunk", "score": round(float(c.score), 6), "text": c.text,
        "document": {"id": c.document_id, "title": c.document_title, "source_url": c.source_url,
                     "external_id": c.external_id, "version": c.document_version},
        "span": {"start": c.start, "end": c.end}, "heading_path": c.heading_path, "ordinal": c.ordinal,
    }


def _embed_text(title: str, heading_path: list[str], text: str) -> str:
    # The title and headings carry what a chunk is about when its own text does not say it.
    prefix = " > ".join([p for p in [title, *heading_path] if p])
    return f"{prefix}\n{text}" if prefix else text


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(str(value))
        return True
    except ValueError:
        return False
