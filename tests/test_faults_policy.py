"""Retry policy, deadlines and breakers end to end: Retry-After honoured (measured between the
two upstream calls the simulator saw) but never past the deadline, a total deadline that bounds
every request, breakers that skip a model without calling it — in one process and shared by two
gateways through Redis — and the operator's view (``GET /admin/providers``, ``loadbear providers``).
"""

from __future__ import annotations

import json
import random
import time
import uuid

import httpx
import pytest
from typer.testing import CliRunner

from loadbear.gateway.breaker import BreakerRegistry, RedisBreakerStore
from loadbear.gateway.executor import RetryPolicy
from loadbear.testing import Fault
from conftest import REDIS_URL, needs_redis
from test_breaker import redis_prefix  # noqa: F401  (fixture)
from test_faults import (
    DEGRADED_TEXT,
    FAST,
    HAIKU_REPLY,
    MINI_REPLY,
    NO_LOCAL,
    assert_ledger_matches,
    chat,
    fault,
    fault_models,
    fstack,  # noqa: F401  (fixtures)
    shared_simulator,  # noqa: F401
    shared_stack,  # noqa: F401
    simulator,  # noqa: F401
    interaction,
    make_stack,
    meta,
    upstream_calls,
)
from test_faults_stream import raw_stream


def gap(calls, i: int = 0) -> float:
    """Seconds between the end of upstream call i and the start of call i+1."""
    return calls[i + 1].started - calls[i].ended


# -- Retry-After and backoff -------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_retry_after_is_honoured(fstack, simulator, stream):
    simulator.script([Fault("rate_limit", retry_after=0.4)], model="gpt-4o-mini")
    if stream:
        sse = raw_stream(fstack)
        assert sse.done and sse.content == MINI_REPLY
    else:
        assert chat(fstack).parse().choices[0].message.content == MINI_REPLY
    calls = upstream_calls(simulator)
    assert [c.status for c in calls] == [429, 200]
    assert 0.4 <= gap(calls) < 0.4 + 0.3  # waited what upstream asked, not the 10-50 ms backoff
    row = interaction(fstack)
    assert [a["error_type"] for a in fstack.attempts(row["id"])] == ["rate_limited", None]


def test_retry_after_beyond_the_deadline_fails_over_at_once(stack_factory, simulator):
    stack = make_stack(stack_factory, simulator, request_deadline=2.0)
    simulator.script([Fault("rate_limit", retry_after=5)], model="gpt-4o-mini")
    started = time.monotonic()
    out = chat(stack).parse()
    assert time.monotonic() - started < 1.0  # did not sleep 5 s, nor up to the deadline
    assert out.model == "claude-3-5-haiku-latest" and out.choices[0].message.content == HAIKU_REPLY
    assert [c.model for c in upstream_calls(simulator)] == ["gpt-4o-mini", "claude-3-5-haiku-latest"]
    assert_ledger_matches(stack, simulator)


def test_retry_after_above_the_policy_cap_fails_over(stack_factory, simulator):
    stack = make_stack(stack_factory, simulator, request_deadline=30.0,
                       retry_policy=RetryPolicy(base_delay=0.01, max_delay=0.05, max_retry_after=1.0))
    simulator.script([Fault("rate_limit", retry_after=3)], model="gpt-4o-mini")
    started = time.monotonic()
    assert chat(stack).parse().model == "claude-3-5-haiku-latest"
    assert time.monotonic() - started < 1.0


def test_backoff_is_jittered_exponential_and_capped():
    policy = RetryPolicy(base_delay=0.1, max_delay=1.0)
    rng = random.Random(1)
    for attempt in range(8):
        cap = min(1.0, 0.1 * 2 ** attempt)
        samples = [policy.delay(attempt, None, rng) for _ in range(300)]
        assert all(0 <= s <= cap for s in samples)
        assert max(samples) > cap * 0.9 and min(samples) < cap * 0.1  # full jitter, not fixed
    assert policy.delay(0, 2.5, rng) == 2.5  # Retry-After is a floor


def test_backoff_between_retries_grows(stack_factory, simulator):
    models = fault_models(simulator, **{"gpt-4o-mini": {"max_retries": 3}})
    stack = make_stack(stack_factory, simulator, models=models,
                       retry_policy=RetryPolicy(base_delay=0.1, max_delay=0.4))
    stack.gateway.executor.rng = random.Random(0)
    stack.gateway.executor.policy.delay = lambda n, ra, rng: max(min(0.4, 0.1 * 2 ** n), ra or 0)  # no jitter
    simulator.script([fault("server_error")] * 3, model="gpt-4o-mini")
    assert chat(stack).parse().choices[0].message.content == MINI_REPLY
    calls = upstream_calls(simulator)
    gaps = [gap(calls, i) for i in range(3)]
    for got, want in zip(gaps, (0.1, 0.2, 0.4)):
        assert want <= got < want + 0.15


