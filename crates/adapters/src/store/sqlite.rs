//! The SQLite dialect of the run store: a file (WAL, busy timeout) that
//! several processes of one machine may share. Times are fixed-width RFC 3339
//! text compared with this machine's clock; JSON is text.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use retrain_core::domain::{Fence, LabelCursor, Lease, VersionTag};
use retrain_core::journal::{PromotionEvent, Transition};
use retrain_core::machine::{Action, Event};
use retrain_core::ports::StoreError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{Row, Sqlite};

use super::backend::{
    bind, fence_args, lease_args, Arg, Backend, Bind, LockSql, Query, Statements, StoreRow,
    WriteGate,
};
use super::group_commit::{CommitBatch, GroupCommit};
use super::{prepare_schema, u64_to_i64, RunRow, StoreOptions, SQLITE_MIGRATIONS};
use crate::db::DbUrl;
use crate::AdapterError;

/// The SQLite dialect.
pub(super) struct SqliteRunStore {
    pool: SqlitePool,
    url: DbUrl,
    /// Journal writes go through the group-commit writer task
    /// (`group_commit.rs`): labels running concurrently share commits
    /// instead of each paying a transaction (and SQLite's single-writer
    /// lock) of its own.
    journal: GroupCommit<JournalWrite>,
    /// Shared with the journal's writer task (see [`Backend::write_gate`]).
    write_gate: Arc<WriteGate>,
}

/// One queued journal write, encoded by the caller before it is queued
/// (serialising the run's ≈ 2 KiB snapshot happens on the labels' tasks,
/// in parallel, not on the writer task, which every write waits for).
struct JournalWrite {
    /// `$1..$20` of [`INSERT_JOURNAL_FENCED`]: the `journal_writes` row and
    /// the fence; "now" is bound at commit.
    args: Vec<Arg>,
    /// "journaling run … seq …", for its errors.
    what: String,
}

/// Applies a batch of journal writes in one SQLite transaction.
struct SqliteJournal {
    pool: SqlitePool,
    url: DbUrl,
    write_gate: Arc<WriteGate>,
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

impl Bind for Sqlite {
    fn bind(query: Query<'_, Self>, arg: Arg) -> Query<'_, Self> {
        match arg {
            Arg::Text(v) => query.bind(v),
            Arg::OptText(v) => query.bind(v),
            Arg::Int(v) => query.bind(v),
            Arg::OptInt(v) => query.bind(v),
            Arg::Float(v) => query.bind(v),
            Arg::Bool(v) => query.bind(v),
            Arg::Time(v) => query.bind(ts(v)),
            Arg::OptTime(v) => query.bind(v.map(ts)),
            Arg::Json(v) => query.bind(v.to_string()),
        }
    }

    fn rows_affected(result: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        result.rows_affected()
    }
}

impl StoreRow for SqliteRow {
    fn time(&self, column: &str, what: &str) -> Result<DateTime<Utc>, StoreError> {
        let raw: String = self.try_get(column).map_err(corrupt)?;
        parse_ts(&raw, what)
    }

    fn opt_time(&self, column: &str, what: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let raw: Option<String> = self.try_get(column).map_err(corrupt)?;
        raw.map(|raw| parse_ts(&raw, what)).transpose()
    }

