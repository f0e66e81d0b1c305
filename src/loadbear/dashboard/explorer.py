"""The interactions explorer (filtered, keyset-paginated list and one interaction's detail), the
filter choices, and evaluation runs for the dashboard."""

from __future__ import annotations

import base64
import uuid
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Mapping

from loadbear.dashboard.scope import Period, View, read_tx
from loadbear.evals.compare import compare_runs
from loadbear.evals.store import EvalStore
from loadbear.gateway.errors import ApiError, invalid
from loadbear.ledger.records import STATUSES
from loadbear.storage.db import Database
from loadbear.storage.values import db_day, db_time, iso, loads

__all__ = ["list_interactions", "interaction_detail", "filter_choices", "list_eval_runs", "compare_eval_runs",
           "parse_list_query"]

PAGE_DEFAULT = 50
PAGE_MAX = 200
_TEXT_MAX = 200

_LIST_COLS = (
    "i.id, i.created_at, i.tenant_id, t.slug AS tenant, u.external_id AS user_external_id, i.feature, i.model,"
    " i.requested_model, i.provider, i.status, i.cached, i.streamed, i.prompt_tokens, i.completion_tokens,"
    " i.cost_micro_usd, i.saved_micro_usd, i.latency_ms, i.ttft_ms, i.attempt_count, i.error_type"
)


def _moment(value: str, param: str, end: bool) -> datetime:
    """A date (the whole UTC day: its start, or for ``end`` the next day's start) or a date-time."""
    text = value.strip()
    try:
        d = date.fromisoformat(text)
        return datetime.combine(d + timedelta(days=1) if end else d, time.min, tzinfo=timezone.utc)
    except ValueError:
        pass
    try:
        m = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise invalid(f"'{param}' must be a date like 2026-01-31 or a date-time like 2026-01-31T18:00:00Z, "
                      f"got {value!r}", param) from None
    return m.replace(tzinfo=timezone.utc) if m.tzinfo is None else m.astimezone(timezone.utc)


def _text(q: Mapping[str, str], name: str) -> str | None:
    v = q.get(name)
    if v is None or not v.strip():
        return None
    if len(v) > _TEXT_MAX:
        raise invalid(f"'{name}' is longer than {_TEXT_MAX} characters", name)
    return v.strip()


def _encode_cursor(created_at: Any, iid: Any) -> str:
    raw = f"{iso(created_at)}|{iid}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(value: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        when, _, iid = raw.partition("|")
        moment = datetime.fromisoformat(when.replace("Z", "+00:00"))
        return moment.astimezone(timezone.utc), str(uuid.UUID(iid))
    except (ValueError, UnicodeDecodeError):
        raise invalid("'cursor' is not a cursor this API returned", "cursor") from None


def parse_list_query(q: Mapping[str, str]) -> dict[str, Any]:
    """Validated filters of the explorer list (400 naming the parameter otherwise)."""
    f: dict[str, Any] = {k: _text(q, k) for k in ("user", "feature", "model")}
    status = _text(q, "status")
    if status is not None and status not in STATUSES:
        raise invalid(f"'status' must be one of {', '.join(STATUSES)}", "status")
    f["status"] = status
    cached = _text(q, "cached")
    if cached is not None and cached not in ("true", "false"):
        raise invalid("'cached' must be true or false", "cached")
    f["cached"] = None if cached is None else cached == "true"
    f["since"] = _moment(q["from"], "from", False) if _text(q, "from") else None
    f["until"] = _moment(q["to"], "to", True) if _text(q, "to") else None
    if f["since"] and f["until"] and f["since"] >= f["until"]:
        raise invalid("'from' must be before 'to'", "from")
    limit = q.get("limit")
    if limit is None or limit == "":
        f["limit"] = PAGE_DEFAULT
    else:
        try:
            f["limit"] = int(limit)
        except ValueError:
            raise invalid(f"'limit' must be an integer from 1 to {PAGE_MAX}", "limit") from None
        if not 1 <= f["limit"] <= PAGE_MAX:
            raise invalid(f"'limit' must be an integer from 1 to {PAGE_MAX}", "limit")
    cursor = _text(q, "cursor")
    f["cursor"] = _decode_cursor(cursor) if cursor else None
    return f


def _row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(r["id"]), "created_at": iso(r["created_at"]), "tenant": r["tenant"],
        "user": r["user_external_id"], "feature": r["feature"], "model": r["model"],
        "requested_model": r["requested_model"], "provider": r["provider"], "status": r["status"],
        "cached": bool(r["cached"]), "streamed": bool(r["streamed"]),
        "prompt_tokens": int(r["prompt_tokens"]), "completion_tokens": int(r["completion_tokens"]),
        "cost_micro_usd": int(r["cost_micro_usd"]), "saved_micro_usd": int(r["saved_micro_usd"]),
        "latency_ms": int(r["latency_ms"]), "ttft_ms": r["ttft_ms"], "attempt_count": int(r["attempt_count"]),
        "error_type": r["error_type"],
    }


