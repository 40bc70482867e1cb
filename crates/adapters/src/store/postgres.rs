//! The Postgres dialect of the run store: several orchestrators, possibly on
//! different machines, share one database. Lock expiry is computed and
//! compared with the database's `now()`, never with a client clock. Fenced
//! writes run in a transaction that first takes a `FOR SHARE` lock on the
//! label's lock row (see [`holds`]).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_core::domain::{Fence, Label, LabelCursor, Lease, VersionTag};
use retrain_core::journal::Transition;
use retrain_core::ports::StoreError;
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, Row};

use super::backend::{
    bind, fence_args, lease_args, Arg, Backend, Bind, LockSql, Query, StoreRow, UPSERT_LEASE,
};
use super::{prepare_schema, u64_to_i64, RunRow, StoreOptions, POSTGRES_MIGRATIONS};
use crate::db::DbUrl;
use crate::AdapterError;

/// Connections per store: the engine writes one label at a time per task,
/// bounded by `max_parallel_labels`; more would only queue in Postgres.
const MAX_CONNECTIONS: u32 = 8;

/// The Postgres dialect.
pub(super) struct PostgresRunStore {
    pool: PgPool,
    url: DbUrl,
}

impl Bind for Postgres {
    fn bind(query: Query<'_, Self>, arg: Arg) -> Query<'_, Self> {
        match arg {
            Arg::Text(v) => query.bind(v),
            Arg::OptText(v) => query.bind(v),
            Arg::Int(v) => query.bind(v),
            Arg::OptInt(v) => query.bind(v),
            Arg::Float(v) => query.bind(v),
            Arg::Bool(v) => query.bind(v),
            Arg::Time(v) => query.bind(v),
            Arg::OptTime(v) => query.bind(v),
            Arg::Json(v) => query.bind(Json(v)),
        }
    }

    fn rows_affected(result: &sqlx::postgres::PgQueryResult) -> u64 {
        result.rows_affected()
    }
}

impl StoreRow for PgRow {
    fn time(&self, column: &str, what: &str) -> Result<DateTime<Utc>, StoreError> {
        self.try_get(column)
            .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
    }

    fn opt_time(&self, column: &str, what: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.try_get(column)
            .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
    }

    fn json<T: DeserializeOwned>(&self, column: &str) -> Result<T, String> {
        let Json(value) = self
            .try_get::<Json<serde_json::Value>, _>(column)
            .map_err(|e| e.to_string())?;
        serde_json::from_value(value).map_err(|e| e.to_string())
    }
}

/// Lock statements: `$1` label, then per statement (see [`LockSql`]); the
/// TTL in seconds comes last where an expiry is set. `now()` is the
/// database's clock. Concurrent upserts of one row serialise on it and
/// re-check the `WHERE` on its latest version, so exactly one caller takes a
/// free lock, and exactly one the lock of a dead holder.
const LOCKS: LockSql = LockSql {
    // [label, owner, ttl]
    acquire: "INSERT INTO locks (label, owner, expires_at, token)
              VALUES ($1, $2, now() + make_interval(secs => $3), 1)
              ON CONFLICT (label) DO UPDATE SET
                 previous_owner = locks.owner, owner = excluded.owner,
                 expires_at = excluded.expires_at, token = locks.token + 1
              WHERE locks.expires_at <= now() OR locks.owner = excluded.owner
              RETURNING token, previous_owner",
    // [label, owner, dead owner, dead token, ttl]
    take: "UPDATE locks SET previous_owner = owner, owner = $2,
                            expires_at = now() + make_interval(secs => $5), token = token + 1
           WHERE label = $1 AND owner = $3 AND token = $4
           RETURNING token, previous_owner",
    // [label]
    row: "SELECT owner, token, expires_at, expires_at > now() AS live FROM locks WHERE label = $1",
    // [label, owner, token, ttl]
    renew: "UPDATE locks SET expires_at = now() + make_interval(secs => $4)
            WHERE label = $1 AND owner = $2 AND token = $3 AND expires_at > now()",
    // [[{label, owner, token}…], ttl]
    renew_many: "UPDATE locks SET expires_at = now() + make_interval(secs => $2)
                 FROM jsonb_to_recordset($1) AS held(label TEXT, owner TEXT, token BIGINT)
                 WHERE locks.label = held.label AND locks.owner = held.owner
                   AND locks.token = held.token AND locks.expires_at > now()
                 RETURNING locks.label, locks.owner, locks.token",
    // [label, owner, token]
    release: "UPDATE locks SET owner = '', expires_at = 'epoch'
              WHERE label = $1 AND owner = $2 AND token = $3 AND expires_at > now()",
};

/// The check that opens every fenced write transaction. The share lock on
/// the row makes a concurrent takeover (an `UPDATE` of the row) wait until
/// this transaction ends, so nobody takes the lock between the check and the
/// commit.
const HOLDS: &str = "SELECT 1 FROM locks
     WHERE label = $1 AND owner = $2 AND token = $3 AND expires_at > now()
     FOR SHARE";

const UPSERT_RUN: &str =
    "INSERT INTO runs (run_id, cycle_id, label, stage, outcome, done, started_at, updated_at, snapshot)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
     ON CONFLICT (run_id) DO UPDATE SET
        stage = excluded.stage, outcome = excluded.outcome, done = excluded.done,
        updated_at = excluded.updated_at, snapshot = excluded.snapshot";

const INSERT_TRANSITION: &str =
    "INSERT INTO transitions (run_id, seq, at, from_stage, to_stage, event, actions)
     VALUES ($1, $2, $3, $4, $5, $6, $7)";

const UPSERT_CURSOR: &str =
    "INSERT INTO cursors (label, watermark, consumed_version, consumed_num_samples, updated_at, rejected_version)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (label) DO UPDATE SET
        watermark = excluded.watermark, consumed_version = excluded.consumed_version,
        consumed_num_samples = excluded.consumed_num_samples, updated_at = excluded.updated_at,
        rejected_version = excluded.rejected_version";

/// TTL in seconds for `make_interval(secs => …)`.
fn secs(ttl: Duration) -> f64 {
    super::ttl(ttl).num_milliseconds() as f64 / 1000.0
}

type Tx = sqlx::Transaction<'static, Postgres>;

impl PostgresRunStore {
    pub(super) async fn open(url: DbUrl, options: StoreOptions) -> Result<Self, AdapterError> {
        let pool = url
            .postgres_pool(super::KEY, MAX_CONNECTIONS, options.read_only)
            .await?;
        prepare_schema(POSTGRES_MIGRATIONS, &url, options, &pool).await?;
        Ok(Self { pool, url })
    }

