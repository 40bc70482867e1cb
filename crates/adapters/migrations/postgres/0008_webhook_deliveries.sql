-- Inbound deliveries of `retrain-server` (webhooks, schedule ticks): one row
-- per request, whatever its outcome, for `GET /v1/webhooks/deliveries`.
-- `claimed` marks the one delivery of a (source, delivery id) that was
-- accepted to act; the partial unique index refuses a second claim (a
-- replayed MLflow delivery, a schedule tick fired by two replicas) across
-- every process sharing this store. Rejected and replayed deliveries are
-- recorded unclaimed, so a forged request cannot burn a delivery id.
CREATE TABLE webhook_deliveries (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      TEXT NOT NULL,
    delivery_id TEXT,
    claimed     BOOLEAN NOT NULL DEFAULT FALSE,
    outcome     TEXT NOT NULL,
    status      BIGINT NOT NULL,
    detail      TEXT,
    received_at TIMESTAMPTZ NOT NULL
);
CREATE UNIQUE INDEX webhook_deliveries_claims
    ON webhook_deliveries (source, delivery_id) WHERE claimed = TRUE;
CREATE INDEX webhook_deliveries_by_source ON webhook_deliveries (source, seq);
