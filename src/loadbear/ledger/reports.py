"""Usage reports. They read the daily rollups, never a scan of raw ledger rows.

Every group and the totals show spend and savings side by side: ``cost_micro_usd`` (what was
spent), ``saved_micro_usd`` (what loadbear saved) split into ``saved_cache_micro_usd`` (cache
hits: the calls they replaced) and ``saved_routing_micro_usd`` (routed requests: the difference
to the strong tier), and ``cost_without_loadbear_micro_usd`` (spend + savings: what the same
traffic would have cost without cache and routing), each also in USD.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any

from loadbear.storage.db import Database
from loadbear.storage.values import day_str, db_day

GROUPS = {
    "day": "day",
    "feature": "feature",
    "model": "model",
    "user": "user_external_id",
}
ADMIN_GROUPS = {**GROUPS, "tenant": "slug"}

_SUMS = (
    "requests", "errors", "degraded", "cancelled", "cached_requests", "streamed_requests",
    "prompt_tokens", "completion_tokens", "cached_input_tokens", "cost_micro_usd",
    "saved_micro_usd", "latency_ms_sum", "saved_cache_micro_usd", "saved_routing_micro_usd",
)
# BIGINT: PostgreSQL sums BIGINT columns as NUMERIC, which would come back as Decimal objects.
_SELECT_SUMS = ", ".join(f"CAST(SUM(u.{c}) AS BIGINT) AS {c}" for c in _SUMS)


class ReportError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def parse_period(from_: str | None, to: str | None, today: date | None = None) -> tuple[date, date]:
    """Inclusive UTC days. Defaults: the last 30 days up to today (UTC).

    Accepts a date (``2026-01-31``) or an ISO 8601 date-time (``2026-01-31T18:00:00Z``; one with
    an offset counts on its UTC day), nothing else.
    """
    today = today or datetime.now(timezone.utc).date()
    end = _parse_day(to, "to", "2026-01-31") if to else today
    start = _parse_day(from_, "from", "2026-01-01") if from_ else end - timedelta(days=29)
    if start > end:
        raise ReportError("'from' must not be after 'to'", "from")
    if (end - start).days > 366 * 2:
        raise ReportError("a report spans at most two years", "from")
    return start, end


def _parse_day(value: str, param: str, example: str) -> date:
    text = value.strip() if isinstance(value, str) else ""
    try:
        return date.fromisoformat(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"'{param}' must be a date like {example}, got {value!r}", param) from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return moment.date()


# Reports read the narrow rollups (migration 0012), not usage_daily, whose end-user dimension
# makes a busy tenant's month ~30,000 rows: usage_daily_models (key tenant_id, day, feature,
# model) holds 30 days x features x models rows a month, usage_daily_users (key tenant_id, day,
# user_external_id) 30 days x users. So few rows that the database groups them directly (a hash
# of a few hundred rows) and sends back only the groups.
_SOURCE = {
    "day": ("usage_daily_models", ("day",)),
    "feature": ("usage_daily_models", ("feature",)),
    "model": ("usage_daily_models", ("model",)),
    "user": ("usage_daily_users", ("user_external_id",)),
}


def tenant_usage(db: Database, tenant_id: str, start: date, end: date, group_by: str = "day") -> dict[str, Any]:
    col = GROUPS.get(group_by)
    if col is None:
        raise ReportError(f"group_by must be one of {', '.join(GROUPS)}", "group_by")
    table, keys = _SOURCE[group_by]
    cols = ", ".join(f"u.{k}" for k in keys)
    sql = (
        f"SELECT {cols}, {_SELECT_SUMS} FROM {table} u"
        f" WHERE u.tenant_id = ? AND u.day >= ? AND u.day <= ? GROUP BY {cols}"
    )
    with db.tenant_tx(tenant_id, write=False) as c:
        rows = c.execute(sql, (tenant_id, db_day(db.dialect, start), db_day(db.dialect, end))).fetchall()
    return _shape(_add_up(rows, keys.index(col), len(keys)), group_by, start, end)


def admin_usage(db: Database, start: date, end: date, group_by: str = "tenant", tenant_slug: str | None = None) -> dict[str, Any]:
    col = ADMIN_GROUPS.get(group_by)
    if col is None:
        raise ReportError(f"group_by must be one of {', '.join(ADMIN_GROUPS)}", "group_by")
    expr = "t.slug" if group_by == "tenant" else f"u.{col}"
    where = "u.day >= ? AND u.day <= ?"
    params: list[Any] = [db_day(db.dialect, start), db_day(db.dialect, end)]
    if tenant_slug:
        where += " AND t.slug = ?"
        params.append(tenant_slug)
    table = "usage_daily_users" if group_by == "user" else "usage_daily_models"
    sql = (
        f"SELECT {expr} AS grp, {_SELECT_SUMS} FROM {table} u JOIN tenants t ON t.id = u.tenant_id"
        f" WHERE {where} GROUP BY {expr}"
    )
    with db.system_tx(write=False) as c:
        rows = c.execute(sql, params).fetchall()
    return _shape(_add_up(rows, 0, 1), group_by, start, end)


def _add_up(rows: list[tuple], group_index: int, first_sum: int) -> dict[Any, list[int]]:
    """Sums per group value: rows are (key columns..., sums...)."""
    groups: dict[Any, list[int]] = {}
    for row in rows:
        sums = [int(v or 0) for v in row[first_sum:]]
        acc = groups.get(row[group_index])
        if acc is None:
            groups[row[group_index]] = sums
        else:
            for i, v in enumerate(sums):
                acc[i] += v
    return groups


def _shape(groups: dict[Any, list[int]], group_by: str, start: date, end: date) -> dict[str, Any]:
    out = []
    totals = {c: 0 for c in _SUMS}
    label = day_str if group_by == "day" else str
    for name, sums in sorted((label(g), s) for g, s in groups.items()):
        item: dict[str, Any] = {group_by: name}
        for c, v in zip(_SUMS, sums):
            item[c] = v
            totals[c] += v
        out.append(_with_derived(item))
    return {
        "object": "usage_report",
        "from": start.isoformat(),
        "to": end.isoformat(),
        "group_by": group_by,
        "data": out,
        "totals": _with_derived(totals),
    }


_USD = tuple((f"{c}_usd", f"{c}_micro_usd") for c in ("cost", "saved", "saved_cache", "saved_routing",
                                                       "cost_without_loadbear"))


def _with_derived(item: dict[str, Any]) -> dict[str, Any]:
    item["cost_without_loadbear_micro_usd"] = item["cost_micro_usd"] + item["saved_micro_usd"]
    for usd, micro in _USD:
        item[usd] = round(item[micro] / 1_000_000, 6)
    without = item["cost_without_loadbear_micro_usd"]
    item["saved_pct"] = round(100 * item["saved_micro_usd"] / without, 1) if without else None
    item["total_tokens"] = item["prompt_tokens"] + item["completion_tokens"]
    item["avg_latency_ms"] = round(item["latency_ms_sum"] / item["requests"], 1) if item["requests"] else None
    return item
