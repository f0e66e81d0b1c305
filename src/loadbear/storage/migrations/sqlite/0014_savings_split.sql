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
-- rollups (0012) are regrouped from usage_daily, like 0012 filled them.

ALTER TABLE usage_daily ADD COLUMN saved_cache_micro_usd INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN saved_routing_micro_usd INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily_models ADD COLUMN saved_cache_micro_usd INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily_models ADD COLUMN saved_routing_micro_usd INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily_users ADD COLUMN saved_cache_micro_usd INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily_users ADD COLUMN saved_routing_micro_usd INTEGER NOT NULL DEFAULT 0;

UPDATE usage_daily SET saved_cache_micro_usd = MAX(0, MIN(usage_daily.saved_micro_usd, c.saved))
  FROM (
    SELECT i.tenant_id AS tenant_id, substr(i.created_at, 1, 10) AS day, i.feature AS feature, i.model AS model,
           COALESCE(u.external_id, '') AS user_external_id, SUM(i.saved_micro_usd) AS saved
    FROM ai_interactions i LEFT JOIN users u ON u.id = i.user_id
    WHERE i.cached AND i.saved_micro_usd <> 0
      AND COALESCE(json_extract(i.metadata, '$.eval_run'), '') IN ('', 0)
    GROUP BY 1, 2, 3, 4, 5
  ) AS c
  WHERE usage_daily.tenant_id = c.tenant_id AND usage_daily.day = c.day AND usage_daily.feature = c.feature
    AND usage_daily.model = c.model AND usage_daily.user_external_id = c.user_external_id;
UPDATE usage_daily SET saved_routing_micro_usd = saved_micro_usd - saved_cache_micro_usd
  WHERE saved_micro_usd <> 0;

UPDATE usage_daily_models SET saved_cache_micro_usd = s.cache, saved_routing_micro_usd = s.routing
  FROM (
    SELECT tenant_id, day, feature, model, SUM(saved_cache_micro_usd) AS cache, SUM(saved_routing_micro_usd) AS routing
    FROM usage_daily WHERE saved_micro_usd <> 0 GROUP BY tenant_id, day, feature, model
  ) AS s
  WHERE usage_daily_models.tenant_id = s.tenant_id AND usage_daily_models.day = s.day
    AND usage_daily_models.feature = s.feature AND usage_daily_models.model = s.model;
UPDATE usage_daily_users SET saved_cache_micro_usd = s.cache, saved_routing_micro_usd = s.routing
  FROM (
    SELECT tenant_id, day, user_external_id, SUM(saved_cache_micro_usd) AS cache,
           SUM(saved_routing_micro_usd) AS routing
    FROM usage_daily WHERE saved_micro_usd <> 0 GROUP BY tenant_id, day, user_external_id
  ) AS s
  WHERE usage_daily_users.tenant_id = s.tenant_id AND usage_daily_users.day = s.day
    AND usage_daily_users.user_external_id = s.user_external_id;
