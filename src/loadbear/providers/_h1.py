"""A lean HTTP/1.1 client transport for the upstream providers: asyncio protocol + httptools.

Why not aiohttp: its client costs ~0.3 ms of CPU per non-streamed call and ~0.6 ms per
20-event stream (request writer, ``ClientResponse``, ``StreamReader``, timers, traces, cookie
jar), a third of the gateway's loop thread. The exchange loadbear needs is narrow: one POST
with a JSON body, a JSON or SSE answer, keep-alive. This module does only that:

* :class:`Pool` keeps idle keep-alive connections per origin (scheme, host, port), LIFO, closes
  them after ``keepalive`` seconds idle (checked when taken, and by one lazy sweep timer) and
  caps the connections in use at ``limit`` (further requests wait for a free one).
* :class:`Conn` is the :class:`asyncio.Protocol`: httptools parses the response (Content-Length,
  chunked, or read-until-close bodies; 1xx interim answers are skipped); gzip/deflate bodies
  are inflated (we ask for ``identity``, but a server may compress anyway).
* HTTPS is the same code path: asyncio's TLS transport under the same protocol.

Errors are :class:`ProviderError` from the start (no exception mapping layer): ``CONNECTION``
for refused/reset connections, hang-ups before the answer or a non-HTTP answer; ``cut_kind``
(``CONNECTION`` for whole bodies, ``STREAM_CUT`` once a stream is handed out) for a body cut
short. Deadlines are enforced by the caller with one timer that calls :meth:`Conn.fail`.

A pooled connection found closed when taken is dropped before anything is written to it. A
request whose write fails at once on a reused connection (the peer had already reset it) is
sent again once on a fresh connection: nothing of it reached the upstream. A request that was
written is never resent here — whether to retry is the executor's decision.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from urllib.parse import urlsplit

import httptools

from .base import ErrorKind, ProviderError

__all__ = ["Conn", "Headers", "Pool", "Target", "default_ssl_context"]

_USER_AGENT = "loadbear"
# Headers the transport owns; a caller's copy is dropped rather than sent twice.
_OWN = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_SSL_CONTEXT: ssl.SSLContext | None = None
# aiohttp's client allows 8 KiB per header line; this bounds the whole head instead.
MAX_HEAD_BYTES = 64 * 1024


def default_ssl_context() -> ssl.SSLContext:
    """The system trust store (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` honoured), made once."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


class Headers(dict):
    """Response headers: names lower-cased, repeated fields joined with ``", "``; lookups
    are case-insensitive (callers and :func:`parse_retry_after` use ``.get``)."""

    __slots__ = ()

    def get(self, key, default=None):  # type: ignore[override]
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key):
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key):  # type: ignore[override]
        return dict.__contains__(self, key.lower())

    def getall(self, key, default=None):
        value = dict.get(self, key.lower())
        return default if value is None else [value]


class Target:
    """A parsed request URL: the pool key and the fixed start of the request head."""

    __slots__ = ("key", "host", "port", "ssl", "server_hostname", "head")

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported upstream URL: {url!r}")
        host = parts.hostname
        default_port = 443 if scheme == "https" else 80
        port = parts.port or default_port
        self.key = (scheme, host, port)
        self.host = host
        self.port = port
        self.ssl = (ssl_context or default_ssl_context()) if scheme == "https" else None
        self.server_hostname = host if scheme == "https" else None
        host_header = f"[{host}]" if ":" in host else host
        if port != default_port:
            host_header = f"{host_header}:{port}"
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        if any(c in path for c in " \r\n"):
            raise ValueError(f"unsupported upstream URL: {url!r}")
        self.head = f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n".encode()

    def request(self, body: bytes, headers: dict[str, str]) -> bytes:
        lines = []
        agent = True
        for name, value in headers.items():
            low = name.lower()
            if low in _OWN:
                continue
            if low == "user-agent":
                agent = False
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name or ":" in name:
                raise ValueError(f"invalid character in the {name!r} header")
            lines.append(f"{name}: {value}\r\n")
        if agent:
            lines.append("User-Agent: " + _USER_AGENT + "\r\n")
        lines.append(f"Accept-Encoding: identity\r\nContent-Length: {len(body)}\r\n\r\n")
        return self.head + "".join(lines).encode() + body


class Conn(asyncio.Protocol):
    """One upstream connection and the state of its current response.

    Readers wait on one future (:attr:`waiter`), woken when the headers are in (``stream``
    exchanges), when body bytes arrive (streams) or when the message is complete.
    """

    __slots__ = (
        "pool", "key", "vendor", "transport", "parser", "alive", "busy", "reused", "idle_since",
        "stream", "status", "headers", "chunks", "headers_done", "done", "error", "waiter",
        "until_eof", "decoder", "cut_kind", "keep_alive", "head_bytes",
    )

    def __init__(self, pool: "Pool", key: tuple, vendor: str) -> None:
        self.pool = pool
        self.key = key
        self.vendor = vendor
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.alive = True
        self.busy = False
        self.reused = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future | None = None
        self.begin(False)
        self.busy = False

    def begin(self, stream: bool) -> None:
        """Reset the response state for a new exchange."""
        self.busy = True
        self.stream = stream
        self.status = 0
        self.headers = Headers()
        self.chunks: list[bytes] = []
        self.headers_done = False
        self.done = False
        self.error: ProviderError | None = None
        self.until_eof = False
        self.decoder = None
        self.cut_kind = ErrorKind.CONNECTION
        self.keep_alive = False
        self.head_bytes = 0

    # -- asyncio.Protocol

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.done:
            # Bytes nobody asked for (a late 408, garbage): this connection cannot be trusted.
            self.alive = False
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # A callback's own exception (e.g. the head-size cap) says more than httptools' wrapper.
            reason = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) and exc.__context__ else exc
            self.alive = False
            self.fail(ProviderError(ErrorKind.CONNECTION, f"{self.vendor}: invalid HTTP response: {reason}"))
            self.transport.close()

    def eof_received(self) -> bool:
        self._hang_up(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._hang_up(exc)
        self.pool.forget(self)

    def _hang_up(self, exc: Exception | None) -> None:
        self.alive = False
        if not self.busy or self.done or self.error is not None:
            return
        if self.headers_done:
            if self.until_eof:  # a body without length ends with the connection
                self.on_message_complete()
                return
            what = "stream broken" if self.cut_kind is ErrorKind.STREAM_CUT else "response body cut"
            detail = f": {type(exc).__name__}: {exc}" if exc else ""
            self.fail(ProviderError(self.cut_kind, f"{self.vendor}: {what}{detail}"))
        else:
            detail = f" ({type(exc).__name__}: {exc})" if exc else ""
            self.fail(ProviderError(ErrorKind.CONNECTION, f"{self.vendor}: server disconnected{detail}"))

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES:
            # Raising inside the callback makes httptools fail the feed: handled as a bad answer.
            raise ValueError(f"response headers larger than {MAX_HEAD_BYTES} bytes")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self.headers
        old = dict.get(headers, key)
        dict.__setitem__(headers, key, text if old is None else f"{old}, {text}")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.status = status
        if status < 200:
            return  # interim (100 Continue, 103 Early Hints): the real answer follows
        headers = self.headers
        if status not in (204, 304):
            self.until_eof = dict.get(headers, "content-length") is None and dict.get(headers, "transfer-encoding") is None
            coding = dict.get(headers, "content-encoding")
            if coding:
                coding = coding.strip().lower()
                if coding in ("gzip", "x-gzip"):
                    self.decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
                elif coding == "deflate":
                    self.decoder = zlib.decompressobj()
        self.headers_done = True
        if self.stream:
            self._wake()

    def on_body(self, data: bytes) -> None:
        if self.decoder is not None:
            try:
                data = self.decoder.decompress(data)
            except zlib.error as exc:
                self.fail(ProviderError(ErrorKind.MALFORMED, f"{self.vendor}: bad compressed body: {exc}"))
                return
            if not data:
                return
        self.chunks.append(data)
        if self.stream:
            self._wake()

    def on_message_complete(self) -> None:
        if self.status < 200:
            self.headers = Headers()
            return
        if self.decoder is not None:
            tail = self.decoder.flush()
            if tail:
                self.chunks.append(tail)
        # Only valid inside the callback: llhttp resets its flags once the message is over.
        self.keep_alive = self.parser.should_keep_alive()
        self.done = True
        self._wake()

    # -- waking

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def fail(self, error: ProviderError) -> None:
        """Fail the exchange (a deadline, a broken connection); first error wins."""
        if self.error is None and not self.done:
            self.error = error
        self._wake()

    async def wait(self) -> None:
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        await waiter

    # -- the stream reader interface used by SSEStream

    async def readany(self) -> bytes:
        """The body bytes that arrived since the last read; ``b""`` at the end."""
        while True:
            chunks = self.chunks
            if chunks:
                self.chunks = []
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self.error is not None:
                raise self.error
            if self.done:
                return b""
            await self.wait()

    def set_exception(self, error: ProviderError) -> None:
        self.fail(error)

    def is_eof(self) -> bool:
        return self.done

    def exception(self) -> ProviderError | None:
        return self.error

    def finish(self, reusable: bool) -> None:
        """End of the exchange: back to the pool when the body was read whole, else close."""
        if reusable and self.done and self.error is None and not self.chunks:
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        midway = self.busy and not self.done
        self.alive = False
        self.busy = False
        self.pool._acquired.discard(self)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if midway:
                # An abandoned exchange: drop the socket now. A polite TLS close would wait for
                # the upstream's close_notify while it keeps generating (and billing) tokens.
                transport.abort()
            else:
                transport.close()


class Pool:
    """Keep-alive connections per origin, bound to one event loop."""

    __slots__ = ("loop", "limit", "keepalive", "vendor", "idle", "_acquired", "connecting", "waiters",
                 "sweeper", "closed")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int, keepalive: float, vendor: str) -> None:
        self.loop = loop
        self.limit = limit
        self.keepalive = keepalive
        self.vendor = vendor
        self.idle: dict[tuple, list[Conn]] = {}
        self._acquired: set[Conn] = set()
        self.connecting = 0
        self.waiters: deque[asyncio.Future] = deque()
        self.sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    @property
    def connector(self) -> "Pool":
        # aiohttp's session.connector._acquired: tests count leased connections that way.
        return self

    def take(self, key: tuple) -> Conn | None:
        """An idle, live connection to this origin, or ``None``."""
        idle = self.idle.get(key)
        if not idle:
            return None
        oldest = self.loop.time() - self.keepalive
        while idle:
            conn = idle.pop()
            if conn.alive and conn.idle_since > oldest and not conn.transport.is_closing():
                conn.reused = True
                self._acquired.add(conn)
                return conn
            conn.close()
        return None

    def full(self) -> bool:
        return len(self._acquired) + self.connecting >= self.limit

    async def wait_free(self) -> None:
        fut = self.loop.create_future()
        self.waiters.append(fut)
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()

    def _wake_one(self) -> None:
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def connect(self, target: Target) -> Conn:
        """A new connection (the caller bounds the time)."""
        conn = Conn(self, target.key, self.vendor)
        self.connecting += 1
        try:
            await self.loop.create_connection(
                lambda: conn, target.host, target.port, ssl=target.ssl, server_hostname=target.server_hostname
            )
        except BaseException:
            self.connecting -= 1
            if self.waiters:
                self._wake_one()  # the slot it held is free again
            raise
        self.connecting -= 1
        if self.closed:
            conn.close()
            raise ProviderError(ErrorKind.CONNECTION, f"{self.vendor}: client closed")
        self._acquired.add(conn)
        return conn

    def release(self, conn: Conn) -> None:
        self._acquired.discard(conn)
        conn.busy = False
        if conn.alive and conn.keep_alive and not self.closed and not conn.transport.is_closing():
            conn.idle_since = self.loop.time()
            idle = self.idle.get(conn.key)
            if idle is None:
                idle = self.idle[conn.key] = []
            idle.append(conn)
            if self.sweeper is None:
                self.sweeper = self.loop.call_later(self.keepalive, self._sweep)
        else:
            conn.close()
        if self.waiters:
            self._wake_one()

    def forget(self, conn: Conn) -> None:
        """The connection is gone (closed by either side)."""
        self._acquired.discard(conn)
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        if self.waiters:
            self._wake_one()

    def _sweep(self) -> None:
        self.sweeper = None
        oldest = self.loop.time() - self.keepalive
        left = False
        for idle in self.idle.values():
            for conn in [c for c in idle if not c.alive or c.idle_since <= oldest]:
                idle.remove(conn)
                conn.close()
            left = left or bool(idle)
        if left and not self.closed:
            self.sweeper = self.loop.call_later(self.keepalive / 2, self._sweep)

    def close(self) -> None:
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        conns = [c for idle in self.idle.values() for c in idle] + list(self._acquired)
        self.idle.clear()
        for conn in conns:
            if conn.busy:
                conn.fail(ProviderError(ErrorKind.CONNECTION, f"{self.vendor}: client closed"))
            conn.close()
        for fut in self.waiters:
            if not fut.done():
                fut.cancel()
        self.waiters.clear()