# -- the total deadline -------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_total_deadline_bounds_the_whole_request(stack_factory, simulator, stream):
    """Every model stalls; many retries are allowed: the deadline still ends it, degraded."""
    models = fault_models(simulator, **{"gpt-4o-mini": {"max_retries": 10}})
    stack = make_stack(stack_factory, simulator, models=models, request_deadline=1.0,
                       tenant={"fallback_overrides": NO_LOCAL})
    simulator.script([fault("stall_first_token", stall_s=5)] * 20)
    started = time.monotonic()
    if stream:
        sse = raw_stream(stack)
        assert sse.done and sse.content == DEGRADED_TEXT
    else:
        assert chat(stack).parse().choices[0].message.content == DEGRADED_TEXT
    elapsed = time.monotonic() - started
    assert elapsed < 1.0 + 0.25
    row = interaction(stack)
    assert row["status"] == "degraded" and row["latency_ms"] <= 1100
    kinds = {a["error_type"] for a in stack.attempts(row["id"])}
    assert kinds <= {"first_token_timeout", "timeout"}
    assert_ledger_matches(stack, simulator)


def test_deadline_from_settings(tmp_path):
    from loadbear import Gateway, Settings

    gw = Gateway(Settings.load(env={}, database_url=f"sqlite:///{tmp_path / 'g.db'}", request_deadline_s=7.5,
                               breaker_threshold=9, breaker_cooldown_s=4))
    try:
        assert gw.settings_request_deadline == 7.5
        assert (gw.breakers.threshold, gw.breakers.cooldown, gw.breakers.backend) == (9, 4.0, "database")
    finally:
        gw.close()


# -- breakers in the request path -----------------------------------------------------------------


def test_open_breaker_skips_the_model_without_calling_it(stack_factory, simulator):
    stack = make_stack(stack_factory, simulator, breakers=BreakerRegistry(threshold=2, cooldown=0.5))
    simulator.script([fault("server_error")] * 2, model="gpt-4o-mini")
    assert chat(stack).parse().model == "claude-3-5-haiku-latest"  # 2 failures: the breaker opens
    health = stack.gateway.breakers.snapshot("openai/gpt-4o-mini")
    assert (health["breaker"], health["trips"]) == ("open", 1)

    simulator.reset()
    from test_faults import set_replies

    set_replies(simulator)
    started = time.monotonic()
    out = chat(stack).parse()
    assert out.model == "claude-3-5-haiku-latest"
    assert time.monotonic() - started < 0.5
    assert [c.model for c in upstream_calls(simulator)] == ["claude-3-5-haiku-latest"]  # no call to mini
    rows = stack.rows()
    assert meta(rows[-1])["skipped"] == ["gpt-4o-mini"]
    assert rows[-1]["attempt_count"] == 1

    time.sleep(0.5)  # cooldown: half-open, one probe
    simulator.reset()
    set_replies(simulator)
    assert chat(stack).parse().model == "gpt-4o-mini"  # the probe succeeded
    assert stack.gateway.breakers.state("openai/gpt-4o-mini") == "closed"


def test_failed_probe_reopens_and_is_not_retried(stack_factory, simulator):
    stack = make_stack(stack_factory, simulator, breakers=BreakerRegistry(threshold=2, cooldown=0.3))
    simulator.script([fault("server_error")] * 3, model="gpt-4o-mini")
    chat(stack)
    time.sleep(0.3)
    out = chat(stack).parse()
    assert out.model == "claude-3-5-haiku-latest"
    row = stack.rows()[-1]
    # One probe, then straight to the next model: no retry against an open breaker.
    assert [(a["model"], a["status"]) for a in stack.attempts(row["id"])] == [
        ("gpt-4o-mini", "error"), ("claude-3-5-haiku-latest", "ok")]
    assert stack.gateway.breakers.state("openai/gpt-4o-mini") == "open"
    assert stack.gateway.breakers.snapshot("openai/gpt-4o-mini")["trips"] == 2
    assert_ledger_matches(stack, simulator)


def test_every_breaker_open_gives_a_degraded_answer_at_once(stack_factory, simulator):
    stack = make_stack(stack_factory, simulator, breakers=BreakerRegistry(threshold=1, cooldown=30),
                       tenant={"fallback_overrides": NO_LOCAL})
    simulator.script([fault("server_error")] * 2)
    assert chat(stack).headers["x-loadbear-degraded"] == "true"
    before = len(upstream_calls(simulator))
    raw = chat(stack)
    assert raw.headers["x-loadbear-degraded"] == "true"
    assert raw.parse().choices[0].message.content == DEGRADED_TEXT
    assert len(upstream_calls(simulator)) == before  # nothing was called
    row = stack.rows()[-1]
    assert (row["status"], row["attempt_count"], row["error_type"]) == ("degraded", 0, "all_models_unavailable")
    assert meta(row)["skipped"] == ["gpt-4o-mini", "claude-3-5-haiku-latest"]


