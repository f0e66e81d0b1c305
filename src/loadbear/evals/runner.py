"""Run a dataset through the real pipeline (the in-process :class:`Gateway`), score it, store it.

Each case is one grounded chat request, exactly as a product call would make it
(``"knowledge": {"top_k": k}``, the case's feature), with ``"cache": false`` and
``temperature: 0``, and ``{"eval_run": RUN_ID, "eval_case": CASE_ID}`` in its metadata so the
ledger row is recognisable as eval traffic. Cases run concurrently (an asyncio semaphore);
the scores do not depend on the order they finish in.

A run records the pipeline's fingerprint (models, prompt template hash, chunking settings,
embedding model, knowledge-base version and digest, retrieval and metric settings) and its
hash: two runs with the same data and the same pipeline get the same ``pipeline_hash`` and,
the pipeline being deterministic offline, the same scores.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import orjson

import loadbear
from loadbear.evals.dataset import Case, Dataset
from loadbear.evals.metrics import (
    METRICS_VERSION,
    Retrieved,
    Thresholds,
    reference_text,
    score_case,
    semantic_similarities,
    summarize,
)
from loadbear.evals.store import EvalStore
from loadbear.gateway.errors import ApiError
from loadbear.gateway.validation import parse_chat_body
from loadbear.storage.values import uuid7
from loadbear.tenancy.models import SCOPES, AuthContext, Tenant

__all__ = ["EvalConfig", "run_eval", "pipeline_fingerprint", "eval_auth"]

log = logging.getLogger("loadbear.evals")

Progress = Callable[[Case, dict[str, Any]], None]


@dataclass
class EvalConfig:
    model: str = "auto"
    top_k: int = 5
    concurrency: int = 4
    label: str | None = None
    judge: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    # Semantic similarity with local embeddings (all-MiniLM-L6-v2); off: the metric is absent.
    similarity: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "top_k": self.top_k, "concurrency": self.concurrency, "judge": self.judge,
                "thresholds": self.thresholds.to_dict(), "similarity": self.similarity}


def eval_auth(tenant: Tenant) -> AuthContext:
    """The runner acts for the tenant in-process, as the tenant's own key would."""
    return AuthContext(tenant=tenant, key_id="eval-runner", scopes=frozenset(SCOPES))


def _payload(case: Case, config: EvalConfig, run_id: str) -> bytes:
    return orjson.dumps({
        "model": config.model, "temperature": 0, "cache": False,
        "messages": [{"role": "user", "content": case.query}],
        "knowledge": {"top_k": config.top_k},
        "metadata": {"feature": case.feature, "eval_run": run_id, "eval_case": case.id},
    })


