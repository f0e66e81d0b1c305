"""Usage reports (read from the rollups) against the raw ledger rows, on both backends."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from typing import Iterator

import pytest

from loadbear.ledger.records import AttemptRecord, InteractionRecord
from loadbear.ledger.reports import ReportError, admin_usage, parse_period, tenant_usage
from loadbear.storage.db import Database, open_database
from loadbear.storage.migrate import migrate
from loadbear.storage.values import uuid7
from loadbear.tenancy.service import TenantService
from conftest import write_ledger

START = date(2026, 5, 1)  # the seeded ledger covers May 1-10; reports look at May 3-8
PERIOD = (date(2026, 5, 3), date(2026, 5, 8))
SUMS = ("requests", "errors", "degraded", "cancelled", "cached_requests", "streamed_requests", "prompt_tokens",
        "completion_tokens", "cached_input_tokens", "cost_micro_usd", "saved_micro_usd", "latency_ms_sum")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger(request, tmp_path_factory) -> Iterator[tuple[Database, dict[str, str], list[InteractionRecord]]]:
    """One seeded ledger per backend for the whole module: three tenants, ten days."""
    if request.param == "sqlite":
        db = open_database(f"sqlite:///{tmp_path_factory.mktemp('reports') / 'ledger.db'}")
        migrate(db)
    else:
        db = open_database(request.getfixturevalue("pg_server").fresh_url())
    svc = TenantService(db)
    tenants = {slug: svc.create_tenant(slug).id for slug in ("acme", "globex", "quiet")}
    rng = random.Random(5)
    records = []
    for i in range(900):
        slug = "acme" if i % 3 else "globex"
        when = datetime.combine(START, datetime.min.time(), timezone.utc) + timedelta(
            seconds=rng.randrange(10 * 86400))
        r = InteractionRecord(
            id=uuid7(), tenant_id=tenants[slug], requested_model="auto",
            feature=rng.choice(("chat", "search")) if slug == "acme" else "globex-only-feature",
            model=rng.choice(("gpt-4o", "gpt-4o-mini", "claude")),
            status=rng.choice(("ok", "ok", "ok", "error", "degraded", "cancelled")), created_at=when,
            latency_ms=rng.randrange(10, 3000), prompt_tokens=rng.randrange(2000), completion_tokens=rng.randrange(500),
            cost_micro_usd=rng.randrange(10**6), cached=rng.random() < 0.25, streamed=rng.random() < 0.5,
            user_external_id=rng.choice((None, "ann", "bo")) if slug == "acme" else "globex-user",
        )
        r.saved_micro_usd = rng.randrange(5000) if r.cached else 0
        r.cached_input_tokens = rng.randrange(50)
        r.attempts.append(AttemptRecord(attempt_no=1, provider="openai", model=r.model, upstream_model=None,
                                        status="ok", started_at=when, latency_ms=r.latency_ms))
        records.append(r)
    write_ledger(db, records, tmp_path_factory.mktemp("dl"), batch_size=64)
    yield db, tenants, records
    db.close()


def expected(records, tenant_id: str | None, key, period=PERIOD) -> dict:
    """What a report must say, computed from the records themselves."""
    out: dict = defaultdict(lambda: dict.fromkeys(SUMS, 0))
    for r in records:
        if tenant_id is not None and r.tenant_id != tenant_id:
            continue
        if not period[0] <= r.created_at.astimezone(timezone.utc).date() <= period[1]:
            continue
        s = out[key(r)]
        s["requests"] += 1
        s["errors"] += r.status == "error"
        s["degraded"] += r.status == "degraded"
        s["cancelled"] += r.status == "cancelled"
        s["cached_requests"] += r.cached
        s["streamed_requests"] += r.streamed
        s["prompt_tokens"] += r.prompt_tokens
        s["completion_tokens"] += r.completion_tokens
        s["cached_input_tokens"] += r.cached_input_tokens
        s["cost_micro_usd"] += r.cost_micro_usd
        s["saved_micro_usd"] += r.saved_micro_usd
        s["latency_ms_sum"] += r.latency_ms
    return dict(out)


KEYS = {
    "day": lambda r: r.created_at.astimezone(timezone.utc).date().isoformat(),
    "feature": lambda r: r.feature,
    "model": lambda r: r.model,
    "user": lambda r: r.user_external_id or "",
}


def as_table(report: dict) -> dict:
    g = report["group_by"]
    return {item[g]: {k: item[k] for k in SUMS} for item in report["data"]}


@pytest.mark.parametrize("group_by", sorted(KEYS))
def test_tenant_report_matches_raw_rows(ledger, group_by):
    db, tenants, records = ledger
    report = tenant_usage(db, tenants["acme"], *PERIOD, group_by=group_by)
    want = expected(records, tenants["acme"], KEYS[group_by])
    assert as_table(report) == want
    assert [item[group_by] for item in report["data"]] == sorted(want)  # ordered by the group
    totals = report["totals"]
    assert {k: totals[k] for k in SUMS} == {k: sum(v[k] for v in want.values()) for k in SUMS}
    assert totals["requests"] > 100
    assert (report["from"], report["to"], report["group_by"], report["object"]) == (
        "2026-05-03", "2026-05-08", group_by, "usage_report")


def test_report_totals_agree_with_the_raw_ledger_table(ledger):
    db, tenants, _ = ledger
    lo, hi = PERIOD
    if db.dialect == "sqlite":
        where = "substr(created_at, 1, 10) BETWEEN ? AND ?"
        params = (lo.isoformat(), hi.isoformat())
    else:
        where = "(created_at AT TIME ZONE 'UTC')::date BETWEEN ? AND ?"
        params = (lo, hi)
    with db.system_tx(write=False) as c:
        raw = c.fetchone(
            "SELECT COUNT(*) AS requests, SUM(cost_micro_usd) AS cost, SUM(prompt_tokens) AS prompt"
            f" FROM ai_interactions WHERE tenant_id = ? AND {where}", (tenants["acme"], *params))
    totals = tenant_usage(db, tenants["acme"], lo, hi)["totals"]
    assert (totals["requests"], totals["cost_micro_usd"], totals["prompt_tokens"]) == (
        raw["requests"], int(raw["cost"]), int(raw["prompt"]))


def test_derived_fields(ledger):
    db, tenants, _ = ledger
    t = tenant_usage(db, tenants["acme"], *PERIOD)["totals"]
    assert t["cost_usd"] == round(t["cost_micro_usd"] / 1_000_000, 6)
    assert t["saved_usd"] == round(t["saved_micro_usd"] / 1_000_000, 6)
    assert t["total_tokens"] == t["prompt_tokens"] + t["completion_tokens"]
    assert t["avg_latency_ms"] == round(t["latency_ms_sum"] / t["requests"], 1)


def test_a_tenant_never_sees_another_tenants_usage(ledger):
    db, tenants, records = ledger
    globex = tenant_usage(db, tenants["globex"], *PERIOD, group_by="feature")
    assert as_table(globex) == expected(records, tenants["globex"], KEYS["feature"])
    assert [i["feature"] for i in globex["data"]] == ["globex-only-feature"]
    acme_users = {i["user"] for i in tenant_usage(db, tenants["acme"], *PERIOD, group_by="user")["data"]}
    assert "globex-user" not in acme_users and {"ann", "bo"} <= acme_users
    quiet = tenant_usage(db, tenants["quiet"], *PERIOD)
    assert quiet["data"] == [] and quiet["totals"]["requests"] == 0 and quiet["totals"]["avg_latency_ms"] is None


def test_days_outside_the_period_are_left_out(ledger):
    db, tenants, records = ledger
    one_day = (date(2026, 5, 10), date(2026, 5, 10))
    report = tenant_usage(db, tenants["acme"], *one_day)
    assert [i["day"] for i in report["data"]] == ["2026-05-10"]
    assert as_table(report) == expected(records, tenants["acme"], KEYS["day"], one_day)
    assert tenant_usage(db, tenants["acme"], date(2026, 6, 1), date(2026, 6, 30))["data"] == []


def test_unknown_group_by_is_refused(ledger):
    db, tenants, _ = ledger
    with pytest.raises(ReportError) as e:
        tenant_usage(db, tenants["acme"], *PERIOD, group_by="tenant")  # admin only
    assert e.value.param == "group_by"
    with pytest.raises(ReportError):
        admin_usage(db, *PERIOD, group_by="week")


def test_admin_report_across_tenants(ledger):
    db, tenants, records = ledger
    by_tenant = admin_usage(db, *PERIOD)  # group_by tenant by default
    slug_of = {v: k for k, v in tenants.items()}
    assert as_table(by_tenant) == expected(records, None, lambda r: slug_of[r.tenant_id])
    assert "quiet" not in as_table(by_tenant)  # no usage, no line
    by_model = admin_usage(db, *PERIOD, group_by="model")
    assert as_table(by_model) == expected(records, None, KEYS["model"])
    only_globex = admin_usage(db, *PERIOD, group_by="day", tenant_slug="globex")
    assert as_table(only_globex) == expected(records, tenants["globex"], KEYS["day"])
    assert by_tenant["totals"]["requests"] == sum(
        tenant_usage(db, t, *PERIOD)["totals"]["requests"] for t in tenants.values())


# -- periods -------------------------------------------------------------------------------


def test_period_defaults_to_the_last_30_days():
    assert parse_period(None, None, today=date(2026, 3, 31)) == (date(2026, 3, 2), date(2026, 3, 31))
    assert parse_period(None, "2026-01-31") == (date(2026, 1, 2), date(2026, 1, 31))
    assert parse_period("2026-01-10", None, today=date(2026, 1, 20)) == (date(2026, 1, 10), date(2026, 1, 20))
    today = datetime.now(timezone.utc).date()  # UTC, like the rollup days
    assert parse_period(None, None)[1] == today


def test_period_accepts_dates_and_date_times():
    assert parse_period("2026-01-01", "2026-01-31T12:00:00Z") == (date(2026, 1, 1), date(2026, 1, 31))
    # An evening in New York is the next UTC day.
    assert parse_period("2026-01-01T00:00:00+00:00", "2026-01-31T22:00:00-05:00")[1] == date(2026, 2, 1)
    assert parse_period("2026-02-01", "2026-02-01") == (date(2026, 2, 1), date(2026, 2, 1))


@pytest.mark.parametrize("from_, to, param", [
    ("2026-13-01", None, "from"),
    ("yesterday", None, "from"),
    ("2026-01-01garbage", None, "from"),
    (None, "31/01/2026", "to"),
    (None, "", None),  # empty means the default, not an error
    ("2026-02-01", "2026-01-31", "from"),
    ("2023-01-01", "2026-01-01", "from"),
])
def test_period_errors(from_, to, param):
    if param is None:
        assert parse_period(from_, to, today=date(2026, 1, 31)) == (date(2026, 1, 2), date(2026, 1, 31))
        return
    with pytest.raises(ReportError) as e:
        parse_period(from_, to, today=date(2026, 1, 31))
    assert e.value.param == param and e.value.message