@needs_redis
def test_two_gateways_share_breakers_through_redis(stack_factory, simulator, redis_prefix):
    """Two replicas (two Gateways, two servers) with one Redis: failures seen by one open the
    breaker for both."""
    def registry():
        return BreakerRegistry(2, 30, store=RedisBreakerStore(REDIS_URL, 2, 30, prefix=redis_prefix))

    a = make_stack(stack_factory, simulator, breakers=registry())
    b = make_stack(stack_factory, simulator, breakers=registry())
    simulator.script([fault("server_error")] * 2, model="gpt-4o-mini")
    assert chat(a).parse().model == "claude-3-5-haiku-latest"
    assert b.gateway.breakers.state("openai/gpt-4o-mini") == "open"
    n = len(upstream_calls(simulator))
    assert chat(b).parse().model == "claude-3-5-haiku-latest"
    assert [c.model for c in upstream_calls(simulator)[n:]] == ["claude-3-5-haiku-latest"]
    assert meta(b.rows()[-1])["skipped"] == ["gpt-4o-mini"]
    health = httpx.get(b.url + "/admin/providers", headers={"Authorization": f"Bearer {b.admin_key}"}).json()
    mini = next(m for m in health["data"] if m["model"] == "gpt-4o-mini")
    assert (mini["breaker"], mini["breaker_store"], mini["trips"]) == ("open", "redis", 1)
    assert mini["error_rate"] == 1.0 and mini["calls"] == 2


@needs_redis
def test_redis_url_setting_shares_breakers(stack_factory, simulator, redis_prefix, tmp_path):
    from loadbear import Gateway, Settings

    def gateway(i):
        s = Settings.load(env={}, database_url=f"sqlite:///{tmp_path / f'g{i}.db'}", redis_url=REDIS_URL,
                          breaker_key_prefix=redis_prefix, breaker_threshold=1)
        return Gateway(s)

    g1, g2 = gateway(1), gateway(2)
    try:
        import asyncio

        asyncio.run(g1.breakers.record("openai/gpt-4o-mini", False, 10))
        assert g2.breakers.state("openai/gpt-4o-mini") == "open"
        asyncio.run(g2.breakers.aclose())
        asyncio.run(g1.breakers.aclose())
    finally:
        g1.close()
        g2.close()


# -- the operator's view --------------------------------------------------------------------------


def test_admin_providers_shows_breaker_error_rate_and_latency(fstack, simulator):
    simulator.script([fault("server_error"), None, None], model="gpt-4o-mini")
    chat(fstack)
    chat(fstack)
    r = httpx.get(fstack.url + "/admin/providers", headers={"Authorization": f"Bearer {fstack.admin_key}"})
    assert r.status_code == 200
    by_model = {m["model"]: m for m in r.json()["data"]}
    assert set(by_model) == {"gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-latest", "local"}
    mini = by_model["gpt-4o-mini"]
    assert (mini["breaker"], mini["calls"], mini["error_rate"], mini["trips"]) == ("closed", 3, round(1 / 3, 4), 0)
    assert mini["p50_latency_ms"] is not None and mini["p95_latency_ms"] >= mini["p50_latency_ms"]
    assert mini["fallbacks"] == ["claude-3-5-haiku-latest", "local"]
    assert mini["timeouts"]["first_token"] == FAST["first_token"]
    assert by_model["gpt-4o"]["calls"] == 0 and by_model["gpt-4o"]["error_rate"] is None
    assert httpx.get(fstack.url + "/admin/providers").status_code == 401


def test_cli_providers_against_a_running_server(fstack, simulator):
    from loadbear.cli import app

    simulator.script([fault("server_error")], model="gpt-4o-mini")
    chat(fstack)
    runner = CliRunner()
    res = runner.invoke(app, ["providers", "--url", fstack.url, "--admin-key", fstack.admin_key, "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["model"]: r for r in json.loads(res.output)}
    assert rows["gpt-4o-mini"]["calls"] == 2 and rows["gpt-4o-mini"]["error_rate"] == 0.5
    res = runner.invoke(app, ["providers", "--url", fstack.url, "--admin-key", fstack.admin_key])
    assert res.exit_code == 0 and "gpt-4o-mini" in res.output and "closed" in res.output
    res = runner.invoke(app, ["providers", "--url", fstack.url, "--admin-key", "wrong"])
    assert res.exit_code == 1 and "401" in res.output


def test_cli_providers_from_local_config(tmp_path, monkeypatch):
    from loadbear.cli import app

    cfg = tmp_path / "loadbear.toml"
    cfg.write_text('[models.fast]\nprovider = "openai"\nbase_url = "http://127.0.0.1:9/v1"\nfallbacks = ["local"]\n')
    monkeypatch.setenv("LOADBEAR_CONFIG", str(cfg))
    monkeypatch.delenv("LOADBEAR_REDIS_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    res = CliRunner().invoke(app, ["providers", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["model"]: r for r in json.loads(res.output)}
    assert rows["fast"]["fallbacks"] == ["local"] and rows["fast"]["breaker"] == "closed"
    assert set(rows) == {"fast", "local"}
