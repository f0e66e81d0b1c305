"""Complexity routing: the rules and their reasons, tier → model with tenant pins and forbidden
tiers, downgrade chains, the savings estimate, and the learned classifier (trained with the CLI
on tests/data/router_examples.jsonl, saved, loaded, predicting)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loadbear.config.catalog import Catalog
from loadbear.gateway.router import (
    COMPLEX,
    SIMPLE,
    LearnedClassifier,
    Router,
    RouterError,
    choose,
    classify_rules,
    load_examples,
    model_allowed,
)
from loadbear.tenancy.models import TenancyError, TenantSettings

EXAMPLES = Path(__file__).parent / "data" / "router_examples.jsonl"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    sim = "http://127.0.0.1:9"
    models = {
        "gpt-4o-mini": {"provider": "openai", "base_url": sim, "input_price": 0.15, "output_price": 0.60,
                        "tier": "simple", "fallbacks": ["claude-3-5-haiku-latest", "local"]},
        "gpt-4o": {"provider": "openai", "base_url": sim, "input_price": 2.5, "output_price": 10.0,
                   "tier": "complex", "fallbacks": ["gpt-4o-mini"]},
        "claude-3-5-haiku-latest": {"provider": "anthropic", "base_url": sim, "input_price": 0.8,
                                    "output_price": 4.0, "tier": "simple", "fallbacks": ["local"]},
        "claude-sonnet-4-0": {"provider": "anthropic", "base_url": sim, "input_price": 3.0,
                              "output_price": 15.0, "tier": "complex", "fallbacks": ["claude-3-5-haiku-latest"]},
    }
    return Catalog.from_settings(models, env={}, default_model="gpt-4o-mini")


# -- the rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("text,tier,in_reason", [
    ("What are your opening hours?", SIMPLE, "short request"),
    ("How do I reset my password?", SIMPLE, "routine task"),
    ("Why is the sky blue?", SIMPLE, "reasoning cue 'why' (+1)"),
    ("Explain why this deadlocks:\n```python\nwith lock:\n    f()\n```", COMPLEX, "code in the request (+2)"),
    ("Write a Python function that parses ISO dates", COMPLEX, "asks for code (+2)"),
    ("Compare Redis and Memcached for session storage", COMPLEX, "comparison ('compare') (+2)"),
    ("What is X? How does it work? Is it free?", COMPLEX, "3 questions (+2)"),
    ("word " * 600, COMPLEX, "long request"),
])
def test_rules_classify_with_a_reason(text, tier, in_reason):
    c = classify_rules(user(text))
    assert c.tier == tier
    assert c.classifier == "rules"
    assert c.reason.startswith(f"{tier} (score ")
    assert in_reason in c.reason
    assert json.dumps(c.public_features())  # JSON-ready for the ledger


@pytest.mark.parametrize("text,feature,value", [
    ("Let me know if the order shipped; thanks.", "code_block", 0),
    ("x = compute();\ny = other();", "code_block", 1),
    ("const f = (a) => a + 1", "code_block", 1),
    ("Traceback (most recent call last):\n  File \"a.py\"", "code_block", 1),
    ("Please fix the bug in my login function", "code_request", 1),
    ("Fix my bike please, the chain is loose", "code_request", 0),
    ("1. first\n2) second\n- third\n10. tenth\n3.5 is a number", "parts", 4),
    ("Is Postgres better than MySQL?", "comparison_cues", 1),
    ("That's better, thank you", "comparison_cues", 0),
    ("Describe it step-by-step, in detail", "reasoning_cues", 2),
    ("What?? Really?", "questions", 2),
])
def test_features(text, feature, value):
    from loadbear.gateway.router import extract_features

    assert extract_features(user(text))[feature] == value


def test_conversation_depth_and_grounding_move_the_score():
    deep = []
    for i in range(6):
        deep += [{"role": "user", "content": f"and then step {i}, why?"}, {"role": "assistant", "content": "ok"}]
    c = classify_rules(deep)
    assert c.features["turns"] == 6 and "deep conversation (6 user turns) (+1)" in c.reason and c.tier == COMPLEX
    text = "Why was my invoice charged twice?"
    assert classify_rules(user(text)).score == 1
    grounded = classify_rules(user(text), grounded=True)
    assert grounded.score == 0 and "grounded in retrieved sources (-1)" in grounded.reason


def test_rules_agree_with_most_labelled_examples():
    examples = load_examples(EXAMPLES)
    right = sum(classify_rules([], e.grounded, text=e.text).tier == e.tier for e in examples)
    assert len(examples) == 40 and right >= 34


# -- tier → model ---------------------------------------------------------------------------


def test_auto_routes_each_tier_to_its_model(catalog):
    model, tier, reason = choose(catalog, TenantSettings(), user("What are your opening hours?"))
    assert (model, tier) == ("gpt-4o-mini", SIMPLE) and reason.endswith("→ gpt-4o-mini")
    model, tier, reason = choose(catalog, TenantSettings(), user("Compare Redis and Memcached, explain the trade-offs"))
    # No default in the complex tier: its cheapest model.
    assert (model, tier) == ("gpt-4o", COMPLEX) and "comparison" in reason and reason.endswith("→ gpt-4o")


def test_tenant_default_is_preferred_inside_its_tier(catalog):
    s = TenantSettings(default_model="claude-sonnet-4-0")
    assert choose(catalog, s, user("Compare A and B"))[0] == "claude-sonnet-4-0"
    assert choose(catalog, s, user("hello"))[0] == "gpt-4o-mini"  # the catalog default is simple


def test_pinned_model_wins_over_classification(catalog):
    s = TenantSettings(pinned_model="claude-3-5-haiku-latest")
    model, tier, reason = choose(catalog, s, user("Design a distributed lock and prove it is safe"))
    assert (model, tier, reason) == ("claude-3-5-haiku-latest", SIMPLE, "pinned by tenant: claude-3-5-haiku-latest")
    d = Router().route(catalog, s, user("x"))
    assert d.pinned and d.ledger_metadata() == {"tier": SIMPLE, "model": "claude-3-5-haiku-latest", "pinned": True}


def test_unusable_pin_is_ignored_with_a_note(catalog):
    s = TenantSettings(pinned_model="gpt-4o", forbidden_tiers=["complex"])
    model, tier, reason = choose(catalog, s, user("hello"))
    assert model == "gpt-4o-mini" and "pinned model 'gpt-4o' is not available" in reason


def test_forbidden_tier_falls_back_to_the_nearest_allowed_one(catalog):
    s = TenantSettings(forbidden_tiers=["complex"])
    model, tier, reason = choose(catalog, s, user("Compare Redis and Memcached in depth"))
    assert (model, tier) == ("gpt-4o-mini", SIMPLE)
    assert "tier 'complex' is forbidden for this tenant, using 'simple'" in reason
    # ... and the other way round: only strong models allowed.
    s = TenantSettings(allowed_models=["gpt-4o", "claude-sonnet-4-0"])
    model, tier, reason = choose(catalog, s, user("hello"))
    assert (model, tier) == ("gpt-4o", COMPLEX) and "tier 'simple' is not in the catalog" in reason


def test_forbidden_tiers_leave_chains_and_explicit_models(catalog):
    r = Router()
    s = TenantSettings(forbidden_tiers=["simple"])
    # The simple models leave the chain; what they fall back to (local) stays.
    assert [m.name for m in r.tenant_chain(catalog, s, "gpt-4o")] == ["gpt-4o", "local"]
    assert not model_allowed(s, catalog.get("gpt-4o-mini")) and model_allowed(s, catalog.get("gpt-4o"))
    s = TenantSettings(forbidden_tiers=["local"])
    assert [m.name for m in r.tenant_chain(catalog, s, "gpt-4o")] == ["gpt-4o", "gpt-4o-mini",
                                                                       "claude-3-5-haiku-latest"]


def test_no_routable_model_uses_the_default():
    only_local = Catalog.from_settings({}, env={})
    model, tier, reason = choose(only_local, TenantSettings(), user("Compare A and B"))
    assert model == "local" and "no routable model for this tenant, using local" in reason


def test_downgrade_chain_is_the_cheapest_tier(catalog):
    r = Router()
    s = TenantSettings()
    chain = r.tenant_chain(catalog, s, "gpt-4o")
    assert [m.name for m in r.downgrade_chain(catalog, s, chain)] == ["gpt-4o-mini", "claude-3-5-haiku-latest", "local"]
    assert r.downgrade_chain(catalog, s, r.tenant_chain(catalog, s, "gpt-4o-mini")) is None
    assert r.downgrade_chain(catalog, TenantSettings(forbidden_tiers=["simple"]), chain) is None


def test_savings_are_the_difference_to_the_strong_tier(catalog):
    r = Router()
    s = TenantSettings()
    # gpt-4o: 1000 * 2.5 + 500 * 10 = 7500 µ$; gpt-4o-mini: 1000 * 0.15 + 500 * 0.6 = 450 µ$
    assert r.savings_micro_usd(catalog, s, "gpt-4o-mini", 1000, 500) == 7050
    assert r.savings_micro_usd(catalog, s, "gpt-4o-mini", 1000, 500, actual_cost_micro_usd=500) == 7000
    assert r.savings_micro_usd(catalog, s, "gpt-4o", 1000, 500) == 0
    assert r.savings_micro_usd(catalog, s, "claude-sonnet-4-0", 1000, 500) == 0  # dearer: never negative
    # The baseline is what "complex" routes to for this tenant.
    assert r.savings_micro_usd(catalog, TenantSettings(default_model="claude-sonnet-4-0"), "gpt-4o-mini",
                               1000, 500) == 1000 * 3 + 500 * 15 - 450
    assert r.savings_micro_usd(catalog, TenantSettings(forbidden_tiers=["complex"]), "gpt-4o-mini", 1000, 500) == 0


def test_new_tenant_settings_are_validated():
    s = TenantSettings.from_dict({"pinned_model": "gpt-4o", "forbidden_tiers": ["complex"], "rpm_limit": 60,
                                  "tpm_limit": 10_000, "budget_soft_ratio": 0.5, "budget_hard_action": "refuse",
                                  "budget_webhook_url": "https://hooks.example.com/x"})
    assert s.to_dict()["forbidden_tiers"] == ["complex"]
    for bad in ({"forbidden_tiers": "complex"}, {"pinned_model": ""}, {"rpm_limit": 0}, {"tpm_limit": 1.5},
                {"budget_soft_ratio": 0}, {"budget_soft_ratio": 1.2}, {"budget_hard_action": "downgrade"},
                {"budget_webhook_url": "hooks.example.com"},
                {"allowed_models": ["gpt-4o-mini"], "pinned_model": "gpt-4o"}):
        with pytest.raises(TenancyError):
            TenantSettings.from_dict(bad)


# -- examples files -------------------------------------------------------------------------


def test_examples_load_from_jsonl_and_yaml(tmp_path):
    y = tmp_path / "ex.yaml"
    y.write_text("examples:\n  - {text: hi, tier: simple}\n  - text: design it\n    tier: complex\n    grounded: true\n")
    ex = load_examples(y)
    assert [(e.text, e.tier, e.grounded) for e in ex] == [("hi", "simple", False), ("design it", "complex", True)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi", "tier": "simple"}\n{"text": "", "tier": "simple"}\n')
    with pytest.raises(RouterError, match=r"bad.jsonl:2: 'text'"):
        load_examples(bad)
    bad.write_text("{not json\n")
    with pytest.raises(RouterError, match="invalid JSON"):
        load_examples(bad)


def test_training_needs_two_tiers():
    from loadbear.gateway.router import Example

    with pytest.raises(RouterError, match="at least 2 tiers"):
        LearnedClassifier.train([Example("a", "simple"), Example("b", "simple")], embedder=object())


# -- the learned classifier (real MiniLM, trained once through the CLI) ---------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    from loadbear.cli import app

    out = tmp_path_factory.mktemp("router") / "router.json"
    result = CliRunner().invoke(app, ["router", "train", str(EXAMPLES), "--out", str(out), "--holdout", "0.25",
                                      "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output.strip().splitlines()[-1])


def test_cli_train_writes_a_small_model(trained):
    path, summary = trained
    assert summary["examples"] == 40 and summary["trained_on"] == 30 and summary["holdout"] == 10
    assert summary["tiers"] == [COMPLEX, SIMPLE]
    assert summary["train_accuracy"] >= 0.95 and summary["holdout_accuracy"] >= 0.7
    assert path.stat().st_size < 64_000
    data = json.loads(path.read_text())
    assert data["format"] == "loadbear-router/1" and data["meta"]["examples"] == 40


def test_learned_model_loads_and_predicts(trained, catalog, monkeypatch):
    path, _ = trained
    model = LearnedClassifier.load(path)
    texts = ["Can I pay with PayPal?",
             "Design a multi-region failover strategy for our payments database and analyse the trade-offs."]
    assert model.predict(texts) == [SIMPLE, COMPLEX]
    monkeypatch.setenv("LOADBEAR_ROUTER_MODEL_PATH", str(path))
    router = Router.from_settings(None)
    assert router.kind == "learned"
    d = router.route(catalog, TenantSettings(), user(texts[1]))
    assert (d.model, d.tier) == ("gpt-4o", COMPLEX)
    assert d.reason.startswith("complex (learned model router.json, p=") and d.reason.endswith("→ gpt-4o")
    meta = d.ledger_metadata()
    assert meta["classifier"] == "learned" and 0.5 < meta["confidence"] <= 1


async def test_aroute_runs_the_learned_model_off_the_loop(trained, catalog):
    router = Router(LearnedClassifier.load(trained[0]))
    d = await router.aroute(catalog, TenantSettings(), user("Where is my parcel?"))
    assert d.tier == SIMPLE and d.model == "gpt-4o-mini"


def test_damaged_model_files_are_refused(tmp_path, trained):
    p = tmp_path / "m.json"
    p.write_text("{}")
    with pytest.raises(RouterError, match="not a loadbear router model"):
        LearnedClassifier.load(p)
    data = json.loads(trained[0].read_text())
    data["features"] = ["tokens"]
    p.write_text(json.dumps(data))
    with pytest.raises(RouterError, match="retrain"):
        LearnedClassifier.load(p)
    with pytest.raises(RouterError, match="cannot read"):
        LearnedClassifier.load(tmp_path / "missing.json")


def test_cli_explain(trained):
    from loadbear.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["router", "explain", "Compare Redis and Memcached", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["tier"] == COMPLEX and out["classifier"] == "rules" and "comparison" in out["reason"]
    r = runner.invoke(app, ["router", "explain", "Where is my parcel?", "--model", str(trained[0])])
    assert r.exit_code == 0, r.output
    assert "tier:   simple (learned)" in r.output
    r = runner.invoke(app, ["router", "train", "/nonexistent.jsonl"])
    assert r.exit_code == 2 and "cannot read" in r.output
