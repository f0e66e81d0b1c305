"""The eval runner through the in-process Gateway: stored runs per tenant (both backends), ledger
marking, reproducibility, compare with flips, the LLM judge and pipeline failures.

A small knowledge base with a fast hashing embedder keeps these tests quick; the real MiniLM
pipeline runs in the baseline documented in docs/evals.md.
"""

from __future__ import annotations

import numpy as np
import pytest

from loadbear.evals.compare import compare_runs
from loadbear.evals.dataset import parse_dataset
from loadbear.evals.runner import EvalConfig, run_eval
from loadbear.evals.store import EvalStore, RunNotFound
from loadbear.gateway.errors import ApiError
from loadbear.providers.base import ErrorKind, ProviderError
from loadbear.providers.local import hash_embedding

DOCS = {
    "billing/refunds.md": "# Refunds\n\nNew monthly subscriptions can be refunded in full within 14 days of the "
                          "first payment. Annual subscriptions can be refunded within 30 days.\n",
    "security/sso.md": "# Single sign-on\n\nSingle sign-on with SAML is available on the Business and Enterprise "
                       "plans. Okta and Azure AD are supported.\n",
    "billing/plans.md": "# Plans\n\nThe Business plan costs $30 per seat per month, or $24 per seat per month when "
                        "billed annually. The Team plan costs $15 per seat per month.\n",
}
DATASET = """
name: mini
version: 1
cases:
  - id: refund-window
    query: How long do I have to ask for a refund on a new monthly subscription?
    expected: ["14 days", "first payment"]
    expected_sources: [{doc: billing/refunds.md, quote: "refunded in full within 14 days"}]
    feature: helpdesk
    tags: [billing]
  - id: sso-price
    query: What is the cheapest per-seat price for a plan with SAML single sign-on?
    expected: ["Business", "$24 per seat per month"]
    expected_sources: [security/sso.md, {doc: billing/plans.md, quote: "$24 per seat per month"}]
    tags: [multi-doc]
  - id: hipaa
    query: Is the product HIPAA compliant?
    expect_refusal: true
    feature: helpdesk
    tags: [no-answer]
"""


class HashEmbedder:
    """Deterministic lexical vectors: fast, offline, good enough to retrieve in a tiny corpus."""

    name = "test-hash-256"
    dim = 256

    def embed(self, texts):
        return np.asarray([hash_embedding(t, self.dim) for t in texts], dtype=np.float32).reshape(-1, self.dim)


@pytest.fixture
def gateway_factory(db_url, monkeypatch):
    import loadbear.knowledge.embeddings as embeddings
    from loadbear import Gateway, Settings
    from loadbear.config.catalog import Catalog
    from loadbear.providers.registry import ProviderRegistry
    from loadbear.providers.scripted import ScriptedProvider

    monkeypatch.setattr(embeddings, "get_embedder", lambda name=None, catalog=None, **kw: HashEmbedder())
    made = []

    def make():
        settings = Settings.load(env={}, config_path=None, database_url=db_url, ledger_flush_interval_ms=5)
        catalog = Catalog.from_settings({"judge-llm": {"provider": "scripted"}, "flaky": {"provider": "scripted", "max_retries": 0}},
                                        env={}, default_model="local")
        scripted = ScriptedProvider()
        gw = Gateway(settings, catalog=catalog, providers=ProviderRegistry({"scripted": scripted}))
        gw.scripted = scripted
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()


@pytest.fixture
def kb(gateway_factory):
    gw = gateway_factory()
    gw.migrate()
    acme = gw.tenants.create_tenant("acme", "Acme")
    globex = gw.tenants.create_tenant("globex", "Globex")  # no documents at all
    for ext, text in DOCS.items():
        gw.knowledge.ingest_text(acme.id, text=text, external_id=ext, content_type="text/markdown")
    return gw, acme, globex


def ledger(gw, sql, params=()):
    gw.ledger.flush(10)
    with gw.db.system_tx(write=False) as c:
        return c.fetchall(sql, params)


def _meta(row):
    from loadbear.storage.values import loads

    return loads(row["metadata"])