    /// Close every connection.
    pub(super) async fn close(&self) {
        self.pool.close().await;
    }

    /// Begin a fenced write: a transaction in which `fence` holds `label`'s
    /// lock (share-locked until it ends), or `None` (rolled back) if it does
    /// not.
    async fn begin_fenced(
        &self,
        label: &Label,
        fence: &Fence,
        what: &str,
    ) -> Result<Option<Tx>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.error(what, e))?;
        let held = bind(sqlx::query(HOLDS), fence_args(label, fence)?)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.error(what, e))?
            .is_some();
        if held {
            return Ok(Some(tx));
        }
        tx.rollback().await.map_err(|e| self.error(what, e))?;
        Ok(None)
    }

    async fn run_in(
        &self,
        tx: &mut Tx,
        sql: &'static str,
        args: Vec<Arg>,
        what: &str,
    ) -> Result<(), StoreError> {
        bind(sqlx::query(sql), args)
            .execute(&mut **tx)
            .await
            .map_err(|e| self.error(what, e))?;
        Ok(())
    }
}

#[async_trait]
impl Backend for PostgresRunStore {
    type Pool = PgPool;

    const LOCKS: LockSql = LOCKS;
    const SELECT_STATUS: &'static str = super::backend::select_status!(
        "k.owner <> '' AND k.expires_at > now()",
        "r.snapshot -> 'verdict' ->> 'reason'"
    );
    const APPEND_LOG: &'static str =
        "UPDATE remote_jobs SET log_tail = right(log_tail || $3, 65536)
         WHERE job_key = $1 AND worker_id = $2 AND state IN ('assigned', 'cancelling')";

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn url(&self) -> &DbUrl {
        &self.url
    }

    fn now_args(&self) -> Vec<Arg> {
        Vec::new()
    }

    fn expiry_args(&self, ttl: Duration) -> Vec<Arg> {
        vec![Arg::Float(secs(ttl))]
    }

    /// Run snapshot (as of the last transition) + one journal line per
    /// transition (+ cursor) in one transaction opened by the fence check.
    async fn journal(
        &self,
        transitions: &[Transition],
        cursor: Option<&LabelCursor>,
        fence: &Fence,
    ) -> Result<bool, StoreError> {
        let Some(last) = transitions.last() else {
            return Ok(true);
        };
        let row = RunRow::of(last)?;
        let what = format!("journaling run {} seq {}", row.run_id, row.seq);
        let Some(mut tx) = self.begin_fenced(&last.label, fence, &what).await? else {
            return Ok(false);
        };
        let run = vec![
            Arg::text(row.run_id),
            Arg::text(row.cycle_id),
            Arg::text(row.label),
            Arg::text(row.stage),
            Arg::text(row.outcome),
            Arg::Bool(row.done),
            Arg::Time(row.started_at),
            Arg::Time(last.at),
            Arg::Json(row.snapshot),
        ];
        self.run_in(&mut tx, UPSERT_RUN, run, &what).await?;
        for transition in transitions {
            let seq = i64::try_from(transition.seq).map_err(|_| {
                StoreError::Conflict(format!("sequence number {} is too large", transition.seq))
            })?;
            let line = vec![
                Arg::text(transition.run_id.as_str()),
                Arg::Int(seq),
                Arg::Time(transition.at),
                Arg::text(transition.from.as_str()),
                Arg::text(transition.to.as_str()),
                Arg::Json(super::to_json(&transition.event, "the event")?),
                Arg::Json(super::to_json(&transition.actions, "the actions")?),
            ];
            self.run_in(&mut tx, INSERT_TRANSITION, line, &what).await?;
            if let Some(event) = transition.promotion_event() {
                let args = super::backend::promotion_args(&event);
                self.run_in(&mut tx, super::backend::INSERT_PROMOTION, args, &what)
                    .await?;
            }
        }
        if let Some(cursor) = cursor {
            let samples = cursor
                .consumed_num_samples
                .map(|n| u64_to_i64(n, "consumed_num_samples"))
                .transpose()?;
            let args = vec![
                Arg::text(row.label),
                Arg::OptTime(cursor.watermark),
                Arg::OptText(
                    cursor
                        .consumed_version
                        .as_ref()
                        .map(|v| VersionTag::as_str(v).to_owned()),
                ),
                Arg::OptInt(samples),
                Arg::Time(last.at),
                Arg::OptText(
                    cursor
                        .rejected_version
                        .as_ref()
                        .map(|v| VersionTag::as_str(v).to_owned()),
                ),
            ];
            self.run_in(&mut tx, UPSERT_CURSOR, args, &what).await?;
        }
        tx.commit().await.map_err(|e| self.error(&what, e))?;
        Ok(true)
    }

    async fn lease(&self, lease: &Lease, fence: &Fence) -> Result<bool, StoreError> {
        let what = format!("recording lease {}", lease.id);
        let Some(mut tx) = self.begin_fenced(&lease.label, fence, &what).await? else {
            return Ok(false);
        };
        self.run_in(&mut tx, UPSERT_LEASE, lease_args(lease)?, &what)
            .await?;
        tx.commit().await.map_err(|e| self.error(&what, e))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use retrain_core::domain::{LockOutcome, LockOwner};

    use super::*;
    use crate::store::locks;

    /// The share lock taken by the fence check makes a takeover of the label
    /// wait until the write transaction ends: the lock cannot change hands
    /// between the check and the commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_takeover_waits_for_the_fenced_write_in_flight() {
        let Some(url) = crate::testing::services::fresh_postgres_database().await else {
            return;
        };
        let url = DbUrl::parse("state", &url).unwrap();
        let store = std::sync::Arc::new(
            PostgresRunStore::open(url, StoreOptions::default())
                .await
                .unwrap(),
        );
        let dept = Label::new("dept").unwrap();
        let ttl = Duration::from_millis(500);
        let LockOutcome::Acquired { fence, .. } =
            locks::try_lock(store.as_ref(), &dept, &LockOwner("a".into()), ttl)
                .await
                .unwrap()
        else {
            panic!("a fresh label is free");
        };
        let tx = store
            .begin_fenced(&dept, &fence, "test")
            .await
            .unwrap()
            .expect("the fence holds");
        // The lock expires while the write is in flight; a takeover starts.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let takeover = tokio::spawn({
            let store = store.clone();
            let dept = dept.clone();
            async move {
                locks::try_lock(store.as_ref(), &dept, &LockOwner("b".into()), ttl)
                    .await
                    .unwrap()
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!takeover.is_finished(), "the takeover did not wait");
        tx.commit().await.unwrap();
        let LockOutcome::Acquired {
            fence: taken,
            taken_over_from,
        } = takeover.await.unwrap()
        else {
            panic!("the expired lock is free once the write committed");
        };
        assert_eq!(taken.token, fence.token + 1);
        assert_eq!(taken_over_from.as_deref(), Some("a"));
    }
}
