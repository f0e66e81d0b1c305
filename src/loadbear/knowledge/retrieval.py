"""Hybrid retrieval over one tenant's knowledge base: keywords + vectors, fused by reciprocal rank.

``Retriever(store, embedder, reranker=None).search(tenant_id, query, top_k, filters, mode)``:

* ``mode="vector"``: the query is embedded and the nearest chunks (cosine) come back, scored
  by cosine similarity;
* ``mode="keyword"``: full-text search (FTS5 bm25 on SQLite, ``ts_rank_cd`` on PostgreSQL),
  scored by that rank (larger is better; the scales differ per backend);
* ``mode="hybrid"`` (default): ``candidates_per_k x top_k`` candidates from each, fused with
  reciprocal rank fusion, ``score = sum over lists of 1 / (rrf_k + rank)`` with ranks from 1 and
  ``rrf_k = 60`` (Cormack et al.); ties break by the better single rank, then by id.

Metadata filters (equality on document metadata keys) are applied inside both searches. A
``reranker(query, chunks) -> chunks`` hook, when given, reorders (and may drop) the fused
candidates before the cut to ``top_k``; the scores it leaves on the chunks are kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from loadbear.knowledge.types import Embedder, KnowledgeError, StoredChunk

__all__ = ["Retriever", "Reranker", "reciprocal_rank_fusion", "RRF_K", "SearchTimings"]

RRF_K = 60
MODES = ("hybrid", "vector", "keyword")

Reranker = Callable[[str, list[StoredChunk]], list[StoredChunk]]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], k: int = RRF_K) -> list[tuple[str, float]]:
    """Fuse ranked id lists: ``score(id) = sum(1 / (k + rank))``, rank counted from 1.

    Sorted by score, then by the best rank the id had in any list, then by id (deterministic).
    """
    scores: dict[str, float] = {}
    best: dict[str, int] = {}
    for ranking in rankings:
        for rank, item in enumerate(dict.fromkeys(ranking), start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
            best[item] = min(best.get(item, rank), rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]], kv[0]))


@dataclass
class SearchTimings:
    """Where the time of the last search went, in milliseconds."""

    embed_ms: float = 0.0
    vector_ms: float = 0.0
    keyword_ms: float = 0.0
    fetch_ms: float = 0.0
    rerank_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Retriever:
    def __init__(self, store: Any, embedder: Embedder | None, reranker: Reranker | None = None, *,
                 candidates_per_k: int = 4, rrf_k: int = RRF_K, max_candidates: int = 200) -> None:
        self.store = store
        self.embedder = embedder
        self.reranker = reranker
        self.candidates_per_k = candidates_per_k
        self.rrf_k = rrf_k
        self.max_candidates = max_candidates
        self.last_timings = SearchTimings()

    def search(self, tenant_id: str, query: str, top_k: int = 5, filters: dict[str, Any] | None = None,
               mode: str = "hybrid", *, query_vector: np.ndarray | None = None) -> list[StoredChunk]:
        """The tenant's ``top_k`` best chunks for ``query``, scores filled in.

        ``query_vector`` skips embedding the query (a caller that already embedded it, e.g. the
        semantic cache, passes it along).
        """
        if mode not in MODES:
            raise KnowledgeError("'mode' must be hybrid, vector or keyword", code="invalid_value", param="mode")
        if not isinstance(query, str) or not query.strip():
            raise KnowledgeError("'query' must be a non-empty string", code="invalid_type", param="query")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise KnowledgeError("'top_k' must be a positive integer", code="invalid_value", param="top_k")
        t = SearchTimings()
        self.last_timings = t
        n_cand = min(self.max_candidates, max(top_k, self.candidates_per_k * top_k)) if mode == "hybrid" else top_k
        if self.reranker is not None:
            n_cand = min(self.max_candidates, max(n_cand, self.candidates_per_k * top_k))

        vec_hits: list[tuple[str, float]] = []
        kw_hits: list[tuple[str, float]] = []
        if mode in ("hybrid", "vector"):
            if query_vector is None:
                if self.embedder is None:
                    raise KnowledgeError("vector search needs an embedder", code="no_embedder", status=503)
                t0 = time.perf_counter()
                query_vector = np.asarray(self.embedder.embed([query]), dtype=np.float32)[0]
                t.embed_ms = (time.perf_counter() - t0) * 1000
            model = getattr(self.embedder, "name", None) if self.embedder is not None else None
            t0 = time.perf_counter()
            vec_hits = self.store.vector_search(tenant_id, query_vector, n_cand, filters, embedding_model=model)
            t.vector_ms = (time.perf_counter() - t0) * 1000
        if mode in ("hybrid", "keyword"):
            t0 = time.perf_counter()
            kw_hits = self.store.keyword_search(tenant_id, query, n_cand, filters)
            t.keyword_ms = (time.perf_counter() - t0) * 1000

        if mode == "vector":
            ranked = vec_hits
        elif mode == "keyword":
            ranked = kw_hits
        else:
            ranked = reciprocal_rank_fusion([[i for i, _ in vec_hits], [i for i, _ in kw_hits]], self.rrf_k)
        if self.reranker is None:
            ranked = ranked[:top_k]
        t.extra = {"vector_hits": len(vec_hits), "keyword_hits": len(kw_hits)}

        t0 = time.perf_counter()
        chunks = self.store.get_chunks(tenant_id, [i for i, _ in ranked])
        t.fetch_ms = (time.perf_counter() - t0) * 1000
        score = dict(ranked)
        for ch in chunks:
            ch.score = float(score.get(ch.id, 0.0))

        if self.reranker is not None and chunks:
            t0 = time.perf_counter()
            chunks = list(self.reranker(query, chunks))
            t.rerank_ms = (time.perf_counter() - t0) * 1000
        return chunks[:top_k]
