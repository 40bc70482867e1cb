-- Run updates without index churn. Every journal write rewrites its run's
-- row (stage, snapshot); an update that changes no indexed column can be a
-- heap-only tuple (HOT) update, which adds no entry to any of the table's
-- five indexes and leaves its dead version to be pruned in the page. Two
-- things kept nearly every update from being one (1,846 of 70,000 at 10,000
-- labels, docs/BENCHMARKS.md):
--
-- * `runs_awaiting_approval` was partial on `stage = 'awaiting_approval'`,
--   and a column in an index predicate counts as indexed: every stage
--   change was a non-HOT update. The predicate is now on a generated column
--   that changes only when a run enters or leaves that stage.
-- * A HOT update needs room in the row's own page; with rows of 1–3 kB a
--   full page has none. `fillfactor = 50` leaves half of every page for the
--   updates of its rows.
--
-- Adding the stored column rewrites the table once (under an exclusive
-- lock), with the new fillfactor.
ALTER TABLE runs SET (fillfactor = 50);
ALTER TABLE runs ADD COLUMN awaits_approval BOOLEAN
    GENERATED ALWAYS AS (stage = 'awaiting_approval') STORED;
DROP INDEX runs_awaiting_approval;
CREATE INDEX runs_awaiting_approval ON runs (label, started_at DESC, run_id DESC)
    WHERE awaits_approval;
