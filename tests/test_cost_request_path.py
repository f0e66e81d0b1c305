"""Cost control on the wired request path (issue 6), through the official openai SDK against a real
server in front of the upstream simulator: the budget holds under 50 concurrent requests (402s in
the OpenAI error shape, the soft flag in ``GET /v1/usage``), the token limit answers 429 with
Retry-After, a tenant's cache TTL applies to what the gateway stores, and a learned router (set
through ``router_model_path``) routes ``auto`` requests off the event loop, with its reason in the
ledger."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import sim_models
from loadbear.config.settings import Settings
from loadbear.gateway.router import COMPLEX, LearnedClassifier, Router, load_examples

EXAMPLES = Path(__file__).parent / "data" / "router_examples.jsonl"
COMPLEX_ASK = "Design a multi-region failover strategy for our payments database and analyse the trade-offs."


def test_budget_holds_under_50_concurrent_requests(stack_factory, simulator, db_url):
    # gpt-4o-mini alone (no pricier fallback): the worst case is ~35 µ$, a real answer ~15 µ$,
    # so about ten requests fit in the budget at once and twenty in total.
    budget_micro = 300
    s = stack_factory(sim_models(simulator.url), db_url=db_url, tenant_settings={
        "monthly_budget_usd": budget_micro / 1e6, "budget_soft_ratio": 0.5, "budget_hard_action": "refuse",
        "fallback_overrides": {"gpt-4o-mini": []}})
    simulator.configure(tokens_per_second=400)  # answers take a while: the 50 requests overlap
    client = s.async_openai(timeout=30)

    async def one(i: int):
        try:
            return await client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=50,
                messages=[{"role": "user", "content": f"Tell me about our opening hours, please ({i})."}])
        except openai.APIStatusError as exc:
            return exc

    async def run():
        try:
            return await asyncio.gather(*(one(i) for i in range(50)))
        finally:
            await client.close()

    results = asyncio.run(run())
    ok = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(ok) + len(refused) == 50
    assert len(ok) >= 5 and refused, (len(ok), len(refused))
    for exc in refused:
        assert exc.status_code == 402
        err = exc.body
        assert set(err) >= {"message", "type", "param", "code"}
        assert err["code"] == "budget_exceeded" and err["type"] == "insufficient_quota"
        assert "monthly budget of $0.00" in err["message"] and "resets on" in err["message"]

    s.gateway.ledger.flush(10)
    rows = s.rows()
    assert len(rows) == len(ok), "a refused request writes no ledger row"
    spent = sum(int(r["cost_micro_usd"]) for r in rows)
    assert 0 < spent <= budget_micro, spent
    usage = httpx.get(s.url + "/v1/usage", headers={"Authorization": f"Bearer {s.key}"}).json()
    b = usage["budget"]
    assert b["monthly_budget_usd"] == budget_micro / 1e6 and b["spent_usd"] * 1e6 <= budget_micro + 1e-6
    assert b["soft_threshold_reached"] and b["hard_limit_reached"] and b["reserved_usd"] == 0
    assert usage["totals"]["cost_micro_usd"] == spent


def test_tokens_per_minute_answer_429_with_retry_after(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url), tenant_settings={"tpm_limit": 600})
    c = s.openai()
    msgs = [{"role": "user", "content": "hi"}]
    simulator.configure(reply_words=300)
    # The estimate (prompt + max_tokens) is charged up front and settled to what was used (~300).
    first = c.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=400)
    assert first.usage.total_tokens > 200
    with pytest.raises(openai.RateLimitError) as exc:
        c.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=400)
    resp, err = exc.value.response, exc.value.body
    assert int(resp.headers["retry-after"]) >= 1
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
    assert "600 tokens per minute" in err["message"]
    assert len(s.rows()) == 1, "a 429 writes no ledger row"


def test_the_tenant_cache_ttl_applies_to_stored_answers(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url), tenant_settings={"cache_enabled": True, "cache_ttl_s": 1})

    def ask() -> str:
        raw = s.openai().chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "How do I pause my subscription?"}])
        return raw.headers["x-loadbear-cache"]

    assert ask() == "miss"
    assert s.gateway.cache.flush(30)
    assert ask() == "hit-exact"
    time.sleep(1.2)
    assert ask() == "miss", "expired after the tenant's cache_ttl_s"


class ThreadRecorder:
    """The real MiniLM embedder, noting which thread each call ran on."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.threads: list[str] = []

    def embed(self, texts):
        self.threads.append(threading.current_thread().name)
        return self.inner.embed(texts)


def test_a_learned_router_from_settings_routes_auto_requests_off_the_loop(stack_factory, simulator, tmp_path):
    model_path = tmp_path / "router.json"
    LearnedClassifier.train(load_examples(EXAMPLES)).save(model_path)
    toml = tmp_path / "loadbear.toml"
    toml.write_text(f'router_model_path = "{model_path}"\n')
    settings = Settings.load(env={}, config_path=toml)
    assert settings.router_model_path == str(model_path)
    assert Settings.load(env={"LOADBEAR_ROUTER_MODEL_PATH": str(model_path)}).router_model_path == str(model_path)

    s = stack_factory(sim_models(simulator.url))
    router = Router.from_settings(settings)
    assert router.kind == "learned"
    recorder = ThreadRecorder(router.learned.embedder)
    router.learned._embedder = recorder
    s.gateway.router = router

    r = s.openai().chat.completions.create(model="auto", messages=[{"role": "user", "content": COMPLEX_ASK}])
    assert r.model == "gpt-4o"
    assert recorder.threads and all(t.startswith("asyncio_") for t in recorder.threads), recorder.threads
    row = s.rows()[-1]
    assert row["route"] == "auto" and row["route_reason"].startswith("complex (learned model router.json, p=")
    meta = row["metadata"]
    route = (json.loads(meta) if isinstance(meta, str) else meta)["route"]
    assert route["classifier"] == "learned" and route["tier"] == COMPLEX and 0.5 < route["confidence"] <= 1


def test_a_tenant_pin_and_forbidden_tiers_hold_on_the_request_path(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url), tenant_settings={"pinned_model": "claude-3-5-haiku-latest"})
    c = s.openai()
    ask = [{"role": "user", "content": COMPLEX_ASK}]
    assert c.chat.completions.create(model="auto", messages=ask).model == "claude-3-5-haiku-latest"
    assert s.rows()[-1]["route_reason"] == "pinned by tenant: claude-3-5-haiku-latest"

    key = s.add_tenant("globex", {"forbidden_tiers": ["complex"]})
    g = s.openai(key=key)
    assert g.chat.completions.create(model="auto", messages=ask).model == "gpt-4o-mini"
    reason = s.rows()[-1]["route_reason"]
    assert "tier 'complex' is forbidden for this tenant, using 'simple'" in reason
    with pytest.raises(openai.PermissionDeniedError) as exc:
        g.chat.completions.create(model="gpt-4o", messages=ask)
    assert exc.value.body["code"] == "model_not_allowed" and exc.value.body["param"] == "model"
