-- The status of a page of labels (`RunStore::label_statuses`: `GET
-- /v1/labels`, `retrain status`) is read per label asked for: its newest
-- run, its runs awaiting approval and its newest promotion, each one index
-- probe, so the read costs the labels asked for and not the run history.
CREATE INDEX runs_newest_by_label ON runs (label, started_at DESC, run_id DESC);
CREATE INDEX runs_awaiting_approval ON runs (label, started_at DESC, run_id DESC)
    WHERE stage = 'awaiting_approval';
CREATE INDEX promotions_newest_by_label ON promotions (label, at DESC, run_id DESC);
