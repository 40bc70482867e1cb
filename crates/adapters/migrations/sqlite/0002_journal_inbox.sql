-- One statement per journal write. sqlx runs every SQLite statement on the
-- connection's worker thread (two thread hops each), so a journal write that
-- needs an upsert of `runs` plus an insert into `transitions` is written as a
-- single INSERT into this inbox; the trigger applies both and empties the
-- inbox, all inside that one statement (so it is atomic on its own).
CREATE TABLE journal_inbox (
    run_id     TEXT NOT NULL,
    cycle_id   TEXT NOT NULL,
    label      TEXT NOT NULL,
    stage      TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    done       INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    at         TEXT NOT NULL,
    snapshot   TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    from_stage TEXT NOT NULL,
    to_stage   TEXT NOT NULL,
    event      TEXT NOT NULL,
    actions    TEXT NOT NULL
);

CREATE TRIGGER journal_inbox_apply AFTER INSERT ON journal_inbox BEGIN
    INSERT INTO runs (run_id, cycle_id, label, stage, outcome, done, started_at, updated_at, snapshot)
    VALUES (NEW.run_id, NEW.cycle_id, NEW.label, NEW.stage, NEW.outcome, NEW.done, NEW.started_at, NEW.at, NEW.snapshot)
    ON CONFLICT (run_id) DO UPDATE SET
        stage = excluded.stage, outcome = excluded.outcome, done = excluded.done,
        updated_at = excluded.updated_at, snapshot = excluded.snapshot;
    INSERT INTO transitions (run_id, seq, at, from_stage, to_stage, event, actions)
    VALUES (NEW.run_id, NEW.seq, NEW.at, NEW.from_stage, NEW.to_stage, NEW.event, NEW.actions);
    DELETE FROM journal_inbox WHERE rowid = NEW.rowid;
END;
