//! `RunStore` over Postgres: several orchestrators, possibly on different
//! machines, share one database. Lock expiry is computed and compared with
//! the database's `now()`, never with a client clock.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_core::domain::{
    Fence, Label, LabelCursor, Lease, LockOutcome, LockOwner, RunId, VersionTag,
};
use retrain_core::journal::{RunDetail, RunFilter, RunSummary, Transition, TransitionRecord};
use retrain_core::machine::LabelRun;
use retrain_core::ports::{RunStore, StoreError};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::types::Json;
use sqlx::Row;

use super::{
    decode_snapshot, i64_to_u64, parse_stage, prepare_schema, store_error, summary, to_json,
    u64_to_i64, RunRow, StoreOptions, POSTGRES_MIGRATIONS,
};
use crate::db::DbUrl;
use crate::AdapterError;

/// Connections per store: the engine writes one label at a time per task,
/// bounded by `max_parallel_labels`; more would only queue in Postgres.
const MAX_CONNECTIONS: u32 = 8;

/// The Postgres run store.
pub struct PostgresRunStore {
    pool: PgPool,
    url: DbUrl,
}

impl std::fmt::Debug for PostgresRunStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresRunStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn corrupt(e: sqlx::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// TTL in seconds for `make_interval(secs => …)`.
fn secs(ttl: Duration) -> f64 {
    super::ttl(ttl).num_milliseconds() as f64 / 1000.0
}

impl PostgresRunStore {
    pub(crate) async fn open(url: DbUrl, options: StoreOptions) -> Result<Self, AdapterError> {
        let pool = url
            .postgres_pool(super::KEY, MAX_CONNECTIONS, options.read_only)
            .await?;
        prepare_schema(POSTGRES_MIGRATIONS, &url, options, &pool).await?;
        Ok(Self { pool, url })
    }

    /// Close every connection (SQLite checkpoints its WAL on the last close).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn err(&self, what: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
        let what = what.to_owned();
        move |e| store_error(&self.url, &what, e)
    }

    /// Journal line + snapshot (+ cursor) in one transaction.
    async fn write(
        &self,
        transition: &Transition,
        cursor: Option<&LabelCursor>,
    ) -> Result<(), StoreError> {
        let row = RunRow::of(transition)?;
        let what = format!("journaling run {} seq {}", row.run_id, row.seq);
        let mut tx = self.pool.begin().await.map_err(self.err(&what))?;
        sqlx::query(
            "INSERT INTO runs (run_id, cycle_id, label, stage, outcome, done, started_at, updated_at, snapshot)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (run_id) DO UPDATE SET
                stage = excluded.stage, outcome = excluded.outcome, done = excluded.done,
                updated_at = excluded.updated_at, snapshot = excluded.snapshot",
        )
        .bind(row.run_id)
        .bind(row.cycle_id)
        .bind(row.label)
        .bind(row.stage)
        .bind(row.outcome)
        .bind(row.done)
        .bind(row.started_at)
        .bind(transition.at)
        .bind(Json(&row.snapshot))
        .execute(&mut *tx)
        .await
        .map_err(self.err(&what))?;
        sqlx::query(
            "INSERT INTO transitions (run_id, seq, at, from_stage, to_stage, event, actions)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(row.run_id)
        .bind(row.seq)
        .bind(transition.at)
        .bind(transition.from.as_str())
        .bind(transition.to.as_str())
        .bind(Json(&row.event))
        .bind(Json(&row.actions))
        .execute(&mut *tx)
        .await
        .map_err(self.err(&what))?;
        if let Some(cursor) = cursor {
            let samples = cursor
                .consumed_num_samples
                .map(|n| u64_to_i64(n, "consumed_num_samples"))
                .transpose()?;
            sqlx::query(
                "INSERT INTO cursors (label, watermark, consumed_version, consumed_num_samples, updated_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (label) DO UPDATE SET
                    watermark = excluded.watermark, consumed_version = excluded.consumed_version,
                    consumed_num_samples = excluded.consumed_num_samples, updated_at = excluded.updated_at",
            )
            .bind(row.label)
            .bind(cursor.watermark)
            .bind(cursor.consumed_version.as_ref().map(VersionTag::as_str))
            .bind(samples)
            .bind(transition.at)
            .execute(&mut *tx)
            .await
            .map_err(self.err(&what))?;
        }
        tx.commit().await.map_err(self.err(&what))
    }

    fn summary_of(row: &PgRow) -> Result<RunSummary, StoreError> {
        summary(
            row.try_get("run_id").map_err(corrupt)?,
            row.try_get("cycle_id").map_err(corrupt)?,
            &row.try_get::<String, _>("label").map_err(corrupt)?,
            &row.try_get::<String, _>("stage").map_err(corrupt)?,
            row.try_get("outcome").map_err(corrupt)?,
            row.try_get("started_at").map_err(corrupt)?,
            row.try_get("updated_at").map_err(corrupt)?,
        )
    }

    fn lease_of(row: &PgRow) -> Result<Lease, StoreError> {
        let id: String = row.try_get("id").map_err(corrupt)?;
        let field = |name: &str| format!("{name} of lease {id}");
        let label: String = row.try_get("label").map_err(corrupt)?;
        let Json(resources) = row
            .try_get::<Json<Vec<String>>, _>("resources")
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", field("resources"))))?;
        let Json(attributes) = row
            .try_get("attributes")
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", field("attributes"))))?;
        Ok(Lease {
            label: Label::new(label)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", field("label"))))?,
            run_id: RunId(row.try_get("run_id").map_err(corrupt)?),
            provider: row.try_get("provider").map_err(corrupt)?,
            resources,
            region: row.try_get("region").map_err(corrupt)?,
            acquired_at: row.try_get("acquired_at").map_err(corrupt)?,
            max_until: row.try_get("max_until").map_err(corrupt)?,
            attributes,
            released_at: row.try_get("released_at").map_err(corrupt)?,
            id,
        })
    }
}

#[async_trait]
impl RunStore for PostgresRunStore {
    async fn try_lock(
        &self,
        label: &Label,
        owner: &LockOwner,
        ttl: Duration,
    ) -> Result<LockOutcome, StoreError> {
        let what = format!("locking label {label}");
        // ON CONFLICT DO UPDATE is atomic in Postgres: concurrent callers
        // serialise on the row and re-check the WHERE on its latest version,
        // so exactly one of them can take an expired lock.
        for _ in 0..3 {
            let taken = sqlx::query(
                "INSERT INTO locks (label, owner, expires_at)
                 VALUES ($1, $2, now() + make_interval(secs => $3))
                 ON CONFLICT (label) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
                 WHERE locks.expires_at < now() OR locks.owner = excluded.owner",
            )
            .bind(label.as_str())
            .bind(&owner.0)
            .bind(secs(ttl))
            .execute(&self.pool)
            .await
            .map_err(self.err(&what))?
            .rows_affected();
            if taken == 1 {
                return Ok(LockOutcome::Acquired(Fence {
                    owner: owner.clone(),
                    token: 0,
                }));
            }
            let holder = sqlx::query("SELECT owner, expires_at FROM locks WHERE label = $1")
                .bind(label.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(self.err(&what))?;
            if let Some(row) = holder {
                return Ok(LockOutcome::Busy {
                    owner: row.try_get("owner").map_err(corrupt)?,
                    expires_at: row
                        .try_get::<DateTime<Utc>, _>("expires_at")
                        .map_err(corrupt)?,
                });
            }
        }
        Err(StoreError::Conflict(format!(
            "the lock of label {label} kept changing hands; try again"
        )))
    }

    async fn renew_lock(
        &self,
        label: &Label,
        fence: &Fence,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let owner = &fence.owner;
        let renewed = sqlx::query(
            "UPDATE locks SET expires_at = now() + make_interval(secs => $3)
             WHERE label = $1 AND owner = $2",
        )
        .bind(label.as_str())
        .bind(&owner.0)
        .bind(secs(ttl))
        .execute(&self.pool)
        .await
        .map_err(self.err(&format!("renewing the lock of label {label}")))?
        .rows_affected();
        Ok(renewed == 1)
    }

    async fn release_lock(&self, label: &Label, fence: &Fence) -> Result<(), StoreError> {
        let owner = &fence.owner;
        sqlx::query("DELETE FROM locks WHERE label = $1 AND owner = $2")
            .bind(label.as_str())
            .bind(&owner.0)
            .execute(&self.pool)
            .await
            .map_err(self.err(&format!("releasing the lock of label {label}")))?;
        Ok(())
    }

    async fn cursor(&self, label: &Label) -> Result<LabelCursor, StoreError> {
        let row = sqlx::query(
            "SELECT watermark, consumed_version, consumed_num_samples FROM cursors WHERE label = $1",
        )
        .bind(label.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(self.err(&format!("reading the cursor of label {label}")))?;
        let Some(row) = row else {
            return Ok(LabelCursor::default());
        };
        let samples: Option<i64> = row.try_get("consumed_num_samples").map_err(corrupt)?;
        Ok(LabelCursor {
            watermark: row.try_get("watermark").map_err(corrupt)?,
            consumed_version: row
                .try_get::<Option<String>, _>("consumed_version")
                .map_err(corrupt)?
                .map(VersionTag),
            consumed_num_samples: samples
                .map(|n| i64_to_u64(n, &format!("consumed_num_samples of label {label}")))
                .transpose()?,
        })
    }

    async fn unfinished_run(&self, label: &Label) -> Result<Option<LabelRun>, StoreError> {
        let row = sqlx::query(
            "SELECT run_id, snapshot FROM runs WHERE label = $1 AND NOT done
             ORDER BY started_at DESC, run_id DESC LIMIT 1",
        )
        .bind(label.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(self.err(&format!("reading the unfinished run of label {label}")))?;
        row.map(|row| {
            let run_id: String = row.try_get("run_id").map_err(corrupt)?;
            let Json(snapshot) = row
                .try_get::<Json<serde_json::Value>, _>("snapshot")
                .map_err(corrupt)?;
            decode_snapshot(&run_id, snapshot)
        })
        .transpose()
    }

    async fn record(&self, transition: &Transition, _fence: &Fence) -> Result<(), StoreError> {
        self.write(transition, None).await
    }

    async fn finish(
        &self,
        transition: &Transition,
        cursor: Option<LabelCursor>,
        _fence: &Fence,
    ) -> Result<(), StoreError> {
        self.write(transition, cursor.as_ref()).await
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT run_id, cycle_id, label, stage, outcome, started_at, updated_at FROM runs
             WHERE ($1::text IS NULL OR label = $1)
             ORDER BY started_at DESC, run_id DESC LIMIT $2",
        )
        .bind(filter.label.as_ref().map(Label::as_str))
        // LIMIT NULL is "no limit" in Postgres.
        .bind(filter.limit.map(i64::from))
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("listing runs"))?;
        rows.iter().map(Self::summary_of).collect()
    }

    async fn run(&self, run_id: &RunId) -> Result<Option<RunDetail>, StoreError> {
        let what = format!("reading run {run_id}");
        let Some(row) = sqlx::query(
            "SELECT run_id, cycle_id, label, stage, outcome, started_at, updated_at, snapshot
             FROM runs WHERE run_id = $1",
        )
        .bind(run_id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(self.err(&what))?
        else {
            return Ok(None);
        };
        let summary = Self::summary_of(&row)?;
        let Json(snapshot) = row
            .try_get::<Json<serde_json::Value>, _>("snapshot")
            .map_err(corrupt)?;
        let snapshot = decode_snapshot(run_id.as_str(), snapshot)?;
        let rows = sqlx::query(
            "SELECT seq, at, from_stage, to_stage, event, actions FROM transitions
             WHERE run_id = $1 ORDER BY seq",
        )
        .bind(run_id.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(self.err(&what))?;
        let id = run_id.as_str();
        let transitions = rows
            .iter()
            .map(|row| {
                let seq: i64 = row.try_get("seq").map_err(corrupt)?;
                let Json(event) = row.try_get("event").map_err(corrupt)?;
                let Json(actions) = row.try_get("actions").map_err(corrupt)?;
                Ok(TransitionRecord {
                    seq: i64_to_u64(seq, &format!("seq of run {id}"))?,
                    at: row.try_get("at").map_err(corrupt)?,
                    from: parse_stage(
                        &row.try_get::<String, _>("from_stage").map_err(corrupt)?,
                        id,
                    )?,
                    to: parse_stage(&row.try_get::<String, _>("to_stage").map_err(corrupt)?, id)?,
                    event,
                    actions,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(RunDetail {
            summary,
            snapshot,
            transitions,
        }))
    }

    async fn put_lease(&self, lease: &Lease, _fence: &Fence) -> Result<(), StoreError> {
        self.put_lease_unfenced(lease).await
    }

    async fn put_lease_unfenced(&self, lease: &Lease) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO leases (id, label, run_id, provider, resources, region, acquired_at, max_until, attributes, released_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (id) DO UPDATE SET
                label = excluded.label, run_id = excluded.run_id, provider = excluded.provider,
                resources = excluded.resources, region = excluded.region,
                acquired_at = excluded.acquired_at, max_until = excluded.max_until,
                attributes = excluded.attributes, released_at = excluded.released_at",
        )
        .bind(&lease.id)
        .bind(lease.label.as_str())
        .bind(lease.run_id.as_str())
        .bind(&lease.provider)
        .bind(Json(to_json(&lease.resources, "lease resources")?))
        .bind(lease.region.as_deref())
        .bind(lease.acquired_at)
        .bind(lease.max_until)
        .bind(Json(to_json(&lease.attributes, "lease attributes")?))
        .bind(lease.released_at)
        .execute(&self.pool)
        .await
        .map_err(self.err(&format!("recording lease {}", lease.id)))?;
        Ok(())
    }

    async fn active_leases(&self) -> Result<Vec<Lease>, StoreError> {
        let rows =
            sqlx::query("SELECT * FROM leases WHERE released_at IS NULL ORDER BY acquired_at, id")
                .fetch_all(&self.pool)
                .await
                .map_err(self.err("listing active leases"))?;
        rows.iter().map(Self::lease_of).collect()
    }

    async fn lock_holder(&self, label: &Label) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT owner FROM locks WHERE label = $1 AND expires_at > now()")
            .bind(label.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err(&format!("reading the lock of label {label}")))
    }
}
