"""The response cache on the request path: through the official openai SDK against a real server
in front of the upstream simulator. Hits (exact and paraphrase) make no upstream call, stream like
any answer and are ledgered with what they saved; scopes, edited or deleted documents, ``cache:
false``, errors, degraded answers and cancelled streams miss or are never stored; when every model
fails, a similar cached answer is served marked degraded."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from conftest import sim_models
from loadbear.testing import Fault

SYSTEM = "You are Acme's support assistant."
Q = "How do I get a refund for the Team plan?"
PARAPHRASE = "How can I get a refund for the Team plan?"
CACHE_ON = {"cache_enabled": True, "fallback_message": "We are down.",
            # no offline last resort: "every model fails" is reachable
            "fallback_overrides": {"gpt-4o-mini": ["claude-3-5-haiku-latest"], "claude-3-5-haiku-latest": []}}
HELPDESK = {"X-Loadbear-Feature": "helpdesk"}


def conv(question: str, system: str = SYSTEM) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def ask(s, question: str = Q, *, key: str | None = None, system: str = SYSTEM, headers: dict | None = None,
        model: str = "gpt-4o-mini", **kw):
    """One non-streamed request; returns (completion, response headers)."""
    raw = s.openai(key=key).chat.completions.with_raw_response.create(
        model=model, messages=conv(question, system), extra_headers={**HELPDESK, **(headers or {})}, **kw)
    return raw.parse(), raw.headers


def upstream(sim) -> int:
    return sum(1 for r in sim.requests if r.path in ("/v1/chat/completions", "/v1/messages"))


def settle(s) -> None:
    """Wait for the cache writer and the ledger writer."""
    assert s.gateway.cache.flush(30)
    s.gateway.ledger.flush(10)


@pytest.fixture
def cstack(stack_factory, simulator):
    return stack_factory(sim_models(simulator.url), tenant_settings=CACHE_ON)


# -- hits -----------------------------------------------------------------------------------------


def test_a_repeat_and_a_paraphrase_hit_without_an_upstream_call(stack_factory, simulator, db_url):
    s = stack_factory(sim_models(simulator.url), db_url=db_url, tenant_settings=CACHE_ON)
    first, h1 = ask(s)
    assert h1["x-loadbear-cache"] == "miss" and first.model_extra["loadbear"]["cached"] is False
    settle(s)
    calls = upstream(simulator)

    again, h2 = ask(s, "  how do I get a refund for the team plan ")
    assert again.choices[0].message.content == first.choices[0].message.content
    assert (again.model, again.object, again.choices[0].finish_reason) == ("gpt-4o-mini", "chat.completion", "stop")
    assert again.usage.total_tokens == 0  # nothing was consumed upstream
    assert h2["x-loadbear-cache"] == "hit-exact" and h2["x-loadbear-model"] == "gpt-4o-mini"
    lb = again.model_extra["loadbear"]
    assert lb["cached"] is True and lb["cache"] == "hit-exact" and lb["cache_similarity"] == 1.0
    assert "x-loadbear-degraded" not in h2 and lb["degraded"] is False

    para, h3 = ask(s, PARAPHRASE)
    assert para.choices[0].message.content == first.choices[0].message.content
    assert h3["x-loadbear-cache"] == "hit-semantic"
    assert 0.95 <= para.model_extra["loadbear"]["cache_similarity"] < 1.0
    assert upstream(simulator) == calls, "a hit makes no upstream call"

    rows = s.rows()
    assert len(rows) == 3, "exactly one ledger row per request"
    miss, exact, semantic = rows
    assert not miss["cached"] and miss["cache_kind"] is None and miss["cost_micro_usd"] > 0
    entry = lb["cache_entry_id"]
    for row, kind in ((exact, "exact"), (semantic, "semantic")):
        assert row["cached"] and row["status"] == "ok" and row["cache_kind"] == kind
        assert str(row["cache_entry_id"]) == entry
        assert row["cost_micro_usd"] == 0 and row["attempt_count"] == 0 and s.attempts(row["id"]) == []
        # saved = the replaced call at the model's catalog price, i.e. what the first call cost
        assert row["saved_micro_usd"] == miss["cost_micro_usd"]
        assert row["model"] == "gpt-4o-mini" and row["finish_reason"] == "stop"
        assert row["latency_ms"] is not None and row["ttft_ms"] is not None and row["ttft_ms"] <= row["latency_ms"]
    assert exact["cache_similarity"] == 1.0 and 0.95 <= semantic["cache_similarity"] < 1.0

    usage = httpx.get(s.url + "/v1/usage", headers={"Authorization": f"Bearer {s.key}"}).json()["totals"]
    assert usage["cached_requests"] == 2 and usage["requests"] == 3
    assert usage["saved_micro_usd"] == 2 * miss["cost_micro_usd"]
    assert usage["cost_micro_usd"] == miss["cost_micro_usd"]


def test_other_tenant_feature_system_prompt_or_model_miss(stack_factory, simulator, db_url):
    s = stack_factory(sim_models(simulator.url), db_url=db_url, tenant_settings=CACHE_ON)
    ask(s)
    settle(s)
    # (each request of another tenant stores its own entry: one tenant per question)
    assert ask(s, key=s.add_tenant("globex", CACHE_ON))[1]["x-loadbear-cache"] == "miss", "another tenant"
    assert ask(s, key=s.add_tenant("initech", CACHE_ON), question=PARAPHRASE)[1]["x-loadbear-cache"] == "miss"
    assert ask(s, headers={"X-Loadbear-Feature": "sales"})[1]["x-loadbear-cache"] == "miss", "another feature"
    assert ask(s, system="You are a pirate.")[1]["x-loadbear-cache"] == "miss", "another system prompt"
    assert ask(s, model="gpt-4o")[1]["x-loadbear-cache"] == "miss", "another model"
    assert ask(s, max_tokens=7)[1]["x-loadbear-cache"] == "miss", "other generation parameters"
    # a conversation that ends with the same question after another exchange
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": Q}]
    raw = s.openai().chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs,
                                                                extra_headers=HELPDESK)
    assert raw.headers["x-loadbear-cache"] == "miss", "another conversation"
    settle(s)
    assert not any(r["cached"] for r in s.rows())
    # ... and the original still hits
    assert ask(s)[1]["x-loadbear-cache"] == "hit-exact"


def test_streamed_hit_looks_like_a_normal_stream(cstack, simulator):
    first, _ = ask(cstack)
    settle(cstack)
    calls = upstream(simulator)
    with cstack.openai().chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=conv(Q), stream=True, stream_options={"include_usage": True},
            extra_headers=HELPDESK) as resp:
        assert resp.headers["x-loadbear-cache"] == "hit-exact"
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = list(resp.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1, "deltas, not one blob"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 0
    assert all(c.id == chunks[0].id and c.model == "gpt-4o-mini" for c in chunks)
    assert upstream(simulator) == calls
    # raw: ends with [DONE]
    with httpx.stream("POST", cstack.url + "/v1/chat/completions", timeout=10,
                      headers={"Authorization": f"Bearer {cstack.key}", **HELPDESK},
                      json={"model": "gpt-4o-mini", "messages": conv(PARAPHRASE), "stream": True}) as r:
        datas = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert datas[-1] == "[DONE]" and r.headers["x-loadbear-cache"] == "hit-semantic"
    final = json.loads(datas[-2])
    assert final["loadbear"]["cached"] is True and final["loadbear"]["cache"] == "hit-semantic"
    rows = cstack.rows()
    assert [(r["cached"], r["streamed"], r["status"]) for r in rows[1:]] == [(True, True, "ok"), (True, True, "ok")]


def test_a_streamed_miss_is_stored(cstack, simulator):
    stream = cstack.openai().chat.completions.create(model="gpt-4o-mini", messages=conv(Q), stream=True,
                                                     extra_headers=HELPDESK)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    settle(cstack)
    again, h = ask(cstack)
    assert h["x-loadbear-cache"] == "hit-exact" and again.choices[0].message.content == text


# -- bypass and bad input -------------------------------------------------------------------------


def test_cache_false_bypasses_lookup_and_store(cstack, simulator):
    _, h = ask(cstack, extra_body={"cache": False})
    assert h["x-loadbear-cache"] == "bypass"
    settle(cstack)
    assert cstack.gateway.cache.count(cstack.tenant.id) == 0, "not stored"
    ask(cstack)
    settle(cstack)
    calls = upstream(simulator)
    _, h = ask(cstack, extra_body={"cache": False})
    assert h["x-loadbear-cache"] == "bypass" and upstream(simulator) == calls + 1, "not looked up"
    _, h = ask(cstack, headers={"X-Loadbear-Cache": "off"})
    assert h["x-loadbear-cache"] == "bypass" and upstream(simulator) == calls + 2
    _, h = ask(cstack, headers={"X-Loadbear-Cache": "on"})
    assert h["x-loadbear-cache"] == "hit-exact" and upstream(simulator) == calls + 2
    # the header cannot turn the cache back on for a body that said false
    _, h = ask(cstack, headers={"X-Loadbear-Cache": "on"}, extra_body={"cache": False})
    assert h["x-loadbear-cache"] == "bypass"


@pytest.mark.parametrize("value", ["yes", 0, None, {"enabled": False}])
def test_bad_cache_value_is_a_400(cstack, value):
    with pytest.raises(openai.BadRequestError) as exc:
        ask(cstack, extra_body={"cache": value})
    err = exc.value.body
    assert err["param"] == "cache" and err["code"] == "invalid_type" and "boolean" in err["message"]
    assert set(err) >= {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def test_bad_cache_header_is_a_400(cstack):
    with pytest.raises(openai.BadRequestError) as exc:
        ask(cstack, headers={"X-Loadbear-Cache": "sometimes"})
    assert exc.value.body["param"] == "X-Loadbear-Cache"


def test_a_tenant_without_the_cache_sees_no_cache(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url))
    ask(s)
    _, h = ask(s)
    assert "x-loadbear-cache" not in h
    assert s.gateway._cache is None, "nothing was created for it"
    assert not any(r["cached"] for r in s.rows())


# -- never stored ---------------------------------------------------------------------------------


def test_errors_degraded_and_cut_streams_are_not_stored(cstack, simulator):
    tenant = cstack.tenant.id
    simulator.script([Fault("server_error")] * 4)
    out, h = ask(cstack)
    assert h["x-loadbear-degraded"] == "true" and out.choices[0].message.content == "We are down."
    assert h["x-loadbear-cache"] == "miss"
    # a client fault
    simulator.script([Fault("bad_request")])
    with pytest.raises(openai.BadRequestError):
        ask(cstack)
    # a stream cut after its first tokens
    simulator.script([Fault("cut_mid_stream", after_chunks=2)])
    with pytest.raises(openai.APIError):
        for _ in cstack.openai().chat.completions.create(model="gpt-4o-mini", messages=conv(Q), stream=True,
                                                         extra_headers=HELPDESK):
            pass
    # a truncated answer (finish_reason "length")
    simulator.configure(reply_words=40)
    ask(cstack, max_tokens=5)
    settle(cstack)
    assert cstack.gateway.cache.count(tenant) == 0
    rows = cstack.rows()
    assert [r["status"] for r in rows] == ["degraded", "error", "error", "ok"]
    assert rows[-1]["finish_reason"] == "length"
    # the same (untruncated) question afterwards is a miss, then a hit
    simulator.configure(reply_words=20)
    assert ask(cstack)[1]["x-loadbear-cache"] == "miss"
    settle(cstack)
    assert ask(cstack)[1]["x-loadbear-cache"] == "hit-exact"


def test_a_cancelled_stream_is_not_stored(cstack, simulator):
    simulator.configure(tokens_per_second=20)
    simulator.set_reply(" ".join(["word"] * 40), model="gpt-4o-mini")
    with httpx.stream("POST", cstack.url + "/v1/chat/completions", timeout=10,
                      headers={"Authorization": f"Bearer {cstack.key}", **HELPDESK},
                      json={"model": "gpt-4o-mini", "messages": conv(Q), "stream": True}) as r:
        for line in r.iter_lines():
            if '"word' in line:
                break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not cstack.rows():
        time.sleep(0.05)
    assert cstack.rows()[0]["status"] == "cancelled"
    settle(cstack)
    assert cstack.gateway.cache.count(cstack.tenant.id) == 0


# -- degraded -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_every_model_failing_serves_a_similar_cached_answer_marked_degraded(cstack, simulator, stream):
    stored = "How do I export my data as CSV?"
    first, _ = ask(cstack, stored)
    settle(cstack)
    asked = "Can I export my data to CSV?"  # MiniLM 0.92: under the hit threshold, over the degraded one
    simulator.script([Fault("server_error")] * 4)
    if stream:
        with cstack.openai().chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=conv(asked), stream=True, extra_headers=HELPDESK) as resp:
            headers = resp.headers
            chunks = list(resp.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        lb = next(c.model_extra["loadbear"] for c in chunks if c.choices and c.choices[0].finish_reason)
    else:
        out, headers = ask(cstack, asked)
        text, lb = out.choices[0].message.content, out.model_extra["loadbear"]
    assert text == first.choices[0].message.content
    assert headers["x-loadbear-degraded"] == "true" and headers["x-loadbear-cache"] == "hit-semantic"
    assert lb["degraded"] is True and lb["cached"] is True and 0.85 <= lb["cache_similarity"] < 0.95
    settle(cstack)
    row = cstack.rows()[-1]
    assert row["status"] == "degraded" and row["cached"] and row["cache_kind"] == "semantic"
    assert str(row["cache_entry_id"]) == lb["cache_entry_id"] and row["saved_micro_usd"] == 0
    assert row["attempt_count"] == 4 and row["error_type"] == "server_error"
    assert cstack.gateway.cache.count(cstack.tenant.id) == 1, "the degraded answer was not stored again"
    # nothing similar enough: the honest message
    simulator.script([Fault("server_error")] * 4)
    out, _ = ask(cstack, "Where is your office?")
    assert out.choices[0].message.content == "We are down." and out.model_extra["loadbear"]["cached"] is False


# -- grounded answers -----------------------------------------------------------------------------


def _put_doc(s, text: str):
    r = httpx.post(s.url + "/v1/documents", headers={"Authorization": f"Bearer {s.key}"}, timeout=60, json={
        "title": "Refund policy", "external_id": "refunds", "text": text, "content_type": "text/markdown"})
    assert r.status_code in (200, 201), r.text
    return r.json()


def test_an_edited_or_deleted_source_document_misses(stack_factory, simulator, db_url):
    s = stack_factory(sim_models(simulator.url), db_url=db_url, tenant_settings=CACHE_ON)
    doc = _put_doc(s, "# Refund policy\n\nRefunds are available within 14 days of purchase.\n")
    grounded = {"knowledge": {"top_k": 2}}
    q = "Within how many days are refunds available?"
    first, h = ask(s, q, extra_body=grounded)
    assert h["x-loadbear-cache"] == "miss"
    settle(s)
    again, h = ask(s, q, extra_body=grounded)
    assert h["x-loadbear-cache"] == "hit-exact"
    assert again.model_extra["loadbear"]["citations"] == first.model_extra["loadbear"]["citations"]
    assert ask(s, q)[1]["x-loadbear-cache"] == "miss", "an ungrounded request is another scope"

    edited = _put_doc(s, "# Refund policy\n\nRefunds are available within 30 days of purchase.\n")
    assert edited["id"] == doc["id"] and edited["version"] == 2
    settle(s)
    calls = upstream(simulator)
    _, h = ask(s, q, extra_body=grounded)
    assert h["x-loadbear-cache"] == "miss" and upstream(simulator) == calls + 1
    settle(s)
    assert ask(s, q, extra_body=grounded)[1]["x-loadbear-cache"] == "hit-exact", "the new answer is cached"

    r = httpx.delete(f"{s.url}/v1/documents/{doc['id']}", headers={"Authorization": f"Bearer {s.key}"})
    assert r.status_code in (200, 204)
    with s.gateway.db.tenant_tx(s.tenant.id, write=False) as c:
        assert c.scalar("SELECT COUNT(*) FROM cache_entries WHERE grounded = ?", (True,)) == 0
    # no sources left: the request cannot be cached at all
    assert ask(s, q, extra_body=grounded)[1]["x-loadbear-cache"] == "bypass"


# -- cost control ---------------------------------------------------------------------------------


def test_auto_hits_cost_nothing_even_at_the_hard_budget_limit(cstack, simulator):
    hard = "Compare Redis and Memcached, explain the trade-offs"
    first, h = ask(cstack, hard, model="auto")
    assert first.model == "gpt-4o" and h["x-loadbear-cache"] == "miss"
    settle(cstack)
    cstack.gateway.tenants.update_settings("acme", {"monthly_budget_usd": 0})
    again, h = ask(cstack, hard, model="auto")
    assert h["x-loadbear-cache"] == "hit-exact" and again.model == "gpt-4o"
    with pytest.raises(openai.APIStatusError) as exc:
        ask(cstack, "Compare Postgres and MySQL, explain the trade-offs", model="auto")
    assert exc.value.status_code == 402
    rows = cstack.rows()
    assert rows[-1]["cached"] and rows[-1]["route"] == "auto" and rows[-1]["cost_micro_usd"] == 0
    assert rows[-1]["saved_micro_usd"] == rows[0]["cost_micro_usd"]


@pytest.mark.parametrize("settings,param", [
    ({"cache_enabled": "yes"}, "settings.cache_enabled"),
    ({"cache_semantic": 1}, "settings.cache_semantic"),
    ({"cache_threshold": 1.5}, "settings.cache_threshold"),
    ({"cache_threshold": True}, "settings.cache_threshold"),
    ({"cache_degraded_threshold": 0}, "settings.cache_degraded_threshold"),
    ({"cache_ttl_s": 0}, "settings.cache_ttl_s"),
    ({"cache_ttl_s": 1.5}, "settings.cache_ttl_s"),
])
def test_bad_tenant_cache_settings_are_a_400(stack, settings, param):
    r = httpx.patch(f"{stack.url}/admin/tenants/acme", headers={"Authorization": f"Bearer {stack.admin_key}"},
                    json={"settings": settings})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tenant_cache_settings_reach_the_policy(stack):
    r = httpx.patch(f"{stack.url}/admin/tenants/acme", headers={"Authorization": f"Bearer {stack.admin_key}"},
                    json={"settings": {"cache_enabled": True, "cache_threshold": 0.9, "cache_ttl_s": 60}})
    assert r.status_code == 200, r.text
    policy = stack.gateway.cache_policy(stack.gateway.tenants.get_tenant("acme"))
    assert (policy.enabled, policy.threshold, policy.degraded_threshold, policy.ttl_s) == (True, 0.9, 0.85, 60)
    stack.gateway.tenants.update_settings("acme", {"cache_threshold": 0.8})
    assert stack.gateway.cache_policy(stack.gateway.tenants.get_tenant("acme")).degraded_threshold == 0.8
    stack.gateway.settings.cache_enabled = False  # the process-wide switch wins
    assert stack.gateway.cache_policy(stack.gateway.tenants.get_tenant("acme")) is None


def test_a_failover_answer_is_not_stored_for_the_model_that_failed(cstack, simulator):
    simulator.script([Fault("server_error")] * 2, model="gpt-4o-mini")  # both tries of gpt-4o-mini
    out, h = ask(cstack)
    assert out.model == "claude-3-5-haiku-latest" and h["x-loadbear-cache"] == "miss"
    settle(cstack)
    assert cstack.gateway.cache.count(cstack.tenant.id) == 0
    out, h = ask(cstack)
    assert out.model == "gpt-4o-mini" and h["x-loadbear-cache"] == "miss"
    settle(cstack)
    assert ask(cstack)[1]["x-loadbear-cache"] == "hit-exact"
