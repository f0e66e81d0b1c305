"""Each eval metric on hand-built cases with known answers (no database, no model)."""

from __future__ import annotations

import pytest

from loadbear.evals.dataset import Case, ExpectedSource
from loadbear.evals.metrics import (
    Retrieved,
    cosine,
    groundedness,
    is_refusal,
    match_fact,
    metric_names,
    reference_text,
    retrieval_metrics,
    score_case,
    source_matches,
    summarize,
    tokens,
)
from loadbear.providers.local import NO_CONTEXT_ANSWER, NOT_FOUND_ANSWER, extract_answer

REFUNDS = ("## Refunds\n\nNew monthly subscriptions can be refunded in full within 14 days of the first payment. "
           "Annual subscriptions are refunded in full within 30 days.")
PRICES = "The Business plan costs $30 per seat per month, or $24 per seat per month when billed annually."
OTHER = "Our status page at status.example shows whether the service is up right now."


def chunk(rank, text, doc):
    return Retrieved(rank=rank, text=text, doc=doc, chunk_id=f"c{rank}")


def refund_case(**kw):
    base = dict(id="refund", query="How long do I have to ask for a refund on a new monthly subscription?",
                facts=["14 days", "first payment"],
                expected_sources=[ExpectedSource("billing/refunds.md", "refunded in full within 14 days")])
    base.update(kw)
    return Case(**base)


# -- normalisation and fact matching ---------------------------------------------------------

def test_tokens_normalise_numbers_symbols_and_contractions():
    assert tokens("Don't exceed 5,000 rows: $24/seat, 99.95%!") == \
        ["do", "not", "exceed", "5000", "rows", "$", "24", "seat", "99.95", "%"]
    assert tokens("Settings > Invoices > Numbering") == tokens("settings  invoices numbering")


@pytest.mark.parametrize("fact,text,how", [
    ("14 days", "Refunds within 14 days [1].", "exact"),
    ("5,000 rows", "at most 5000 rows per file", "exact"),
    ("Team, Business and Enterprise", "on the Team, Business, and Enterprise plans", "exact"),
    ("do not use a seat", "Accountants don't use a seat.", "exact"),
    ("Sync now", "press the sync now button", "exact"),
    ("7 and 14 days after", "reminders go out 7 and 14 days after the due date", "exact"),
    ("retries it 6 times after failures", "Brambleby retried it 6 times after a failure", "fuzzy"),
    ("payment reminders are sent on the due date", "payment reminders sent on the due date", "fuzzy"),
    ("14 days", "Refunds within 30 days.", None),  # a different number is never a fuzzy match
    ("first payment", "the payment that came first", None),  # two words: exact (or stemmed) only
    ("read-only", "", None),
])
def test_match_fact(fact, text, how):
    assert match_fact(fact, text).how == how


def test_fuzzy_match_needs_every_number_of_the_fact():
    assert match_fact("retried 6 times over 24 hours", "retried 6 times over 12 hours").how is None
    assert match_fact("retried 6 times over 24 hours", "retried 6 times over 24 hour").how == "fuzzy"


# -- retrieval ---------------------------------------------------------------------------------

def test_source_matching_uses_doc_and_normalised_quote():
    src = ExpectedSource("billing/refunds.md", "Refunded in FULL\n within   14 days")
    assert source_matches(src, chunk(1, REFUNDS, "billing/refunds.md"))
    assert not source_matches(src, chunk(1, REFUNDS, "billing/other.md"))  # same text, other document
    assert not source_matches(src, chunk(1, "Refunds are not available.", "billing/refunds.md"))
    assert source_matches(ExpectedSource("billing/refunds.md"), chunk(1, "anything", "billing/refunds.md"))


def test_hit_recall_and_mrr_at_k():
    sources = [ExpectedSource("billing/refunds.md", "within 14 days"), ExpectedSource("billing/plans.md", "$24 per seat")]
    chunks = [chunk(1, OTHER, "service/status.md"), chunk(2, REFUNDS, "billing/refunds.md"),
              chunk(3, OTHER, "service/status.md"), chunk(4, PRICES, "billing/plans.md")]
    m, matches = retrieval_metrics(sources, chunks, [1, 3, 5])
    assert m == {"hit@1": 0.0, "recall@1": 0.0, "hit@3": 1.0, "recall@3": 0.5, "hit@5": 1.0, "recall@5": 1.0,
                 "mrr": 0.5}
    assert matches == [[], [0], [], [1]]


