"""Evaluation runs and per-case results, stored per tenant (``eval_runs``, ``eval_results``).

Tenant work goes through ``tenant_tx`` (row-level security on PostgreSQL). Only
:meth:`EvalStore.find_tenant` looks across tenants (``system_tx``): the CLI uses it to find
which tenant a run id belongs to when no ``--tenant`` is given.

A run is a dict: ``id, tenant_id, label, status, dataset {name, version, path, sha256, cases},
model, pipeline_hash, fingerprint, config, summary, error, created_at, finished_at``.
A result is a flat dict: ``case_id, position, diagnosis, passed, metrics`` and the case's
detail (query, facts, retrieved chunks, answer, ...).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from loadbear.storage.db import Database
from loadbear.storage.values import db_time, dumps, iso, loads, utcnow

__all__ = ["EvalStore", "RunNotFound"]

_UUIDISH = re.compile(r"^[0-9a-fA-F-]{4,36}$")
_LATEST = re.compile(r"^latest(?:~(\d+))?$")
RESULT_COLUMNS = ("case_id", "position", "diagnosis", "passed", "metrics")


class RunNotFound(LookupError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EvalStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- writing --------------------------------------------------------------------------

    def create_run(self, run: dict[str, Any]) -> None:
        d = self.db.dialect
        with self.db.tenant_tx(run["tenant_id"]) as c:
            c.execute(
                "INSERT INTO eval_runs (id, tenant_id, label, status, dataset_name, dataset, model, pipeline_hash,"
                " fingerprint, config, created_at) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (run["id"], run["tenant_id"], run.get("label"), run["dataset"]["name"], dumps(run["dataset"]),
                 run["model"], run["pipeline_hash"], dumps(run["fingerprint"]), dumps(run["config"]),
                 db_time(d, utcnow())),
            )

    def finish_run(self, tenant_id: str, run_id: str, *, summary: dict[str, Any] | None,
                   results: Sequence[dict[str, Any]] = (), error: str | None = None) -> None:
        """Store the results and the summary in one transaction (``error``: the run failed)."""
        rows = []
        for r in results:
            detail = {k: v for k, v in r.items() if k not in RESULT_COLUMNS}
            rows.append((run_id, tenant_id, r["case_id"], int(r["position"]), r["diagnosis"],
                         r["diagnosis"] == "pass", dumps(r["metrics"]), dumps(detail)))
        with self.db.tenant_tx(tenant_id) as c:
            c.executemany(
                "INSERT INTO eval_results (run_id, tenant_id, case_id, position, diagnosis, passed, metrics, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            c.execute(
                "UPDATE eval_runs SET status = ?, summary = ?, error = ?, finished_at = ? WHERE id = ? AND tenant_id = ?",
                ("failed" if error else "completed", dumps(summary) if summary is not None else None, error,
                 db_time(self.db.dialect, utcnow()), run_id, tenant_id),
            )

    # -- reading --------------------------------------------------------------------------

    def get_run(self, tenant_id: str, run_id: str) -> dict[str, Any] | None:
        with self.db.tenant_tx(tenant_id, write=False) as c:
            row = c.fetchone("SELECT * FROM eval_runs WHERE id = ? AND tenant_id = ?", (run_id, tenant_id))
        return _run(row) if row else None

    def list_runs(self, tenant_id: str, limit: int = 20, dataset: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM eval_runs WHERE tenant_id = ?"
        params: list[Any] = [tenant_id]
        if dataset:
            sql += " AND dataset_name = ?"
            params.append(dataset)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        params.append(int(limit))
        with self.db.tenant_tx(tenant_id, write=False) as c:
            return [_run(r) for r in c.fetchall(sql, params)]

    def results(self, tenant_id: str, run_id: str) -> list[dict[str, Any]]:
        with self.db.tenant_tx(tenant_id, write=False) as c:
            rows = c.fetchall(
                "SELECT case_id, position, diagnosis, passed, metrics, detail FROM eval_results"
                " WHERE run_id = ? AND tenant_id = ? ORDER BY position", (run_id, tenant_id))
        out = []
        for r in rows:
            out.append({**(loads(r["detail"]) or {}), "case_id": r["case_id"], "position": int(r["position"]),
                        "diagnosis": r["diagnosis"], "passed": bool(r["passed"]), "metrics": loads(r["metrics"]) or {}})
        return out

    def resolve(self, tenant_id: str, ref: str) -> dict[str, Any]:
        """A run of the tenant by reference: its id, a unique id prefix, ``latest`` /
        ``latest~N`` (N runs before the latest), or a label (its most recent run)."""
        ref = ref.strip()
        m = _LATEST.match(ref)
        with self.db.tenant_tx(tenant_id, write=False) as c:
            if m:
                rows = c.fetchall("SELECT * FROM eval_runs WHERE tenant_id = ? ORDER BY created_at DESC, id DESC"
                                  " LIMIT 1 OFFSET ?", (tenant_id, int(m.group(1) or 0)))
                if not rows:
                    raise RunNotFound(f"no run {ref!r}: the tenant has {'no' if not m.group(1) else 'fewer'} runs")
                return _run(rows[0])
            if _UUIDISH.match(ref):
                rows = c.fetchall("SELECT * FROM eval_runs WHERE tenant_id = ? AND CAST(id AS TEXT) LIKE ?"
                                  " ORDER BY created_at DESC LIMIT 2", (tenant_id, ref.lower() + "%"))
                if len(rows) > 1:
                    raise RunNotFound(f"run id prefix {ref!r} is ambiguous: give more characters")
                if rows:
                    return _run(rows[0])
            rows = c.fetchall("SELECT * FROM eval_runs WHERE tenant_id = ? AND label = ?"
                              " ORDER BY created_at DESC, id DESC LIMIT 1", (tenant_id, ref))
        if rows:
            return _run(rows[0])
        raise RunNotFound(f"no run {ref!r} for this tenant (give a run id, an id prefix, a label or 'latest')")

    def find_tenant(self, ref: str) -> str:
        """The tenant that owns the run whose id is, or starts with, ``ref`` (any tenant)."""
        ref = ref.strip().lower()
        if not _UUIDISH.match(ref):
            raise RunNotFound(f"{ref!r} is not a run id: pass --tenant to use labels or 'latest'")
        with self.db.system_tx(write=False) as c:
            rows = c.fetchall("SELECT id, tenant_id FROM eval_runs WHERE CAST(id AS TEXT) LIKE ? LIMIT 2", (ref + "%",))
        if not rows:
            raise RunNotFound(f"no run {ref!r}")
        if len(rows) > 1:
            raise RunNotFound(f"run id prefix {ref!r} is ambiguous: give more characters")
        return str(rows[0]["tenant_id"])


def _run(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]), "tenant_id": str(row["tenant_id"]), "label": row["label"], "status": row["status"],
        "dataset": loads(row["dataset"]) or {"name": row["dataset_name"]}, "model": row["model"],
        "pipeline_hash": row["pipeline_hash"], "fingerprint": loads(row["fingerprint"]) or {},
        "config": loads(row["config"]) or {}, "summary": loads(row["summary"]), "error": row["error"],
        "created_at": iso(row["created_at"]), "finished_at": iso(row["finished_at"]),
    }