async def test_a_run_is_scored_stored_per_tenant_and_marked_in_the_ledger(kb):
    gw, acme, globex = kb
    ds = parse_dataset(DATASET, "mini.yaml")
    run = await run_eval(gw, acme, ds, EvalConfig(label="first", concurrency=2))
    results = {r["case_id"]: r for r in run["results"]}
    assert run["status"] == "completed" and run["label"] == "first"
    assert results["refund-window"]["diagnosis"] == "pass"
    assert results["refund-window"]["metrics"]["retrieval.hit@1"] == 1.0
    assert results["refund-window"]["retrieved"][0]["doc"] == "billing/refunds.md"
    assert results["hipaa"]["diagnosis"] == "pass" and results["hipaa"]["refused"] is True
    s = run["summary"]
    assert s["cases"] == 3 and s["no_answer"] == 1 and sum(s["diagnosis"].values()) == 3
    assert s["served_models"] == {"local": 3} and s["k"] == 5
    assert "generation.semantic_similarity" in s["metrics"]  # with the (test) local embedder

    fp = run["fingerprint"]
    assert fp["models"]["chain"][0]["name"] == "local" and fp["embedding_model"] == "test-hash-256"
    assert fp["knowledge_base"]["documents"] == 3 and fp["chunking"]["chunk_tokens"] == 350
    assert len(fp["prompt"]["template_sha256"]) == 16 and fp["retrieval"]["top_k"] == 5

    # The ledger rows: the case's feature (default "eval"), tagged as eval traffic.
    rows = ledger(gw, "SELECT feature, metadata FROM ai_interactions")
    assert sorted(r["feature"] for r in rows) == ["eval", "helpdesk", "helpdesk"]
    assert {_meta(r)["eval_run"] for r in rows} == {run["id"]}
    assert {_meta(r)["eval_case"] for r in rows} == {"refund-window", "sso-price", "hipaa"}

    # Stored and read back the same; another tenant sees none of it.
    store = EvalStore(gw.db)
    stored = store.get_run(acme.id, run["id"])
    assert stored["summary"] == s and stored["fingerprint"] == fp and stored["pipeline_hash"] == run["pipeline_hash"]
    back = store.results(acme.id, run["id"])
    assert [r["case_id"] for r in back] == ["refund-window", "sso-price", "hipaa"]
    assert back[0]["metrics"] == results["refund-window"]["metrics"] and back[0]["answer"] == results["refund-window"]["answer"]
    assert store.resolve(acme.id, "first")["id"] == run["id"] == store.resolve(acme.id, run["id"][:13])["id"]
    assert store.find_tenant(run["id"]) == acme.id
    assert store.get_run(globex.id, run["id"]) is None and store.results(globex.id, run["id"]) == []
    assert store.list_runs(globex.id) == []
    with pytest.raises(RunNotFound):
        store.resolve(globex.id, run["id"])

    # Empty retrieval for a tenant without documents: retrieval misses, and the refusal still passes.
    empty = await run_eval(gw, globex, ds, EvalConfig(similarity=False))
    diag = {r["case_id"]: r["diagnosis"] for r in empty["results"]}
    assert diag == {"refund-window": "retrieval_miss", "sso-price": "retrieval_miss", "hipaa": "pass"}
    assert empty["summary"]["metrics"]["retrieval.hit@5"] == 0.0
    assert "generation.semantic_similarity" not in empty["summary"]["metrics"]
    assert [r["id"] for r in store.list_runs(acme.id)] == [run["id"]]


async def test_same_data_and_pipeline_give_the_same_scores_and_a_change_shows_as_flips(kb):
    gw, acme, _ = kb
    ds = parse_dataset(DATASET, "mini.yaml")
    a = await run_eval(gw, acme, ds, EvalConfig(concurrency=1))
    b = await run_eval(gw, acme, ds, EvalConfig(concurrency=8))
    assert a["pipeline_hash"] == b["pipeline_hash"] and a["summary"]["metrics"] == b["summary"]["metrics"]
    assert [r["metrics"] for r in a["results"]] == [r["metrics"] for r in b["results"]]
    same = compare_runs(a, a["results"], b, b["results"])
    assert same["same_pipeline"] and same["fingerprint_changes"] == []
    assert all(m["delta"] in (0, None) for m in same["metrics"])
    assert same["flips"] == {"regressions": [], "fixes": [], "changed": []}

    # The refund policy changes: the knowledge base's version moves and the case regresses.
    gw.knowledge.ingest_text(acme.id, text="# Refunds\n\nRefunds are no longer offered on any plan.\n",
                             external_id="billing/refunds.md", content_type="text/markdown")
    c = await run_eval(gw, acme, ds, EvalConfig(concurrency=8))
    cmp = compare_runs(b, b["results"], c, c["results"])
    assert not cmp["same_pipeline"] and cmp["same_dataset"]
    assert "knowledge_base.version" in {ch["field"] for ch in cmp["fingerprint_changes"]}
    assert [r["case_id"] for r in cmp["flips"]["regressions"]] == ["refund-window"]
    assert cmp["flips"]["regressions"][0]["a"] == "pass"
    pass_rate = next(m for m in cmp["metrics"] if m["name"] == "pass_rate")
    assert pass_rate["delta"] < 0 and cmp["metrics"][0]["name"] == "pass_rate"