def test_empty_retrieval_scores_zero_and_no_sources_scores_nothing():
    m, matches = retrieval_metrics([ExpectedSource("billing/refunds.md")], [], [1, 5])
    assert m == {"hit@1": 0.0, "recall@1": 0.0, "hit@5": 0.0, "recall@5": 0.0, "mrr": 0.0} and matches == []
    assert retrieval_metrics([], [chunk(1, REFUNDS, "billing/refunds.md")], [5]) == ({}, [[]])


def test_context_contains_answer_needs_every_fact():
    case = refund_case(facts=["14 days", "first payment", "$24 per seat per month"])
    s = score_case(case, [chunk(1, REFUNDS, "billing/refunds.md")], "x", k=5)
    assert s.metrics["retrieval.context_contains_answer"] == 0.0
    assert s.metrics["retrieval.context_fact_coverage"] == pytest.approx(2 / 3, abs=1e-6)
    s = score_case(case, [chunk(1, REFUNDS, "billing/refunds.md"), chunk(2, PRICES, "billing/plans.md")], "x", k=5)
    assert s.metrics["retrieval.context_contains_answer"] == 1.0


# -- generation --------------------------------------------------------------------------------

@pytest.mark.parametrize("answer", [
    NOT_FOUND_ANSWER, NO_CONTEXT_ANSWER,
    "The provided documents do not mention HIPAA.",
    "I’m sorry, I don’t have information about non-profit discounts.",
    "That isn't covered in the documentation.",
    "There is no information about on-premises installs in the sources.",
    "I cannot answer that from the help centre articles.",
    "This is not mentioned in the provided context.",
    "That's not in the documents.",
    "Sorry, that isn't covered in the help centre.",
    "The sources don't mention a non-profit discount.",
    "We don't have any information on Salesforce.",
])
def test_refusals_are_recognised(answer):
    assert is_refusal(answer)


@pytest.mark.parametrize("answer", [
    "Apex domains are not supported, because they cannot have a CNAME record [1].",
    "Xero is not included in the Team plan; it needs Business [2].",
    "The Xero integration is not in the Team plan [1].",
    "If you can't find the invoice, check the archive [1].",
    "No data is deleted when you cancel [2].",
    "We don't have a minimum contract on the Team plan [1].",
    "Damage isn't covered by the warranty [3].",
    "New monthly subscriptions can be refunded in full within 14 days of the first payment [1].",
    "", None,
])
def test_answers_are_not_refusals(answer):
    assert not is_refusal(answer)


def test_groundedness_counts_supported_sentences():
    ctx = [REFUNDS, PRICES]
    score, rows = groundedness("Monthly subscriptions can be refunded within 14 days [1]. "
                               "The Business plan costs $24 per seat per month billed annually [2].", ctx)
    assert score == 1.0 and all(r["supported"] for r in rows)
    # A made-up number makes a sentence unsupported even when its words are all there.
    score, rows = groundedness("Monthly subscriptions can be refunded within 21 days. Refunds need a form "
                               "signed by your lawyer and notarised in Geneva.", ctx)
    assert score == 0.0 and rows[0]["missing_numbers"] == ["21"]
    assert groundedness(NOT_FOUND_ANSWER, ctx) == (None, [])  # a refusal claims nothing
    assert groundedness("Refunds take 14 days.", [])[0] == 0.0  # nothing retrieved: nothing supports it


def test_fact_coverage_exact_and_fuzzy():
    case = refund_case(facts=["14 days", "first payment", "payment reminders are sent on the due date"])
    s = score_case(case, [chunk(1, REFUNDS, "billing/refunds.md")],
                   "Refunds within 14 days of the first payment; payment reminders sent on the due date.", k=5)
    assert s.metrics["generation.fact_coverage"] == 1.0
    assert s.metrics["generation.fact_coverage_exact"] == pytest.approx(2 / 3, abs=1e-6)
    assert [f["in_answer"] for f in s.facts] == ["exact", "exact", "fuzzy"]


