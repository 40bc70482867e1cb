-- Artifacts uploaded to `retrain-server` (`PUT /v1/runs/{id}/artifacts/{name}`):
-- one row per (run, name), replaced by a later upload of the same name. The
-- bytes live in `[server] artifacts_dir/<run>/<name>`; the row is what the
-- run's manifest shows and what `GET` answers as the ETag. No foreign key to
-- `runs`: the server checks the run exists before writing, and runs are
-- never deleted.
CREATE TABLE run_artifacts (
    run_id      TEXT NOT NULL,
    name        TEXT NOT NULL,
    size_bytes  INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    uploaded_at TEXT NOT NULL,
    uploaded_by TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);
