"""The aiohttp upstream client, used only when proxies are asked for.

With ``LOADBEAR_UPSTREAM_TRUST_ENV=1`` (or ``trust_env=True``) the providers go through
aiohttp, which honours ``HTTP(S)_PROXY`` / ``NO_PROXY`` / ``.netrc``; everything else uses the
lean client in :mod:`._h1` (same interface: ``post``, ``open_stream``, ``aclose``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from ._http import SSEStream, map_exception, response_limit
from .base import ProviderError, Timeouts

__all__ = ["AiohttpClient"]


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


def _finisher(resp: aiohttp.ClientResponse, connector: Any):
    """``SSEStream``'s end-of-stream callback for an aiohttp response."""
    # The protocol (the pooled connection); read from the response because aiohttp may
    # already have released the connection if the whole body arrived with the headers.
    proto = getattr(resp, "_protocol", None)
    if proto is None and resp.connection is not None:
        proto = resp.connection.protocol

    def finish(reusable: bool) -> None:
        content = resp.content
        if reusable and content.at_eof() and content.exception() is None:
            resp.release()
            return
        resp.close()
        # aiohttp hands a connection back to the pool by itself as soon as the body ends,
        # even if what the body said was a failure (an in-band error, garbage). Upstreams
        # often hang up right after such a body; an immediate retry would pick the dying
        # connection from the pool and fail with CONNECTION. If it is still idle in the
        # pool (nobody re-acquired it), close it now.
        if proto is not None and proto.is_connected():
            acquired = getattr(connector, "_acquired", None)
            if acquired is not None and proto not in acquired:
                proto.close()

    return finish


class AiohttpClient:
    """One pooled aiohttp session, bound to the event loop it was created in; honours proxy
    environment variables (``HTTP(S)_PROXY``, ``NO_PROXY``, ``.netrc``) when ``trust_env``."""

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
        trust_env: bool = True,
    ) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limit = limit
        self._keepalive = keepalive_timeout
        self._vendor = vendor
        self._ctimeouts: dict[float | None, aiohttp.ClientTimeout] = {}
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
        limit, kind = response_limit(timeouts)
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
        limit, kind = response_limit(timeouts)
        header_deadline = None if limit is None else start + limit
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
        return 200, resp.headers, SSEStream(
            resp.content, _finisher(resp, session.connector), loop, first, total, timeouts.idle, self._vendor
        )

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
