-- Run store schema (Postgres).

CREATE TABLE runs (
    run_id     TEXT PRIMARY KEY,
    cycle_id   TEXT NOT NULL,
    label      TEXT NOT NULL,
    stage      TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    done       BOOLEAN NOT NULL DEFAULT FALSE,
    started_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    snapshot   JSONB NOT NULL
);
CREATE INDEX runs_by_label ON runs (label, done, started_at);
CREATE INDEX runs_by_start ON runs (started_at);

CREATE TABLE transitions (
    run_id     TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    seq        BIGINT NOT NULL,
    at         TIMESTAMPTZ NOT NULL,
    from_stage TEXT NOT NULL,
    to_stage   TEXT NOT NULL,
    event      JSONB NOT NULL,
    actions    JSONB NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE cursors (
    label                TEXT PRIMARY KEY,
    watermark            TIMESTAMPTZ,
    consumed_version     TEXT,
    consumed_num_samples BIGINT,
    updated_at           TIMESTAMPTZ NOT NULL
);

-- Label locks: owner + expiry, compared with the database's clock (now()) so
-- that orchestrators on different machines agree on who holds a lock.
CREATE TABLE locks (
    label      TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE leases (
    id          TEXT PRIMARY KEY,
    label       TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    provider    TEXT NOT NULL,
    resources   JSONB NOT NULL,
    region      TEXT,
    acquired_at TIMESTAMPTZ NOT NULL,
    max_until   TIMESTAMPTZ NOT NULL,
    attributes  JSONB NOT NULL,
    released_at TIMESTAMPTZ
);
CREATE INDEX leases_active ON leases (acquired_at) WHERE released_at IS NULL;
