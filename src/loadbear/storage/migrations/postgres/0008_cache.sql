-- The response cache (gateway/cache.py): exact and semantic, scoped per tenant, under RLS.
--
-- cache_entries: one answer per (tenant, scope, normalised question). scope_hash covers the
-- feature, system prompt, model tier, the conversation before the question, grounding and extra
-- parameters; exact_hash the normalised question within it. embedding is the question's vector
-- (float32, little endian; embedding_model names the model) for the semantic comparison.
-- cache_keys: the word-set neighbourhood keys of each semantic entry (64-bit hashes that already
-- include the scope): a semantic lookup reads candidates through this index, never by a scan.
-- cache_entry_documents: the (document, version) pairs a grounded answer was built from; a change
-- or deletion of any of them invalidates the entry, and lookups verify them against documents.
CREATE TABLE cache_entries (
  id UUID PRIMARY KEY,
  tenant_id UUID NOT NULL REFERENCES tenants(id),
  scope_hash TEXT NOT NULL,
  exact_hash TEXT NOT NULL,
  feature VARCHAR(100) NOT NULL,
  tier VARCHAR(100) NOT NULL DEFAULT '',
  query_text TEXT NOT NULL,
  answer_text TEXT NOT NULL,
  model VARCHAR(100) NOT NULL,
  prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  cost_micro_usd BIGINT NOT NULL DEFAULT 0,
  citations JSONB,
  grounded BOOLEAN NOT NULL DEFAULT FALSE,
  embedding_model TEXT,
  embedding BYTEA,
  hits INTEGER NOT NULL DEFAULT 0,
  last_hit_at TIMESTAMPTZ,
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  expires_at TIMESTAMPTZ NOT NULL,
  UNIQUE (tenant_id, scope_hash, exact_hash)
);
CREATE INDEX idx_cache_entries_scope_created ON cache_entries (tenant_id, scope_hash, created_at);
CREATE INDEX idx_cache_entries_expires ON cache_entries (expires_at);

CREATE TABLE cache_keys (
  tenant_id UUID NOT NULL,
  key BIGINT NOT NULL,
  entry_id UUID NOT NULL REFERENCES cache_entries(id) ON DELETE CASCADE,
  PRIMARY KEY (tenant_id, key, entry_id)
);
CREATE INDEX idx_cache_keys_entry ON cache_keys (entry_id);

CREATE TABLE cache_entry_documents (
  entry_id UUID NOT NULL REFERENCES cache_entries(id) ON DELETE CASCADE,
  tenant_id UUID NOT NULL,
  document_id UUID NOT NULL,
  version INTEGER NOT NULL,
  PRIMARY KEY (entry_id, document_id)
);
CREATE INDEX idx_cache_entry_documents_document ON cache_entry_documents (tenant_id, document_id);

ALTER TABLE cache_entries ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON cache_entries
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

ALTER TABLE cache_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON cache_keys
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

ALTER TABLE cache_entry_documents ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON cache_entry_documents
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);
