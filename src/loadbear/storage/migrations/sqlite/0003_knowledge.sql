-- The knowledge base: documents, their chunks, the chunks' vectors and full text.
--
-- chunks.seq is the rowid shared by a chunk's rows in chunk_vectors, in the vec0 table of its
-- dimension and in chunks_fts. Vectors are kept twice on purpose: chunk_vectors holds the
-- float32 bytes (the source of truth: exact search over a filtered subset, re-indexing, the
-- in-process scan cache), vec_chunks_<dim> is sqlite-vec's KNN structure partitioned by tenant.
-- One vec0 table per dimension: vec_chunks_384 (all-MiniLM-L6-v2, the default) is created here,
-- other dimensions on demand by the store (CREATE VIRTUAL TABLE IF NOT EXISTS vec_chunks_<dim>).
CREATE TABLE documents (
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  external_id TEXT,
  title TEXT NOT NULL DEFAULT '',
  source_url TEXT,
  metadata TEXT NOT NULL DEFAULT '{}',
  content_type TEXT NOT NULL DEFAULT 'text/plain',
  version INTEGER NOT NULL DEFAULT 1,
  char_count INTEGER NOT NULL DEFAULT 0,
  chunk_count INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  UNIQUE (tenant_id, external_id)
);
-- Listing pages newest first (ids are UUIDv7: time-ordered).
CREATE INDEX idx_documents_tenant_id ON documents (tenant_id, id);

CREATE TABLE chunks (
  seq INTEGER PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  tenant_id TEXT NOT NULL,
  document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
  document_version INTEGER NOT NULL,
  ordinal INTEGER NOT NULL,
  text TEXT NOT NULL,
  start_char INTEGER NOT NULL,
  end_char INTEGER NOT NULL,
  heading_path TEXT NOT NULL DEFAULT '[]',
  token_count INTEGER NOT NULL DEFAULT 0,
  embedding_model TEXT NOT NULL,
  embedding_dim INTEGER NOT NULL,
  created_at TEXT NOT NULL
);
CREATE INDEX idx_chunks_document ON chunks (document_id, ordinal);
CREATE INDEX idx_chunks_tenant_model ON chunks (tenant_id, embedding_model, seq);

CREATE TABLE chunk_vectors (
  chunk_seq INTEGER PRIMARY KEY REFERENCES chunks(seq) ON DELETE CASCADE,
  tenant_id TEXT NOT NULL,
  document_id TEXT NOT NULL,
  embedding_model TEXT NOT NULL,
  embedding_dim INTEGER NOT NULL,
  embedding BLOB NOT NULL  -- float32, little endian, embedding_dim values
);
CREATE INDEX idx_chunk_vectors_tenant ON chunk_vectors (tenant_id, embedding_dim, embedding_model);
CREATE INDEX idx_chunk_vectors_document ON chunk_vectors (tenant_id, document_id);

-- KNN: the tenant is the partition key, so a query scans only its tenant's vectors.
-- model_key is a 64-bit hash of the embedding model's name (an integer metadata column
-- filters at no cost; a text one longer than 12 characters tripled the scan time).
-- chunk_size=128 keeps the space a small tenant costs at ~200 kB (1024 would be 1.6 MB).
CREATE VIRTUAL TABLE vec_chunks_384 USING vec0(
  tenant_id text partition key,
  embedding float[384] distance_metric=cosine,
  model_key integer,
  chunk_size=128
);

-- Keywords: contentless (the text lives in chunks), rows deletable, tenant stored for filtering.
CREATE VIRTUAL TABLE chunks_fts USING fts5(
  text, headings, title, tenant_id UNINDEXED,
  content='', contentless_delete=1, contentless_unindexed=1,
  tokenize='porter unicode61 remove_diacritics 2'
);

-- One row per tenant with a knowledge base: version bumps on every change (the cache keys on it).
CREATE TABLE kb_state (
  tenant_id TEXT PRIMARY KEY REFERENCES tenants(id),
  version INTEGER NOT NULL DEFAULT 0,
  updated_at TEXT NOT NULL
);

-- How many chunks a tenant has per embedding model and dimension: picks exact or index search.
CREATE TABLE kb_vector_stats (
  tenant_id TEXT NOT NULL,
  embedding_model TEXT NOT NULL,
  embedding_dim INTEGER NOT NULL,
  chunk_count INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (tenant_id, embedding_model, embedding_dim)
);
