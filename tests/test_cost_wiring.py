import httpx
import openai
import pytest

from conftest import sim_models


def test_auto_routing_savings_and_ledger(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url))
    c = s.openai()
    r = c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "What are your opening hours?"}])
    assert r.model == "gpt-4o-mini"
    r2 = c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Compare Redis and Memcached, explain the trade-offs"}])
    assert r2.model == "gpt-4o"
    rows = s.rows()
    print([(x["model"], x["route"], x["route_reason"], x["saved_micro_usd"], x["cost_micro_usd"], x["metadata"]) for x in rows])
    assert rows[0]["saved_micro_usd"] > 0 and rows[1]["saved_micro_usd"] == 0
    assert rows[0]["route_reason"].startswith("simple (score")


def test_rate_limit_429(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url), tenant_settings={"rpm_limit": 2})
    c = s.openai()
    for _ in range(2):
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as exc:
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    print(exc.value.response.headers, exc.value.body)
    assert exc.value.response.headers["retry-after"] == "30"


def test_budget_downgrade_then_402(stack_factory, simulator):
    s = stack_factory(sim_models(simulator.url), tenant_settings={"monthly_budget_usd": 0.01})
    c = s.openai()
    msgs = [{"role": "user", "content": "Compare Redis and Memcached, explain the trade-offs"}]
    # gpt-4o worst case with max_tokens 600: ~ 600*10 = 6000 µ$ + prompt
    r = c.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=600)
    assert r.model == "gpt-4o"
    r = c.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=600)
    print("second", r.model)
    last = None
    for _ in range(200):
        try:
            c.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=600)
        except openai.APIStatusError as e:
            last = e
            break
    assert last is not None and last.status_code == 402
    print(last.body)
    rows = s.rows()
    print([(x["model"], x["route_reason"], x["cost_micro_usd"]) for x in rows][:4], len(rows), sum(x["cost_micro_usd"] for x in rows))
    assert sum(x["cost_micro_usd"] for x in rows) <= 10_000
    u = httpx.get(s.url + "/v1/usage", headers={"authorization": f"Bearer {s.key}"}).json()
    print(u["budget"])
    assert u["budget"]["hard_limit_reached"]
