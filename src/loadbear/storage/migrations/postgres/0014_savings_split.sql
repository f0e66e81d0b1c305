-- Savings split: the rollups kept one saved_micro_usd, so /v1/usage and `loadbear usage` could
-- not tell what the response cache saved (a hit: the call it replaced) from what routing saved
-- (the difference to the strong tier). The ledger writer now fills both parts in the same
-- upsert; saved_micro_usd stays their sum, so existing readers keep their numbers.
--
-- Backfill from ai_interactions, bounded: only cached rows with a saving are aggregated (one
-- grouped pass, never a per-rollup-row lookup), only rollup rows with a saving are updated, and
-- the routing part is the remainder, so cache + routing = saved_micro_usd holds for every row
-- even where ledger rows are missing. Degraded answers save nothing already (saved = 0), and
-- evaluation traffic is left out exactly as the writer leaves it out of the rollups. The narrow
-- rollups (0012) are regrouped from usage_daily, like 0012 filled them. ADD COLUMN with a
-- constant default rewrites no table. Row-level security covers new columns as it is.

ALTER TABLE usage_daily ADD COLUMN saved_cache_micro_usd BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN saved_routing_micro_usd BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_daily_models ADD COLUMN saved_cache_micro_usd BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN saved_routing_micro_usd BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_daily_users ADD COLUMN saved_cache_micro_usd BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN saved_routing_micro_usd BIGINT NOT NULL DEFAULT 0;

UPDATE usage_daily d SET saved_cache_micro_usd = GREATEST(0, LEAST(d.saved_micro_usd, c.saved))
  FROM (
    SELECT i.tenant_id, (i.created_at AT TIME ZONE 'UTC')::date AS day, i.feature, i.model,
           COALESCE(u.external_id, '') AS user_external_id, SUM(i.saved_micro_usd) AS saved
    FROM ai_interactions i LEFT JOIN users u ON u.id = i.user_id
    WHERE i.cached AND i.saved_micro_usd <> 0
      AND COALESCE(i.metadata ->> 'eval_run', '') IN ('', 'false', '0')
    GROUP BY 1, 2, 3, 4, 5
  ) AS c
  WHERE d.tenant_id = c.tenant_id AND d.day = c.day AND d.feature = c.feature
    AND d.model = c.model AND d.user_external_id = c.user_external_id;
UPDATE usage_daily SET saved_routing_micro_usd = saved_micro_usd - saved_cache_micro_usd
  WHERE saved_micro_usd <> 0;

UPDATE usage_daily_models m SET saved_cache_micro_usd = s.cache, saved_routing_micro_usd = s.routing
  FROM (
    SELECT tenant_id, day, feature, model, SUM(saved_cache_micro_usd) AS cache, SUM(saved_routing_micro_usd) AS routing
    FROM usage_daily WHERE saved_micro_usd <> 0 GROUP BY tenant_id, day, feature, model
  ) AS s
  WHERE m.tenant_id = s.tenant_id AND m.day = s.day AND m.feature = s.feature AND m.model = s.model;
UPDATE usage_daily_users n SET saved_cache_micro_usd = s.cache, saved_routing_micro_usd = s.routing
  FROM (
    SELECT tenant_id, day, user_external_id, SUM(saved_cache_micro_usd) AS cache,
           SUM(saved_routing_micro_usd) AS routing
    FROM usage_daily WHERE saved_micro_usd <> 0 GROUP BY tenant_id, day, user_external_id
  ) AS s
  WHERE n.tenant_id = s.tenant_id AND n.day = s.day AND n.user_external_id = s.user_external_id;
