"""Shared HTTP plumbing for the wire providers (aiohttp, orjson, SSE, deadlines).

* :class:`HttpClient` owns one :class:`aiohttp.ClientSession` per provider instance,
  created lazily inside the running event loop (and re-created if the loop changed), with a
  keep-alive pool, ``auto_decompress`` and no retries (aiohttp never retries a POST;
  retries are loadbear's job).
* :class:`SSEParser` is an incremental Server-Sent-Events parser over raw bytes: ``\\n`` and
  ``\\r\\n`` line ends (a ``\\r\\n`` split across reads is fine; lone ``\\r`` is not supported),
  ``:`` comments, ``event:`` names, multi-line ``data:`` (joined with ``\\n``); ``id:`` and
  ``retry:`` are ignored.
* :class:`SSEStream` reads events from a response and enforces the per-model
  :class:`~loadbear.providers.base.Timeouts` without a timer per read: one self-re-arming
  watchdog timer per stream, which fails the pending read with a :class:`ProviderError`.

Deadlines (all measured on the loop clock from the moment the request is sent):

* ``connect``: TCP/TLS connect (aiohttp ``sock_connect``) -> ``TIMEOUT``.
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
import time
from typing import Any

import aiohttp
import orjson

from .base import ErrorKind, ProviderError, Timeouts, Usage
from .tokens import count_messages, count_text

__all__ = [
    "HttpClient",
    "SSEParser",
    "SSEStream",
    "parse_retry_after",
    "is_context_length",
    "error_details",
    "map_http_error",
    "map_exception",
    "estimate_usage",
]

_SLACK = 0.001
# Set to 1 to honour HTTP(S)_PROXY / NO_PROXY (and .netrc) for upstream calls.
TRUST_ENV_VAR = "LOADBEAR_UPSTREAM_TRUST_ENV"  # timers may fire a hair early (clock resolution)


# --------------------------------------------------------------------------- errors


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
    if status in (401, 403):
        return ProviderError(ErrorKind.AUTH, label, status=status)
    if status == 404:
        return ProviderError(ErrorKind.NOT_FOUND, label, status=status)
    if status == 408:
        return ProviderError(ErrorKind.TIMEOUT, label, status=status)
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


async def _send(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
                timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
    """POST, retrying once when the request could not even be written.

    A pooled keep-alive connection can be closed by the upstream just as we reuse it; the write
    then fails before a byte of the request left. Nothing reached the upstream, so this is not an
    attempt: send it again on a fresh connection (the dead one has left the pool). A failure after
    the request was written is never retried here — that is the executor's decision.
    """
    try:
        return await session.post(url, data=body, headers=headers, timeout=timeout)
    except aiohttp.ClientOSError as exc:
        if "Can not write request body" not in str(exc):
            raise
        return await session.post(url, data=body, headers=headers, timeout=timeout)


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
    """

    __slots__ = (
        "resp",
        "_content",
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
        "_proto",
        "_connector",
    )

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        loop: asyncio.AbstractEventLoop,
        first_deadline: float | None,
        total_deadline: float | None,
        idle: float | None,
        vendor: str = "upstream",
        connector: Any = None,
    ) -> None:
        self.resp = resp
        # The protocol (the pooled connection); read from the response because aiohttp may
        # already have released the connection if the whole body arrived with the headers.
        proto = getattr(resp, "_protocol", None)
        if proto is None and resp.connection is not None:
            proto = resp.connection.protocol
        self._proto = proto
        self._connector = connector
        self._content = resp.content
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
        if self._handle is not None:
            self._handle.cancel()
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
        if self._reusable and self._content.at_eof() and self._content.exception() is None:
            self.resp.release()
            return
        self.resp.close()
        # aiohttp hands a connection back to the pool by itself as soon as the body ends,
        # even if what the body said was a failure (an in-band error, garbage). Upstreams
        # often hang up right after such a body; an immediate retry would pick the dying
        # connection from the pool and fail with CONNECTION. If it is still idle in the
        # pool (nobody re-acquired it), close it now.
        proto = self._proto
        if proto is not None and proto.is_connected():
            acquired = getattr(self._connector, "_acquired", None)
            if acquired is not None and proto not in acquired:
                proto.close()


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a < b else b


# --------------------------------------------------------------------------- client


