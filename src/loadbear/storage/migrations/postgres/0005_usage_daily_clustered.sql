-- The SQLite side of this version stores usage_daily in primary-key order (WITHOUT ROWID).
-- PostgreSQL keeps rows in a heap either way; what helps it is room on each page for the
-- rollup upserts: every ledger batch updates its rollup rows in place, and with free space on
-- the page those updates are HOT (no new primary-key index entry, dead versions pruned on the
-- page) instead of moving the row and growing the index. Applies to pages written from now on.
ALTER TABLE usage_daily SET (fillfactor = 70);