def _sha(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


def pipeline_fingerprint(gateway: Any, tenant: Tenant, config: EvalConfig, chain: Sequence[Any]) -> dict[str, Any]:
    """What the scores depend on, besides the dataset: models, prompt, chunking, embeddings,
    the knowledge base's content, retrieval and metric settings."""
    from loadbear.gateway.grounding import PROMPT_VERSION, SYSTEM_TEMPLATE
    from loadbear.knowledge.retrieval import RRF_K

    kb = gateway.knowledge
    docs: list[tuple[Any, ...]] = []
    cursor = None
    while True:
        page, cursor = kb.store.list_documents(tenant.id, limit=1000, cursor=cursor)
        docs.extend((d.external_id or f"id:{d.id}", d.version, d.chunk_count, d.char_count, d.content_type) for d in page)
        if cursor is None:
            break
    docs.sort()
    ks = kb.settings
    return {
        "models": {"requested": config.model,
                   "chain": [{"name": m.name, "provider": m.provider, "upstream_model": m.upstream_model}
                             for m in chain],
                   "judge": config.judge},
        "prompt": {"version": PROMPT_VERSION,
                   "template_sha256": hashlib.sha256(SYSTEM_TEMPLATE.encode()).hexdigest()[:16]},
        "chunking": {"chunk_tokens": ks.chunk_tokens, "chunk_overlap": ks.chunk_overlap},
        "embedding_model": kb.embedder.name,
        "knowledge_base": {"version": kb.store.kb_version(tenant.id), "documents": len(docs),
                           "chunks": sum(d[2] for d in docs), "digest": _sha(docs)[:16]},
        "retrieval": {"top_k": config.top_k, "mode": "hybrid", "rrf_k": RRF_K},
        "metrics": {"version": METRICS_VERSION, "thresholds": config.thresholds.to_dict(),
                    "similarity_model": "all-MiniLM-L6-v2" if config.similarity else None},
        "loadbear": loadbear.__version__,
    }


@dataclass
class _Outcome:
    case: Case
    position: int
    chunks: list[Retrieved] | None = None  # None: the request failed before retrieval was known
    answer: str | None = None
    error: str | None = None
    status: str | None = None
    served_model: str | None = None
    interaction_id: str | None = None
    latency_ms: int | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    judge: dict[str, Any] | None = None


async def _run_case(gateway: Any, auth: AuthContext, case: Case, position: int, config: EvalConfig,
                    run_id: str) -> _Outcome:
    out = _Outcome(case, position)
    started = time.monotonic()
    try:
        result = await gateway.chat(auth, parse_chat_body(_payload(case, config, run_id), trusted=True), feature=case.feature)
    except ApiError as exc:
        out.error = f"{exc.status} {exc.code or exc.type}: {exc.message}"
        out.latency_ms = int((time.monotonic() - started) * 1000)
        return out
    out.latency_ms = int((time.monotonic() - started) * 1000)
    body = result.body
    meta = body.get("loadbear") or {}
    out.interaction_id = meta.get("interaction_id")
    out.served_model = meta.get("served_model")
    out.usage = {k: body.get("usage", {}).get(k, 0) for k in ("prompt_tokens", "completion_tokens")}
    citations = meta.get("citations") or []
    out.chunks = []
    ids = [c["chunk_id"] for c in citations]
    stored = {c.id: c for c in await asyncio.to_thread(gateway.knowledge.store.get_chunks, auth.tenant_id, ids)} if ids else {}
    for c in citations:
        chunk = stored.get(c["chunk_id"])
        out.chunks.append(Retrieved(rank=int(c["index"]), text=chunk.text if chunk else "", doc=c.get("external_id"),
                                    title=c.get("title"), chunk_id=c["chunk_id"], score=float(c.get("score") or 0.0),
                                    document_version=c.get("version")))
    text = body["choices"][0]["message"]["content"] or ""
    if meta.get("degraded"):
        out.status = "degraded"
        out.error = f"degraded: every model of the chain failed; the answer was the fallback message {text!r}"
    else:
        out.status = "ok"
        out.answer = text
    if config.judge and out.answer is not None:
        from loadbear.evals.judge import judge_answer

        out.judge = await judge_answer(gateway, auth, config.judge, run_id, case, out.answer, out.chunks)
    return out


def _similarities(outcomes: Sequence[_Outcome], embedder: Any) -> dict[int, float]:
    """Semantic similarity of each answer with its case's reference answer, by position."""
    pairs = {o.position: (o.answer, ref) for o in outcomes
             if o.answer is not None and (ref := reference_text(o.case))}
    scores = semantic_similarities(list(pairs.values()), embedder)
    return dict(zip(pairs, scores))


def _result(o: _Outcome, config: EvalConfig, similarity: float | None) -> dict[str, Any]:
    case = o.case
    score = score_case(case, o.chunks, o.answer, k=config.top_k, thresholds=config.thresholds,
                       similarity=similarity)
    metrics = dict(score.metrics)
    if o.judge and "error" not in o.judge:
        metrics["judge.correctness"] = o.judge["correctness"]
        metrics["judge.groundedness"] = o.judge["groundedness"]
    retrieved = [{**c.to_dict(), "matches": score.chunk_matches[i] if i < len(score.chunk_matches) else []}
                 for i, c in enumerate(o.chunks or [])]
    return {
        "case_id": case.id, "position": o.position, "diagnosis": score.diagnosis, "passed": score.passed,
        "metrics": metrics, "query": case.query, "feature": case.feature, "tags": case.tags,
        "expect_refusal": case.expect_refusal, "paraphrase_of": case.paraphrase_of,
        "expected_sources": [{"doc": s.doc, "quote": s.quote} for s in case.expected_sources],
        "reference": reference_text(case), "facts": score.facts, "answer": o.answer, "refused": score.refused,
        "sentences": score.sentences, "retrieved": retrieved, "status": o.status, "error": o.error,
        "served_model": o.served_model, "interaction_id": o.interaction_id, "latency_ms": o.latency_ms,
        "usage": o.usage, "judge": o.judge,
    }


async def run_eval(gateway: Any, tenant: Tenant, dataset: Dataset, config: EvalConfig | None = None, *,
                   progress: Progress | None = None, store: bool = True,
                   similarity_embedder: Any = None) -> dict[str, Any]:
    """Run every case of ``dataset`` for ``tenant``; returns the run (with ``results``).

    Raises :class:`ApiError` before any case runs when the model cannot serve the tenant
    (unknown, not allowed). ``store=False`` keeps the run out of the database.
    ``similarity_embedder``: the embedder for semantic similarity (default all-MiniLM-L6-v2).
    """
    config = config or EvalConfig()
    auth = eval_auth(tenant)
    run_id = uuid7()
    if not dataset.cases:
        raise ValueError("the dataset has no cases")
    if config.judge:
        from loadbear.evals.judge import check_judge_model

        check_judge_model(gateway, config.judge)
    # Resolve the model chain now: a bad model is one clear error, not N failed cases.
    probe = gateway.new_call(auth, parse_chat_body(_payload(dataset.cases[0], config, run_id), trusted=True),
                             dataset.cases[0].feature)
    fingerprint = await asyncio.to_thread(pipeline_fingerprint, gateway, tenant, config, probe.chain)
    pipeline_hash = _sha(fingerprint)
    run: dict[str, Any] = {
        "id": run_id, "tenant_id": tenant.id, "label": config.label, "status": "running", "model": config.model,
        "dataset": {"name": dataset.name, "version": dataset.version, "path": dataset.path,
                    "sha256": dataset.sha256, "cases": len(dataset.cases)},
        "pipeline_hash": pipeline_hash, "fingerprint": fingerprint, "config": config.to_dict(),
    }
    evals = EvalStore(gateway.db) if store else None
    if evals:
        await asyncio.to_thread(evals.create_run, run)
    try:
        sem = asyncio.Semaphore(max(1, config.concurrency))

        async def one(position: int, case: Case) -> _Outcome:
            async with sem:
                try:
                    o = await _run_case(gateway, auth, case, position, config, run_id)
                except Exception as exc:  # one broken case must not sink the run
                    log.exception("eval case %s failed", case.id)
                    o = _Outcome(case, position, error=f"{type(exc).__name__}: {exc}")
            if progress is not None:
                progress(case, {"error": o.error})
            return o

        outcomes = await asyncio.gather(*(one(i, c) for i, c in enumerate(dataset.cases)))
        warnings: list[str] = []
        sims: dict[int, float] = {}
        if config.similarity:
            try:
                if similarity_embedder is None:
                    from loadbear.knowledge.embeddings import get_embedder

                    similarity_embedder = get_embedder(None)
                sims = await asyncio.to_thread(_similarities, outcomes, similarity_embedder)
            except Exception as exc:  # the model files missing, etc.: the other metrics stand
                warnings.append(f"semantic similarity skipped: {type(exc).__name__}: {exc}")
        results = [_result(o, config, sims.get(o.position)) for o in outcomes]
        summary = summarize(results)
        summary["k"] = config.top_k
        summary["warnings"] = warnings
        judged = [r["judge"] for r in results if r.get("judge")]
        if judged:
            summary["judge"] = {"model": config.judge, "judged": len(judged),
                                "failed": sum(1 for j in judged if "error" in j)}
    except BaseException as exc:
        if evals:
            await asyncio.to_thread(evals.finish_run, tenant.id, run_id, summary=None,
                                    error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    if evals:
        await asyncio.to_thread(evals.finish_run, tenant.id, run_id, summary=summary, results=results)
        stored = await asyncio.to_thread(evals.get_run, tenant.id, run_id)
        run.update(stored or {})
    else:
        run.update(status="completed", summary=summary)
    run["results"] = results
    return run
