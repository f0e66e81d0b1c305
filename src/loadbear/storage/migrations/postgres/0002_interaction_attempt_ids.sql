-- Attempts are looked up by model for the providers' health view.
CREATE INDEX idx_ai_attempts_model ON ai_attempts (model, started_at);
-- The knowledge base stores its vectors with pgvector (scripts/install-pgvector.sh builds it).
CREATE EXTENSION IF NOT EXISTS vector;
