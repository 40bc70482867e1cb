//! `RunStore` over a SQLite file (WAL, busy timeout: several processes of
//! one machine may share it).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use retrain_core::domain::{
    Fence, Label, LabelCursor, Lease, LockOutcome, LockOwner, RunId, VersionTag,
};
use retrain_core::journal::{RunDetail, RunFilter, RunSummary, Transition, TransitionRecord};
use retrain_core::machine::LabelRun;
use retrain_core::ports::{RunStore, StoreError};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::Row;

use super::{
    decode_snapshot_text, i64_to_u64, json_text, parse_stage, prepare_schema, store_error, summary,
    to_json, u64_to_i64, RunRow, StoreOptions, SQLITE_MIGRATIONS,
};
use crate::db::DbUrl;
use crate::AdapterError;

/// The SQLite run store.
pub struct SqliteRunStore {
    pool: SqlitePool,
    url: DbUrl,
    /// Journal writes go through one writer task that commits whatever is
    /// queued in a single transaction (group commit). Each caller still
    /// awaits its own acknowledgement, so "persisted before acting" holds;
    /// labels running concurrently share commits instead of each paying a
    /// transaction (and SQLite's single-writer lock) of its own.
    journal: tokio::sync::mpsc::UnboundedSender<JournalWrite>,
}

/// One queued journal write and where to send its outcome.
struct JournalWrite {
    transition: Transition,
    cursor: Option<LabelCursor>,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// Most writes committed in one transaction.
const GROUP_COMMIT_MAX: usize = 256;

impl std::fmt::Debug for SqliteRunStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteRunStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Fixed-width UTC text: text order is time order, which the lock expiry
/// comparison and the listings rely on.
fn ts(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_ts(raw: &str, what: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| StoreError::Corrupt(format!("{what} is not an RFC 3339 timestamp: {raw:?}")))
}

impl SqliteRunStore {
    pub(crate) async fn open(url: DbUrl, options: StoreOptions) -> Result<Self, AdapterError> {
        let pool = url.sqlite_pool(super::KEY, options.read_only).await?;
        prepare_schema(SQLITE_MIGRATIONS, &url, options, &pool).await?;
        let (journal, queue) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(journal_writer(pool.clone(), url.clone(), queue));
        Ok(Self { pool, url, journal })
    }

    /// Close every connection (SQLite checkpoints its WAL on the last close).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn err(&self, what: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
        let what = what.to_owned();
        move |e| store_error(&self.url, &what, e)
    }

    /// Queue a journal write and wait until it is committed.
    async fn write(
        &self,
        transition: &Transition,
        cursor: Option<&LabelCursor>,
    ) -> Result<(), StoreError> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let write = JournalWrite {
            transition: transition.clone(),
            cursor: cursor.cloned(),
            done,
        };
        let closed = || StoreError::Unavailable("the run store's journal writer stopped".into());
        self.journal.send(write).map_err(|_| closed())?;
        outcome.await.map_err(|_| closed())?
    }
}

/// Commit queued journal writes in batches until every sender is gone.
async fn journal_writer(
    pool: SqlitePool,
    url: DbUrl,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<JournalWrite>,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT_MAX {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        match commit_batch(&pool, &url, &batch).await {
            Ok(()) => {
                for write in batch {
                    let _ = write.done.send(Ok(()));
                }
            }
            // One bad write must not fail the others: retry them one by one.
            Err(_) if batch.len() > 1 => {
                for write in batch {
                    let result = commit_batch(&pool, &url, std::slice::from_ref(&write)).await;
                    let _ = write.done.send(result);
                }
            }
            Err(error) => {
                for write in batch {
                    let _ = write.done.send(Err(error.clone()));
                }
            }
        }
    }
}

async fn commit_batch(
    pool: &SqlitePool,
    url: &DbUrl,
    batch: &[JournalWrite],
) -> Result<(), StoreError> {
    let err = |what: &str| {
        let what = what.to_owned();
        move |e| store_error(url, &what, e)
    };
    let mut tx = pool.begin().await.map_err(err("journaling"))?;
    for write in batch {
        write_one(&mut tx, url, &write.transition, write.cursor.as_ref()).await?;
    }
    tx.commit().await.map_err(err("committing the journal"))
}

