-- Promotion events (`retrain history`): one row per run that changed a
-- label's production model (a gated promotion or a rollback). Written in the
-- same transaction as the journal line that records the promotion, and only
-- when that fenced journal write was applied.
CREATE TABLE promotions (
    run_id           TEXT PRIMARY KEY,
    label            TEXT NOT NULL,
    kind             TEXT NOT NULL,
    version          TEXT NOT NULL,
    previous_version TEXT,
    candidate_run    TEXT,
    candidate_id     TEXT,
    verdict          TEXT,
    by_whom          TEXT NOT NULL,
    reason           TEXT,
    at               TEXT NOT NULL
);
CREATE INDEX promotions_by_label ON promotions (label, at);
