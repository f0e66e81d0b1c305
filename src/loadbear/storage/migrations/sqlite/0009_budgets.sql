-- Monthly budgets (gateway/budget.py, the "database" budget store). See the PostgreSQL twin:
-- spend's source of truth is the ledger (usage_daily); the counter row holds spend settled since
-- the last sync and the worst-case costs of requests in flight, reserved by one conditional
-- UPDATE. Amounts are integer micro-USD; month is 'YYYY-MM' (UTC); expires_at is epoch seconds.
CREATE TABLE budget_counters (
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  month TEXT NOT NULL,
  spent_micro_usd INTEGER NOT NULL DEFAULT 0,
  reserved_micro_usd INTEGER NOT NULL DEFAULT 0,
  soft_notified_micro_usd INTEGER NOT NULL DEFAULT -1,
  hard_notified_micro_usd INTEGER NOT NULL DEFAULT -1,
  PRIMARY KEY (tenant_id, month)
);

CREATE TABLE budget_reservations (
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  month TEXT NOT NULL,
  amount_micro_usd INTEGER NOT NULL,
  expires_at REAL NOT NULL
);
CREATE INDEX idx_budget_reservations_expiry ON budget_reservations (tenant_id, month, expires_at);
