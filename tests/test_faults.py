"""Fault injection, non-streaming: every fault kind of the upstream simulator, retried on the
same model, failed over to the next one, or stopped at once (client faults) — asserting what
the client gets (through the official openai SDK) and what the ledger says (one attempt row
per upstream call, matching ``sim.requests``).

The shared helpers live here; ``test_faults_stream.py`` and ``test_faults_policy.py`` import them.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from conftest import Stack, sim_models
from loadbear.gateway.executor import RetryPolicy
from loadbear.testing import Fault, UpstreamSimulator

# Small deadlines so a stall costs a fraction of a second, not a minute.
FAST = {"connect": 1.0, "first_token": 0.4, "idle": 0.4, "total": 5.0}
FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05)
MINI_REPLY = "Alpha one two three four five six seven."
HAIKU_REPLY = "Bravo one two three four five."
GPT4O_REPLY = "Charlie one two three four five."
FALLBACK_MESSAGE = "Our assistant is taking a break."
SUPPORT = "help@acme.test"
DEGRADED_TEXT = f"{FALLBACK_MESSAGE} Please contact {SUPPORT}."
TENANT = {"fallback_message": FALLBACK_MESSAGE, "support_contact": SUPPORT}
# A chain with no offline last resort, so that "every model fails" is reachable.
NO_LOCAL = {"gpt-4o-mini": ["claude-3-5-haiku-latest"], "claude-3-5-haiku-latest": []}
MESSAGES = [{"role": "user", "content": "What is a gateway?"}]
CHAT_PATHS = ("/v1/chat/completions", "/v1/messages")

# fault kind -> (error_type in the ledger, HTTP status in the ledger)
UPSTREAM_FAULTS: dict[str, tuple[str, int | None]] = {
    "rate_limit": ("rate_limited", 429),
    "server_error": ("server_error", 500),
    "unavailable": ("server_error", 503),
    "refused": ("connection", None),
    "no_headers": ("connection", None),
    "stall_first_token": ("first_token_timeout", None),
    # Non-streamed, a cut body is a short read of a promised Content-Length.
    "cut_mid_stream": ("connection", None),
    "malformed_chunk": ("malformed", 200),
    "inband_error": ("upstream_error", 200),
}
CLIENT_FAULTS = {"bad_request": "bad_request", "context_length": "context_length"}


def fault(kind: str, **kw: Any) -> Fault:
    """A fault tuned for fast tests: short Retry-After and stall."""
    kw.setdefault("retry_after", 0.05)
    kw.setdefault("stall_s", 2.0)
    return Fault(kind, **kw)


def fault_models(sim: UpstreamSimulator, **overrides: Any) -> dict:
    fast = {name: {"timeouts": dict(FAST)} for name in ("gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-latest")}
    for name, changes in overrides.items():
        fast.setdefault(name, {}).update(changes)
    return sim_models(sim.url, **fast)


def set_replies(sim: UpstreamSimulator) -> None:
    sim.set_reply(MINI_REPLY, model="gpt-4o-mini")
    sim.set_reply(HAIKU_REPLY, model="claude-3-5-haiku-latest")
    sim.set_reply(GPT4O_REPLY, model="gpt-4o")


def make_stack(stack_factory, sim: UpstreamSimulator, tenant: dict | None = None, models: dict | None = None,
               **kw: Any) -> Stack:
    set_replies(sim)
    kw.setdefault("retry_policy", FAST_RETRY)
    return stack_factory(models or fault_models(sim), tenant_settings={**TENANT, **(tenant or {})}, **kw)


# One simulator and one default stack per module, reset before every test: starting and
# stopping a server per test would cost more than the tests themselves.


@pytest.fixture(scope="module")
def shared_simulator():
    sim = UpstreamSimulator(seed=7).start()
    yield sim
    sim.stop()


@pytest.fixture
def simulator(shared_simulator) -> UpstreamSimulator:
    """Overrides conftest's: the module's simulator, reset to defaults (no script, no records)."""
    sim = shared_simulator
    sim.reset()
    sim.configure(latency_ms=(0, 0), tokens_per_second=None, fault_rate=0.0, faults=None, reply_words=20,
                  retry_after=1.0, stall_s=60.0)
    return sim


@pytest.fixture(scope="module")
def shared_stack(shared_simulator, tmp_path_factory):
    stack = Stack(f"sqlite:///{tmp_path_factory.mktemp('faults') / 'gw.db'}", fault_models(shared_simulator),
                  tenant_settings=TENANT, retry_policy=FAST_RETRY)
    yield stack
    stack.close()


@pytest.fixture
def fstack(shared_stack, simulator) -> Stack:
    """The module's default stack with an empty ledger and fresh breakers."""
    stack = shared_stack
    stack.gateway.ledger.flush(10)
    with stack.gateway.db.system_tx() as c:
        c.execute("DELETE FROM ai_attempts")
        c.execute("DELETE FROM ai_interactions")
    stack.gateway.breakers.reset()
    set_replies(simulator)
    return stack


