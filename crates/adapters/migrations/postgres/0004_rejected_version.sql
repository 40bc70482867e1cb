-- The data gate (`dataset_check`): the last dataset version a label's check
-- rejected is part of the label's cursor, written in the same fenced
-- transaction as the run's final transition.
ALTER TABLE cursors ADD COLUMN rejected_version TEXT;
