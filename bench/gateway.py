"""Gateway overhead benchmark: what loadbear adds over calling the upstream directly.

    .venv/bin/python bench/gateway.py [--quick] [--out results.json] [--no-docs]

One run, one machine, the ledger on:

* the upstream simulator (``python -m loadbear.testing.simulator --reply-words 20``) and the
  load generator (this process) are pinned to core 1 (``--client-core``);
* loadbear (``uvicorn loadbear.api.factory:build_app --factory``, uvloop + httptools, access
  log off) is pinned to core 0 (``--server-core``), on a fresh SQLite database in a temporary
  directory, with ``OPENAI_BASE_URL`` pointing ``gpt-4o-mini`` at the simulator; a tenant and
  an API key are made with the CLI (``loadbear tenants create`` / ``loadbear keys create``).

Every scenario runs against the simulator directly and then through loadbear, with the same
request bodies (a different prompt for every request, so no cache can answer):
non-streamed and streamed (20 content chunks, ``stream_options.include_usage``), at
concurrency 1 (``--requests`` sequential requests), then for ``--duration`` seconds at each of
``--concurrency`` (default 32 and 128). Connections are keep-alive, one per concurrent client,
opened and warmed before the clock starts.

The load generator is a raw asyncio (uvloop) HTTP/1.1 client: pre-built request bytes, a
minimal response parser (Content-Length and chunked). It is much cheaper per request than
aiohttp's client, so that one core can drive both the simulator and 1,000+ requests/s. Its own
CPU per request is measured and reported, as is the simulator's, so the ceiling of core 1 is
known (the direct runs at high concurrency are that ceiling).

Measured per phase: throughput (completed requests / wall time), latency p50/p99 (request
written -> response complete), time to first byte (non-streamed: first response byte;
streamed: the first byte of the first non-empty ``delta.content`` event), errors (transport
errors, non-200 answers, streams that do not end in ``data: [DONE]``), the server's CPU time
per request (utime + stime of the whole process, i.e. all its threads including the ledger
writer, from ``/proc/PID/stat`` around the measured part of the phase), and its memory
(VmRSS, VmHWM). At the end the server is stopped gracefully (the ledger flushes) and the rows
in ``ai_interactions`` are counted against the requests sent through loadbear.

Also per phase: how busy both cores were and how much of that was other processes (on a shared
machine loadbear may get only part of its core: the share it got and the CPU-bound ceiling,
1 s / CPU per request, are reported next to the measured throughput).

Results are printed, optionally written as JSON (``--out``), and written as Markdown into the
"Gateway overhead" section of ``docs/benchmarks.md`` (full runs only, or ``--quick --docs``;
``--no-docs`` to skip). ``--quick`` is a smoke run (200 sequential requests, 3 s phases).
Needs Linux (``/proc``); ``taskset`` is used when present.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Gateway overhead"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# The first streamed event with non-empty content: `"content":"x`. Both orjson and the
# simulator write compact JSON, so no spaces.
CONTENT_RE = re.compile(rb'"content":"[^"]')
DONE = b"data: [DONE]"

# Where the time goes: py-spy (``record --gil``) on loadbear at concurrency 32, this
# benchmark's setup, and the A/B of the upstream client (``--server-env``). Kept here so
# that the docs section stays whole when the benchmark re-runs;
# update it with the profile when the hot path changes.
NOTES = """\
### Where the server's time goes

