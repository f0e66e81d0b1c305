"""Hybrid retrieval: reciprocal rank fusion, the reranking hook, and search over both backends."""

from __future__ import annotations

import re
import uuid
import zlib

import numpy as np
import pytest

from loadbear.knowledge.retrieval import RRF_K, Retriever, reciprocal_rank_fusion
from loadbear.knowledge.store import KnowledgeStore
from loadbear.knowledge.types import ChunkDraft, KnowledgeError, StoredChunk


class HashEmbedder:
    """Deterministic bag-of-words vectors (hashed unigrams): lexical, but a real Embedder."""

    name = "hash-bow-384"
    dim = 384

    def embed(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                h = zlib.crc32(w.encode())
                out[i, h % self.dim] += 1.0 if (h >> 16) & 1 else -1.0
            n = np.linalg.norm(out[i])
            out[i] = out[i] / n if n else np.eye(1, self.dim, 0)[0]
        return out


# -- reciprocal rank fusion ---------------------------------------------------------------------


def test_rrf_hand_built_case():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]])
    assert [i for i, _ in fused] == ["a", "c", "b", "d"]
    s = dict(fused)
    assert s["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert s["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert s["b"] == pytest.approx(1 / 62) and s["d"] == pytest.approx(1 / 63)
    assert RRF_K == 60


def test_rrf_ties_break_by_best_rank_then_id_and_duplicates_count_once():
    # x: ranks 1 and 3; y: rank 2 in both -> 1/61+1/63 > 2/62? (0.03227 vs 0.03226): x first
    fused = reciprocal_rank_fusion([["x", "y", "z"], ["z", "y", "x"]])
    assert [i for i, _ in fused][:2] == ["x", "z"] and fused[2][0] == "y"
    assert dict(fused)["x"] == pytest.approx(dict(fused)["z"])  # tie on score: best rank equal (1), then id
    assert [i for i, _ in reciprocal_rank_fusion([["q", "q", "p"]])] == ["q", "p"]
    assert reciprocal_rank_fusion([[], []]) == []


# -- the Retriever against a scripted store -----------------------------------------------------


class ScriptedStore:
    def __init__(self, vector, keyword):
        self.vector, self.keyword = vector, keyword
        self.calls = []

    def vector_search(self, tenant_id, q, k, filters=None, embedding_model=None):
        self.calls.append(("vector", tenant_id, k, filters, embedding_model))
        return self.vector[:k]

    def keyword_search(self, tenant_id, query, k, filters=None):
        self.calls.append(("keyword", tenant_id, k, filters))
        return self.keyword[:k]

    def get_chunks(self, tenant_id, ids):
        return [StoredChunk(id=i, document_id="d", ordinal=0, text=f"text {i}", start=0, end=1, heading_path=[],
                            token_count=1, embedding_model="m", embedding_dim=3) for i in ids]


def test_hybrid_fuses_and_fills_scores():
    store = ScriptedStore([("a", 0.9), ("b", 0.8), ("c", 0.7)], [("c", 5.0), ("a", 4.0), ("d", 3.0)])
    r = Retriever(store, HashEmbedder())
    got = r.search("t1", "query", top_k=3, filters={"p": "x"})
    assert [c.id for c in got] == ["a", "c", "b"]
    assert got[0].score == pytest.approx(1 / 61 + 1 / 62)
    assert ("vector", "t1", 12, {"p": "x"}, "hash-bow-384") in store.calls  # 4 x top_k candidates each
    assert ("keyword", "t1", 12, {"p": "x"}) in store.calls
    v = r.search("t1", "query", top_k=2, mode="vector")
    assert [(c.id, c.score) for c in v] == [("a", 0.9), ("b", 0.8)]
    k = Retriever(store, None).search("t1", "query", top_k=2, mode="keyword")  # no embedder needed
    assert [(c.id, c.score) for c in k] == [("c", 5.0), ("a", 4.0)]
    assert r.last_timings.keyword_ms >= 0


def test_reranker_hook_sees_candidates_and_decides_the_order():
    store = ScriptedStore([("a", 0.9), ("b", 0.8), ("c", 0.7)], [("c", 5.0), ("a", 4.0), ("d", 3.0)])
    seen = {}

    def reranker(query, chunks):
        seen["query"], seen["ids"] = query, [c.id for c in chunks]
        out = sorted(chunks, key=lambda c: c.id, reverse=True)
        for i, c in enumerate(out):
            c.score = 10.0 - i
        return out

    got = Retriever(store, HashEmbedder(), reranker=reranker).search("t", "q?", top_k=2)
    assert seen["query"] == "q?" and seen["ids"] == ["a", "c", "b", "d"]  # every fused candidate, in fused order
    assert [(c.id, c.score) for c in got] == [("d", 10.0), ("c", 9.0)]


def test_retriever_validation():
    r = Retriever(ScriptedStore([], []), None)
    with pytest.raises(KnowledgeError):
        r.search("t", "q", mode="semantic")
    with pytest.raises(KnowledgeError):
        r.search("t", "   ")
    with pytest.raises(KnowledgeError):
        r.search("t", "q", top_k=0)
    with pytest.raises(KnowledgeError):
        r.search("t", "q", mode="vector")  # no embedder
    assert r.search("t", "q", mode="vector", query_vector=np.ones(3)) == []


# -- over a real store, both backends -----------------------------------------------------------


DOCS = {
    "refunds": ("Refund policy", ["Customers may request their money back within 14 days of purchase.",
                                  "Refunds are paid to the original card within five business days."]),
    "errors": ("Error codes", ["Error ERR-4471 means the upload exceeded the size limit.",
                               "Error ERR-1002 means the session expired; sign in again."]),
    "security": ("Security", ["Rotate API keys every ninety days from the admin console.",
                              "Two-factor authentication can be enforced for every member."]),
    "shipping": ("Shipping", ["Orders ship within two days; express delivery arrives the next day.",
                              "International parcels may be held at customs for inspection."]),
}


def _tenants(db, n):
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with db.system_tx() as c:
        for i, t in enumerate(ids):
            c.execute("INSERT INTO tenants (id, slug, name) VALUES (?, ?, ?)", (t, f"ret-{i}-{t[:6]}", t))
    return ids


def _ingest(store, embedder, tenant, docs, extra_meta=None):
    for key, (title, texts) in docs.items():
        drafts, pos = [], 0
        for i, t in enumerate(texts):
            drafts.append(ChunkDraft(text=t, start=pos, end=pos + len(t), heading_path=[title], token_count=len(t.split()),
                                     ordinal=i))
            pos += len(t) + 1
        store.upsert_document(tenant, title=title, char_count=pos, external_id=key, metadata={"topic": key, **(extra_meta or {})},
                              chunks=drafts, vectors=embedder.embed([f"{title}\n{t}" for t in texts]),
                              embedding_model=embedder.name)


@pytest.fixture
def kb(db):
    a, b = _tenants(db, 2)
    store = KnowledgeStore(db)
    emb = HashEmbedder()
    _ingest(store, emb, a, DOCS)
    _ingest(store, emb, b, {"secret": ("Other tenant", ["The vault code is CANARY-OTHER-5521 for ERR-4471."])})
    return store, emb, a, b


def test_hybrid_finds_an_exact_code(kb):
    store, emb, a, _ = kb
    r = Retriever(store, emb)
    top = r.search(a, "what does ERR-4471 mean?", top_k=3)
    assert "ERR-4471" in top[0].text
    assert top[0].document_title == "Error codes" and top[0].external_id == "errors" and top[0].document_version == 1
    assert top[0].source_url is None and top[0].end - top[0].start == len(top[0].text)
    assert all(x.score > 0 for x in top) and top[0].score >= top[-1].score
    assert len(r.search(a, "refunds", top_k=50)) == 8  # never more than the tenant has


def test_retrieval_never_crosses_tenants(kb):
    store, emb, a, b = kb
    r = Retriever(store, emb)
    for mode in ("hybrid", "vector", "keyword"):
        hits = r.search(a, "CANARY-OTHER-5521 vault code ERR-4471", top_k=10, mode=mode)
        assert all("CANARY" not in h.text for h in hits)
        theirs = r.search(b, "vault code", top_k=10, mode=mode)
        assert theirs and all("CANARY-OTHER-5521" in h.text for h in theirs)


def test_filters_flow_through_retrieval(kb):
    store, emb, a, _ = kb
    r = Retriever(store, emb)
    hits = r.search(a, "error session refund", top_k=10, filters={"topic": "refunds"})
    assert len(hits) == 2 and {h.external_id for h in hits} == {"refunds"}
    assert r.search(a, "anything", top_k=5, filters={"topic": "none"}) == []


def test_minilm_hybrid_finds_paraphrases(db):
    try:
        from loadbear.knowledge.embeddings import MiniLMEmbedder

        emb = MiniLMEmbedder().load()
    except Exception as exc:  # pragma: no cover - the embedded model is part of the default install
        pytest.skip(f"MiniLM unavailable: {exc}")
    (t,) = _tenants(db, 1)
    store = KnowledgeStore(db)
    _ingest(store, emb, t, DOCS)
    r = Retriever(store, emb)
    # no shared keyword with the refund chunk's wording ("money back" is in it, "reimbursed" is not)
    assert r.search(t, "can I get reimbursed for an order?", top_k=2, mode="vector")[0].external_id == "refunds"
    assert r.search(t, "how long until my package is delivered", top_k=1)[0].external_id == "shipping"
    assert r.search(t, "ERR-1002", top_k=1)[0].text.startswith("Error ERR-1002")
    assert r.search(t, "enable 2FA for the team", top_k=1)[0].external_id == "security"
