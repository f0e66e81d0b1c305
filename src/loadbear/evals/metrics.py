"""Deterministic, offline metrics: retrieval vs generation, per case, and their summary.

Retrieval (over the ``k`` chunks the pipeline retrieved, ranks from 1):

* ``hit@n``: some chunk among the first ``n`` matches an expected source;
* ``recall@n``: the share of expected sources matched by a chunk among the first ``n``;
* ``mrr``: 1 / the rank of the first matching chunk (0 when none matches);
* ``context_contains_answer``: every expected fact is in the retrieved text (1 or 0), and
  ``context_fact_coverage``, the share of facts that are.

A retrieved chunk matches an expected source when its document's external id equals ``doc``
and, when a quote is given, the chunk text contains the quote (case and whitespace
normalised), so the labels survive re-chunking.

Generation:

* ``fact_coverage``: the share of expected facts the answer contains, exactly after
  normalisation or by a fuzzy match (``fact_coverage_exact`` counts only the former);
* ``semantic_similarity``: cosine similarity of the answer and the reference answer with a
  local embedding model (computed by the runner, passed in here);
* ``groundedness``: the share of answer sentences supported by the retrieved text;
* ``correct_refusal`` (no-answer cases): the answer says the documents do not cover it;
  ``false_refusal`` (answerable cases): the answer refuses and contains no expected fact.

Diagnosis of a case: ``pass``, ``retrieval_miss``, ``generation_miss``, ``both`` (or ``error``
when the pipeline failed); see :func:`diagnose`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from typing import Any, Iterable, Sequence

from loadbear.evals.dataset import Case, ExpectedSource

__all__ = [
    "DIAGNOSES", "METRICS_VERSION", "Thresholds", "Retrieved", "FactMatch", "CaseScore",
    "normalize", "tokens", "match_fact", "source_matches", "is_refusal", "answer_sentences",
    "groundedness", "retrieval_metrics", "score_case", "diagnose", "summarize", "cosine", "reference_text",
    "metric_ks", "metric_names", "semantic_similarities",
]

METRICS_VERSION = 1
DIAGNOSES = ("pass", "retrieval_miss", "generation_miss", "both", "error")


@dataclass(frozen=True)
class Thresholds:
    # A fuzzy fact match: token-level similarity (difflib ratio on lightly stemmed words) of the
    # fact and its best window in the text, numbers always exact.
    fuzzy: float = 0.8
    # A case passes when the answer contains at least this share of its expected facts.
    fact_pass: float = 1.0
    # An answer sentence is supported when this share of its content words is in the
    # retrieved text (and every number in it is).
    sentence_support: float = 0.75

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# -- text normalisation ---------------------------------------------------------------------

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_NEGATIONS = ((re.compile(r"\bcan't\b"), "can not"), (re.compile(r"\bwon't\b"), "will not"),
              (re.compile(r"\bcannot\b"), "can not"), (re.compile(r"n't\b"), " not"))
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TOKEN = re.compile(r"[^\W_]+(?:\.\d+)*|[$%€£@#+]")
_CITATION = re.compile(r"\s*\[\d+(?:\s*[,\-–]\s*\d+)*\]")
_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case-folded, NFKC, whitespace collapsed: how quotes are compared with chunk text."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).casefold()).strip()


def tokens(text: str) -> list[str]:
    """Words and meaningful symbols, lower-cased: ``"$24 per seat"`` → ``["$", "24", "per", "seat"]``.

    Thousands separators are dropped (``5,000`` = ``5000``), decimals kept (``99.95``),
    contractions expanded (``don't`` = ``do not``), possessives and other punctuation dropped.
    """
    t = normalize(text)
    for pattern, repl in _NEGATIONS:
        t = pattern.sub(repl, t)
    t = t.replace("'s ", " ").replace("'", "")
    t = _THOUSANDS.sub("", t)
    return _TOKEN.findall(t)


def _stem(word: str) -> str:
    """A light stemmer, so that "retries"/"retried"/"retry" and "failures"/"failure" meet
    (the ``local`` model's own stemmer leaves "retried" and "retries" apart)."""
    if len(word) <= 3 or any(ch.isdigit() for ch in word):
        return word
    if word.endswith(("ies", "ied")) and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "zes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:-1] if len(word) > 3 and word.endswith("e") else word


def _has_digit(tok: str) -> bool:
    return any(ch.isdigit() for ch in tok)


class _Text:
    """A text prepared for fact matching (tokens, stems, sets), built once per text."""

    __slots__ = ("toks", "joined", "stems", "stem_set", "tok_set")

    def __init__(self, text: str) -> None:
        self.toks = tokens(_CITATION.sub("", text))
        self.joined = " " + " ".join(self.toks) + " "
        self.stems = [_stem(t) for t in self.toks]
        self.stem_set = set(self.stems)
        self.tok_set = set(self.toks)


@dataclass(frozen=True)
class FactMatch:
    how: str | None  # "exact", "fuzzy" or None
    score: float

    @property
    def found(self) -> bool:
        return self.how is not None


def match_fact(fact: str, text: "str | _Text", fuzzy: float = Thresholds.fuzzy) -> FactMatch:
    """Whether ``text`` contains ``fact``: ``exact`` (same tokens in a row after normalisation),
    ``fuzzy`` (the same lightly stemmed words in a row, or a window of the text at least ``fuzzy``
    similar with every number of the fact present), or not at all."""
    t = text if isinstance(text, _Text) else _Text(text)
    f = tokens(fact)
    if not f:
        return FactMatch(None, 0.0)
    if " " + " ".join(f) + " " in t.joined:
        return FactMatch("exact", 1.0)
    fs = [_stem(x) for x in f]
    n = len(fs)
    if any(_has_digit(x) and x not in t.tok_set for x in f):
        return FactMatch(None, 0.0)  # a number that is not there is never a match
    fset = set(fs)
    if len(fset & t.stem_set) < max(1, math.ceil(len(fset) / 2)):
        return FactMatch(None, 0.0)
    best = 0.0
    stems = t.stems
    for size in (n, n - 1, n + 1, n + 2):
        if size < 1 or size > len(stems):
            continue
        for start in range(len(stems) - size + 1):
            if stems[start] not in fset and stems[start + size - 1] not in fset:
                continue
            window = stems[start:start + size]
            if window == fs:
                return FactMatch("fuzzy", 1.0)
            if n < 3:
                continue  # one or two words: only an exact or stemmed match counts
            if any(_has_digit(x) and x not in window for x in f):
                continue
            ratio = SequenceMatcher(None, fs, window, autojunk=False).ratio()
            if ratio > best:
                best = ratio
    if best >= fuzzy:
        return FactMatch("fuzzy", round(best, 4))
    return FactMatch(None, round(best, 4))


# -- retrieval ------------------------------------------------------------------------------


@dataclass
class Retrieved:
    """A retrieved chunk as the metrics see it (``rank`` from 1)."""

    rank: int
    text: str
    doc: str | None = None
    title: str | None = None
    chunk_id: str | None = None
    score: float = 0.0
    document_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_matches(source: ExpectedSource, chunk: Retrieved) -> bool:
    if chunk.doc != source.doc:
        return False
    return source.quote is None or normalize(source.quote) in normalize(chunk.text)


def retrieval_metrics(sources: Sequence[ExpectedSource], chunks: Sequence[Retrieved],
                      ks: Iterable[int]) -> tuple[dict[str, float], list[list[int]]]:
    """hit@n, recall@n for each n of ``ks`` and MRR; also, per chunk, the indexes of the
    expected sources it matches. Empty ``sources``: no metrics (nothing to find)."""
    matches = [[i for i, s in enumerate(sources) if source_matches(s, c)] for c in chunks]
    if not sources:
        return {}, matches
    out: dict[str, float] = {}
    for n in ks:
        top = matches[:n]
        found = {i for m in top for i in m}
        out[f"hit@{n}"] = 1.0 if found else 0.0
        out[f"recall@{n}"] = round(len(found) / len(sources), 6)
    first = next((rank for rank, m in enumerate(matches, 1) if m), None)
    out["mrr"] = round(1.0 / first, 6) if first else 0.0
    return out, matches


# -- generation -----------------------------------------------------------------------------

_DOCS = r"(?:provided |available |given |retrieved |supplied )?(?:documents?|sources?|context|documentation|docs|knowledge base|help ?cent(?:er|re)|articles?|materials?|information provided)"
_NOT = r"(?:\bnot|n't)"
_REFUSALS = [re.compile(p) for p in (
    # first person only: "If you can't find the invoice, ..." is an answer
    r"\b(?:i|we) (?:could not|couldn't|can not|cannot|can't|was unable to|wasn't able to|am unable to|"
    r"am not able to|did not|didn't|do not|don't) (?:find|answer|help with that|determine|say|tell|see)\b",
    r"\bunable to (?:find|answer|determine)\b",
    r"\b(?:i|we) (?:do not|don't) (?:have|see) (?:any |enough |the |specific |relevant )?"
    r"(?:information|details|data|documentation|mention)\b",
    r"\b(?:i|we) (?:do not|don't) know\b",
    rf"{_NOT} (?:mentioned|covered|specified|included|stated|addressed|described|documented|found|available|"
    rf"present|provided) (?:anywhere )?(?:in|by|within) (?:the |these |those |your |our |any )?{_DOCS}",
    rf"\b(?:the |these |those )?{_DOCS} (?:do|does|did) ?(?:not|n't) (?:seem to )?(?:cover|mention|contain|say|"
    r"include|specify|provide|address|answer|state|describe|discuss|have)\b",
    r"\b(?:there is|there's|there are|i have|i found|we have) no (?:relevant |specific )?(?:information|mention|"
    r"details?|documentation)\b",
    r"\bno (?:relevant |specific )?(?:information|mention|details?) (?:about|on|regarding|of|for|in|that)\b",
    rf"\b(?:outside|beyond) (?:the scope of )?(?:the |these )?{_DOCS}",
    rf"(?:\bnot|n't|\bnothing) (?:anywhere )?in (?:the |these |your |our )?{_DOCS}",
    r"\bno documents were provided\b",
)]


def is_refusal(answer: str | None) -> bool:
    """Whether the answer declines: "I couldn't find that in the provided documents." (the
    ``local`` model), "the documents do not mention ...", "I don't have information ...", etc."""
    if not answer or not answer.strip():
        return False
    text = normalize(answer)
    return any(p.search(text) for p in _REFUSALS)


_SENT_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")


def answer_sentences(answer: str) -> list[str]:
    """The answer's sentences, citation markers removed."""
    text = _CITATION.sub("", answer or "")
    out = []
    for part in _SENT_SPLIT.split(text):
        part = _BULLET.sub("", part).strip()
        if part and any(ch.isalnum() for ch in part):
            out.append(part)
    return out


def _content_terms(text: str) -> set[str]:
    from loadbear.providers.local import terms  # the local model's words: stop words out, stemmed

    return set(terms(text))


def groundedness(answer: str, contexts: Sequence[str],
                 threshold: float = Thresholds.sentence_support) -> tuple[float | None, list[dict[str, Any]]]:
    """The share of answer sentences supported by the retrieved text: a sentence is supported
    when every number in it appears in the context and at least ``threshold`` of its content
    words do. Sentences that decline ("I couldn't find ...") are not claims and are skipped;
    None when nothing is left to judge."""
    ctx_terms: set[str] = set()
    ctx_numbers: set[str] = set()
    for c in contexts:
        ctx_terms |= _content_terms(c)
        ctx_numbers |= {t for t in tokens(c) if _has_digit(t)}
    rows: list[dict[str, Any]] = []
    for sentence in answer_sentences(answer):
        if is_refusal(sentence):
            continue
        words = _content_terms(sentence)
        numbers = {t for t in tokens(sentence) if _has_digit(t)}
        if not words and not numbers:
            continue
        share = len(words & ctx_terms) / len(words) if words else 1.0
        supported = share >= threshold and numbers <= ctx_numbers
        rows.append({"sentence": sentence, "supported": supported, "support": round(share, 4),
                     **({"missing_numbers": sorted(numbers - ctx_numbers)} if numbers - ctx_numbers else {})})
    if not rows:
        return None, rows
    return round(sum(r["supported"] for r in rows) / len(rows), 6), rows


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    if na == 0 or nb == 0:
        return 0.0
    return dot / (na * nb)


def semantic_similarities(pairs: Sequence[tuple[str, str]], embedder: Any) -> list[float]:
    """Cosine similarity of each (answer, reference) pair, citation markers removed from the
    answers, every distinct text embedded once (in a fixed order, so the scores repeat)."""
    if not pairs:
        return []
    cleaned = [(" ".join(answer_sentences(a)) or a, r) for a, r in pairs]
    texts = sorted({t for pair in cleaned for t in pair})
    vectors = embedder.embed(texts)
    index = {t: [float(x) for x in vectors[i]] for i, t in enumerate(texts)}
    return [cosine(index[a], index[r]) for a, r in cleaned]


def reference_text(case: Case) -> str | None:
    """What the answer is compared with for semantic similarity: the case's reference answer
    (``reference``, or ``expected`` given as a text), else the quotes of its expected sources,
    else its facts joined. None for no-answer cases."""
    if case.expect_refusal:
        return None
    if case.reference:
        return case.reference
    quotes = [s.quote for s in case.expected_sources if s.quote]
    if quotes:
        return " ".join(dict.fromkeys(quotes))
    return "; ".join(case.facts) or None


def metric_ks(k: int) -> list[int]:
    """The cut-offs retrieval is scored at: 1, 3 and ``k`` (those not above ``k``)."""
    return sorted({n for n in (1, 3, k) if 1 <= n <= k})


def metric_names(k: int, *, similarity: bool = True, judge: bool = False) -> list[str]:
    """Every summary metric a run with these settings can have (gates are checked against it)."""
    names = [f"retrieval.{m}@{n}" for n in metric_ks(k) for m in ("hit", "recall")]
    names += ["retrieval.mrr", "retrieval.context_contains_answer", "retrieval.context_fact_coverage",
              "generation.fact_coverage", "generation.fact_coverage_exact", "generation.groundedness",
              "generation.correct_refusal", "generation.false_refusal", "pass_rate"]
    if similarity:
        names.append("generation.semantic_similarity")
    if judge:
        names += ["judge.correctness", "judge.groundedness"]
    return sorted(names)


# -- one case -------------------------------------------------------------------------------


@dataclass
class CaseScore:
    diagnosis: str
    metrics: dict[str, float | None]
    facts: list[dict[str, Any]] = field(default_factory=list)
    chunk_matches: list[list[int]] = field(default_factory=list)
    sentences: list[dict[str, Any]] = field(default_factory=list)
    refused: bool | None = None

    @property
    def passed(self) -> bool:
        return self.diagnosis == "pass"


def score_case(case: Case, chunks: Sequence[Retrieved] | None, answer: str | None, *, k: int,
               thresholds: Thresholds = Thresholds(), similarity: float | None = None) -> CaseScore:
    """Every metric of one case, and its diagnosis. ``answer`` None: the pipeline failed
    (diagnosis ``error``); retrieval is still scored when it ran (``chunks`` None: it did not)."""
    metrics: dict[str, float | None] = {}
    if chunks is None:
        return CaseScore("error", metrics, [{"fact": f, "in_context": None} for f in case.facts])
    ret, chunk_matches = retrieval_metrics(case.expected_sources, chunks, metric_ks(k))
    metrics.update({f"retrieval.{name}": v for name, v in ret.items()})

    ctx = [_Text(c.text) for c in chunks]
    facts: list[dict[str, Any]] = []
    for fact in case.facts:
        in_ctx = next((m for m in (match_fact(fact, t, thresholds.fuzzy) for t in ctx) if m.found), None)
        facts.append({"fact": fact, "in_context": in_ctx.how if in_ctx else None})
    if case.facts:
        in_context = sum(1 for f in facts if f["in_context"])
        metrics["retrieval.context_fact_coverage"] = round(in_context / len(case.facts), 6)
        metrics["retrieval.context_contains_answer"] = 1.0 if in_context == len(case.facts) else 0.0

    if answer is None:
        return CaseScore("error", metrics, facts, chunk_matches)

    refused = is_refusal(answer)
    ans = _Text(answer)
    for f in facts:
        m = match_fact(f["fact"], ans, thresholds.fuzzy)
        f["in_answer"] = m.how
    if case.expect_refusal:
        metrics["generation.correct_refusal"] = 1.0 if refused else 0.0
    else:
        found = [f for f in facts if f["in_answer"]]
        metrics["generation.fact_coverage"] = round(len(found) / len(facts), 6) if facts else None
        metrics["generation.fact_coverage_exact"] = (
            round(sum(1 for f in facts if f["in_answer"] == "exact") / len(facts), 6) if facts else None)
        metrics["generation.false_refusal"] = 1.0 if refused and not found else 0.0
        if similarity is not None:
            metrics["generation.semantic_similarity"] = round(similarity, 4)
    grounded, sentences = groundedness(answer, [c.text for c in chunks], thresholds.sentence_support)
    if grounded is not None:
        metrics["generation.groundedness"] = grounded
    diagnosis = diagnose(case, facts, metrics, refused, thresholds)
    metrics["pass"] = 1.0 if diagnosis == "pass" else 0.0
    return CaseScore(diagnosis, metrics, facts, chunk_matches, sentences, refused)


def diagnose(case: Case, facts: list[dict[str, Any]], metrics: dict[str, float | None], refused: bool,
             thresholds: Thresholds = Thresholds()) -> str:
    """``pass``: the answer contains the expected facts (at least ``fact_pass`` of them), or, on
    a no-answer case, declines. Otherwise the blame:

    * retrieval did its job when every labelled source was retrieved (``recall@k`` = 1) or the
      retrieved text contains every expected fact → ``generation_miss``;
    * retrieval missed, and the answer still has every fact that *was* retrieved →
      ``retrieval_miss`` (the generator did what it could with what it got);
    * retrieval missed, and the answer also lost facts that were retrieved → ``both``.

    A no-answer case that does not decline is a ``generation_miss``: there was nothing to find.
    A case with sources but no facts passes when its sources were retrieved and the answer
    does not decline.
    """
    if case.expect_refusal:
        return "pass" if refused else "generation_miss"
    recall = [v for n, v in metrics.items() if n.startswith("retrieval.recall@")]
    sources_found = bool(recall) and max(recall) == 1.0  # recall at the largest cut-off, k
    context_ok = metrics.get("retrieval.context_contains_answer") == 1.0
    retrieval_ok = sources_found or context_ok
    if not facts:
        if retrieval_ok:
            return "generation_miss" if refused else "pass"
        return "retrieval_miss"
    if (metrics.get("generation.fact_coverage") or 0.0) >= thresholds.fact_pass:
        return "pass"
    if retrieval_ok:
        return "generation_miss"
    kept_available = all(f.get("in_answer") for f in facts if f["in_context"])
    return "retrieval_miss" if kept_available else "both"


# -- a run ----------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    i = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return s[i]


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means of every metric over the cases that have it, diagnosis counts, breakdown by tag.

    ``results``: dicts with ``diagnosis``, ``metrics``, ``tags`` and optionally ``latency_ms``,
    ``served_model``, ``usage``.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in results:
        for name, v in r["metrics"].items():
            if v is None:
                continue
            sums[name] = sums.get(name, 0.0) + float(v)
            counts[name] = counts.get(name, 0) + 1
    metrics = {name: round(sums[name] / counts[name], 4) for name in sorted(sums)}
    # An errored case has no "pass" value: count it as a failure in the pass rate.
    metrics["pass_rate"] = round(sum(1 for r in results if r["diagnosis"] == "pass") / len(results), 4) if results else 0.0
    metrics.pop("pass", None)
    counts.pop("pass", None)
    diagnosis = {d: sum(1 for r in results if r["diagnosis"] == d) for d in DIAGNOSES}
    by_tag: dict[str, dict[str, Any]] = {}
    for r in results:
        for tag in r.get("tags") or []:
            t = by_tag.setdefault(tag, {"cases": 0, "pass": 0})
            t["cases"] += 1
            t["pass"] += r["diagnosis"] == "pass"
    for t in by_tag.values():
        t["pass_rate"] = round(t["pass"] / t["cases"], 4)
    latencies = [r["latency_ms"] for r in results if r.get("latency_ms") is not None]
    served: dict[str, int] = {}
    prompt = completion = 0
    for r in results:
        if r.get("served_model"):
            served[r["served_model"]] = served.get(r["served_model"], 0) + 1
        u = r.get("usage") or {}
        prompt += int(u.get("prompt_tokens") or 0)
        completion += int(u.get("completion_tokens") or 0)
    return {
        "cases": len(results),
        "answerable": sum(1 for r in results if not r.get("expect_refusal")),
        "no_answer": sum(1 for r in results if r.get("expect_refusal")),
        "metrics": metrics,
        "counts": counts,
        "diagnosis": diagnosis,
        "by_tag": dict(sorted(by_tag.items())),
        "served_models": dict(sorted(served.items())),
        "tokens": {"prompt": prompt, "completion": completion},
        "latency_ms": {"p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95)},
    }
