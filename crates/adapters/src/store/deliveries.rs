//! The delivery log of `retrain-server`: every inbound webhook request and
//! every schedule tick, with its outcome (table `webhook_deliveries`,
//! migrations sqlite `0009` / postgres `0008`).
//!
//! **Invariant (one claim per delivery id):** a delivery that passed its
//! signature check *claims* its `(source, delivery_id)` in the same
//! statement that records it; the table's partial unique index refuses a
//! second claim, on every process sharing the store. So a replayed MLflow
//! delivery, or a schedule tick fired by two replicas, acts once. A claim
//! whose action failed for a reason worth retrying (store or registry
//! unavailable) is given up ([`DeliveryLog::settle`] with `keep_claim =
//! false`), so the sender's retry of the same delivery id can act.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_core::ports::StoreError;

use super::backend::{Arg, Backend, Columns, Statements, StoreRow};
use super::SqlRunStore;

/// One delivery to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    /// `huggingface`, `github`, `mlflow`, `schedule`.
    pub source: String,
    /// The sender's id of the delivery (`X-GitHub-Delivery`,
    /// `X-MLflow-Delivery-Id`, the tick's time), when it has one.
    pub delivery_id: Option<String>,
    /// Claim `(source, delivery_id)`: refused if another delivery holds it.
    pub claim: bool,
    /// Stable outcome code (`accepted`, `bad_signature`, `replayed_delivery`…).
    pub outcome: String,
    /// The HTTP status answered (0 for schedule ticks).
    pub status: u16,
    /// What happened, for people (never a secret).
    pub detail: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// A recorded delivery.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Delivery {
    /// Position in the log (grows with every delivery); the listing cursor.
    pub seq: i64,
    pub source: String,
    pub delivery_id: Option<String>,
    /// Whether this delivery holds the claim on its id.
    pub claimed: bool,
    pub outcome: String,
    pub status: u16,
    pub detail: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// A page of the log, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryQuery {
    pub source: Option<String>,
    /// Only deliveries older than this `seq` (the previous page's last).
    pub before: Option<i64>,
    pub limit: u32,
}

/// What recording a delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded; with `claim`, this delivery now holds its id.
    Recorded { seq: i64 },
    /// Asked to claim an id another delivery holds: nothing was written.
    AlreadyClaimed,
}

/// The durable delivery log (see the module docs for the claim rule).
#[async_trait]
pub trait DeliveryLog: Send + Sync + std::fmt::Debug {
    async fn record(&self, delivery: &NewDelivery) -> Result<Recorded, StoreError>;

    /// Set the final outcome of delivery `seq`; `keep_claim = false` gives
    /// its claim up so a retry of the same id may act.
    async fn settle(
        &self,
        seq: i64,
        outcome: &str,
        status: u16,
        detail: Option<&str>,
        keep_claim: bool,
    ) -> Result<(), StoreError>;

    async fn list(&self, query: &DeliveryQuery) -> Result<Vec<Delivery>, StoreError>;

    /// The newest delivery of `source` holding a claim (the schedule's last
    /// fired tick).
    async fn last_claimed(&self, source: &str) -> Result<Option<Delivery>, StoreError>;
}

const INSERT: &str = "INSERT INTO webhook_deliveries
        (source, delivery_id, claimed, outcome, status, detail, received_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7)
     ON CONFLICT DO NOTHING
     RETURNING seq";

const SETTLE: &str = "UPDATE webhook_deliveries
     SET outcome = $2, status = $3, detail = $4, claimed = (claimed AND $5)
     WHERE seq = $1";

/// `$2`: `i64::MAX` for "from the newest"; `$3` the page size.
const SELECT: &str =
    "SELECT seq, source, delivery_id, claimed, outcome, status, detail, received_at
     FROM webhook_deliveries
     WHERE (CAST($1 AS TEXT) IS NULL OR source = $1) AND seq < $2
     ORDER BY seq DESC LIMIT $3";

const SELECT_LAST_CLAIMED: &str =
    "SELECT seq, source, delivery_id, claimed, outcome, status, detail, received_at
     FROM webhook_deliveries WHERE source = $1 AND claimed = TRUE
     ORDER BY seq DESC LIMIT 1";

fn delivery_of<R: StoreRow>(row: &R) -> Result<Delivery, StoreError> {
    let seq = row.int("seq")?;
    let status = row.int("status")?;
    Ok(Delivery {
        seq,
        source: row.text("source")?,
        delivery_id: row.opt_text("delivery_id")?,
        claimed: row.flag("claimed")?,
        outcome: row.text("outcome")?,
        status: u16::try_from(status).map_err(|_| {
            StoreError::Corrupt(format!(
                "status of delivery {seq} is not an HTTP status: {status}"
            ))
        })?,
        detail: row.opt_text("detail")?,
        received_at: row.time("received_at", &format!("time of delivery {seq}"))?,
    })
}

#[async_trait]
impl<B: Backend> DeliveryLog for SqlRunStore<B> {
    async fn record(&self, delivery: &NewDelivery) -> Result<Recorded, StoreError> {
        let b = &self.0;
        if delivery.claim && delivery.delivery_id.is_none() {
            return Err(StoreError::Conflict(format!(
                "a {} delivery without an id cannot claim one",
                delivery.source
            )));
        }
        let args = vec![
            Arg::text(&delivery.source),
            Arg::OptText(delivery.delivery_id.clone()),
            Arg::Bool(delivery.claim),
            Arg::text(&delivery.outcome),
            Arg::Int(i64::from(delivery.status)),
            Arg::OptText(delivery.detail.clone()),
            Arg::Time(delivery.received_at),
        ];
        let row = b
            .pool()
            .fetch_optional(INSERT, args)
            .await
            .map_err(|e| b.error(&format!("recording a {} delivery", delivery.source), e))?;
        match row {
            Some(row) => Ok(Recorded::Recorded {
                seq: row.int("seq")?,
            }),
            None => Ok(Recorded::AlreadyClaimed),
        }
    }

    async fn settle(
        &self,
        seq: i64,
        outcome: &str,
        status: u16,
        detail: Option<&str>,
        keep_claim: bool,
    ) -> Result<(), StoreError> {
        let b = &self.0;
        let args = vec![
            Arg::Int(seq),
            Arg::text(outcome),
            Arg::Int(i64::from(status)),
            Arg::OptText(detail.map(str::to_owned)),
            Arg::Bool(keep_claim),
        ];
        let updated = b
            .pool()
            .execute(SETTLE, args)
            .await
            .map_err(|e| b.error(&format!("settling delivery {seq}"), e))?;
        if updated == 0 {
            return Err(StoreError::Conflict(format!("no delivery {seq} to settle")));
        }
        Ok(())
    }

    async fn list(&self, query: &DeliveryQuery) -> Result<Vec<Delivery>, StoreError> {
        let b = &self.0;
        let args = vec![
            Arg::OptText(query.source.clone()),
            Arg::Int(query.before.unwrap_or(i64::MAX)),
            Arg::Int(i64::from(query.limit)),
        ];
        b.pool()
            .fetch_all(SELECT, args)
            .await
            .map_err(|e| b.error("listing webhook deliveries", e))?
            .iter()
            .map(delivery_of)
            .collect()
    }

    async fn last_claimed(&self, source: &str) -> Result<Option<Delivery>, StoreError> {
        let b = &self.0;
        b.pool()
            .fetch_optional(SELECT_LAST_CLAIMED, vec![Arg::text(source)])
            .await
            .map_err(|e| b.error(&format!("reading the last {source} delivery"), e))?
            .as_ref()
            .map(delivery_of)
            .transpose()
    }
}