    fn json<T: DeserializeOwned>(&self, column: &str) -> Result<T, String> {
        let raw: String = self.try_get(column).map_err(|e| e.to_string())?;
        serde_json::from_str(&raw).map_err(|e| e.to_string())
    }
}

fn corrupt(e: sqlx::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// Lock statements: `$1` label, then per statement (see [`LockSql`]); the
/// clock arguments come last (`now`, then the new expiry).
const LOCKS: LockSql = LockSql {
    // [label, owner, now, expiry]
    acquire: "INSERT INTO locks (label, owner, expires_at, token) VALUES ($1, $2, $4, 1)
              ON CONFLICT (label) DO UPDATE SET
                 previous_owner = locks.owner, owner = excluded.owner,
                 expires_at = excluded.expires_at, token = locks.token + 1
              WHERE locks.expires_at <= $3 OR locks.owner = excluded.owner
              RETURNING token, previous_owner",
    // [label, owner, dead owner, dead token, now, expiry]
    take: "UPDATE locks SET previous_owner = owner, owner = $2, expires_at = $6, token = token + 1
           WHERE label = $1 AND owner = $3 AND token = $4
           RETURNING token, previous_owner",
    // [label, now]
    row: "SELECT owner, token, expires_at, expires_at > $2 AS live FROM locks WHERE label = $1",
    // [label, owner, token, now, expiry]
    renew: "UPDATE locks SET expires_at = $5
            WHERE label = $1 AND owner = $2 AND token = $3 AND expires_at > $4",
    // [[{label, owner, token}…], now, expiry]
    renew_many: "UPDATE locks SET expires_at = $3
                 WHERE expires_at > $2 AND (label, owner, token) IN (
                     SELECT json_extract(value, '$.label'), json_extract(value, '$.owner'),
                            json_extract(value, '$.token')
                     FROM json_each($1))
                 RETURNING label, owner, token",
    // [label, owner, token, now]; the epoch sorts before every clock reading.
    release: "UPDATE locks SET owner = '', expires_at = '1970-01-01T00:00:00.000000Z'
              WHERE label = $1 AND owner = $2 AND token = $3 AND expires_at > $4",
};

/// The lease upsert applied only while the fence holds: `$1..$10` the lease,
/// `$11..$13` the fence (label, owner, token), `$14` now. One statement, so
/// the check and the write are atomic.
const UPSERT_LEASE_FENCED: &str =
    "INSERT INTO leases (id, label, run_id, provider, resources, region, acquired_at, max_until, attributes, released_at)
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10
     WHERE EXISTS (SELECT 1 FROM locks WHERE label = $11 AND owner = $12 AND token = $13 AND expires_at > $14)
     ON CONFLICT (id) DO UPDATE SET
        label = excluded.label, run_id = excluded.run_id, provider = excluded.provider,
        resources = excluded.resources, region = excluded.region,
        acquired_at = excluded.acquired_at, max_until = excluded.max_until,
        attributes = excluded.attributes, released_at = excluded.released_at";

/// One journal write: `$1..$17` the `journal_writes` row (see
/// [`write_one`]), `$18..$20` the fence (label, owner, token), `$21` now.
/// The `journal_writes_apply` trigger (migration 0016) applies it; no row is
/// inserted, so nothing is applied, unless the fence holds.
const INSERT_JOURNAL_FENCED: &str =
    "INSERT INTO journal_writes (run_id, cycle_id, label, stage, outcome, done, started_at, at,
                                snapshot, verdict, lines, promotions, has_cursor, watermark,
                                consumed_version, consumed_num_samples, rejected_version)
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17
     WHERE EXISTS (SELECT 1 FROM locks WHERE label = $18 AND owner = $19 AND token = $20 AND expires_at > $21)";

impl SqliteRunStore {
    pub(super) async fn open(url: DbUrl, options: StoreOptions) -> Result<Self, AdapterError> {
        let pool = url.sqlite_pool(super::KEY, options.read_only).await?;
        prepare_schema(SQLITE_MIGRATIONS, &url, options, &pool).await?;
        let write_gate = Arc::new(WriteGate::default());
        let journal = GroupCommit::spawn(SqliteJournal {
            pool: pool.clone(),
            url: url.clone(),
            write_gate: write_gate.clone(),
        });
        Ok(Self {
            pool,
            url,
            journal,
            write_gate,
        })
    }

    /// Close every connection (SQLite checkpoints its WAL on the last close).
    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait]
impl Backend for SqliteRunStore {
    type Pool = SqlitePool;

    const LOCKS: LockSql = LOCKS;
    const SELECT_STATUS: &'static str = super::backend::select_status!(
        "SELECT DISTINCT value AS label FROM json_each($1)",
        "k.owner <> '' AND k.expires_at > $2",
        "rowid",
        "json_group_array",
        "json_array",
        ")"
    );
    const APPEND_LOG: &'static str =
        "UPDATE remote_jobs SET log_tail = substr(log_tail || $3, -65536)
         WHERE job_key = $1 AND worker_id = $2 AND state IN ('assigned', 'cancelling')";

    fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn url(&self) -> &DbUrl {
        &self.url
    }

    fn now_args(&self) -> Vec<Arg> {
        vec![Arg::Time(Utc::now())]
    }

    fn write_gate(&self) -> Option<&WriteGate> {
        Some(&self.write_gate)
    }

    fn expiry_args(&self, ttl: Duration) -> Vec<Arg> {
        let now = Utc::now();
        vec![Arg::Time(now), Arg::Time(now + super::ttl(ttl))]
    }

    /// Queue the write for the writer task and wait until it is committed.
    async fn journal(
        &self,
        transitions: &[Transition],
        cursor: Option<&LabelCursor>,
        fence: &Fence,
    ) -> Result<bool, StoreError> {
        match JournalWrite::of(transitions, cursor, fence)? {
            Some(write) => self.journal.submit(write).await,
            None => Ok(true),
        }
    }

    async fn lease(&self, lease: &Lease, fence: &Fence) -> Result<bool, StoreError> {
        let mut args = lease_args(lease)?;
        args.extend(fence_args(&lease.label, fence)?);
        args.extend(self.now_args());
        let _turn = self.write_turn().await;
        let applied = self
            .pool
            .execute(UPSERT_LEASE_FENCED, args)
            .await
            .map_err(|e| self.error(&format!("recording lease {}", lease.id), e))?;
        Ok(applied == 1)
    }
}

#[async_trait]
impl CommitBatch for SqliteJournal {
    type Write = JournalWrite;

    /// Apply `batch` in one transaction; for each write, whether its fence
    /// held (and so whether it was applied).
    async fn commit(&self, batch: &[JournalWrite]) -> Result<Vec<bool>, StoreError> {
        let url = &self.url;
        let err = |what: &str| {
            let what = what.to_owned();
            move |e| super::store_error(url, &what, e)
        };
        let _turn = self.write_gate.lock().await;
        let mut tx = self.pool.begin().await.map_err(err("journaling"))?;
        let mut applied = Vec::with_capacity(batch.len());
        for write in batch {
            applied.push(write_one(&mut tx, url, write).await?);
        }
        tx.commit().await.map_err(err("committing the journal"))?;
        Ok(applied)
    }
}

/// One element of a write's `lines` array: a journal line as the
/// `journal_writes_apply` trigger reads it.
#[derive(Serialize)]
struct LineJson<'a> {
    seq: i64,
    at: String,
    from_stage: &'static str,
    to_stage: &'static str,
    event: &'a Event,
    actions: &'a [Action],
}

/// One element of a write's `promotions` array: the columns of
/// `promotions`, times as the store's fixed-width text.
#[derive(Serialize)]
struct PromotionJson<'a> {
    run_id: &'a str,
    label: &'a str,
    kind: &'static str,
    version: &'a str,
    previous_version: Option<&'a str>,
    candidate_run: Option<&'a str>,
    candidate_id: Option<&'a str>,
    verdict: Option<&'a str>,
    by_whom: &'a str,
    reason: Option<&'a str>,
    at: String,
}

impl<'a> PromotionJson<'a> {
    fn of(event: &'a PromotionEvent) -> Self {
        Self {
            run_id: event.run_id.as_str(),
            label: event.label.as_str(),
            kind: event.kind.as_str(),
            version: &event.version,
            previous_version: event.previous_version.as_deref(),
            candidate_run: event.candidate_run.as_ref().map(|r| r.as_str()),
            candidate_id: event.candidate_id.as_deref(),
            verdict: event.verdict.as_deref(),
            by_whom: &event.by,
            reason: event.reason.as_deref(),
            at: ts(event.at),
        }
    }
}

