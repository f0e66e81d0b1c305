-- Monthly budgets (gateway/budget.py, the "database" budget store; Redis replaces it when
-- configured). Spend's source of truth stays the ledger (usage_daily); a counter row holds what
-- the guard knows between ledger flushes: spent = the month's ledger spend when the row was
-- made (re-synced as max(spent, ledger) now and then) plus every settled request since, and
-- reserved = the worst-case costs of requests in flight. A reservation is one atomic conditional
-- UPDATE (spent + reserved + amount <= limit), so concurrent replicas cannot overspend.
-- Amounts are integer micro-USD; month is 'YYYY-MM' (UTC); expires_at is epoch seconds.
CREATE TABLE budget_counters (
  tenant_id UUID NOT NULL REFERENCES tenants(id),
  month TEXT NOT NULL,
  spent_micro_usd BIGINT NOT NULL DEFAULT 0,
  reserved_micro_usd BIGINT NOT NULL DEFAULT 0,
  -- The limits (micro-USD) at which the soft / hard events last fired: once per limit per month.
  soft_notified_micro_usd BIGINT NOT NULL DEFAULT -1,
  hard_notified_micro_usd BIGINT NOT NULL DEFAULT -1,
  PRIMARY KEY (tenant_id, month)
);

-- One row per reservation in flight: a replica that dies holding one frees it at expires_at.
CREATE TABLE budget_reservations (
  id UUID PRIMARY KEY,
  tenant_id UUID NOT NULL,
  month TEXT NOT NULL,
  amount_micro_usd BIGINT NOT NULL,
  expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX idx_budget_reservations_expiry ON budget_reservations (tenant_id, month, expires_at);

ALTER TABLE budget_counters ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON budget_counters
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

ALTER TABLE budget_reservations ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON budget_reservations
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);
