"""Ledger benchmark: sustained writer throughput and 30-day usage report latency.

    .venv/bin/python bench/ledger.py --backend sqlite|postgres|both [--rows N] [--report-rows 1000000]

Throughput: producer threads submit finished interactions (each with one attempt) to one
:class:`LedgerWriter` concurrently; the clock runs from the first ``submit`` until ``flush()``
returns, i.e. until every row, its attempt and its rollup update are committed. rows/s counts
interactions (each interaction also writes one ``ai_attempts`` row and its share of the upserts
of the three daily rollups).
Records are built before the clock starts: building them is request-path work, not the ledger's.

Report: the ledger is filled with ``--report-rows`` interactions (and as many attempts) spread
over 30 days and several tenants, with ``usage_daily`` built from those rows in the same load
(and the narrow ``usage_daily_models`` / ``usage_daily_users`` that the reports read from it),
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
import platform
import random
import re
import shutil
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
    lanes: int
    process_cpu_s: float  # this process, all threads, while the clock ran
    server_cpu_s: float | None  # PostgreSQL backends serving the benchmark database (None: SQLite)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def server_cpu(db: Database) -> float | None:
    """CPU seconds used so far by the PostgreSQL backends connected to this database (same host)."""
    if db.dialect != "postgres":
        return None
    with db.system_tx(write=False) as c:
        pids = [r["pid"] for r in c.fetchall("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                                               " AND backend_type = 'client backend'")]
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            return None  # a remote server, or not allowed: no server CPU figure
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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
        srv0 = server_cpu(db)
        start_gate.wait()
        t0, cpu0 = time.perf_counter(), time.process_time()
        for t in threads:
            t.join()
        writer.flush()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        srv1 = server_cpu(db)
        writer.close()
        if writer.dead_lettered:
            raise SystemExit(f"{writer.dead_lettered} rows dead-lettered during the benchmark")
        with db.system_tx(write=False) as c:
            stored = c.scalar("SELECT COUNT(*) FROM ai_interactions")
            attempts = c.scalar("SELECT COUNT(*) FROM ai_attempts")
            rolled = c.scalar("SELECT SUM(requests) FROM usage_daily")
            narrow = {int(c.scalar(f"SELECT COALESCE(SUM(requests), 0) FROM {t}"))
                      for t in ("usage_daily_models", "usage_daily_users")}
        expected = rows + len(warm)
        if not (stored == attempts == int(rolled) == expected) or narrow != {expected}:
            raise SystemExit(f"lost rows: {stored} interactions, {attempts} attempts, {rolled} in rollups, {expected} expected")
        srv = None if srv0 is None or srv1 is None else srv1 - srv0
        return Throughput(rows, elapsed, len(writer._lanes), cpu, srv)


# -- report latency -----------------------------------------------------------------------


def bulk_load(db: Database, total: int, tenant_ids: list[str], users: int, end_day: date) -> int:
    """Fill the ledger fast, inside the database: ``total`` interactions (+ one attempt each)
    over the 30 days up to ``end_day``; the first tenant gets half of them, the others share
    the rest. Every value is arithmetic on the row number, so both backends hold the same data.
    ``usage_daily`` is then built from the raw rows with one GROUP BY, so the rollups agree with
    the rows (the caller checks a report against the raw rows). Returns the rollup row count.
    """
    others = len(tenant_ids) - 1
    counts = [total - (total // 2 // others) * others if others else total] + [total // 2 // others] * others
    start = datetime.combine(end_day - timedelta(days=29), datetime.min.time(), tzinfo=timezone.utc)
    d = db.dialect
    with db.system_tx() as c:
        for t in tenant_ids:  # end users first, with the ids the writer derives
            c.executemany("INSERT INTO users (id, tenant_id, external_id) VALUES (?, ?, ?)",
                          [(user_uuid(t, f"user-{u}"), t, f"user-{u}") for u in range(users)])
    for k, (t, n) in enumerate(zip(tenant_ids, counts)):
        params = {"n": n, "tenant": t, "k": k, "users": users,
                  "start": int(start.timestamp()) if d == "sqlite" else start}
        with db.system_tx() as c:
            c.raw.execute(_named(d, _LOAD_INTERACTIONS[d]), params)
            c.raw.execute(_named(d, _LOAD_ATTEMPTS[d]), params)
    day = "substr(i.created_at, 1, 10)" if d == "sqlite" else "(i.created_at AT TIME ZONE 'UTC')::date"
    flag = "i.{}" if d == "sqlite" else "i.{}::int"
    with db.system_tx() as c:
        c.execute(
            "INSERT INTO usage_daily (tenant_id, day, feature, model, user_external_id, requests, errors,"
            " degraded, cancelled, cached_requests, streamed_requests, prompt_tokens, completion_tokens,"
            " cached_input_tokens, cost_micro_usd, saved_micro_usd, latency_ms_sum)"
            f" SELECT i.tenant_id, {day}, i.feature, i.model, COALESCE(u.external_id, ''), COUNT(*),"
            " SUM(CASE WHEN i.status = 'error' THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN i.status = 'degraded' THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN i.status = 'cancelled' THEN 1 ELSE 0 END),"
            f" SUM({flag.format('cached')}), SUM({flag.format('streamed')}), SUM(i.prompt_tokens),"
            " SUM(i.completion_tokens), SUM(i.cached_input_tokens), SUM(i.cost_micro_usd), SUM(i.saved_micro_usd),"
            " SUM(i.latency_ms)"
            " FROM ai_interactions i LEFT JOIN users u ON u.id = i.user_id"
            f" GROUP BY i.tenant_id, {day}, i.feature, i.model, COALESCE(u.external_id, '')"
        )
    sums = ("requests, errors, degraded, cancelled, cached_requests, streamed_requests, prompt_tokens,"
            " completion_tokens, cached_input_tokens, cost_micro_usd, saved_micro_usd, latency_ms_sum")
    summed = ", ".join(f"SUM({x.strip()})" for x in sums.split(","))
    with db.system_tx() as c:  # the narrow rollups the reports read, as the writer keeps them
        for table, key in (("usage_daily_models", "tenant_id, day, feature, model"),
                           ("usage_daily_users", "tenant_id, day, user_external_id")):
            c.execute(f"INSERT INTO {table} ({key}, {sums}) SELECT {key}, {summed} FROM usage_daily GROUP BY {key}")
    with db.system_tx() as c:
        c.execute("ANALYZE")
        return int(c.scalar("SELECT COUNT(*) FROM usage_daily"))


def _named(dialect: str, sql: str) -> str:
    """``:name`` parameters (SQLite) as ``%(name)s`` (psycopg)."""
    return sql if dialect == "sqlite" else re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql.replace("%", "%%"))


# Row g (1..n) of tenant number k. h is a pseudo-random 32-bit number from g; feature, model and
# end user are its digits, so they vary independently. Times spread over 30 days (2,592,000 s).
_ROW_VALUES = (
    " SELECT g, {uid} AS id, {ts} AS created_at,"
    " CASE WHEN g % 10 = 0 THEN NULL ELSE 'user-' || ((h / 20) % :users) END AS ext,"
    " {feature} AS feature, {model} AS model, 20 + (h / 7) % 2000 AS p, 1 + (h / 11) % 800 AS k"
    " FROM (SELECT g, (g * 2246822519) % 4294967291 AS h FROM s) AS sh"
)
_INSERT_INTERACTIONS = (
    " INSERT INTO ai_interactions (id, tenant_id, user_id, feature, model, prompt_tokens, completion_tokens,"
    " latency_ms, cached, created_at, request_id, provider, requested_model, route, route_reason, status,"
    " streamed, ttft_ms, finish_reason, cost_micro_usd, attempt_count, metadata)"
    " SELECT r.id, :tenant, u.id, r.feature, r.model, r.p, r.k, 80 + (r.g * 13) % 4000,"
    " CASE WHEN r.g % 7 = 0 THEN {true} ELSE {false} END, r.created_at, 'req_' || r.g,"
    " CASE WHEN r.model LIKE 'gpt%' THEN 'openai' ELSE 'anthropic' END, 'auto', 'auto', 'complexity=low',"
    " CASE WHEN r.g % 50 = 0 THEN 'error' ELSE 'ok' END, CASE WHEN r.g % 2 = 0 THEN {true} ELSE {false} END,"
    " 100, 'stop', r.p * 3 + r.k * 12, 1, '{{\"app\": \"bench\"}}'"
    " FROM r LEFT JOIN users u ON u.tenant_id = :tenant AND u.external_id = r.ext"
)
_LOAD_INTERACTIONS = {
    "sqlite": "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < :n), r AS ("
    + _ROW_VALUES.format(
        uid="printf('%08x-0000-7000-8000-%012x', :k, g)",
        ts="strftime('%Y-%m-%dT%H:%M:%S', :start + (g * 2654435761) % 2592000, 'unixepoch') || '.000000'",
        feature="CASE h % 5 WHEN 0 THEN 'chat' WHEN 1 THEN 'summarize' WHEN 2 THEN 'classify'"
                " WHEN 3 THEN 'extract' ELSE 'search' END",
        model="CASE (h / 5) % 4 WHEN 0 THEN 'gpt-4o-mini' WHEN 1 THEN 'gpt-4o' WHEN 2 THEN 'claude-haiku'"
              " ELSE 'claude-sonnet' END",
    ) + ")" + _INSERT_INTERACTIONS.format(true="1", false="0"),
    "postgres": "WITH s AS (SELECT generate_series(1, CAST(:n AS bigint)) AS g), r AS ("
    + _ROW_VALUES.format(
        uid="CAST(lpad(to_hex(CAST(:k AS int)), 8, '0') || '-0000-7000-8000-' || lpad(to_hex(g), 12, '0') AS uuid)",
        ts="CAST(:start AS timestamptz) + make_interval(secs => (g * 2654435761) % 2592000)",
        feature="(ARRAY['chat','summarize','classify','extract','search'])[1 + h % 5]",
        model="(ARRAY['gpt-4o-mini','gpt-4o','claude-haiku','claude-sonnet'])[1 + (h / 5) % 4]",
    ) + ")" + _INSERT_INTERACTIONS.format(true="TRUE", false="FALSE"),
}
_LOAD_ATTEMPTS = {
    d: "INSERT INTO ai_attempts (id, interaction_id, tenant_id, attempt_no, provider, model, status, prompt_tokens,"
       f" completion_tokens, cost_micro_usd, latency_ms, ttft_ms, started_at) SELECT {new_id}, id, tenant_id, 1,"
       " provider, model, status, prompt_tokens, completion_tokens, cost_micro_usd, latency_ms - 3, 100, created_at"
       " FROM ai_interactions WHERE tenant_id = :tenant"
    for d, new_id in (
        ("sqlite", "substr(id, 1, 19) || '8001' || substr(id, 24)"),
        ("postgres", "CAST(substr(CAST(id AS text), 1, 19) || '8001' || substr(CAST(id AS text), 24) AS uuid)"),
    )
}


@dataclass
class ReportLatency:
    group_by: str
    p50_ms: float
    p99_ms: float
    groups: int
    cpu_ms: float  # per report: this thread, plus the PostgreSQL backend


def run_reports(backend: str, pg_url: str, total: int, tenants: int, users: int, runs: int) -> tuple[list[ReportLatency], dict]:
    with fresh_database(backend, pg_url) as db:
        tenant_ids = make_tenants(db, tenants)
        end_day = datetime.now(timezone.utc).date()
        t0 = time.perf_counter()
        rollup_rows = bulk_load(db, total, tenant_ids, users, end_day)
        load_s = time.perf_counter() - t0
        start_day = end_day - timedelta(days=29)
        me = tenant_ids[0]
        with db.system_tx(write=False) as c:
            rows = int(c.scalar("SELECT COUNT(*) FROM ai_interactions"))
            attempts = int(c.scalar("SELECT COUNT(*) FROM ai_attempts"))
            mine = c.fetchone("SELECT COUNT(*) AS n, SUM(cost_micro_usd) AS cost FROM ai_interactions WHERE tenant_id = ?", (me,))
            my_rollups = int(c.scalar("SELECT COUNT(*) FROM usage_daily WHERE tenant_id = ?", (me,)))
            my_narrow = [int(c.scalar(f"SELECT COUNT(*) FROM {t} WHERE tenant_id = ?", (me,)))
                         for t in ("usage_daily_models", "usage_daily_users")]
        check = tenant_usage(db, me, start_day, end_day)["totals"]
        if rows != total or attempts != total or (check["requests"], check["cost_micro_usd"]) != (mine["n"], int(mine["cost"])):
            raise SystemExit(f"bulk load inconsistent: {rows} rows, {attempts} attempts, report {check} vs raw {mine}")
        out = []
        for g in GROUPS:
            tenant_usage(db, me, start_day, end_day, g)  # warm
            times = []
            srv0, cpu0 = server_cpu(db), time.thread_time()
            for _ in range(runs):
                t = time.perf_counter()
                report = tenant_usage(db, me, start_day, end_day, g)
                times.append((time.perf_counter() - t) * 1000)
            cpu = time.thread_time() - cpu0
            srv1 = server_cpu(db)
            if srv0 is not None and srv1 is not None:
                cpu += srv1 - srv0
            out.append(ReportLatency(g, pct(times, 0.5), pct(times, 0.99), len(report["data"]), cpu / runs * 1000))
        info = {"rows": rows, "tenant_rows": int(mine["n"]), "rollup_rows": rollup_rows, "tenant_rollup_rows": my_rollups,
                "tenant_narrow_rows": my_narrow,
                "load_s": load_s}
        return out, info


# -- main ---------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    ap.add_argument("--rows", type=int, default=200_000, help="interactions for the throughput run")
    ap.add_argument("--producers", type=int, default=4, help="threads submitting concurrently")
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--users", type=int, default=50, help="end users per tenant")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--queue-max", type=int, default=50_000)
    ap.add_argument("--report-rows", type=int, default=1_000_000, help="ledger size for the report latency (0: skip)")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per report")
    ap.add_argument("--pg-url", default=os.environ.get("LOADBEAR_BENCH_POSTGRES_URL")
                    or os.environ.get("LOADBEAR_TEST_POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args(argv)
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    dead_letter = os.path.join(tempfile.gettempdir(), f"loadbear_bench_deadletter_{os.getpid()}.jsonl")
    print(f"loadbear ledger benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    lines = []
    for b in backends:
        if args.rows:
            tp = run_throughput(b, args.pg_url, args.rows, args.producers, args.tenants, args.users,
                                args.batch_size, args.queue_max, dead_letter)
            cpu = f"CPU per row: {tp.process_cpu_s / tp.rows * 1e6:.0f} µs in the process"
            if tp.server_cpu_s is not None:
                cpu += f" + {tp.server_cpu_s / tp.rows * 1e6:.0f} µs in PostgreSQL"
            lines.append((b, "throughput", f"{tp.rate:,.0f} rows/s",
                          f"{tp.rows:,} interactions + {tp.rows:,} attempts + rollups in {tp.seconds:.2f} s; "
                          f"{args.producers} producer threads, {tp.lanes} writer lane(s); {cpu}"))
            print(" | ".join(lines[-1]), flush=True)
        if args.report_rows:
            latencies, info = run_reports(b, args.pg_url, args.report_rows, args.tenants, args.users, args.runs)
            for lat in latencies:
                lines.append((b, f"30-day report by {lat.group_by}", f"p50 {lat.p50_ms:.1f} ms, p99 {lat.p99_ms:.1f} ms",
                              f"{lat.groups} groups; CPU per report {lat.cpu_ms:.1f} ms"
                              + (" (client + PostgreSQL)" if b == "postgres" else "")))
                print(" | ".join(lines[-1]), flush=True)
            print(f"  ledger: {info['rows']:,} interactions (+ as many attempts), {info['tenant_rows']:,} for the "
                  f"reported tenant; usage_daily {info['rollup_rows']:,} rows, {info['tenant_rollup_rows']:,} for "
                  f"the tenant; the reports read {info['tenant_narrow_rows'][0]:,} (usage_daily_models) / "
                  f"{info['tenant_narrow_rows'][1]:,} (usage_daily_users) rows; bulk load {info['load_s']:.0f} s",
                  flush=True)
    print()
    print("| backend | what | result | notes |")
    print("|---|---|---|---|")
    for line in lines:
        print("| " + " | ".join(line) + " |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
