-- Circuit-breaker state shared by every worker process on this database file (gateway/breaker_db.py).
-- See the PostgreSQL twin: one row per provider+model, written only on failures and transitions;
-- the half-open probe is claimed by one conditional UPDATE with an expiry (probe_until).
-- Times are epoch seconds.
CREATE TABLE breaker_state (
  breaker_key TEXT PRIMARY KEY,
  state TEXT NOT NULL DEFAULT 'closed' CHECK (state IN ('closed', 'open', 'half_open')),
  failures INTEGER NOT NULL DEFAULT 0,
  opened_at REAL NOT NULL DEFAULT 0,
  probe_until REAL,
  probe_id TEXT,
  trips INTEGER NOT NULL DEFAULT 0,
  updated_at REAL NOT NULL DEFAULT 0
);
