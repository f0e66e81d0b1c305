"""The tenant-scoped response cache: an exact cache and a semantic cache, looked up before the model call.

Wired into the request path by ``ChatCall.lookup_cache`` / ``serve_cached`` / ``_store_in_cache``
(gateway/chat.py) and ``Gateway.cache`` / ``degraded_from_cache`` / ``knowledge_changed``; the
library on its own:

    cache = ResponseCache(db)               # all-MiniLM-L6-v2 (the threshold is calibrated for it)
    scope = cache.key_for(tenant_id, feature, messages, tier, grounding_doc_versions)
    hit = await cache.lookup(scope, threshold=policy.threshold)      # exact, then semantic
    ...                                                              # on a miss: call the model
    if should_store(status, finish_reason=..., text=answer):
        cache.store(scope, answer, model=..., usage_tokens=usage, cost_micro_usd=cost,
                    citations=citations, doc_versions=versions, ttl_s=policy.ttl_s)

Scope. An entry is only ever compared with requests of the same *scope*: a hash of the tenant,
the feature, the system prompt, the model tier, the whole conversation before the last user
message (roles and contents), whether the answer is grounded, and any extra parameters the
caller folds in (``max_tokens``, ``stop``, the knowledge request, an end user for per-user
features). Within a scope the key is the last user message.

Exact: the normalised last user message (:func:`~loadbear.gateway.cache_text.normalize_exact`),
hashed with the scope, under a unique index.

Semantic, only after an exact miss: candidates come from word-set neighbourhood keys (an indexed
``IN`` on ``cache_keys``, see :mod:`loadbear.gateway.cache_text`), never from a scan, so a lookup
costs the same with 100k entries in the scope. The exact read and the candidate read are one SQL
statement (the candidates are not read when the exact entry exists), which also carries a
grounded entry's document versions, run through ``db.tenant_fetch``: one round trip to PostgreSQL
(the tenant setting and the read pipelined in one implicit read-only transaction, RLS in force;
see storage/db.py), one statement on SQLite. Candidates then pass three gates, cheapest first:
the look-alike guard (entities, numbers, negations, contrast words must agree), a static
bag-of-word-pieces embedding (~50 µs) that drops candidates far from the question, and only then
the real embedding (all-MiniLM-L6-v2 by default): cosine ≥ the tenant's threshold (0.95 by
default). The query's MiniLM embedding is therefore computed only when a plausible candidate
exists; a lookup that finds none costs one statement of indexed reads and some string work.

Grounded answers record ``(document_id, version)`` of their sources (``cache_entry_documents``).
``invalidate_documents`` / ``invalidate_stale`` (from ``Gateway.knowledge_changed``) delete the
entries of changed or deleted documents, and every hit is verified again against ``documents``
(and against the current request's retrieval, when given) before it is served: a missed
invalidation can cost a hit, never serve a stale grounded answer.

Writes (embedding the question, inserting the entry, its keys and documents) happen on one
background thread, batched; ``store`` only enqueues. Hits are counted the same way (the writer
merges the notes of an entry and writes them every ``hit_note_delay_s``), and the same thread
deletes expired entries every ``purge_interval_s``. A failing lookup or store is logged and
counted (``counters["errors"]``) and never fails the request: the cache is then a miss.

Isolation: every statement filters on the tenant and runs in ``db.tenant_tx(tenant)`` or
``db.tenant_fetch(tenant, ...)``, so on PostgreSQL row-level security (``0008_cache``, keys
revised by ``0010_cache_exact_key``) holds under the SQL; the scope hash includes the tenant as
well, so even the keys of two tenants never coincide.

Values, settings and the SQL column lists live in :mod:`loadbear.gateway.cache_values`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import orjson

from loadbear.gateway.cache_text import StaticEmbedder, guard, normalize_exact, question_keys
from loadbear.gateway.cache_values import (
    _CAND_COLUMNS,
    _CAND_PLAIN,
    _DOCS_PG,
    _DOCS_SQLITE,
    _HIT_COLUMNS,
    CacheHit,
    CachePolicy,
    CacheScope,
    CacheSettings,
    _Hit,
    _hit,
    _msg_text,
    _content,
    _sha,
    _Store,
    _usage,
    _uuid,
    doc_versions_from_citations,
    should_store,
    stream_pieces,
)
from loadbear.storage.db import Conn, Database
from loadbear.storage.values import db_time, dumps, loads, utcnow, uuid7

log = logging.getLogger("loadbear.cache")

__all__ = [
    "CacheHit",
    "CachePolicy",
    "CacheScope",
    "CacheSettings",
    "ResponseCache",
    "doc_versions_from_citations",
    "should_store",
    "stream_pieces",
]

SCOPE_VERSION = "lbc1"
SYSTEM_ROLES = ("system", "developer")


# -- the cache ------------------------------------------------------------------------------

_STOP = object()
_FLUSH = object()  # asks the writer to write the hit notes it holds now


class ResponseCache:
    """Exact + semantic response cache over the database's ``cache_*`` tables."""

    def __init__(self, db: Database, embedder_factory: Callable[[], Any] | None = None,
                 settings: CacheSettings | None = None, *, static: StaticEmbedder | None | bool = None,
                 background: bool = True) -> None:
        self.db = db
        self.settings = settings or CacheSettings()
        self._embedder_factory = embedder_factory
        self._embedder: Any = None
        self._static: StaticEmbedder | None = static if isinstance(static, StaticEmbedder) else None
        self._static_off = static is False
        self._init_lock = threading.Lock()
        self.background = background
        self._queue: "queue.Queue[Any]" = queue.Queue(self.settings.queue_max)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.dropped = 0  # stores refused because the queue was full
        self.counters: dict[str, int] = {"lookups": 0, "exact": 0, "semantic": 0, "embedded": 0,
                                         "guard_rejects": 0, "gate_rejects": 0, "stale_rejects": 0, "errors": 0}

    # -- embedders ---------------------------------------------------------------------------

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            with self._init_lock:
                if self._embedder is None:
                    if self._embedder_factory is not None:
                        self._embedder = self._embedder_factory()
                    else:
                        from loadbear.knowledge.embeddings import get_embedder

                        self._embedder = get_embedder(None)
        return self._embedder

    @property
    def static(self) -> StaticEmbedder | None:
        if self._static is None and not self._static_off:
            with self._init_lock:
                if self._static is None and not self._static_off:
                    try:
                        from loadbear.knowledge.embeddings import MiniLMEmbedder

                        e = self._embedder if isinstance(self._embedder, MiniLMEmbedder) else None
                        self._static = StaticEmbedder.from_minilm(e)
                    except Exception as exc:  # MiniLM not installed: no gate, MiniLM-free setups still work
                        log.warning("response cache: no static pre-filter (%s)", exc)
                        self._static_off = True
        return self._static

    def embed_query(self, text: str) -> np.ndarray:
        self.counters["embedded"] += 1
        return np.asarray(self.embedder.embed([text])[0], dtype=np.float32)

    # -- scope -------------------------------------------------------------------------------

    def key_for(self, tenant_id: str, feature: str, messages: Sequence[Mapping[str, Any]], tier: str | None,
                grounding_doc_versions: Mapping[str, int] | Iterable[Mapping[str, Any]] | None = None, *,
                extra: Mapping[str, Any] | None = None) -> CacheScope:
        """The request's scope and keys. ``grounding_doc_versions``: None for an ungrounded request,
        else the retrieved sources as ``{document_id: version}`` (or the citations list)."""
        tenant_id = str(tenant_id)
        msgs = list(messages)
        grounded = grounding_doc_versions is not None
        versions: dict[str, int] | None = None
        if grounded:
            versions = (dict((str(k), int(v)) for k, v in grounding_doc_versions.items())  # type: ignore[union-attr]
                        if isinstance(grounding_doc_versions, Mapping)
                        else doc_versions_from_citations(grounding_doc_versions))  # type: ignore[arg-type]
        i = 0
        while i < len(msgs) and msgs[i].get("role") in SYSTEM_ROLES:
            i += 1
        system = [_msg_text(m) for m in msgs[:i]]
        last = msgs[-1] if msgs else None
        query = _content(last) if last is not None else ""
        context = [[m.get("role"), _content(m)] for m in msgs[i:-1]] if last is not None else []
        material = orjson.dumps(
            [SCOPE_VERSION, tenant_id, feature, tier or "", _sha(orjson.dumps(system)), _sha(orjson.dumps(context)),
             grounded, extra or {}], option=orjson.OPT_SORT_KEYS)
        scope_hash = _sha(material)
        norm = normalize_exact(query)
        reason = None
        if last is None or last.get("role") != "user":
            reason = "last message is not a user message"
        elif not norm:
            reason = "empty question"
        elif grounded and not versions:
            reason = "grounded answer without sources"
        elif versions and any(_uuid(d) is None for d in versions):
            reason = "malformed document id"
        qk = question_keys(scope_hash, query) if reason is None and len(query) <= self.settings.semantic_max_chars \
            else None
        return CacheScope(
            tenant_id=tenant_id, feature=feature, tier=tier or "", scope_hash=scope_hash, query_text=query,
            exact_hash=_sha((scope_hash + "\x00" + norm).encode("utf-8")), entry_keys=qk.entry if qk else (),
            probe_keys=qk.probe if qk else (), subst_keys=qk.subst if qk else (), grounded=grounded,
            doc_versions=versions, cacheable=reason is None, reason=reason,
        )

    # -- lookup ------------------------------------------------------------------------------

    async def lookup(self, scope: CacheScope, query_text: str | None = None, threshold: float | None = None, *,
                     query_vector: Any = None, semantic: bool = True) -> CacheHit | None:
        """Exact, then (after an exact miss) semantic. Runs in a worker thread: the reads and the
        query embedding (when needed) never block the event loop."""
        if not scope.cacheable:
            return None
        try:
            return await asyncio.to_thread(self.lookup_sync, scope, query_text, threshold,
                                           query_vector=query_vector, semantic=semantic)
        except Exception:  # a broken cache is a miss, never a failed request
            self.counters["errors"] += 1
            log.exception("response cache: lookup failed; answering without the cache")
            return None

    async def lookup_degraded(self, scope: CacheScope, query_text: str | None = None,
                              threshold: float | None = None) -> CacheHit | None:
        """Every model failed: the most similar cached answer at a looser threshold (0.85 by default),
        marked ``degraded``. Also compares the scope's most recent entries, not only neighbours."""
        if not scope.cacheable:
            return None
        try:
            return await asyncio.to_thread(self.lookup_degraded_sync, scope, query_text, threshold)
        except Exception:
            self.counters["errors"] += 1
            log.exception("response cache: degraded lookup failed")
            return None

    def lookup_sync(self, scope: CacheScope, query_text: str | None = None, threshold: float | None = None, *,
                    query_vector: Any = None, semantic: bool = True, now: datetime | None = None) -> CacheHit | None:
        if not scope.cacheable:
            return None
        self.counters["lookups"] += 1
        query = scope.query_text if query_text is None else query_text
        threshold = self.settings.default_threshold if threshold is None else float(threshold)
        now = now or utcnow()
        t = self._t(now)
        semantic = semantic and bool(scope.probe_keys)
        # One statement, one round trip (``db.tenant_fetch``): the exact entry, else the
        # neighbourhood candidates, each with its documents' versions when grounded.
        rows = self._candidates(scope, t, with_exact=True, neighbours=semantic)
        row = next((r for r in rows if r["exact"]), None)
        cands = [r for r in rows if not r["exact"]]
        if row is not None:
            if not row["grounded"] or self._docs_ok(scope, row["docs"]):
                self.counters["exact"] += 1
                hit = _hit(row, "exact", 1.0)
                self._note_hit(scope.tenant_id, hit.entry_id, now)
                return hit
            self.counters["stale_rejects"] += 1
            if semantic:  # a stale exact entry: look at the neighbours after all
                cands = self._candidates(scope, t)
        if not semantic:
            return None
        return self._semantic(scope, query, cands, threshold, query_vector, now, degraded=False)

    def lookup_degraded_sync(self, scope: CacheScope, query_text: str | None = None,
                             threshold: float | None = None, now: datetime | None = None) -> CacheHit | None:
        if not scope.cacheable:
            return None
        query = scope.query_text if query_text is None else query_text
        threshold = self.settings.default_degraded_threshold if threshold is None else float(threshold)
        now = now or utcnow()
        t = self._t(now)
        # Not the hot path (every model already failed): plain transactions are fine here.
        cands = self._candidates(scope, t) if scope.probe_keys else []
        with self.db.tenant_tx(scope.tenant_id, write=False) as c:
            row = c.fetchone(
                f"SELECT {_HIT_COLUMNS} FROM cache_entries WHERE tenant_id = ? AND exact_hash = ? AND expires_at > ?",
                (scope.tenant_id, scope.exact_hash, t))
            if row is not None and (not row["grounded"] or self._docs_valid(c, scope, str(row["id"]))):
                hit = _hit(row, "exact", 1.0, degraded=True)
                self._note_hit(scope.tenant_id, hit.entry_id, now)
                return hit
            seen = {r["id"] for r in cands}
            recent = c.fetchall(
                f"SELECT {_CAND_PLAIN}, 0 AS n FROM cache_entries"
                " WHERE scope_hash = ? AND tenant_id = ? AND expires_at > ? ORDER BY created_at DESC LIMIT ?",
                (scope.scope_hash, scope.tenant_id, t, int(self.settings.degraded_scan)))
            cands += [r for r in recent if r["id"] not in seen]
        return self._semantic(scope, query, cands, threshold, None, now, degraded=True, gate=False)

    def _candidates(self, scope: CacheScope, t: Any, with_exact: bool = False,
                    neighbours: bool = True) -> list[dict[str, Any]]:
        """The entries sharing most neighbourhood keys with the question: an index-only aggregation
        over a bounded number of key rows, then at most ``max_candidates`` entry rows.

        ``with_exact``: the same statement first reads the exact entry (``exact`` = 1) and returns it
        alone when there is one. ``neighbours`` False: the exact entry only. Either way one
        statement through ``db.tenant_fetch``: one round trip to PostgreSQL, RLS in force. Rows of
        grounded entries carry ``docs``: ``[document_id, version built from, current version]``."""
        st = self.settings
        pg = self.db.dialect == "postgres"
        docs = _DOCS_PG if pg else _DOCS_SQLITE
        exact_cte = exact_sql = ""
        exact_params: tuple[Any, ...] = ()
        if with_exact:
            exact_cte = (f"x AS MATERIALIZED (SELECT {_CAND_COLUMNS}, {docs} FROM cache_entries e"
                         " WHERE e.tenant_id = ? AND e.exact_hash = ? AND e.expires_at > ?)")
            exact_params = (scope.tenant_id, scope.exact_hash, t)
            exact_sql = f"SELECT 1 AS exact, {_CAND_PLAIN}, docs, 0 AS n FROM x"
        if not neighbours:
            rows = self.db.tenant_fetch(scope.tenant_id, f"WITH {exact_cte} {exact_sql}", exact_params)
            return [r for r in rows if r["scope_hash"] == scope.scope_hash]
        if pg:
            in_keys = "key = ANY(?::bigint[])"
            probe, subst = list(scope.probe_keys), list(scope.subst_keys)
        else:
            in_keys = "key IN (SELECT value FROM json_each(?))"
            probe, subst = dumps(list(scope.probe_keys)), dumps(list(scope.subst_keys))
        # exact_hash and the keys already include the scope: the scope is checked on the few rows
        # returned, not in SQL, so that no plan can prefer a scan of the scope's index.
        rows = self.db.tenant_fetch(
            scope.tenant_id,
            f"WITH {exact_cte + ', ' if with_exact else ''}m AS ("
            f" SELECT p.entry_id, 2 AS w FROM (SELECT entry_id FROM cache_keys WHERE tenant_id = ? AND {in_keys}"
            " LIMIT ?) p"
            " UNION ALL"
            f" SELECT s.entry_id, 1 AS w FROM (SELECT entry_id FROM cache_keys WHERE tenant_id = ? AND {in_keys}"
            " LIMIT ?) s),"
            " top AS (SELECT entry_id, SUM(w) AS n FROM m GROUP BY entry_id ORDER BY n DESC LIMIT ?)"
            f" {exact_sql + ' UNION ALL ' if with_exact else ''}SELECT * FROM (SELECT 0 AS exact, {_CAND_COLUMNS},"
            f" {docs}, top.n FROM top"
            " JOIN cache_entries e ON e.id = top.entry_id"
            " WHERE e.tenant_id = ? AND e.expires_at > ?"
            + (" AND NOT EXISTS (SELECT 1 FROM x)" if with_exact else "")
            + " ORDER BY top.n DESC, e.created_at DESC) c",
            (*exact_params, scope.tenant_id, probe, int(st.probe_rows), scope.tenant_id, subst, int(st.subst_rows),
             int(st.max_candidates), scope.tenant_id, t))
        return [r for r in rows if r["scope_hash"] == scope.scope_hash]

    def _semantic(self, scope: CacheScope, query: str, cands: list[dict[str, Any]], threshold: float,
                  query_vector: Any, now: datetime, *, degraded: bool, gate: bool = True) -> CacheHit | None:
        if not cands:
            return None
        # 1. the look-alike guard (string work only)
        kept = []
        for r in cands:
            if guard(query, r["query_text"]) is None:
                kept.append(r)
            else:
                self.counters["guard_rejects"] += 1
        if not kept:
            return None
        # 2. the static gate (~50 µs a text) before paying for the real embedding
        st = self.static if gate else None
        if st is not None and self.settings.static_gate > -1.0:
            vecs = st.embed_cached([query] + [r["query_text"] for r in kept])
            sims = vecs[1:] @ vecs[0]
            before = len(kept)
            kept = [r for r, s in zip(kept, sims) if s >= self.settings.static_gate]
            self.counters["gate_rejects"] += before - len(kept)
            if not kept:
                return None
        # 3. the real embedding
        name = getattr(self.embedder, "name", None)
        kept = [r for r in kept if r["embedding"] is not None and r["embedding_model"] == name]
        if not kept:
            return None
        qv = query_vector
        if qv is None and query == scope.query_text:
            qv = scope.query_vector
        if qv is None:
            qv = self.embed_query(query)
        qv = np.asarray(qv, dtype=np.float32).reshape(-1)
        if query == scope.query_text:
            scope.query_vector, scope.embedding_model = qv, name
        rows = [np.frombuffer(bytes(r["embedding"]), dtype="<f4") for r in kept]
        ok = [(r, v) for r, v in zip(kept, rows) if v.shape == qv.shape]
        if not ok:
            return None
        sims = np.stack([v for _, v in ok]) @ qv
        order = np.argsort(-sims, kind="stable")
        for j in order:
            sim = float(sims[j])
            if sim < threshold:
                break
            row = ok[j][0]
            if row["grounded"]:
                if "docs" in row:  # read with the candidate (the lookup's one statement)
                    valid = self._docs_ok(scope, row["docs"])
                else:
                    with self.db.tenant_tx(scope.tenant_id, write=False) as c:
                        valid = self._docs_valid(c, scope, str(row["id"]))
                if not valid:
                    self.counters["stale_rejects"] += 1
                    continue
            hit = _hit(row, "semantic", sim, degraded=degraded)
            if hit is not None:
                self.counters["semantic"] += 1
                self._note_hit(scope.tenant_id, hit.entry_id, now)
                return hit
        return None

    def _docs_valid(self, c: Conn, scope: CacheScope, entry_id: str) -> bool:
        """A grounded entry is served only if each of its documents still has the version it was
        built from, and (when the request retrieved sources) each is among them at that version."""
        rows = c.fetchall(
            "SELECT ced.document_id, ced.version, d.version AS current FROM cache_entry_documents ced"
            " LEFT JOIN documents d ON d.id = ced.document_id AND d.tenant_id = ced.tenant_id"
            " WHERE ced.entry_id = ? AND ced.tenant_id = ?", (entry_id, scope.tenant_id))
        return self._docs_ok(scope, [(r["document_id"], r["version"], r["current"]) for r in rows])

    @staticmethod
    def _docs_ok(scope: CacheScope, docs: Any) -> bool:
        """``_docs_valid`` on ``[document_id, version, current]`` triples already read."""
        docs = loads(docs) if isinstance(docs, (str, bytes)) else docs
        if not docs:
            return False
        for doc_id, version, current in docs:
            if current is None or int(current) != int(version):
                return False
            if scope.doc_versions is not None and scope.doc_versions.get(str(doc_id)) != int(version):
                return False
        return True

    # -- store -------------------------------------------------------------------------------

    def store(self, scope: CacheScope, query_text: str | None = None, answer_text: str = "", *, model: str,
              usage_tokens: Any = None, cost_micro_usd: int = 0, citations: list[dict[str, Any]] | None = None,
              doc_versions: Mapping[str, int] | None = None, ttl_s: float | None = None,
              now: datetime | None = None) -> bool:
        """Queue an answer for the cache (cheap: the embedding and the writes happen on the writer
        thread). Returns False when it cannot be cached (scope, size, full queue). The caller
        decides *whether* with :func:`should_store`."""
        try:
            return self._store(scope, query_text, answer_text, model=model, usage_tokens=usage_tokens,
                               cost_micro_usd=cost_micro_usd, citations=citations, doc_versions=doc_versions,
                               ttl_s=ttl_s, now=now)
        except Exception:  # never fails the request it is called from
            self.counters["errors"] += 1
            log.exception("response cache: store failed")
            return False

    def _store(self, scope: CacheScope, query_text: str | None, answer_text: str, *, model: str, usage_tokens: Any,
               cost_micro_usd: int, citations: list[dict[str, Any]] | None, doc_versions: Mapping[str, int] | None,
               ttl_s: float | None, now: datetime | None, sync: bool = False) -> bool:
        if not scope.cacheable or not answer_text or len(answer_text) > self.settings.max_answer_chars:
            return False
        query = scope.query_text if query_text is None else query_text
        versions = dict(doc_versions) if doc_versions is not None else scope.doc_versions
        if scope.grounded and not versions:
            return False
        prompt_tokens, completion_tokens = _usage(usage_tokens)
        now = now or utcnow()
        ttl = self.settings.default_ttl_s if ttl_s is None else float(ttl_s)
        if ttl <= 0:
            return False
        item = _Store(scope=scope, query=query, answer=answer_text, model=model, prompt_tokens=prompt_tokens,
                      completion_tokens=completion_tokens, cost=int(cost_micro_usd or 0), citations=citations,
                      versions=versions, created=now, expires=now + timedelta(seconds=ttl),
                      vector=scope.query_vector if query == scope.query_text else None,
                      vector_model=scope.embedding_model)
        if sync or not self.background:
            self._write([item])
            return True
        return self._enqueue(item)

    def store_sync(self, scope: CacheScope, query_text: str | None = None, answer_text: str = "", *, model: str,
                   **kw: Any) -> bool:
        """``store`` written before it returns; errors are raised (tests, benchmarks, CLI)."""
        kw.setdefault("usage_tokens", None)
        kw.setdefault("cost_micro_usd", 0)
        kw.setdefault("citations", None)
        kw.setdefault("doc_versions", None)
        kw.setdefault("ttl_s", None)
        kw.setdefault("now", None)
        return self._store(scope, query_text, answer_text, model=model, sync=True, **kw)

    def _enqueue(self, item: Any) -> bool:
        if self._closed:
            return False
        self._ensure_writer()
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def _note_hit(self, tenant_id: str, entry_id: str, now: datetime) -> None:
        if self.background and not self._closed:
            self._ensure_writer()
            try:
                self._queue.put_nowait(_Hit(tenant_id, entry_id, now))
            except queue.Full:
                pass

    def _ensure_writer(self) -> None:
        if self._thread is None:
            with self._init_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="loadbear-cache-writer", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        st = self.settings
        interval = st.purge_interval_s
        next_purge = time.monotonic() + interval
        notes: dict[tuple[str, str], _Hit] = {}  # held hit notes, by entry
        held = 0  # queue items behind them: marked done once written
        notes_due = 0.0
        while True:
            now = time.monotonic()
            if interval > 0 and now >= next_purge:
                next_purge = now + interval
                try:
                    self.purge_expired()
                except Exception:
                    log.exception("response cache: purging expired entries failed")
            waits = ([max(0.05, next_purge - now)] if interval > 0 else []) + ([max(0.0, notes_due - now)]
                                                                                  if notes else [])
            try:
                batch = [self._queue.get(timeout=min(waits) if waits else None)]
            except queue.Empty:
                batch = []
            while batch and len(batch) < st.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(x is _STOP for x in batch)
            for h in batch:
                if isinstance(h, _Hit):
                    if not notes:
                        notes_due = time.monotonic() + st.hit_note_delay_s
                    held += 1
                    prev = notes.get((h.tenant_id, h.entry_id))
                    notes[(h.tenant_id, h.entry_id)] = h if prev is None else _Hit(
                        h.tenant_id, h.entry_id, max(prev.at, h.at), prev.n + h.n)
            write_notes = bool(notes) and (stop or len(notes) >= st.hit_note_max or time.monotonic() >= notes_due
                                           or any(x is _FLUSH for x in batch))
            try:
                self._write([x for x in batch if isinstance(x, _Store)] + (list(notes.values()) if write_notes else []))
            except Exception:  # a cache write may fail; the request it came from has long been answered
                log.exception("response cache: writing %d item(s) failed", len(batch))
            finally:
                for x in batch:
                    if not isinstance(x, _Hit):
                        self._queue.task_done()
                if write_notes:
                    for _ in range(held):
                        self._queue.task_done()
                    notes.clear()
                    held = 0
            if stop:
                return

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is written (tests, benchmarks, shutdown)."""
        deadline = time.monotonic() + timeout
        if self._thread is not None and self._queue.unfinished_tasks:
            try:  # held hit notes are written now, not after hit_note_delay_s
                self._queue.put_nowait(_FLUSH)
            except queue.Full:
                pass
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
            self._thread = None

    def _write(self, items: list[Any]) -> None:
        stores = [x for x in items if isinstance(x, _Store)]
        hits = [x for x in items if isinstance(x, _Hit)]
        if stores:
            self._embed_missing(stores)
            by_tenant: dict[str, list[_Store]] = {}
            for s in stores:
                by_tenant.setdefault(s.scope.tenant_id, []).append(s)
            for tenant, group in by_tenant.items():
                with self.db.tenant_tx(tenant) as c:
                    self._insert_many(c, group)
        if hits:
            by_tenant_h: dict[str, list[_Hit]] = {}
            for h in hits:
                by_tenant_h.setdefault(h.tenant_id, []).append(h)
            for tenant, group in by_tenant_h.items():
                with self.db.tenant_tx(tenant) as c:
                    c.executemany("UPDATE cache_entries SET hits = hits + ?, last_hit_at = ? WHERE id = ? AND tenant_id = ?",
                                  [(h.n, self._t(h.at), h.entry_id, tenant) for h in group])

    def _embed_missing(self, stores: list["_Store"]) -> None:
        need = [s for s in stores if s.scope.entry_keys and (s.vector is None or s.vector_model != self._embedder_name())]
        if not need:
            return
        try:
            vecs = np.asarray(self.embedder.embed([s.query for s in need]), dtype=np.float32)
        except Exception:
            log.exception("response cache: embedding %d question(s) failed; stored for exact hits only", len(need))
            for s in need:
                s.vector = None
            return
        name = self._embedder_name()
        for s, v in zip(need, vecs):
            s.vector, s.vector_model = v, name

    def _embedder_name(self) -> str | None:
        try:
            return getattr(self.embedder, "name", None)
        except Exception:
            return None

    def _insert_many(self, c: Conn, stores: list["_Store"]) -> int:
        """Write one tenant's batch: each entry replaces the one with its scope and exact key, with
        its neighbourhood keys and documents. Grounded answers whose sources changed meanwhile are
        dropped. Returns how many entries were written."""
        latest: dict[tuple[str, str], _Store] = {}
        for s in stores:
            sc = s.scope
            # Never store an answer whose sources changed while it was being made or queued.
            if sc.grounded and (not s.versions or not self._versions_current(c, sc.tenant_id, s.versions)):
                continue
            latest[(sc.scope_hash, sc.exact_hash)] = s  # the newest answer for a question wins
        if not latest:
            return 0
        deletes, entries, keys, docs = [], [], [], []
        for s in latest.values():
            sc = s.scope
            deletes.append((sc.tenant_id, sc.exact_hash))
            entry_id = uuid7()
            blob = None if s.vector is None else np.ascontiguousarray(s.vector, dtype="<f4").tobytes()
            entries.append((entry_id, sc.tenant_id, sc.scope_hash, sc.exact_hash, sc.feature, sc.tier, s.query,
                            s.answer, s.model, s.prompt_tokens, s.completion_tokens, s.cost,
                            None if s.citations is None else dumps(s.citations), sc.grounded,
                            s.vector_model if blob is not None else None, blob, self._t(s.created),
                            self._t(s.expires)))
            if blob is not None:  # only an entry with a vector can be a semantic candidate
                ks = sc.entry_keys if s.query == sc.query_text else question_keys(sc.scope_hash, s.query).entry
                keys += [(sc.tenant_id, k, entry_id) for k in dict.fromkeys(ks)]
            if sc.grounded and s.versions:
                docs += [(entry_id, sc.tenant_id, d, int(v)) for d, v in s.versions.items()]
        c.executemany("DELETE FROM cache_entries WHERE tenant_id = ? AND exact_hash = ?", deletes)
        c.executemany(
            "INSERT INTO cache_entries (id, tenant_id, scope_hash, exact_hash, feature, tier, query_text, answer_text,"
            " model, prompt_tokens, completion_tokens, cost_micro_usd, citations, grounded, embedding_model, embedding,"
            " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", entries)
        c.executemany("INSERT INTO cache_keys (tenant_id, key, entry_id) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", keys)
        c.executemany("INSERT INTO cache_entry_documents (entry_id, tenant_id, document_id, version)"
                      " VALUES (?, ?, ?, ?)", docs)
        return len(entries)

    def _versions_current(self, c: Conn, tenant_id: str, versions: Mapping[str, int]) -> bool:
        ids = [d for d in versions if _uuid(d) is not None]
        if len(ids) != len(versions):
            return False
        if c.dialect == "postgres":
            rows = c.fetchall("SELECT id, version FROM documents WHERE tenant_id = ? AND id = ANY(?::uuid[])",
                              (tenant_id, ids))
        else:
            rows = c.fetchall("SELECT id, version FROM documents WHERE tenant_id = ?"
                              " AND id IN (SELECT value FROM json_each(?))", (tenant_id, dumps(ids)))
        current = {str(r["id"]): int(r["version"]) for r in rows}
        return all(current.get(d) == int(v) for d, v in versions.items())

    # -- invalidation and housekeeping -------------------------------------------------------

    def invalidate_documents(self, tenant_id: str, doc_ids: Iterable[str]) -> int:
        """Delete the tenant's entries built from any of these documents; returns how many."""
        tenant_id = str(tenant_id)
        ids = [u for u in (_uuid(d) for d in doc_ids) if u is not None]
        if not ids:
            return 0
        with self.db.tenant_tx(tenant_id) as c:
            if c.dialect == "postgres":
                sub = "document_id = ANY(?::uuid[])"
                param: Any = ids
            else:
                sub = "document_id IN (SELECT value FROM json_each(?))"
                param = dumps(ids)
            return int(c.execute(
                "DELETE FROM cache_entries WHERE tenant_id = ? AND id IN (SELECT entry_id FROM cache_entry_documents"
                f" WHERE tenant_id = ? AND {sub})", (tenant_id, tenant_id, param)).rowcount or 0)

    def invalidate_stale(self, tenant_id: str) -> int:
        """Delete the tenant's grounded entries whose documents changed or are gone; returns how many.
        What ``Gateway.knowledge_changed(tenant_id)`` calls (it is not told which documents)."""
        tenant_id = str(tenant_id)
        with self.db.tenant_tx(tenant_id) as c:
            return int(c.execute(
                "DELETE FROM cache_entries WHERE tenant_id = ? AND id IN ("
                " SELECT ced.entry_id FROM cache_entry_documents ced"
                " LEFT JOIN documents d ON d.id = ced.document_id AND d.tenant_id = ced.tenant_id"
                " WHERE ced.tenant_id = ? AND (d.id IS NULL OR d.version <> ced.version))",
                (tenant_id, tenant_id)).rowcount or 0)

    knowledge_changed = invalidate_stale

    def clear(self, tenant_id: str) -> int:
        """Delete every entry of the tenant."""
        with self.db.tenant_tx(str(tenant_id)) as c:
            return int(c.execute("DELETE FROM cache_entries WHERE tenant_id = ?", (str(tenant_id),)).rowcount or 0)

    def purge_expired(self, now: datetime | None = None, limit: int = 10_000) -> int:
        """Delete expired entries of every tenant (with their keys and documents), at most ``limit``
        per call; returns how many. Run it periodically (admin work: ``system_tx``)."""
        t = self._t(now or utcnow())
        with self.db.system_tx() as c:
            return int(c.execute("DELETE FROM cache_entries WHERE id IN"
                                 " (SELECT id FROM cache_entries WHERE expires_at <= ? LIMIT ?)",
                                 (t, int(limit))).rowcount or 0)

    def count(self, tenant_id: str) -> int:
        with self.db.tenant_tx(str(tenant_id), write=False) as c:
            return int(c.scalar("SELECT COUNT(*) FROM cache_entries WHERE tenant_id = ?", (str(tenant_id),)) or 0)

    def _t(self, dt: datetime) -> Any:
        return db_time(self.db.dialect, dt)
