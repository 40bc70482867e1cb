-- The data gate (`dataset_check`): the last dataset version a label's check
-- rejected is part of the label's cursor, written by the same fenced
-- journal statement as the run's final transition (see 0003), so a rejected
-- version is recorded exactly when the run that rejected it finished.
ALTER TABLE cursors ADD COLUMN rejected_version TEXT;
ALTER TABLE journal_inbox ADD COLUMN rejected_version TEXT;

DROP TRIGGER journal_inbox_apply;
CREATE TRIGGER journal_inbox_apply AFTER INSERT ON journal_inbox BEGIN
    INSERT INTO runs (run_id, cycle_id, label, stage, outcome, done, started_at, updated_at, snapshot)
    VALUES (NEW.run_id, NEW.cycle_id, NEW.label, NEW.stage, NEW.outcome, NEW.done, NEW.started_at, NEW.at, NEW.snapshot)
    ON CONFLICT (run_id) DO UPDATE SET
        stage = excluded.stage, outcome = excluded.outcome, done = excluded.done,
        updated_at = excluded.updated_at, snapshot = excluded.snapshot;
    INSERT INTO transitions (run_id, seq, at, from_stage, to_stage, event, actions)
    VALUES (NEW.run_id, NEW.seq, NEW.at, NEW.from_stage, NEW.to_stage, NEW.event, NEW.actions);
    INSERT INTO cursors (label, watermark, consumed_version, consumed_num_samples, rejected_version, updated_at)
    SELECT NEW.label, NEW.watermark, NEW.consumed_version, NEW.consumed_num_samples, NEW.rejected_version, NEW.at
    WHERE NEW.has_cursor
    ON CONFLICT (label) DO UPDATE SET
        watermark = excluded.watermark, consumed_version = excluded.consumed_version,
        consumed_num_samples = excluded.consumed_num_samples,
        rejected_version = excluded.rejected_version, updated_at = excluded.updated_at;
    DELETE FROM journal_inbox WHERE rowid = NEW.rowid;
END;
