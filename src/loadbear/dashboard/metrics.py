"""The dashboard's aggregates: spend, tenants, reliability and cache, from the ledger.

Spend, tokens, requests and savings (split by cache vs routing, migration 0014) come from the
``usage_daily`` rollups (product traffic only; the same numbers as ``/v1/usage``). What the
rollups do not keep (fallbacks, latency percentiles, cache kinds) is computed from
``ai_interactions`` over the bounded period, through the ``(tenant_id, created_at)`` index for a
tenant; evaluation traffic (``metadata.eval_run``) is left out there too, so the pages agree with
each other.

Money is integer micro-USD everywhere; the page formats it.
"""

from __future__ import annotations

from typing import Any

from loadbear.dashboard.scope import Period, View, read_tx
from loadbear.storage.db import Database
from loadbear.storage.values import day_str, db_day, db_time

__all__ = ["overview", "tenants_report", "reliability", "cache_report", "percentile", "day_expr", "not_eval"]

# Series beyond this many models/features are summed into "other": a chart with 30 colours
# says nothing.
MAX_SERIES = 8
# Latency percentiles are computed in Python (SQLite has no percentile function) over at most
# this many of the period's most recent rows; more than that only costs time, not accuracy.
PERCENTILE_ROWS = 200_000


def day_expr(dialect: str, col: str = "i.created_at") -> str:
    """The UTC day of a ledger timestamp as 'YYYY-MM-DD' text."""
    if dialect == "sqlite":
        return f"substr({col}, 1, 10)"
    return f"to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


def not_eval(dialect: str, alias: str = "i") -> str:
    if dialect == "sqlite":
        return f"json_extract({alias}.metadata, '$.eval_run') IS NULL"
    return f"({alias}.metadata ->> 'eval_run') IS NULL"


def _skipped(dialect: str, alias: str = "i") -> str:
    """The row's first choice was skipped because its breaker was open."""
    if dialect == "sqlite":
        # instr first: a byte search rejects almost every row before any JSON is parsed.
        return f"(instr({alias}.metadata, '\"skipped\"') > 0 AND json_extract({alias}.metadata, '$.skipped') IS NOT NULL)"
    return f"({alias}.metadata -> 'skipped') IS NOT NULL"


def _raw_where(db: Database, view: View, period: Period, alias: str = "i") -> tuple[str, list[Any]]:
    d = db.dialect
    where = [f"{alias}.created_at >= ?", f"{alias}.created_at < ?", not_eval(d, alias)]
    params: list[Any] = [db_time(d, period.since), db_time(d, period.until)]
    if view.tenant_id is not None:
        where.insert(0, f"{alias}.tenant_id = ?")
        params.insert(0, view.tenant_id)
    return " AND ".join(where), params


def _usage_where(db: Database, view: View, period: Period) -> tuple[str, list[Any]]:
    d = db.dialect
    where = "u.day >= ? AND u.day <= ?"
    params: list[Any] = [db_day(d, period.start), db_day(d, period.end)]
    if view.tenant_id is not None:
        where = "u.tenant_id = ? AND " + where
        params.insert(0, view.tenant_id)
    return where, params


