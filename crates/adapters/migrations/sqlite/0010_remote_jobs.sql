-- Remote training jobs and the workers that run them (`trainer = { worker =
-- … }`, `retrain worker`). A job row is written once per job key (the
-- engine's intent key, `run_id/train/N`) and moves only by compare-and-set
-- on its state: queued → assigned (one worker) → finished | failed | lost;
-- assigned → cancelling (the engine asked) → failed; assigned → queued (a
-- drain cancel: same key, no attempt used). A worker's row is refreshed by
-- its heartbeats; past `[server] worker_ttl` it is `stale` and its assigned
-- job `lost`. Times are RFC 3339 text (this machine's clock), JSON is text.
CREATE TABLE remote_workers (
    worker_id         TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    hostname          TEXT NOT NULL,
    labels            TEXT NOT NULL,
    resources         TEXT NOT NULL,
    version           TEXT NOT NULL,
    state             TEXT NOT NULL,
    registered_at     TEXT NOT NULL,
    last_heartbeat_at TEXT NOT NULL
);
CREATE INDEX remote_workers_by_heartbeat ON remote_workers (state, last_heartbeat_at);

CREATE TABLE remote_jobs (
    job_key     TEXT PRIMARY KEY,
    run_id      TEXT NOT NULL,
    label       TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    spec        TEXT NOT NULL,
    state       TEXT NOT NULL,
    worker_id   TEXT,
    result      TEXT,
    failure     TEXT,
    log_tail    TEXT NOT NULL DEFAULT '',
    enqueued_at TEXT NOT NULL,
    assigned_at TEXT,
    finished_at TEXT
);
CREATE INDEX remote_jobs_by_state ON remote_jobs (state, enqueued_at);
CREATE INDEX remote_jobs_by_run ON remote_jobs (run_id);
CREATE INDEX remote_jobs_by_worker ON remote_jobs (worker_id, state);
-- At most one job held (assigned or being cancelled) per worker, whichever
-- process assigns it.
CREATE UNIQUE INDEX remote_jobs_one_per_worker ON remote_jobs (worker_id)
    WHERE state IN ('assigned', 'cancelling');
