"""AnthropicProvider over real HTTP on 127.0.0.1: the upstream simulator, plus a tiny canned
server for wire shapes the simulator does not produce (cache usage, missing usage, thinking)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from aiohttp import web

from loadbear.providers import (
    AnthropicProvider,
    ChatRequest,
    ErrorKind,
    ModelConfig,
    ProviderError,
    Timeouts,
    Usage,
    count_text,
)
from loadbear.testing import Fault, UpstreamSimulator

REPLY = "Foxes are small omnivores that live on every continent except Antarctica and Australia."
REQ = ChatRequest(
    messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Use plain words."},
        {"role": "user", "content": "Tell me about foxes.", "name": "ann"},
    ],
    temperature=1.7,
    stop=["###"],
    user="tenant-1:user-9",
)
FAST = Timeouts(connect=2.0, first_token=5.0, idle=5.0, total=10.0)


@pytest.fixture(scope="module")
def sim():
    with UpstreamSimulator(seed=2) as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh_sim(sim):
    sim.reset()
    sim.configure(tokens_per_second=None, latency_ms=(0, 0))
    sim.set_reply(REPLY)
    yield


@pytest.fixture
async def provider():
    p = AnthropicProvider()
    yield p
    await p.aclose()


def model_for(url: str, timeouts: Timeouts = FAST, **kw: Any) -> ModelConfig:
    return ModelConfig(
        name="claude-test", provider="anthropic", upstream_model="claude-sonnet-test", base_url=url,
        api_key="sk-ant-test", timeouts=timeouts, **kw,
    )


@pytest.fixture
def model(sim) -> ModelConfig:
    return model_for(sim.url)


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


def acquired(provider: AnthropicProvider) -> int:
    session = provider._http._session
    return 0 if session is None else len(session.connector._acquired)


class Canned:
    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str], Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        status, headers, body = self.answers.pop(0)
        if isinstance(body, bytes):
            return web.Response(status=status, body=body, headers={"Content-Type": "application/json", **headers})
        resp = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream", **headers})
        await resp.prepare(request)
        for part in body:
            await resp.write(part)
        await resp.write_eof()
        return resp


@pytest.fixture
async def canned():
    c = Canned()
    app = web.Application()
    app.router.add_post("/v1/messages", c.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    c.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield c
    await runner.cleanup()


def ev(name: str | None, data: dict[str, Any]) -> bytes:
    head = b"" if name is None else b"event: " + name.encode() + b"\n"
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def text_delta(text: str, name: str | None = "content_block_delta") -> bytes:
    return ev(name, {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})


def start(usage: dict[str, Any]) -> bytes:
    return ev("message_start", {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant",
                                                                     "content": [], "model": "c", "usage": usage}})


STOP = ev("message_stop", {"type": "message_stop"})


# --------------------------------------------------------------------------- happy paths


async def test_complete_and_wire_mapping(provider, model, sim) -> None:
    out = await provider.complete(REQ, model)
    assert out.text == REPLY and out.finish_reason == "stop" and out.upstream_model == "claude-sonnet-test"
    rec = sim.requests[-1]
    assert rec.path == "/v1/messages"
    assert out.usage == Usage(rec.prompt_tokens, rec.completion_tokens, 0, False)
    body = rec.body
    assert body["system"] == "Be brief.\n\nUse plain words."
    assert body["messages"] == [{"role": "user", "content": "Tell me about foxes."}]
    assert body["max_tokens"] == 1024
    assert body["temperature"] == 1.0  # clamped to Anthropic's range
    assert body["stop_sequences"] == ["###"] and body["metadata"] == {"user_id": "tenant-1:user-9"}
    assert "stream" not in body
    assert rec.headers["x-api-key"] == "sk-ant-test" and rec.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in rec.headers


async def test_stream_matches_complete(provider, model, sim) -> None:
    done = await provider.complete(REQ, model)
    text, last = await collect(provider, REQ, model)
    assert text == done.text
    assert last.text == "" and last.finish_reason == "stop"
    assert last.usage == done.usage and last.usage.estimated is False
    assert sim.requests[-1].body["stream"] is True
    assert acquired(provider) == 0


async def test_max_tokens_maps_to_length(provider, model, sim) -> None:
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    out = await provider.complete(request, model)
    assert out.finish_reason == "length" and out.usage.completion_tokens == 3
    text, last = await collect(provider, request, model)
    assert text == out.text and last.finish_reason == "length" and last.usage == out.usage
    assert sim.requests[-1].body["max_tokens"] == 3


async def test_content_parts_and_tool_messages(provider, model, sim) -> None:
    request = ChatRequest(messages=[
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": "ok "},
    ])
    await provider.complete(request, model)
    assert sim.requests[-1].body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
        {"role": "assistant", "content": "ok"},
    ]


async def test_usage_mapping_cache_and_estimates(provider, canned) -> None:
    model = model_for(canned.url)
    wire = {"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": 90, "cache_creation_input_tokens": 5}
    message = {"id": "m", "type": "message", "role": "assistant", "model": "c",
               "content": [{"type": "text", "text": "cached answer"}], "stop_reason": "end_turn"}
    canned.answers = [
        (200, {}, orjson.dumps({**message, "usage": wire})),
        (200, {}, [start({**wire, "output_tokens": 1}), ev("ping", {"type": "ping"}), text_delta("cached"),
                   text_delta(" answer", name=None),  # no event name: dispatched on "type"
                   ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "stop_sequence"}, "usage": {"output_tokens": 4}}),
                   STOP]),
        (200, {}, orjson.dumps(message)),  # no usage at all
        (200, {}, [ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}}),
                   text_delta("cached answer"),
                   ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}), STOP]),
    ]
    full = Usage(prompt_tokens=105, completion_tokens=4, cached_tokens=90, estimated=False)
    assert (await provider.complete(REQ, model)).usage == full
    text, last = await collect(provider, REQ, model)
    assert text == "cached answer" and last.usage == full and last.finish_reason == "stop"
    estimated = (await provider.complete(REQ, model)).usage
    assert estimated.estimated and estimated.completion_tokens == count_text("cached answer")
    text, last = await collect(provider, REQ, model)
    assert text == "cached answer" and last.usage == estimated


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "fault, kind, status",
    [
        (Fault("rate_limit", retry_after=0.1), ErrorKind.RATE_LIMITED, 429),
        (Fault("server_error"), ErrorKind.SERVER_ERROR, 500),
        (Fault("unavailable"), ErrorKind.SERVER_ERROR, 503),
        (Fault("unavailable", status=529), ErrorKind.SERVER_ERROR, 529),
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
    assert (await provider.complete(REQ, model)).text == REPLY


async def test_refused_port(provider, sim) -> None:
    model = model_for(sim.refused_url)
    _, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.CONNECTION


async def test_stall_first_token(provider, sim) -> None:
    model = model_for(sim.url, Timeouts(connect=2, first_token=0.2, idle=5, total=10))
    sim.script([Fault("stall_first_token", stall_s=5), Fault("stall_first_token", stall_s=5)])
    t0 = time.perf_counter()
    _, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.FIRST_TOKEN_TIMEOUT and err.usage is None
    with pytest.raises(ProviderError) as info:
        await provider.complete(REQ, model)
    assert info.value.kind is ErrorKind.FIRST_TOKEN_TIMEOUT
    assert time.perf_counter() - t0 < 1.5


async def test_idle_timeout(provider, sim) -> None:
    sim.configure(tokens_per_second=8)
    model = model_for(sim.url, Timeouts(connect=2, first_token=2, idle=0.05, total=10))
    text, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.IDLE_TIMEOUT
    assert text and err.usage.completion_tokens == count_text(text)
    # prompt tokens came from message_start: the real count, completion estimated
    assert err.usage.prompt_tokens == sim.requests[-1].prompt_tokens and err.usage.estimated


async def test_cut_mid_stream_attaches_usage(provider, model, sim) -> None:
    sim.script([Fault("cut_mid_stream", after_chunks=2)])
    text, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.STREAM_CUT and text == "Foxes are"
    assert err.usage == Usage(sim.requests[-1].prompt_tokens, count_text("Foxes are"), 0, True)


async def test_malformed_and_inband(provider, model, sim) -> None:
    sim.script([Fault("malformed_chunk", after_chunks=1), Fault("inband_error", after_chunks=2)])
    text, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.MALFORMED and text == "Foxes" and err.usage is not None
    text, err = await stream_error(provider, REQ, model)
    assert err.kind is ErrorKind.UPSTREAM_ERROR and text == "Foxes are" and "Overloaded" in err.message
    sim.script([Fault("malformed_chunk"), Fault("inband_error")])
    for kind in (ErrorKind.MALFORMED, ErrorKind.UPSTREAM_ERROR):
        with pytest.raises(ProviderError) as info:
            await provider.complete(REQ, model)
        assert info.value.kind is kind


async def test_consumer_close_releases_upstream(provider, model, sim) -> None:
    sim.configure(tokens_per_second=20)
    agen = provider.stream(REQ, model)
    first = (await agen.__anext__()).text
    assert first.startswith("Foxes") and REPLY.startswith(first)
    await agen.aclose()
    assert acquired(provider) == 0
    deadline = time.monotonic() + 2
    while not sim.requests[-1].client_disconnected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert sim.requests[-1].client_disconnected


async def test_no_embeddings(provider, model) -> None:
    with pytest.raises(ProviderError) as info:
        await provider.embed(["x"], model)
    assert info.value.kind is ErrorKind.NOT_FOUND