class HttpClient:
    """One pooled aiohttp session, bound to the event loop it was created in.

    ``trust_env``: honour proxy environment variables; default from the
    ``LOADBEAR_UPSTREAM_TRUST_ENV`` environment variable (off).
    """

    __slots__ = (
        "_session",
        "_loop",
        "_limit",
        "_keepalive",
        "_vendor",
        "_ctimeouts",
        "_trust_env",
    )

    def __init__(
        self,
        vendor: str = "upstream",
        *,
        limit: int = 1024,
        keepalive_timeout: float = 30.0,
        trust_env: bool | None = None,
    ) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limit = limit
        self._keepalive = keepalive_timeout
        self._vendor = vendor
        self._ctimeouts: dict[float | None, aiohttp.ClientTimeout] = {}
        if trust_env is None:
            trust_env = os.environ.get(TRUST_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")
        self._trust_env = trust_env

    def session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._session
        if session is not None and self._loop is loop and not session.closed:
            return session
        if session is not None and not session.closed:
            # Created in another (usually already closed) loop: its connections cannot be
            # used or closed politely from here; drop it.
            session.detach()
        connector = aiohttp.TCPConnector(
            limit=self._limit,
            limit_per_host=0,
            keepalive_timeout=self._keepalive,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=None),
            auto_decompress=True,
            raise_for_status=False,
            trust_env=self._trust_env,
        )
        self._loop = loop
        return self._session

    def client_timeout(self, connect: float | None) -> aiohttp.ClientTimeout:
        ct = self._ctimeouts.get(connect)
        if ct is None:
            ct = self._ctimeouts[connect] = aiohttp.ClientTimeout(
                total=None, connect=None, sock_connect=connect, sock_read=None
            )
        return ct

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], timeouts: Timeouts
    ) -> tuple[int, Any, bytes]:
        """Non-streaming POST: ``(status, headers, body)``.

        The whole exchange is bounded by ``first_token`` (capped by ``total``); raises
        :class:`ProviderError` for transport failures and timeouts.
        """
        session = self.session()
        first, total = timeouts.first_token, timeouts.total
        if first is not None and (total is None or first < total):
            limit, kind = first, ErrorKind.FIRST_TOKEN_TIMEOUT
        else:
            limit, kind = total, ErrorKind.TIMEOUT
        cm = asyncio.timeout(limit)
        try:
            async with cm:
                resp = await _send(session, url, body, headers, self.client_timeout(timeouts.connect))
                async with resp:
                    raw = await resp.read()
                    return resp.status, resp.headers, raw
        except TimeoutError as exc:
            if cm.expired():
                raise ProviderError(kind, f"{self._vendor}: no complete response within {limit:g}s") from None
            raise map_exception(exc, self._vendor) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise map_exception(exc, self._vendor) from None

    async def open_stream(
        self, url: str, body: bytes, headers: dict[str, str], timeouts: Timeouts
    ) -> tuple[int, Any, SSEStream | bytes]:
        """Streaming POST: ``(200, headers, SSEStream)`` or ``(status, headers, error body)``.

        Waiting for the response headers counts against ``first_token`` and ``total``.
        """
        session = self.session()
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = None if timeouts.first_token is None else start + timeouts.first_token
        total = None if timeouts.total is None else start + timeouts.total
        header_deadline = _earliest(first, total)
        if first is not None and (total is None or first < total):
            kind = ErrorKind.FIRST_TOKEN_TIMEOUT
        else:
            kind = ErrorKind.TIMEOUT
        cm = asyncio.timeout_at(header_deadline)
        resp: aiohttp.ClientResponse | None = None
        try:
            async with cm:
                resp = await _send(session, url, body, headers, self.client_timeout(timeouts.connect))
                if resp.status != 200:
                    try:
                        raw = await resp.read()
                    finally:
                        resp.release()
                    return resp.status, resp.headers, raw
                ctype = resp.headers.get("content-type", "")
                if "json" in ctype:
                    # Some servers answer a stream request with a JSON body (often an error).
                    try:
                        raw = await resp.read()
                    finally:
                        resp.release()
                    return 200, resp.headers, raw
        except TimeoutError as exc:
            if resp is not None:
                resp.close()
            if cm.expired():
                raise ProviderError(kind, f"{self._vendor}: no response headers in time") from None
            raise map_exception(exc, self._vendor) from None
        except (aiohttp.ClientError, OSError) as exc:
            if resp is not None:
                resp.close()
            raise map_exception(exc, self._vendor) from None
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        return 200, resp.headers, SSEStream(resp, loop, first, total, timeouts.idle, self._vendor, session.connector)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            try:
                if self._loop is asyncio.get_running_loop():
                    await session.close()
                else:
                    session.detach()
            except RuntimeError:
                session.detach()
        self._loop = None
