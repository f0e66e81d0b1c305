-- Background ingestion of large uploads. The upload is kept until the job ends, so a restart
-- can resume it.
CREATE TABLE ingest_jobs (
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
  params TEXT NOT NULL DEFAULT '{}',
  payload BLOB,
  document_id TEXT,
  error TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX idx_ingest_jobs_status ON ingest_jobs (status);
