-- Inbound deliveries of `retrain-server` (webhooks, schedule ticks): one row
-- per request, whatever its outcome, for `GET /v1/webhooks/deliveries`.
-- `claimed` marks the one delivery of a (source, delivery id) that was
-- accepted to act; the partial unique index refuses a second claim (a
-- replayed MLflow delivery, a schedule tick fired by two replicas) across
-- every process sharing this store. Rejected and replayed deliveries are
-- recorded unclaimed, so a forged request cannot burn a delivery id.
CREATE TABLE webhook_deliveries (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    source      TEXT NOT NULL,
    delivery_id TEXT,
    claimed     INTEGER NOT NULL DEFAULT 0,
    outcome     TEXT NOT NULL,
    status      INTEGER NOT NULL,
    detail      TEXT,
    received_at TEXT NOT NULL
);
CREATE UNIQUE INDEX webhook_deliveries_claims
    ON webhook_deliveries (source, delivery_id) WHERE claimed = TRUE;
CREATE INDEX webhook_deliveries_by_source ON webhook_deliveries (source, seq);
