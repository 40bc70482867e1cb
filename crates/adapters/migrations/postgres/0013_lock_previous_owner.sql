-- Lock takeovers (`retrain_lock_takeovers_total`, crates/adapters/src/store/locks.rs):
-- every acquisition records the owner the row had just before it. An
-- acquisition whose previous owner is neither '' (released) nor the new
-- owner took over a lock its holder never released: it expired, or its
-- process was gone. Recorded by the acquiring statement itself (SET
-- expressions read the row as it was), so detecting a takeover costs no
-- extra statement.
ALTER TABLE locks ADD COLUMN previous_owner TEXT NOT NULL DEFAULT '';
