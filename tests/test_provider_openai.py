"""OpenAIProvider over real HTTP on 127.0.0.1: the upstream simulator, plus a tiny canned
server for wire shapes the simulator does not produce (no usage, cached tokens, odd SSE)."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from typing import Any

import orjson
import pytest
from aiohttp import web

from loadbear.providers import (
    ChatRequest,
    ErrorKind,
    ModelConfig,
    OpenAIProvider,
    ProviderError,
    Timeouts,
    Usage,
    count_text,
)
from loadbear.providers._http import SSEParser, map_http_error, parse_retry_after
from loadbear.testing import Fault, UpstreamSimulator

REPLY = "The quick brown fox jumps over the lazy dog and keeps running far away."
REQ = ChatRequest(
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about foxes."}],
    temperature=0.2,
)
FAST = Timeouts(connect=2.0, first_token=5.0, idle=5.0, total=10.0)


@pytest.fixture(scope="module")
def sim():
    with UpstreamSimulator(seed=1) as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh_sim(sim):
    sim.reset()
    sim.configure(tokens_per_second=None, latency_ms=(0, 0))
    sim.set_reply(REPLY)
    yield


@pytest.fixture
async def provider():
    p = OpenAIProvider()
    yield p
    await p.aclose()


def model_for(url: str, timeouts: Timeouts = FAST, **kw: Any) -> ModelConfig:
    return ModelConfig(
        name="gpt-test", provider="openai", upstream_model="gpt-4o-mini", base_url=url, api_key="sk-test",
        timeouts=timeouts, **kw,
    )


@pytest.fixture
def model(sim) -> ModelConfig:
    return model_for(sim.url + "/v1")


async def collect(provider, request, model):
    pieces, last = [], None
    async for delta in provider.stream(request, model):
        if delta.text:
            pieces.append(delta.text)
        last = delta
    return "".join(pieces), last


async def stream_error(provider, request, model) -> tuple[str, ProviderError]:
    pieces = []
    with pytest.raises(ProviderError) as info:
        async for delta in provider.stream(request, model):
            pieces.append(delta.text)
    return "".join(pieces), info.value


def acquired(provider: OpenAIProvider) -> int:
    session = provider._http._session
    return 0 if session is None else len(session.connector._acquired)


# --------------------------------------------------------------------------- a canned server


class Canned:
    """Serves queued answers: (status, headers, body bytes | list of bytes/float-sleeps)."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str], Any]] = []
        self.bodies: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(orjson.loads(await request.read()))
        status, headers, body = self.answers.pop(0)
        if isinstance(body, bytes):
            return web.Response(status=status, body=body, headers={"Content-Type": "application/json", **headers})
        resp = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream", **headers})
        await resp.prepare(request)
        for part in body:
            if isinstance(part, float):
                await asyncio.sleep(part)
            else:
                await resp.write(part)
        await resp.write_eof()
        return resp


