-- A run's last write releases its label's lock (issue 11).
--
-- The engine released a label's lock with a statement of its own after the
-- run's final journal write (the commit): one more commit of the writer
-- connection per label and cycle, in a store where every label's writes
-- queue for that one connection. A journal write may now carry the fence
-- whose lock it releases (`unlock_owner`, `unlock_token`; NULL: it releases
-- nothing). The row is only inserted while that fence holds the lock (the
-- `INSERT … WHERE EXISTS` of the batch statement), so the release below
-- and the write are applied, or refused, together by one statement. The
-- release is the one `RunStore::release_lock` does: owner '', expiry the
-- epoch, the token kept (it only ever grows).
--
-- A second trigger rather than a new `journal_writes_apply` (0016): it
-- reads only `NEW`, which stays readable after that trigger deleted the
-- row, so the two may fire in either order. An older binary inserts
-- without these columns: NULL, nothing released, as before.
ALTER TABLE journal_writes ADD COLUMN unlock_owner TEXT;
ALTER TABLE journal_writes ADD COLUMN unlock_token INTEGER;

CREATE TRIGGER journal_writes_unlock AFTER INSERT ON journal_writes
WHEN NEW.unlock_owner IS NOT NULL BEGIN
    UPDATE locks SET owner = '', expires_at = '1970-01-01T00:00:00.000000Z'
    WHERE label = NEW.label AND owner = NEW.unlock_owner AND token = NEW.unlock_token;
END;
