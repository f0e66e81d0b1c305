-- Circuit-breaker state shared by every worker and replica on this database (gateway/breaker_db.py,
-- the "database" breaker store; Redis replaces it when configured). One row per provider+model,
-- written only on failures and state transitions, so a healthy model costs no writes. A system
-- table, not tenant-owned: breakers describe upstreams, which all tenants share, so there is no
-- tenant_id and no row-level security; the application role gets data rights like on every
-- table (migrate.py grants them after each migration).
-- Times are epoch seconds (wall clock): replicas on different machines must agree on "now".
CREATE TABLE breaker_state (
  breaker_key TEXT PRIMARY KEY,                -- "{provider}/{model}"
  state TEXT NOT NULL DEFAULT 'closed' CHECK (state IN ('closed', 'open', 'half_open')),
  failures INTEGER NOT NULL DEFAULT 0,         -- consecutive, across replicas
  opened_at DOUBLE PRECISION NOT NULL DEFAULT 0,
  -- The half-open probe's claim: a replica wins it with one conditional UPDATE; NULL = free.
  -- It expires on its own, so a prober that crashed does not wedge the breaker half-open.
  probe_until DOUBLE PRECISION,
  probe_id TEXT,                               -- the claim's holder (a random token), for release
  trips INTEGER NOT NULL DEFAULT 0,
  updated_at DOUBLE PRECISION NOT NULL DEFAULT 0
);
