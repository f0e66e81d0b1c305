-- Narrow daily rollups for the usage reports, maintained by the ledger writer in the same
-- transaction as usage_daily (and with the same rows left out: evaluation traffic). usage_daily
-- keeps one row per (day, feature, model, end user): a busy tenant's month is ~30,000 rows, and
-- every report added them all up again (10-20 ms of CPU per report). These hold the same sums
-- without the end user (reports by day, feature, model: 30 days x features x models rows) and
-- without feature and model (the report by end user: 30 days x users rows).
-- No foreign key to tenants: the rows are sums of usage_daily's, which has one, and every FK is a
-- per-row lookup on the ledger's write path. Filled from usage_daily for existing ledgers.
-- WITHOUT ROWID, like usage_daily (0005): rows stored in key order, read contiguously.

CREATE TABLE usage_daily_models (
  tenant_id TEXT NOT NULL,
  day TEXT NOT NULL,
  feature TEXT NOT NULL,
  model TEXT NOT NULL,
  requests INTEGER NOT NULL DEFAULT 0,
  errors INTEGER NOT NULL DEFAULT 0,
  degraded INTEGER NOT NULL DEFAULT 0,
  cancelled INTEGER NOT NULL DEFAULT 0,
  cached_requests INTEGER NOT NULL DEFAULT 0,
  streamed_requests INTEGER NOT NULL DEFAULT 0,
  prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  cached_input_tokens INTEGER NOT NULL DEFAULT 0,
  cost_micro_usd INTEGER NOT NULL DEFAULT 0,
  saved_micro_usd INTEGER NOT NULL DEFAULT 0,
  latency_ms_sum INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (tenant_id, day, feature, model)
) WITHOUT ROWID;
INSERT INTO usage_daily_models (tenant_id, day, feature, model, requests, errors, degraded, cancelled, cached_requests, streamed_requests, prompt_tokens, completion_tokens, cached_input_tokens, cost_micro_usd, saved_micro_usd, latency_ms_sum)
  SELECT tenant_id, day, feature, model, SUM(requests), SUM(errors), SUM(degraded), SUM(cancelled), SUM(cached_requests), SUM(streamed_requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_input_tokens), SUM(cost_micro_usd), SUM(saved_micro_usd), SUM(latency_ms_sum)
  FROM usage_daily GROUP BY tenant_id, day, feature, model;

CREATE TABLE usage_daily_users (
  tenant_id TEXT NOT NULL,
  day TEXT NOT NULL,
  user_external_id TEXT NOT NULL,
  requests INTEGER NOT NULL DEFAULT 0,
  errors INTEGER NOT NULL DEFAULT 0,
  degraded INTEGER NOT NULL DEFAULT 0,
  cancelled INTEGER NOT NULL DEFAULT 0,
  cached_requests INTEGER NOT NULL DEFAULT 0,
  streamed_requests INTEGER NOT NULL DEFAULT 0,
  prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  cached_input_tokens INTEGER NOT NULL DEFAULT 0,
  cost_micro_usd INTEGER NOT NULL DEFAULT 0,
  saved_micro_usd INTEGER NOT NULL DEFAULT 0,
  latency_ms_sum INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (tenant_id, day, user_external_id)
) WITHOUT ROWID;
INSERT INTO usage_daily_users (tenant_id, day, user_external_id, requests, errors, degraded, cancelled, cached_requests, streamed_requests, prompt_tokens, completion_tokens, cached_input_tokens, cost_micro_usd, saved_micro_usd, latency_ms_sum)
  SELECT tenant_id, day, user_external_id, SUM(requests), SUM(errors), SUM(degraded), SUM(cancelled), SUM(cached_requests), SUM(streamed_requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_input_tokens), SUM(cost_micro_usd), SUM(saved_micro_usd), SUM(latency_ms_sum)
  FROM usage_daily GROUP BY tenant_id, day, user_external_id;
