"""Knowledge-base benchmark: ingestion throughput, query latency and recall@10, on both backends.

    .venv/bin/python bench/retrieval.py --backend sqlite|postgres|both [--quick] [--out results.json]
        [--sizes 10000,100000] [--vectors lowrank|spectrum] [--real-text 16000]

What is measured, per backend:

* **Ingestion.** Embedding: all-MiniLM-L6-v2 (``MiniLMEmbedder``, numpy on the CPU) over
  chunk-sized English text (~250 word pieces each), chunks/s. Storage: ``KnowledgeStore.
  upsert_document`` (documents of 50 chunks, one transaction each: documents, chunks, vectors,
  full text), chunks/s. End to end: a sample of documents embedded by MiniLM and stored,
  chunks/s with embedding included.
* **Query latency** of ``vector_search`` (top-10, the query already embedded: embedding one
  query is timed separately) for one tenant holding 10k and one holding 100k chunks, p50/p99
  over ``--queries`` queries after a warm-up; also keyword and hybrid (``Retriever.search``,
  the query vector passed in) latency.
* **Recall@10** of ``vector_search`` against exact search (numpy brute force over the
  tenant's own vectors, the same cosine).

Data. Latency and recall use synthetic unit vectors, not MiniLM's (embedding 1M chunks with
MiniLM on this machine would take days): a low-rank Gaussian mixture (64 clusters in a
48-dimensional latent space mapped to 384 dimensions, plus isotropic noise), which, like real
text embeddings, has a low intrinsic dimension; queries are fresh draws from the same mixture.
All tenants, filler included, draw from the same distribution (as tenants using one embedding
model do). A low-rank set flatters the SQLite store's PCA first pass (48 dimensions hold all of
it), so ``--vectors spectrum`` draws instead from a full-rank distribution shaped like MiniLM's
on real text (eigenvalue i of the covariance ~ 1/i, as fitted on 16k MiniLM vectors of real
text; a mean direction of norm 0.36; 256 clusters), and ``--real-text N`` embeds N overlapping
40-word windows of real text (the helpdesk example's docs, Python's pydoc topics and the
docstrings of the standard library and installed packages) with MiniLM and reports the recall@10
of the SQLite first pass on them (N real vectors, and 100k made of them plus noisy copies),
with held-out windows and the helpdesk evaluation questions as queries. Chunk texts are random words from a 3000-word vocabulary; keyword queries are three
such words.

PostgreSQL store of 1M chunks: the 10k and 100k tenants are written through the store; the
other ~890k chunks (89 filler tenants of 10k) are bulk-loaded by the owner with COPY (binary
for the vectors). Tenants past the store's ``exact_max`` (10k) search their own HNSW index,
which the store builds in the background when a write crosses the limit; here the 100k
tenant's index (and, for comparison, the 10k tenant's) is built explicitly after the load and
timed. Searches run exactly as the API runs them: as the application role, under row-level
security, through ``KnowledgeStore``. Writes "with the index maintained" add 2,000 chunks to
the 100k tenant (then delete them).

``--sizes`` picks the tenant sizes (``--sizes 100000`` for the 100k tenant only).
``--quick`` shrinks everything (1k/5k tenants, 20k chunks in the PostgreSQL store) for a smoke run.
PostgreSQL: ``--pg-url`` is a server URL (default ``$LOADBEAR_TEST_POSTGRES_URL`` or
postgresql://postgres@127.0.0.1:5432/postgres); the bench creates a ``loadbear_bench_*``
database and drops it afterwards (``--keep`` keeps it; ``--reuse NAME`` skips the load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from loadbear.knowledge.retrieval import Retriever
from loadbear.knowledge.store import KnowledgeStore
from loadbear.knowledge.types import ChunkDraft
from loadbear.storage.db import Database, open_database
from loadbear.storage.migrate import migrate
from loadbear.storage.values import uuid7

DIM = 384
MODEL = "bench-synthetic-384"
DOC_CHUNKS = 50
K = 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- synthetic data ---------------------------------------------------------------------------


class Corpus:
    """Unit vectors from a low-rank Gaussian mixture, and random-word texts."""

    def __init__(self, seed: int = 7, rank: int = 48, clusters: int = 64, spread: float = 0.6,
                 noise: float = 0.04, kind: str = "lowrank") -> None:
        rng = np.random.default_rng(seed)
        self.A = (rng.standard_normal((rank, DIM)) / np.sqrt(rank)).astype(np.float32)
        self.centers = rng.standard_normal((clusters, rank)).astype(np.float32)
        self.spread, self.noise = spread, noise
        syl = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "do", "fi", "gu", "he", "jo"]
        words = set()
        wr = np.random.default_rng(seed + 1)
        while len(words) < 3000:
            words.add("".join(wr.choice(syl, size=int(wr.integers(2, 4)))))
        self.vocab = np.array(sorted(words))
        self.kind = kind
        if kind == "spectrum":
            g = np.random.default_rng(seed + 2)
            self.rot, _ = np.linalg.qr(g.standard_normal((DIM, DIM)))
            self.rot = self.rot.astype(np.float32)
            mean = g.standard_normal(DIM)
            self.mean = (mean * 0.36 / np.linalg.norm(mean)).astype(np.float32)
            sd = np.sqrt(1.0 / np.arange(1, DIM + 1))
            self.sd = (sd * np.sqrt(0.87 / (sd ** 2).sum())).astype(np.float32)
            self.s_centers = (g.standard_normal((256, DIM)) * self.sd * np.sqrt(0.5)).astype(np.float32)

    def _spectrum(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, DIM), dtype=np.float32)
        for i in range(0, n, 20_000):
            m = min(n, i + 20_000) - i
            z = self.s_centers[rng.integers(0, len(self.s_centers), m)]
            z = z + rng.standard_normal((m, DIM)).astype(np.float32) * self.sd * np.float32(np.sqrt(0.5))
            x = self.mean + z @ self.rot.T
            out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    def vectors(self, n: int, seed: int) -> np.ndarray:
        if self.kind == "spectrum":
            return self._spectrum(n, seed)
        rng = np.random.default_rng(seed)
        z = self.centers[rng.integers(0, len(self.centers), n)]
        z = z + self.spread * rng.standard_normal(z.shape).astype(np.float32)
        x = z @ self.A + self.noise * rng.standard_normal((n, DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)

    def texts(self, n: int, words: int, seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(self.vocab), (n, words))
        return [" ".join(row) for row in self.vocab[idx]]


ENGLISH = (
    "the customer can request a refund within fourteen days of purchase when the product arrives damaged or does "
    "not match its description our support team reviews every request and answers within two business days "
    "invoices are sent by email at the start of each billing period and can be downloaded from the account page "
    "to change a subscription plan open the settings menu choose billing and select the plan that fits your team "
    "security keys must be rotated every ninety days and each administrator can revoke a key at any time "
    "shipping is free for orders above fifty dollars while express delivery costs extra and arrives next day"
).split()


def english_chunks(n: int, words: int = 200, seed: int = 3) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(ENGLISH, size=words)) + "." for _ in range(n)]


def drafts(texts: list[str]) -> list[ChunkDraft]:
    out, pos = [], 0
    for i, t in enumerate(texts):
        out.append(ChunkDraft(text=t, start=pos, end=pos + len(t), heading_path=["Section", f"Part {i // 10}"],
                              token_count=len(t.split()), ordinal=i))
        pos += len(t) + 1
    return out


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    i = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[i]


# -- databases ----------------------------------------------------------------------------------


def _with_db(url: str, name: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, "/" + name, p.query, p.fragment))


def create_tenants(db: Database, slugs: list[str]) -> dict[str, str]:
    ids = {s: str(uuid.uuid4()) for s in slugs}
    with db.system_tx() as c:
        c.executemany("INSERT INTO tenants (id, slug, name) VALUES (?, ?, ?)", [(ids[s], s, s) for s in slugs])
    return ids


@dataclass
class Tenant:
    slug: str
    id: str
    vectors: np.ndarray
    texts: list[str] = field(default_factory=list)


def load_tenant(store: KnowledgeStore, t: Tenant) -> float:
    """Write the tenant's chunks through the store in documents of DOC_CHUNKS; returns seconds."""
    n = len(t.vectors)
    t0 = time.perf_counter()
    for i in range(0, n, DOC_CHUNKS):
        store.upsert_document(
            t.id, title=f"{t.slug} doc {i // DOC_CHUNKS}", char_count=0, external_id=f"doc-{i // DOC_CHUNKS}",
            metadata={"shard": (i // DOC_CHUNKS) % 4}, chunks=drafts(t.texts[i:i + DOC_CHUNKS]),
            vectors=t.vectors[i:i + DOC_CHUNKS], embedding_model=MODEL)
    return time.perf_counter() - t0


# -- PostgreSQL bulk filler (owner, COPY) -------------------------------------------------------


def pg_bulk_filler(url: str, corpus: Corpus, tenant_ids: list[str], per_tenant: int, seed: int) -> float:
    import psycopg

    t0 = time.perf_counter()
    vec_dt = np.dtype([
        ("nf", ">i2"),
        ("l1", ">i4"), ("chunk_id", "S16"),
        ("l2", ">i4"), ("tenant_id", "S16"),
        ("l3", ">i4"), ("document_id", "S16"),
        ("l4", ">i4"), ("model", f"S{len(MODEL)}"),
        ("l5", ">i4"), ("dim", ">i4"),
        ("l6", ">i4"), ("vdim", ">i2"), ("vunused", ">i2"), ("vec", ">f4", (DIM,)),
    ])
    with psycopg.connect(url, autocommit=False) as conn:
        for ti, tid in enumerate(tenant_ids):
            n_docs = (per_tenant + DOC_CHUNKS - 1) // DOC_CHUNKS
            doc_ids = [uuid.UUID(uuid7()) for _ in range(n_docs)]
            chunk_ids = [uuid.UUID(uuid7()) for _ in range(per_tenant)]
            texts = corpus.texts(per_tenant, 15, seed + ti)
            vecs = corpus.vectors(per_tenant, seed + 10_000 + ti)
            with conn.cursor() as cur:
                with cur.copy("COPY documents (id, tenant_id, external_id, title, metadata, chunk_count) FROM STDIN") as cp:
                    for d, did in enumerate(doc_ids):
                        cp.write_row((did, tid, f"doc-{d}", f"filler {d}", '{"shard": %d}' % (d % 4),
                                      min(DOC_CHUNKS, per_tenant - d * DOC_CHUNKS)))
                with cur.copy("COPY chunks (id, tenant_id, document_id, document_version, ordinal, text, start_char,"
                              " end_char, heading_path, token_count, embedding_model, embedding_dim, search_context)"
                              " FROM STDIN") as cp:
                    for j in range(per_tenant):
                        cp.write_row((chunk_ids[j], tid, doc_ids[j // DOC_CHUNKS], 1, j % DOC_CHUNKS, texts[j], 0,
                                      len(texts[j]), "[]", 15, MODEL, DIM, "filler"))
                rows = np.zeros(per_tenant, dtype=vec_dt)
                rows["nf"] = 6
                rows["l1"] = rows["l2"] = rows["l3"] = 16
                rows["chunk_id"] = [c.bytes for c in chunk_ids]
                rows["tenant_id"] = uuid.UUID(tid).bytes
                rows["document_id"] = [doc_ids[j // DOC_CHUNKS].bytes for j in range(per_tenant)]
                rows["l4"] = len(MODEL)
                rows["model"] = MODEL.encode()
                rows["l5"] = 4
                rows["dim"] = DIM
                rows["l6"] = 4 + 4 * DIM
                rows["vdim"] = DIM
                rows["vec"] = vecs
                payload = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0) + rows.tobytes() + struct.pack(">h", -1)
                with cur.copy("COPY chunk_vectors (chunk_id, tenant_id, document_id, embedding_model, embedding_dim,"
                              " embedding) FROM STDIN (FORMAT BINARY)") as cp:
                    cp.write(payload)
                cur.execute("INSERT INTO kb_vector_stats (tenant_id, embedding_model, embedding_dim, chunk_count)"
                            " VALUES (%s, %s, %s, %s)", (tid, MODEL, DIM, per_tenant))
                cur.execute("INSERT INTO kb_state (tenant_id, version) VALUES (%s, 1)", (tid,))
            conn.commit()
            if (ti + 1) % 10 == 0 or ti == len(tenant_ids) - 1:
                log(f"  filler tenants {ti + 1}/{len(tenant_ids)} ({(ti + 1) * per_tenant} chunks,"
                    f" {time.perf_counter() - t0:.0f} s)")
    return time.perf_counter() - t0


# -- measurements -------------------------------------------------------------------------------


def exact_top_k(vectors: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    sims = vectors @ q
    idx = np.argpartition(-sims, k)[:k]
    return idx[np.argsort(-sims[idx])]


def measure_queries(store: KnowledgeStore, t: Tenant, queries: np.ndarray, warmup: int,
                    id_index: dict[str, int]) -> dict[str, Any]:
    lat, cpu, tcpu, recalls, short = [], [], [], [], 0
    load = os.getloadavg()[0]
    for i, q in enumerate(queries):
        c0 = time.process_time()
        tc0 = time.thread_time()
        t0 = time.perf_counter()
        hits = store.vector_search(t.id, q, K, embedding_model=MODEL)
        dt = (time.perf_counter() - t0) * 1000
        dtc = (time.thread_time() - tc0) * 1000
        dc = (time.process_time() - c0) * 1000
        if i < warmup:
            continue
        lat.append(dt)
        cpu.append(dc)
        tcpu.append(dtc)
        if len(hits) < K:
            short += 1
        truth = set(exact_top_k(t.vectors, q, K).tolist())
        got = {id_index[h] for h, _ in hits if h in id_index}
        recalls.append(len(truth & got) / K)
    return {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "mean_ms": statistics.fmean(lat),
            "client_cpu_p50_ms": pct(cpu, 50), "client_cpu_p99_ms": pct(cpu, 99),
            "thread_cpu_p50_ms": pct(tcpu, 50), "thread_cpu_p99_ms": pct(tcpu, 99),
            "loadavg": [round(load, 1), round(os.getloadavg()[0], 1)],
            "recall_at_10": statistics.fmean(recalls), "min_recall": min(recalls), "short_results": short,
            "queries": len(lat)}


def measure_text_queries(store: KnowledgeStore, t: Tenant, corpus: Corpus, queries: np.ndarray,
                         warmup: int) -> dict[str, Any]:
    words = corpus.texts(len(queries), 3, 99)
    kw, hy = [], []
    r = Retriever(store, None)
    for i, (q, text) in enumerate(zip(queries, words)):
        t0 = time.perf_counter()
        store.keyword_search(t.id, text, K)
        t1 = time.perf_counter()
        r.search(t.id, text, top_k=K, mode="hybrid", query_vector=q)
        t2 = time.perf_counter()
        if i >= warmup:
            kw.append((t1 - t0) * 1000)
            hy.append((t2 - t1) * 1000)
    return {"keyword_p50_ms": pct(kw, 50), "keyword_p99_ms": pct(kw, 99),
            "hybrid_p50_ms": pct(hy, 50), "hybrid_p99_ms": pct(hy, 99)}


def rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def id_map(store: KnowledgeStore, t: Tenant) -> dict[str, int]:
    """chunk id -> row of t.vectors (documents were written in order, DOC_CHUNKS per document)."""
    out: dict[str, int] = {}
    with store.db.tenant_tx(t.id, write=False) as c:
        rows = c.fetchall("SELECT c.id, c.ordinal, d.external_id FROM chunks c JOIN documents d ON d.id = c.document_id"
                          " WHERE c.tenant_id = ?", (t.id,))
    for r in rows:
        out[str(r["id"])] = int(str(r["external_id"]).split("-")[1]) * DOC_CHUNKS + int(r["ordinal"])
    return out


def bench_embedding(n: int) -> dict[str, Any]:
    try:
        from loadbear.knowledge.embeddings import MiniLMEmbedder

        e = MiniLMEmbedder().load()
    except Exception as exc:  # the embedder is optional for the storage numbers
        return {"error": f"MiniLM unavailable: {exc}"}
    texts = english_chunks(n)
    e.embed(texts[:2])
    t0 = time.perf_counter()
    vecs = e.embed(texts)
    dt = time.perf_counter() - t0
    q0 = time.perf_counter()
    qs = english_chunks(20, words=12, seed=5)
    qt = []
    for q in qs:
        a = time.perf_counter()
        e.embed([q])
        qt.append((time.perf_counter() - a) * 1000)
    return {"embedder": e.name, "chunks": n, "tokens_per_chunk": e.token_count(texts[0]), "seconds": dt,
            "chunks_per_s": n / dt, "query_embed_p50_ms": pct(qt, 50), "query_embed_p99_ms": pct(qt, 99),
            "_vectors": vecs, "_texts": texts, "_embedder": e, "_q_s": time.perf_counter() - q0}


def bench_end_to_end(store: KnowledgeStore, tenant_id: str, emb: dict[str, Any]) -> dict[str, Any]:
    if "_embedder" not in emb:
        return {}
    e, texts = emb["_embedder"], emb["_texts"]
    t0 = time.perf_counter()
    for i in range(0, len(texts), 16):
        part = texts[i:i + 16]
        store.upsert_document(tenant_id, title=f"e2e {i}", external_id=f"e2e-{i}", chunks=drafts(part),
                              vectors=e.embed(part), embedding_model=e.name)
    dt = time.perf_counter() - t0
    return {"chunks": len(texts), "seconds": dt, "chunks_per_s": len(texts) / dt}


# -- real text: the SQLite first pass on MiniLM vectors ---------------------------------------------


def real_text_windows(limit: int, seed: int = 0) -> list[str]:
    """Overlapping 40-word windows of real English: help-centre docs, Python's docs and docstrings."""
    import importlib
    import inspect
    import pathlib
    import warnings

    docs: list[str] = []
    root = pathlib.Path(__file__).resolve().parent.parent / "examples" / "helpdesk" / "docs"
    docs += [p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.md"))]
    try:
        import pydoc_data.topics as topics

        docs += list(topics.topics.values())
    except ImportError:
        pass
    seen: set[str] = set()

    def walk(obj: Any, depth: int) -> None:
        d = getattr(obj, "__doc__", None)
        if isinstance(d, str) and len(d) > 200 and d not in seen:
            seen.add(d)
            docs.append(d)
        if depth and (inspect.ismodule(obj) or inspect.isclass(obj)):
            for name, o in list(vars(obj).items())[:300]:
                if not name.startswith("_") and (inspect.isclass(o) or inspect.isroutine(o)):
                    walk(o, depth - 1)

    skip = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"}
    mods = [m for m in sorted(sys.stdlib_module_names) if not m.startswith("_") and m not in skip]
    mods += ["numpy", "numpy.linalg", "numpy.random", "numpy.ma", "pydantic", "fastapi", "httpx", "typer", "click",
             "yaml", "psycopg", "openai", "redis"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in mods:
            try:
                walk(importlib.import_module(m), 2)
            except Exception:  # a module that does not import here (no display, missing extra)
                continue
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for d in docs:
        w = d.split()
        step = int(rng.integers(12, 35))
        texts += [" ".join(w[i:i + 40]) for i in range(0, max(1, len(w) - 20), step)]
    texts = list(dict.fromkeys(texts))
    return [texts[i] for i in rng.permutation(len(texts))[:limit]]


def bench_real_text(n: int, cache: str | None) -> dict[str, Any]:
    """Recall@10 of the SQLite store's first pass (PCA + exact re-scoring) on MiniLM vectors of real text."""
    import yaml

    from loadbear.knowledge.embeddings import MiniLMEmbedder
    from loadbear.knowledge.store_sqlite import _make_matrix, _top_k

    questions = [c["query"] for c in yaml.safe_load(
        open(os.path.join(os.path.dirname(__file__), "..", "examples", "helpdesk", "eval.yaml")))["cases"]]
    if cache and os.path.exists(cache):
        data = np.load(cache)
        vecs, qvecs = data["vectors"], data["questions"]
    else:
        e = MiniLMEmbedder().load()
        texts = real_text_windows(n)
        t0 = time.perf_counter()
        vecs = np.concatenate([e.embed(texts[i:i + 512]) for i in range(0, len(texts), 512)]).astype(np.float32)
        log(f"  embedded {len(texts)} windows in {time.perf_counter() - t0:.0f} s")
        qvecs = e.embed(questions).astype(np.float32)
        if cache:
            np.savez(cache, vectors=vecs, questions=qvecs)
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(vecs))
    held, base = vecs[perm[:300]], vecs[perm[300:]]
    # 100k: the real vectors and noisy copies of them (noise of norm 0.5 before renormalising: a
    # copy keeps cosine ~0.9 with its original), so neighbours crowd as in a big knowledge base
    reps = [base]
    while sum(len(r) for r in reps) < 100_000:
        noise = rng.standard_normal(base.shape).astype(np.float32)
        noise *= 0.5 / np.linalg.norm(noise, axis=1, keepdims=True)
        y = base + noise
        reps.append(y / np.linalg.norm(y, axis=1, keepdims=True))
    big = np.concatenate(reps)[:100_000]
    out: dict[str, Any] = {"windows": int(len(vecs)), "questions": len(questions)}
    for label, x in ((f"{len(base)} real", base), ("100k real + noisy copies", big)):
        m = _make_matrix(1, np.arange(len(x), dtype=np.int64), x.copy(), 0, None)
        row: dict[str, Any] = {"explained_variance": m.explained}
        for qlabel, qs in (("held-out windows", held), ("helpdesk questions", qvecs)):
            truth = np.argpartition(-(qs @ x.T), K, axis=1)[:, :K]
            rec = [len({s for s, _ in _top_k(m, q, K)} & set(tr.tolist())) / K for q, tr in zip(qs, truth)]
            row[qlabel] = {"recall_at_10": float(np.mean(rec)), "min_recall": float(np.min(rec)), "queries": len(qs)}
        out[label] = row
    return out


# -- per backend --------------------------------------------------------------------------------


def run_backend(backend: str, args: argparse.Namespace, corpus: Corpus, emb: dict[str, Any]) -> dict[str, Any]:
    sizes = args.sizes or ([1_000, 5_000] if args.quick else [10_000, 100_000])
    res: dict[str, Any] = {"backend": backend, "sizes": sizes}
    admin = None
    tmpdir = None
    dbname = None
    if backend == "sqlite":
        tmpdir = tempfile.mkdtemp(prefix="loadbear_bench_")
        url = f"sqlite:///{tmpdir}/kb.db"
    else:
        import psycopg

        admin = psycopg.connect(args.pg_url, autocommit=True)
        dbname = args.reuse or f"loadbear_bench_{uuid.uuid4().hex[:10]}"
        if not args.reuse:
            admin.execute(f"CREATE DATABASE {dbname}")
        url = _with_db(args.pg_url, dbname)
        res["database"] = dbname
    db = open_database(url)
    try:
        migrate(db)
        # loading: no background index builds; the tenants' indexes are built (and timed) afterwards
        store = KnowledgeStore(db, auto_index=False) if backend == "postgres" else KnowledgeStore(db)
        tenants = [Tenant(f"t{s // 1000}k", "", corpus.vectors(s, 100 + s), corpus.texts(s, 60, 200 + s))
                   for s in sizes]
        if args.reuse:
            with db.system_tx() as c:
                for t in tenants:
                    t.id = str(c.scalar("SELECT id FROM tenants WHERE slug = ?", (t.slug,)))
        else:
            ids = create_tenants(db, [t.slug for t in tenants] + ["e2e"])
            for t in tenants:
                t.id = ids[t.slug]
            store_s = 0.0
            stored = 0
            for t in tenants:
                log(f"{backend}: writing tenant {t.slug} ({len(t.vectors)} chunks) through the store")
                s = load_tenant(store, t)
                store_s += s
                stored += len(t.vectors)
                log(f"  {len(t.vectors) / s:.0f} chunks/s")
            res["store_bulk"] = {"chunks": stored, "seconds": store_s, "chunks_per_s": stored / store_s}
            if backend == "postgres":
                total = 20_000 if args.quick else args.pg_total
                filler_n = total - sum(sizes)
                per = 5_000 if args.quick else 10_000
                n_f = max(0, filler_n // per)
                fids = list(create_tenants(db, [f"filler{i}" for i in range(n_f)]).values())
                log(f"postgres: bulk filler {n_f} tenants x {per} chunks by COPY (owner)")
                res["filler"] = {"tenants": n_f, "chunks": n_f * per, "seconds": pg_bulk_filler(url, corpus, fids, per, 7)}
                res["total_chunks"] = n_f * per + sum(sizes)
                with db.system_tx() as c:
                    c.execute("ANALYZE")
            else:
                res["total_chunks"] = sum(sizes)
            res["end_to_end"] = bench_end_to_end(store, ids["e2e"], emb)
        if backend == "postgres":
            # Tenants past exact_max get their own HNSW index (the store builds it in the background
            # when a write crosses the limit; here it is built explicitly and timed). The 10k tenant
            # is at the limit (exact search by default); its index is built too, for the comparison.
            store = KnowledgeStore(db, index_maintenance_work_mem=args.maintenance_work_mem)
            res["tenant_index_build_s"] = {}
            for t in tenants:
                log(f"postgres: building the HNSW index of {t.slug} (m=16, ef_construction=128, CONCURRENTLY)")
                res["tenant_index_build_s"][t.slug] = store.build_tenant_index(t.id, DIM)
                log(f"  {res['tenant_index_build_s'][t.slug]:.0f} s")
            with db.system_tx() as c:
                c.execute("ANALYZE chunk_vectors")
                res["sizes_mb"] = {r["relname"]: int(r["b"]) / 1e6 for r in c.fetchall(
                    "SELECT relname, pg_relation_size(oid) AS b FROM pg_class WHERE relname IN"
                    " ('chunk_vectors', 'chunks', 'idx_chunks_tsv') OR relname LIKE 'idx_cv_hnsw_%'")}

        n_q = args.queries
        warm = 20 if not args.quick else 5
        qs = corpus.vectors(n_q + warm, 424242)
        res["tenants"] = {}
        for t in tenants:
            idx = id_map(store, t)
            r: dict[str, Any] = {"chunks": len(t.vectors)}
            log(f"{backend}: queries on {t.slug}")
            r["vector"] = measure_queries(store, t, qs, warm, idx)
            if backend == "sqlite":
                cold = KnowledgeStore(db, cache_min_chunks=10**12)
                r["vector_vec0"] = measure_queries(cold, t, qs[: warm + min(n_q, 100)], warm, idx)
                m = store.cache.get((t.id, DIM, MODEL))
                r["path"] = "vec0" if m is None else (
                    "in-process matrix, exact" if m.proj_t is None else
                    f"in-process matrix, PCA {m.proj_t.shape[0]} + re-score {store.compact_candidates}")
                if m is not None:
                    r["matrix_mb"] = m.nbytes / 1e6
                    r["pca_explained_variance"] = m.explained if m.proj_t is not None else None
                if m is not None and m.proj_t is not None:
                    # the same tenant on the exact in-process scan, for the before/after comparison
                    ex = KnowledgeStore(db, compact_min_chunks=10**12)
                    r["vector_exact_matrix"] = measure_queries(ex, t, qs[: warm + min(n_q, 100)], warm, idx)
                    ex.cache.clear()
                t0 = time.perf_counter()
                rss0 = rss_mb()
                fresh = KnowledgeStore(db)
                fresh.vector_search(t.id, qs[0], K, embedding_model=MODEL)
                r["first_query_ms"] = (time.perf_counter() - t0) * 1000
                r["first_query_rss_growth_mb"] = rss_mb() - rss0
                fresh.cache.clear()
            else:
                r["path"] = "tenant HNSW index" if len(t.vectors) > store.exact_max else "exact"
                sweep = {}
                for ef in ([40, 100, 200] if not args.quick else [40, 100]):
                    s2 = KnowledgeStore(db, ef_search=ef, exact_max=0, auto_index=False)
                    sweep[ef] = measure_queries(s2, t, qs[: warm + min(n_q, 100)], warm, idx)
                    sweep[ef]["path"] = s2.last_path
                r["hnsw_sweep"] = sweep
                ex = KnowledgeStore(db, exact_max=10**12)
                r["exact"] = measure_queries(ex, t, qs[: warm + min(n_q, 100)], warm, idx)
            r.update(measure_text_queries(store, t, corpus, qs[: warm + min(n_q, 100)], warm))
            res["tenants"][t.slug] = r
            log(f"  {json.dumps(r, default=float)[:400]}")
        if True:
            # writes with the tenant's vector index maintained: documents added to the largest
            # tenant, then deleted again (so a --keep database still matches its ground truth)
            big = tenants[-1]
            n_inc = 2_000 if not args.quick else 500
            inc = Tenant(big.slug, big.id, corpus.vectors(n_inc, 5), corpus.texts(n_inc, 60, 6))
            t0 = time.perf_counter()
            for i in range(0, n_inc, DOC_CHUNKS):
                store.upsert_document(big.id, title="incremental", external_id=f"inc-{i}",
                                      chunks=drafts(inc.texts[i:i + DOC_CHUNKS]), vectors=inc.vectors[i:i + DOC_CHUNKS],
                                      embedding_model=MODEL)
            s = time.perf_counter() - t0
            res["store_incremental"] = {"chunks": n_inc, "seconds": s, "chunks_per_s": n_inc / s,
                                        "into": f"{big.slug} ({len(big.vectors)} chunks)"}
            for d in store.list_documents(big.id, limit=1000)[0]:
                if d.external_id and d.external_id.startswith("inc-"):
                    store.delete_document(big.id, d.id)
        return res
    finally:
        db.close()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if admin is not None:
            if not args.keep and dbname:
                admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
            admin.close()


def _ms(x: Any) -> str:
    return "–" if x is None else f"{float(x):.1f} ms"


def render_markdown(out: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md's Retrieval section, from a results JSON."""
    lines = []
    e = out.get("embedding", {})
    rows = ["| backend | storage, bulk (chunks/s) | storage, index maintained (chunks/s) | end to end with MiniLM (chunks/s) |",
            "|---|---:|---:|---:|"]
    for b in ("sqlite", "postgres"):
        r = out.get(b)
        if not r or "store_bulk" not in r:
            continue
        inc = r.get("store_incremental", {}).get("chunks_per_s", float("nan"))
        rows.append(f"| {b} | {r['store_bulk']['chunks_per_s']:.0f} | {inc:.0f} |"
                    f" {r.get('end_to_end', {}).get('chunks_per_s', float('nan')):.2f} |")
    if e and "chunks_per_s" in e:
        lines.append(f"Embedding alone ({e['embedder']}, {e['tokens_per_chunk']} word pieces per chunk, {e['chunks']} chunks):"
                     f" {e['chunks_per_s']:.2f} chunks/s; one query (12 words): p50 {_ms(e['query_embed_p50_ms'])},"
                     f" p99 {_ms(e['query_embed_p99_ms'])}.")
        lines.append("")
    lines += rows
    lines.append("")
    lines.append("| backend | tenant | store total | path | vector p50 | vector p99 | recall@10 | short top-k | keyword p50 / p99 | hybrid p50 / p99 |")
    lines.append("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for b in ("sqlite", "postgres"):
        r = out.get(b)
        if not r:
            continue
        for slug, t in r.get("tenants", {}).items():
            v = t["vector"]
            lines.append(
                f"| {b} | {t['chunks']:,} | {r.get('total_chunks', 0):,} | {t['path']} | {_ms(v['p50_ms'])} | {_ms(v['p99_ms'])} |"
                f" {v['recall_at_10']:.4f} | {v['short_results']} | {_ms(t['keyword_p50_ms'])} / {_ms(t['keyword_p99_ms'])} |"
                f" {_ms(t['hybrid_p50_ms'])} / {_ms(t['hybrid_p99_ms'])} |")
    lines.append("")
    for b in ("sqlite", "postgres"):
        r = out.get(b)
        if not r:
            continue
        for slug, t in r.get("tenants", {}).items():
            extra = []
            if "vector_exact_matrix" in t:
                v = t["vector_exact_matrix"]
                extra.append(f"exact in-process scan: p50 {_ms(v['p50_ms'])}, p99 {_ms(v['p99_ms'])},"
                             f" thread CPU p50 {_ms(v.get('thread_cpu_p50_ms'))}")
            if "thread_cpu_p50_ms" in t["vector"]:
                extra.append(f"vector thread CPU p50 {_ms(t['vector']['thread_cpu_p50_ms'])},"
                             f" p99 {_ms(t['vector']['thread_cpu_p99_ms'])}")
            if "matrix_mb" in t:
                pv = t.get("pca_explained_variance")
                extra.append(f"in-process copy {t['matrix_mb']:.0f} MB" + (f" (PCA keeps {pv:.0%} of the variance)" if pv else ""))
            if "vector_vec0" in t:
                v = t["vector_vec0"]
                extra.append(f"vec0 scan: p50 {_ms(v['p50_ms'])}, p99 {_ms(v['p99_ms'])}")
                extra.append(f"first query (loads the in-process matrix): {_ms(t.get('first_query_ms'))}")
            if "exact" in t:
                v = t["exact"]
                extra.append(f"exact: p50 {_ms(v['p50_ms'])}, p99 {_ms(v['p99_ms'])}")
            for ef, v in t.get("hnsw_sweep", {}).items():
                extra.append(f"HNSW ef_search={ef}: p50 {_ms(v['p50_ms'])}, p99 {_ms(v['p99_ms'])},"
                             f" recall@10 {v['recall_at_10']:.4f}, short {v['short_results']}")
            if extra:
                lines.append(f"- {b}, {t['chunks']:,}-chunk tenant: " + "; ".join(extra) + ".")
    rt = out.get("real_text")
    if rt:
        lines.append("")
        lines.append("| SQLite first pass on MiniLM vectors of real text | PCA variance kept | recall@10, held-out windows (min) |"
                     " recall@10, helpdesk questions (min) |")
        lines.append("|---|---:|---:|---:|")
        for label, row in rt.items():
            if not isinstance(row, dict):
                continue
            h, q = row["held-out windows"], row["helpdesk questions"]
            lines.append(f"| {label} | {row['explained_variance']:.0%} | {h['recall_at_10']:.4f} ({h['min_recall']:.1f}) |"
                         f" {q['recall_at_10']:.4f} ({q['min_recall']:.1f}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--pg-url", default=os.environ.get("LOADBEAR_TEST_POSTGRES_URL",
                                                      "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--pg-total", type=int, default=1_000_000)
    ap.add_argument("--maintenance-work-mem", default="6GB")
    ap.add_argument("--build-workers", type=int, default=1)
    ap.add_argument("--embed-chunks", type=int, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--reuse", default=None, help="an existing loadbear_bench_* database from --keep")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sizes", default=None, help="tenant sizes, comma-separated (default 10000,100000)")
    ap.add_argument("--vectors", choices=["lowrank", "spectrum"], default="lowrank",
                    help="synthetic distribution: low-rank mixture, or full-rank with MiniLM's spectrum")
    ap.add_argument("--real-text", type=int, default=0,
                    help="embed this many windows of real text with MiniLM and report the SQLite first pass's recall")
    ap.add_argument("--real-cache", default=None, help=".npz file to keep/reuse the --real-text vectors")
    ap.add_argument("--skip-backends", action="store_true", help="only the --real-text recall")
    ap.add_argument("--markdown", default=None, help="print the tables for results JSON file(s), comma-separated")
    args = ap.parse_args()
    if args.markdown:
        merged: dict[str, Any] = {}
        for path in args.markdown.split(","):
            with open(path) as f:
                data = json.load(f)
            merged.setdefault("embedding", data.get("embedding"))
            if "real_text" in data:
                merged["real_text"] = data["real_text"]
            for b in ("sqlite", "postgres"):
                if b in data:
                    merged[b] = {**merged.get(b, {}), **data[b]}
        print(render_markdown(merged))
        return
    args.sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else None
    if args.queries is None:
        args.queries = 50 if args.quick else 300
    if args.reuse and not args.reuse.startswith("loadbear_bench_"):
        sys.exit("--reuse takes a loadbear_bench_* database")
    corpus = Corpus(kind=args.vectors)
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                       "platform": platform.platform()}, "quick": args.quick,
           "vectors": args.vectors}
    if args.real_text:
        log(f"real text: {args.real_text} windows embedded with MiniLM")
        out["real_text"] = bench_real_text(args.real_text, args.real_cache)
        log(f"  {json.dumps(out['real_text'])}")
        if args.skip_backends:
            text = json.dumps(out, indent=2, default=float)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(text)
            print(text)
            return
    if args.skip_backends and not args.real_text:
        sys.exit("--skip-backends needs --real-text")
    log("embedding throughput (MiniLM)")
    emb = bench_embedding(args.embed_chunks or (16 if args.quick else 128))
    out["embedding"] = {k: v for k, v in emb.items() if not k.startswith("_")}
    log(f"  {out['embedding']}")
    for b in (["sqlite", "postgres"] if args.backend == "both" else [args.backend]):
        out[b] = run_backend(b, args, corpus, emb)
    text = json.dumps(out, indent=2, default=float)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
