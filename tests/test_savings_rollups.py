"""The savings split in the rollups (migration 0014): ``saved_cache_micro_usd`` (cache hits) and
``saved_routing_micro_usd`` (everything else that saved: routed requests) add up to
``saved_micro_usd`` in usage_daily and the narrow rollups, whether the ledger writer filled them
or the migration backfilled them from the ledger rows of a database at 0013. Both backends."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime, timedelta, timezone

from loadbear.ledger.records import InteractionRecord
from loadbear.ledger.reports import admin_usage, tenant_usage
from loadbear.storage.db import Database, open_database
from loadbear.storage.migrate import migrate
from loadbear.storage.values import db_time, uuid7
from loadbear.tenancy.service import TenantService, user_uuid
from conftest import write_ledger

DAY0 = datetime(2026, 3, 1, 22, 0, tzinfo=timezone.utc)
SPLIT = ("saved_micro_usd", "saved_cache_micro_usd", "saved_routing_micro_usd")
KEYS = {
    "usage_daily": ("tenant_id", "day", "feature", "model", "user_external_id"),
    "usage_daily_models": ("tenant_id", "day", "feature", "model"),
    "usage_daily_users": ("tenant_id", "day", "user_external_id"),
}


def _records(rng: random.Random, tenants: list[str], n: int) -> list[InteractionRecord]:
    out = []
    for _ in range(n):
        when = DAY0 + timedelta(minutes=rng.randint(0, 60 * 50))  # crosses UTC midnight twice
        cached = rng.random() < 0.3
        status = rng.choice(("ok", "ok", "ok", "error", "degraded"))
        # As the gateway ledgers them: only ok answers save (a degraded answer from the cache saved
        # nothing: the failed calls were made); a hit costs nothing.
        saved = rng.randint(1, 5_000) if status == "ok" and (cached or rng.random() < 0.6) else 0
        out.append(InteractionRecord(
            id=uuid7(), tenant_id=rng.choice(tenants), feature=rng.choice(("chat", "search")), requested_model="auto",
            model=rng.choice(("gpt-4o-mini", "gpt-4o")), status=status, created_at=when, latency_ms=rng.randint(1, 900),
            prompt_tokens=rng.randint(1, 500), completion_tokens=rng.randint(0, 200), cached=cached,
            cost_micro_usd=0 if cached else rng.randint(0, 9_000), saved_micro_usd=saved,
            route="auto" if not cached else None, user_external_id=rng.choice((None, "u-1", "u-2")),
            metadata={"eval_run": "run-7"} if rng.random() < 0.1 else {}))
    return out


def _expected(records: list[InteractionRecord], keys: tuple[str, ...]) -> dict[tuple, tuple[int, int, int]]:
    """Per rollup key: (saved, by cache, by routing) from the records, eval traffic left out."""
    acc: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in records:
        if r.metadata.get("eval_run"):
            continue
        full = {"tenant_id": r.tenant_id, "day": r.created_at.astimezone(timezone.utc).date().isoformat(),
                "feature": r.feature, "model": r.model, "user_external_id": r.user_external_id or ""}
        a = acc[tuple(full[k] for k in keys)]
        a[0] += r.saved_micro_usd
        a[1 if r.cached else 2] += r.saved_micro_usd
    return {k: tuple(v) for k, v in acc.items() if v[0]}


def _stored(db: Database, table: str) -> dict[tuple, tuple[int, int, int]]:
    keys = KEYS[table]
    with db.system_tx(write=False) as c:
        rows = c.execute(f"SELECT {', '.join(keys)}, {', '.join(SPLIT)} FROM {table}").fetchall()
    out = {}
    for r in rows:
        saved, cache, routing = (int(v) for v in r[len(keys):])
        assert saved == cache + routing, (table, r)
        if saved:
            out[tuple(str(v) for v in r[:len(keys)])] = (saved, cache, routing)
    return out


def assert_split(db: Database, records: list[InteractionRecord]) -> None:
    for table, keys in KEYS.items():
        assert _stored(db, table) == _expected(records, keys), table


def _write(db: Database, records: list[InteractionRecord], tmp_path) -> None:
    write_ledger(db, records, tmp_path, batch_size=29)


def test_the_writer_splits_savings_in_every_rollup(db, tmp_path):
    rng = random.Random(14)
    svc = TenantService(db)
    tenants = [svc.create_tenant(f"split-{i}").id for i in range(2)]
    records = _records(rng, tenants, 300)
    _write(db, records, tmp_path)
    assert_split(db, records)
    product = [r for r in records if not r.metadata.get("eval_run")]
    start, end = DAY0.date(), DAY0.date() + timedelta(days=3)
    for t in tenants:
        mine = [r for r in product if r.tenant_id == t]
        cache = sum(r.saved_micro_usd for r in mine if r.cached)
        routing = sum(r.saved_micro_usd for r in mine if not r.cached)
        assert cache and routing
        for group in ("day", "feature", "model", "user"):
            totals = tenant_usage(db, t, start, end, group)["totals"]
            assert (totals["saved_cache_micro_usd"], totals["saved_routing_micro_usd"]) == (cache, routing)
            assert totals["cost_without_loadbear_micro_usd"] == sum(r.cost_micro_usd for r in mine) + cache + routing
    admin = admin_usage(db, start, end, "tenant")["totals"]
    assert admin["saved_cache_micro_usd"] == sum(r.saved_micro_usd for r in product if r.cached)


# -- upgrade from 0013 ----------------------------------------------------------------------------

_ROLLUP_SUMS = ("requests", "cached_requests", "cost_micro_usd", "saved_micro_usd")


def _legacy_ledger(db: Database, records: list[InteractionRecord]) -> None:
    """Ledger rows and rollups as the 0013 writer left them: one saved_micro_usd, no split."""
    d = db.dialect
    with db.system_tx() as c:
        for r in records:
            uid = None
            if r.user_external_id:
                uid = user_uuid(r.tenant_id, r.user_external_id)
                c.execute("INSERT INTO users (id, tenant_id, external_id) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                          (uid, r.tenant_id, r.user_external_id))
            c.execute(
                "INSERT INTO ai_interactions (id, tenant_id, user_id, feature, model, requested_model, status,"
                " created_at, latency_ms, prompt_tokens, completion_tokens, cached, cost_micro_usd, saved_micro_usd,"
                " route, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.id, r.tenant_id, uid, r.feature, r.model, r.requested_model, r.status,
                 db_time(d, r.created_at), r.latency_ms, r.prompt_tokens, r.completion_tokens, r.cached,
                 r.cost_micro_usd, r.saved_micro_usd, r.route,
                 '{"eval_run": "run-7"}' if r.metadata.get("eval_run") else "{}"))
        sums: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(_ROLLUP_SUMS))
        for r in records:
            if r.metadata.get("eval_run"):
                continue
            key = (r.tenant_id, r.created_at.astimezone(timezone.utc).date(), r.feature, r.model,
                   r.user_external_id or "")
            s = sums[key]
            for i, v in enumerate((1, int(r.cached), r.cost_micro_usd, r.saved_micro_usd)):
                s[i] += v
        # A day whose ledger rows are gone (kept rollups only): its savings cannot be split
        # and count as routing, so that the parts still add up to the total.
        orphan = (records[0].tenant_id, DAY0.date() - timedelta(days=10), "chat", "gpt-4o", "")
        sums[orphan] = [3, 1, 100, 777]
        cols = ", ".join(_ROLLUP_SUMS)
        for (tid, day, feature, model, ext), s in sums.items():
            day_v = day.isoformat() if d == "sqlite" else day
            c.execute(f"INSERT INTO usage_daily (tenant_id, day, feature, model, user_external_id, {cols})"
                      " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (tid, day_v, feature, model, ext, *s))
        c.execute(f"INSERT INTO usage_daily_models (tenant_id, day, feature, model, {cols})"
                  f" SELECT tenant_id, day, feature, model, {', '.join(f'SUM({x})' for x in _ROLLUP_SUMS)}"
                  " FROM usage_daily GROUP BY tenant_id, day, feature, model")
        c.execute(f"INSERT INTO usage_daily_users (tenant_id, day, user_external_id, {cols})"
                  f" SELECT tenant_id, day, user_external_id, {', '.join(f'SUM({x})' for x in _ROLLUP_SUMS)}"
                  " FROM usage_daily GROUP BY tenant_id, day, user_external_id")


def test_migration_0014_backfills_the_split_from_the_ledger(empty_db_url, tmp_path):
    db = open_database(empty_db_url)
    try:
        migrate(db, target=13)
        svc = TenantService(db)
        tenants = [svc.create_tenant(f"legacy-{i}").id for i in range(2)]
        rng = random.Random(13)
        records = _records(rng, tenants, 250)
        # An evaluation run's cache hit in the same rollup row as product traffic must not be
        # counted as a cache saving (its saving is smaller than the row's routing part, so a
        # clamp to the row's total could not hide the mistake).
        base = next(r for r in records if not r.cached and r.saved_micro_usd and not r.metadata.get("eval_run"))
        records.append(InteractionRecord(
            id=uuid7(), tenant_id=base.tenant_id, feature=base.feature, requested_model="gpt-4o-mini",
            model=base.model, status="ok", created_at=base.created_at, latency_ms=1, cached=True,
            saved_micro_usd=1, user_external_id=base.user_external_id, metadata={"eval_run": "run-7"}))
        _legacy_ledger(db, records)
        assert 14 in migrate(db)

        orphan_day = (DAY0.date() - timedelta(days=10)).isoformat()
        orphan = InteractionRecord(  # stands for the rollup-only day: all of it routing
            id="-", tenant_id=records[0].tenant_id, feature="chat", requested_model="auto", model="gpt-4o",
            status="ok", created_at=datetime.fromisoformat(orphan_day + "T12:00:00+00:00"), latency_ms=0,
            saved_micro_usd=777)
        assert_split(db, records + [orphan])
        product = [r for r in records if not r.metadata.get("eval_run")]
        assert sum(r.saved_micro_usd for r in product if r.cached) > 0
        start, end = DAY0.date(), DAY0.date() + timedelta(days=3)
        totals = tenant_usage(db, tenants[1], start, end, "user")["totals"]
        mine = [r for r in product if r.tenant_id == tenants[1]]
        assert totals["saved_cache_micro_usd"] == sum(r.saved_micro_usd for r in mine if r.cached)
        assert totals["saved_routing_micro_usd"] == sum(r.saved_micro_usd for r in mine if not r.cached)

        # The writer adds to the backfilled rows.
        more = _records(random.Random(15), tenants, 80)
        _write(db, more, tmp_path)
        assert_split(db, records + [orphan] + more)
    finally:
        db.close()
