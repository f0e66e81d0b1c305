-- Tenancy and the AI interaction ledger, with row-level security on every tenant table.
-- __APP_ROLE__ is replaced by the configured application role (no BYPASSRLS, no ownership).
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '__APP_ROLE__') THEN
    CREATE ROLE __APP_ROLE__ NOLOGIN NOBYPASSRLS;
  END IF;
  -- The connecting user switches to the role per transaction, so it must be a member.
  IF NOT pg_has_role(current_user, '__APP_ROLE__', 'MEMBER') THEN
    EXECUTE format('GRANT %I TO %I', '__APP_ROLE__', current_user);
  END IF;
END
$$;

CREATE TABLE tenants (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  slug VARCHAR(64) NOT NULL UNIQUE,
  name TEXT NOT NULL,
  settings JSONB NOT NULL DEFAULT '{}',
  active BOOLEAN NOT NULL DEFAULT TRUE,
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE TABLE users (
  id UUID PRIMARY KEY,
  tenant_id UUID NOT NULL REFERENCES tenants(id),
  external_id TEXT NOT NULL,
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  UNIQUE (tenant_id, external_id)
);

CREATE TABLE api_keys (
  id UUID PRIMARY KEY,
  tenant_id UUID NOT NULL REFERENCES tenants(id),
  name TEXT NOT NULL DEFAULT '',
  prefix VARCHAR(32) NOT NULL,
  key_hash CHAR(64) NOT NULL UNIQUE,
  scopes JSONB NOT NULL DEFAULT '[]',
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  revoked_at TIMESTAMPTZ,
  last_used_at TIMESTAMPTZ
);
CREATE INDEX idx_api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE ai_interactions (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id UUID NOT NULL REFERENCES tenants(id),
  user_id UUID REFERENCES users(id),
  feature VARCHAR(100) NOT NULL,
  model VARCHAR(100) NOT NULL,
  prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  latency_ms INTEGER NOT NULL,
  cached BOOLEAN NOT NULL DEFAULT FALSE,
  error TEXT,
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  request_id TEXT,
  provider VARCHAR(50),
  requested_model VARCHAR(100) NOT NULL,
  route VARCHAR(50),
  route_reason TEXT,
  status VARCHAR(16) NOT NULL CHECK (status IN ('ok', 'error', 'degraded', 'cancelled')),
  streamed BOOLEAN NOT NULL DEFAULT FALSE,
  ttft_ms INTEGER,
  finish_reason VARCHAR(32),
  cached_input_tokens INTEGER NOT NULL DEFAULT 0,
  tokens_estimated BOOLEAN NOT NULL DEFAULT FALSE,
  cost_micro_usd BIGINT NOT NULL DEFAULT 0,
  saved_micro_usd BIGINT NOT NULL DEFAULT 0,
  cache_kind VARCHAR(16),
  cache_similarity REAL,
  cache_entry_id UUID,
  attempt_count INTEGER NOT NULL DEFAULT 0,
  error_type VARCHAR(50),
  http_status INTEGER,
  retrieved_chunk_ids JSONB,
  prompt_text TEXT,
  response_text TEXT,
  metadata JSONB NOT NULL DEFAULT '{}'
);
-- created_at::date depends on the session time zone and cannot be indexed; the UTC day can.
CREATE INDEX idx_ai_interactions_tenant_day
  ON ai_interactions (tenant_id, ((created_at AT TIME ZONE 'UTC')::date));
CREATE INDEX idx_ai_interactions_tenant_created ON ai_interactions (tenant_id, created_at);

CREATE TABLE ai_attempts (
  id UUID PRIMARY KEY,
  interaction_id UUID NOT NULL REFERENCES ai_interactions(id) ON DELETE CASCADE,
  -- No foreign key here: the interaction already pins the tenant, and every FK is a per-row
  -- lookup on the ledger's hot write path.
  tenant_id UUID NOT NULL,
  attempt_no INTEGER NOT NULL,
  provider VARCHAR(50) NOT NULL,
  model VARCHAR(100) NOT NULL,
  upstream_model VARCHAR(200),
  status VARCHAR(16) NOT NULL,
  error_type VARCHAR(50),
  error TEXT,
  http_status INTEGER,
  prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  cached_input_tokens INTEGER NOT NULL DEFAULT 0,
  tokens_estimated BOOLEAN NOT NULL DEFAULT FALSE,
  cost_micro_usd BIGINT NOT NULL DEFAULT 0,
  latency_ms INTEGER NOT NULL,
  ttft_ms INTEGER,
  started_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_ai_attempts_interaction ON ai_attempts (interaction_id);
CREATE INDEX idx_ai_attempts_tenant ON ai_attempts (tenant_id, started_at);

-- Daily rollups, maintained in the same transaction as the raw rows: reports read these.
CREATE TABLE usage_daily (
  tenant_id UUID NOT NULL REFERENCES tenants(id),
  day DATE NOT NULL,
  feature VARCHAR(100) NOT NULL,
  model VARCHAR(100) NOT NULL,
  user_external_id TEXT NOT NULL DEFAULT '',
  requests BIGINT NOT NULL DEFAULT 0,
  errors BIGINT NOT NULL DEFAULT 0,
  degraded BIGINT NOT NULL DEFAULT 0,
  cancelled BIGINT NOT NULL DEFAULT 0,
  cached_requests BIGINT NOT NULL DEFAULT 0,
  streamed_requests BIGINT NOT NULL DEFAULT 0,
  prompt_tokens BIGINT NOT NULL DEFAULT 0,
  completion_tokens BIGINT NOT NULL DEFAULT 0,
  cached_input_tokens BIGINT NOT NULL DEFAULT 0,
  cost_micro_usd BIGINT NOT NULL DEFAULT 0,
  saved_micro_usd BIGINT NOT NULL DEFAULT 0,
  latency_ms_sum BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (tenant_id, day, feature, model, user_external_id)
);

-- Row-level security: the application role sees and writes only the tenant set for the
-- transaction (loadbear.tenant_id). Unset means no rows at all.
ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenants
  USING (id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON users
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_keys
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

ALTER TABLE ai_interactions ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON ai_interactions
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

ALTER TABLE ai_attempts ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON ai_attempts
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

ALTER TABLE usage_daily ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON usage_daily
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);
