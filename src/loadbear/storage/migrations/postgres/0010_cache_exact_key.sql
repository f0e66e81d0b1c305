-- The response cache's keys (gateway/cache.py), revised after 0008.
--
-- exact_hash already hashes the scope with the normalised question, so (tenant_id, exact_hash)
-- is unique on its own. Lookups go by (tenant_id, exact_hash) or by id, and no other index
-- starts with tenant_id: no plan (not even a generic one made while the table was empty and had
-- no statistics) can trade the unique index for a scan of a whole tenant or scope. The scope's
-- recent entries (the degraded lookup) go by scope_hash, which already includes the tenant.
--
-- Entries are disposable answers: should two rows of a tenant ever share an exact_hash (a
-- 128-bit collision across scopes), the older is dropped rather than failing the upgrade.
DELETE FROM cache_entries e USING cache_entries newer
 WHERE newer.tenant_id = e.tenant_id AND newer.exact_hash = e.exact_hash
   AND (newer.created_at, newer.id) > (e.created_at, e.id);

ALTER TABLE cache_entries DROP CONSTRAINT IF EXISTS cache_entries_tenant_id_scope_hash_exact_hash_key;
ALTER TABLE cache_entries ADD CONSTRAINT cache_entries_tenant_exact_key UNIQUE (tenant_id, exact_hash);

DROP INDEX IF EXISTS idx_cache_entries_scope_created;
CREATE INDEX idx_cache_entries_scope_created ON cache_entries (scope_hash, created_at);
