"""The lean upstream HTTP/1.1 client (providers/_h1.py + HttpClient in providers/_http.py)
against real servers on 127.0.0.1: a scripted raw-socket server (threads, blocking sockets,
so a test controls every byte, every hang-up and every reset), TLS, and the upstream simulator.

Covers what the providers rely on: keep-alive reuse per origin, the pool limit, idle expiry,
the one resend of a request that could not be written on a stale pooled connection (and no
resend once it was written), Content-Length / chunked / read-until-close / gzip bodies,
deadlines, and an upstream closing mid-body.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest

from loadbear.providers import ChatRequest, ErrorKind, ModelConfig, OpenAIProvider, ProviderError, Timeouts
from loadbear.providers._http import HttpClient, SSEStream, make_client
from loadbear.testing import UpstreamSimulator

T = Timeouts(connect=2.0, first_token=5.0, idle=5.0, total=10.0)
JSON = {"Content-Type": "application/json"}


def ok(body: bytes = b'{"ok":true}', extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


# --------------------------------------------------------------------------- a scripted server


@dataclass
class Seen:
    conn_no: int
    head: bytes
    body: bytes


Action = Callable[[socket.socket, "Scripted"], bool]  # returns False to hang up afterwards


def reply(*parts: bytes | float, close: bool = False) -> Action:
    """Send the parts (floats are pauses), then keep the connection (or close it)."""

    def act(sock: socket.socket, srv: "Scripted") -> bool:
        for part in parts:
            if isinstance(part, float):
                time.sleep(part)
            else:
                sock.sendall(part)
        return not close

    return act


def hang_up(reset: bool = False) -> Action:
    """Read the request and go away without an answer (FIN, or RST)."""

    def act(sock: socket.socket, srv: "Scripted") -> bool:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False

    return act


def reply_then_reset_on(event: threading.Event, done: threading.Event, body: bytes = b'{"ok":true}') -> Action:
    """Answer, then (while the connection idles in the client's pool) reset it when told."""

    def act(sock: socket.socket, srv: "Scripted") -> bool:
        sock.sendall(ok(body))
        event.wait(5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        done.set()
        return False

    return act


@dataclass
class Scripted:
    """Answers requests in order with the queued actions; records connections and requests."""

    actions: list[Action] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    tls: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.open_now += 1
                self.most_open = max(self.most_open, self.open_now)
                no = self.connections
            threading.Thread(target=self._serve, args=(sock, no), daemon=True).start()

    def _serve(self, sock: socket.socket, no: int) -> None:
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                with self.lock:
                    self.seen.append(Seen(no, head, body))
                    action = self.actions.pop(0) if self.actions else reply(ok())
                if not action(sock, self):
                    return
        except OSError:
            return
        finally:
            with self.lock:
                self.open_now -= 1
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self.stopping = True
        self.sock.close()


@pytest.fixture
def srv():
    s = Scripted()
    yield s
    s.close()


@pytest.fixture
async def client():
    c = HttpClient("test")
    yield c
    await c.aclose()


async def post(client: HttpClient, srv: Scripted, body: bytes = b'{"q":1}', timeouts: Timeouts = T, path: str = "/v1/x"):
    return await client.post(srv.url + path, body, dict(JSON), timeouts)


def leased(client: HttpClient) -> int:
    return 0 if client._session is None else len(client._session.connector._acquired)


# --------------------------------------------------------------------------- keep-alive and the pool


async def test_keep_alive_reuses_one_connection(client, srv) -> None:
    for i in range(5):
        status, headers, raw = await post(client, srv, b'{"i":%d}' % i)
        assert status == 200 and raw == b'{"ok":true}'
        assert headers["Content-Type"] == "application/json" and headers.get("CONTENT-LENGTH") == "11"
    assert srv.connections == 1 and [s.body for s in srv.seen] == [b'{"i":%d}' % i for i in range(5)]
    head = srv.seen[0].head.decode()
    assert head.startswith("POST /v1/x HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{srv.port}" in head and "Content-Length: 7" in head and "Content-Type: application/json" in head
    assert leased(client) == 0


async def test_connection_close_and_read_until_close_bodies_are_not_reused(client, srv) -> None:
    srv.actions = [
        reply(ok(extra="Connection: close\r\n"), close=True),
        # no Content-Length, no chunking: the body is whatever comes until the server hangs up
        reply(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n", b'{"a":', 0.05, b"1}", close=True),
        reply(ok()),
    ]
    assert (await post(client, srv))[2] == b'{"ok":true}'
    assert (await post(client, srv))[2] == b'{"a":1}'
    assert (await post(client, srv))[2] == b'{"ok":true}'
    assert srv.connections == 3


async def test_chunked_and_gzip_bodies(client, srv) -> None:
    packed = gzip.compress(b'{"zipped":true}')
    srv.actions = [
        reply(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Multi: a\r\nx-multi: b\r\n\r\n",
            b"4\r\n{\"a\"\r\n", 0.02, b"5;ext=1\r\n:[1,2\r\n", b"2\r\n]}\r\n", 0.02, b"0\r\n\r\n",
        ),
        reply(f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len(packed)}\r\n\r\n".encode() + packed),
    ]
    status, headers, raw = await post(client, srv)
    assert raw == b'{"a":[1,2]}' and headers["x-multi"] == "a, b"
    assert (await post(client, srv))[2] == b'{"zipped":true}'
    assert srv.connections == 1  # both bodies were read whole: the connection stayed pooled


async def test_error_statuses_come_back_with_their_body(client, srv) -> None:
    body = b'{"error":{"message":"slow down"}}'
    srv.actions = [reply(f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)]
    status, headers, raw = await post(client, srv)
    assert (status, headers.get("retry-after"), raw) == (429, "2", body)


async def test_pool_limit_caps_connections(srv) -> None:
    client = HttpClient("test", limit=2)
    srv.actions = [reply(0.1, ok()) for _ in range(6)]
    try:
        results = await asyncio.gather(*(post(client, srv) for _ in range(6)))
    finally:
        await client.aclose()
    assert [r[0] for r in results] == [200] * 6
    assert srv.connections == 2 and srv.most_open == 2


async def test_waiting_for_a_free_connection_counts_against_the_deadline(srv) -> None:
    client = HttpClient("test", limit=1)
    srv.actions = [reply(0.6, ok()), reply(ok())]
    try:
        slow = asyncio.create_task(post(client, srv))
        await asyncio.sleep(0.05)
        with pytest.raises(ProviderError) as info:
            await post(client, srv, timeouts=Timeouts(connect=2, first_token=0.15, idle=5, total=10))
        assert info.value.kind is ErrorKind.FIRST_TOKEN_TIMEOUT
        assert (await slow)[0] == 200
        assert (await post(client, srv))[0] == 200  # the slot came back
    finally:
        await client.aclose()
    assert srv.connections == 1 and len(srv.seen) == 2


async def test_unsolicited_bytes_on_an_idle_connection_retire_it(client, srv) -> None:
    srv.actions = [reply(ok(), 0.05, b"HTTP/1.1 408 Request Timeout\r\n\r\n")]
    await post(client, srv)
    await asyncio.sleep(0.2)
    assert (await post(client, srv))[0] == 200 and srv.connections == 2


async def test_bad_compressed_body_is_malformed(client, srv) -> None:
    srv.actions = [reply(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!")]
    with pytest.raises(ProviderError) as info:
        await post(client, srv)
    assert info.value.kind is ErrorKind.MALFORMED


async def test_idle_connections_expire(srv) -> None:
    client = HttpClient("test", keepalive_timeout=0.1)
    try:
        await post(client, srv)
        await asyncio.sleep(0.3)  # the sweep closes it; a take would skip it too
        await post(client, srv)
    finally:
        await client.aclose()
    assert srv.connections == 2
    deadline = time.monotonic() + 2
    while srv.open_now > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert srv.open_now == 0  # aclose closed the pooled one, the sweep the expired one


async def test_pooled_connection_closed_by_the_upstream_is_skipped(client, srv) -> None:
    srv.actions = [reply(ok(), 0.02, close=True)]  # answers, then hangs up while we idle
    await post(client, srv)
    await asyncio.sleep(0.2)
    assert (await post(client, srv))[0] == 200
    assert srv.connections == 2 and len(srv.seen) == 2


# --------------------------------------------------------------------------- stale connections


def _stale_write(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    srv = Scripted()
    kill, killed = threading.Event(), threading.Event()
    srv.actions = [reply_then_reset_on(kill, killed), reply(ok(b'{"second":true}'))]

    async def main() -> None:
        client = HttpClient("test")
        try:
            await post(client, srv)
            kill.set()
            assert killed.wait(5)
            time.sleep(0.05)  # blocks the loop: it has not seen the reset when we reuse the socket
            status, _, raw = await post(client, srv, b'{"again":1}')
            assert (status, raw) == (200, b'{"second":true}')
        finally:
            await client.aclose()

    loop = loop_factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        srv.close()
    # the request reached the upstream exactly once, on a fresh connection
    assert [(s.conn_no, s.body) for s in srv.seen] == [(1, b'{"q":1}'), (2, b'{"again":1}')]


def test_request_that_could_not_be_written_on_a_stale_connection_is_resent_asyncio() -> None:
    _stale_write(asyncio.new_event_loop)


def test_request_that_could_not_be_written_on_a_stale_connection_is_resent_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    _stale_write(uvloop.new_event_loop)


@pytest.mark.parametrize("reset", [False, True])
async def test_a_written_request_is_never_resent(client, srv, reset) -> None:
    srv.actions = [reply(ok()), hang_up(reset=reset)]
    await post(client, srv)
    with pytest.raises(ProviderError) as info:
        await post(client, srv, b'{"once":1}')
    assert info.value.kind is ErrorKind.CONNECTION and info.value.status is None
    await asyncio.sleep(0.1)
    assert [s.body for s in srv.seen] == [b'{"q":1}', b'{"once":1}'] and srv.connections == 1
    assert (await post(client, srv))[0] == 200  # and the client recovers on a new connection
    assert srv.connections == 2


# --------------------------------------------------------------------------- failures and deadlines


async def test_body_cut_short_is_a_connection_error(client, srv) -> None:
    srv.actions = [reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"half\":", close=True)]
    with pytest.raises(ProviderError) as info:
        await post(client, srv)
    assert info.value.kind is ErrorKind.CONNECTION and "body cut" in info.value.message


async def test_not_http_is_a_connection_error(client, srv) -> None:
    srv.actions = [reply(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", close=True)]
    with pytest.raises(ProviderError) as info:
        await post(client, srv)
    assert info.value.kind is ErrorKind.CONNECTION and "invalid HTTP response" in info.value.message


async def test_oversized_response_head_is_refused(client, srv) -> None:
    big = "".join(f"X-Filler-{i}: {'y' * 1000}\r\n" for i in range(80))
    srv.actions = [reply(f"HTTP/1.1 200 OK\r\n{big}Content-Length: 2\r\n\r\n{{}}".encode())]
    with pytest.raises(ProviderError) as info:
        await post(client, srv)
    assert info.value.kind is ErrorKind.CONNECTION and "larger than" in info.value.message


async def test_redirects_are_not_followed_and_fail_over(srv) -> None:
    srv.actions = [reply(b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://elsewhere.example/v1/chat/completions\r\n"
                         b"Content-Length: 0\r\n\r\n")]
    provider = OpenAIProvider()
    model = ModelConfig(name="m", provider="openai", upstream_model="x", base_url=srv.url + "/v1", timeouts=T)
    try:
        with pytest.raises(ProviderError) as info:
            await provider.complete(REQ, model)
    finally:
        await provider.aclose()
    err = info.value
    assert err.kind is ErrorKind.NOT_FOUND and err.status == 308 and not err.client_fault
    assert "https://elsewhere.example" in err.message and len(srv.seen) == 1


async def test_slow_answer_hits_first_token_then_total(client, srv) -> None:
    srv.actions = [reply(1.0, ok()), reply(1.0, ok())]
    t0 = time.perf_counter()
    with pytest.raises(ProviderError) as info:
        await post(client, srv, timeouts=Timeouts(connect=2, first_token=0.15, idle=5, total=10))
    assert info.value.kind is ErrorKind.FIRST_TOKEN_TIMEOUT
    with pytest.raises(ProviderError) as info:
        await post(client, srv, timeouts=Timeouts(connect=2, first_token=None, idle=5, total=0.15))
    assert info.value.kind is ErrorKind.TIMEOUT
    assert time.perf_counter() - t0 < 0.9
    assert leased(client) == 0 and srv.connections == 2  # a timed-out connection is not reused


async def test_cancelled_request_closes_its_connection(client, srv) -> None:
    srv.actions = [reply(0.5, ok())]
    task = asyncio.create_task(post(client, srv))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leased(client) == 0
    assert (await post(client, srv))[0] == 200 and srv.connections == 2


async def test_refused_and_bad_header_values(client) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
    with pytest.raises(ProviderError) as info:
        await client.post(f"http://127.0.0.1:{port}/x", b"{}", {}, T)
    assert info.value.kind is ErrorKind.CONNECTION and "cannot connect" in info.value.message
    with pytest.raises(ProviderError) as info:
        await client.post(f"http://127.0.0.1:{port}/x", b"{}", {"X-Key": "a\r\nInjected: 1"}, T)
    assert info.value.kind is ErrorKind.CONNECTION and "invalid character" in info.value.message
    with pytest.raises(ProviderError) as info:
        await client.post("ftp://127.0.0.1/x", b"{}", {}, T)
    assert "unsupported upstream URL" in info.value.message


# --------------------------------------------------------------------------- streams


def sse(*events: bytes) -> list[bytes]:
    return [b"data: " + e + b"\n\n" for e in events]


def chunked(part: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(part), part)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def read_all(stream: SSEStream) -> list[bytes]:
    out = []
    try:
        while (events := await stream.next_events()) is not None:
            for _, data in events:
                stream.mark_first()
                out.append(data)
                if data == b"[DONE]":
                    await stream.drain()
                    return out
    finally:
        stream.close()
    return out


async def test_stream_chunks_arrive_as_sent_and_the_connection_is_reused(client, srv) -> None:
    parts = [chunked(p) for p in sse(b"1", b"2", b"[DONE]")]
    srv.actions = [reply(STREAM_HEAD, parts[0], 0.03, parts[1], 0.03, parts[2], b"0\r\n\r\n")]
    status, headers, stream = await client.open_stream(srv.url + "/s", b"{}", {}, T)
    assert status == 200 and isinstance(stream, SSEStream) and headers["content-type"] == "text/event-stream"
    assert await read_all(stream) == [b"1", b"2", b"[DONE]"]
    assert leased(client) == 0
    await post(client, srv)
    assert srv.connections == 1


async def test_stream_error_status_and_json_answers_are_read_whole(client, srv) -> None:
    err = b'{"error":{"message":"nope"}}'
    srv.actions = [
        reply(f"HTTP/1.1 503 Unavailable\r\nContent-Length: {len(err)}\r\n\r\n".encode(), 0.02, err),
        reply(ok(b'{"error":"json instead"}')),
    ]
    status, _, raw = await client.open_stream(srv.url + "/s", b"{}", {}, T)
    assert (status, raw) == (503, err)
    status, _, raw = await client.open_stream(srv.url + "/s", b"{}", {}, T)
    assert (status, raw) == (200, b'{"error":"json instead"}')
    assert leased(client) == 0 and srv.connections == 1


async def test_stream_cut_mid_body(client, srv) -> None:
    srv.actions = [reply(STREAM_HEAD, chunked(sse(b"1")[0]), 0.03, chunked(sse(b"2")[0]), 0.03, close=True)]
    _, _, stream = await client.open_stream(srv.url + "/s", b"{}", {}, T)
    got = []
    with pytest.raises(ProviderError) as info:
        try:
            while (events := await stream.next_events()) is not None:
                got += [d for _, d in events]
        finally:
            stream.close()
    assert got == [b"1", b"2"] and info.value.kind is ErrorKind.STREAM_CUT


async def test_stream_deadlines(client, srv) -> None:
    srv.actions = [reply(1.0, STREAM_HEAD), reply(STREAM_HEAD, 1.0)]
    fast = Timeouts(connect=2, first_token=0.15, idle=5, total=10)
    with pytest.raises(ProviderError) as info:  # no headers in time
        await client.open_stream(srv.url + "/s", b"{}", {}, fast)
    assert info.value.kind is ErrorKind.FIRST_TOKEN_TIMEOUT
    _, _, stream = await client.open_stream(srv.url + "/s", b"{}", {}, fast)
    with pytest.raises(ProviderError) as info:  # headers, then nothing
        await read_all(stream)
    assert info.value.kind is ErrorKind.FIRST_TOKEN_TIMEOUT
    assert leased(client) == 0 and srv.connections == 2


async def test_idle_deadline_after_the_first_token(client, srv) -> None:
    """The first-token timer is earlier than the idle one here: it is kept and re-arms itself."""
    srv.actions = [reply(STREAM_HEAD, chunked(sse(b"1")[0]), 1.0, chunked(sse(b"2")[0]), b"0\r\n\r\n")]
    _, _, stream = await client.open_stream(srv.url + "/s", b"{}", {}, Timeouts(connect=2, first_token=0.1, idle=0.3, total=10))
    try:
        assert [d for _, d in await stream.next_events()] == [b"1"]
        stream.mark_first()
        t0 = time.perf_counter()
        with pytest.raises(ProviderError) as info:
            await stream.next_events()
        waited = time.perf_counter() - t0
    finally:
        stream.close()
    assert info.value.kind is ErrorKind.IDLE_TIMEOUT and 0.28 <= waited < 0.8


async def test_abandoned_stream_closes_its_connection(client, srv) -> None:
    srv.actions = [reply(STREAM_HEAD, chunked(sse(b"1")[0]), 0.5, chunked(sse(b"2")[0]), b"0\r\n\r\n")]
    _, _, stream = await client.open_stream(srv.url + "/s", b"{}", {}, T)
    assert [d for _, d in await stream.next_events()] == [b"1"]
    stream.close()  # not drained: the upstream must stop, the socket must not be pooled
    deadline = time.monotonic() + 2
    while srv.open_now and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert srv.open_now == 0 and leased(client) == 0
    await post(client, srv)
    assert srv.connections == 2


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


async def test_https_same_code_path(tls_files) -> None:
    cert, key = tls_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    srv = Scripted(tls=server_ctx)
    srv.actions = [reply(ok()), reply(STREAM_HEAD, chunked(sse(b"[DONE]")[0]), b"0\r\n\r\n"), reply(ok())]
    trusted = HttpClient("test", ssl_context=ssl.create_default_context(cafile=str(cert)))
    untrusted = HttpClient("test")  # the system store does not know our certificate
    try:
        assert (await post(trusted, srv))[0] == 200
        _, _, stream = await trusted.open_stream(srv.url + "/s", b"{}", {}, T)
        assert await read_all(stream) == [b"[DONE]"]
        assert (await post(trusted, srv))[0] == 200
        assert srv.connections == 1
        with pytest.raises(ProviderError) as info:
            await post(untrusted, srv)
        assert info.value.kind is ErrorKind.CONNECTION and "CERTIFICATE_VERIFY_FAILED" in info.value.message
    finally:
        await trusted.aclose()
        await untrusted.aclose()
        srv.close()


# --------------------------------------------------------------------------- providers


REQ = ChatRequest(messages=[{"role": "user", "content": "hello"}])


async def test_provider_over_the_simulator_keeps_one_connection() -> None:
    with UpstreamSimulator(seed=3) as sim:
        sim.configure(tokens_per_second=None, latency_ms=(0, 0))
        model = ModelConfig(name="m", provider="openai", upstream_model="gpt-4o-mini", base_url=sim.url + "/v1",
                            api_key="k", timeouts=T)
        provider = OpenAIProvider()
        try:
            for _ in range(3):
                assert (await provider.complete(REQ, model)).text
                async for delta in provider.stream(REQ, model):
                    pass
                assert delta.finish_reason == "stop"
            pool = provider._http._session
            assert sum(len(idle) for idle in pool.idle.values()) == 1 and not pool.connector._acquired
        finally:
            await provider.aclose()


async def test_proxy_mode_uses_aiohttp(monkeypatch) -> None:
    from loadbear.providers._aiohttp import AiohttpClient

    monkeypatch.delenv("LOADBEAR_UPSTREAM_HTTP", raising=False)
    assert isinstance(make_client("x", trust_env=False), HttpClient)
    assert isinstance(make_client("x", trust_env=True), AiohttpClient)
    monkeypatch.setenv("LOADBEAR_UPSTREAM_HTTP", "aiohttp")  # the escape hatch, without proxies
    plain = make_client("x", trust_env=False)
    assert isinstance(plain, AiohttpClient) and plain._trust_env is False
    monkeypatch.delenv("LOADBEAR_UPSTREAM_HTTP")
    monkeypatch.setenv("LOADBEAR_UPSTREAM_TRUST_ENV", "1")
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    provider = OpenAIProvider()
    assert isinstance(provider._http, AiohttpClient)
    with UpstreamSimulator(seed=4) as sim:
        sim.configure(tokens_per_second=None, latency_ms=(0, 0))
        model = ModelConfig(name="m", provider="openai", upstream_model="gpt-4o-mini", base_url=sim.url + "/v1",
                            api_key="k", timeouts=T)
        try:
            assert (await provider.complete(REQ, model)).text
            text = "".join([d.text async for d in provider.stream(REQ, model)])
            assert text
        finally:
            await provider.aclose()