def percentile(sorted_values: list[int], p: float) -> int | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(-(-p * len(sorted_values) // 100)) - 1))
    return int(sorted_values[k])


def _i(v: Any) -> int:
    return int(v or 0)


# -- overview -------------------------------------------------------------------------------


def overview(db: Database, view: View, period: Period, group: str = "model") -> dict[str, Any]:
    col = {"model": "u.model", "feature": "u.feature"}[group]
    where, params = _usage_where(db, view, period)
    days = period.days()
    index = {d: i for i, d in enumerate(days)}
    n = len(days)
    with read_tx(db, view) as c:
        rows = c.fetchall(
            f"SELECT u.day AS day, {col} AS grp, CAST(SUM(u.requests) AS BIGINT) AS requests,"
            " CAST(SUM(u.prompt_tokens) AS BIGINT) AS prompt_tokens,"
            " CAST(SUM(u.completion_tokens) AS BIGINT) AS completion_tokens,"
            " CAST(SUM(u.cost_micro_usd) AS BIGINT) AS cost,"
            " CAST(SUM(u.saved_cache_micro_usd) AS BIGINT) AS cache,"
            " CAST(SUM(u.saved_routing_micro_usd) AS BIGINT) AS routing"
            f" FROM usage_daily u WHERE {where} GROUP BY u.day, {col}", params)
    by_group: dict[str, list[int]] = {}
    requests, prompt, completion = [0] * n, [0] * n, [0] * n
    cache_saved, routing_saved = [0] * n, [0] * n
    for r in rows:
        i = index.get(day_str(r["day"]))
        if i is None:
            continue
        by_group.setdefault(r["grp"], [0] * n)[i] += _i(r["cost"])
        requests[i] += _i(r["requests"])
        prompt[i] += _i(r["prompt_tokens"])
        completion[i] += _i(r["completion_tokens"])
        cache_saved[i] += _i(r["cache"])
        routing_saved[i] += _i(r["routing"])
    ranked = sorted(by_group.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    series = [{"name": name, "values": vals} for name, vals in ranked[:MAX_SERIES]]
    if len(ranked) > MAX_SERIES:
        other = [sum(v[i] for _, v in ranked[MAX_SERIES:]) for i in range(n)]
        series.append({"name": "other", "values": other})
    cost = [sum(s["values"][i] for s in series) for i in range(n)]
    return {
        "object": "dashboard.overview", "from": period.start.isoformat(), "to": period.end.isoformat(),
        "group_by": group, "days": days, "series": series,
        "cost_micro_usd": cost, "requests": requests,
        "prompt_tokens": prompt, "completion_tokens": completion,
        "saved_cache_micro_usd": cache_saved, "saved_routing_micro_usd": routing_saved,
        "totals": {
            "cost_micro_usd": sum(cost), "requests": sum(requests), "prompt_tokens": sum(prompt),
            "completion_tokens": sum(completion), "saved_cache_micro_usd": sum(cache_saved),
            "saved_routing_micro_usd": sum(routing_saved),
        },
    }


# -- tenants --------------------------------------------------------------------------------

TOP_N = 5


def tenants_report(gateway: Any, view: View, period: Period) -> dict[str, Any]:
    db: Database = gateway.db
    where, params = _usage_where(db, view, period)
    with read_tx(db, view) as c:
        features = c.fetchall(
            "SELECT u.tenant_id AS tenant_id, u.feature AS name, CAST(SUM(u.requests) AS BIGINT) AS requests,"
            " CAST(SUM(u.cost_micro_usd) AS BIGINT) AS cost"
            f" FROM usage_daily u WHERE {where} GROUP BY u.tenant_id, u.feature", params)
        users = c.fetchall(
            "SELECT u.tenant_id AS tenant_id, u.user_external_id AS name, CAST(SUM(u.requests) AS BIGINT) AS requests,"
            " CAST(SUM(u.cost_micro_usd) AS BIGINT) AS cost"
            f" FROM usage_daily u WHERE {where} AND u.user_external_id <> '' GROUP BY u.tenant_id, u.user_external_id",
            params)
    tenants = [view.tenant] if view.tenant is not None else gateway.tenants.list_tenants()
    per: dict[str, dict[str, Any]] = {}
    for t in tenants:
        per[str(t.id)] = {"id": str(t.id), "slug": t.slug, "name": t.name, "cost_micro_usd": 0, "requests": 0,
                          "features": [], "users": [], "budget": None}
    for r in features:
        t = per.get(str(r["tenant_id"]))
        if t is None:
            continue
        t["features"].append({"name": r["name"], "requests": _i(r["requests"]), "cost_micro_usd": _i(r["cost"])})
        t["cost_micro_usd"] += _i(r["cost"])
        t["requests"] += _i(r["requests"])
    for r in users:
        t = per.get(str(r["tenant_id"]))
        if t is not None:
            t["users"].append({"name": r["name"], "requests": _i(r["requests"]), "cost_micro_usd": _i(r["cost"])})
    for t in tenants:
        item = per[str(t.id)]
        for k in ("features", "users"):
            item[k] = sorted(item[k], key=lambda x: (-x["cost_micro_usd"], x["name"]))[:TOP_N]
        status = gateway.budget.status(t)
        if status is not None:
            item["budget"] = status
    data = sorted(per.values(), key=lambda x: (-x["cost_micro_usd"], x["slug"]))
    return {"object": "dashboard.tenants", "from": period.start.isoformat(), "to": period.end.isoformat(),
            "data": data}


# -- reliability ------------------------------------------------------------------------------


def reliability(gateway: Any, view: View, period: Period) -> dict[str, Any]:
    db: Database = gateway.db
    days = period.days()
    index = {d: i for i, d in enumerate(days)}
    n = len(days)
    where, params = _raw_where(db, view, period)
    dx = day_expr(db.dialect)
    with read_tx(db, view) as c:
        # One pass gives both the daily series and the per-model table.
        counts = c.fetchall(
            f"SELECT {dx} AS day, i.model AS model, COUNT(*) AS requests,"
            " SUM(CASE WHEN i.status = 'error' THEN 1 ELSE 0 END) AS errors,"
            " SUM(CASE WHEN i.status = 'degraded' THEN 1 ELSE 0 END) AS degraded"
            f" FROM ai_interactions i WHERE {where} GROUP BY {dx}, i.model", params)
        # A fallback (as /metrics counts it): the answer came from another model than the
        # first choice, because the first one failed (more than one attempt, the first on
        # another model) or was skipped with its breaker open (``metadata.skipped``, one
        # attempt: the 3 a.m. outage case). The attempt is a correlated lookup (by the
        # attempts' interaction index) for just those rows, because as a join SQLite chose to
        # scan every attempt of the table instead (70 ms vs a few on 100k rows). No tenant
        # condition on the attempt: the interaction id already pins it, and on a PostgreSQL
        # table without fresh statistics that condition made the planner AND in the tenant
        # index (6 s).
        fallbacks = c.fetchall(
            f"SELECT {dx} AS day, COUNT(*) AS n FROM ai_interactions i"
            f" WHERE {where} AND i.status = 'ok' AND ({_skipped(db.dialect)} OR (i.attempt_count > 1 AND i.model <> ("
            "SELECT a.model FROM ai_attempts a WHERE a.interaction_id = i.id AND a.attempt_no = 1)))"
            f" GROUP BY {dx}", params)
        # Cached answers took no upstream call: their latency says nothing about providers.
        # Unordered: sorting the period's rows would cost more than the percentiles themselves;
        # past the cap the percentiles come from a sample of the period.
        timings = c.execute(
            f"SELECT {dx} AS day, i.latency_ms, i.ttft_ms FROM ai_interactions i"
            f" WHERE {where} AND i.status IN ('ok', 'degraded') AND NOT i.cached"
            f" LIMIT {PERCENTILE_ROWS}", params).fetchall()
    req, err, deg, fb = [0] * n, [0] * n, [0] * n, [0] * n
    stats: dict[str, dict[str, int]] = {}
    for r in counts:
        s = stats.setdefault(r["model"], {"requests": 0, "errors": 0})
        s["requests"] += _i(r["requests"])
        s["errors"] += _i(r["errors"])
        i = index.get(r["day"])
        if i is not None:
            req[i] += _i(r["requests"])
            err[i] += _i(r["errors"])
            deg[i] += _i(r["degraded"])
    for r in fallbacks:
        i = index.get(r["day"])
        if i is not None:
            fb[i] = _i(r["n"])
    lat: list[list[int]] = [[] for _ in range(n)]
    ttft: list[list[int]] = [[] for _ in range(n)]
    for day, latency, first in timings:
        i = index.get(day)
        if i is None:
            continue
        lat[i].append(latency)
        if first is not None:
            ttft[i].append(first)
    all_lat = sorted(v for vs in lat for v in vs)
    all_ttft = sorted(v for vs in ttft for v in vs)
    for vs in lat + ttft:
        vs.sort()

    def rate(num: list[int]) -> list[float | None]:
        return [round(a / b, 4) if b else None for a, b in zip(num, req)]

    health = gateway.provider_health()
    if not view.viewer.admin:
        allowed = view.tenant.settings
        health = [h for h in health if allowed.allows(h["model"])]
    models = []
    for h in health:
        s = stats.get(h["model"], {})
        models.append({
            "model": h["model"], "provider": h["provider"], "tier": h.get("tier"), "breaker": h["breaker"],
            "consecutive_failures": h.get("consecutive_failures", 0), "trips": h.get("trips", 0),
            "opened_seconds_ago": h.get("opened_seconds_ago"),
            "requests": _i(s.get("requests")), "errors": _i(s.get("errors")),
        })
    total = sum(req)
    return {
        "object": "dashboard.reliability", "from": period.start.isoformat(), "to": period.end.isoformat(),
        "days": days, "requests": req, "errors": err, "degraded": deg, "fallbacks": fb,
        "error_rate": rate(err), "degraded_rate": rate(deg), "fallback_rate": rate(fb),
        "latency_p50_ms": [percentile(v, 50) for v in lat], "latency_p95_ms": [percentile(v, 95) for v in lat],
        "ttft_p50_ms": [percentile(v, 50) for v in ttft], "ttft_p95_ms": [percentile(v, 95) for v in ttft],
        "totals": {
            "requests": total, "errors": sum(err), "degraded": sum(deg), "fallbacks": sum(fb),
            "error_rate": round(sum(err) / total, 4) if total else None,
            "degraded_rate": round(sum(deg) / total, 4) if total else None,
            "fallback_rate": round(sum(fb) / total, 4) if total else None,
            "latency_p50_ms": percentile(all_lat, 50), "latency_p95_ms": percentile(all_lat, 95),
            "ttft_p50_ms": percentile(all_ttft, 50), "ttft_p95_ms": percentile(all_ttft, 95),
        },
        "models": models,
    }


# -- cache ----------------------------------------------------------------------------------


def cache_report(db: Database, view: View, period: Period) -> dict[str, Any]:
    days = period.days()
    index = {d: i for i, d in enumerate(days)}
    n = len(days)
    where, params = _raw_where(db, view, period)
    dx = day_expr(db.dialect)
    with read_tx(db, view) as c:
        # One scan of the period; the few groups (days x features x kinds) are added up here.
        rows = c.fetchall(
            f"SELECT {dx} AS day, i.feature AS feature, i.cached AS cached, i.cache_kind AS kind,"
            " COUNT(*) AS n, CAST(SUM(i.saved_micro_usd) AS BIGINT) AS saved"
            f" FROM ai_interactions i WHERE {where} GROUP BY {dx}, i.feature, i.cached, i.cache_kind", params)
    req, hits, saved = [0] * n, [0] * n, [0] * n
    kinds: dict[str, dict[str, int]] = {}
    feats: dict[str, dict[str, int]] = {}
    for r in rows:
        count, hit = _i(r["n"]), bool(r["cached"])
        f = feats.setdefault(r["feature"], {"requests": 0, "hits": 0, "saved": 0})
        f["requests"] += count
        i = index.get(r["day"])
        if i is not None:
            req[i] += count
        if not hit:
            continue
        f["hits"] += count
        f["saved"] += _i(r["saved"])
        k = kinds.setdefault(r["kind"] or "exact", {"hits": 0, "saved": 0})
        k["hits"] += count
        k["saved"] += _i(r["saved"])
        if i is not None:
            hits[i] += count
            saved[i] += _i(r["saved"])
    total, total_hits = sum(req), sum(hits)
    feature_rows = [{"feature": name, "requests": f["requests"], "hits": f["hits"],
                     "hit_rate": round(f["hits"] / f["requests"], 4) if f["requests"] else None,
                     "saved_micro_usd": f["saved"]} for name, f in feats.items()]
    feature_rows.sort(key=lambda x: (-x["hits"], x["feature"]))
    return {
        "object": "dashboard.cache", "from": period.start.isoformat(), "to": period.end.isoformat(),
        "days": days, "requests": req, "hits": hits, "saved_micro_usd": saved,
        "hit_rate": [round(h / r, 4) if r else None for h, r in zip(hits, req)],
        "kinds": [{"kind": k, "hits": v["hits"], "saved_micro_usd": v["saved"]} for k, v in sorted(kinds.items())],
        "features": feature_rows,
        "totals": {"requests": total, "hits": total_hits, "saved_micro_usd": sum(saved),
                   "hit_rate": round(total_hits / total, 4) if total else None},
    }
