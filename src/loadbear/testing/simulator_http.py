"""Per-request plumbing of the upstream simulator: the exchange state of one model call and
the low-level HTTP moves (JSON answers, validation, hanging up, pacing)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from .simulator_faults import Fault, anthropic_error, openai_error
from .simulator_state import RequestRecord, SimulatorConfig
from .simulator_wire import Reply, embedding_inputs

JSON_TYPE = "application/json"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


class Exchange:
    """Per-request state of one model call: which API, which fault, which ids."""

    __slots__ = ("request", "record", "anthropic", "cfg", "serial", "fault", "model", "created")

    def __init__(
        self, request: web.Request, record: RequestRecord, anthropic: bool, cfg: SimulatorConfig, serial: int
    ) -> None:
        self.request, self.record, self.anthropic, self.cfg, self.serial = request, record, anthropic, cfg, serial
        self.fault: Fault | None = None
        self.model = ""
        self.created = int(time.time())

    @property
    def rid(self) -> str:
        """The response id, in the provider's style."""
        return f"msg_sim{self.serial:016d}" if self.anthropic else f"chatcmpl-sim{self.serial:012d}"

    @property
    def request_id(self) -> str:
        return f"req_sim{self.serial:016d}"

    def id_headers(self) -> dict[str, str]:
        return {"request-id" if self.anthropic else "x-request-id": self.request_id}

    def error_body(self, kind: str, message: str | None = None, *, inband: bool = False) -> dict[str, Any]:
        options = {"retry_after": self.retry_after, "prompt_tokens": self.record.prompt_tokens}
        if self.anthropic:
            # HTTP error bodies carry the request id; Anthropic's in-band SSE errors do not.
            return anthropic_error(kind, message, request_id=None if inband else self.request_id, **options)
        return openai_error(kind, message, **options)

    @property
    def retry_after(self) -> float:
        fault = self.fault
        return self.cfg.retry_after if fault is None or fault.retry_after is None else fault.retry_after

    @property
    def stall_s(self) -> float:
        fault = self.fault
        return self.cfg.stall_s if fault is None or fault.stall_s is None else fault.stall_s


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=JSON_TYPE, headers=headers)


def ctl_error(message: str) -> web.Response:
    return json_response(400, {"ok": False, "error": message})


async def read_json(request: web.BaseRequest) -> dict[str, Any] | None:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def validate(body: dict[str, Any] | None, *, anthropic: bool, embeddings: bool) -> str | None:
    """The 400s the real APIs give for requests no model could answer."""
    if body is None:
        return "We could not parse the JSON body of your request."
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required" if anthropic else "you must provide a model parameter"
    if embeddings:
        if embedding_inputs(body.get("input")) is None:
            return "'input' must be a non-empty string, array of strings, or array of token arrays"
        dimensions = body.get("dimensions")
        if dimensions is not None and (not isinstance(dimensions, int) or not 0 < dimensions <= 8192):
            return "'dimensions' must be an integer between 1 and 8192"
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: Field required" if anthropic else "'messages' must be a non-empty array"
    if anthropic and (not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1):
        return "max_tokens: Field required"
    return None


def drop(request: web.BaseRequest, *, reset: bool) -> None:
    """Hang up without a (complete) response. ``reset`` aborts with SO_LINGER=0 so the peer
    gets an RST, the closest a listening server can come to a refused connection."""
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # best effort: a plain abort still drops the connection
        transport.abort()
    request.protocol.force_close()


def pacer(tokens_per_second: float | None, reply: Reply) -> Callable[[int], Awaitable[None]] | None:
    """Spread the reply's tokens over time; deadlines are absolute so sleeps do not drift."""
    if not tokens_per_second or not reply.pieces:
        return None
    interval = reply.completion_tokens / tokens_per_second / len(reply.pieces)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def pace(index: int) -> None:
        delay = start + (index + 1) * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    return pace
