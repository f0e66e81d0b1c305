-- Tenancy and the AI interaction ledger (SQLite: UUIDs as TEXT, JSON as TEXT, times as UTC ISO text).
CREATE TABLE tenants (
  id TEXT PRIMARY KEY,
  slug TEXT NOT NULL UNIQUE,
  name TEXT NOT NULL,
  settings TEXT NOT NULL DEFAULT '{}',
  active INTEGER NOT NULL DEFAULT 1,
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now')),
  updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now'))
);

CREATE TABLE users (
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  external_id TEXT NOT NULL,
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now')),
  UNIQUE (tenant_id, external_id)
);

CREATE TABLE api_keys (
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  name TEXT NOT NULL DEFAULT '',
  prefix TEXT NOT NULL,
  key_hash TEXT NOT NULL UNIQUE,
  scopes TEXT NOT NULL DEFAULT '[]',
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now')),
  revoked_at TEXT,
  last_used_at TEXT
);
CREATE INDEX idx_api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE ai_interactions (
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  user_id TEXT REFERENCES users(id),
  feature TEXT NOT NULL,
  model TEXT NOT NULL,
  prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  latency_ms INTEGER NOT NULL,
  cached INTEGER NOT NULL DEFAULT 0,
  error TEXT,
  created_at TEXT NOT NULL,
  request_id TEXT,
  provider TEXT,
  requested_model TEXT NOT NULL,
  route TEXT,
  route_reason TEXT,
  status TEXT NOT NULL CHECK (status IN ('ok', 'error', 'degraded', 'cancelled')),
  streamed INTEGER NOT NULL DEFAULT 0,
  ttft_ms INTEGER,
  finish_reason TEXT,
  cached_input_tokens INTEGER NOT NULL DEFAULT 0,
  tokens_estimated INTEGER NOT NULL DEFAULT 0,
  cost_micro_usd INTEGER NOT NULL DEFAULT 0,
  saved_micro_usd INTEGER NOT NULL DEFAULT 0,
  cache_kind TEXT,
  cache_similarity REAL,
  cache_entry_id TEXT,
  attempt_count INTEGER NOT NULL DEFAULT 0,
  error_type TEXT,
  http_status INTEGER,
  retrieved_chunk_ids TEXT,
  prompt_text TEXT,
  response_text TEXT,
  metadata TEXT NOT NULL DEFAULT '{}'
);
-- SQLite stores UTC text, so the first 10 characters are the UTC day.
CREATE INDEX idx_ai_interactions_tenant_day ON ai_interactions (tenant_id, substr(created_at, 1, 10));
CREATE INDEX idx_ai_interactions_tenant_created ON ai_interactions (tenant_id, created_at);

CREATE TABLE ai_attempts (
  id TEXT PRIMARY KEY,
  interaction_id TEXT NOT NULL REFERENCES ai_interactions(id) ON DELETE CASCADE,
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  attempt_no INTEGER NOT NULL,
  provider TEXT NOT NULL,
  model TEXT NOT NULL,
  upstream_model TEXT,
  status TEXT NOT NULL,
  error_type TEXT,
  error TEXT,
  http_status INTEGER,
  prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  cached_input_tokens INTEGER NOT NULL DEFAULT 0,
  tokens_estimated INTEGER NOT NULL DEFAULT 0,
  cost_micro_usd INTEGER NOT NULL DEFAULT 0,
  latency_ms INTEGER NOT NULL,
  ttft_ms INTEGER,
  started_at TEXT NOT NULL
);
CREATE INDEX idx_ai_attempts_interaction ON ai_attempts (interaction_id);
CREATE INDEX idx_ai_attempts_tenant ON ai_attempts (tenant_id, started_at);

-- Daily rollups, maintained in the same transaction as the raw rows: reports read these.
CREATE TABLE usage_daily (
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  day TEXT NOT NULL,
  feature TEXT NOT NULL,
  model TEXT NOT NULL,
  user_external_id TEXT NOT NULL DEFAULT '',
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
  PRIMARY KEY (tenant_id, day, feature, model, user_external_id)
);
