"""Realistic, deterministic ledger history for the dashboard's tests, screenshots and demos.

Rows go through the real :class:`~loadbear.ledger.writer.LedgerWriter` (so the rollups are
maintained exactly as in production) with timestamps spread over past days; feedback, knowledge
sources and evaluation runs go through their own stores. Nothing here is used on the request
path.
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from loadbear.api.feedback_routes import Feedback, record_feedback
from loadbear.evals.metrics import summarize
from loadbear.evals.store import EvalStore
from loadbear.ledger.records import AttemptRecord, InteractionRecord
from loadbear.storage.values import db_time, utcnow, uuid7

__all__ = ["SeedPlan", "seed_history", "seed_eval_runs"]

# (model, provider, input $/1M, output $/1M): the test simulator's catalog (tests/conftest.py).
MODELS = {
    "gpt-4o-mini": ("openai", 0.15, 0.60),
    "gpt-4o": ("openai", 2.5, 10.0),
    "claude-3-5-haiku-latest": ("anthropic", 0.8, 4.0),
}
FEATURES = {"support-chat": 0.45, "summarize": 0.25, "search": 0.2, "drafting": 0.1}
QUESTIONS = [
    "How do I reset my password?", "Summarise this ticket thread for the on-call engineer.",
    "What is our refund policy for annual plans?", "Draft a reply to a customer asking about SSO.",
    "Which regions does the EU data residency option cover?", "Explain error ERR-4471 to a customer.",
]


@dataclass
class SeedPlan:
    """What to create: per tenant slug, requests per day over ``days`` days up to today."""

    per_day: dict[str, int] = field(default_factory=lambda: {"acme": 40, "globex": 24, "initech": 12})
    days: int = 14
    seed: int = 42


def _cost(model: str, prompt: int, completion: int) -> int:
    _, pin, pout = MODELS[model]
    return int(round(prompt * pin + completion * pout))  # $/1M tokens == micro-USD per token


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _add_sources(db: Any, tenant_id: str) -> list[str]:
    """A small help-centre document with three chunks (no vectors: display only)."""
    d = db.dialect
    doc_id = uuid7()
    now = db_time(d, utcnow())
    texts = ["Passwords can be reset from Settings → Security. Reset links expire after 30 minutes.",
             "Annual plans are refundable within 30 days of purchase, prorated after that.",
             "EU data residency keeps all tenant data in Frankfurt and Dublin."]
    ids = [uuid7() for _ in texts]
    with db.tenant_tx(tenant_id) as c:
        c.execute("INSERT INTO documents (id, tenant_id, external_id, title, source_url, content_type, char_count,"
                  " chunk_count, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'text/markdown', ?, ?, ?, ?)",
                  (doc_id, tenant_id, "help-centre", "Help centre: accounts and billing",
                   "https://help.example.com/accounts", sum(map(len, texts)), len(texts), now, now))
        pos = 0
        for n, (cid, text) in enumerate(zip(ids, texts)):
            c.execute("INSERT INTO chunks (id, tenant_id, document_id, document_version, ordinal, text, start_char,"
                      " end_char, token_count, embedding_model, embedding_dim, created_at)"
                      " VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, 'seed', 384, ?)",
                      (cid, tenant_id, doc_id, n, text, pos, pos + len(text), len(text) // 4, now))
            pos += len(text) + 1
    return ids


def seed_history(gateway: Any, tenants: dict[str, Any], plan: SeedPlan | None = None,
                 now: datetime | None = None) -> dict[str, Any]:
    """Write ``plan``'s traffic for ``tenants`` (slug → Tenant) through the gateway's ledger.

    Returns ``{"interactions": {slug: [ids]}, "feedback": n}``. Mix per tenant and day: mostly
    ok; some errors, degraded answers and cancellations; cached answers (cost 0, savings = the
    avoided cost); fallbacks (a failed first attempt on one model, served by another); routed
    requests with routing savings; streamed requests with a time to first token.
    """
    plan = plan or SeedPlan()
    rng = random.Random(plan.seed)
    now = now or utcnow()
    today = now.date()
    ids: dict[str, list[str]] = {}
    sources = {}
    for slug, t in tenants.items():
        if t.settings.store_content:
            sources[slug] = _add_sources(gateway.db, t.id)
    for slug, t in tenants.items():
        ids[slug] = []
        per_day = plan.per_day.get(slug, 10)
        users = [f"{slug[:3]}-user-{n:02d}" for n in range(1, 9)]
        for back in range(plan.days - 1, -1, -1):
            day = today - timedelta(days=back)
            start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
            # Weekday traffic is busier; a slow ramp makes the charts look like a live product.
            n = max(1, int(per_day * (0.7 if day.weekday() >= 5 else 1.0) * (0.85 + 0.3 * (plan.days - back) / plan.days)))
            span = min(86_399, int((now - start).total_seconds())) if back == 0 else 86_399
            for _ in range(n):
                at = start + timedelta(seconds=rng.randint(0, max(1, span - 1)), microseconds=rng.randint(0, 999_999))
                rec = _record(rng, t, slug, at, users, sources.get(slug))
                gateway.record(rec)
                ids[slug].append(rec.id)
    gateway.ledger.flush(30)
    fb = 0
    for slug, t in tenants.items():
        for iid in ids[slug][::9]:
            rating = rng.choice([1, 1, 1, -1])
            record_feedback(gateway, t.id, Feedback(
                interaction_id=iid, rating=rating, scale="thumbs",
                comment=None if rating > 0 else rng.choice(["Wrong plan name.", "Too long.", "Cited the wrong article."]),
                user=rng.choice(["agent-ana", "agent-bo", None])))
            fb += 1
    return {"interactions": ids, "feedback": fb}


def _record(rng: random.Random, t: Any, slug: str, at: datetime, users: list[str], sources: list[str] | None):
    feature = _pick(rng, FEATURES)
    roll = rng.random()
    auto = rng.random() < 0.35
    model = "gpt-4o-mini" if auto and rng.random() < 0.7 else _pick(rng, {"gpt-4o-mini": 0.5, "gpt-4o": 0.3,
                                                                         "claude-3-5-haiku-latest": 0.2})
    prompt = int(rng.lognormvariate(math.log(2400), 0.6))
    completion = int(rng.lognormvariate(math.log(380), 0.5))
    streamed = rng.random() < 0.5
    latency = int(rng.lognormvariate(math.log(900 if model != "gpt-4o" else 1500), 0.4))
    ttft = int(latency * rng.uniform(0.2, 0.4)) if streamed else None
    user = rng.choice(users + [None])
    status = "ok"
    attempts: list[AttemptRecord] = []
    cached = False
    saved = 0
    error_type = error = None
    http_status = None
    served = model
    provider = MODELS[model][0]
    if roll < 0.12:  # answered from the cache: no upstream call
        cached = True
        saved = _cost(model, prompt, completion)
        latency, ttft = rng.randint(3, 25), (rng.randint(2, 10) if streamed else None)
        cost = 0
    elif roll < 0.16:  # every model failed: an error
        status = "error"
        error_type = rng.choice(["timeout", "rate_limit", "server_error"])
        http_status = {"timeout": 504, "rate_limit": 429, "server_error": 502}[error_type]
        error = f"upstream {error_type.replace('_', ' ')}"
        attempts.append(AttemptRecord(1, provider, model, model, "error", at, latency, None, error_type, error,
                                      http_status))
        completion, ttft = 0, None
        cost = 0
    elif roll < 0.19:  # degraded: the tenant's honest message
        status = "degraded"
        error_type = "all_models_failed"
        attempts.append(AttemptRecord(1, provider, model, model, "error", at, latency // 2, None, "server_error",
                                      "upstream 503", 503))
        fb_model = "claude-3-5-haiku-latest" if model != "claude-3-5-haiku-latest" else "gpt-4o-mini"
        attempts.append(AttemptRecord(2, MODELS[fb_model][0], fb_model, fb_model, "error", at, latency // 2, None,
                                      "timeout", "first token timeout", None))
        completion = 0
        cost = 0
    elif roll < 0.20:
        status = "cancelled"
        cost = _cost(model, prompt, completion // 3)
        attempts.append(AttemptRecord(1, provider, model, model, "cancelled", at, latency, ttft,
                                      prompt_tokens=prompt, completion_tokens=completion // 3, cost_micro_usd=cost))
        completion //= 3
    elif roll < 0.26:  # a fallback: the first model failed, the next one answered
        served = "claude-3-5-haiku-latest" if model != "claude-3-5-haiku-latest" else "gpt-4o-mini"
        provider = MODELS[served][0]
        first = int(latency * 0.4)
        attempts.append(AttemptRecord(1, MODELS[model][0], model, model, "error", at, first, None,
                                      rng.choice(["timeout", "server_error"]), "upstream failure", 503))
        cost = _cost(served, prompt, completion)
        attempts.append(AttemptRecord(2, provider, served, served, "ok", at + timedelta(milliseconds=first),
                                      latency - first, ttft, prompt_tokens=prompt, completion_tokens=completion,
                                      cost_micro_usd=cost))
    else:
        cost = _cost(model, prompt, completion)
        attempts.append(AttemptRecord(1, provider, model, model, "ok", at, latency, ttft, prompt_tokens=prompt,
                                      completion_tokens=completion, cost_micro_usd=cost))
        if auto and model == "gpt-4o-mini":
            saved = max(0, _cost("gpt-4o", prompt, completion) - cost)
    if status == "error" or status == "degraded":
        prompt_tokens = 0
    else:
        prompt_tokens = prompt
    grounded = sources is not None and feature == "support-chat" and rng.random() < 0.5
    question = rng.choice(QUESTIONS)
    answer = None if status == "error" else (
        "I'm not able to help with that right now." if status == "degraded" else
        f"Here is what I found{' [1]' if grounded else ''}: follow the steps in the help centre.")
    return InteractionRecord(
        id=str(uuid.UUID(uuid7())), tenant_id=t.id, feature=feature,
        requested_model="auto" if auto else model, model=served, status=status, created_at=at,
        latency_ms=latency, prompt_tokens=prompt_tokens, completion_tokens=completion,
        cost_micro_usd=cost, saved_micro_usd=saved, user_external_id=user,
        request_id=uuid.UUID(int=rng.getrandbits(128)).hex, provider=None if cached else provider,
        route="auto" if auto else "explicit", route_reason="rules: short factual question" if auto else None,
        streamed=streamed, ttft_ms=ttft, finish_reason="stop" if status in ("ok", "degraded") else None,
        cached=cached, cache_kind=(rng.choice(["exact", "exact", "semantic"]) if cached else None),
        error=error, error_type=error_type, http_status=http_status,
        retrieved_chunk_ids=rng.sample(sources, 2) if grounded else None,
        prompt_text=f"user: {question}" if t.settings.store_content else None,
        response_text=answer if t.settings.store_content else None,
        attempts=attempts,
    )


def seed_eval_runs(db: Any, tenant: Any, seed: int = 7) -> list[dict[str, Any]]:
    """Two completed evaluation runs of the same dataset: a baseline and a newer one that
    fixes some cases and regresses one."""
    rng = random.Random(seed)
    store = EvalStore(db)
    runs = []
    cases = [f"case-{n:02d}" for n in range(1, 13)]
    # The story the comparison tells: reranking fixes most retrieval misses and one generation
    # miss, and regresses one case (case-03).
    baseline = dict(zip(cases, ["pass", "retrieval_miss", "pass", "pass", "generation_miss", "pass",
                                "retrieval_miss", "pass", "retrieval_miss", "pass", "generation_miss", "pass"]))
    fixed = {"case-02", "case-05", "case-07"}
    for label, shift in (("baseline", False), ("rerank-v2", True)):
        results = []
        for pos, case in enumerate(cases):
            diag = baseline[case]
            if shift and case in fixed:
                diag = "pass"
            elif shift and case == "case-03":
                diag = "generation_miss"
            recall = 1.0 if diag in ("pass", "generation_miss") else 0.0
            results.append({
                "case_id": case, "position": pos, "diagnosis": diag,
                "metrics": {"retrieval.recall@5": recall, "retrieval.mrr": round(recall * rng.uniform(0.5, 1), 3),
                            "generation.faithfulness": round(rng.uniform(0.7, 1.0) if diag == "pass" else rng.uniform(0.2, 0.6), 3)},
                "tags": ["billing" if pos % 2 else "accounts"], "query": QUESTIONS[pos % len(QUESTIONS)],
                "answer": "See the help centre [1].", "latency_ms": rng.randint(600, 1800),
                "served_model": "gpt-4o-mini",
            })
        run = {"id": str(uuid.UUID(uuid7())), "tenant_id": tenant.id, "label": label,
               "dataset": {"name": "helpdesk-golden", "version": 3, "sha256": "c0ffee" * 10 + "abcd", "cases": len(cases)},
               "model": "gpt-4o-mini", "pipeline_hash": f"{label}-{seed}",
               "fingerprint": {"retrieval": {"rerank": label != "baseline", "top_k": 5}, "model": "gpt-4o-mini"},
               "config": {"top_k": 5}}
        store.create_run(run)
        store.finish_run(tenant.id, run["id"], summary=summarize(results), results=results)
        runs.append(store.get_run(tenant.id, run["id"]))
    return runs