def upstream_calls(sim: UpstreamSimulator) -> list:
    return [r for r in sim.requests if r.path in CHAT_PATHS]


def wait_rows(stack: Stack, n: int = 1, timeout: float = 5.0) -> list[dict]:
    """The interaction rows, once there are at least ``n`` (a stream's row may land a moment
    after the client read its last event)."""
    deadline = time.monotonic() + timeout
    rows = stack.rows()
    while len(rows) < n and time.monotonic() < deadline:
        time.sleep(0.02)
        rows = stack.rows()
    return rows


def interaction(stack: Stack, interaction_id: str | None = None) -> dict:
    rows = wait_rows(stack)
    if interaction_id is None:
        assert len(rows) == 1, rows
        return rows[0]
    return next(r for r in rows if str(r["id"]) == str(interaction_id))


def assert_ledger_matches(stack: Stack, sim: UpstreamSimulator) -> list[dict]:
    """Every upstream call the simulator saw is exactly one attempt row, in the same order, and
    every interaction's attempt_count is its number of attempt rows."""
    attempts = stack.rows("SELECT * FROM ai_attempts ORDER BY started_at, attempt_no")
    remote = [a for a in attempts if a["provider"] != "local" and a["model"] != "gpt-refused"]
    calls = upstream_calls(sim)
    assert [a["upstream_model"] for a in remote] == [c.model for c in calls]
    for row in stack.rows():
        assert row["attempt_count"] == len(stack.attempts(row["id"])), row
    return attempts


def meta(row: dict) -> dict:
    import json

    m = row["metadata"]
    return json.loads(m) if isinstance(m, str) else (m or {})


def chat(stack: Stack, model: str = "gpt-4o-mini", **kw: Any):
    return stack.openai().chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **kw)


# -- retry on the same model ---------------------------------------------------------------


@pytest.mark.parametrize("kind", list(UPSTREAM_FAULTS))
def test_retry_same_model_is_invisible(fstack, simulator, kind):
    simulator.script([fault(kind)], model="gpt-4o-mini")
    raw = chat(fstack)
    out = raw.parse()
    assert raw.http_response.status_code == 200
    assert out.model == "gpt-4o-mini"
    assert out.choices[0].message.content == MINI_REPLY
    assert raw.headers.get("x-loadbear-degraded") is None
    assert getattr(out, "loadbear")["degraded"] is False

    row = interaction(fstack)
    assert (row["status"], row["model"], row["attempt_count"], row["error_type"]) == ("ok", "gpt-4o-mini", 2, None)
    error_type, http_status = UPSTREAM_FAULTS[kind]
    attempts = fstack.attempts(row["id"])
    assert [(a["model"], a["status"], a["error_type"]) for a in attempts] == [
        ("gpt-4o-mini", "error", error_type), ("gpt-4o-mini", "ok", None)]
    assert attempts[0]["http_status"] == http_status
    assert attempts[0]["cost_micro_usd"] == 0 and attempts[1]["cost_micro_usd"] > 0
    assert row["cost_micro_usd"] == attempts[1]["cost_micro_usd"]
    assert all(a["latency_ms"] >= 0 for a in attempts)
    assert [c.fault for c in upstream_calls(simulator)] == [kind, None]
    assert_ledger_matches(fstack, simulator)


