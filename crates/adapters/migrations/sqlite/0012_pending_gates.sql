-- Registered model versions `retrain-server` accepted to gate (an MLflow
-- `model_version.created` webhook) and has not gated yet: the label's run
-- held its lock, so the gate waits. Kept here so that a restart resumes the
-- wait instead of losing the accepted delivery; the row is removed once the
-- version was gated (or gating failed for good).
CREATE TABLE pending_gates (
    label            TEXT NOT NULL,
    model            TEXT NOT NULL,
    version          TEXT NOT NULL,
    candidate_run_id TEXT,
    received_at      TEXT NOT NULL,
    PRIMARY KEY (label, model, version)
);