def test_semantic_similarity_inputs():
    assert cosine([1, 0], [1, 0]) == 1.0 and cosine([1, 0], [0, 1]) == 0.0 and cosine([0, 0], [1, 1]) == 0.0
    assert reference_text(refund_case()) == "refunded in full within 14 days"  # the quotes, when labelled
    assert reference_text(refund_case(expected_sources=[])) == "14 days; first payment"
    assert reference_text(refund_case(reference="Within 14 days.")) == "Within 14 days."
    assert reference_text(Case(id="n", query="q", expect_refusal=True)) is None
    s = score_case(refund_case(), [], NOT_FOUND_ANSWER, k=5, similarity=0.123456)
    assert s.metrics["generation.semantic_similarity"] == 0.1235


# -- diagnosis ---------------------------------------------------------------------------------

def test_pass_with_the_local_models_own_answer():
    chunks = [chunk(1, REFUNDS, "billing/refunds.md")]
    answer = extract_answer(refund_case().query, [{"text": REFUNDS, "index": 1}])
    s = score_case(refund_case(), chunks, answer, k=5)
    assert s.diagnosis == "pass" and s.metrics["pass"] == 1.0
    assert s.metrics["generation.fact_coverage"] == 1.0 and s.metrics["generation.groundedness"] == 1.0
    assert s.metrics["retrieval.hit@1"] == 1.0 and s.metrics["generation.false_refusal"] == 0.0


def test_retrieval_succeeds_but_generation_fails():
    chunks = [chunk(1, REFUNDS, "billing/refunds.md")]
    s = score_case(refund_case(), chunks, "Annual subscriptions are refunded in full within 30 days [1].", k=5)
    assert s.metrics["retrieval.recall@5"] == 1.0 and s.metrics["retrieval.context_contains_answer"] == 1.0
    assert s.metrics["generation.fact_coverage"] == 0.0
    assert s.diagnosis == "generation_miss"
    s = score_case(refund_case(), chunks, NOT_FOUND_ANSWER, k=5)
    assert s.diagnosis == "generation_miss" and s.metrics["generation.false_refusal"] == 1.0


def test_empty_retrieval_is_a_retrieval_miss():
    s = score_case(refund_case(), [], NOT_FOUND_ANSWER, k=5)
    assert s.diagnosis == "retrieval_miss"
    assert s.metrics["retrieval.hit@5"] == 0.0 and s.metrics["retrieval.mrr"] == 0.0
    assert s.metrics["retrieval.context_contains_answer"] == 0.0
    assert "generation.groundedness" not in s.metrics  # a refusal has no claims to check


def test_both_when_retrieval_misses_and_generation_drops_what_it_had():
    case = refund_case(facts=["14 days", "$24 per seat per month"],
                       expected_sources=[ExpectedSource("billing/refunds.md"), ExpectedSource("billing/plans.md")])
    chunks = [chunk(1, REFUNDS, "billing/refunds.md")]  # has "14 days", not the price
    assert score_case(case, chunks, "Refunds: 14 days [1].", k=5).diagnosis == "retrieval_miss"
    assert score_case(case, chunks, NOT_FOUND_ANSWER, k=5).diagnosis == "both"


def test_labelled_sources_found_clear_retrieval_even_for_derived_facts():
    # "$300" (10 seats x $30) is computed, never retrieved: with every labelled source retrieved
    # the miss is the generator's, not retrieval's.
    case = refund_case(facts=["$30 per seat per month", "$300"],
                       expected_sources=[ExpectedSource("billing/plans.md", "$30 per seat per month")])
    s = score_case(case, [chunk(1, PRICES, "billing/plans.md")], "The Business plan costs $30 per seat per month.", k=5)
    assert s.metrics["retrieval.context_contains_answer"] == 0.0 and s.metrics["retrieval.recall@5"] == 1.0
    assert s.diagnosis == "generation_miss"
    # Sources without facts: retrieval alone decides, and a refusal is the generator's miss.
    only = refund_case(facts=[], expected_sources=[ExpectedSource("billing/plans.md")])
    assert score_case(only, [chunk(1, PRICES, "billing/plans.md")], "It costs $30.", k=5).diagnosis == "pass"
    assert score_case(only, [chunk(1, PRICES, "billing/plans.md")], NOT_FOUND_ANSWER, k=5).diagnosis == "generation_miss"
    assert score_case(only, [chunk(1, OTHER, "service/status.md")], "It costs $30.", k=5).diagnosis == "retrieval_miss"


