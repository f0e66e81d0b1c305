"""Embedding benchmark: the embedded all-MiniLM-L6-v2 (numpy, no torch) on this machine's CPU.

    .venv/bin/python bench/embeddings.py [--sentences 1024] [--batch 32] [--queries 100] [--passages 128]

* load: reading the weights and tokenizer (first use in a process);
* throughput: short sentences (8-14 words, like FAQ lines and queries) embedded ``--batch`` at a
  time (``MiniLMEmbedder.embed`` on lists of that size), sentences/s over ``--sentences``;
* passages: ingestion-sized chunks (~200 word pieces) embedded 32 at a time, passages/s;
* query latency: ``--queries`` single queries of ~10 words, one ``embed([q])`` call each,
  p50/p95/p99 in ms, after a warm-up.

Wall time is what a caller sees; CPU time (the process's, all threads) is what the work costs
and is far less sensitive to other load on the machine: both are printed, with the load
average. BLAS threads follow ``LOADBEAR_BLAS_THREADS`` (default 1; ``auto`` keeps numpy's).
Texts are made from a fixed vocabulary with a fixed seed, so runs are comparable.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

import numpy as np

from loadbear.knowledge.embeddings import BLAS_THREADS_ENV, MiniLMEmbedder

WORDS = (
    "account billing invoice refund password reset login tenant gateway model token usage limit "
    "quota budget request latency error retry fallback stream answer document chunk search query "
    "knowledge policy admin user team project key rotate export report monthly daily cost price "
    "upgrade plan support ticket email notification webhook integration api endpoint version "
    "deploy region database backup restore security audit log access role permission the a of "
    "to in for on with how what why when where can does my our is are be not from by at"
).split()


def sentences(rng: random.Random, n: int, lo: int, hi: int) -> list[str]:
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
    return out


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def loadavg() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--passages", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="throughput runs; the best is reported")
    args = ap.parse_args()
    rng = random.Random(1234)

    emb = MiniLMEmbedder()
    t0 = time.perf_counter()
    emb.load()
    load_s = time.perf_counter() - t0
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}, {BLAS_THREADS_ENV}={os.environ.get(BLAS_THREADS_ENV, '1 (default)')}")
    print(f"{loadavg()} (before)")
    print(f"load: {load_s * 1000:.0f} ms")

    emb.embed(sentences(rng, 64, 8, 14))  # warm-up: BLAS threads, allocator

    short = sentences(rng, args.sentences, 8, 14)
    toks = [emb.token_count(s) for s in short]
    best_wall = best_cpu = 0.0
    for _ in range(args.repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(short), args.batch):
            emb.embed(short[i : i + args.batch])
        best_wall = max(best_wall, len(short) / (time.perf_counter() - w0))
        best_cpu = max(best_cpu, len(short) / (time.process_time() - c0))
    print(f"short sentences (mean {statistics.mean(toks):.1f} word pieces), batch {args.batch}: "
          f"{best_wall:.0f} sentences/s wall, {best_cpu:.0f} sentences per CPU-second")

    passages = [" ".join(sentences(rng, 14, 8, 14)) for _ in range(args.passages)]
    ptoks = [emb.token_count(p) for p in passages]
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(passages), 32):
        emb.embed(passages[i : i + 32])
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(f"passages (mean {statistics.mean(ptoks):.0f} word pieces), batch 32: "
          f"{len(passages) / wall:.1f} passages/s wall, {len(passages) / cpu:.1f} per CPU-second")

    queries = sentences(rng, args.queries, 9, 11)
    for q in queries[:10]:
        emb.embed([q])
    lat, cpu_lat = [], []
    for q in queries:
        w0, c0 = time.perf_counter(), time.process_time()
        emb.embed([q])
        lat.append((time.perf_counter() - w0) * 1000)
        cpu_lat.append((time.process_time() - c0) * 1000)
    qtoks = statistics.mean(emb.token_count(q) for q in queries)
    print(
        f"single query (~10 words, mean {qtoks:.1f} word pieces), {len(queries)} queries: "
        f"wall p50 {pct(lat, 50):.2f} ms, p95 {pct(lat, 95):.2f} ms, p99 {pct(lat, 99):.2f} ms; "
        f"CPU p50 {pct(cpu_lat, 50):.2f} ms"
    )
    print(f"{loadavg()} (after)")


if __name__ == "__main__":
    main()
