-- The response cache (gateway/cache.py): exact and semantic, scoped per tenant.
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
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  scope_hash TEXT NOT NULL,
  exact_hash TEXT NOT NULL,
  feature TEXT NOT NULL,
  tier TEXT NOT NULL DEFAULT '',
  query_text TEXT NOT NULL,
  answer_text TEXT NOT NULL,
  model TEXT NOT NULL,
  prompt_tokens INTEGER NOT NULL DEFAULT 0,
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  cost_micro_usd INTEGER NOT NULL DEFAULT 0,
  citations TEXT,
  grounded INTEGER NOT NULL DEFAULT 0,
  embedding_model TEXT,
  embedding BLOB,
  hits INTEGER NOT NULL DEFAULT 0,
  last_hit_at TEXT,
  created_at TEXT NOT NULL,
  expires_at TEXT NOT NULL,
  UNIQUE (tenant_id, scope_hash, exact_hash)
);
CREATE INDEX idx_cache_entries_scope_created ON cache_entries (tenant_id, scope_hash, created_at);
CREATE INDEX idx_cache_entries_expires ON cache_entries (expires_at);

CREATE TABLE cache_keys (
  tenant_id TEXT NOT NULL,
  key INTEGER NOT NULL,
  entry_id TEXT NOT NULL REFERENCES cache_entries(id) ON DELETE CASCADE,
  PRIMARY KEY (tenant_id, key, entry_id)
) WITHOUT ROWID;
CREATE INDEX idx_cache_keys_entry ON cache_keys (entry_id);

CREATE TABLE cache_entry_documents (
  entry_id TEXT NOT NULL REFERENCES cache_entries(id) ON DELETE CASCADE,
  tenant_id TEXT NOT NULL,
  document_id TEXT NOT NULL,
  version INTEGER NOT NULL,
  PRIMARY KEY (entry_id, document_id)
) WITHOUT ROWID;
CREATE INDEX idx_cache_entry_documents_document ON cache_entry_documents (tenant_id, document_id);
