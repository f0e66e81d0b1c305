"""Reliability benchmark: a flaky upstream behind a fallback chain, and what clients actually get.

    .venv/bin/python bench/faults.py [--scenario NAME]... [--requests 3000] [--concurrency 32]
                                     [--redis] [--breaker-store S] [--no-continuation] [--out r.json] [--no-docs]

Scenarios (default: all, one after the other, each on fresh processes and a fresh database):

* ``primary-30``: the primary fails 30% of its calls, the fallback is healthy, the chain ends
  with the offline ``local`` model. Targets: 100% of requests answered or degraded, 0 silent
  empty successes, ledger rows = requests, attempt rows = upstream calls, p99 <= deadline.
* ``both-50-no-local``: primary and fallback both fail 50%, and the tenant's chain is
  ``primary → fallback`` only, so degraded answers happen; a stream that already showed text
  and whose continuation fails too ends with an error event (the only error allowed).

Set-up, on one machine:

* two upstream simulators in this process (their own threads and event loops): the
  **primary** (OpenAI wire format) and the **fallback** (Anthropic wire format) fail their
  scenario's share of calls with an even mix of every upstream fault kind — ``rate_limit``
  (429 + Retry-After 0.2 s), ``server_error`` (500), ``unavailable`` (503), ``refused``
  (connection reset), ``no_headers`` (hang-up before the status line), ``stall_first_token``
  (3 s stall), ``cut_mid_stream``, ``malformed_chunk`` and ``inband_error`` (the last three
  after 3 content chunks). Both answer 20 words at 400 tokens/s after 5-25 ms. Client faults
  (400s) are left out: they are the request's fault and reach the client as a 400 by design
  (``tests/test_faults.py`` covers them);
* loadbear in its own process (``uvicorn loadbear.api.factory:build_app --factory``), on a fresh
  SQLite file, with the catalog ``primary → fallback → local`` (primary: 2 retries; fallback: 1),
  per-model timeouts connect 1 s / first token 1 s / idle 1 s / total 8 s, a 10 s request
  deadline, breakers at 5 consecutive failures with a 1 s cooldown (shared through the database
  by default, Redis with ``--redis``, or ``--breaker-store memory|database|redis``), and a tenant with an honest fallback message and continuation enabled
  (``--no-continuation`` turns it off: mid-stream failures then end with an error event);
* after two warm-up requests to the ``local`` model (lazy imports, tokenizer), this process
  sends ``--requests`` chat requests, alternately streamed and not, from ``--concurrency``
  concurrent clients (aiohttp, keep-alive), each with a distinct prompt.

Each answer is classified from the client's side: *answered* (200, non-empty content, not
degraded; a stream must end with ``data: [DONE]``), *degraded* (200 + ``x-loadbear-degraded``),
*errored* (non-200, transport error, or a stream that ends with an error event), and two
invariant violations that must stay at 0: *silent empty successes* (200/``[DONE]`` with no
content and no degraded mark) and *broken streams* (neither ``[DONE]`` nor an error event).

Then loadbear is stopped gracefully (the ledger flushes) and the ledger is checked:
``ai_interactions`` rows vs requests sent, their statuses vs what clients saw, and
``ai_attempts`` rows (remote ones) vs the calls each simulator observed, per model.
Breaker trips and error rates come from ``GET /admin/providers`` just before the stop.

Results are printed, optionally saved as JSON (``--out``), and written as Markdown into the
"Reliability" section of ``docs/benchmarks.md`` (``--no-docs`` to skip); the exit status is 1
when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Reliability"
KEPT_SUBSECTION = "### Breaker state in the database"
FAULT_KINDS = ("rate_limit", "server_error", "unavailable", "refused", "no_headers", "stall_first_token",
               "cut_mid_stream", "malformed_chunk", "inband_error")
FALLBACK_MESSAGE = "Our assistant is unavailable right now."
SUPPORT = "support@example.com"
DEADLINE_S = 10.0
TIMEOUTS = {"connect": 1.0, "first_token": 1.0, "idle": 1.0, "total": 8.0}

# name -> (title, primary fault rate, fallback fault rate, local model at the end of the chain)
SCENARIOS: dict[str, tuple[str, float, float, bool]] = {
    "primary-30": ("The primary fails 30% of its calls; the fallback is healthy", 0.3, 0.0, True),
    "both-50-no-local": ("Primary and fallback both fail 50% of their calls; no offline last resort "
                         "(tenant chain primary → fallback)", 0.5, 0.5, False),
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s))) - 1))]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_config(path: Path, db: Path, primary_url: str, fallback_url: str, redis_url: str | None,
                 prefix: str, breaker_store: str = "auto") -> None:
    top = {
        "database_url": f"sqlite:///{db}",
        "admin_key": "bench-admin-key",
        "log_level": "warning",
        "request_deadline_s": DEADLINE_S,
        "breaker_threshold": 5,
        "breaker_cooldown_s": 1.0,
        "breaker_key_prefix": prefix,
        "breaker_store": breaker_store,
        "retry_base_delay_s": 0.05,
        "retry_max_delay_s": 0.5,
        "retry_after_max_s": 2.0,
    }
    if redis_url:
        top["redis_url"] = redis_url
    models = {
        "primary": {"provider": "openai", "upstream_model": "gpt-4o-mini", "base_url": primary_url + "/v1",
                    "api_key": "sk-bench", "input_price": 0.15, "output_price": 0.60, "max_retries": 2,
                    "fallbacks": ["fallback", "local"], "timeouts": TIMEOUTS},
        "fallback": {"provider": "anthropic", "upstream_model": "claude-haiku-4-5", "base_url": fallback_url,
                     "api_key": "sk-ant-bench", "input_price": 0.80, "output_price": 4.00, "max_retries": 1,
                     "fallbacks": ["local"], "timeouts": TIMEOUTS},
    }
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for name, entry in models.items():
        lines += ["", f"[models.{name}]"] + [f"{k} = {toml_value(v)}" for k, v in entry.items()]
    path.write_text("\n".join(lines) + "\n")


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"loadbear exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def warm_up(url: str, key: str) -> None:
    """Before the clock: one request per mode to the offline ``local`` model, so that lazy
    imports and the tokenizer (~1 s to load, on the event loop) are not paid by the first burst
    of measured requests. These rows are in the ledger too (see WARMUP_ROWS); no upstream call."""
    for stream in (False, True):
        body = orjson.dumps({"model": "local", "stream": stream, "messages": [{"role": "user", "content": "warm up"}]})
        req = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()


WARMUP_ROWS = 2


# -- the client -----------------------------------------------------------------------------------


class Outcome:
    __slots__ = ("stream", "kind", "latency", "detail")

    def __init__(self, stream: bool, kind: str, latency: float, detail: str = "") -> None:
        self.stream, self.kind, self.latency, self.detail = stream, kind, latency, detail


def classify_json(status: int, headers: Any, raw: bytes) -> tuple[str, str]:
    if status != 200:
        return "errored", f"http {status}"
    body = orjson.loads(raw)
    content = body["choices"][0]["message"]["content"] or ""
    degraded = headers.get("x-loadbear-degraded") == "true" or body.get("loadbear", {}).get("degraded")
    if degraded:
        return ("degraded", "") if content else ("silent_empty", "degraded without text")
    return ("answered", "") if content else ("silent_empty", "200 with empty content")


def classify_sse(status: int, headers: Any, raw: bytes) -> tuple[str, str]:
    if status != 200:
        return "errored", f"http {status}"
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    datas = [e[6:] for e in events if e.startswith(b"data: ")]
    done = bool(datas) and datas[-1] == b"[DONE]"
    content, error = [], None
    for d in datas:
        if d == b"[DONE]":
            continue
        obj = orjson.loads(d)
        if "error" in obj:
            error = obj["error"]
            continue
        for choice in obj.get("choices") or ():
            content.append(choice.get("delta", {}).get("content") or "")
    text = "".join(content)
    if error is not None:
        return "errored", f"error event: {error.get('code')}"
    if not done:
        return "broken_stream", "no [DONE] and no error event"
    if headers.get("x-loadbear-degraded") == "true":
        return ("degraded", "") if text else ("silent_empty", "degraded without text")
    return ("answered", "") if text else ("silent_empty", "[DONE] with empty content")


async def run_load(url: str, key: str, n: int, concurrency: int, timeout: float) -> tuple[list[Outcome], float]:
    counter = iter(range(n))
    outcomes: list[Outcome] = []
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def worker() -> None:
            for i in counter:
                stream = i % 2 == 1
                body = {"model": "primary", "stream": stream,
                        "messages": [{"role": "user", "content": f"Question {i}: how do fallbacks work? ({uuid.uuid4().hex[:8]})"}]}
                started = time.monotonic()
                try:
                    async with session.post(url + "/v1/chat/completions", data=orjson.dumps(body), headers=headers) as r:
                        raw = await r.read()
                        kind, detail = (classify_sse if stream else classify_json)(r.status, r.headers, raw)
                except Exception as exc:  # noqa: BLE001 - a transport failure is an error answer
                    kind, detail = "errored", f"transport: {type(exc).__name__}"
                outcomes.append(Outcome(stream, kind, time.monotonic() - started, detail))

        t0 = time.monotonic()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.monotonic() - t0
    return outcomes, wall


# -- the run --------------------------------------------------------------------------------------


def chat_calls(stats: dict[str, Any]) -> int:
    by_path = stats["by_path"]
    return by_path.get("/v1/chat/completions", 0) + by_path.get("/v1/messages", 0)


def store_name(args: argparse.Namespace) -> str:
    if args.breaker_store != "auto":
        return args.breaker_store
    return "redis" if args.redis else "database"


def run(args: argparse.Namespace, scenario: str) -> dict[str, Any]:
    from loadbear.testing import UpstreamSimulator

    title, fault_rate, fallback_fault_rate, with_local = SCENARIOS[scenario]
    if args.fault_rate is not None:
        fault_rate = args.fault_rate
    if args.fallback_fault_rate is not None:
        fallback_fault_rate = args.fallback_fault_rate

    work = Path(tempfile.mkdtemp(prefix="loadbear_faults_"))
    prefix = f"loadbear:bench:{uuid.uuid4().hex[:8]}:"
    redis_url = args.redis_url if args.redis else None
    common = dict(latency_ms=(5, 25), tokens_per_second=400, reply_words=20, retry_after=0.2, stall_s=3.0)
    primary = UpstreamSimulator(fault_rate=fault_rate, faults=FAULT_KINDS, seed=args.seed, **common).start()
    fallback = UpstreamSimulator(fault_rate=fallback_fault_rate, faults=FAULT_KINDS, seed=args.seed + 1,
                                 **common).start()
    proc: subprocess.Popen | None = None
    try:
        db = work / "loadbear.db"
        cfg = work / "loadbear.toml"
        write_config(cfg, db, primary.url, fallback.url, redis_url, prefix, args.breaker_store)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADBEAR_", "OPENAI_", "ANTHROPIC_"))}
        env["LOADBEAR_CONFIG"] = str(cfg)

        # Tenant and key through the library, on the same database the server will open.
        os.environ["LOADBEAR_CONFIG"] = str(cfg)
        from loadbear import Gateway, Settings

        gw = Gateway(Settings.load(env={"LOADBEAR_CONFIG": str(cfg)}))
        gw.migrate()
        tenant: dict[str, Any] = {"fallback_message": FALLBACK_MESSAGE, "support_contact": SUPPORT,
                                  "allow_continuation": not args.no_continuation}
        if not with_local:
            tenant["fallback_overrides"] = {"primary": ["fallback"], "fallback": []}
        gw.tenants.create_tenant("bench", "Bench", tenant)
        _, key = gw.tenants.create_key("bench", "bench")
        gw.close()

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "loadbear.api.factory:build_app", "--factory", "--host", "127.0.0.1",
             "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
             "--log-level", "warning"],
            cwd=work, env=env)
        wait_http(url + "/healthz", proc)

        warm_up(url, key)
        outcomes, wall = asyncio.run(run_load(url, key, args.requests, args.concurrency, DEADLINE_S + 20))

        req = urllib.request.Request(url + "/admin/providers", headers={"Authorization": "Bearer bench-admin-key"})
        with urllib.request.urlopen(req, timeout=10) as r:
            providers = json.loads(r.read())["data"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        proc = None

        p_stats, f_stats = primary.stats(), fallback.stats()
        # How long the simulators themselves took on calls without a fault (upstream latency).
        for stats, sim in ((p_stats, primary), (f_stats, fallback)):
            took = [r.ended - r.started for r in sim.requests if r.fault is None and r.ended is not None]
            stats["clean_p50_ms"] = round(pct(took, 0.5) * 1000, 1)
            stats["clean_p99_ms"] = round(pct(took, 0.99) * 1000, 1)
            stats["clean_max_ms"] = round(max(took) * 1000, 1) if took else None
        con = sqlite3.connect(db)
        try:
            measured = "requested_model != 'local'"  # leaves out the warm-up rows
            rows = con.execute(f"SELECT COUNT(*) FROM ai_interactions WHERE {measured}").fetchone()[0]
            warmup_rows = con.execute(f"SELECT COUNT(*) FROM ai_interactions WHERE NOT {measured}").fetchone()[0]
            statuses = dict(con.execute(
                f"SELECT status, COUNT(*) FROM ai_interactions WHERE {measured} GROUP BY status").fetchall())
            attempts_by_model = dict(con.execute(
                "SELECT model, COUNT(*) FROM ai_attempts GROUP BY model").fetchall())
            attempt_rows = sum(attempts_by_model.values())
            count_mismatch = con.execute(
                "SELECT COUNT(*) FROM ai_interactions i WHERE attempt_count != "
                "(SELECT COUNT(*) FROM ai_attempts a WHERE a.interaction_id = i.id)").fetchone()[0]
            errors_by_type = dict(con.execute(
                "SELECT error_type, COUNT(*) FROM ai_attempts WHERE status = 'error' GROUP BY error_type").fetchall())
            continued = con.execute(
                "SELECT COUNT(*) FROM ai_interactions WHERE metadata LIKE '%continuations%'").fetchone()[0]
            never_sent = con.execute(
                "SELECT COUNT(*) FROM ai_attempts WHERE error LIKE '%Can not write request body%'").fetchone()[0]
            failed_cost = con.execute(
                "SELECT COUNT(*), COALESCE(SUM(cost_micro_usd), 0) FROM ai_attempts "
                "WHERE status = 'error' AND cost_micro_usd > 0").fetchone()
        finally:
            con.close()
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        primary.stop()
        fallback.stop()
        if args.redis:
            try:
                import redis

                client = redis.Redis.from_url(args.redis_url)
                keys = list(client.scan_iter(match=prefix + "*"))
                if keys:
                    client.delete(*keys)
            except Exception:  # noqa: BLE001
                pass
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    n = len(outcomes)
    kinds: dict[str, int] = {}
    for o in outcomes:
        kinds[o.kind] = kinds.get(o.kind, 0) + 1
    details: dict[str, int] = {}
    for o in outcomes:
        if o.detail:
            details[f"{o.kind}: {o.detail}"] = details.get(f"{o.kind}: {o.detail}", 0) + 1
    lat = [o.latency for o in outcomes]

    def mode(stream: bool) -> dict[str, Any]:
        sel = [o for o in outcomes if o.stream == stream]
        ls = [o.latency for o in sel]
        return {"requests": len(sel), "answered": sum(o.kind == "answered" for o in sel),
                "degraded": sum(o.kind == "degraded" for o in sel),
                "errored": sum(o.kind == "errored" for o in sel),
                "p50_ms": round(pct(ls, 0.5) * 1000, 1), "p99_ms": round(pct(ls, 0.99) * 1000, 1),
                "max_ms": round(max(ls) * 1000, 1) if ls else None}

    primary_calls, fallback_calls = chat_calls(p_stats), chat_calls(f_stats)
    remote_attempts = attempts_by_model.get("primary", 0) + attempts_by_model.get("fallback", 0)
    by_model = {p["model"]: p for p in providers}
    return {
        "scenario": scenario,
        "title": title,
        "config": {"requests": args.requests, "concurrency": args.concurrency, "fault_rate": fault_rate,
                   "fallback_fault_rate": fallback_fault_rate, "local_last_resort": with_local,
                   "fault_kinds": list(FAULT_KINDS),
                   "deadline_s": DEADLINE_S, "timeouts": TIMEOUTS, "breaker_store": store_name(args),
                   "continuation": not args.no_continuation, "seed": args.seed},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "wall_s": round(wall, 2),
        "client": {
            "requests": n,
            "answered": kinds.get("answered", 0),
            "degraded": kinds.get("degraded", 0),
            "errored": kinds.get("errored", 0),
            "error_events": sum(1 for o in outcomes if o.kind == "errored" and o.detail.startswith("error event")),
            "silent_empty": kinds.get("silent_empty", 0),
            "broken_stream": kinds.get("broken_stream", 0),
            "p50_ms": round(pct(lat, 0.5) * 1000, 1),
            "p99_ms": round(pct(lat, 0.99) * 1000, 1),
            "max_ms": round(max(lat) * 1000, 1) if lat else None,
            "non_stream": mode(False),
            "stream": mode(True),
            "details": details,
        },
        "upstream": {
            "primary_calls": primary_calls, "primary_faults": p_stats["faults"],
            "primary_by_fault": {k: v for k, v in p_stats["by_fault"].items() if v},
            "fallback_calls": fallback_calls, "fallback_faults": f_stats["faults"],
            "primary_clean_ms": {k: p_stats[f"clean_{k}_ms"] for k in ("p50", "p99", "max")},
            "fallback_clean_ms": {k: f_stats[f"clean_{k}_ms"] for k in ("p50", "p99", "max")},
        },
        "breakers": {name: {"trips": p.get("trips", 0), "state": p.get("breaker"), "error_rate": p.get("error_rate"),
                            "p50_latency_ms": p.get("p50_latency_ms"), "p95_latency_ms": p.get("p95_latency_ms")}
                     for name, p in by_model.items()},
        "ledger": {
            "interaction_rows": rows,
            "warmup_rows": warmup_rows,
            "statuses": statuses,
            "attempt_rows": attempt_rows,
            "attempts_by_model": attempts_by_model,
            "remote_attempt_rows": remote_attempts,
            "upstream_calls_observed": primary_calls + fallback_calls,
            "attempt_count_mismatches": count_mismatch,
            "attempt_errors_by_type": errors_by_type,
            "continued_streams": continued,
            "attempts_never_sent": never_sent,
            "failed_attempts_with_cost": failed_cost[0],
            "failed_attempts_cost_micro_usd": failed_cost[1],
        },
    }


def checks(r: dict[str, Any]) -> list[tuple[str, bool, str]]:
    c, led, up = r["client"], r["ledger"], r["upstream"]
    n = c["requests"]
    served = c["answered"] + c["degraded"]
    client_status = {"ok": c["answered"], "degraded": c["degraded"], "error": c["errored"]}
    ledger_status = {k: led["statuses"].get(k, 0) for k in ("ok", "degraded", "error")}
    out = []
    if r["config"]["local_last_resort"] and not r["config"]["fallback_fault_rate"]:
        out.append(("every request answered or degraded", served == n, f"{served} / {n}"))
    else:
        # When the continuing model can fail too, a stream that already showed text ends with an
        # honest error event: the only errors allowed. Non-streamed requests always get an answer.
        out.append(("errors only as mid-stream error events (non-streamed: 0)",
                    c["non_stream"]["errored"] == 0 and c["errored"] == c["error_events"],
                    f"non-streamed errored {c['non_stream']['errored']}, streamed error events "
                    f"{c['error_events']} of {c['errored']} errors"))
    never_sent = led["attempts_never_sent"]
    out += [
        ("0 silent empty successes", c["silent_empty"] == 0, str(c["silent_empty"])),
        ("0 streams without [DONE] or an error event", c["broken_stream"] == 0, str(c["broken_stream"])),
        ("ledger rows = requests", led["interaction_rows"] == n and led["warmup_rows"] == WARMUP_ROWS,
         f"{led['interaction_rows']} / {n} (+ {led['warmup_rows']} warm-up rows)"),
        ("ledger statuses = what clients saw", ledger_status == client_status,
         "ledger " + ", ".join(f"{k} {v}" for k, v in ledger_status.items())
         + " · clients " + ", ".join(f"{k} {v}" for k, v in client_status.items())),
        ("attempt rows = upstream calls observed", led["remote_attempt_rows"] == led["upstream_calls_observed"],
         f"{led['remote_attempt_rows']} / {led['upstream_calls_observed']}"
         + (f" ({never_sent} attempts failed writing the request on a pooled connection the upstream "
            f"had just closed: recorded, never received)" if never_sent else "")),
        ("… reconciled: attempt rows = calls observed + requests never written",
         led["remote_attempt_rows"] == led["upstream_calls_observed"] + never_sent,
         f"{led['remote_attempt_rows']} = {led['upstream_calls_observed']} + {never_sent}"),
        ("per model: primary", led["attempts_by_model"].get("primary", 0) == up["primary_calls"],
         f"{led['attempts_by_model'].get('primary', 0)} / {up['primary_calls']}"),
        ("per model: fallback", led["attempts_by_model"].get("fallback", 0) == up["fallback_calls"],
         f"{led['attempts_by_model'].get('fallback', 0)} / {up['fallback_calls']}"),
        ("attempt_count = attempt rows, every row", led["attempt_count_mismatches"] == 0,
         str(led["attempt_count_mismatches"])),
        ("p99 latency <= deadline", c["p99_ms"] <= r["config"]["deadline_s"] * 1000,
         f"{c['p99_ms']} ms <= {r['config']['deadline_s'] * 1000:.0f} ms"),
    ]
    return out


def share(x: int, n: int) -> str:
    return f"{100 * x / n:.2f}%" if n else "—"


def markdown_intro(r: dict[str, Any], command: str) -> list[str]:
    cfg = r["config"]
    return [
        SECTION,
        "",
        "`bench/faults.py`: a flaky upstream behind a fallback chain, and what clients actually get. "
        f"Faults are an even mix of every upstream fault kind ({', '.join(cfg['fault_kinds'])}; the last three "
        "after 3 content chunks, so a streamed answer has already started). Catalog chain "
        "`primary (OpenAI wire) → fallback (Anthropic wire) → local`; primary 2 retries, fallback 1. "
        f"{cfg['requests']} requests per scenario, half streamed, {cfg['concurrency']} concurrent clients, "
        "distinct prompts. loadbear runs in its own process (uvicorn, SQLite ledger); the two upstream "
        "simulators (5-25 ms, 400 tokens/s, 20-word answers) and the load generator share another. "
        f"Per-model timeouts: first token {cfg['timeouts']['first_token']:g} s, idle {cfg['timeouts']['idle']:g} s, "
        f"total {cfg['timeouts']['total']:g} s; request deadline {cfg['deadline_s']:g} s; Retry-After 0.2 s honoured "
        f"(cap 2 s); breakers ({cfg['breaker_store']}) open after 5 consecutive failures with a 1 s cooldown; the "
        f"tenant has an honest fallback message and continuation {'on' if cfg['continuation'] else 'off'}. "
        "Client faults (400s) are not injected here: they are the request's fault and go straight back as a 400 "
        "with one upstream call (`tests/test_faults.py`).",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {r['machine']['cpus']} CPUs, Python {r['machine']['python']}, {r['machine']['platform']}.",
        "",
    ]


def markdown_scenario(r: dict[str, Any]) -> list[str]:
    c, led, up = r["client"], r["ledger"], r["upstream"]
    n = c["requests"]
    trips = sum(b["trips"] or 0 for b in r["breakers"].values())
    trips_by_model = ", ".join(f"{k} {b['trips']}" for k, b in r["breakers"].items() if b["trips"]) or "none"
    faults_seen = ", ".join(f"{k} {v}" for k, v in up["primary_by_fault"].items())
    lines = [
        f"### {r['title']}",
        "",
        f"`--scenario {r['scenario']}`, wall time {r['wall_s']} s.",
        "",
        "| what the clients got | requests | share |",
        "|---|---:|---:|",
        f"| answered normally | {c['answered']} | {share(c['answered'], n)} |",
        f"| degraded (honest message, marked) | {c['degraded']} | {share(c['degraded'], n)} |",
        f"| errored | {c['errored']} | {share(c['errored'], n)} |",
        f"| … of which streams ended by an error event after the first token | {c['error_events']} | "
        f"{share(c['error_events'], n)} |",
        f"| silent empty successes | {c['silent_empty']} | {share(c['silent_empty'], n)} |",
        f"| streams with neither `[DONE]` nor an error event | {c['broken_stream']} | {share(c['broken_stream'], n)} |",
        "",
        "| latency (client side, whole answer) | p50 | p99 | max |",
        "|---|---:|---:|---:|",
        f"| all | {c['p50_ms']} ms | {c['p99_ms']} ms | {c['max_ms']} ms |",
        f"| non-streamed | {c['non_stream']['p50_ms']} ms | {c['non_stream']['p99_ms']} ms | {c['non_stream']['max_ms']} ms |",
        f"| streamed | {c['stream']['p50_ms']} ms | {c['stream']['p99_ms']} ms | {c['stream']['max_ms']} ms |",
        "",
        f"Upstream: the primary saw {up['primary_calls']} calls, {up['primary_faults']} of them injected faults "
        f"({faults_seen}); the fallback saw {up['fallback_calls']} calls ({up['fallback_faults']} faults). "
        f"Clean upstream calls took p99 {up['primary_clean_ms']['p99']} ms (primary): the client p99 is set by "
        "the stalls (a 1 s first-token timeout, then a retry or the next model). "
        f"Breaker trips: {trips} ({trips_by_model}). Streams continued on the fallback after a mid-stream "
        f"failure: {led['continued_streams']}. Failed attempts that had produced tokens carry their cost: "
        f"{led['failed_attempts_with_cost']} rows, {led['failed_attempts_cost_micro_usd']} µUSD.",
        "",
        "| check | | |",
        "|---|---|---|",
    ]
    for name, ok, detail in checks(r):
        lines.append(f"| {name} | {'✅' if ok else '❌'} | {detail} |")
    lines.append("")
    return lines


def write_docs(section: str, path: Path = DOCS) -> None:
    """Replace (or append) only the Reliability section; other sections belong to others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION):], flags=re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        rest = text[end:]
        # Written by bench/breaker_store.py's author, not by this script: keep it.
        kept = re.search(rf"^{re.escape(KEPT_SUBSECTION)}.*?(?=^##|\Z)", text[start:end], flags=re.M | re.S)
        if kept and KEPT_SUBSECTION not in section:
            section = section.rstrip("\n") + "\n\n" + kept.group(0).rstrip("\n") + "\n"
        text = text[:start] + section + ("\n" + rest if rest else "")
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                   help="scenario to run (repeatable); default: all")
    p.add_argument("--requests", type=int, default=3000, help="requests per scenario")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--fault-rate", type=float, help="override: share of the primary's calls that fail")
    p.add_argument("--fallback-fault-rate", type=float, help="override: share of the fallback's calls that fail")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--redis", action="store_true", help="share breaker state through Redis")
    p.add_argument("--breaker-store", choices=["auto", "memory", "database", "redis"], default="auto",
                   help="where breaker state lives (auto: Redis with --redis, else the database)")
    p.add_argument("--redis-url", default=os.environ.get("LOADBEAR_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--no-continuation", action="store_true", help="tenant without allow_continuation")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories (database, config)")
    args = p.parse_args(argv)

    results = []
    ok = True
    for scenario in args.scenario or list(SCENARIOS):
        result = run(args, scenario)
        results.append(result)
        print(f"== {scenario}: {result['title']}")
        print(json.dumps({k: result[k] for k in ("client", "upstream", "breakers", "ledger")}, indent=2))
        for name, passed, detail in checks(result):
            ok &= passed
            print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}")
        print()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    if not args.no_docs:
        command = " ".join([".venv/bin/python bench/faults.py", *(argv if argv is not None else sys.argv[1:])])
        lines = markdown_intro(results[0], command)
        for result in results:
            lines += markdown_scenario(result)
        write_docs("\n".join(lines))
        print(f"wrote the Reliability section of {DOCS}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
