"""Optional LLM-as-judge (``loadbear eval run --judge MODEL``).

Off by default: the deterministic metrics need no model. When asked for, the judge is a
catalog model served by a real provider (the offline ``local`` model cannot judge). Its calls
go through the gateway like any other (breakers, fallbacks, the ledger), under feature
``eval`` with ``{"eval_run": RUN_ID, "eval_role": "judge"}`` in their metadata, so usage
reports can leave them out of product spend. The judge's scores are extra metrics
(``judge.correctness``, ``judge.groundedness``); they never change a case's diagnosis.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

import orjson

from loadbear.evals.dataset import Case
from loadbear.evals.metrics import Retrieved
from loadbear.gateway.errors import ApiError
from loadbear.gateway.validation import parse_chat_body
from loadbear.tenancy.models import AuthContext

__all__ = ["JUDGE_FEATURE", "JUDGE_PROMPT", "JudgeError", "check_judge_model", "judge_answer", "parse_verdict"]

JUDGE_FEATURE = "eval"
JUDGE_PROMPT = (
    "You grade the answer of a help-centre assistant. You get the question, the facts a correct "
    "answer contains (or a note that the documents do not answer the question), the sources the "
    "assistant retrieved, and its answer.\n"
    "Score two things from 0 to 1:\n"
    "- correct: the answer gives the expected facts without contradicting them; when the documents "
    "do not answer the question, a correct answer says so instead of guessing.\n"
    "- grounded: every claim of the answer is supported by the retrieved sources.\n"
    'Reply with one JSON object and nothing else: {"correct": 0.0, "grounded": 0.0, "reason": "one sentence"}'
)
MAX_SOURCE_CHARS = 1500
_OBJECT = re.compile(r"\{.*\}", re.S)


class JudgeError(ValueError):
    pass


def check_judge_model(gateway: Any, name: str) -> None:
    model = gateway.catalog.get(name)
    if model is None:
        raise JudgeError(f"judge model {name!r} is not in the catalog (known: {', '.join(gateway.catalog.names())})")
    if model.provider == "local":
        raise JudgeError("the offline 'local' model cannot judge: use --judge with a model served by a real provider")


def _user_message(case: Case, answer: str, chunks: Sequence[Retrieved]) -> str:
    if case.expect_refusal:
        expected = "(the documents do not answer this question; the right reply says so)"
    else:
        expected = "\n".join(f"- {f}" for f in case.facts)
    sources = "\n\n".join(f"[{c.rank}] {c.title or c.doc or ''}\n{c.text[:MAX_SOURCE_CHARS]}" for c in chunks) or "(none)"
    return (f"Question:\n{case.query}\n\nExpected facts:\n{expected}\n\nRetrieved sources:\n{sources}\n\n"
            f"Answer:\n{answer}")


def parse_verdict(text: str) -> dict[str, Any]:
    """``{"correctness", "groundedness", "reason"}`` from the judge's reply; JudgeError if unusable."""
    m = _OBJECT.search(text or "")
    if not m:
        raise JudgeError(f"the judge did not reply with JSON: {text[:200]!r}")
    try:
        data = json.loads(m.group(0))
    except ValueError:
        raise JudgeError(f"the judge's JSON is invalid: {m.group(0)[:200]!r}") from None

    def score(key: str) -> float:
        v = data.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise JudgeError(f"the judge's {key!r} is not a number: {v!r}")
        return round(min(1.0, max(0.0, float(v))), 4)

    return {"correctness": score("correct"), "groundedness": score("grounded"),
            "reason": str(data.get("reason") or "")[:500]}


async def judge_answer(gateway: Any, auth: AuthContext, model: str, run_id: str, case: Case, answer: str,
                       chunks: Sequence[Retrieved]) -> dict[str, Any]:
    """The judge's verdict on one answer: ``correctness``, ``groundedness``, ``reason``,
    ``interaction_id``; or ``{"error": ...}`` when the judge failed or replied badly."""
    body = parse_chat_body(orjson.dumps({
        "model": model, "temperature": 0, "cache": False,
        "messages": [{"role": "system", "content": JUDGE_PROMPT},
                     {"role": "user", "content": _user_message(case, answer, chunks)}],
        "metadata": {"feature": JUDGE_FEATURE, "eval_run": run_id, "eval_role": "judge", "eval_case": case.id},
    }), trusted=True)
    try:
        result = await gateway.chat(auth, body, feature=JUDGE_FEATURE)
    except ApiError as exc:
        return {"error": f"{exc.status} {exc.code or exc.type}: {exc.message}"}
    meta = result.body.get("loadbear") or {}
    if meta.get("degraded"):
        return {"error": "the judge model was unavailable (degraded answer)", "interaction_id": meta.get("interaction_id")}
    text = result.body["choices"][0]["message"]["content"] or ""
    try:
        verdict = parse_verdict(text)
    except JudgeError as exc:
        return {"error": str(exc), "interaction_id": meta.get("interaction_id")}
    return {**verdict, "interaction_id": meta.get("interaction_id")}
