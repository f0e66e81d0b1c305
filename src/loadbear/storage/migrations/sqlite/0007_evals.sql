-- Evaluation runs and their per-case results. A run belongs to a tenant (its knowledge base
-- was evaluated); results repeat the tenant so every tenant table filters on it directly.
CREATE TABLE eval_runs (
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  label TEXT,
  status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
  dataset_name TEXT NOT NULL,
  dataset TEXT NOT NULL DEFAULT '{}',
  model TEXT NOT NULL,
  pipeline_hash TEXT NOT NULL,
  fingerprint TEXT NOT NULL DEFAULT '{}',
  config TEXT NOT NULL DEFAULT '{}',
  summary TEXT,
  error TEXT,
  created_at TEXT NOT NULL,
  finished_at TEXT
);
CREATE INDEX idx_eval_runs_tenant ON eval_runs (tenant_id, created_at);

CREATE TABLE eval_results (
  run_id TEXT NOT NULL REFERENCES eval_runs(id) ON DELETE CASCADE,
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  case_id TEXT NOT NULL,
  position INTEGER NOT NULL,
  diagnosis TEXT NOT NULL CHECK (diagnosis IN ('pass', 'retrieval_miss', 'generation_miss', 'both', 'error')),
  passed INTEGER NOT NULL DEFAULT 0,
  metrics TEXT NOT NULL DEFAULT '{}',
  detail TEXT NOT NULL DEFAULT '{}',
  PRIMARY KEY (run_id, case_id)
);
CREATE INDEX idx_eval_results_tenant ON eval_results (tenant_id, run_id);
