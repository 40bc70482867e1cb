-- One statement and one snapshot per journal write (issue 11), and the
-- verdict reason in a column of its own (issue 12).
--
-- Before: one `journal_inbox` row per journal line, each carrying the whole
-- run snapshot (≈ 2 KiB) and each upserting `runs`, so a write of k
-- consecutive transitions serialised, bound and stored the snapshot k times
-- and cost k statements (each two thread hops through sqlx's SQLite
-- worker). Now a write is one row of `journal_writes`: the run as of its
-- last transition once, its lines as a JSON array, its promotion events as
-- a JSON array (or NULL; a run's event is written once: a repeat is
-- ignored, as before) and the cursor. The insert is still conditional on
-- the fence (`INSERT … SELECT … WHERE EXISTS (the lock row)`), so lines,
-- snapshot, promotion events and cursor are applied, or refused, together
-- by one statement.
--
-- `runs.verdict`: the verdict reason of the run (`snapshot.verdict.reason`),
-- written with the snapshot, so that the status listing (`GET /v1/labels`,
-- `retrain status`) reads a column instead of parsing every newest run's
-- snapshot.
ALTER TABLE runs ADD COLUMN verdict TEXT;
UPDATE runs SET verdict = json_extract(snapshot, '$.verdict.reason');

CREATE TABLE journal_writes (
    run_id               TEXT NOT NULL,
    cycle_id             TEXT NOT NULL,
    label                TEXT NOT NULL,
    stage                TEXT NOT NULL,
    outcome              TEXT NOT NULL,
    done                 INTEGER NOT NULL,
    started_at           TEXT NOT NULL,
    at                   TEXT NOT NULL,
    snapshot             TEXT NOT NULL,
    verdict              TEXT,
    -- [{"seq", "at", "from_stage", "to_stage", "event", "actions"}…], oldest first
    lines                TEXT NOT NULL,
    -- [{the columns of `promotions`}…] or NULL
    promotions           TEXT,
    has_cursor           INTEGER NOT NULL,
    watermark            TEXT,
    consumed_version     TEXT,
    consumed_num_samples INTEGER,
    rejected_version     TEXT
);

-- Each line takes the next journal position (0008; one counter with
-- `worker_events`, 0013): the uncorrelated largest position is read once
-- per statement, before its rows are inserted, and the lines follow in
-- array order. Setting the position here means the
-- `transitions_position` trigger (WHEN NEW.position IS NULL) does not run.
CREATE TRIGGER journal_writes_apply AFTER INSERT ON journal_writes BEGIN
    INSERT INTO runs (run_id, cycle_id, label, stage, outcome, done, started_at, updated_at,
                      snapshot, verdict)
    VALUES (NEW.run_id, NEW.cycle_id, NEW.label, NEW.stage, NEW.outcome, NEW.done,
            NEW.started_at, NEW.at, NEW.snapshot, NEW.verdict)
    ON CONFLICT (run_id) DO UPDATE SET
        stage = excluded.stage, outcome = excluded.outcome, done = excluded.done,
        updated_at = excluded.updated_at, snapshot = excluded.snapshot,
        verdict = excluded.verdict;
    INSERT INTO transitions (run_id, seq, at, from_stage, to_stage, event, actions, position)
    SELECT NEW.run_id, line.value ->> 'seq', line.value ->> 'at', line.value ->> 'from_stage',
           line.value ->> 'to_stage', line.value -> 'event', line.value -> 'actions',
           (SELECT COALESCE(MAX(p), 0) FROM (
                SELECT MAX(position) AS p FROM transitions
                UNION ALL SELECT MAX(position) FROM worker_events)) + line.key + 1
    FROM json_each(NEW.lines) AS line
    ORDER BY line.key;
    INSERT INTO cursors (label, watermark, consumed_version, consumed_num_samples,
                         rejected_version, updated_at)
    SELECT NEW.label, NEW.watermark, NEW.consumed_version, NEW.consumed_num_samples,
           NEW.rejected_version, NEW.at
    WHERE NEW.has_cursor
    ON CONFLICT (label) DO UPDATE SET
        watermark = excluded.watermark, consumed_version = excluded.consumed_version,
        consumed_num_samples = excluded.consumed_num_samples,
        rejected_version = excluded.rejected_version, updated_at = excluded.updated_at;
    INSERT INTO promotions (run_id, label, kind, version, previous_version, candidate_run,
                            candidate_id, verdict, by_whom, reason, at)
    SELECT event.value ->> 'run_id', event.value ->> 'label', event.value ->> 'kind',
           event.value ->> 'version', event.value ->> 'previous_version',
           event.value ->> 'candidate_run', event.value ->> 'candidate_id',
           event.value ->> 'verdict', event.value ->> 'by_whom', event.value ->> 'reason',
           event.value ->> 'at'
    FROM json_each(NEW.promotions) AS event
    WHERE true
    ORDER BY event.key
    ON CONFLICT (run_id) DO NOTHING;
    DELETE FROM journal_writes WHERE rowid = NEW.rowid;
END;

-- Always empty (its trigger deleted each row it applied); replaced by the above.
DROP TRIGGER journal_inbox_apply;
DROP TABLE journal_inbox;
