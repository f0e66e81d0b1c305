"""The deterministic ``scripted`` test double."""

from __future__ import annotations

import asyncio
import time

import pytest

from loadbear.providers import (
    ChatRequest,
    ErrorKind,
    ModelConfig,
    Provider,
    ProviderError,
    ProviderRegistry,
    ScriptedProvider,
    Step,
    Usage,
    build_provider,
    count_text,
)
from loadbear.providers.scripted import DEFAULT_REPLY

MODEL = ModelConfig(name="fake", provider="scripted", upstream_model="fake-1")
OTHER = ModelConfig(name="other", provider="scripted", upstream_model="fake-2")
REQ = ChatRequest(messages=[{"role": "user", "content": "hi"}])


async def collect(provider, request=REQ, model=MODEL):
    pieces, last = [], None
    async for delta in provider.stream(request, model):
        pieces.append(delta.text)
        last = delta
    return pieces, last


async def test_default_reply_and_call_log() -> None:
    p = ScriptedProvider()
    out = await p.complete(REQ, MODEL)
    assert out.text == DEFAULT_REPLY and out.finish_reason == "stop" and out.upstream_model == "fake-1"
    assert out.usage.estimated and out.usage.completion_tokens == count_text(DEFAULT_REPLY)
    pieces, last = await collect(p)
    assert "".join(pieces) == DEFAULT_REPLY
    assert pieces[1].startswith(" ")
    assert last.finish_reason == "stop" and last.usage == out.usage
    assert [(c.model, c.stream) for c in p.calls] == [("fake", False), ("fake", True)]
    assert p.calls[0].request is REQ


async def test_queue_order_and_constructor_replies() -> None:
    p = ScriptedProvider(["first", "second"], default="dflt")
    assert (await p.complete(REQ, MODEL)).text == "first"
    pieces, _ = await collect(p)
    assert "".join(pieces) == "second"
    assert (await p.complete(REQ, MODEL)).text == "dflt"


async def test_errors_and_per_model_scripts() -> None:
    p = ScriptedProvider()
    err = ProviderError(ErrorKind.RATE_LIMITED, "slow down", status=429, retry_after=0.5)
    p.script([err, "for other"], model="other")
    p.script(["shared"])
    with pytest.raises(ProviderError) as info:
        await p.complete(REQ, OTHER)
    assert info.value.kind is ErrorKind.RATE_LIMITED and info.value.retry_after == 0.5 and info.value.status == 429
    assert (await p.complete(REQ, MODEL)).text == "shared"
    pieces, _ = await collect(p)
    assert "".join(pieces) == DEFAULT_REPLY
    # the model queue was consumed only by that model
    assert (await p.complete(REQ, OTHER)).text == "for other"
    p.script([err])
    with pytest.raises(ProviderError) as info:
        await collect(p)
    assert info.value.kind is ErrorKind.RATE_LIMITED and info.value.usage is None


async def test_fail_after_chunks_attaches_usage() -> None:
    p = ScriptedProvider()
    p.script([Step(text="one two three four", fail_after_chunks=2), Step(text="a b c", fail_after_chunks=1,
              error=ProviderError(ErrorKind.IDLE_TIMEOUT, "stalled"))])
    got = []
    with pytest.raises(ProviderError) as info:
        async for delta in p.stream(REQ, MODEL):
            got.append(delta.text)
    assert got == ["one", " two"]
    assert info.value.kind is ErrorKind.STREAM_CUT
    assert info.value.usage == Usage(prompt_tokens=info.value.usage.prompt_tokens,
                                     completion_tokens=count_text("one two"), estimated=True)
    with pytest.raises(ProviderError) as info:
        await p.complete(REQ, MODEL)
    assert info.value.kind is ErrorKind.IDLE_TIMEOUT and info.value.usage.completion_tokens == count_text("a")


async def test_delays_usage_override_and_max_tokens() -> None:
    p = ScriptedProvider()
    usage = Usage(prompt_tokens=100, completion_tokens=7, cached_tokens=40)
    p.script([Step(text="slow reply", delay_s=0.05, chunk_delay_s=0.02, usage=usage)])
    t0 = time.perf_counter()
    pieces, last = await collect(p)
    assert time.perf_counter() - t0 >= 0.07
    assert "".join(pieces) == "slow reply" and last.usage == usage
    p.script([Step(text="one two three four five six")])
    out = await p.complete(ChatRequest(messages=REQ.messages, max_tokens=2), MODEL)
    assert out.text == "one two" and out.finish_reason == "length"


async def test_delay_is_cancellable() -> None:
    p = ScriptedProvider([Step(text="never", delay_s=30)])
    task = asyncio.ensure_future(p.complete(REQ, MODEL))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_embed_and_reset() -> None:
    p = ScriptedProvider(["x"])
    vectors = await p.embed(["a", "b"], MODEL)
    assert len(vectors) == 2 and vectors == await p.embed(["a", "b"], MODEL)
    assert p.embed_calls[0] == ("fake", ["a", "b"])
    p.reset()
    assert p.calls == [] and p.pending() == 0
    assert (await p.complete(REQ, MODEL)).text == DEFAULT_REPLY


async def test_bad_outcome_type() -> None:
    p = ScriptedProvider([42])
    with pytest.raises(TypeError):
        await p.complete(REQ, MODEL)


async def test_registry_one_instance_per_kind() -> None:
    reg = ProviderRegistry()
    a = reg.get(MODEL)
    assert isinstance(a, ScriptedProvider) and reg.get(OTHER) is a
    openai = reg.get(ModelConfig(name="o", provider="openai", upstream_model="x"))
    assert reg.get(ModelConfig(name="v", provider="vllm", upstream_model="y")) is openai
    assert reg.get_kind("local") is reg.get_kind("local")
    mine = ScriptedProvider()
    reg2 = ProviderRegistry({"scripted": mine})
    assert reg2.get(MODEL) is mine
    with pytest.raises(ValueError):
        build_provider("nope")
    for kind in ("openai", "anthropic", "local", "scripted"):
        built = build_provider(kind)
        assert built.name == kind and isinstance(built, Provider)
        await built.aclose()
    await reg.aclose()
    await reg2.aclose()