# -- fail over to the next model -----------------------------------------------------------


@pytest.mark.parametrize("kind", list(UPSTREAM_FAULTS))
def test_failover_to_next_provider(fstack, simulator, kind):
    simulator.script([fault(kind), fault(kind)], model="gpt-4o-mini")  # max_retries=1: both tries fail
    raw = chat(fstack)
    out = raw.parse()
    assert raw.http_response.status_code == 200
    assert out.model == "claude-3-5-haiku-latest"  # the model that served, across providers
    assert out.choices[0].message.content == HAIKU_REPLY
    assert raw.headers["x-loadbear-model"] == "claude-3-5-haiku-latest"
    row = interaction(fstack)
    assert (row["status"], row["model"], row["provider"], row["attempt_count"]) == (
        "ok", "claude-3-5-haiku-latest", "anthropic", 3)
    error_type, _ = UPSTREAM_FAULTS[kind]
    assert [(a["model"], a["status"], a["error_type"]) for a in fstack.attempts(row["id"])] == [
        ("gpt-4o-mini", "error", error_type), ("gpt-4o-mini", "error", error_type),
        ("claude-3-5-haiku-latest", "ok", None)]
    calls = upstream_calls(simulator)
    assert [(c.path, c.model) for c in calls] == [
        ("/v1/chat/completions", "gpt-4o-mini"), ("/v1/chat/completions", "gpt-4o-mini"),
        ("/v1/messages", "claude-3-5-haiku-latest")]
    assert_ledger_matches(fstack, simulator)


def test_refused_connection_fails_over(stack_factory, simulator):
    """Nothing listening at all (not even the simulator): connection errors, then the next model."""
    models = fault_models(simulator, **{"gpt-refused": {
        "provider": "openai", "base_url": simulator.refused_url + "/v1", "api_key": "sk", "max_retries": 1,
        "fallbacks": ["gpt-4o-mini"], "timeouts": dict(FAST)}})
    stack = make_stack(stack_factory, simulator, models=models)
    out = chat(stack, model="gpt-refused").parse()
    assert out.model == "gpt-4o-mini" and out.choices[0].message.content == MINI_REPLY
    row = interaction(stack)
    assert [(a["model"], a["error_type"]) for a in stack.attempts(row["id"])] == [
        ("gpt-refused", "connection"), ("gpt-refused", "connection"), ("gpt-4o-mini", None)]
    assert [c.model for c in upstream_calls(simulator)] == ["gpt-4o-mini"]
    assert_ledger_matches(stack, simulator)


def test_auth_failure_fails_over_at_once(stack_factory, simulator):
    """401 is our configuration, not a blip: no retry of the same model."""
    stack = make_stack(stack_factory, simulator)
    simulator.script([Fault("server_error", status=401, message="bad key")], model="gpt-4o-mini")
    out = chat(stack).parse()
    assert out.model == "claude-3-5-haiku-latest"
    row = interaction(stack)
    assert [(a["model"], a["error_type"], a["http_status"]) for a in stack.attempts(row["id"])] == [
        ("gpt-4o-mini", "auth", 401), ("claude-3-5-haiku-latest", None, None)]
    assert_ledger_matches(stack, simulator)


def test_whole_remote_chain_down_falls_back_to_local(fstack, simulator):
    simulator.script([fault("unavailable")] * 2, model="gpt-4o-mini")
    simulator.script([fault("refused")] * 2, model="claude-3-5-haiku-latest")
    out = chat(fstack).parse()
    assert out.model == "local" and out.choices[0].message.content
    row = interaction(fstack)
    assert (row["status"], row["attempt_count"]) == ("ok", 5)
    assert [a["provider"] for a in fstack.attempts(row["id"])] == ["openai"] * 2 + ["anthropic"] * 2 + ["local"]
    assert_ledger_matches(fstack, simulator)


