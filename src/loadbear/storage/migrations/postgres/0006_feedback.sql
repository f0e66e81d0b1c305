-- Feedback on AI interactions (POST /v1/feedback), the raw material of `loadbear eval harvest`.
--
-- Append-only: every POST adds a row, so an interaction can collect several (an end user who
-- changes their mind, a support agent reviewing the answer). Readers that need one verdict per
-- interaction take the latest row (created_at, then the time-ordered id); the history is kept.
--
-- rating is the raw value the client sent, on its scale:
--   thumbs: -1 or +1;  stars: 1..5.
-- negative is derived once at write time (thumbs -1, or at most 2 stars), so queries and
-- indexes never need to know the scales.
-- Feedback goes with its interaction: when retention deletes ledger rows, their feedback
-- (free text that may hold personal data) goes too.
CREATE TABLE feedback (
  id UUID PRIMARY KEY,
  tenant_id UUID NOT NULL REFERENCES tenants(id),
  interaction_id UUID NOT NULL REFERENCES ai_interactions(id) ON DELETE CASCADE,
  user_id UUID REFERENCES users(id),
  rating SMALLINT NOT NULL,
  scale VARCHAR(8) NOT NULL CHECK (scale IN ('thumbs', 'stars')),
  negative BOOLEAN NOT NULL,
  comment TEXT,
  correction TEXT,
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  CHECK ((scale = 'thumbs' AND rating IN (-1, 1)) OR (scale = 'stars' AND rating BETWEEN 1 AND 5)),
  CHECK (negative = ((scale = 'thumbs' AND rating = -1) OR (scale = 'stars' AND rating <= 2)))
);
CREATE INDEX idx_feedback_interaction ON feedback (tenant_id, interaction_id, created_at);
CREATE INDEX idx_feedback_tenant_created ON feedback (tenant_id, created_at);

ALTER TABLE feedback ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON feedback
  USING (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid)
  WITH CHECK (tenant_id = NULLIF(current_setting('loadbear.tenant_id', true), '')::uuid);
