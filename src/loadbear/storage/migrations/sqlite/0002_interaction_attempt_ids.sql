-- Attempts are looked up by tenant and model for the providers' health view.
CREATE INDEX idx_ai_attempts_model ON ai_attempts (model, started_at);
