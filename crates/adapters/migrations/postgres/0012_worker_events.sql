-- Worker and job events (`GET /v1/events`: worker.registered|stale|removed,
-- job.queued|assigned|finished|failed|requeued|lost). Their positions come
-- from the journal's counter (`journal_head`, migration 0007), so the
-- stream's `id` stays one integer in commit order across both tables and
-- `Last-Event-ID` resumes either kind exactly.
--
-- They are written by triggers on `remote_jobs` and `remote_workers`, so
-- every statement that moves a job or a worker writes its event in the
-- same transaction, and a statement that changes nothing (an idempotent
-- enqueue, a compare-and-set that lost) writes none. The triggers are
-- deferred to commit: a statement moving several rows (a staleness sweep)
-- takes its row locks first and the `journal_head` lock last, so it cannot
-- deadlock with a single-row move (a report) that holds one of those rows
-- and waits for `journal_head`. Deferred events fire in the order the
-- changes happened (a worker's `stale` before its job's `lost`).
CREATE TABLE worker_events (
    position  BIGINT NOT NULL,
    at        TIMESTAMPTZ NOT NULL,
    type      TEXT NOT NULL,
    worker_id TEXT,
    job_key   TEXT,
    run_id    TEXT,
    label     TEXT,
    detail    JSONB NOT NULL
);
CREATE UNIQUE INDEX worker_events_by_position ON worker_events (position);
CREATE INDEX worker_events_by_label ON worker_events (label, position);

-- Position and `pg_notify('retrain_journal', …)`, as for journal lines.
CREATE TRIGGER worker_events_position BEFORE INSERT ON worker_events
FOR EACH ROW EXECUTE FUNCTION retrain_journal_position();

-- `at` is the database's clock at commit. The detail never carries the job's
-- spec (its env values may be credentials), only its resource request.
CREATE FUNCTION retrain_job_event() RETURNS trigger AS $$
DECLARE
    kind   TEXT;
    worker TEXT := NEW.worker_id;
    detail JSONB := jsonb_build_object('attempt', NEW.attempt);
BEGIN
    IF TG_OP = 'INSERT' THEN
        kind := 'job.queued';
        detail := detail || jsonb_build_object('request', NEW.spec -> 'request');
    ELSE
        CASE NEW.state
            WHEN 'assigned' THEN
                kind := 'job.assigned';
            WHEN 'finished' THEN
                kind := 'job.finished';
                detail := detail || jsonb_build_object('candidate', NEW.result ->> 'id');
            WHEN 'failed' THEN
                kind := 'job.failed';
                detail := detail || jsonb_build_object('reason', NEW.failure);
            WHEN 'lost' THEN
                kind := 'job.lost';
                detail := detail || jsonb_build_object('reason', NEW.failure);
            WHEN 'queued' THEN
                -- Given back (drain, deregistration, a lease never taken):
                -- the worker it left.
                kind := 'job.requeued';
                worker := OLD.worker_id;
            ELSE
                -- `cancelling` is the engine's request, not a queue move.
                RETURN NULL;
        END CASE;
    END IF;
    INSERT INTO worker_events (at, type, worker_id, job_key, run_id, label, detail)
    VALUES (clock_timestamp(), kind, worker, NEW.job_key, NEW.run_id, NEW.label, detail);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE CONSTRAINT TRIGGER remote_jobs_queued_event AFTER INSERT ON remote_jobs
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW EXECUTE FUNCTION retrain_job_event();

CREATE CONSTRAINT TRIGGER remote_jobs_moved_event AFTER UPDATE OF state ON remote_jobs
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
EXECUTE FUNCTION retrain_job_event();

CREATE FUNCTION retrain_worker_event() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO worker_events (at, type, worker_id, detail)
        VALUES (clock_timestamp(), 'worker.registered', NEW.worker_id,
                jsonb_build_object('name', NEW.name, 'hostname', NEW.hostname,
                                   'labels', NEW.labels, 'resources', NEW.resources,
                                   'version', NEW.version));
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO worker_events (at, type, worker_id, detail)
        VALUES (clock_timestamp(), 'worker.stale', NEW.worker_id,
                jsonb_build_object('name', NEW.name, 'last_heartbeat_at', NEW.last_heartbeat_at));
    ELSE
        INSERT INTO worker_events (at, type, worker_id, detail)
        VALUES (clock_timestamp(), 'worker.removed', OLD.worker_id,
                jsonb_build_object('name', OLD.name,
                                   'reason', CASE OLD.state WHEN 'stale' THEN 'stale' ELSE 'deregistered' END));
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE CONSTRAINT TRIGGER remote_workers_registered_event AFTER INSERT ON remote_workers
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW EXECUTE FUNCTION retrain_worker_event();

CREATE CONSTRAINT TRIGGER remote_workers_stale_event AFTER UPDATE OF state ON remote_workers
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (NEW.state = 'stale' AND OLD.state <> 'stale')
EXECUTE FUNCTION retrain_worker_event();

CREATE CONSTRAINT TRIGGER remote_workers_removed_event AFTER DELETE ON remote_workers
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW EXECUTE FUNCTION retrain_worker_event();
