-- The knowledge base: documents, their chunks, the chunks' vectors and full text, under RLS.
--
-- Vectors live in their own narrow table (chunk_vectors) so that exact scans and the HNSW
-- scan's heap visits touch only vectors, not chunk text and tsvectors. The column is an
-- unconstrained `vector` so several embedding models (and dimensions, 384 for the default
-- all-MiniLM-L6-v2) can coexist while a tenant re-embeds. There is no table-wide HNSW index:
-- filtered by tenant it loses recall (see knowledge/store_postgres.py). Tenants above the
-- store's exact-search limit get their own partial HNSW index over the cast expression,
-- built by the store: idx_cv_hnsw_<dim>_<tenant hex>, vector(d) up to 2000 dims, halfvec(d)
-- up to 4000, exact search above.
CREATE EXTENSION IF NOT EXISTS vector;
-- btree_gin lets the full-text GIN index lead with the tenant.
CREATE EXTENSION IF NOT EXISTS btree_gin;

CREATE TABLE documents (
  id UUID PRIMARY KEY,
  tenant_id UUID NOT NULL REFERENCES tenants(id),
  external_id TEXT,
  title TEXT NOT NULL DEFAULT '',
  source_url TEXT,
  metadata JSONB NOT NULL DEFAULT '{}',
  content_type TEXT NOT NULL DEFAULT 'text/plain',
  version INTEGER NOT NULL DEFAULT 1,
  char_count INTEGER NOT NULL DEFAULT 0,
  chunk_count INTEGER NOT NULL DEFAULT 0,
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  UNIQUE (tenant_id, external_id)
);
-- Listing pages newest first (ids are UUIDv7: time-ordered).
CREATE INDEX idx_documents_tenant_id ON documents (tenant_id, id);

CREATE TABLE chunks (
  id UUID PRIMARY KEY,
  tenant_id UUID NOT NULL,
  document_id UUID NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
  document_version INTEGER NOT NULL,
  ordinal INTEGER NOT NULL,
  text TEXT NOT NULL,
  start_char INTEGER NOT NULL,
  end_char INTEGER NOT NULL,
  heading_path JSONB NOT NULL DEFAULT '[]',
  token_count INTEGER NOT NULL DEFAULT 0,
  embedding_model TEXT NOT NULL,
  embedding_dim INTEGER NOT NULL,
  -- Title and heading path: matched by full text with a higher weight than the body.
  search_context TEXT NOT NULL DEFAULT '',
  -- Words are runs of \w, as in the query sanitiser and SQLite's unicode61 tokenizer: the default
  -- parser would read "ERR-4471" as 'err' and '-4471', which a query for "4471" never matches.
  tsv tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('english'::regconfig, regexp_replace(search_context, '\W+', ' ', 'g')), 'A')
    || setweight(to_tsvector('english'::regconfig, regexp_replace(text, '\W+', ' ', 'g')), 'B')
  ) STORED,
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX idx_chunks_document ON chunks (document_id, ordinal);
CREATE INDEX idx_chunks_tenant_model ON chunks (tenant_id, embedding_model, id);
CREATE INDEX idx_chunks_tsv ON chunks USING gin (tenant_id, tsv);

CREATE TABLE chunk_vectors (
  chunk_id UUID PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE,
  tenant_id UUID NOT NULL,
  document_id UUID NOT NULL,
  embedding_model TEXT NOT NULL,
  embedding_dim INTEGER NOT NULL,
  embedding vector NOT NULL,
  CHECK (vector_dims(embedding) = embedding_dim)
);
CREATE INDEX idx_chunk_vectors_tenant ON chunk_vectors (tenant_id, embedding_dim, embedding_model);
CREATE INDEX idx_chunk_vectors_document ON chunk_vectors (document_id);

-- One row per tenant with a knowledge base: version bumps on every change (the cache keys on
-- it); writers lock it first, so one tenant's knowledge-base writes are serialised.
CREATE TABLE kb_state (
  tenant_id UUID PRIMARY KEY REFERENCES tenants(id),
  version BIGINT NOT NULL DEFAULT 0,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- How many chunks a tenant has per embedding model and dimension: picks exact or HNSW search.
CREATE TABLE kb_vector_stats (
  tenant_id UUID NOT NULL REFERENCES tenants(id),
  embedding_model TEXT NOT NULL,
  embedding_dim INTEGER NOT NULL,
  chunk_count BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (tenant_id, embedding_model, embedding_dim)
);

ALTER TABLE documents ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON documents
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

ALTER TABLE chunks ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON chunks
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

ALTER TABLE chunk_vectors ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON chunk_vectors
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

ALTER TABLE kb_state ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON kb_state
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

ALTER TABLE kb_vector_stats ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON kb_vector_stats
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);

-- Keyword search runs through this function. Under RLS the planner may not use a GIN index for
-- `tsv @@ query` (the operator is not LEAKPROOF, so it cannot run before the policy's qual):
-- measured here, a 100k-chunk tenant's keyword query scanned all its rows (240 ms) instead of the
-- ~6k matches. SECURITY DEFINER runs it as the owner, so the index is usable; isolation is kept
-- by the same two filters the rest of the store has: the tenant passed in AND the transaction's
-- loadbear.tenant_id (what RLS checks); either missing or different means no rows.
CREATE FUNCTION kb_keyword_search(p_tenant uuid, p_query text, p_k integer, p_docs uuid[] DEFAULT NULL)
RETURNS TABLE (chunk_id uuid, score real)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
AS $fn$
  SELECT c.id, ts_rank_cd(c.tsv, websearch_to_tsquery('english', p_query))
  FROM chunks c
  WHERE c.tenant_id = p_tenant
    AND c.tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid
    AND c.tsv @@ websearch_to_tsquery('english', p_query)
    AND (p_docs IS NULL OR c.document_id = ANY (p_docs))
  ORDER BY 2 DESC, 1
  LIMIT p_k
$fn$;
REVOKE ALL ON FUNCTION kb_keyword_search(uuid, text, integer, uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kb_keyword_search(uuid, text, integer, uuid[]) TO __APP_ROLE__;
