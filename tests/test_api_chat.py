"""The OpenAI-compatible chat API, driven by the official openai SDK and raw SSE parsing,
with the upstream simulator as the provider. Every request must leave exactly one ledger row."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from conftest import sim_models

MSG = [{"role": "user", "content": "How do refunds work?"}]


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def test_non_stream_sync_sdk_and_ledger_row(stack, simulator):
    client = stack.openai()
    out = client.chat.completions.create(model="gpt-4o-mini", messages=MSG, user="user-42",
                                         metadata={"feature": "helpdesk"})
    text = out.choices[0].message.content
    assert text and text.startswith("Simulated answer")
    assert out.model == "gpt-4o-mini"
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0

    rows = stack.rows()
    assert len(rows) == 1
    row = rows[0]
    assert str(row["id"]) == out.id
    assert row["status"] == "ok"
    assert row["feature"] == "helpdesk"
    assert row["model"] == "gpt-4o-mini" and row["requested_model"] == "gpt-4o-mini"
    assert row["provider"] == "openai"
    assert row["prompt_tokens"] == out.usage.prompt_tokens
    assert row["completion_tokens"] == out.usage.completion_tokens
    # 0.15 $/1M in, 0.60 $/1M out -> micro-USD, computed at write time
    expected = round(out.usage.prompt_tokens * 0.15 + out.usage.completion_tokens * 0.60)
    assert row["cost_micro_usd"] == expected
    assert row["latency_ms"] >= 0 and row["ttft_ms"] is not None
    assert not row["streamed"] and not row["tokens_estimated"]
    assert row["user_id"] is not None
    assert len(stack.attempts(out.id)) == 1
    assert len(simulator.requests) == 1


def test_stream_sync_sdk_include_usage_same_usage_as_non_stream(stack, simulator):
    client = stack.openai()
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True,
                                                 stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == plain.usage.prompt_tokens
    assert usage_chunk.usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.id == chunks[0].id for c in chunks)

    rows = stack.rows()
    assert len(rows) == 2
    by_id = {str(r["id"]): r for r in rows}
    s, p = by_id[chunks[0].id], by_id[plain.id]
    assert s["streamed"] and not p["streamed"]
    for col in ("prompt_tokens", "completion_tokens", "cost_micro_usd", "status", "model", "feature"):
        assert s[col] == p[col], col
    assert s["ttft_ms"] is not None and s["ttft_ms"] <= s["latency_ms"]


def test_stream_without_include_usage_has_no_usage_chunk(stack):
    with httpx.stream("POST", stack.url + "/v1/chat/completions",
                      headers={"Authorization": f"Bearer {stack.key}"},
                      json={"model": "gpt-4o-mini", "messages": MSG, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-accel-buffering"] == "no"
        assert "no-cache" in r.headers["cache-control"]
        interaction_id = r.headers["x-loadbear-interaction-id"]
        body = r.read().decode()
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in parsed)
    assert all(p["choices"] for p in parsed), "no usage chunk unless asked"
    assert all(p["id"] == interaction_id for p in parsed)
    assert len(stack.rows()) == 1


def test_chunks_are_flushed_as_they_arrive(stack_factory):
    from loadbear.testing import UpstreamSimulator

    # 10 words at 20 tokens/s: the whole answer takes ~0.5 s, so the first chunk must reach the
    # client long before the last one.
    with UpstreamSimulator(tokens_per_second=20, reply_words=10, seed=1) as sim:
        s = stack_factory(sim_models(sim.url))
        import time

        arrivals = []
        with httpx.stream("POST", s.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {s.key}"},
                          json={"model": "gpt-4o-mini", "messages": MSG, "stream": True}, timeout=10) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    arrivals.append(time.monotonic())
        assert len(arrivals) == 10
        assert arrivals[-1] - arrivals[0] > 0.3


async def test_async_sdk_stream_and_non_stream(stack):
    client = stack.async_openai()
    out = await client.chat.completions.create(model="claude-3-5-haiku-latest", messages=MSG)
    assert out.model == "claude-3-5-haiku-latest"
    stream = await client.chat.completions.create(model="claude-3-5-haiku-latest", messages=MSG, stream=True,
                                                  stream_options={"include_usage": True})
    parts, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == out.choices[0].message.content
    assert usage.prompt_tokens == out.usage.prompt_tokens
    assert usage.completion_tokens == out.usage.completion_tokens
    # concurrency: 20 requests at once, 20 rows
    outs = await asyncio.gather(*[
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG) for _ in range(20)
    ])
    assert len({o.id for o in outs}) == 20
    await asyncio.to_thread(stack.gateway.ledger.flush, 10)
    rows = await asyncio.to_thread(stack.rows)
    assert len(rows) == 22
    anthropic_rows = [r for r in rows if r["provider"] == "anthropic"]
    assert len(anthropic_rows) == 2


def test_feature_header_and_default(stack):
    client = stack.openai()
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG, extra_headers={"X-Loadbear-Feature": "summarize"})
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert sorted(r["feature"] for r in stack.rows()) == ["chat", "summarize"]


def test_auto_uses_tenant_default_chain(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url), tenant_settings={"default_model": "claude-3-5-haiku-latest"})
    out = s.openai().chat.completions.create(model="auto", messages=MSG)
    assert out.model == "claude-3-5-haiku-latest"
    row = s.rows()[0]
    assert row["requested_model"] == "auto" and row["route"] == "auto"
    assert "claude-3-5-haiku-latest" in row["route_reason"]


def test_models_lists_only_allowed(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url), tenant_settings={"allowed_models": ["gpt-4o-mini", "local"]})
    ids = [m.id for m in s.openai().models.list().data]
    assert ids == ["local", "gpt-4o-mini"] or sorted(ids) == ["gpt-4o-mini", "local"]


def test_local_model_is_offline_and_estimated(stack):
    out = stack.openai().chat.completions.create(model="local", messages=[{"role": "user", "content": "hi"}])
    assert "offline" in out.choices[0].message.content.lower()
    row = stack.rows()[0]
    assert row["provider"] == "local" and row["tokens_estimated"]
    assert row["prompt_tokens"] == out.usage.prompt_tokens > 0


def test_store_content_only_when_tenant_allows(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url), tenant_settings={"store_content": True})
    s.openai().chat.completions.create(model="gpt-4o-mini", messages=MSG)
    other_key = s.add_tenant("private")
    s.openai(other_key).chat.completions.create(model="gpt-4o-mini", messages=MSG)
    rows = {r["tenant_id"]: r for r in s.rows()}
    stored = [r for r in rows.values() if r["prompt_text"]]
    assert len(stored) == 1 and "refunds" in stored[0]["prompt_text"] and stored[0]["response_text"]
    assert sum(1 for r in rows.values() if r["prompt_text"] is None and r["response_text"] is None) == 1


def test_disconnect_mid_stream_cancels_upstream_and_records_cancelled(stack_factory):
    from loadbear.testing import UpstreamSimulator

    import time

    with UpstreamSimulator(tokens_per_second=10, reply_words=40, seed=2) as sim:
        s = stack_factory(sim_models(sim.url))
        got = 0
        with httpx.stream("POST", s.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {s.key}"},
                          json={"model": "gpt-4o-mini", "messages": MSG, "stream": True}, timeout=10) as r:
            for line in r.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    got += 1
                    if got == 3:
                        break  # closing the response drops the connection
        deadline = time.monotonic() + 5
        rows = []
        while time.monotonic() < deadline:
            rows = s.rows()
            if rows:
                break
            time.sleep(0.05)
        assert len(rows) == 1
        row = rows[0]
        assert row["status"] == "cancelled"
        assert 3 <= row["completion_tokens"] < 40 + 5, "tokens produced so far, not the whole answer"
        assert row["tokens_estimated"]
        attempts = s.attempts(row["id"])
        assert [a["status"] for a in attempts] == ["cancelled"]
        # the upstream call ended early: the simulator saw the connection close long before 4 s
        # (it notices at its next write, which may come just after the row is written)
        rec = sim.requests[0]
        while rec.ended is None and time.monotonic() - rec.started < 3.0:
            time.sleep(0.02)
        assert rec.ended is not None and rec.ended - rec.started < 3.0
