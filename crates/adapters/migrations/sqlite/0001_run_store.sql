-- Run store schema (SQLite). Timestamps are fixed-width RFC 3339 text in UTC
-- (`2025-10-30T11:53:01.110260Z`) so that text order is time order.

CREATE TABLE runs (
    run_id     TEXT PRIMARY KEY NOT NULL,
    cycle_id   TEXT NOT NULL,
    label      TEXT NOT NULL,
    stage      TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    done       INTEGER NOT NULL DEFAULT 0,
    started_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    snapshot   TEXT NOT NULL
);
CREATE INDEX runs_by_label ON runs (label, done, started_at);
CREATE INDEX runs_by_start ON runs (started_at);

CREATE TABLE transitions (
    run_id     TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    at         TEXT NOT NULL,
    from_stage TEXT NOT NULL,
    to_stage   TEXT NOT NULL,
    event      TEXT NOT NULL,
    actions    TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE cursors (
    label                TEXT PRIMARY KEY NOT NULL,
    watermark            TEXT,
    consumed_version     TEXT,
    consumed_num_samples INTEGER,
    updated_at           TEXT NOT NULL
);

CREATE TABLE locks (
    label      TEXT PRIMARY KEY NOT NULL,
    owner      TEXT NOT NULL,
    expires_at TEXT NOT NULL
);

CREATE TABLE leases (
    id          TEXT PRIMARY KEY NOT NULL,
    label       TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    provider    TEXT NOT NULL,
    resources   TEXT NOT NULL,
    region      TEXT,
    acquired_at TEXT NOT NULL,
    max_until   TEXT NOT NULL,
    attributes  TEXT NOT NULL,
    released_at TEXT
);
CREATE INDEX leases_active ON leases (acquired_at) WHERE released_at IS NULL;
