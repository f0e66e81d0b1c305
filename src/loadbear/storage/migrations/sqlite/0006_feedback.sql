-- Feedback on AI interactions (POST /v1/feedback), the raw material of `loadbear eval harvest`.
--
-- Append-only: every POST adds a row, so an interaction can collect several (an end user who
-- changes their mind, a support agent reviewing the answer). Readers that need one verdict per
-- interaction take the latest row (created_at, then the time-ordered id); the history is kept.
--
-- rating is the raw value the client sent, on its scale:
--   thumbs: -1 or +1;  stars: 1..5.
-- negative is derived once at write time (thumbs -1, or at most 2 stars).
-- Feedback goes with its interaction (ON DELETE CASCADE) when retention deletes ledger rows.
CREATE TABLE feedback (
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  interaction_id TEXT NOT NULL REFERENCES ai_interactions(id) ON DELETE CASCADE,
  user_id TEXT REFERENCES users(id),
  rating INTEGER NOT NULL,
  scale TEXT NOT NULL CHECK (scale IN ('thumbs', 'stars')),
  negative INTEGER NOT NULL CHECK (negative IN (0, 1)),
  comment TEXT,
  correction TEXT,
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now')),
  CHECK ((scale = 'thumbs' AND rating IN (-1, 1)) OR (scale = 'stars' AND rating BETWEEN 1 AND 5)),
  CHECK (negative = ((scale = 'thumbs' AND rating = -1) OR (scale = 'stars' AND rating <= 2)))
);
CREATE INDEX idx_feedback_interaction ON feedback (tenant_id, interaction_id, created_at);
CREATE INDEX idx_feedback_tenant_created ON feedback (tenant_id, created_at);
