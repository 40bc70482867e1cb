-- Worker and job events (`GET /v1/events`: worker.registered|stale|removed,
-- job.queued|assigned|finished|failed|requeued|lost). Their positions and
-- the journal's come from one counter, so the stream's `id` stays one
-- integer in commit order across both tables and `Last-Event-ID` resumes
-- either kind exactly: the position of a row of either table is 1 + the
-- largest position of both (one writer at a time, so that is commit order).
--
-- They are written by triggers on `remote_jobs` and `remote_workers`, so
-- every statement that moves a job or a worker writes its event in the
-- same transaction, and a statement that changes nothing (an idempotent
-- enqueue, a compare-and-set that lost) writes none. `at` is this machine's
-- clock. The detail never carries the job's spec (its env values may be
-- credentials), only its resource request.
CREATE TABLE worker_events (
    position  INTEGER,
    at        TEXT NOT NULL,
    type      TEXT NOT NULL,
    worker_id TEXT,
    job_key   TEXT,
    run_id    TEXT,
    label     TEXT,
    detail    TEXT NOT NULL
);
CREATE UNIQUE INDEX worker_events_by_position ON worker_events (position);
CREATE INDEX worker_events_by_label ON worker_events (label, position);

DROP TRIGGER transitions_position;
CREATE TRIGGER transitions_position AFTER INSERT ON transitions
WHEN NEW.position IS NULL
BEGIN
    UPDATE transitions
    SET position = (SELECT COALESCE(MAX(p), 0) + 1 FROM (
        SELECT MAX(position) AS p FROM transitions
        UNION ALL SELECT MAX(position) FROM worker_events))
    WHERE rowid = NEW.rowid;
END;

CREATE TRIGGER worker_events_position AFTER INSERT ON worker_events
WHEN NEW.position IS NULL
BEGIN
    UPDATE worker_events
    SET position = (SELECT COALESCE(MAX(p), 0) + 1 FROM (
        SELECT MAX(position) AS p FROM transitions
        UNION ALL SELECT MAX(position) FROM worker_events))
    WHERE rowid = NEW.rowid;
END;

CREATE TRIGGER remote_jobs_queued_event AFTER INSERT ON remote_jobs
BEGIN
    INSERT INTO worker_events (at, type, worker_id, job_key, run_id, label, detail)
    VALUES (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 'job.queued', NULL,
            NEW.job_key, NEW.run_id, NEW.label,
            json_object('attempt', NEW.attempt,
                        'request', json(COALESCE(json_extract(NEW.spec, '$.request'), '{}'))));
END;

-- `cancelling` is the engine's request, not a queue move: no event. A job
-- given back (`queued` again: drain, deregistration, a lease never taken)
-- names the worker it left.
CREATE TRIGGER remote_jobs_moved_event AFTER UPDATE OF state ON remote_jobs
WHEN OLD.state IS NOT NEW.state AND NEW.state <> 'cancelling'
BEGIN
    INSERT INTO worker_events (at, type, worker_id, job_key, run_id, label, detail)
    VALUES (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
            CASE NEW.state
                WHEN 'assigned' THEN 'job.assigned'
                WHEN 'finished' THEN 'job.finished'
                WHEN 'failed' THEN 'job.failed'
                WHEN 'lost' THEN 'job.lost'
                WHEN 'queued' THEN 'job.requeued'
            END,
            CASE NEW.state WHEN 'queued' THEN OLD.worker_id ELSE NEW.worker_id END,
            NEW.job_key, NEW.run_id, NEW.label,
            CASE
                WHEN NEW.state = 'finished' THEN
                    json_object('attempt', NEW.attempt, 'candidate', json_extract(NEW.result, '$.id'))
                WHEN NEW.state IN ('failed', 'lost') THEN
                    json_object('attempt', NEW.attempt, 'reason', NEW.failure)
                ELSE json_object('attempt', NEW.attempt)
            END);
END;

CREATE TRIGGER remote_workers_registered_event AFTER INSERT ON remote_workers
BEGIN
    INSERT INTO worker_events (at, type, worker_id, detail)
    VALUES (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 'worker.registered', NEW.worker_id,
            json_object('name', NEW.name, 'hostname', NEW.hostname,
                        'labels', json(NEW.labels), 'resources', json(NEW.resources),
                        'version', NEW.version));
END;

CREATE TRIGGER remote_workers_stale_event AFTER UPDATE OF state ON remote_workers
WHEN NEW.state = 'stale' AND OLD.state <> 'stale'
BEGIN
    INSERT INTO worker_events (at, type, worker_id, detail)
    VALUES (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 'worker.stale', NEW.worker_id,
            json_object('name', NEW.name, 'last_heartbeat_at', NEW.last_heartbeat_at));
END;

CREATE TRIGGER remote_workers_removed_event AFTER DELETE ON remote_workers
BEGIN
    INSERT INTO worker_events (at, type, worker_id, detail)
    VALUES (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 'worker.removed', OLD.worker_id,
            json_object('name', OLD.name,
                        'reason', CASE OLD.state WHEN 'stale' THEN 'stale' ELSE 'deregistered' END));
END;
