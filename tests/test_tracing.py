"""OpenTelemetry spans (GenAI semantic conventions), checked with the SDK's in-memory exporter on
requests made with the openai SDK through a real server in front of the upstream simulator."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conftest import sim_models
from loadbear.config.settings import Settings
from loadbear.gateway.executor import RetryPolicy
from loadbear.observability import Observability
from loadbear.testing import Fault

MESSAGES = [{"role": "user", "content": "What is a gateway?"}]
FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05)


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def traced_stack(stack_factory, simulator, spans, models=None, **kw):
    provider, _ = spans
    return stack_factory(models or sim_models(simulator.url), observability=Observability(Settings(), provider), **kw)


def by_kind(exporter) -> tuple[ReadableSpan, list[ReadableSpan], list[ReadableSpan]]:
    """(the request span, its attempt spans in order, its other children)."""
    finished = exporter.get_finished_spans()
    roots = [s for s in finished if s.kind == SpanKind.SERVER]
    assert len(roots) == 1, [s.name for s in finished]
    root = roots[0]
    children = [s for s in finished if s is not root]
    for c in children:
        assert c.parent is not None and c.parent.span_id == root.context.span_id
        assert c.context.trace_id == root.context.trace_id
        assert root.start_time <= c.start_time <= c.end_time <= root.end_time
    attempts = sorted((c for c in children if c.kind == SpanKind.CLIENT), key=lambda s: s.attributes["loadbear.attempt_no"])
    return root, attempts, [c for c in children if c.kind != SpanKind.CLIENT]


def test_request_span_and_attempt_span(stack_factory, simulator, spans):
    stack = traced_stack(stack_factory, simulator, spans)
    raw = stack.openai().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Loadbear-Feature": "support"})
    out = raw.parse()
    row = stack.rows()[0]
    root, attempts, others = by_kind(spans[1])
    assert root.name == "chat gpt-4o-mini" and others == []
    a = root.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.model"] == "gpt-4o-mini"
    assert a["gen_ai.usage.input_tokens"] == row["prompt_tokens"] == out.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == row["completion_tokens"] == out.usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.response.id"] == a["loadbear.interaction_id"] == out.id == str(row["id"])
    assert a["loadbear.tenant"] == "acme" and a["loadbear.tenant_id"] == stack.tenant.id
    assert a["loadbear.feature"] == "support"
    assert a["loadbear.request_id"] == raw.headers["x-request-id"]
    assert a["loadbear.cached"] is False and a["loadbear.degraded"] is False
    assert a["loadbear.cost_usd"] == pytest.approx(int(row["cost_micro_usd"]) / 1e6) and a["loadbear.cost_usd"] > 0
    assert "error.type" not in a and root.status.status_code == StatusCode.UNSET
    [att] = attempts
    b = att.attributes
    assert att.name == "chat gpt-4o-mini"
    assert (b["gen_ai.operation.name"], b["gen_ai.provider.name"], b["gen_ai.request.model"]) == (
        "chat", "openai", "gpt-4o-mini")
    assert b["gen_ai.usage.input_tokens"] == row["prompt_tokens"] and b["loadbear.attempt_status"] == "ok"
    assert "error.type" not in b


def test_streamed_request_is_one_span_with_usage_and_first_token(stack_factory, simulator, spans):
    stack = traced_stack(stack_factory, simulator, spans)
    chunks = list(stack.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                                         stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    row = stack.rows()[0]
    root, [att], others = by_kind(spans[1])
    assert others == []
    a = root.attributes
    assert a["loadbear.streamed"] is True and a["loadbear.interaction_id"] == chunks[0].id == str(row["id"])
    assert a["gen_ai.usage.input_tokens"] == row["prompt_tokens"] == usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == row["completion_tokens"] == usage.completion_tokens
    assert a["loadbear.ttft_ms"] == row["ttft_ms"] is not None
    assert att.attributes["loadbear.ttft_ms"] is not None and att.attributes["loadbear.attempt_status"] == "ok"


def test_failover_gives_one_attempt_span_per_upstream_call(stack_factory, simulator, spans):
    models = sim_models(simulator.url, **{"gpt-4o-mini": {"max_retries": 0}})
    stack = traced_stack(stack_factory, simulator, spans, models=models, retry_policy=FAST_RETRY)
    simulator.script([Fault("server_error")], model="gpt-4o-mini")
    out = stack.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert out.model == "claude-3-5-haiku-latest"
    root, attempts, _ = by_kind(spans[1])
    assert [s.attributes["loadbear.model"] for s in attempts] == ["gpt-4o-mini", "claude-3-5-haiku-latest"]
    failed, served = attempts
    assert failed.attributes["error.type"] == "server_error"
    assert failed.attributes["http.response.status_code"] == 500
    assert failed.status.status_code == StatusCode.ERROR
    assert served.attributes["gen_ai.provider.name"] == "anthropic" and "error.type" not in served.attributes
    assert failed.end_time <= served.start_time
    assert root.attributes["gen_ai.provider.name"] == "anthropic"
    assert root.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert root.attributes["gen_ai.response.model"] == "claude-3-5-haiku-latest"
    assert root.attributes["loadbear.attempts"] == 2 and "error.type" not in root.attributes


def test_error_type_on_failure_and_degraded(stack_factory, simulator, spans):
    stack = traced_stack(stack_factory, simulator, spans, retry_policy=FAST_RETRY,
                         tenant_settings={"fallback_overrides": {"gpt-4o-mini": ["claude-3-5-haiku-latest"],
                                                                 "claude-3-5-haiku-latest": []}})
    simulator.script([Fault("context_length")], model="gpt-4o-mini")
    with pytest.raises(openai.BadRequestError):
        stack.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    root, [att], _ = by_kind(spans[1])
    assert root.attributes["error.type"] == "context_length"
    assert root.status.status_code == StatusCode.ERROR
    assert root.attributes["loadbear.status"] == "error" and "gen_ai.response.model" not in root.attributes
    assert att.attributes["error.type"] == "context_length" and att.attributes["http.response.status_code"] == 400

    spans[1].clear()
    simulator.script([Fault("server_error")] * 2, model="gpt-4o-mini")
    simulator.script([Fault("unavailable")] * 2, model="claude-3-5-haiku-latest")
    stack.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    root, attempts, _ = by_kind(spans[1])
    assert root.attributes["loadbear.degraded"] is True and root.attributes["loadbear.status"] == "degraded"
    assert root.attributes["error.type"] == "server_error"  # the last upstream failure
    assert len(attempts) == 4 and all(s.status.status_code == StatusCode.ERROR for s in attempts)


def test_grounded_request_has_a_retrieval_span(stack_factory, simulator, spans):
    stack = traced_stack(stack_factory, simulator, spans)
    r = httpx.post(stack.url + "/v1/documents", headers={"Authorization": f"Bearer {stack.key}"}, timeout=60, json={
        "title": "Refund policy", "text": "# Refund policy\n\nRefunds are available within 14 days of purchase.\n",
        "content_type": "text/markdown"})
    assert r.status_code in (200, 201), r.text
    out = stack.openai().chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Within how many days are refunds available?"}],
        extra_body={"knowledge": {"top_k": 3}})
    cites = out.model_extra["loadbear"]["citations"]
    root, [att], [retrieval] = by_kind(spans[1])
    assert retrieval.name == "retrieval knowledge" and retrieval.kind == SpanKind.INTERNAL
    assert retrieval.attributes["gen_ai.operation.name"] == "retrieval"
    assert retrieval.attributes["loadbear.retrieval.chunks"] == len(cites) >= 1
    assert retrieval.end_time <= att.start_time  # sources are retrieved before the model is called
    assert att.attributes["gen_ai.provider.name"] == "local"


def test_cache_hit_has_a_cache_span(stack_factory, simulator, spans):
    stack = traced_stack(stack_factory, simulator, spans, tenant_settings={"cache_enabled": True})
    client = stack.openai()
    first = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    # The first request looked the cache up too, and missed before calling the model.
    root, [att], [miss] = by_kind(spans[1])
    assert miss.name == "loadbear.cache.lookup" and miss.attributes["loadbear.cache.hit"] is False
    assert miss.end_time <= att.start_time and root.attributes["loadbear.cached"] is False
    assert stack.gateway.cache.flush(30)
    spans[1].clear()
    again = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert again.choices[0].message.content == first.choices[0].message.content
    root, attempts, [lookup] = by_kind(spans[1])
    assert attempts == []  # a hit makes no upstream call
    assert root.attributes["loadbear.cached"] is True and root.attributes["loadbear.cache_kind"] == "exact"
    assert lookup.name == "loadbear.cache.lookup" and lookup.attributes["loadbear.cache.hit"] is True


def test_request_span_joins_the_callers_trace(stack_factory, simulator, spans):
    stack = traced_stack(stack_factory, simulator, spans)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    stack.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                           extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    root, _, _ = by_kind(spans[1])
    assert format(root.context.trace_id, "032x") == trace_id
    assert format(root.parent.span_id, "016x") == parent_id
    spans[1].clear()
    # Without the header, a new trace.
    stack.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    root, _, _ = by_kind(spans[1])
    assert format(root.context.trace_id, "032x") != trace_id and root.parent is None


def test_exporter_off_runs_no_opentelemetry_code(tmp_path, simulator):
    """With LOADBEAR_OTEL_EXPORTER=none (the default) no tracer exists: not one OpenTelemetry
    function runs while a request is served, so no span object can be created."""
    import asyncio
    import sys

    from loadbear import Gateway, parse_chat_body
    from loadbear.config.catalog import Catalog

    models = sim_models(simulator.url)
    gw = Gateway(Settings(database_url=f"sqlite:///{tmp_path / 'gw.db'}", models=models),
                 catalog=Catalog.from_settings(models, env={}))
    gw.migrate()
    gw.tenants.create_tenant("acme", "Acme", {})
    _, key = gw.tenants.create_key("acme", "test")
    auth = gw.authenticate(key)
    assert gw.observability.tracing is None
    body = parse_chat_body(json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode())
    otel_calls: list[str] = []

    def profile(frame, event, arg):
        if event == "call" and "opentelemetry" in frame.f_code.co_filename:
            otel_calls.append(frame.f_code.co_name)

    async def one():
        await gw.chat(auth, body)  # warm: first-use imports and connections
        sys.setprofile(profile)
        try:
            result = await gw.chat(auth, body)
        finally:
            sys.setprofile(None)
        await gw.providers.aclose()
        return result

    result = asyncio.run(one())
    assert result.body["choices"][0]["message"]["content"]
    assert otel_calls == []
    # The probe itself works: with a tracer, the same request does run OpenTelemetry code.
    provider = TracerProvider()
    gw.observability = Observability(Settings(), provider)
    asyncio.run(one())
    assert otel_calls
    provider.shutdown()
    gw.close()


def test_exporter_settings():
    with pytest.raises(ValueError, match="LOADBEAR_OTEL_EXPORTER must be one of none, console, otlp"):
        Observability(Settings(otel_exporter="jaeger"))
    assert Settings.load(env={"LOADBEAR_OTEL_EXPORTER": "console"}).otel_exporter == "console"
    obs = Observability(Settings(otel_exporter="console"))
    assert obs.tracing is not None and obs.tracing.owned
    obs.close()
    try:
        import opentelemetry.exporter.otlp.proto.http  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"loadbear\[otel\]"):
            Observability(Settings(otel_exporter="otlp"))
    else:  # the extra is installed: a batching provider, nothing sent until spans exist
        obs = Observability(Settings(otel_exporter="otlp"))
        assert obs.tracing is not None and obs.tracing.owned
        obs.close()


def test_console_exporter_prints_the_span(tmp_path):
    """LOADBEAR_OTEL_EXPORTER=console, end to end in a fresh process: the span is printed as JSON."""
    import os
    import subprocess
    import sys

    code = (
        "from datetime import datetime, timezone\n"
        "from loadbear import Settings\n"
        "from loadbear.ledger.records import InteractionRecord\n"
        "from loadbear.observability import Observability\n"
        "obs = Observability(Settings.load())\n"
        "obs.record(InteractionRecord(id='i-1', tenant_id='t-1', tenant_slug='acme', feature='chat',\n"
        "    requested_model='m', model='m', status='ok', created_at=datetime.now(timezone.utc), latency_ms=5))\n"
        "obs.close()\n"
    )
    env = {**os.environ, "LOADBEAR_OTEL_EXPORTER": "console"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    span = json.loads(out.stdout[out.stdout.index("{"):])
    assert span["name"] == "chat m" and span["kind"] == "SpanKind.SERVER"
    assert span["attributes"]["loadbear.interaction_id"] == "i-1"
    assert span["attributes"]["gen_ai.operation.name"] == "chat"
    assert span["resource"]["attributes"]["service.name"] == "loadbear"
