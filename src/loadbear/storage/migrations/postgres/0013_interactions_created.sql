-- The dashboard's admin views read every tenant's ledger rows of a time range, and its
-- interactions explorer lists them newest first. The existing indexes lead with tenant_id, so
-- without this one both were a scan of the whole table. Time-ordered appends land at the
-- index's right edge, which keeps the cost on the ledger's write path small. (A plain CREATE
-- INDEX: migrations run in a transaction, where CONCURRENTLY is not allowed; on a large
-- existing ledger, create it CONCURRENTLY by hand first and this becomes a no-op.)
CREATE INDEX IF NOT EXISTS idx_ai_interactions_created ON ai_interactions (created_at);
