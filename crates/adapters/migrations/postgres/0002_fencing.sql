-- Fencing tokens (crates/adapters/src/store/locks.rs). Every acquisition of a
-- label lock sets token = token + 1 and hands the new token to the holder;
-- journal, cursor and lease writes carry (owner, token) and apply only while
-- that exact lock is held and unexpired (checked with SELECT ... FOR SHARE in
-- the write's transaction). A released lock keeps its row (owner '', expiry
-- in the past), so a label's token never goes back.
ALTER TABLE locks ADD COLUMN token BIGINT NOT NULL DEFAULT 0;