/// Journal line + snapshot (+ cursor) inside `tx`.
async fn write_one(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    url: &DbUrl,
    transition: &Transition,
    cursor: Option<&LabelCursor>,
) -> Result<(), StoreError> {
    let row = RunRow::of(transition)?;
    let what = format!("journaling run {} seq {}", row.run_id, row.seq);
    let err = |e| store_error(url, &what, e);
    let at = ts(transition.at);
    // One statement: the `journal_inbox` trigger (migration 0002) upserts
    // the run snapshot and appends the journal line atomically.
    sqlx::query(
        "INSERT INTO journal_inbox (run_id, cycle_id, label, stage, outcome, done, started_at, at,
                                    snapshot, seq, from_stage, to_stage, event, actions)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )
    .bind(row.run_id)
    .bind(row.cycle_id)
    .bind(row.label)
    .bind(row.stage)
    .bind(row.outcome)
    .bind(row.done)
    .bind(ts(row.started_at))
    .bind(&at)
    .bind(row.snapshot.to_string())
    .bind(row.seq)
    .bind(transition.from.as_str())
    .bind(transition.to.as_str())
    .bind(row.event.to_string())
    .bind(row.actions.to_string())
    .execute(&mut **tx)
    .await
    .map_err(err)?;
    if let Some(cursor) = cursor {
        let samples = cursor
            .consumed_num_samples
            .map(|n| u64_to_i64(n, "consumed_num_samples"))
            .transpose()?;
        sqlx::query(
                "INSERT INTO cursors (label, watermark, consumed_version, consumed_num_samples, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (label) DO UPDATE SET
                    watermark = excluded.watermark, consumed_version = excluded.consumed_version,
                    consumed_num_samples = excluded.consumed_num_samples, updated_at = excluded.updated_at",
            )
            .bind(row.label)
            .bind(cursor.watermark.map(ts))
            .bind(cursor.consumed_version.as_ref().map(VersionTag::as_str))
            .bind(samples)
            .bind(&at)
            .execute(&mut **tx)
            .await
            .map_err(err)?;
    }
    Ok(())
}

impl SqliteRunStore {
    fn summary_of(row: &SqliteRow) -> Result<RunSummary, StoreError> {
        let run_id: String = row.try_get("run_id").map_err(corrupt)?;
        let started: String = row.try_get("started_at").map_err(corrupt)?;
        let updated: String = row.try_get("updated_at").map_err(corrupt)?;
        summary(
            run_id.clone(),
            row.try_get("cycle_id").map_err(corrupt)?,
            &row.try_get::<String, _>("label").map_err(corrupt)?,
            &row.try_get::<String, _>("stage").map_err(corrupt)?,
            row.try_get("outcome").map_err(corrupt)?,
            parse_ts(&started, &format!("started_at of run {run_id}"))?,
            parse_ts(&updated, &format!("updated_at of run {run_id}"))?,
        )
    }

    fn lease_of(row: &SqliteRow) -> Result<Lease, StoreError> {
        let id: String = row.try_get("id").map_err(corrupt)?;
        let field = |name: &str| format!("{name} of lease {id}");
        let text =
            |name: &str| -> Result<String, StoreError> { row.try_get(name).map_err(corrupt) };
        let released: Option<String> = row.try_get("released_at").map_err(corrupt)?;
        Ok(Lease {
            label: Label::new(text("label")?)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", field("label"))))?,
            run_id: RunId(text("run_id")?),
            provider: text("provider")?,
            resources: serde_json::from_str(&text("resources")?)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", field("resources"))))?,
            region: row.try_get("region").map_err(corrupt)?,
            acquired_at: parse_ts(&text("acquired_at")?, &field("acquired_at"))?,
            max_until: parse_ts(&text("max_until")?, &field("max_until"))?,
            attributes: serde_json::from_str(&text("attributes")?)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", field("attributes"))))?,
            released_at: released
                .map(|r| parse_ts(&r, &field("released_at")))
                .transpose()?,
            id,
        })
    }
}