@pytest.fixture
async def canned():
    c = Canned()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", c.handle)
    app.router.add_post("/v1/embeddings", c.handle)
    app.router.add_post("/v1/messages", c.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    c.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield c
    await runner.cleanup()


def chunk(content: str | None = None, finish: str | None = None, usage: Any = None, **extra: Any) -> bytes:
    delta = {} if content is None else {"content": content}
    obj: dict[str, Any] = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        obj = {"object": "chat.completion.chunk", "choices": [], "usage": usage}
    obj.update(extra)
    return b"data: " + orjson.dumps(obj) + b"\n\n"


# --------------------------------------------------------------------------- SSE + helpers


def test_sse_parser_lines_comments_events_multiline() -> None:
    p = SSEParser()
    assert p.feed(b": ping\n\n") == []
    assert p.feed(b"data: {\"a\"") == []
    assert p.feed(b": 1}\r") == []
    assert p.feed(b"\n\r\n") == [(None, b'{"a": 1}')]
    assert p.feed(b"event: message_stop\r\ndata: x\r\n\r\nevent:ping\ndata:y\ndata: z\n\nid: 7\nretry: 5\ndata\n\n") == [
        (b"message_stop", b"x"),
        (b"ping", b"y\nz"),
        (None, b""),
    ]
    assert p.feed(b"event: lonely\n\n") == []  # no data: nothing dispatched
    assert p.feed(b"data: [DONE]\n") == []
    assert p.flush() == [(None, b"[DONE]")]
    p.feed(b"data: cut in the midd")
    assert p.flush() == []
    # an event name split from its data across reads is kept
    assert p.feed(b"event: message_delta\n") == []
    assert p.feed(b"data: {}\n\n") == [(b"message_delta", b"{}")]
    # the one-event fast paths
    assert p.feed(b"data: {}\n\n") == [(None, b"{}")]
    assert p.feed(b"event: ping\ndata: {}\n\n") == [(b"ping", b"{}")]
    assert p.feed(b"event: ping\n: c\ndata: z\n\n") == [(b"ping", b"z")]


def test_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.5", "retry-after-ms": "250"}) == 0.25
    later = parse_retry_after({"retry-after": formatdate(time.time() + 30, usegmt=True)})
    assert later is not None and 25 < later <= 31
    assert parse_retry_after({"retry-after": formatdate(time.time() - 30, usegmt=True)}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_status_mapping_table() -> None:
    kinds = {s: map_http_error(s, b'{"error": {"message": "x"}}').kind for s in (401, 403, 404, 413, 422, 500, 502, 504, 529)}
    assert kinds == {
        401: ErrorKind.AUTH, 403: ErrorKind.AUTH, 404: ErrorKind.NOT_FOUND, 413: ErrorKind.BAD_REQUEST,
        422: ErrorKind.BAD_REQUEST, 500: ErrorKind.SERVER_ERROR, 502: ErrorKind.SERVER_ERROR,
        504: ErrorKind.SERVER_ERROR, 529: ErrorKind.SERVER_ERROR,
    }
    vllm = b'{"object":"error","message":"This model\'s maximum context length is 4096 tokens.","code":400}'
    assert map_http_error(400, vllm).kind is ErrorKind.CONTEXT_LENGTH
    assert map_http_error(400, b"not json at all").kind is ErrorKind.BAD_REQUEST


# --------------------------------------------------------------------------- happy paths


async def test_complete(provider, model, sim) -> None:
    out = await provider.complete(REQ, model)
    assert out.text == REPLY
    assert out.finish_reason == "stop"
    assert out.upstream_model == "gpt-4o-mini"
    rec = sim.requests[-1]
    assert out.usage == Usage(rec.prompt_tokens, rec.completion_tokens, 0, False)
    assert rec.body["messages"] == REQ.messages and rec.body["temperature"] == 0.2
    assert "stream" not in rec.body
    assert rec.headers["authorization"] == "Bearer sk-test"


async def test_stream_matches_complete(provider, model, sim) -> None:
    done = await provider.complete(REQ, model)
    text, last = await collect(provider, REQ, model)
    assert text == done.text
    assert last.text == "" and last.finish_reason == "stop"
    assert last.usage == done.usage and last.usage.estimated is False
    body = sim.requests[-1].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert acquired(provider) == 0  # connection back in the pool


async def test_max_tokens_length(provider, model, sim) -> None:
    request = ChatRequest(messages=REQ.messages, max_tokens=4)
    out = await provider.complete(request, model)
    assert out.finish_reason == "length" and out.usage.completion_tokens == 4
    text, last = await collect(provider, request, model)
    assert text == out.text and last.finish_reason == "length"
    assert sim.requests[-1].body["max_tokens"] == 4  # not api.openai.com: max_tokens


async def test_azure_api_key_header(provider, sim) -> None:
    model = model_for(sim.url + "/v1?api-version=2024-10-21", extra_headers={"api-key": ""})
    out = await provider.complete(REQ, model)
    assert out.text == REPLY
    headers = sim.requests[-1].headers
    assert headers["api-key"] == "sk-test" and "authorization" not in headers


async def test_embeddings(provider, model, sim) -> None:
    vectors = await provider.embed(["hello", "world", "again"], model)
    assert len(vectors) == 3 and all(len(v) == len(vectors[0]) > 0 for v in vectors)
    assert sim.requests[-1].path == "/v1/embeddings"
    assert await provider.embed([], model) == []


async def test_usage_mapping_cached_and_estimated(provider, canned) -> None:
    model = model_for(canned.url + "/v1")
    wire = {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57, "prompt_tokens_details": {"cached_tokens": 32}}
    body = {"model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}]}
    canned.answers = [
        (200, {}, orjson.dumps({**body, "usage": wire})),
        (200, {}, orjson.dumps(body)),  # no usage at all
        (200, {}, [chunk(""), chunk("hi"), chunk(" there"), chunk(finish="stop"), b"data: [DONE]\n\n"]),  # ignores include_usage
        (200, {}, [chunk("hi"), chunk(" there", finish="stop"), chunk(usage=wire), b"data: [DONE]\n\n"]),
    ]
    assert (await provider.complete(REQ, model)).usage == Usage(50, 7, 32, False)
    estimated = (await provider.complete(REQ, model)).usage
    assert estimated.estimated is True
    assert estimated.completion_tokens == count_text("hi there") and estimated.prompt_tokens > 0
    text, last = await collect(provider, REQ, model)
    assert text == "hi there" and last.usage == estimated  # same usage, whichever path
    text, last = await collect(provider, REQ, model)
    assert text == "hi there" and last.usage == Usage(50, 7, 32, False)


async def test_sse_crlf_comments_and_endings(provider, canned) -> None:
    model = model_for(canned.url + "/v1")
    crlf = chunk("a").replace(b"\n", b"\r\n")
    canned.answers = [
        # CRLF, keep-alive comments; [DONE] without a finish reason is a proper end
        (200, {}, [b": keep-alive\r\n\r\n", crlf, b": ping\n\n", chunk(" b"), b"data: [DONE]\n\n"]),
        # a finish reason and then EOF without [DONE] is complete too
        (200, {}, [chunk("c"), chunk(finish="length")]),
        # EOF without either: cut
        (200, {}, [chunk("d"), chunk(" e")]),
    ]
    text, last = await collect(provider, REQ, model)
    assert text == "a b" and last.finish_reason == "stop"
    text, last = await collect(provider, REQ, model)
    assert text == "c" and last.finish_reason == "length"
    text, err = await stream_error(provider, REQ, model)
    assert text == "d e" and err.kind is ErrorKind.STREAM_CUT
    assert err.usage is not None and err.usage.completion_tokens == count_text("d e") and err.usage.estimated


async def test_auth_not_found_and_http_date(provider, canned) -> None:
    model = model_for(canned.url + "/v1")
    err_body = orjson.dumps({"error": {"message": "nope", "type": "invalid_request_error", "code": None}})
    canned.answers = [
        (401, {}, err_body),
        (404, {}, err_body),
        (429, {"Retry-After": formatdate(time.time() + 20, usegmt=True)}, err_body),
    ]
    for kind in (ErrorKind.AUTH, ErrorKind.NOT_FOUND):
        with pytest.raises(ProviderError) as info:
            await provider.complete(REQ, model)
        assert info.value.kind is kind
    _, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.RATE_LIMITED and 15 < err.retry_after <= 21


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "fault, kind, status",
    [
        (Fault("rate_limit", retry_after=0.1), ErrorKind.RATE_LIMITED, 429),
        (Fault("server_error"), ErrorKind.SERVER_ERROR, 500),
        (Fault("unavailable"), ErrorKind.SERVER_ERROR, 503),
        (Fault("refused"), ErrorKind.CONNECTION, None),
        (Fault("no_headers"), ErrorKind.CONNECTION, None),
        (Fault("bad_request"), ErrorKind.BAD_REQUEST, 400),
        (Fault("context_length"), ErrorKind.CONTEXT_LENGTH, 400),
    ],
)
async def test_error_mapping(provider, model, sim, stream, fault, kind, status) -> None:
    sim.script([fault])
    if stream:
        text, err = await stream_error(provider, REQ, model)
        assert text == ""
    else:
        with pytest.raises(ProviderError) as info:
            await provider.complete(REQ, model)
        err = info.value
    assert err.kind is kind and err.status == status
    if kind is ErrorKind.RATE_LIMITED:
        assert err.retry_after == pytest.approx(0.1)
    assert err.usage is None
    # the provider stays healthy
    assert (await provider.complete(REQ, model)).text == REPLY


async def test_refused_port(provider, sim) -> None:
    model = model_for(sim.refused_url + "/v1")
    with pytest.raises(ProviderError) as info:
        await provider.complete(REQ, model)
    assert info.value.kind is ErrorKind.CONNECTION
    _, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.CONNECTION


async def test_stall_first_token(provider, sim) -> None:
    model = model_for(sim.url + "/v1", Timeouts(connect=2, first_token=0.2, idle=5, total=10))
    sim.script([Fault("stall_first_token", stall_s=5), Fault("stall_first_token", stall_s=5)])
    t0 = time.perf_counter()
    _, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.FIRST_TOKEN_TIMEOUT
    with pytest.raises(ProviderError) as info:
        await provider.complete(REQ, model)
    assert info.value.kind is ErrorKind.FIRST_TOKEN_TIMEOUT
    assert time.perf_counter() - t0 < 1.5
    assert acquired(provider) == 0


async def test_idle_and_total_timeouts(provider, sim) -> None:
    sim.configure(tokens_per_second=8)  # ~0.1-0.2 s between chunks
    model = model_for(sim.url + "/v1", Timeouts(connect=2, first_token=2, idle=0.05, total=10))
    text, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.IDLE_TIMEOUT
    if text:
        assert err.usage.completion_tokens == count_text(text)
    model = model_for(sim.url + "/v1", Timeouts(connect=2, first_token=2, idle=2, total=0.6))
    t0 = time.perf_counter()
    text, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.TIMEOUT and text and err.usage is not None
    assert time.perf_counter() - t0 < 1.5
    with pytest.raises(ProviderError) as info:
        await provider.complete(REQ, model)
    assert info.value.kind is ErrorKind.TIMEOUT
    assert acquired(provider) == 0


async def test_cut_mid_stream_attaches_usage(provider, model, sim) -> None:
    sim.script([Fault("cut_mid_stream", after_chunks=2)])
    text, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.STREAM_CUT
    assert text == "The quick"
    assert err.usage == Usage(err.usage.prompt_tokens, count_text("The quick"), 0, True)
    assert err.usage.prompt_tokens > 0
    # non-stream: the body is cut short
    sim.script([Fault("cut_mid_stream")])
    with pytest.raises(ProviderError) as info:
        await provider.complete(REQ, model)
    assert info.value.kind in (ErrorKind.CONNECTION, ErrorKind.MALFORMED)


async def test_malformed_and_inband(provider, model, sim) -> None:
    sim.script([Fault("malformed_chunk", after_chunks=1), Fault("inband_error", after_chunks=2)])
    text, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.MALFORMED and text == "The" and err.usage.completion_tokens == count_text("The")
    text, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.UPSTREAM_ERROR and text == "The quick" and err.usage is not None
    sim.script([Fault("malformed_chunk"), Fault("inband_error")])
    for kind in (ErrorKind.MALFORMED, ErrorKind.UPSTREAM_ERROR):
        with pytest.raises(ProviderError) as info:
            await provider.complete(REQ, model)
        assert info.value.kind is kind


async def _wait_disconnect(sim, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = sim.requests[-1]
        if rec.client_disconnected:
            return True
        await asyncio.sleep(0.01)
    return False


async def test_consumer_close_releases_upstream(provider, model, sim) -> None:
    sim.configure(tokens_per_second=20)
    agen = provider.stream(REQ, model)
    first = await agen.__anext__()
    second = await agen.__anext__()
    # pieces that arrive in one network read are coalesced: granularity may vary
    assert REPLY.startswith(first.text + second.text) and first.text.startswith("The")
    await agen.aclose()
    assert acquired(provider) == 0
    assert await _wait_disconnect(sim)


async def test_task_cancel_releases_upstream(provider, model, sim) -> None:
    sim.configure(tokens_per_second=20)
    got: list[str] = []

    async def consume() -> None:
        async for delta in provider.stream(REQ, model):
            got.append(delta.text)

    task = asyncio.create_task(consume())
    while len(got) < 2:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert acquired(provider) == 0
    assert await _wait_disconnect(sim)
    # and the next request works on a fresh connection
    sim.configure(tokens_per_second=None)
    text, _ = await collect(provider, REQ, model)
    assert text == REPLY


def test_transport_exception_mapping() -> None:
    import aiohttp

    from loadbear.providers._http import map_exception

    assert map_exception(aiohttp.ConnectionTimeoutError()).kind is ErrorKind.TIMEOUT
    assert map_exception(aiohttp.ServerDisconnectedError()).kind is ErrorKind.CONNECTION
    assert map_exception(ConnectionResetError()).kind is ErrorKind.CONNECTION
    assert map_exception(TimeoutError()).kind is ErrorKind.TIMEOUT


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_one_provider_across_event_loops(sim) -> None:
    """The session is bound to the loop that made it; a new loop gets a new session (the
    first loop's pooled sockets, never closed there, are dropped)."""
    import gc

    provider = OpenAIProvider()
    model = model_for(sim.url + "/v1")
    assert asyncio.run(provider.complete(REQ, model)).text == REPLY
    assert asyncio.run(provider.complete(REQ, model)).text == REPLY

    async def close_and_reuse() -> None:
        await provider.aclose()
        assert (await provider.complete(REQ, model)).text == REPLY  # usable after aclose
        await provider.aclose()

    asyncio.run(close_and_reuse())
    gc.collect()


async def test_connect_timeout(provider) -> None:
    """A listener whose accept backlog is full never completes the TCP handshake."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        await asyncio.sleep(0.02)
        model = model_for(f"http://127.0.0.1:{port}/v1", Timeouts(connect=0.2, first_token=3, idle=3, total=3))
        t0 = time.perf_counter()
        with pytest.raises(ProviderError) as info:
            await provider.complete(REQ, model)
        if info.value.kind is not ErrorKind.TIMEOUT:
            pytest.skip(f"this platform does not stall connects on a full backlog: {info.value!r}")
        assert "connect" in info.value.message and time.perf_counter() - t0 < 1.0
    finally:
        for sock in (*fillers, srv):
            sock.close()
