-- A group commit numbers its journal lines itself: one `UPDATE journal_head
-- … + n` for the n lines of its statement (still under the row lock held to
-- commit, so positions still grow in commit order), instead of the trigger
-- of migration 0007 updating `journal_head` and notifying once per line,
-- which was 10,000 updates and notifications of each 1,000-label cycle.
--
-- The per-line trigger stays for a line that comes without a position
-- (from a process of an earlier version, still running beside a newer
-- one): both forms take `journal_head`'s row lock, so they interleave in
-- commit order as before.
DROP TRIGGER transitions_position ON transitions;
CREATE TRIGGER transitions_position BEFORE INSERT ON transitions
FOR EACH ROW WHEN (NEW.position IS NULL) EXECUTE FUNCTION retrain_journal_position();

-- The event streams' wake-up (`store/watch.rs` ignores the payload): one
-- per statement, delivered at commit as before.
CREATE FUNCTION retrain_journal_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('retrain_journal', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER transitions_notify AFTER INSERT ON transitions
FOR EACH STATEMENT EXECUTE FUNCTION retrain_journal_notify();
