"""What a breaker store costs a request: CPU per ``allow`` + ``record`` on a healthy model.

    .venv/bin/python bench/breaker_store.py [--calls 20000] [--postgres URL]

Per store, the CPU time (this process, every thread: ``time.process_time``) of ``--calls``
requests' worth of breaker calls on a closed breaker (``allow`` then a successful ``record``),
from one event loop:

* ``memory`` — in-process state, the floor;
* ``database (cached)`` — the database store as deployed: a local view re-read at most every
  250 ms, so almost every call is a dict lookup;
* ``database (uncached)`` — the same store with ``refresh_s = 0``: every ``allow`` reads the
  table in a worker thread (what a store without the local view would cost);
* ``database failure write`` — one failure recorded (an UPSERT in a worker thread), the cost a
  failing call adds.

On SQLite (a temporary file) and, with ``--postgres`` (a server URL; a throwaway database is
created and dropped), PostgreSQL. CPU time, not wall time, so a shared machine skews it less.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from loadbear.gateway.breaker import BreakerRegistry, MemoryBreakerStore  # noqa: E402
from loadbear.gateway.breaker_db import DatabaseBreakerStore  # noqa: E402
from loadbear.storage.db import open_database  # noqa: E402
from loadbear.storage.migrate import migrate  # noqa: E402

KEY = "openai/gpt-4o-mini"


async def healthy_calls(reg: BreakerRegistry, n: int) -> float:
    """CPU microseconds per (allow + successful record)."""
    await reg.allow(KEY)  # first read / connection outside the measurement
    start = time.process_time()
    for _ in range(n):
        assert await reg.allow(KEY)
        await reg.record(KEY, True, 10)
    return (time.process_time() - start) / n * 1e6


async def failure_writes(reg: BreakerRegistry, n: int) -> float:
    await reg.record(KEY, False, 10)
    start = time.process_time()
    for _ in range(n):
        await reg.record(KEY, False, 10)
    return (time.process_time() - start) / n * 1e6


def measure(url: str, calls: int) -> dict[str, float]:
    db = open_database(url)
    try:
        migrate(db)
        out = {}
        out["memory"] = asyncio.run(healthy_calls(BreakerRegistry(store=MemoryBreakerStore()), calls))
        cached = DatabaseBreakerStore(db, threshold=10**9)
        out["database (cached)"] = asyncio.run(healthy_calls(BreakerRegistry(store=cached), calls))
        out["reads during cached run"] = cached.reads
        uncached = DatabaseBreakerStore(db, threshold=10**9, refresh_s=0)
        n = max(200, calls // 20)
        out["database (uncached)"] = asyncio.run(healthy_calls(BreakerRegistry(store=uncached), n))
        out["database failure write"] = asyncio.run(failure_writes(BreakerRegistry(store=cached), max(100, n // 4)))
        return out
    finally:
        db.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--postgres", help="PostgreSQL server URL (a throwaway database is created on it)")
    args = p.parse_args(argv)
    targets = []
    tmp = tempfile.mkdtemp()
    targets.append(("sqlite", f"sqlite:///{tmp}/breakers.db", None))
    admin = None
    if args.postgres:
        import psycopg
        from urllib.parse import urlsplit, urlunsplit

        name = f"loadbear_bench_breakers_{uuid.uuid4().hex[:8]}"
        admin = psycopg.connect(args.postgres, autocommit=True)
        admin.execute(f"CREATE DATABASE {name}")
        parts = urlsplit(args.postgres)
        targets.append(("postgres", urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, "")), name))
    try:
        for backend, url, _ in targets:
            res = measure(url, args.calls)
            print(f"== {backend}")
            for k, v in res.items():
                print(f"  {k:28s} {v:10.1f}" + ("" if k.startswith("reads") else " µs CPU per call"))
    finally:
        if admin is not None:
            for _, _, name in targets:
                if name:
                    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            admin.close()


if __name__ == "__main__":
    main()
