-- Journal positions (`GET /v1/events`, `RunStore::journal_after`): every
-- journal line gets a position that grows in *commit* order, so a reader
-- that resumes after the last position it saw loses and repeats nothing.
-- A sequence would not do: two transactions can commit in the opposite
-- order of their sequence values, and a reader could pass a position whose
-- line commits later. Instead every journal insert increments the one row
-- of `journal_head`, whose row lock is held until commit, so the next
-- writer gets its position only after this one committed (journal writes
-- are short; they serialise on this row and on nothing else).
CREATE TABLE journal_head (
    id       BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    position BIGINT NOT NULL
);

ALTER TABLE transitions ADD COLUMN position BIGINT;
UPDATE transitions t SET position = numbered.n
FROM (SELECT run_id, seq, row_number() OVER (ORDER BY at, run_id, seq) AS n FROM transitions) numbered
WHERE t.run_id = numbered.run_id AND t.seq = numbered.seq;
INSERT INTO journal_head (id, position) SELECT TRUE, COALESCE(MAX(position), 0) FROM transitions;
CREATE UNIQUE INDEX transitions_by_position ON transitions (position);

-- Also wakes the event streams of every replica: NOTIFY is delivered at
-- commit, and only if the transaction commits.
CREATE FUNCTION retrain_journal_position() RETURNS trigger AS $$
BEGIN
    UPDATE journal_head SET position = position + 1 RETURNING position INTO NEW.position;
    PERFORM pg_notify('retrain_journal', NEW.position::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER transitions_position BEFORE INSERT ON transitions
FOR EACH ROW EXECUTE FUNCTION retrain_journal_position();

-- `Idempotency-Key` of `POST /v1/runs`: the first request claims the key
-- (insert, no conflict), stores its response; a repeat reads it back.
CREATE TABLE idempotency_keys (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    response    TEXT,
    created_at  TIMESTAMPTZ NOT NULL
);
