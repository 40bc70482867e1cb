-- Journal positions (`GET /v1/events`, `RunStore::journal_after`): every
-- journal line gets a position that grows in commit order, so a reader that
-- resumes after the last position it saw loses and repeats nothing. SQLite
-- has one writer at a time, so "max + 1" in the inserting transaction is
-- commit order. An explicit column, not the rowid: VACUUM may renumber the
-- rowids of a table without an INTEGER PRIMARY KEY.
ALTER TABLE transitions ADD COLUMN position INTEGER;
UPDATE transitions SET position = rowid;
CREATE UNIQUE INDEX transitions_by_position ON transitions (position);

-- Set by a trigger so that the journal write stays the one statement into
-- `journal_inbox` (its trigger inserts the line, which fires this one).
CREATE TRIGGER transitions_position AFTER INSERT ON transitions
WHEN NEW.position IS NULL
BEGIN
    UPDATE transitions
    SET position = (SELECT COALESCE(MAX(position), 0) + 1 FROM transitions)
    WHERE rowid = NEW.rowid;
END;

-- `Idempotency-Key` of `POST /v1/runs`: the first request claims the key
-- (insert, no conflict), stores its response; a repeat reads it back.
CREATE TABLE idempotency_keys (
    key         TEXT PRIMARY KEY NOT NULL,
    fingerprint TEXT NOT NULL,
    response    TEXT,
    created_at  TEXT NOT NULL
);
