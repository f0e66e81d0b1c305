-- Evaluation runs and their per-case results. A run belongs to a tenant (its knowledge base
-- was evaluated); results repeat the tenant so row-level security filters them directly.
CREATE TABLE eval_runs (
  id UUID PRIMARY KEY,
  tenant_id UUID NOT NULL REFERENCES tenants(id),
  label TEXT,
  status VARCHAR(16) NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
  dataset_name TEXT NOT NULL,
  dataset JSONB NOT NULL DEFAULT '{}',
  model VARCHAR(100) NOT NULL,
  pipeline_hash VARCHAR(64) NOT NULL,
  fingerprint JSONB NOT NULL DEFAULT '{}',
  config JSONB NOT NULL DEFAULT '{}',
  summary JSONB,
  error TEXT,
  created_at TIMESTAMPTZ NOT NULL,
  finished_at TIMESTAMPTZ
);
CREATE INDEX idx_eval_runs_tenant ON eval_runs (tenant_id, created_at);

CREATE TABLE eval_results (
  run_id UUID NOT NULL REFERENCES eval_runs(id) ON DELETE CASCADE,
  tenant_id UUID NOT NULL REFERENCES tenants(id),
  case_id TEXT NOT NULL,
  position INTEGER NOT NULL,
  diagnosis VARCHAR(16) NOT NULL CHECK (diagnosis IN ('pass', 'retrieval_miss', 'generation_miss', 'both', 'error')),
  passed BOOLEAN NOT NULL DEFAULT FALSE,
  metrics JSONB NOT NULL DEFAULT '{}',
  detail JSONB NOT NULL DEFAULT '{}',
  PRIMARY KEY (run_id, case_id)
);
CREATE INDEX idx_eval_results_tenant ON eval_results (tenant_id, run_id);

ALTER TABLE eval_runs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON eval_runs
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

ALTER TABLE eval_results ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON eval_results
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);