# -- client faults fail fast -----------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CLIENT_FAULTS))
def test_client_fault_fails_fast_without_burning_the_chain(fstack, simulator, kind):
    simulator.script([fault(kind)], model="gpt-4o-mini")
    with pytest.raises(openai.BadRequestError) as info:
        fstack.openai().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    err = info.value
    assert err.status_code == 400
    assert err.body["type"] == "invalid_request_error"
    assert err.body["code"] == ("context_length_exceeded" if kind == "context_length" else "invalid_request")
    assert "maximum context length" in err.body["message"] if kind == "context_length" else "temperature" in err.body["message"]
    assert len(upstream_calls(simulator)) == 1  # no retry, no fallback
    row = interaction(fstack)
    assert (row["status"], row["attempt_count"], row["error_type"], row["http_status"]) == (
        "error", 1, CLIENT_FAULTS[kind], 400)
    assert_ledger_matches(fstack, simulator)
    # A client fault says nothing about the upstream's health.
    assert fstack.gateway.breakers.snapshot("openai/gpt-4o-mini")["consecutive_failures"] == 0


def test_client_fault_error_body_is_openai_shaped(fstack, simulator):
    simulator.script([fault("context_length")], model="gpt-4o-mini")
    r = httpx.post(fstack.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {fstack.key}"},
                   json={"model": "gpt-4o-mini", "messages": MESSAGES})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# -- degraded answers ----------------------------------------------------------------------


def test_every_model_fails_gives_an_honest_degraded_answer(stack_factory, simulator):
    stack = make_stack(stack_factory, simulator, tenant={"fallback_overrides": NO_LOCAL})
    simulator.script([fault("server_error")] * 2, model="gpt-4o-mini")
    simulator.script([fault("unavailable")] * 2, model="claude-3-5-haiku-latest")
    raw = chat(stack)
    out = raw.parse()
    assert raw.http_response.status_code == 200
    assert raw.headers["x-loadbear-degraded"] == "true"
    assert out.choices[0].message.content == DEGRADED_TEXT
    assert out.choices[0].finish_reason == "stop"
    body = raw.http_response.json()
    assert body["loadbear"]["degraded"] is True and body["loadbear"]["served_model"] is None
    assert body["usage"]["total_tokens"] == 0
    row = interaction(stack)
    assert (row["status"], row["attempt_count"], row["error_type"], row["cost_micro_usd"]) == (
        "degraded", 4, "server_error", 0)
    assert len(upstream_calls(simulator)) == 4
    assert_ledger_matches(stack, simulator)


def test_degraded_message_without_support_contact(stack_factory, simulator):
    stack = make_stack(stack_factory, simulator, tenant={"fallback_overrides": NO_LOCAL, "support_contact": None})
    simulator.script([fault("server_error")] * 4)
    out = chat(stack).parse()
    assert out.choices[0].message.content == FALLBACK_MESSAGE


def test_degraded_seam_prefers_a_similar_cached_answer(stack_factory, simulator, monkeypatch):
    """The first degraded step is a similar cached answer (filled by the semantic cache)."""
    stack = make_stack(stack_factory, simulator, tenant={"fallback_overrides": NO_LOCAL})
    async def cached(call):
        return "A cached answer."

    monkeypatch.setattr(stack.gateway, "degraded_from_cache", cached)
    simulator.script([fault("server_error")] * 4)
    raw = chat(stack)
    assert raw.parse().choices[0].message.content == "A cached answer."
    assert raw.headers["x-loadbear-degraded"] == "true"
    assert interaction(stack)["status"] == "degraded"


def test_tenant_fallback_override_changes_the_chain(stack_factory, simulator):
    stack = make_stack(stack_factory, simulator, tenant={"fallback_overrides": {"gpt-4o-mini": ["gpt-4o"]}})
    simulator.script([fault("server_error")] * 2, model="gpt-4o-mini")
    out = chat(stack).parse()
    assert out.model == "gpt-4o" and out.choices[0].message.content == GPT4O_REPLY
    # Another tenant keeps the catalog's chain.
    other = stack.add_tenant("other", TENANT)
    simulator.script([fault("server_error")] * 2, model="gpt-4o-mini")
    out = stack.openai(key=other).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert out.model == "claude-3-5-haiku-latest"
    assert_ledger_matches(stack, simulator)
