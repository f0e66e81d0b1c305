"""Fast JSON responses, and the streaming response that owns a chat stream's lifetime."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from loadbear.gateway.chat import ChatStream
from loadbear.gateway.errors import ApiError

# Headers that stop proxies (nginx, Cloudflare...) and browsers from buffering or transforming
# the event stream: every chunk must reach the client as soon as it is produced.
SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache, no-transform",
    "x-accel-buffering": "no",
    "connection": "keep-alive",
}


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(err: ApiError) -> JSON:
    return JSON(err.body(), status_code=err.status, headers=err.headers)


class SSEResponse(Response):
    """Streams a started :class:`ChatStream` and guarantees its ledger row.

    A watcher task listens for ``http.disconnect``; when the client goes away mid-stream it
    cancels the streaming task, which closes the upstream call and records ``cancelled``.

    Chunks the stream produces back to back (several upstream events that arrived in one read)
    go out in one write: nothing waits for more, a chunk is only held while the next one is
    already being produced without waiting for I/O. Under load this saves most of the
    per-chunk send cost (one ASGI send and one syscall per chunk).
    """

    def __init__(self, stream: ChatStream) -> None:
        # A Response subclass so FastAPI passes it through; we never render a body up front.
        self.stream = stream
        self.disconnected = False
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                    if task is not None:
                        task.cancel()
                    return

        watcher = asyncio.create_task(watch())
        headers = [(k.encode(), v.encode()) for k, v in {**SSE_HEADERS, **self.stream.headers}.items()]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            anext_ = self.stream.body().__anext__
            parts: list[bytes] = []
            while True:
                step = anext_()
                try:
                    # Run the stream until it has a chunk or must wait for I/O.
                    pending = step.send(None)
                except StopIteration as ready:
                    parts.append(ready.value)
                    continue
                except StopAsyncIteration:
                    break
                # It waits: first send what is ready, then wait along with it.
                if parts:
                    try:
                        await send({"type": "http.response.body", "body": b"".join(parts), "more_body": True})
                    except BaseException:
                        await _cancel(step, pending)
                        raise
                    parts = []
                try:
                    parts.append(await _Resume(step, pending))
                except StopAsyncIteration:
                    break
            await send({"type": "http.response.body", "body": b"".join(parts), "more_body": False})
        except asyncio.CancelledError:
            if not self.disconnected:
                raise
            if task is not None:
                task.uncancel()
        except OSError:
            self.disconnected = True
        finally:
            watcher.cancel()
            # Idempotent: records "cancelled" only if the body never got to record its outcome.
            await self.stream.abort()


async def _cancel(step: Any, pending: Any) -> None:
    """The client went away while the stream was waiting on upstream: end that wait the way a
    task cancellation would (the upstream call closes, the ledger records ``cancelled``)."""
    try:
        pending = step.throw(asyncio.CancelledError())
        await _Resume(step, pending)  # a ``finally`` on the way out still had to wait
    except BaseException:
        pass


class _Resume:
    """Awaits the rest of a coroutine that was stepped by hand and is now waiting on ``pending``.

    Passes what it yields to the task and what the task sends or throws (cancellation) back
    in, i.e. ``yield from`` for a coroutine that already made its first step.
    """

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Any, pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self):
        coro, pending = self._coro, self._pending
        self._coro = self._pending = None
        while True:
            try:
                value = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the task, e.g. CancelledError
                try:
                    pending = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    pending = coro.send(value)
                except StopIteration as done:
                    return done.value
