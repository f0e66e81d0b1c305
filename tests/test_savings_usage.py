"""The savings ledger end to end (issue 6): a routed request (``model: auto`` → the cheap tier)
and cache hits go through the official openai SDK against a real server; ``GET /v1/usage``,
``GET /admin/usage`` and ``loadbear usage`` then show spend, savings by cache and by routing, and
the cost without loadbear side by side, and every total equals the sum of the ledger rows. A
degraded answer served from the cache saves nothing; evaluation traffic stays out. Both backends.
"""

from __future__ import annotations

import json
from collections import defaultdict

import httpx
from typer.testing import CliRunner

from conftest import sim_models
from loadbear.cli import app as cli_app
from loadbear.ledger.records import InteractionRecord
from loadbear.storage.values import utcnow, uuid7
from loadbear.testing import Fault

CACHE_ON = {"cache_enabled": True, "fallback_message": "We are down.",
            # no offline last resort: "every model fails" is reachable
            "fallback_overrides": {"gpt-4o-mini": ["claude-3-5-haiku-latest"], "claude-3-5-haiku-latest": []}}
HELPDESK = {"X-Loadbear-Feature": "helpdesk"}
SYSTEM = "You are Acme's support assistant."
SIMPLE = "What are your opening hours?"  # the rules route it to the cheap tier
Q = "How do I get a refund for the Team plan?"
STORED = "How do I export my data as CSV?"
NEAR = "Can I export my data to CSV?"  # under the hit threshold, over the degraded one (0.85)
MONEY = ("cost_micro_usd", "saved_micro_usd", "saved_cache_micro_usd", "saved_routing_micro_usd",
         "cost_without_loadbear_micro_usd")


def ask(s, question: str, model: str = "gpt-4o-mini", headers: dict | None = None):
    raw = s.openai().chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        extra_headers=headers or {})
    return raw.parse(), raw.headers


def settle(s) -> None:
    assert s.gateway.cache.flush(30)
    assert s.gateway.ledger.flush(10)


def expected(rows: list[dict]) -> dict[str, int]:
    """What the usage report must say about these ledger rows."""
    cache = sum(int(r["saved_micro_usd"]) for r in rows if r["cached"])
    routing = sum(int(r["saved_micro_usd"]) for r in rows if not r["cached"])
    cost = sum(int(r["cost_micro_usd"]) for r in rows)
    return {"cost_micro_usd": cost, "saved_micro_usd": cache + routing, "saved_cache_micro_usd": cache,
            "saved_routing_micro_usd": routing, "cost_without_loadbear_micro_usd": cost + cache + routing}


def money(item: dict) -> dict[str, int]:
    return {k: item[k] for k in MONEY}


