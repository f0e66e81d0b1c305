"""Redis plumbing shared by the stores that replicas share (breakers, budgets, rate limits).

Each store keeps its state in Redis and changes it only through Lua scripts (one atomic step
across replicas). What they have in common lives here: a synchronous client for admin reads and
resets, an asyncio client per event loop (a client is bound to the loop that made it; tests and
the CLI run several loops) with the store's scripts registered on it, and a failure counter whose
warning is rate-limited, because a Redis outage must degrade a store to its in-process fallback
without failing requests or flooding the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Mapping

log = logging.getLogger("loadbear")


class RedisScripts:
    """Base of the Redis-backed stores: ``_client()``, ``_script(name)``, ``_failed(exc)``,
    ``_delete(keys)``, ``_delete_prefix()`` and ``_close_clients()``."""

    #: ``_failed`` warns with this message (``%s``: the exception), at most every 10 seconds.
    unavailable_warning = "Redis unavailable (%s)"
    _logger = log

    def __init__(self, url: str, *, prefix: str, ttl_s: int, timeout_s: float,
                 scripts: Mapping[str, str]) -> None:
        import redis

        self.url = url
        self.prefix = prefix
        self.ttl_s = int(ttl_s)
        self.timeout_s = timeout_s
        # Connects on first use, not here.
        self._sync = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                          decode_responses=True)
        self._script_sources = dict(scripts)
        self._async: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scripts: dict[str, Any] = {}
        self.errors = 0
        self._last_warning = 0.0

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._async is None or self._loop is not loop:
            import redis.asyncio as aioredis

            self._async = aioredis.Redis.from_url(self.url, socket_timeout=self.timeout_s,
                                                  socket_connect_timeout=self.timeout_s, decode_responses=True)
            self._loop = loop
            self._scripts = {name: self._async.register_script(src) for name, src in self._script_sources.items()}
        return self._async

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        self._client()
        return await self._scripts[name](keys=keys, args=args)

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            self._logger.warning(self.unavailable_warning, exc)

    def _delete(self, keys: list[str] | tuple[str, ...] | None = None) -> None:
        """Delete ``keys``, or every key under the prefix when ``keys`` is None; failures counted."""
        try:
            if keys is not None:
                self._sync.delete(*keys)
                return
            batch = list(self._sync.scan_iter(match=self.prefix + "*", count=500))
            if batch:
                self._sync.delete(*batch)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    async def _close_clients(self) -> None:
        client, self._async = self._async, None
        # An asyncio client can only be closed on the loop that made it; another loop's is dropped.
        if client is not None and self._loop is asyncio.get_running_loop():
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001
                pass
        try:
            self._sync.close()
        except Exception:  # noqa: BLE001
            pass