def test_no_answer_cases_score_the_refusal():
    case = Case(id="hipaa", query="Is Brambleby HIPAA compliant?", expect_refusal=True, tags=["no-answer"])
    chunks = [chunk(1, OTHER, "service/status.md")]
    s = score_case(case, chunks, NOT_FOUND_ANSWER, k=5)
    assert s.diagnosis == "pass" and s.metrics["generation.correct_refusal"] == 1.0
    assert not any(n.startswith("retrieval.") for n in s.metrics)  # nothing to find, nothing scored
    s = score_case(case, chunks, "Yes, Brambleby is HIPAA compliant.", k=5)
    assert s.diagnosis == "generation_miss" and s.metrics["generation.correct_refusal"] == 0.0
    assert s.metrics["generation.groundedness"] == 0.0


def test_pipeline_error_keeps_retrieval_scores():
    s = score_case(refund_case(), [chunk(1, REFUNDS, "billing/refunds.md")], None, k=5)
    assert s.diagnosis == "error" and s.metrics["retrieval.hit@1"] == 1.0
    assert not any(n.startswith("generation.") for n in s.metrics) and "pass" not in s.metrics
    assert score_case(refund_case(), None, None, k=5).metrics == {}  # failed before retrieval


def test_summary_means_counts_and_tags():
    results = [
        {"diagnosis": "pass", "metrics": {"pass": 1.0, "retrieval.hit@5": 1.0, "generation.fact_coverage": 1.0},
         "tags": ["billing"], "latency_ms": 10, "served_model": "local", "usage": {"prompt_tokens": 5}},
        {"diagnosis": "generation_miss", "metrics": {"pass": 0.0, "retrieval.hit@5": 1.0, "generation.fact_coverage": 0.5},
         "tags": ["billing", "multi-doc"], "latency_ms": 30, "served_model": "local"},
        {"diagnosis": "error", "metrics": {"retrieval.hit@5": 0.0}, "tags": ["multi-doc"]},
        {"diagnosis": "pass", "metrics": {"pass": 1.0, "generation.correct_refusal": 1.0}, "expect_refusal": True,
         "tags": ["no-answer"]},
    ]
    s = summarize(results)
    assert s["metrics"] == {"generation.correct_refusal": 1.0, "generation.fact_coverage": 0.75,
                            "retrieval.hit@5": 0.6667, "pass_rate": 0.5}
    assert s["counts"]["retrieval.hit@5"] == 3 and s["counts"]["generation.fact_coverage"] == 2
    assert s["diagnosis"] == {"pass": 2, "retrieval_miss": 0, "generation_miss": 1, "both": 0, "error": 1}
    assert s["by_tag"]["billing"] == {"cases": 2, "pass": 1, "pass_rate": 0.5}
    assert s["by_tag"]["multi-doc"]["pass_rate"] == 0.0
    assert (s["answerable"], s["no_answer"], s["served_models"]) == (3, 1, {"local": 2})
    assert set(s["metrics"]) <= set(metric_names(5))


def test_semantic_similarity_with_the_local_embedding_model():
    from loadbear.evals.metrics import semantic_similarities
    from loadbear.knowledge.embeddings import get_embedder

    reference = "New monthly subscriptions can be refunded in full within 14 days of the first payment."
    paraphrase, unrelated = semantic_similarities(
        [("You can get a full refund within 14 days of your first payment [1].", reference),
         ("Our status page shows whether the service is up right now [2].", reference)], get_embedder(None))
    assert paraphrase > 0.6 and unrelated < 0.3
    assert semantic_similarities([(reference + " [1]", reference)], get_embedder(None))[0] == pytest.approx(1.0, abs=1e-5)