fn corrupt(e: sqlx::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

#[async_trait]
impl RunStore for SqliteRunStore {
    async fn try_lock(
        &self,
        label: &Label,
        owner: &LockOwner,
        ttl: Duration,
    ) -> Result<LockOutcome, StoreError> {
        let what = format!("locking label {label}");
        // The row may vanish between a refused upsert and the read of its
        // holder (released meanwhile): then simply try again.
        for _ in 0..3 {
            let now = Utc::now();
            let taken = sqlx::query(
                "INSERT INTO locks (label, owner, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (label) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
                 WHERE locks.expires_at < ?4 OR locks.owner = excluded.owner",
            )
            .bind(label.as_str())
            .bind(&owner.0)
            .bind(ts(now + super::ttl(ttl)))
            .bind(ts(now))
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
            let holder = sqlx::query("SELECT owner, expires_at FROM locks WHERE label = ?1")
                .bind(label.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(self.err(&what))?;
            if let Some(row) = holder {
                let expires: String = row.try_get("expires_at").map_err(corrupt)?;
                return Ok(LockOutcome::Busy {
                    owner: row.try_get("owner").map_err(corrupt)?,
                    expires_at: parse_ts(&expires, &format!("expiry of the lock of {label}"))?,
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
        let renewed =
            sqlx::query("UPDATE locks SET expires_at = ?3 WHERE label = ?1 AND owner = ?2")
                .bind(label.as_str())
                .bind(&owner.0)
                .bind(ts(Utc::now() + super::ttl(ttl)))
                .execute(&self.pool)
                .await
                .map_err(self.err(&format!("renewing the lock of label {label}")))?
                .rows_affected();
        Ok(renewed == 1)
    }

    async fn release_lock(&self, label: &Label, fence: &Fence) -> Result<(), StoreError> {
        let owner = &fence.owner;
        sqlx::query("DELETE FROM locks WHERE label = ?1 AND owner = ?2")
            .bind(label.as_str())
            .bind(&owner.0)
            .execute(&self.pool)
            .await
            .map_err(self.err(&format!("releasing the lock of label {label}")))?;
        Ok(())
    }

    async fn cursor(&self, label: &Label) -> Result<LabelCursor, StoreError> {
        let row = sqlx::query(
            "SELECT watermark, consumed_version, consumed_num_samples FROM cursors WHERE label = ?1",
        )
        .bind(label.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(self.err(&format!("reading the cursor of label {label}")))?;
        let Some(row) = row else {
            return Ok(LabelCursor::default());
        };
        let watermark: Option<String> = row.try_get("watermark").map_err(corrupt)?;
        let samples: Option<i64> = row.try_get("consumed_num_samples").map_err(corrupt)?;
        Ok(LabelCursor {
            watermark: watermark
                .map(|w| parse_ts(&w, &format!("watermark of label {label}")))
                .transpose()?,
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
            "SELECT run_id, snapshot FROM runs WHERE label = ?1 AND done = 0
             ORDER BY started_at DESC, run_id DESC LIMIT 1",
        )
        .bind(label.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(self.err(&format!("reading the unfinished run of label {label}")))?;
        row.map(|row| {
            let run_id: String = row.try_get("run_id").map_err(corrupt)?;
            let snapshot: String = row.try_get("snapshot").map_err(corrupt)?;
            decode_snapshot_text(&run_id, &snapshot)
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
             WHERE (?1 IS NULL OR label = ?1)
             ORDER BY started_at DESC, run_id DESC LIMIT ?2",
        )
        .bind(filter.label.as_ref().map(Label::as_str))
        // A negative LIMIT means "no limit" in SQLite.
        .bind(filter.limit.map_or(-1, i64::from))
        .fetch_all(&self.pool)
        .await
        .map_err(self.err("listing runs"))?;
        rows.iter().map(Self::summary_of).collect()
    }

    async fn run(&self, run_id: &RunId) -> Result<Option<RunDetail>, StoreError> {
        let what = format!("reading run {run_id}");
        let Some(row) = sqlx::query(
            "SELECT run_id, cycle_id, label, stage, outcome, started_at, updated_at, snapshot
             FROM runs WHERE run_id = ?1",
        )
        .bind(run_id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(self.err(&what))?
        else {
            return Ok(None);
        };
        let summary = Self::summary_of(&row)?;
        let snapshot: String = row.try_get("snapshot").map_err(corrupt)?;
        let snapshot = decode_snapshot_text(run_id.as_str(), &snapshot)?;
        let rows = sqlx::query(
            "SELECT seq, at, from_stage, to_stage, event, actions FROM transitions
             WHERE run_id = ?1 ORDER BY seq",
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
                let at: String = row.try_get("at").map_err(corrupt)?;
                Ok(TransitionRecord {
                    seq: i64_to_u64(seq, &format!("seq of run {id}"))?,
                    at: parse_ts(&at, &format!("time of run {id} seq {seq}"))?,
                    from: parse_stage(
                        &row.try_get::<String, _>("from_stage").map_err(corrupt)?,
                        id,
                    )?,
                    to: parse_stage(&row.try_get::<String, _>("to_stage").map_err(corrupt)?, id)?,
                    event: json_text(
                        &row.try_get::<String, _>("event").map_err(corrupt)?,
                        "event",
                        id,
                    )?,
                    actions: json_text(
                        &row.try_get::<String, _>("actions").map_err(corrupt)?,
                        "actions",
                        id,
                    )?,
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
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
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
        .bind(to_json(&lease.resources, "lease resources")?.to_string())
        .bind(lease.region.as_deref())
        .bind(ts(lease.acquired_at))
        .bind(ts(lease.max_until))
        .bind(to_json(&lease.attributes, "lease attributes")?.to_string())
        .bind(lease.released_at.map(ts))
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
        sqlx::query_scalar("SELECT owner FROM locks WHERE label = ?1 AND expires_at > ?2")
            .bind(label.as_str())
            .bind(ts(Utc::now()))
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err(&format!("reading the lock of label {label}")))
    }
}