Profile (py-spy `record --gil`, 250 Hz, 8 s inside the loadbear phase at concurrency 32, this
benchmark's setup), 2026-11-27 ~12:15 UTC, with the lean upstream client; shares of the server
process's samples (the event-loop thread is ~97% of them, the ledger writer thread ~3%).

Non-streamed (0.30-0.35 ms of server CPU per request in that run):

| share | what |
|--:|---|
| ~13% | the upstream call: `HttpClient.post` (~9%: request bytes, socket write, httptools parse, pool) and the provider around it (`OpenAIProvider.complete`: orjson both ways, usage mapping) |
| ~7% | executor bookkeeping around the call: breaker `allow`/`record`, the attempt row, `_clamped` |
| ~15% | the call's set-up and end: `Gateway.new_call` / `ChatCall` (uuid7, datetimes), `ChatCall.finish` (the ledger row), `Gateway.record` (metrics hook) |
| ~18% | the response: Starlette's `Response` (headers, orjson render) and uvicorn's `RequestResponseCycle.send`, most of it the socket write |
| ~12% | uvicorn's HTTP protocol: httptools callbacks, scope, the task per request |
| ~10% | the route: auth (sha256 of the key, cache), body read, `parse_chat_body` |
| ~8% | ASGI layers in front of `BodyLimit`: uvicorn's proxy-headers middleware, FastAPI/Starlette (`ServerErrorMiddleware`, `ExceptionTelemetryMiddleware`, `AppBodyLimitMiddleware`), `HttpObserver` |
| ~11% | the event loop itself (epoll, callbacks, task steps) |

Streamed (0.50 ms per 20-chunk stream in that run): the provider's stream is ~25%
(`HttpClient.open_stream` ~7.5%, `SSEStream.next_events` ~6% of which `SSEParser.feed` 5.5%,
`orjson.loads` and the delta handling per event ~10%), writing the chunks to the client
(`SSEResponse`, uvicorn's send) ~15%, `ChatCall.finish` + `Gateway.record` ~12%, the rest as
above. At concurrency 1 every upstream event arrives in its own read and costs a wake-up, a
parse and a send of its own; at concurrency 32+ several arrive per read and go out in one send.
On this shared machine everything idle between requests also runs with cold caches: the same
work costs more CPU at c=1 than at c=32, and more on a busy machine than on a quiet one
(compare runs made at the same time only).

Memory grows with the ledger, not with traffic as such: tracemalloc shows no Python-level growth
between rounds of requests; each SQLite connection keeps up to 64 MiB of page cache
(`PRAGMA cache_size=-65536` in `storage/db.py`), which fills as the database grows.

### The lean upstream client (A/B)

The providers call upstreams through a small HTTP/1.1 client of their own
(`providers/_h1.py`: an asyncio protocol with httptools' parser, a keep-alive pool per origin,
TLS through asyncio; `providers/_http.py`: deadlines, SSE) instead of aiohttp's client, which
stays available as `LOADBEAR_UPSTREAM_HTTP=aiohttp` (and is used when
`LOADBEAR_UPSTREAM_TRUST_ENV=1` asks for proxies). A/B in one session, alternating runs
(2 runs x 4 s phases + 2 runs x 5 s phases per arm, 1,000 sequential requests at c=1, load
average 6-10 from other jobs), medians of the server's CPU per request (range):

    python bench/gateway.py --quick --requests 1000 --duration 5 --no-docs --out aiohttp.json --server-env LOADBEAR_UPSTREAM_HTTP=aiohttp
    python bench/gateway.py --quick --requests 1000 --duration 5 --no-docs --out lean.json

| scenario | aiohttp client, ms/req | lean client, ms/req | ratio |
|---|--:|--:|--:|
| non-stream c=1 | 1.125 (1.02-1.31) | 0.715 (0.60-0.87) | 0.64 |
| non-stream c=32 | 0.518 (0.47-0.58) | 0.297 (0.28-0.33) | 0.57 |
| non-stream c=128 | 0.512 (0.46-0.54) | 0.330 (0.28-0.34) | 0.65 |
| stream c=1 | 1.220 (0.87-1.39) | 0.835 (0.66-1.11) | 0.68 |
| stream c=32 | 0.761 (0.66-0.80) | 0.587 (0.42-0.68) | 0.77 |
| stream c=128 | 0.760 (0.67-0.78) | 0.607 (0.45-0.65) | 0.80 |

Standalone (the provider alone against the simulator in the same process, CPU of the calling
thread, 3 x 1,000 calls each): `OpenAIProvider.complete` 0.15 ms through aiohttp, 0.06 ms
through the lean client; a 20-chunk `OpenAIProvider.stream` 0.27-0.39 ms vs 0.21-0.23 ms (the
rest of a stream is the provider's per-event parsing: `orjson.loads` and the delta handling).
In the executor, `_clamped` (the model with its total timeout cut to the request's deadline,
once per attempt) copies slot by slot instead of two `dataclasses.replace`: 11.4 -> 2.3 µs.

Earlier changes (A/B medians of 5-6 alternating 5 s runs at concurrency 32): `POST
/v1/chat/completions` is served by `BodyLimit` directly instead of FastAPI's exception
middleware, router walk and dependency solving (same exception handlers, so the same error
shapes); SSE chunks produced back to back go out in one send; the request id is drawn without
building a `UUID`. Server CPU per non-streamed request 1.37 -> 1.10 ms, per streamed request
2.35 -> 1.63 ms.
"""

TARGETS = {
    "added_p50_ms_c1": 1.0,        # added at p50 at concurrency 1, streaming TTFB included
    "cpu_ms_nonstream": 1.0,       # server CPU per non-streamed request
    "cpu_ms_stream": 2.0,          # server CPU per streamed request
    "rps_c128": 1000.0,            # through loadbear at concurrency 128, non-streamed, no errors
}


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read()
    fields_ = raw[raw.rindex(b")") + 2:].split()
    return (int(fields_[11]) + int(fields_[12])) / CLK_TCK


def thread_cpu(pid: int) -> tuple[float, float]:
    """(main thread, all other threads) CPU seconds of a process."""
    main = proc_cpu(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/stat", "rb") as fh:
            raw = fh.read()
        f = raw[raw.rindex(b")") + 2:].split()
        only_main = (int(f[11]) + int(f[12])) / CLK_TCK
    except OSError:
        return main, 0.0
    return only_main, max(0.0, main - only_main)


def core_times(core: int) -> tuple[float, float]:
    """(busy, total) seconds of one CPU core, from /proc/stat (all processes)."""
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                if line.startswith(f"cpu{core} "):
                    v = [int(x) for x in line.split()[1:]]
                    idle = v[3] + (v[4] if len(v) > 4 else 0)
                    total = sum(v[:8])
                    return (total - idle) / CLK_TCK, total / CLK_TCK
    except OSError:
        pass
    return 0.0, 0.0


def proc_mem(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM and RssAnon in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) / 1024
    return {"rss_mib": round(out.get("VmRSS", 0.0), 1), "hwm_mib": round(out.get("VmHWM", 0.0), 1),
            "anon_mib": round(out.get("RssAnon", 0.0), 1)}


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.args!r} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout:g}s")


def pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if shutil.which("taskset") else argv


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- HTTP client


class Response:
    __slots__ = ("status", "t_first", "t_content", "t_end", "body", "error")

    def __init__(self) -> None:
        self.status = 0
        self.t_first: float | None = None    # first response byte
        self.t_content: float | None = None  # first content event (streams)
        self.t_end = 0.0
        self.body = b""
        self.error: str | None = None


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    TIMEOUT = 60.0  # a request that takes longer is an error (and its connection is dropped)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.resp: Response | None = None
        self.stream = False
        self.state = 0  # 0 head, 1 content-length body, 2 chunked body
        self.length = 0
        self.body = bytearray()
        self.scan = 0
        self.closed = False

    @classmethod
    async def open(cls, port: int) -> "Conn":
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: cls(loop), "127.0.0.1", port)
        return conn

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self._finish(time.perf_counter(), f"connection lost: {exc or 'closed by peer'}")

    def request(self, data: bytes, stream: bool) -> asyncio.Future:
        self.resp = Response()
        self.stream = stream
        self.state = 0
        self.body = bytearray()
        self.scan = 0
        self.buf.clear()
        self.waiter = self.loop.create_future()
        self.timer = self.loop.call_later(self.TIMEOUT, self._timed_out)
        self.transport.write(data)
        return self.waiter

    def _timed_out(self) -> None:
        self.timer = None
        if self.waiter is not None and not self.waiter.done():
            self._finish(time.perf_counter(), f"no complete response within {self.TIMEOUT:g}s")
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        resp = self.resp
        if resp is None or self.waiter is None or self.waiter.done():
            return
        if resp.t_first is None:
            resp.t_first = now
        self.buf += data
        try:
            self._parse(now)
        except Exception as exc:  # a protocol error is a failed request
            self._finish(now, f"unparseable response: {exc}")
            self.transport.close()

    def _finish(self, now: float, error: str | None = None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        resp = self.resp
        resp.t_end = now
        resp.error = error
        resp.body = bytes(self.body)
        self.waiter.set_result(resp)

    def _parse(self, now: float) -> None:
        buf = self.buf
        if self.state == 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            self.resp.status = int(head[9:12])
            if b"transfer-encoding: chunked" in head:
                self.state = 2
            else:
                i = head.find(b"content-length:")
                if i < 0:
                    raise ValueError("no content-length and not chunked")
                j = head.find(b"\r\n", i)
                self.length = int(head[i + 15: j if j > 0 else None])
                self.state = 1
        if self.state == 1:
            if len(buf) >= self.length:
                self.body = buf[: self.length]
                del buf[: self.length]
                self._finish(now)
            return
        # chunked
        pos = 0
        n = len(buf)
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            if size == 0:
                if n < eol + 4:  # the empty trailer line
                    break
                del buf[: eol + 4]
                self._chunks_done(now)
                return
            if n < eol + 2 + size + 2:
                break
            self.body += buf[eol + 2: eol + 2 + size]
            pos = eol + 2 + size + 2
        if pos:
            del buf[:pos]
        if self.stream and self.resp.t_content is None and CONTENT_RE.search(self.body, max(0, self.scan - 16)):
            self.resp.t_content = now
        self.scan = len(self.body)

    def _chunks_done(self, now: float) -> None:
        if self.stream and self.resp.t_content is None and CONTENT_RE.search(self.body, max(0, self.scan - 16)):
            self.resp.t_content = now
        self._finish(now)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Target:
    """Builds request bytes for one endpoint (the simulator or loadbear)."""

    def __init__(self, name: str, port: int, path: str, key: str | None) -> None:
        self.name = name
        self.port = port
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        if key:
            head += f"Authorization: Bearer {key}\r\n"
        self.head = head.encode()
        self.sent = 0

    def build(self, serial: int, stream: bool) -> bytes:
        body = (
            '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant."},'
            f'{{"role":"user","content":"Benchmark request {serial}: say something short."}}]'
            + (',"stream":true,"stream_options":{"include_usage":true}}' if stream else "}")
        ).encode()
        self.sent += 1
        return self.head + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


# --------------------------------------------------------------------------- phases


@dataclass
class Phase:
    target: str
    mode: str            # "non-stream" | "stream"
    concurrency: int
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    ttfb_p50_ms: float = 0.0
    ttfb_p99_ms: float = 0.0
    server_cpu_ms: float | None = None     # loadbear's CPU per request
    sim_cpu_ms: float | None = None        # the simulator's CPU per request
    client_cpu_ms: float | None = None     # the load generator's CPU per request
    server_mem: dict[str, float] | None = None
    server_loop_cpu_ms: float | None = None     # ... of which the event-loop (main) thread
    server_threads_cpu_ms: float | None = None  # ... and the other threads (ledger writer, to_thread)
    server_core_busy_pct: float | None = None   # the server's core, busy with anything
    server_core_foreign_pct: float | None = None  # ... busy with processes other than loadbear
    client_core_busy_pct: float | None = None
    client_core_foreign_pct: float | None = None  # busy with other than the simulator + generator
    server_share_pct: float | None = None  # loadbear's CPU time / wall time: how much of its core it got

    @property
    def key(self) -> str:
        return f"{self.mode}/c{self.concurrency}"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.serial = 0
        self.server_pid: int | None = None
        self.sim_pid: int | None = None

    def check(self, resp: Response, stream: bool) -> str | None:
        if resp.error:
            return resp.error
        if resp.status != 200:
            return f"HTTP {resp.status}: {resp.body[:200]!r}"
        if stream:
            if DONE not in resp.body[-64:]:
                return f"stream without [DONE]: ...{resp.body[-200:]!r}"
            if resp.t_content is None:
                return "stream without content"
        elif not resp.body.startswith(b"{") or b'"choices"' not in resp.body:
            return f"not a completion: {resp.body[:200]!r}"
        return None

    async def one(self, conn: Conn, target: Target, stream: bool) -> tuple[Response, float]:
        self.serial += 1
        data = target.build(self.serial, stream)
        t0 = time.perf_counter()
        resp = await conn.request(data, stream)
        return resp, t0

    async def run_phase(self, target: Target, stream: bool, concurrency: int) -> Phase:
        args = self.args
        phase = Phase(target.name, "stream" if stream else "non-stream", concurrency)
        conns = [await Conn.open(target.port) for _ in range(concurrency)]
        # Warm up: every connection carries a few requests before the clock starts.
        warm = max(2, args.warmup // concurrency)
        for _ in range(warm):
            await asyncio.gather(*(self.one(c, target, stream) for c in conns))

        latencies: list[float] = []
        ttfbs: list[float] = []
        errors: list[str] = []
        sequential = concurrency == 1
        count = args.requests if sequential else None
        budget = [count or 0]

        async def worker(conn: Conn) -> None:
            while True:
                if sequential:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                elif time.perf_counter() >= end:
                    return
                if conn.closed:
                    conn_new = await Conn.open(target.port)
                    conns.append(conn_new)
                    conn = conn_new
                resp, t0 = await self.one(conn, target, stream)
                problem = self.check(resp, stream)
                if problem:
                    errors.append(problem)
                    continue
                latencies.append(resp.t_end - t0)
                first = resp.t_content if stream else resp.t_first
                ttfbs.append(first - t0)

        server0 = proc_cpu(self.server_pid) if target.name == "loadbear" else None
        threads0 = thread_cpu(self.server_pid) if target.name == "loadbear" else None
        srv_all0 = proc_cpu(self.server_pid)
        core_s0, core_c0 = core_times(args.server_core), core_times(args.client_core)
        sim0 = proc_cpu(self.sim_pid)
        me0 = self_cpu()
        start = time.perf_counter()
        end = start + args.duration
        await asyncio.gather(*(worker(c) for c in conns))
        elapsed = time.perf_counter() - start
        me1 = self_cpu()
        sim1 = proc_cpu(self.sim_pid)
        srv_all1 = proc_cpu(self.server_pid)
        core_s1, core_c1 = core_times(args.server_core), core_times(args.client_core)
        done = len(latencies) + len(errors)
        if server0 is not None:
            phase.server_cpu_ms = round((srv_all1 - server0) * 1000 / max(done, 1), 3)
            threads1 = thread_cpu(self.server_pid)
            phase.server_loop_cpu_ms = round((threads1[0] - threads0[0]) * 1000 / max(done, 1), 3)
            phase.server_threads_cpu_ms = round((threads1[1] - threads0[1]) * 1000 / max(done, 1), 3)
            phase.server_mem = proc_mem(self.server_pid)
            phase.server_share_pct = round(100 * (srv_all1 - server0) / elapsed, 1)
        wall_s = max(core_s1[1] - core_s0[1], 1e-9)
        wall_c = max(core_c1[1] - core_c0[1], 1e-9)
        phase.server_core_busy_pct = round(100 * (core_s1[0] - core_s0[0]) / wall_s, 1)
        phase.server_core_foreign_pct = round(100 * max(0.0, (core_s1[0] - core_s0[0]) - (srv_all1 - srv_all0)) / wall_s, 1)
        phase.client_core_busy_pct = round(100 * (core_c1[0] - core_c0[0]) / wall_c, 1)
        phase.client_core_foreign_pct = round(
            100 * max(0.0, (core_c1[0] - core_c0[0]) - (sim1 - sim0) - (me1 - me0)) / wall_c, 1)
        phase.sim_cpu_ms = round((sim1 - sim0) * 1000 / max(done, 1), 3)
        phase.client_cpu_ms = round((me1 - me0) * 1000 / max(done, 1), 3)
        for c in conns:
            c.close()
        phase.requests = done
        phase.errors = len(errors)
        phase.error_samples = sorted(set(errors))[:5]
        phase.seconds = round(elapsed, 3)
        phase.rps = round(done / elapsed, 1)
        phase.p50_ms = round(pct(latencies, 0.50) * 1000, 3)
        phase.p99_ms = round(pct(latencies, 0.99) * 1000, 3)
        phase.ttfb_p50_ms = round(pct(ttfbs, 0.50) * 1000, 3)
        phase.ttfb_p99_ms = round(pct(ttfbs, 0.99) * 1000, 3)
        await asyncio.sleep(0.2)  # let closed connections settle
        return phase


# --------------------------------------------------------------------------- report


def summarize(phases: list[Phase], ledger: dict[str, Any]) -> dict[str, Any]:
    by = {(p.target, p.key): p for p in phases}
    rows = []
    for p in phases:
        if p.target != "loadbear":
            continue
        d = by.get(("direct", p.key))
        if d is None:
            continue
        rows.append({
            "scenario": p.key,
            "added_p50_ms": round(p.p50_ms - d.p50_ms, 3),
            "added_p99_ms": round(p.p99_ms - d.p99_ms, 3),
            "added_ttfb_p50_ms": round(p.ttfb_p50_ms - d.ttfb_p50_ms, 3),
            "direct_rps": d.rps,
            "loadbear_rps": p.rps,
            "server_cpu_ms": p.server_cpu_ms,
            "server_share_pct": p.server_share_pct,
            "server_core_foreign_pct": p.server_core_foreign_pct,
            # What one core would serve if loadbear had it to itself: 1 s / CPU per request.
            "cpu_ceiling_rps": round(1000 / p.server_cpu_ms) if p.server_cpu_ms else None,
            "errors": p.errors,
        })
    checks = []

    def get(mode: str, c: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["scenario"] == f"{mode}/c{c}"), None)

    ns1, s1 = get("non-stream", 1), get("stream", 1)
    if ns1:
        v = max(ns1["added_p50_ms"], ns1["added_ttfb_p50_ms"])
        checks.append(("added at p50, c=1, non-streamed", f"{v:.3f} ms", f"≤ {TARGETS['added_p50_ms_c1']:g} ms",
                       v <= TARGETS["added_p50_ms_c1"]))
    if s1:
        v = s1["added_ttfb_p50_ms"]
        checks.append(("added to first streamed content byte at p50, c=1", f"{v:.3f} ms",
                       f"≤ {TARGETS['added_p50_ms_c1']:g} ms", v <= TARGETS["added_p50_ms_c1"]))
        v = s1["added_p50_ms"]
        checks.append(("added at p50, c=1, streamed (whole stream)", f"{v:.3f} ms",
                       f"≤ {TARGETS['added_p50_ms_c1']:g} ms", v <= TARGETS["added_p50_ms_c1"]))
    for mode, target_key in (("non-stream", "cpu_ms_nonstream"), ("stream", "cpu_ms_stream")):
        cpus = [p.server_cpu_ms for p in phases if p.target == "loadbear" and p.mode == mode and p.server_cpu_ms]
        if cpus:
            worst = max(cpus)
            checks.append((f"server CPU per {mode}ed request (worst phase)".replace("non-streamed", "non-streamed")
                           .replace("streamed", "streamed"), f"{worst:.3f} ms",
                           f"≤ {TARGETS[target_key]:g} ms", worst <= TARGETS[target_key]))
    top = max((p.concurrency for p in phases), default=0)
    for p in phases:
        if p.target == "loadbear" and p.mode == "non-stream" and p.concurrency == top and top > 1:
            ok = p.rps >= TARGETS["rps_c128"] and p.errors == 0
            checks.append((f"throughput at c={top}, non-streamed, no errors", f"{p.rps:,.0f} req/s, {p.errors} errors",
                           f"≥ {TARGETS['rps_c128']:,.0f} req/s, 0 errors", ok))
    for p in phases:
        if p.target == "loadbear" and p.mode == "non-stream" and p.concurrency == top and top > 1 and p.server_cpu_ms:
            ceiling = 1000 / p.server_cpu_ms
            checks.append((f"(derived) CPU-bound ceiling at c={top}, non-streamed: 1 core / server CPU per request",
                           f"{ceiling:,.0f} req/s", f"≥ {TARGETS['rps_c128']:,.0f} req/s",
                           ceiling >= TARGETS["rps_c128"], True))
    total_errors = sum(p.errors for p in phases)
    checks.append(("errors, all phases", str(total_errors), "0", total_errors == 0))
    if ledger:
        ok = ledger.get("ai_interactions") == ledger.get("sent")
        checks.append(("ledger rows = requests sent through loadbear",
                       f"{ledger.get('ai_interactions')} / {ledger.get('sent')}", "equal", ok))
    checks = [c if len(c) == 5 else (*c, False) for c in checks]
    gen = [p for p in phases if p.target == "direct" and p.client_cpu_ms and p.concurrency > 1]
    generator = {
        mode: {
            "client_cpu_ms": min(p.client_cpu_ms for p in gen if p.mode == mode),
            "direct_max_rps": max(p.rps for p in gen if p.mode == mode),
        }
        for mode in {p.mode for p in gen}
    }
    return {"overhead": rows, "generator": generator, "checks": [
        {"what": w, "measured": m, "target": t, "met": ok, "derived": d} for w, m, t, ok, d in checks]}


def fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        SECTION,
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Measured {meta['date']} on {meta['machine']} (Python {meta['python']}), "
        f"loadbear pinned to core {meta['server_core']}, simulator and load generator on core {meta['client_core']}; "
        f"SQLite ledger on. Concurrency 1: {meta['requests']} sequential requests; "
        f"higher concurrency: {meta['duration']:g} s each. Latencies in ms; TTFB is the first response byte "
        "(non-streamed) or the first content event (streamed, 20 chunks). "
        "Server CPU is loadbear's whole-process utime+stime per request (event-loop thread + other threads). "
        f"Machine load average {meta['load_avg_start'][0]:.1f} at the start, {meta['load_avg_end'][0]:.1f} at the end"
        + (f"; benchmark processes at nice {meta['nice']}" if meta.get("nice") else "")
        + ". \"Busy %\" is how busy each core was during the phase, \"others\" the share used by processes "
        "that are not part of the benchmark (a shared machine).",
        "",
        "| target | scenario | requests | req/s | p50 | p99 | TTFB p50 | TTFB p99 | errors "
        "| server CPU ms/req (loop + threads) | server RSS / peak MiB | server core busy % (others) "
        "| client core busy % (others) | generator CPU ms/req | simulator CPU ms/req |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in result["phases"]:
        mem = p["server_mem"]
        cpu = "—" if p["server_cpu_ms"] is None else (
            f"{p['server_cpu_ms']:.3f} ({p['server_loop_cpu_ms']:.3f} + {p['server_threads_cpu_ms']:.3f})")
        lines.append(
            f"| {p['target']} | {p['mode']} c={p['concurrency']} | {p['requests']:,} | {p['rps']:,.0f} | "
            f"{p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['ttfb_p50_ms']:.2f} | {p['ttfb_p99_ms']:.2f} | {p['errors']} | "
            f"{cpu} | {(str(mem['rss_mib']) + ' / ' + str(mem['hwm_mib'])) if mem else '—'} | "
            f"{p['server_core_busy_pct']:.0f} ({p['server_core_foreign_pct']:.0f}) | "
            f"{p['client_core_busy_pct']:.0f} ({p['client_core_foreign_pct']:.0f}) | "
            f"{fmt(p['client_cpu_ms'], 3)} | {fmt(p['sim_cpu_ms'], 3)} |"
        )
    lines += [
        "",
        "What loadbear adds over calling the simulator directly (same run):",
        "",
        "| scenario | added p50 ms | added p99 ms | added TTFB p50 ms | direct req/s | loadbear req/s "
        "| server CPU ms/req | share of its core loadbear got % | CPU-bound ceiling req/s (1 core) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["summary"]["overhead"]:
        lines.append(
            f"| {r['scenario']} | {r['added_p50_ms']:.2f} | {r['added_p99_ms']:.2f} | {r['added_ttfb_p50_ms']:.2f} | "
            f"{r['direct_rps']:,.0f} | {r['loadbear_rps']:,.0f} | {fmt(r['server_cpu_ms'], 3)} | "
            f"{fmt(r['server_share_pct'], 0)} | {fmt(r['cpu_ceiling_rps'])} |"
        )
    shares = [r["server_share_pct"] for r in result["summary"]["overhead"] if r.get("server_share_pct") is not None]
    foreign = max((p["server_core_foreign_pct"] for p in result["phases"] if p["target"] == "loadbear"), default=0)
    if shares and min(shares) < 80 and foreign < 10:
        lines += ["", f"**Idle, not contended:** other processes used at most {foreign:.0f}% of loadbear's core in "
                      "this run. Where loadbear's core was less than fully busy (concurrency 1), it was waiting on "
                      "the simulator and the load generator, which share the other core."]
    elif shares and min(shares) < 80:
        lines += ["", f"**Contention:** in this run loadbear got only {min(shares):.0f}-{max(shares):.0f}% of its core "
                      "(other processes on the shared machine used the rest, see \"others\" above), and its "
                      "simulator and load generator shared their core the same way. Latency, time to first byte and "
                      "throughput through loadbear then measure the machine's contention more than loadbear: its own "
                      "cost is the server CPU per request, and what one dedicated core would serve is the CPU-bound "
                      "ceiling."]
    lines += ["", "Targets:", "", "| check | measured | target | met |", "|---|---|---|---|"]
    for c in result["summary"]["checks"]:
        lines.append(f"| {c['what']} | {c['measured']} | {c['target']} | {'yes' if c['met'] else '**no**'} |")
    gen = result["summary"].get("generator") or {}
    if gen:
        parts = [f"{mode}: {g['client_cpu_ms']:.3f} ms of CPU per request (≈ {1000 / g['client_cpu_ms']:,.0f} req/s "
                 f"on its own), {g['direct_max_rps']:,.0f} req/s against the simulator directly"
                 for mode, g in sorted(gen.items()) if g["client_cpu_ms"]]
        lines += ["", "Load generator ceiling (raw asyncio client, sharing its core with the simulator): "
                  + "; ".join(parts) + "."]
    led = result.get("ledger") or {}
    if led:
        lines += ["", f"Ledger: {led.get('ai_interactions')} rows in `ai_interactions` "
                      f"({led.get('ai_attempts')} attempts) for {led.get('sent')} requests sent through loadbear "
                      f"(warm-up included); statuses {led.get('by_status')}."]
    m0, m1 = meta.get("server_mem_start"), meta.get("server_mem_end")
    if m0 and m1:
        lines += ["", f"Server memory: RSS {m0['rss_mib']} MiB after start-up (tokenizer loaded), {m1['rss_mib']} MiB "
                      f"at the end, peak {m1['hwm_mib']} MiB (see below on the growth)."]
    notes = result.get("notes")
    if notes:
        lines += ["", *notes]
    lines += ["", NOTES.rstrip("\n")]
    return "\n".join(lines) + "\n"


def write_docs(section: str, path: Path = DOCS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION):], flags=re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        rest = text[end:]
        text = text[:start] + section + ("\n" + rest if rest else "")
    path.write_text(text)


def print_table(result: dict[str, Any]) -> None:
    hdr = f"{'target':9} {'scenario':16} {'reqs':>7} {'req/s':>7} {'p50':>7} {'p99':>7} {'ttfb50':>7} {'ttfb99':>7} " \
          f"{'err':>4} {'srvCPU':>7} {'(loop':>6} {'+thr)':>6} {'genCPU':>7} {'simCPU':>7} {'RSS':>6} {'srvcore':>7} {'other':>6} " \
          f"{'clicore':>7} {'other':>6}"
    print(hdr)
    for p in result["phases"]:
        mem = p["server_mem"]
        print(f"{p['target']:9} {p['mode'] + ' c=' + str(p['concurrency']):16} {p['requests']:>7} {p['rps']:>7.0f} "
              f"{p['p50_ms']:>7.2f} {p['p99_ms']:>7.2f} {p['ttfb_p50_ms']:>7.2f} {p['ttfb_p99_ms']:>7.2f} {p['errors']:>4} "
              f"{fmt(p['server_cpu_ms'], 3):>7} {fmt(p['server_loop_cpu_ms'], 3):>6} {fmt(p['server_threads_cpu_ms'], 3):>6} "
              f"{fmt(p['client_cpu_ms'], 3):>7} {fmt(p['sim_cpu_ms'], 3):>7} "
              f"{(str(mem['rss_mib'])) if mem else '—':>6} {p['server_core_busy_pct']:>7.0f} {p['server_core_foreign_pct']:>6.0f} "
              f"{p['client_core_busy_pct']:>7.0f} {p['client_core_foreign_pct']:>6.0f}")
        for e in p["error_samples"]:
            print(f"    error: {e}")
    print()
    print(f"{'scenario':16} {'+p50':>7} {'+p99':>7} {'+ttfb50':>8} {'direct/s':>9} {'lb/s':>7} {'srvCPU':>7} "
          f"{'share%':>6} {'ceiling/s':>9}")
    for r in result["summary"]["overhead"]:
        print(f"{r['scenario']:16} {r['added_p50_ms']:>7.2f} {r['added_p99_ms']:>7.2f} {r['added_ttfb_p50_ms']:>8.2f} "
              f"{r['direct_rps']:>9.0f} {r['loadbear_rps']:>7.0f} {fmt(r['server_cpu_ms'], 3):>7} "
              f"{fmt(r['server_share_pct'], 0):>6} {fmt(r['cpu_ceiling_rps']):>9}")
    print()
    for c in result["summary"]["checks"]:
        print(f"[{'ok' if c['met'] else 'MISS'}] {c['what']}: {c['measured']} (target {c['target']})")
    if result.get("ledger"):
        print(f"ledger: {result['ledger']}")


# --------------------------------------------------------------------------- main


def cli_json(env: dict[str, str], cwd: str, *argv: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "loadbear.cli", *argv], env=env, cwd=cwd,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"loadbear {' '.join(argv)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def ledger_counts(db_path: Path, sent: int) -> dict[str, Any]:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        n = con.execute("SELECT count(*) FROM ai_interactions").fetchone()[0]
        a = con.execute("SELECT count(*) FROM ai_attempts").fetchone()[0]
        by_status = dict(con.execute("SELECT status, count(*) FROM ai_interactions GROUP BY status").fetchall())
    finally:
        con.close()
    return {"sent": sent, "ai_interactions": n, "ai_attempts": a, "by_status": by_status}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 sequential requests, 3 s phases")
    parser.add_argument("--requests", type=int, default=None, help="sequential requests at concurrency 1 (2000)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per concurrent phase (15)")
    parser.add_argument("--concurrency", default="32,128", help="concurrent phases (comma-separated)")
    parser.add_argument("--modes", default="non-stream,stream", help="non-stream, stream or both")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests before each phase")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--reply-words", type=int, default=20)
    parser.add_argument("--nice", type=int, default=0,
                        help="run the simulator, loadbear and the generator at this nice level (negative needs "
                             "root): keeps other jobs on a shared machine from dominating the numbers")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--docs", action="store_true", help="write docs/benchmarks.md even with --quick")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (database, logs)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for loadbear (repeatable), for A/B runs, e.g. "
                             "LOADBEAR_UPSTREAM_TRUST_ENV=1 to call the simulator through aiohttp")
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 200 if args.quick else 2000
    if args.duration is None:
        args.duration = 3.0 if args.quick else 15.0
    if args.quick:
        args.warmup = min(args.warmup, 64)
    concurrencies = [1] + [int(c) for c in args.concurrency.split(",") if c.strip() and int(c) > 1]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    tmp = Path(tempfile.mkdtemp(prefix="loadbear_gwbench_"))
    sim_port, gw_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADBEAR_", "OPENAI_", "ANTHROPIC_"))}
    env.update({
        "LOADBEAR_DATABASE_URL": f"sqlite:///{tmp}/bench.db",
        "LOADBEAR_LOG_LEVEL": "warning",
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{sim_port}/v1",
        "PYTHONUNBUFFERED": "1",
    })
    procs: list[subprocess.Popen] = []

    def renice() -> None:
        if args.nice:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)

    sim_log = open(tmp / "simulator.log", "wb")
    srv_log = open(tmp / "server.log", "wb")
    try:
        sim = subprocess.Popen(
            pinned(args.client_core, [sys.executable, "-m", "loadbear.testing.simulator", "--port", str(sim_port),
                                      "--reply-words", str(args.reply_words)]),
            env=env, cwd=tmp, stdout=sim_log, stderr=subprocess.STDOUT, preexec_fn=renice)
        procs.append(sim)
        wait_http(f"http://127.0.0.1:{sim_port}/_sim/health", sim)

        cli_json(env, str(tmp), "tenants", "create", "bench", "--json")
        key = cli_json(env, str(tmp), "keys", "create", "--tenant", "bench", "--json")["key"]

        server_argv = [sys.executable, "-m", "uvicorn", "loadbear.api.factory:build_app", "--factory",
                       "--host", "127.0.0.1", "--port", str(gw_port), "--loop", "uvloop", "--http", "httptools",
                       "--no-access-log", "--log-level", "warning"]
        server_env = dict(env)
        for item in args.server_env:
            name, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--server-env wants NAME=VALUE, got {item!r}")
            server_env[name] = value
        server = subprocess.Popen(pinned(args.server_core, server_argv), env=server_env, cwd=tmp,
                                  stdout=srv_log, stderr=subprocess.STDOUT, preexec_fn=renice)
        procs.append(server)
        wait_http(f"http://127.0.0.1:{gw_port}/healthz", server)

        renice()
        try:
            os.sched_setaffinity(0, {args.client_core})
        except (AttributeError, OSError):
            pass
        try:
            import uvloop
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass

        direct = Target("direct", sim_port, "/v1/chat/completions", "sk-bench")
        through = Target("loadbear", gw_port, "/v1/chat/completions", key)
        bench = Bench(args)
        bench.server_pid, bench.sim_pid = server.pid, sim.pid
        base_mem = proc_mem(server.pid)
        load_start = os.getloadavg()

        async def run_all() -> list[Phase]:
            phases = []
            for mode in modes:
                for c in concurrencies:
                    for target in (direct, through):
                        p = await bench.run_phase(target, mode == "stream", c)
                        print(f"  {p.target:8} {p.key:16} {p.requests:7} req {p.rps:8.0f}/s p50 {p.p50_ms:6.2f} "
                              f"p99 {p.p99_ms:6.2f} ttfb {p.ttfb_p50_ms:6.2f} err {p.errors} "
                              f"cpu {fmt(p.server_cpu_ms, 3)}", flush=True)
                        phases.append(p)
            return phases

        print(f"simulator :{sim_port} (core {args.client_core}), loadbear :{gw_port} (core {args.server_core}), "
              f"data in {tmp}", flush=True)
        phases = asyncio.run(run_all())
        end_mem = proc_mem(server.pid)
        stop(server)
        ledger = ledger_counts(tmp / "bench.db", through.sent)
        cmd = "python bench/gateway.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
        result = {
            "meta": {
                "command": cmd.strip(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": f"{platform.machine()} {os.cpu_count()} cores ({_cpu_model()})",
                "python": platform.python_version(),
                "server_core": args.server_core,
                "client_core": args.client_core,
                "requests": args.requests,
                "duration": args.duration,
                "server_mem_start": base_mem,
                "server_mem_end": end_mem,
                "load_avg_start": load_start,
                "load_avg_end": os.getloadavg(),
                "nice": args.nice,
            },
            "phases": [p.__dict__ for p in phases],
            "ledger": ledger,
        }
        result["summary"] = summarize(phases, ledger)
        print()
        print_table(result)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        if not args.no_docs and (not args.quick or args.docs):
            write_docs(markdown(result))
            print(f"\nwrote the '{SECTION[3:]}' section of {DOCS}")
        return 0 if all(c["met"] for c in result["summary"]["checks"] if not c["derived"]) else 1
    finally:
        for p in reversed(procs):
            stop(p)
        sim_log.close()
        srv_log.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
