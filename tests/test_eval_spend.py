"""Evaluation traffic is ledgered row by row but never counted as product spend."""

from __future__ import annotations

from loadbear.ledger.records import AttemptRecord, InteractionRecord
from loadbear.ledger.reports import parse_period, tenant_usage
from loadbear.ledger.writer import LedgerWriter
from loadbear.storage.values import utcnow, uuid7
from loadbear.tenancy.service import TenantService


def _rec(tenant_id, metadata):
    now = utcnow()
    return InteractionRecord(
        id=uuid7(), tenant_id=tenant_id, feature="helpdesk", requested_model="gpt-4o-mini", model="gpt-4o-mini",
        status="ok", created_at=now, latency_ms=5, prompt_tokens=100, completion_tokens=20, cost_micro_usd=27,
        metadata=metadata, attempts=[AttemptRecord(1, "openai", "gpt-4o-mini", "gpt-4o-mini", "ok", now, 5)],
    )


def test_eval_rows_are_kept_but_not_in_usage(db, tmp_path):
    tenant = TenantService(db).create_tenant("acme")
    w = LedgerWriter(db, dead_letter_path=tmp_path / "dl.jsonl")
    w.submit(_rec(tenant.id, {}))
    w.submit(_rec(tenant.id, {"eval_run": "run-1", "eval_case": "refunds"}))
    w.submit(_rec(tenant.id, {"eval_run": "run-1", "eval_case": "sso"}))
    w.close()
    with db.tenant_tx(tenant.id, write=False) as c:
        assert c.scalar("SELECT COUNT(*) FROM ai_interactions WHERE tenant_id = ?", (tenant.id,)) == 3
    start, end = parse_period(None, None)
    report = tenant_usage(db, tenant.id, start, end, "feature")
    assert report["totals"]["requests"] == 1
    assert report["totals"]["cost_micro_usd"] == 27
