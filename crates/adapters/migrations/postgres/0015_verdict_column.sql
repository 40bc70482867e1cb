-- The verdict reason of a run (`snapshot -> 'verdict' ->> 'reason'`) in a
-- column of its own, written with the snapshot by the journal's group
-- commit, so that the status listing (`GET /v1/labels`, `retrain status`)
-- reads a column instead of the newest run's whole snapshot per label.
ALTER TABLE runs ADD COLUMN verdict TEXT;
UPDATE runs SET verdict = snapshot -> 'verdict' ->> 'reason';