async def test_a_bad_model_fails_before_any_case(kb):
    gw, acme, _ = kb
    ds = parse_dataset(DATASET, "mini.yaml")
    with pytest.raises(ApiError) as info:
        await run_eval(gw, acme, ds, EvalConfig(model="no-such-model"))
    assert info.value.status == 404
    assert EvalStore(gw.db).list_runs(acme.id) == []
    assert ledger(gw, "SELECT id FROM ai_interactions") == []


async def test_failed_pipeline_cases_are_errors_not_scores(kb):
    gw, acme, _ = kb
    gw.scripted.script([ProviderError(ErrorKind.SERVER_ERROR, "boom")] * 3, model="flaky")
    ds = parse_dataset(DATASET, "mini.yaml")
    run = await run_eval(gw, acme, ds, EvalConfig(model="flaky", similarity=False))
    assert {r["diagnosis"] for r in run["results"]} == {"error"}
    first = run["results"][0]
    assert first["error"].startswith("degraded") and first["metrics"]["retrieval.hit@1"] == 1.0
    assert run["summary"]["diagnosis"]["error"] == 3 and run["summary"]["metrics"]["pass_rate"] == 0.0
    # A request the model refuses (a 400 to the caller): an error, with no scores at all for it.
    gw.scripted.script([ProviderError(ErrorKind.CONTEXT_LENGTH, "too long", status=400)], model="flaky")
    gw.scripted.script(["No idea.", "Not in the documents."],
                       model="flaky")
    run = await run_eval(gw, acme, ds, EvalConfig(model="flaky", similarity=False, concurrency=1))
    first = run["results"][0]
    assert first["diagnosis"] == "error" and first["error"].startswith("400 context_length_exceeded")
    assert first["metrics"] == {} and first["retrieved"] == []
    assert [r["diagnosis"] for r in run["results"][1:]] == ["generation_miss", "pass"]
    assert run["summary"]["counts"]["retrieval.hit@1"] == 1  # only the case that got an answer


async def test_the_llm_judge_goes_through_the_gateway_as_eval_traffic(kb):
    from loadbear.evals.judge import JudgeError

    gw, acme, _ = kb
    ds = parse_dataset(DATASET, "mini.yaml")
    with pytest.raises(JudgeError, match="cannot judge"):
        await run_eval(gw, acme, ds, EvalConfig(judge="local"))
    gw.scripted.script(['{"correct": 1, "grounded": 0.5, "reason": "fine"}', "Sure! ```json\n{\"correct\": 0.25, "
                        "\"grounded\": 2}```", "no verdict here"], model="judge-llm")
    run = await run_eval(gw, acme, ds, EvalConfig(judge="judge-llm", concurrency=1, similarity=False))
    r = run["results"]
    assert (r[0]["metrics"]["judge.correctness"], r[0]["metrics"]["judge.groundedness"]) == (1.0, 0.5)
    assert (r[1]["metrics"]["judge.correctness"], r[1]["metrics"]["judge.groundedness"]) == (0.25, 1.0)  # clamped
    assert "judge.correctness" not in r[2]["metrics"] and "did not reply with JSON" in r[2]["judge"]["error"]
    assert run["summary"]["judge"] == {"model": "judge-llm", "judged": 3, "failed": 1}
    # The judge never changes the diagnosis: it is the same as without a judge.
    plain = await run_eval(gw, acme, ds, EvalConfig(similarity=False))
    assert [x["diagnosis"] for x in r] == [x["diagnosis"] for x in plain["results"]]
    # Judge calls are ledger rows under feature "eval", marked with the run and their role.
    rows = [x for x in ledger(gw, "SELECT feature, model, metadata FROM ai_interactions") if x["model"] == "judge-llm"]
    assert len(rows) == 3 and {x["feature"] for x in rows} == {"eval"}
    assert all(_meta(x)["eval_run"] == run["id"] and _meta(x)["eval_role"] == "judge" for x in rows)
    judge_prompt = gw.scripted.calls[0].request.messages[-1]["content"]
    assert "Expected facts:\n- 14 days\n- first payment" in judge_prompt and "Retrieved sources:" in judge_prompt
