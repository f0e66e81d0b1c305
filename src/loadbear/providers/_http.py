"""Shared HTTP plumbing for the wire providers (HTTP client, orjson, SSE, deadlines).

* :class:`HttpClient` is a lean HTTP/1.1 client (asyncio protocol + httptools, see
  :mod:`._h1`): one keep-alive pool per provider instance, created lazily inside the running
  event loop (and re-created if the loop changed), no retries (retries are loadbear's job;
  a request that could not even be written on a stale pooled connection is sent again once).
  :func:`make_client` returns it, or the aiohttp client (:mod:`._aiohttp`) when proxy
  environment variables are to be honoured.
* :class:`SSEParser` is an incremental Server-Sent-Events parser over raw bytes: ``\\n`` and
  ``\\r\\n`` line ends (a ``\\r\\n`` split across reads is fine; lone ``\\r`` is not supported),
  ``:`` comments, ``event:`` names, multi-line ``data:`` (joined with ``\\n``); ``id:`` and
  ``retry:`` are ignored.
* :class:`SSEStream` reads events from a response and enforces the per-model
  :class:`~loadbear.providers.base.Timeouts` without a timer per read: one self-re-arming
  watchdog timer per stream, which fails the pending read with a :class:`ProviderError`.

Deadlines (all measured on the loop clock from the moment the request is sent):

* ``connect``: TCP/TLS connect -> ``TIMEOUT``.
* ``first_token``: streams: until the first content delta (the provider calls
  :meth:`SSEStream.mark_first`) -> ``FIRST_TOKEN_TIMEOUT``; non-streams: until the whole
  response body is read (capped by ``total``).
* ``idle``: streams, after the first content: the longest wait for the next SSE event
  (comments such as ``: ping`` do not count as events) -> ``IDLE_TIMEOUT``. Time the
  consumer spends between two reads is not counted.
* ``total``: the whole exchange -> ``TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import ssl
import time
from typing import Any

import aiohttp
import orjson

from ._h1 import Conn, Pool, Target
from .base import ErrorKind, ProviderError, Timeouts, Usage
from .tokens import count_messages, count_text

__all__ = [
    "HttpClient",
    "make_client",
    "SSEParser",
    "SSEStream",
    "parse_retry_after",
    "is_context_length",
    "error_details",
    "map_http_error",
    "map_exception",
    "estimate_usage",
    "valid_counts",
    "response_limit",
]

_SLACK = 0.001  # timers may fire a hair early (clock resolution)
# Set to 1 to honour HTTP(S)_PROXY / NO_PROXY (and .netrc) for upstream calls.
TRUST_ENV_VAR = "LOADBEAR_UPSTREAM_TRUST_ENV"
# Set to "aiohttp" to use aiohttp's client instead of the lean one (without proxies).
CLIENT_VAR = "LOADBEAR_UPSTREAM_HTTP"


# --------------------------------------------------------------------------- errors


def valid_counts(*values: Any) -> bool:
    """Whether token counts from the wire are absent or non-negative integers."""
    return all(v is None or (type(v) is int and v >= 0) for v in values)


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


_CONTEXT_MARKERS = (
    "context_length_exceeded",
    "maximum context length",
    "prompt is too long",
    "context window",
    "exceeds the available context size",  # llama.cpp
    "exceed_context_size",
    "input is too long",
)


def is_context_length(message: str | None, code: Any = None) -> bool:
    if code == "context_length_exceeded":
        return True
    if not message:
        return False
    low = message.lower()
    return any(marker in low for marker in _CONTEXT_MARKERS)


def error_details(body: Any) -> tuple[str, Any, Any]:
    """``(message, code, type)`` out of an OpenAI- or Anthropic-shaped error body.

    ``body`` may be raw bytes, a parsed dict, or anything else (then stringified).
    """
    data = body
    if isinstance(body, (bytes, bytearray, memoryview, str)):
        if not body:
            return "", None, None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            text = bytes(body).decode("utf-8", "replace") if not isinstance(body, str) else body
            return text[:500], None, None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail") or ""
            if not isinstance(message, str):
                message = str(message)
            return message, err.get("code"), err.get("type")
        if isinstance(err, str):
            return err, data.get("code"), data.get("type")
        detail = data.get("detail")
        if detail is not None:
            return str(detail), None, None
    return str(data)[:500], None, None


def map_http_error(status: int, body: Any, headers: Any = None, vendor: str = "upstream") -> ProviderError:
    """The :class:`ProviderError` for a non-2xx HTTP answer."""
    message, code, etype = error_details(body)
    label = f"{vendor} HTTP {status}: {message}" if message else f"{vendor} HTTP {status}"
    if status == 429:
        return ProviderError(
            ErrorKind.RATE_LIMITED, label, status=status, retry_after=parse_retry_after(headers)
        )
    if status in (400, 413, 422):
        if is_context_length(message, code) or is_context_length(str(etype or "")):
            return ProviderError(ErrorKind.CONTEXT_LENGTH, label, status=status)
        return ProviderError(ErrorKind.BAD_REQUEST, label, status=status)
    if status in (401, 402, 403):
        # Our key, account or credit (402: out of credit), never the request's fault: fail over.
        return ProviderError(ErrorKind.AUTH, label, status=status)
    if status == 404:
        return ProviderError(ErrorKind.NOT_FOUND, label, status=status)
    if status == 408:
        return ProviderError(ErrorKind.TIMEOUT, label, status=status)
    if 300 <= status < 400:
        # Redirects are not followed (a POST must not silently become a GET elsewhere): a base
        # URL that redirects is our configuration, like a 404 — fail over, not the client's fault.
        where = headers.get("location") if headers else None
        hint = f" (redirected to {where}: check the base URL)" if where else " (check the base URL)"
        return ProviderError(ErrorKind.NOT_FOUND, label + hint, status=status)
    if status >= 500:
        # 500/502/503/504, Anthropic 529 "overloaded", and any other 5xx.
        return ProviderError(
            ErrorKind.SERVER_ERROR, label, status=status, retry_after=parse_retry_after(headers)
        )
    if is_context_length(message, code):
        return ProviderError(ErrorKind.CONTEXT_LENGTH, label, status=status)
    return ProviderError(ErrorKind.BAD_REQUEST, label, status=status)


def inband_error(err: Any, vendor: str = "upstream", status: int | None = None) -> ProviderError:
    """An ``{"error": ...}`` inside a 200 body or a stream."""
    message, code, _ = error_details({"error": err})
    if is_context_length(message, code):
        return ProviderError(ErrorKind.CONTEXT_LENGTH, f"{vendor}: {message}", status=status)
    return ProviderError(ErrorKind.UPSTREAM_ERROR, f"{vendor} error: {message or err!r}", status=status)


def map_exception(exc: BaseException, vendor: str = "upstream") -> ProviderError:
    """The :class:`ProviderError` for a transport-level failure (no HTTP answer)."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ProviderError(ErrorKind.TIMEOUT, f"{vendor}: connect timeout")
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return ProviderError(ErrorKind.TIMEOUT, f"{vendor}: {exc or 'timeout'}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ProviderError(ErrorKind.CONNECTION, f"{vendor}: cannot connect: {exc}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ProviderError(ErrorKind.CONNECTION, f"{vendor}: server disconnected")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return ProviderError(ErrorKind.CONNECTION, f"{vendor}: response body cut: {exc}")
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
        return ProviderError(ErrorKind.TIMEOUT, f"{vendor}: timeout")
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return ProviderError(ErrorKind.CONNECTION, f"{vendor}: {type(exc).__name__}: {exc}")
    return ProviderError(ErrorKind.CONNECTION, f"{vendor}: {type(exc).__name__}: {exc}")


def estimate_usage(
    messages: list[dict[str, Any]],
    text: str,
    encoding: str,
    *,
    prompt_tokens: int | None = None,
    cached_tokens: int = 0,
) -> Usage:
    """Usage counted offline (``estimated=True``); ``prompt_tokens`` if upstream told us."""
    return Usage(
        prompt_tokens=count_messages(messages, encoding) if prompt_tokens is None else prompt_tokens,
        completion_tokens=count_text(text, encoding),
        cached_tokens=cached_tokens,
        estimated=True,
    )


# --------------------------------------------------------------------------- SSE


class SSEParser:
    """Incremental SSE parser: :meth:`feed` bytes, get complete ``(event, data)`` pairs.

    ``event`` is the ``event:`` field as bytes (``None`` when absent), ``data`` the joined
    ``data:`` lines as bytes. Events without any ``data:`` line are dropped (per spec).
    """

    __slots__ = ("_tail", "_event", "_data")

    def __init__(self) -> None:
        self._tail = b""
        self._event: bytes | None = None
        self._data: bytes | None = None

    def feed(self, chunk: bytes) -> list[tuple[bytes | None, bytes]]:
        if self._tail:
            chunk = self._tail + chunk
        elif self._data is None and self._event is None and chunk.endswith(b"\n\n") and b"\r" not in chunk:
            # Fast paths for the usual read of exactly one event:
            # "data: X\n\n" (OpenAI) and "event: E\ndata: X\n\n" (Anthropic).
            end = len(chunk) - 2
            first = chunk.find(b"\n")
            if first == end:
                if chunk.startswith(b"data: "):
                    return [(None, chunk[6:end])]
            elif chunk.startswith(b"event: ") and chunk.find(b"\n", first + 1) == end:
                if chunk.startswith(b"data: ", first + 1):
                    return [(chunk[7:first], chunk[first + 7 : end])]
        lines = chunk.split(b"\n")
        self._tail = lines.pop()
        out: list[tuple[bytes | None, bytes]] = []
        for line in lines:
            if line and line[-1] == 13:  # "\r"
                line = line[:-1]
            if not line:
                if self._data is not None:
                    out.append((self._event, self._data))
                    self._data = None
                self._event = None
                continue
            if line[0] == 58:  # ":" comment / keep-alive
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                if value[:1] == b" ":
                    value = value[1:]
                self._data = value if self._data is None else self._data + b"\n" + value
            elif line.startswith(b"event:"):
                value = line[6:]
                self._event = value[1:] if value[:1] == b" " else value
            elif line == b"data":
                self._data = b"" if self._data is None else self._data + b"\n"
            # id:, retry:, unknown fields: ignored
        return out

    def flush(self) -> list[tuple[bytes | None, bytes]]:
        """At EOF: dispatch a last event whose blank terminator line never came.

        A trailing partial line (no line end) is discarded: it was cut in transit.
        """
        self._tail = b""
        if self._data is None:
            return []
        out = [(self._event, self._data)]
        self._event = self._data = None
        return out


class SSEStream:
    """Reads SSE events from a 200 response while enforcing the stream deadlines.

    Use :meth:`next_events` until it returns ``None`` (EOF), call :meth:`mark_first` on
    the first content delta, and always :meth:`close` (in a ``finally``).

    ``reader`` is the body: ``readany()``, ``set_exception()``, ``is_eof()`` (a
    :class:`._h1.Conn`, or aiohttp's ``StreamReader``); ``finish(reusable)`` ends the exchange
    (back to the pool after a drained stream, else close the connection).
    """

    __slots__ = (
        "_content",
        "_finish",
        "_parser",
        "_loop",
        "_first_deadline",
        "_total_deadline",
        "_idle",
        "_waiting_since",
        "_got_first",
        "_handle",
        "_closed",
        "_reusable",
        "_vendor",
    )

    def __init__(
        self,
        reader: Any,
        finish: Any,
        loop: asyncio.AbstractEventLoop,
        first_deadline: float | None,
        total_deadline: float | None,
        idle: float | None,
        vendor: str = "upstream",
    ) -> None:
        self._content = reader
        self._finish = finish
        self._parser = SSEParser()
        self._loop = loop
        self._first_deadline = first_deadline
        self._total_deadline = total_deadline
        self._idle = idle
        self._waiting_since: float | None = None
        self._got_first = False
        self._closed = False
        self._reusable = False
        self._vendor = vendor
        self._handle: asyncio.TimerHandle | None = None
        when = _earliest(first_deadline, total_deadline)
        if when is not None:
            self._handle = loop.call_at(when, self._on_timer)

    # -- reading

    async def next_events(self) -> list[tuple[bytes | None, bytes]] | None:
        """The next complete events (at least one), or ``None`` at end of stream.

        Raises :class:`ProviderError` (timeouts; ``STREAM_CUT`` when the connection breaks).
        """
        content = self._content
        self._waiting_since = self._loop.time()
        try:
            while True:
                try:
                    chunk = await content.readany()
                except ProviderError:
                    raise
                except (aiohttp.ClientError, OSError) as exc:
                    raise ProviderError(
                        ErrorKind.STREAM_CUT, f"{self._vendor}: stream broken: {type(exc).__name__}: {exc}"
                    ) from None
                if not chunk:
                    return self._parser.flush() or None
                events = self._parser.feed(chunk)
                if events:
                    return events
        finally:
            self._waiting_since = None

    def mark_first(self) -> None:
        """The first content arrived: from now on the ``idle`` deadline applies."""
        if self._got_first:
            return
        self._got_first = True
        idle = self._idle
        when = _earliest(None if idle is None else self._loop.time() + idle, self._total_deadline)
        handle = self._handle
        if handle is not None:
            if when is not None and handle.when() <= when:
                return  # fires early enough; it re-arms itself for the idle deadline then
            handle.cancel()
            self._handle = None
        if when is not None and not self._closed:
            self._handle = self._loop.call_at(when, self._on_timer)

    # -- watchdog

    def _on_timer(self) -> None:
        self._handle = None
        if self._closed or self._content.is_eof():
            return  # everything upstream will send is already here: nothing left to wait for
        now = self._loop.time() + _SLACK
        total = self._total_deadline
        if total is not None and now >= total:
            self._fire(ErrorKind.TIMEOUT, "total timeout")
            return
        nxt: float | None
        if not self._got_first:
            nxt = self._first_deadline
            if nxt is not None and now >= nxt:
                self._fire(ErrorKind.FIRST_TOKEN_TIMEOUT, "no first token in time")
                return
        else:
            idle = self._idle
            if idle is None:
                nxt = None
            else:
                waiting = self._waiting_since
                if waiting is None:  # the consumer holds us: not upstream's time
                    nxt = now + idle
                else:
                    nxt = waiting + idle
                    if now >= nxt:
                        self._fire(ErrorKind.IDLE_TIMEOUT, f"stream idle for {idle:g}s")
                        return
        nxt = _earliest(nxt, total)
        if nxt is not None:
            self._handle = self._loop.call_at(nxt, self._on_timer)

    def _fire(self, kind: ErrorKind, message: str) -> None:
        self._content.set_exception(ProviderError(kind, f"{self._vendor}: {message}"))

    # -- ending

    async def drain(self, limit: float = 0.05) -> None:
        """After the final event of a successful stream: read to EOF (briefly) and mark the
        connection reusable. Only a drained stream goes back to the pool."""
        content = self._content
        if self._closed:
            return
        if not content.is_eof():
            try:
                async with asyncio.timeout(limit):
                    while await content.readany():
                        pass
            except (TimeoutError, ProviderError, aiohttp.ClientError, OSError):
                return
        self._reusable = True

    def close(self) -> None:
        """Stop the watchdog; return the connection to the pool after a drained, successful
        stream, otherwise close it (an abandoned or failed upstream stops promptly and a
        suspect connection is never reused)."""
        if self._closed:
            return
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._finish(self._reusable)


def response_limit(timeouts: Timeouts) -> tuple[float | None, ErrorKind]:
    """How long an upstream may take before it answers (a non-streamed call's whole response, a
    stream's headers): ``first_token`` capped by ``total``, and the error kind when it does not."""
    first, total = timeouts.first_token, timeouts.total
    if first is not None and (total is None or first < total):
        return first, ErrorKind.FIRST_TOKEN_TIMEOUT
    return total, ErrorKind.TIMEOUT


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a < b else b


# --------------------------------------------------------------------------- client


def make_client(
    vendor: str = "upstream",
    *,
    limit: int = 1024,
    keepalive_timeout: float = 30.0,
    trust_env: bool | None = None,
) -> Any:
    """The providers' HTTP client: the lean :class:`HttpClient`, or aiohttp's when proxy
    environment variables are to be honoured (``trust_env``; default from the
    ``LOADBEAR_UPSTREAM_TRUST_ENV`` environment variable, off) or when
    ``LOADBEAR_UPSTREAM_HTTP=aiohttp`` asks for it (an escape hatch, and the A/B baseline)."""
    if trust_env is None:
        trust_env = os.environ.get(TRUST_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")
    if trust_env or os.environ.get(CLIENT_VAR, "").strip().lower() == "aiohttp":
        from ._aiohttp import AiohttpClient

        return AiohttpClient(vendor, limit=limit, keepalive_timeout=keepalive_timeout, trust_env=trust_env)
    return HttpClient(vendor, limit=limit, keepalive_timeout=keepalive_timeout)


def _expire(conn: Conn, kind: ErrorKind, message: str) -> None:
    conn.fail(ProviderError(kind, message))


async def _wait_for(conn: Conn, deadline: float | None, kind: ErrorKind, message: str, headers_only: bool) -> None:
    """Until the response is complete (or, ``headers_only``, its headers are in); raises
    the exchange's error, or ``kind`` at ``deadline``."""
    timer = None
    try:
        while conn.error is None and not (conn.done or (headers_only and conn.headers_done)):
            if timer is None and deadline is not None:
                timer = conn.pool.loop.call_at(deadline, _expire, conn, kind, message)
            await conn.wait()
    finally:
        if timer is not None:
            timer.cancel()
    if conn.error is not None:
        raise conn.error


class HttpClient:
    """Pooled HTTP/1.1 client over :mod:`._h1`, bound to the event loop it is used in (a new
    loop gets a new pool; the old loop's sockets cannot be closed from here and are dropped).

    ``ssl_context``: for https upstreams (default: the system trust store).
    """

    __slots__ = ("_session", "_limit", "_keepalive", "_vendor", "_targets", "_ssl")

    def __init__(
        self,
        vendor: str = "upstream",
        *,
        limit: int = 1024,
        keepalive_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        # Named like aiohttp's session: tests read ``_session.connector._acquired``.
        self._session: Pool | None = None
        self._limit = limit
        self._keepalive = keepalive_timeout
        self._vendor = vendor
        self._targets: dict[str, Target] = {}
        self._ssl = ssl_context

    def _pool(self) -> Pool:
        loop = asyncio.get_running_loop()
        pool = self._session
        if pool is None or pool.loop is not loop or pool.closed:
            pool = self._session = Pool(loop, self._limit, self._keepalive, self._vendor)
        return pool

    def _target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            try:
                target = Target(url, self._ssl)
            except ValueError as exc:
                raise ProviderError(ErrorKind.CONNECTION, f"{self._vendor}: {exc}") from None
            if len(self._targets) >= 256:
                self._targets.clear()
            self._targets[url] = target
        return target

    async def _connect(self, pool: Pool, target: Target, connect: float | None, deadline: float | None,
                       kind: ErrorKind, message: str) -> Conn:
        limit, by_deadline = connect, False
        if deadline is not None:
            left = deadline - pool.loop.time()
            if limit is None or left < limit:
                limit, by_deadline = max(left, 0.0), True
        try:
            if limit is None:
                return await pool.connect(target)
            async with asyncio.timeout(limit):
                return await pool.connect(target)
        except TimeoutError:  # before OSError: TimeoutError is one
            if by_deadline:
                raise ProviderError(kind, message) from None
            raise ProviderError(ErrorKind.TIMEOUT, f"{self._vendor}: connect timeout") from None
        except OSError as exc:
            raise ProviderError(ErrorKind.CONNECTION, f"{self._vendor}: cannot connect: {exc}") from None

    async def _send(self, target: Target, body: bytes, headers: dict[str, str], connect: float | None,
                    deadline: float | None, kind: ErrorKind, message: str, stream: bool) -> Conn:
        """A connection with the request written to it."""
        pool = self._pool()
        try:
            data = target.request(body, headers)
        except ValueError as exc:
            raise ProviderError(ErrorKind.CONNECTION, f"{self._vendor}: {exc}") from None
        resent = False
        while True:
            conn = pool.take(target.key)
            if conn is None:
                if pool.full():
                    try:
                        async with asyncio.timeout_at(deadline):
                            await pool.wait_free()
                    except TimeoutError:
                        raise ProviderError(kind, message) from None
                    continue
                conn = await self._connect(pool, target, connect, deadline, kind, message)
            conn.begin(stream)
            transport = conn.transport
            transport.write(data)
            if not transport.is_closing():
                return conn
            # The write failed on the spot (the peer had reset the connection): not a byte of
            # the request left, so on a reused connection this is not an attempt: send again.
            reused = conn.reused
            conn.close()
            if reused and not resent:
                resent = True
                continue
            raise ProviderError(ErrorKind.CONNECTION, f"{self._vendor}: connection closed while sending the request")

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], timeouts: Timeouts
    ) -> tuple[int, Any, bytes]:
        """Non-streaming POST: ``(status, headers, body)``.

        The whole exchange is bounded by ``first_token`` (capped by ``total``); raises
        :class:`ProviderError` for transport failures and timeouts.
        """
        target = self._target(url)
        limit, kind = response_limit(timeouts)
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        message = "" if limit is None else f"{self._vendor}: no complete response within {limit:g}s"
        conn = await self._send(target, body, headers, timeouts.connect, deadline, kind, message, False)
        try:
            await _wait_for(conn, deadline, kind, message, False)
        except BaseException:
            conn.close()
            raise
        chunks = conn.chunks
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        conn.chunks = []
        conn.pool.release(conn)
        return conn.status, conn.headers, raw

    async def open_stream(
        self, url: str, body: bytes, headers: dict[str, str], timeouts: Timeouts
    ) -> tuple[int, Any, SSEStream | bytes]:
        """Streaming POST: ``(200, headers, SSEStream)`` or ``(status, headers, error body)``.

        Waiting for the response headers counts against ``first_token`` and ``total``.
        """
        target = self._target(url)
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = None if timeouts.first_token is None else start + timeouts.first_token
        total = None if timeouts.total is None else start + timeouts.total
        limit, kind = response_limit(timeouts)
        header_deadline = None if limit is None else start + limit
        message = f"{self._vendor}: no response headers in time"
        conn = await self._send(target, body, headers, timeouts.connect, header_deadline, kind, message, True)
        try:
            await _wait_for(conn, header_deadline, kind, message, True)
            status, resp_headers = conn.status, conn.headers
            if status != 200 or "json" in resp_headers.get("content-type", ""):
                # An error, or a server answering a stream request with a JSON body.
                await _wait_for(conn, header_deadline, kind, message, False)
                raw = b"".join(conn.chunks)
                conn.chunks = []
                conn.pool.release(conn)
                return status, resp_headers, raw
        except BaseException:
            conn.close()
            raise
        conn.cut_kind = ErrorKind.STREAM_CUT
        return 200, resp_headers, SSEStream(conn, conn.finish, loop, first, total, timeouts.idle, self._vendor)

    async def aclose(self) -> None:
        pool, self._session = self._session, None
        if pool is None:
            return
        try:
            same_loop = pool.loop is asyncio.get_running_loop()
        except RuntimeError:
            same_loop = False
        if same_loop:
            pool.close()
            await asyncio.sleep(0)  # let the transports run connection_lost
