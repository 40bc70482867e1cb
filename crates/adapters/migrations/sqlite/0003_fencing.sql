-- Fencing tokens (crates/adapters/src/store/locks.rs). Every acquisition of a
-- label lock sets token = token + 1 and hands the new token to the holder;
-- journal, cursor and lease writes carry (owner, token) and apply only while
-- that exact lock is held and unexpired. A released lock keeps its row
-- (owner '', expiry in the past), so a label's token never goes back.
ALTER TABLE locks ADD COLUMN token INTEGER NOT NULL DEFAULT 0;

-- The journal write stays one statement, now conditional:
--   INSERT INTO journal_inbox (...) SELECT ... WHERE EXISTS (SELECT 1 FROM locks
--   WHERE label = ? AND owner = ? AND token = ? AND expires_at > ?)
-- inserts no row (0 rows affected: the write is fenced off) unless the fence
-- holds. A finishing run's cursor travels in the same row, so journal line,
-- snapshot and cursor are applied (or refused) together by that one
-- statement, never one without the others.
ALTER TABLE journal_inbox ADD COLUMN has_cursor INTEGER NOT NULL DEFAULT 0;
ALTER TABLE journal_inbox ADD COLUMN watermark TEXT;
ALTER TABLE journal_inbox ADD COLUMN consumed_version TEXT;
ALTER TABLE journal_inbox ADD COLUMN consumed_num_samples INTEGER;

DROP TRIGGER journal_inbox_apply;
CREATE TRIGGER journal_inbox_apply AFTER INSERT ON journal_inbox BEGIN
    INSERT INTO runs (run_id, cycle_id, label, stage, outcome, done, started_at, updated_at, snapshot)
    VALUES (NEW.run_id, NEW.cycle_id, NEW.label, NEW.stage, NEW.outcome, NEW.done, NEW.started_at, NEW.at, NEW.snapshot)
    ON CONFLICT (run_id) DO UPDATE SET
        stage = excluded.stage, outcome = excluded.outcome, done = excluded.done,
        updated_at = excluded.updated_at, snapshot = excluded.snapshot;
    INSERT INTO transitions (run_id, seq, at, from_stage, to_stage, event, actions)
    VALUES (NEW.run_id, NEW.seq, NEW.at, NEW.from_stage, NEW.to_stage, NEW.event, NEW.actions);
    INSERT INTO cursors (label, watermark, consumed_version, consumed_num_samples, updated_at)
    SELECT NEW.label, NEW.watermark, NEW.consumed_version, NEW.consumed_num_samples, NEW.at
    WHERE NEW.has_cursor
    ON CONFLICT (label) DO UPDATE SET
        watermark = excluded.watermark, consumed_version = excluded.consumed_version,
        consumed_num_samples = excluded.consumed_num_samples, updated_at = excluded.updated_at;
    DELETE FROM journal_inbox WHERE rowid = NEW.rowid;
END;
