-- Background ingestion of large uploads. The upload is kept until the job ends, so a restart
-- can resume it.
CREATE TABLE ingest_jobs (
  id UUID PRIMARY KEY,
  tenant_id UUID NOT NULL REFERENCES tenants(id),
  status VARCHAR(16) NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
  params JSONB NOT NULL DEFAULT '{}',
  payload BYTEA,
  document_id UUID,
  error JSONB,
  created_at TIMESTAMPTZ NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_ingest_jobs_status ON ingest_jobs (status);

ALTER TABLE ingest_jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON ingest_jobs
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);