def test_usage_shows_cache_and_routing_savings_side_by_side(stack_factory, simulator, db_url):
    s = stack_factory(sim_models(simulator.url), db_url=db_url, tenant_settings=CACHE_ON)
    routed, h = ask(s, SIMPLE, model="auto")
    assert routed.model == "gpt-4o-mini" and h["x-loadbear-cache"] == "miss"
    ask(s, Q, headers=HELPDESK)  # a miss at full price
    ask(s, STORED, headers=HELPDESK)
    settle(s)
    _, h = ask(s, Q, headers=HELPDESK)
    assert h["x-loadbear-cache"] == "hit-exact"
    # A routed request answered from the cache saves the call it replaced: a cache saving.
    _, h = ask(s, SIMPLE, model="auto")
    assert h["x-loadbear-cache"] == "hit-exact"
    simulator.script([Fault("server_error")] * 4)
    _, h = ask(s, NEAR, headers=HELPDESK)
    assert h["x-loadbear-degraded"] == "true" and h["x-loadbear-cache"] == "hit-semantic"
    # Evaluation traffic is ledgered row by row but is not product spend or savings.
    now = utcnow()
    s.gateway.ledger.submit(InteractionRecord(
        id=uuid7(), tenant_id=s.tenant.id, feature="helpdesk", requested_model="gpt-4o-mini", model="gpt-4o-mini",
        status="ok", created_at=now, latency_ms=3, cached=True, cost_micro_usd=0, saved_micro_usd=123_456,
        metadata={"eval_run": "run-1"}))
    settle(s)

    rows = s.rows()
    product = [r for r in rows if "eval_run" not in (r["metadata"] or {})]
    assert len(rows) == 7 and len(product) == 6
    first_routed, miss, stored, hit, routed_hit, deg = product
    assert first_routed["route"] == "auto" and not first_routed["cached"] and first_routed["saved_micro_usd"] > 0
    assert miss["saved_micro_usd"] == stored["saved_micro_usd"] == 0
    assert hit["cached"] and hit["saved_micro_usd"] == miss["cost_micro_usd"] > 0
    assert routed_hit["cached"] and routed_hit["route"] == "auto"
    assert routed_hit["saved_micro_usd"] == first_routed["cost_micro_usd"] > 0
    assert deg["status"] == "degraded" and deg["cached"] and deg["saved_micro_usd"] == 0
    assert deg["cost_micro_usd"] == 0  # every attempt failed before any token was billed

    want = expected(product)
    assert want["saved_cache_micro_usd"] == hit["saved_micro_usd"] + routed_hit["saved_micro_usd"]
    assert want["saved_routing_micro_usd"] == first_routed["saved_micro_usd"]

    auth = {"Authorization": f"Bearer {s.key}"}
    by_feature = httpx.get(s.url + "/v1/usage", headers=auth, params={"group_by": "feature"}).json()
    totals = by_feature["totals"]
    assert money(totals) == want
    assert totals["requests"] == 6 and totals["cached_requests"] == 3 and totals["degraded"] == 1
    assert totals["saved_cache_usd"] == round(want["saved_cache_micro_usd"] / 1e6, 6)
    assert totals["saved_routing_usd"] == round(want["saved_routing_micro_usd"] / 1e6, 6)
    assert totals["cost_without_loadbear_usd"] == round(want["cost_without_loadbear_micro_usd"] / 1e6, 6)
    assert totals["saved_pct"] == round(100 * want["saved_micro_usd"] / want["cost_without_loadbear_micro_usd"], 1)
    # Each group shows its own split: the routed request has the default feature, the rest helpdesk.
    per_feature = defaultdict(list)
    for r in product:
        per_feature[r["feature"]].append(r)
    assert {g["feature"]: money(g) for g in by_feature["data"]} == {f: expected(rs) for f, rs in per_feature.items()}
    assert by_feature["data"][0]["saved_routing_micro_usd"] != by_feature["data"][1]["saved_routing_micro_usd"]
    # Every grouping adds up to the same totals, and so does the admin report.
    for group in ("day", "model", "user"):
        report = httpx.get(s.url + "/v1/usage", headers=auth, params={"group_by": group}).json()
        assert money(report["totals"]) == want
        assert [money(g) for g in report["data"]] and sum(g["saved_cache_micro_usd"] for g in report["data"]) == \
            want["saved_cache_micro_usd"]
    admin = httpx.get(s.url + "/admin/usage", headers={"Authorization": f"Bearer {s.admin_key}"},
                      params={"group_by": "feature", "tenant": "acme"}).json()
    assert money(admin["totals"]) == want
    assert {g["feature"]: money(g) for g in admin["data"]} == {f: expected(rs) for f, rs in per_feature.items()}

    # The CLI reads the same rollups: JSON, and a table with spend and savings side by side.
    runner = CliRunner()
    env = {"LOADBEAR_DATABASE_URL": db_url, "LOADBEAR_CONFIG": None, "COLUMNS": "80"}
    out = runner.invoke(cli_app, ["usage", "--tenant", "acme", "--by", "feature", "--json"], env=env)
    assert out.exit_code == 0, out.output
    assert money(json.loads(out.stdout)["totals"]) == want
    out = runner.invoke(cli_app, ["usage", "--tenant", "acme", "--by", "feature"], env=env)
    assert out.exit_code == 0, out.output
    total_line = [line for line in out.stdout.splitlines() if "total" in line and "$" not in line][-1]
    for k in ("cost_micro_usd", "saved_cache_micro_usd", "saved_routing_micro_usd", "saved_micro_usd",
              "cost_without_loadbear_micro_usd"):
        assert f"{want[k] / 1e6:.6f}" in total_line, (k, out.stdout)
    assert "saved" in out.stdout and "routing $" in out.stdout and "cache $" in out.stdout
