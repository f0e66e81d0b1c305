-- The response cache's keys (gateway/cache.py), revised after 0008.
--
-- exact_hash already hashes the scope with the normalised question, so (tenant_id, exact_hash)
-- is unique on its own; the scope's recent entries (the degraded lookup) go by scope_hash,
-- which already includes the tenant. See the PostgreSQL migration for why no other index
-- starts with tenant_id.
--
-- SQLite cannot drop a table constraint, so the three cache tables are rebuilt. Foreign keys are
-- on and cannot be switched off inside the migration's transaction: dropping cache_entries first
-- would cascade into its children, so the children are copied first and the old ones dropped
-- before their parent. Renaming cache_entries_new repoints the new children's references.
CREATE TABLE cache_entries_new (
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
  UNIQUE (tenant_id, exact_hash)
);
-- Entries are disposable answers: of two rows sharing an exact_hash (a 128-bit collision across
-- scopes), the newest is kept rather than failing the upgrade.
INSERT INTO cache_entries_new (id, tenant_id, scope_hash, exact_hash, feature, tier, query_text, answer_text, model,
                               prompt_tokens, completion_tokens, cost_micro_usd, citations, grounded,
                               embedding_model, embedding, hits, last_hit_at, created_at, expires_at)
SELECT id, tenant_id, scope_hash, exact_hash, feature, tier, query_text, answer_text, model,
       prompt_tokens, completion_tokens, cost_micro_usd, citations, grounded,
       embedding_model, embedding, hits, last_hit_at, created_at, expires_at
  FROM cache_entries e
 WHERE NOT EXISTS (SELECT 1 FROM cache_entries newer
                    WHERE newer.tenant_id = e.tenant_id AND newer.exact_hash = e.exact_hash
                      AND (newer.created_at > e.created_at OR (newer.created_at = e.created_at AND newer.id > e.id)));

CREATE TABLE cache_keys_new (
  tenant_id TEXT NOT NULL,
  key INTEGER NOT NULL,
  entry_id TEXT NOT NULL REFERENCES cache_entries_new(id) ON DELETE CASCADE,
  PRIMARY KEY (tenant_id, key, entry_id)
) WITHOUT ROWID;
INSERT INTO cache_keys_new (tenant_id, key, entry_id)
SELECT tenant_id, key, entry_id FROM cache_keys WHERE entry_id IN (SELECT id FROM cache_entries_new);

CREATE TABLE cache_entry_documents_new (
  entry_id TEXT NOT NULL REFERENCES cache_entries_new(id) ON DELETE CASCADE,
  tenant_id TEXT NOT NULL,
  document_id TEXT NOT NULL,
  version INTEGER NOT NULL,
  PRIMARY KEY (entry_id, document_id)
) WITHOUT ROWID;
INSERT INTO cache_entry_documents_new (entry_id, tenant_id, document_id, version)
SELECT entry_id, tenant_id, document_id, version FROM cache_entry_documents
 WHERE entry_id IN (SELECT id FROM cache_entries_new);

DROP TABLE cache_keys;
DROP TABLE cache_entry_documents;
DROP TABLE cache_entries;
ALTER TABLE cache_entries_new RENAME TO cache_entries;
ALTER TABLE cache_keys_new RENAME TO cache_keys;
ALTER TABLE cache_entry_documents_new RENAME TO cache_entry_documents;

CREATE INDEX idx_cache_entries_scope_created ON cache_entries (scope_hash, created_at);
CREATE INDEX idx_cache_entries_expires ON cache_entries (expires_at);
CREATE INDEX idx_cache_keys_entry ON cache_keys (entry_id);
CREATE INDEX idx_cache_entry_documents_document ON cache_entry_documents (tenant_id, document_id);