impl JournalWrite {
    /// The write's journal lines, the run's snapshot as of the last, its
    /// promotion events and the cursor as one `journal_writes` row (see
    /// migration 0016); `None` for no transitions (nothing to write).
    fn of(
        transitions: &[Transition],
        cursor: Option<&LabelCursor>,
        fence: &Fence,
    ) -> Result<Option<Self>, StoreError> {
        let Some(last) = transitions.last() else {
            return Ok(None);
        };
        let row = RunRow::of(last)?;
        let lines = transitions
            .iter()
            .map(|t| {
                Ok(LineJson {
                    seq: super::seq_of(t)?,
                    at: ts(t.at),
                    from_stage: t.from.as_str(),
                    to_stage: t.to.as_str(),
                    event: &t.event,
                    actions: &t.actions,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let events: Vec<PromotionEvent> = transitions
            .iter()
            .filter_map(Transition::promotion_event)
            .collect();
        let promotions = if events.is_empty() {
            None
        } else {
            let rows: Vec<_> = events.iter().map(PromotionJson::of).collect();
            Some(super::to_json_text(&rows, "the promotion events")?)
        };
        let samples = cursor
            .and_then(|c| c.consumed_num_samples)
            .map(|n| u64_to_i64(n, "consumed_num_samples"))
            .transpose()?;
        let version = |v: Option<&VersionTag>| v.map(|v| VersionTag::as_str(v).to_owned());
        let mut args = vec![
            Arg::text(row.run_id),
            Arg::text(row.cycle_id),
            Arg::text(row.label),
            Arg::text(row.stage),
            Arg::text(row.outcome),
            Arg::Bool(row.done),
            Arg::Time(row.started_at),
            Arg::Time(last.at),
            Arg::Text(row.snapshot),
            Arg::OptText(row.verdict.map(str::to_owned)),
            Arg::Text(super::to_json_text(&lines, "the journal lines")?),
            Arg::OptText(promotions),
            Arg::Bool(cursor.is_some()),
            Arg::OptTime(cursor.and_then(|c| c.watermark)),
            Arg::OptText(version(cursor.and_then(|c| c.consumed_version.as_ref()))),
            Arg::OptInt(samples),
            Arg::OptText(version(cursor.and_then(|c| c.rejected_version.as_ref()))),
        ];
        args.extend(fence_args(&last.label, fence)?);
        Ok(Some(Self {
            args,
            what: format!("journaling run {} seq {}", row.run_id, row.seq),
        }))
    }
}

/// One queued write in one statement into `journal_writes`, applied only
/// while the write's fence holds the label's lock (all or nothing: see
/// migration 0016).
async fn write_one(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    url: &DbUrl,
    write: &JournalWrite,
) -> Result<bool, StoreError> {
    let mut args = write.args.clone();
    args.push(Arg::Time(Utc::now()));
    let inserted = bind(sqlx::query(INSERT_JOURNAL_FENCED), args)
        .execute(&mut **tx)
        .await
        .map_err(|e| super::store_error(url, &write.what, e))?
        .rows_affected();
    Ok(inserted == 1)
}

#[cfg(test)]
mod tests {
    use super::super::backend::{
        SELECT_RUNS_OF_LABEL, SELECT_RUNS_PAGE_OF_LABEL, SELECT_UNFINISHED,
    };
    use super::*;

    /// The per-label reads the engine makes for every label of a cycle are
    /// index searches, never a scan of every label's runs (which made a
    /// cycle quadratic in its labels): `EXPLAIN QUERY PLAN` of each names
    /// no `SCAN` of `runs`.
    #[tokio::test]
    async fn reads_of_one_labels_runs_search_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let url = DbUrl::SqliteFile(dir.path().join("state.db"));
        let options = StoreOptions {
            migrate: true,
            read_only: false,
        };
        let store = SqliteRunStore::open(url, options).await.unwrap();
        for (name, sql) in [
            ("SELECT_RUNS_OF_LABEL", SELECT_RUNS_OF_LABEL),
            ("SELECT_RUNS_PAGE_OF_LABEL", SELECT_RUNS_PAGE_OF_LABEL),
            ("SELECT_UNFINISHED", SELECT_UNFINISHED),
        ] {
            let plan: Vec<String> = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
                .fetch_all(&store.pool)
                .await
                .unwrap()
                .iter()
                .map(|row| row.get::<String, _>("detail"))
                .collect();
            assert!(
                plan.iter()
                    .any(|step| step.starts_with("SEARCH runs USING")),
                "{name}: {plan:?}"
            );
            assert!(
                !plan.iter().any(|step| step.starts_with("SCAN")),
                "{name} scans: {plan:?}"
            );
        }
        store.close().await;
    }
}