def list_interactions(db: Database, view: View, f: dict[str, Any]) -> dict[str, Any]:
    d = db.dialect
    where: list[str] = []
    params: list[Any] = []
    if view.tenant_id is not None:
        where.append("i.tenant_id = ?")
        params.append(view.tenant_id)
    for key, col in (("feature", "i.feature"), ("model", "i.model"), ("status", "i.status"), ("user", "u.external_id")):
        if f[key] is not None:
            where.append(f"{col} = ?")
            params.append(f[key])
    if f["cached"] is not None:
        where.append("i.cached = ?")
        params.append(f["cached"])
    if f["since"] is not None:
        where.append("i.created_at >= ?")
        params.append(db_time(d, f["since"]))
    if f["until"] is not None:
        where.append("i.created_at < ?")
        params.append(db_time(d, f["until"]))
    if f["cursor"] is not None:
        at, iid = f["cursor"]
        where.append("(i.created_at < ? OR (i.created_at = ? AND i.id < ?))")
        params.extend([db_time(d, at), db_time(d, at), iid])
    sql = (f"SELECT {_LIST_COLS} FROM ai_interactions i JOIN tenants t ON t.id = i.tenant_id"
           " LEFT JOIN users u ON u.id = i.user_id AND u.tenant_id = i.tenant_id"
           + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY i.created_at DESC, i.id DESC LIMIT ?")
    params.append(f["limit"] + 1)
    with read_tx(db, view) as c:
        rows = c.fetchall(sql, params)
    more = len(rows) > f["limit"]
    rows = rows[:f["limit"]]
    return {"object": "list", "data": [_row(r) for r in rows], "has_more": more,
            "next_cursor": _encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None}


def parse_interaction_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise invalid(f"{value!r} is not an interaction id (a UUID)", "id") from None


def _not_found(iid: str) -> ApiError:
    return ApiError(404, f"No interaction {iid} in the tenants this key can read.", type="not_found_error",
                    code="interaction_not_found")


def interaction_detail(gateway: Any, view: View, iid: str) -> dict[str, Any]:
    db: Database = gateway.db
    iid = parse_interaction_id(iid)
    tenant = view.tenant
    if tenant is None:  # admin, all tenants: find the owner, then read as that tenant (RLS applies)
        with db.system_tx(write=False) as c:
            owner = c.scalar("SELECT t.slug FROM ai_interactions i JOIN tenants t ON t.id = i.tenant_id WHERE i.id = ?",
                             (iid,))
        if owner is None:
            raise _not_found(iid)
        tenant = gateway.tenants.get_tenant(owner)
    with db.tenant_tx(tenant.id, write=False) as c:
        row = c.fetchone(
            f"SELECT {_LIST_COLS}, i.cached_input_tokens, i.tokens_estimated, i.route, i.route_reason,"
            " i.finish_reason, i.error, i.http_status, i.request_id, i.cache_kind, i.cache_similarity,"
            " i.retrieved_chunk_ids, i.prompt_text, i.response_text, i.metadata"
            " FROM ai_interactions i JOIN tenants t ON t.id = i.tenant_id"
            " LEFT JOIN users u ON u.id = i.user_id AND u.tenant_id = i.tenant_id"
            " WHERE i.id = ? AND i.tenant_id = ?", (iid, tenant.id))
        if row is None:
            raise _not_found(iid)
        attempts = c.fetchall(
            "SELECT attempt_no, provider, model, upstream_model, status, error_type, error, http_status,"
            " prompt_tokens, completion_tokens, cached_input_tokens, cost_micro_usd, latency_ms, ttft_ms, started_at"
            " FROM ai_attempts WHERE interaction_id = ? AND tenant_id = ? ORDER BY attempt_no", (iid, tenant.id))
        feedback = c.fetchall(
            "SELECT f.id, f.rating, f.scale, f.negative, f.comment, f.correction, f.created_at,"
            " u.external_id AS user_external_id FROM feedback f"
            " LEFT JOIN users u ON u.id = f.user_id AND u.tenant_id = f.tenant_id"
            " WHERE f.interaction_id = ? AND f.tenant_id = ? ORDER BY f.created_at, f.id", (iid, tenant.id))
        chunk_ids = [str(x) for x in (loads(row["retrieved_chunk_ids"]) or [])]
        sources = []
        if chunk_ids:
            marks = ", ".join("?" for _ in chunk_ids)
            found = c.fetchall(
                "SELECT c.id, c.ordinal, c.text, d.title, d.source_url, d.external_id FROM chunks c"
                f" JOIN documents d ON d.id = c.document_id WHERE c.tenant_id = ? AND c.id IN ({marks})",
                [tenant.id, *chunk_ids])
            by_id = {str(s["id"]): s for s in found}
            for n, cid in enumerate(chunk_ids, 1):
                s = by_id.get(cid)
                sources.append({"n": n, "chunk_id": cid, "found": s is not None,
                                "title": s["title"] if s else None, "source_url": s["source_url"] if s else None,
                                "document": s["external_id"] if s else None,
                                "excerpt": (s["text"][:400] if s else None)})
    out = _row(row)
    out.update({
        "object": "dashboard.interaction", "cached_input_tokens": int(row["cached_input_tokens"]),
        "tokens_estimated": bool(row["tokens_estimated"]), "route": row["route"], "route_reason": row["route_reason"],
        "finish_reason": row["finish_reason"], "error": row["error"], "http_status": row["http_status"],
        "request_id": row["request_id"], "cache_kind": row["cache_kind"], "cache_similarity": row["cache_similarity"],
        "metadata": loads(row["metadata"]) or {},
        "attempts": [{**a, "started_at": iso(a["started_at"]), "cost_micro_usd": int(a["cost_micro_usd"])}
                     for a in attempts],
        "feedback": [{"id": str(fb["id"]), "rating": int(fb["rating"]), "scale": fb["scale"],
                      "negative": bool(fb["negative"]), "comment": fb["comment"], "correction": fb["correction"],
                      "user": fb["user_external_id"], "created_at": iso(fb["created_at"])} for fb in feedback],
        "sources": sources,
    })
    # Content is shown only while the tenant allows storing it: turning the setting off hides
    # what was kept before, too.
    allowed = bool(tenant.settings.store_content)
    out["content_allowed"] = allowed
    out["prompt"] = row["prompt_text"] if allowed else None
    out["response"] = row["response_text"] if allowed else None
    return out


def filter_choices(db: Database, view: View, period: Period) -> dict[str, Any]:
    """Distinct features, models and end users in the period (for the explorer's drop-downs)."""
    d = db.dialect
    where = "u.day >= ? AND u.day <= ?"
    params: list[Any] = [db_day(d, period.start), db_day(d, period.end)]
    if view.tenant_id is not None:
        where = "u.tenant_id = ? AND " + where
        params.insert(0, view.tenant_id)
    out: dict[str, list[str]] = {}
    with read_tx(db, view) as c:
        for name, col in (("features", "feature"), ("models", "model"), ("users", "user_external_id")):
            rows = c.fetchall(f"SELECT DISTINCT u.{col} AS v FROM usage_daily u WHERE {where} AND u.{col} <> ''"
                              f" ORDER BY u.{col} LIMIT 500", params)
            out[name] = [r["v"] for r in rows]
    return {"object": "dashboard.filters", **out}


# -- evaluations ----------------------------------------------------------------------------

RUNS_LIMIT = 100


def _run_brief(run: dict[str, Any], slug: str) -> dict[str, Any]:
    s = run.get("summary") or {}
    return {"id": run["id"], "tenant": slug, "label": run["label"], "status": run["status"],
            "dataset": (run.get("dataset") or {}).get("name"), "model": run["model"],
            "pipeline_hash": run["pipeline_hash"], "created_at": run["created_at"],
            "finished_at": run["finished_at"], "cases": s.get("cases"),
            "metrics": s.get("metrics") or {}, "diagnosis": s.get("diagnosis") or {}, "error": run["error"]}


def list_eval_runs(gateway: Any, view: View) -> dict[str, Any]:
    store = EvalStore(gateway.db)
    tenants = [view.tenant] if view.tenant is not None else gateway.tenants.list_tenants()
    runs = []
    for t in tenants:
        runs.extend(_run_brief(r, t.slug) for r in store.list_runs(t.id, limit=RUNS_LIMIT))
    runs.sort(key=lambda r: (r["created_at"] or "", r["id"]), reverse=True)
    return {"object": "list", "data": runs[:RUNS_LIMIT]}


def _find_run(gateway: Any, view: View, run_id: str, param: str) -> tuple[Any, dict[str, Any]]:
    try:
        rid = str(uuid.UUID(run_id))
    except (ValueError, AttributeError, TypeError):
        raise invalid(f"'{param}' must be a run id (a UUID)", param) from None
    store = EvalStore(gateway.db)
    tenants = [view.tenant] if view.tenant is not None else gateway.tenants.list_tenants()
    for t in tenants:
        run = store.get_run(t.id, rid)
        if run is not None:
            return t, run
    raise ApiError(404, f"No evaluation run {rid} in the tenants this key can read.", type="not_found_error",
                   code="run_not_found", param=param)


def compare_eval_runs(gateway: Any, view: View, a: str | None, b: str | None) -> dict[str, Any]:
    if not a or not b:
        raise invalid("pass two run ids: ?a=<reference run>&b=<new run>", "a" if not a else "b")
    ta, run_a = _find_run(gateway, view, a, "a")
    tb, run_b = _find_run(gateway, view, b, "b")
    store = EvalStore(gateway.db)
    out = compare_runs(run_a, store.results(ta.id, run_a["id"]), run_b, store.results(tb.id, run_b["id"]))
    out["object"] = "dashboard.eval_comparison"
    out["a"].update(_run_brief(run_a, ta.slug))
    out["b"].update(_run_brief(run_b, tb.slug))
    return out
