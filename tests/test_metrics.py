"""GET /metrics: it moves as requests go through a real server (openai SDK → loadbear → the upstream
simulator), it agrees with the ledger, it caps label cardinality, and it is guarded."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

import httpx
import openai
import pytest

from conftest import sim_models
from loadbear.config.settings import Settings
from loadbear.gateway.breaker import BreakerRegistry
from loadbear.gateway.executor import RetryPolicy
from loadbear.ledger.records import AttemptRecord, InteractionRecord
from loadbear.observability import Metrics, Observability
from loadbear.testing import Fault

MESSAGES = [{"role": "user", "content": "What is a gateway?"}]
FAST = {"connect": 1.0, "first_token": 0.4, "idle": 0.4, "total": 5.0}
FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05)
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """The samples of a Prometheus text exposition, keyed by (name, labels)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, f"not an exposition line: {line!r}"
        name, labels, value = m.groups()
        out[(name, frozenset(_LABEL.findall(labels or "")))] = float(value.replace("+Inf", "inf"))
    return out


def scrape(stack, key: str | None = None) -> dict:
    r = httpx.get(stack.url + "/metrics", headers={"Authorization": f"Bearer {key or stack.admin_key}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_until(stack, check, timeout: float = 5.0) -> dict:
    """HTTP counters move when the response has been sent, a moment after the client has it."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(stack)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def test_metrics_move_with_requests_and_agree_with_the_ledger(stack_factory, simulator, db_url):
    stack = stack_factory(sim_models(simulator.url), db_url=db_url)
    before = scrape(stack)
    assert value(before, "loadbear_requests_total", tenant="acme", model="gpt-4o-mini", feature="chat", status="ok") == 0
    client = stack.openai()
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                                 extra_headers={"X-Loadbear-Feature": "search"}))
    assert chunks
    with pytest.raises(openai.AuthenticationError):
        stack.openai(key="lb_wrong_key").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    s = scrape_until(stack, lambda s: value(s, "loadbear_http_responses_total", method="POST",
                                            route="/v1/chat/completions", status="200") >= 3)
    rows = stack.rows()
    assert len(rows) == 3
    chat = dict(tenant="acme", model="gpt-4o-mini", feature="chat")
    search = dict(tenant="acme", model="gpt-4o-mini", feature="search")
    assert value(s, "loadbear_requests_total", **chat, status="ok") == 2
    assert value(s, "loadbear_requests_total", **search, status="ok") == 1
    # The same numbers as the ledger rows, by construction.
    for labels, feature in ((chat, "chat"), (search, "search")):
        mine = [r for r in rows if r["feature"] == feature]
        assert value(s, "loadbear_input_tokens_total", **labels) == sum(r["prompt_tokens"] for r in mine) > 0
        assert value(s, "loadbear_output_tokens_total", **labels) == sum(r["completion_tokens"] for r in mine) > 0
        cost = sum(int(r["cost_micro_usd"]) for r in mine) / 1_000_000
        assert value(s, "loadbear_cost_usd_total", **labels) == pytest.approx(cost) and cost > 0
    assert value(s, "loadbear_request_duration_seconds_count", **chat) == 2
    assert value(s, "loadbear_request_duration_seconds_bucket", **chat, le="+Inf") == 2
    assert value(s, "loadbear_request_duration_seconds_sum", **chat) == pytest.approx(
        sum(r["latency_ms"] for r in rows if r["feature"] == "chat") / 1000)
    # Time to first token is for streamed answers only.
    assert value(s, "loadbear_time_to_first_token_seconds_count", **search) == 1
    assert value(s, "loadbear_time_to_first_token_seconds_count", **chat) == 0
    assert value(s, "loadbear_upstream_attempts_total", provider="openai", model="gpt-4o-mini", outcome="ok") == 3
    assert value(s, "loadbear_upstream_duration_seconds_count", provider="openai", model="gpt-4o-mini") == 3
    # What the ledger never sees: the refused key.
    assert value(s, "loadbear_http_responses_total", method="POST", route="/v1/chat/completions", status="401") == 1
    assert value(s, "loadbear_breaker_state", provider="openai", model="gpt-4o-mini", state="closed") == 1
    assert value(s, "loadbear_breaker_state", provider="openai", model="gpt-4o-mini", state="open") == 0
    assert ("loadbear_ledger_pending_rows", frozenset()) in s


def test_fallback_degraded_error_and_breaker_gauge(stack_factory, simulator):
    models = sim_models(simulator.url, **{m: {"timeouts": dict(FAST)} for m in ("gpt-4o-mini", "gpt-4o",
                                                                              "claude-3-5-haiku-latest")})
    stack = stack_factory(models, retry_policy=FAST_RETRY, breakers=BreakerRegistry(2, 60.0),
                          tenant_settings={"fallback_overrides": {"gpt-4o-mini": ["claude-3-5-haiku-latest"],
                                                                  "claude-3-5-haiku-latest": []}})
    client = stack.openai()
    # Both tries of the primary fail: the answer comes from the fallback, and the primary's breaker opens.
    simulator.script([Fault("server_error"), Fault("server_error")], model="gpt-4o-mini")
    out = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert out.model == "claude-3-5-haiku-latest"
    s = scrape(stack)
    haiku = dict(tenant="acme", model="claude-3-5-haiku-latest", feature="chat")
    assert value(s, "loadbear_fallbacks_total", **haiku) == 1
    assert value(s, "loadbear_requests_total", **haiku, status="ok") == 1
    assert value(s, "loadbear_upstream_attempts_total", provider="openai", model="gpt-4o-mini", outcome="server_error") == 2
    assert value(s, "loadbear_breaker_state", provider="openai", model="gpt-4o-mini", state="open") == 1
    assert value(s, "loadbear_breaker_state", provider="openai", model="gpt-4o-mini", state="closed") == 0
    assert value(s, "loadbear_breaker_trips_total", provider="openai", model="gpt-4o-mini") == 1

    # Primary skipped (open breaker), the fallback fails too: an honest degraded answer.
    simulator.script([Fault("unavailable"), Fault("unavailable")], model="claude-3-5-haiku-latest")
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raw.headers["x-loadbear-degraded"] == "true"
    s = scrape(stack)
    assert value(s, "loadbear_degraded_total", tenant="acme", model="gpt-4o-mini", feature="chat") == 1
    assert value(s, "loadbear_requests_total", tenant="acme", model="gpt-4o-mini", feature="chat", status="degraded") == 1
    assert value(s, "loadbear_breaker_state", provider="anthropic", model="claude-3-5-haiku-latest", state="open") == 1

    # A client fault: an error, by type.
    simulator.script([Fault("context_length")], model="gpt-4o")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    s = scrape(stack)
    gpt4o = dict(tenant="acme", model="gpt-4o", feature="chat")
    assert value(s, "loadbear_errors_total", **gpt4o, error_type="context_length") == 1
    assert value(s, "loadbear_requests_total", **gpt4o, status="error") == 1
    assert value(s, "loadbear_fallbacks_total", **gpt4o) == 0
    # Every counted request is a ledger row.
    assert sum(v for (name, _), v in s.items() if name == "loadbear_requests_total") == len(stack.rows()) == 3


def test_label_cap_folds_extra_values_into_other(stack_factory, simulator):
    obs = Observability(Settings(metrics_label_cap=2))
    stack = stack_factory(sim_models(simulator.url), observability=obs)
    keys = {"acme": stack.key, "beta": stack.add_tenant("beta"), "gamma": stack.add_tenant("gamma")}
    for slug, key in keys.items():
        stack.openai(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    for feature in ("alpha", "omega"):
        stack.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                               extra_headers={"X-Loadbear-Feature": feature})
    s = scrape(stack)
    requests = {tuple(sorted(dict(labels).items())): v for (name, labels), v in s.items()
                if name == "loadbear_requests_total"}
    assert requests == {
        (("feature", "chat"), ("model", "gpt-4o-mini"), ("status", "ok"), ("tenant", "acme")): 1,
        (("feature", "chat"), ("model", "gpt-4o-mini"), ("status", "ok"), ("tenant", "beta")): 1,
        (("feature", "chat"), ("model", "gpt-4o-mini"), ("status", "ok"), ("tenant", "other")): 1,  # gamma
        (("feature", "alpha"), ("model", "gpt-4o-mini"), ("status", "ok"), ("tenant", "acme")): 1,
        (("feature", "other"), ("model", "gpt-4o-mini"), ("status", "ok"), ("tenant", "acme")): 1,  # omega
    }
    assert not any("gamma" in str(labels) or "omega" in str(labels) for _, labels in s)


def test_negative_label_cap_is_refused():
    with pytest.raises(ValueError, match="LOADBEAR_METRICS_LABEL_CAP must be 0 or more"):
        Observability(Settings.load(env={"LOADBEAR_METRICS_LABEL_CAP": "-1"}))
    # 0 is allowed: every tenant, model and feature is counted as "other".
    m = Metrics(label_cap=0)
    m.observe(_record())
    assert 'loadbear_requests_total{tenant="other",model="other",feature="other",status="ok"} 1' in m.render()


def test_cache_hits_by_kind(stack_factory, simulator):
    stack = stack_factory(sim_models(simulator.url), tenant_settings={"cache_enabled": True})
    client = stack.openai()
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert stack.gateway.cache.flush(30)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    s = scrape(stack)
    labels = dict(tenant="acme", model="gpt-4o-mini", feature="chat")
    assert value(s, "loadbear_cache_hits_total", **labels, kind="exact") == 1
    assert value(s, "loadbear_requests_total", **labels, status="ok") == 2
    rows = stack.rows()
    saved = sum(int(r["saved_micro_usd"]) for r in rows if r["cached"]) / 1e6
    assert value(s, "loadbear_saved_usd_total", **labels, source="cache") == pytest.approx(saved) and saved > 0
    # An explicit model is not routed: nothing is counted as routing savings.
    assert not any(name == "loadbear_saved_usd_total" and dict(lb).get("source") == "routing" for name, lb in s)
    # The hit made no upstream call.
    assert value(s, "loadbear_upstream_attempts_total", provider="openai", model="gpt-4o-mini", outcome="ok") == 1


def test_metrics_endpoint_auth(stack_factory, simulator):
    stack = stack_factory(sim_models(simulator.url))
    url = stack.url + "/metrics"

    def get(token: str | None = None) -> httpx.Response:
        return httpx.get(url, headers={"Authorization": f"Bearer {token}"} if token else {})

    r = get()
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = get("not-the-key")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = get(stack.key)  # a tenant key: metrics show every tenant
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    assert get(stack.admin_key).status_code == 200
    # A scrape-only token, so Prometheus never holds the admin key.
    stack.gateway.settings.metrics_key = "scrape-token"
    assert get("scrape-token").status_code == 200
    assert get("scrape-token-2").status_code == 401
    # Nothing configured: disabled, and it says what to set.
    stack.gateway.settings.metrics_key = None
    stack.gateway.settings.admin_key = None
    r = get("anything")
    assert r.status_code == 403 and r.json()["error"]["code"] == "metrics_disabled"
    assert "LOADBEAR_METRICS_KEY" in r.json()["error"]["message"]
    # Open on a private network, by choice.
    stack.gateway.settings.metrics_public = True
    assert get().status_code == 200
    # Not part of the OpenAI-compatible API or its schema.
    assert "/metrics" not in httpx.get(stack.url + "/openapi.json").json()["paths"]


# -- units: the exposition and the per-request cost -----------------------------------------


def _record(i: int = 0, **kw) -> InteractionRecord:
    now = datetime.now(timezone.utc)
    base = dict(id=f"i{i}", tenant_id="t-1", tenant_slug="acme", feature="chat", requested_model="m", model="m",
                status="ok", created_at=now, latency_ms=120, prompt_tokens=40, completion_tokens=12,
                cost_micro_usd=13, provider="openai", finish_reason="stop",
                attempts=[AttemptRecord(1, "openai", "m", "m", "ok", now, 110, prompt_tokens=40,
                                        completion_tokens=12, cost_micro_usd=13)])
    base.update(kw)
    return InteractionRecord(**base)


def test_exposition_histogram_buckets_escaping_and_eval_traffic():
    m = Metrics()
    m.observe(_record(latency_ms=50))  # exactly on a bound: counted in that bucket ("le")
    m.observe(_record(latency_ms=300_000))  # past the last bound: only +Inf
    m.observe(_record(feature='we"ird\\name\n'))
    m.observe(_record(metadata={"eval_run": "r1"}))  # not product traffic
    m.observe(_record(cached=True, cache_kind="semantic", attempts=[], cost_micro_usd=0, saved_micro_usd=500))
    m.observe(_record(latency_ms=50, saved_micro_usd=250))  # routed to a cheaper tier
    s = parse(m.render())
    chat = dict(tenant="acme", model="m", feature="chat")
    assert value(s, "loadbear_request_duration_seconds_bucket", **chat, le="0.025") == 0
    assert value(s, "loadbear_request_duration_seconds_bucket", **chat, le="0.05") == 2
    assert value(s, "loadbear_request_duration_seconds_bucket", **chat, le="120.0") == 3  # and the cached one
    assert value(s, "loadbear_request_duration_seconds_bucket", **chat, le="+Inf") == 4
    assert value(s, "loadbear_request_duration_seconds_sum", **chat) == pytest.approx(300.05 + 0.12 + 0.05)
    assert value(s, "loadbear_requests_total", **chat, status="ok") == 4
    assert value(s, "loadbear_cache_hits_total", **chat, kind="semantic") == 1
    assert value(s, "loadbear_saved_usd_total", **chat, source="cache") == pytest.approx(0.0005)
    assert value(s, "loadbear_saved_usd_total", **chat, source="routing") == pytest.approx(0.00025)
    assert value(s, "loadbear_requests_total", tenant="acme", model="m", feature='we\\"ird\\\\name\\n', status="ok") == 1
    # Evaluation calls are not counted as product requests, but their upstream calls are real.
    assert value(s, "loadbear_upstream_attempts_total", provider="openai", model="m", outcome="ok") == 5


def test_observe_cpu_cost():
    """The per-request metrics update must stay a few microseconds (the request's whole budget is 1 ms)."""
    obs = Observability(Settings())
    recs = [_record(i, streamed=bool(i % 2), ttft_ms=40) for i in range(1000)]
    for r in recs:
        obs.record(r)
    t = time.thread_time()
    for _ in range(10):
        for r in recs:
            obs.record(r)
    per_record_us = (time.thread_time() - t) / 10_000 * 1e6
    assert obs.tracing is None
    assert per_record_us < 25, per_record_us  # ~2 µs on the development machine


def test_a_record_that_cannot_be_counted_never_fails_the_request(caplog):
    obs = Observability(Settings())
    rec = _record()
    rec.status = "exploded"  # past the record's own validation: metrics cannot place it
    with caplog.at_level("ERROR", logger="loadbear.chat"):
        obs.record(rec)  # no exception reaches the caller
    assert "could not record interaction i0" in caplog.text
    assert "loadbear_requests_total{" not in obs.metrics.render()
