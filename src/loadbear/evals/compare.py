"""Runs over time: metric deltas and flipped cases between two runs, and the CI gate.

``compare_runs(run_a, results_a, run_b, results_b)``: B is the new run, A the reference.
A *regression* is a case that passed in A and not in B, a *fix* the reverse; cases whose
diagnosis changed without changing pass/fail (``retrieval_miss`` → ``both``) are listed too.

``--fail-under NAME=MIN`` gates (``retrieval.recall@5=0.9``): :func:`check_gates` says which
fail. An unknown metric name is a usage error (:class:`GateError`), never a silent pass, and a
run with errored cases fails every gate run against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from loadbear.evals.metrics import DIAGNOSES

__all__ = ["GateError", "Gate", "GateResult", "parse_gate", "check_gates", "compare_runs", "fingerprint_changes", "flatten"]

_GATE = re.compile(r"^\s*([A-Za-z0-9_.@-]+)\s*(?:>=|=)\s*([0-9]*\.?[0-9]+)\s*$")


class GateError(ValueError):
    pass


@dataclass(frozen=True)
class Gate:
    metric: str
    minimum: float


@dataclass(frozen=True)
class GateResult:
    metric: str
    minimum: float
    value: float | None
    ok: bool
    message: str


def parse_gate(spec: str) -> Gate:
    m = _GATE.match(spec or "")
    if not m:
        raise GateError(f"--fail-under {spec!r}: expected METRIC=MINIMUM, e.g. retrieval.recall@5=0.9")
    return Gate(m.group(1), float(m.group(2)))


def check_gates(summary: dict[str, Any], gates: Sequence[Gate]) -> list[GateResult]:
    """One result per gate (plus one for errored cases, if any). GateError for unknown metrics."""
    metrics = summary.get("metrics") or {}
    unknown = [g.metric for g in gates if g.metric not in metrics]
    if unknown:
        raise GateError(f"unknown metric(s) {', '.join(unknown)}; this run has: {', '.join(sorted(metrics))}")
    out = []
    for g in gates:
        v = metrics[g.metric]
        ok = v is not None and v >= g.minimum
        out.append(GateResult(g.metric, g.minimum, v, ok,
                              f"{g.metric} = {_fmt(v)} {'≥' if ok else '<'} {g.minimum:g}"))
    errors = (summary.get("diagnosis") or {}).get("error", 0)
    if gates and errors:
        out.append(GateResult("errors", 0, float(errors), False,
                              f"{errors} case(s) errored: a gate cannot pass on an incomplete run"))
    return out


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted paths: ``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def fingerprint_changes(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """The fingerprint fields that differ, as ``{"field", "a", "b"}`` (dotted paths)."""
    fa, fb = flatten(a or {}), flatten(b or {})
    return [{"field": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    return {"id": run["id"], "label": run.get("label"), "created_at": run.get("created_at"),
            "model": run.get("model"), "pipeline_hash": run.get("pipeline_hash"),
            "dataset": (run.get("dataset") or {}).get("name"), "dataset_sha256": (run.get("dataset") or {}).get("sha256")}


def compare_runs(run_a: dict[str, Any], results_a: Sequence[dict[str, Any]], run_b: dict[str, Any],
                 results_b: Sequence[dict[str, Any]]) -> dict[str, Any]:
    sa = run_a.get("summary") or {}
    sb = run_b.get("summary") or {}
    ma, mb = sa.get("metrics") or {}, sb.get("metrics") or {}
    metrics = []
    for name in sorted(set(ma) | set(mb), key=lambda n: (n != "pass_rate", n)):
        va, vb = ma.get(name), mb.get(name)
        delta = round(vb - va, 4) if va is not None and vb is not None else None
        metrics.append({"name": name, "a": va, "b": vb, "delta": delta})
    da, db = sa.get("diagnosis") or {}, sb.get("diagnosis") or {}
    diagnosis = [{"name": d, "a": da.get(d, 0), "b": db.get(d, 0), "delta": db.get(d, 0) - da.get(d, 0)}
                 for d in DIAGNOSES]
    by_a = {r["case_id"]: r for r in results_a}
    by_b = {r["case_id"]: r for r in results_b}
    regressions, fixes, changed = [], [], []
    for cid, rb in by_b.items():
        ra = by_a.get(cid)
        if ra is None or ra["diagnosis"] == rb["diagnosis"]:
            continue
        row = {"case_id": cid, "query": rb.get("query"), "a": ra["diagnosis"], "b": rb["diagnosis"],
               "a_answer": ra.get("answer"), "b_answer": rb.get("answer")}
        if ra["diagnosis"] == "pass":
            regressions.append(row)
        elif rb["diagnosis"] == "pass":
            fixes.append(row)
        else:
            changed.append(row)
    return {
        "a": _brief(run_a), "b": _brief(run_b),
        "same_pipeline": run_a.get("pipeline_hash") == run_b.get("pipeline_hash"),
        "same_dataset": (run_a.get("dataset") or {}).get("sha256") == (run_b.get("dataset") or {}).get("sha256"),
        "fingerprint_changes": fingerprint_changes(run_a.get("fingerprint") or {}, run_b.get("fingerprint") or {}),
        "metrics": metrics, "diagnosis": diagnosis,
        "flips": {"regressions": regressions, "fixes": fixes, "changed": changed},
        "only_in_a": sorted(set(by_a) - set(by_b)), "only_in_b": sorted(set(by_b) - set(by_a)),
    }
