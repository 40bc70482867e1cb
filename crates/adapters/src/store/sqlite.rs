//! The SQLite dialect of the run store: a file (WAL, busy timeout) that
//! several processes of one machine may share. Times are fixed-width RFC 3339
//! text compared with this machine's clock; JSON is text.

use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use retrain_core::domain::{Fence, Label, LabelCursor, Lease, LockOwner, VersionTag};
use retrain_core::journal::{PromotionEvent, Transition};
use retrain_core::machine::{Action, Event};
use retrain_core::ports::StoreError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{Row, Sqlite};

use super::backend::{
    fence_args, lease_args, Arg, Backend, Bind, LockSql, Query, Statements, StoreRow, Taken,
};
use super::group_commit::{CommitBatch, GroupCommit, GROUP_COMMIT_MAX};
use super::locks::acquire_in_rounds;
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
    /// Lock acquisitions go through a writer task of their own, one
    /// statement per batch ([`acquire_batch`]): a cycle takes a lock per
    /// label, and each was a statement and a commit on the writer
    /// connection, which every journal write queues for too.
    acquisitions: GroupCommit<Acquisition, Option<Taken>>,
    /// One connection for this process's writes, shared with the journal's
    /// writer task (see [`Backend::writer`]); `pool` for an in-memory
    /// database (one connection in all).
    writer: SqlitePool,
}

/// One queued journal write, encoded by the caller before it is queued
/// (serialising the run's ≈ 2 KiB snapshot happens on the labels' tasks,
/// in parallel, not on the writer task, which every write waits for).
struct JournalWrite {
    /// The write's row of [`journal_batch`] but its batch key: the 19
    /// `journal_writes` columns, then the fence (label, owner, token).
    args: Vec<Arg>,
    /// "journaling run … seq …", for its errors.
    what: String,
}

/// One queued lock acquisition: its row of [`acquire_batch`] (label,
/// owner, expiry).
struct Acquisition {
    label: String,
    args: [Arg; ACQUIRE_VALUES],
}

/// Applies a batch of lock acquisitions in one SQLite statement per label
/// asked once.
struct SqliteLocks {
    /// The store's writer connection ([`Backend::writer`]).
    writer: SqlitePool,
    url: DbUrl,
}

/// Applies a batch of journal writes in one SQLite statement.
struct SqliteJournal {
    /// The store's writer connection ([`Backend::writer`]).
    writer: SqlitePool,
    url: DbUrl,
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

/// Values of one write in a [`journal_batch`] row: its batch key, the 19
/// `journal_writes` columns, its fence (label, owner, token).
const WRITE_VALUES: usize = 23;

/// Values of one acquisition in an [`acquire_batch`] row: label, owner,
/// expiry.
const ACQUIRE_VALUES: usize = 3;

/// The batch sizes a statement is prepared for. A batch is padded up to the
/// next with rows of `NULL`s (which no fence matches), so each connection
/// caches five statements rather than one per batch size.
const BATCH_SIZES: [usize; 5] = [1, 4, 16, 64, GROUP_COMMIT_MAX];

/// The statement of a batch of `rows` rows of `values` anonymous
/// parameters each, padded to the next of [`BATCH_SIZES`]: `render` makes
/// it from the `VALUES` rows; built once per size class in `cache`. The
/// statement, and the rows it takes.
fn padded_batch(
    cache: &'static [OnceLock<String>; BATCH_SIZES.len()],
    rows: usize,
    values: usize,
    render: impl FnOnce(&str) -> String,
) -> (&'static str, usize) {
    let class = BATCH_SIZES
        .iter()
        .position(|&size| size >= rows)
        .unwrap_or(BATCH_SIZES.len() - 1);
    let size = BATCH_SIZES[class];
    let sql = cache[class].get_or_init(|| {
        // Anonymous parameters: sqlx looks up each parameter's name to
        // place it, and SQLite finds a name by walking the list of named
        // ones, which is quadratic in a statement of thousands.
        let row = format!("({})", vec!["?"; values].join(", "));
        render(&vec![row; size].join(",\n                          "))
    });
    (sql, size)
}

/// `sql`, a [`padded_batch`] statement of `rows` rows of `values` values
/// and then now, with `args` (the values of its first rows, row after
/// row) bound, every other row `NULL`s, and now.
fn bind_padded(
    sql: &'static str,
    rows: usize,
    values: usize,
    args: impl IntoIterator<Item = Arg>,
) -> Query<'static, Sqlite> {
    let mut query = sqlx::query(sql);
    let mut bound = 0;
    for arg in args {
        query = <Sqlite as Bind>::bind(query, arg);
        bound += 1;
    }
    debug_assert!(
        bound % values == 0 && bound <= rows * values,
        "{bound} values for rows of {values}"
    );
    for _ in bound..rows * values {
        query = query.bind(None::<String>);
    }
    query.bind(ts(Utc::now()))
}

/// A batch of up to `rows` lock acquisitions (`Backend::acquire`) as one
/// statement (each row: label, owner, expiry; then now), and the rows it
/// takes: a free, expired or own lock is taken with `token + 1`, a first
/// insert is token 1, and `previous_owner` keeps the owner the row had. A
/// padding row (`NULL` label) inserts nothing. The statement answers the
/// lock of each label it took.
fn acquire_batch(rows: usize) -> (&'static str, usize) {
    static STATEMENTS: [OnceLock<String>; BATCH_SIZES.len()] =
        [const { OnceLock::new() }; BATCH_SIZES.len()];
    padded_batch(&STATEMENTS, rows, ACQUIRE_VALUES, |values| {
        format!(
            "INSERT INTO locks (label, owner, expires_at, token)
             SELECT column1, column2, column3, 1 FROM (VALUES {values})
             WHERE column1 IS NOT NULL
             ON CONFLICT (label) DO UPDATE SET
                previous_owner = locks.owner, owner = excluded.owner,
                expires_at = excluded.expires_at, token = locks.token + 1
             WHERE locks.expires_at <= ? OR locks.owner = excluded.owner
             RETURNING label, token, previous_owner"
        )
    })
}

/// A batch of up to `rows` journal writes as one statement, and the rows it
/// takes: [`WRITE_VALUES`] values per row, then now. A write's row is
/// inserted, and so applied by the `journal_writes_apply` trigger (migration
/// 0016), only while its fence holds the label's lock; the statement answers
/// the batch key of each write applied (migration 0017). One statement is
/// atomic: a write breaking a constraint fails the batch (and the group
/// commit then retries its writes one by one).
fn journal_batch(rows: usize) -> (&'static str, usize) {
    static STATEMENTS: [OnceLock<String>; BATCH_SIZES.len()] =
        [const { OnceLock::new() }; BATCH_SIZES.len()];
    padded_batch(&STATEMENTS, rows, WRITE_VALUES, |values| {
        format!(
            "INSERT INTO journal_writes (batch_key, run_id, cycle_id, label, stage, outcome, done,
                                        started_at, at, snapshot, verdict, lines, promotions,
                                        has_cursor, watermark, consumed_version,
                                        consumed_num_samples, rejected_version,
                                        unlock_owner, unlock_token)
             SELECT column1, column2, column3, column4, column5, column6, column7, column8,
                    column9, column10, column11, column12, column13, column14, column15,
                    column16, column17, column18, column19, column20
             FROM (VALUES {values})
             WHERE EXISTS (SELECT 1 FROM locks WHERE label = column21 AND owner = column22
                                                 AND token = column23 AND expires_at > ?)
             RETURNING batch_key"
        )
    })
}

impl SqliteRunStore {
    pub(super) async fn open(url: DbUrl, options: StoreOptions) -> Result<Self, AdapterError> {
        let pool = url.sqlite_pool(super::KEY, options.read_only).await?;
        prepare_schema(SQLITE_MIGRATIONS, &url, options, &pool).await?;
        let writer = url
            .sqlite_writer(super::KEY, options.read_only, &pool)
            .await?;
        let journal = GroupCommit::spawn(SqliteJournal {
            writer: writer.clone(),
            url: url.clone(),
        });
        let acquisitions = GroupCommit::spawn(SqliteLocks {
            writer: writer.clone(),
            url: url.clone(),
        });
        Ok(Self {
            pool,
            url,
            journal,
            acquisitions,
            writer,
        })
    }

    /// Close every connection (SQLite checkpoints its WAL on the last close).
    pub(super) async fn close(&self) {
        self.writer.close().await;
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
        "w.stage = 'awaiting_approval'",
        "rowid",
        "json_group_array",
        "json_array",
        ")"
    );
    const SELECT_SNAPSHOTS: &'static str = "SELECT run_id, snapshot FROM runs
         WHERE run_id IN (SELECT value FROM json_each($1))";
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

    fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    /// Queued for the acquisitions' writer task (see [`acquire_batch`]).
    async fn acquire(
        &self,
        label: &Label,
        owner: &LockOwner,
        ttl: Duration,
    ) -> Result<Option<Taken>, StoreError> {
        let expiry = Utc::now() + super::ttl(ttl);
        self.acquisitions
            .submit(Acquisition {
                label: label.as_str().to_owned(),
                args: [Arg::text(label), Arg::text(owner), Arg::Time(expiry)],
            })
            .await
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
        unlock: bool,
    ) -> Result<bool, StoreError> {
        match JournalWrite::of(transitions, cursor, fence, unlock)? {
            Some(write) => self.journal.submit(write).await,
            None => Ok(true),
        }
    }

    async fn lease(&self, lease: &Lease, fence: &Fence) -> Result<bool, StoreError> {
        let mut args = lease_args(lease)?;
        args.extend(fence_args(&lease.label, fence)?);
        args.extend(self.now_args());
        let applied = self
            .writer
            .execute(UPSERT_LEASE_FENCED, args)
            .await
            .map_err(|e| self.error(&format!("recording lease {}", lease.id), e))?;
        Ok(applied == 1)
    }
}

#[async_trait]
impl CommitBatch for SqliteLocks {
    type Write = Acquisition;
    type Outcome = Option<Taken>;

    /// One statement per round ([`acquire_in_rounds`]). Each round
    /// commits on its own: if a later one fails, the writer task asks
    /// every acquisition of the batch again alone, and one that an earlier
    /// round took is taken again by the same owner (a new token, which is
    /// the one its caller gets).
    async fn commit(&self, batch: &[Acquisition]) -> Result<Vec<Option<Taken>>, StoreError> {
        let labels = batch.iter().map(|a| a.label.as_str());
        acquire_in_rounds(labels, |asked: Vec<usize>, what: String| async move {
            // A batch is at most `GROUP_COMMIT_MAX` writes, the largest
            // statement (`BATCH_SIZES`).
            let (sql, rows) = acquire_batch(asked.len());
            let args = asked.iter().flat_map(|&i| batch[i].args.iter().cloned());
            bind_padded(sql, rows, ACQUIRE_VALUES, args)
                .fetch_all(&self.writer)
                .await
                .map_err(|e| super::store_error(&self.url, &what, e))
        })
        .await
    }
}

#[async_trait]
impl CommitBatch for SqliteJournal {
    type Write = JournalWrite;
    type Outcome = bool;

    /// Apply `batch` (at most [`GROUP_COMMIT_MAX`] writes, as the writer
    /// task takes them) in one statement; for each write, whether its
    /// fence held (and so whether it was applied).
    async fn commit(&self, batch: &[JournalWrite]) -> Result<Vec<bool>, StoreError> {
        if batch.len() > GROUP_COMMIT_MAX {
            return Err(StoreError::Conflict(format!(
                "a journal batch of {} writes is more than one statement takes ({GROUP_COMMIT_MAX})",
                batch.len()
            )));
        }
        let keys = batch_query(batch)
            .fetch_all(&self.writer)
            .await
            .map_err(|e| {
                let what = match batch {
                    [one] => one.what.clone(),
                    _ => format!("journaling a batch of {} writes", batch.len()),
                };
                super::store_error(&self.url, &what, e)
            })?;
        let mut applied = vec![false; batch.len()];
        for row in keys {
            let key: Option<i64> = row.try_get(0).map_err(corrupt)?;
            let index = key
                .and_then(|k| usize::try_from(k).ok())
                .filter(|&k| k < applied.len())
                .ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "the journal batch statement answered batch key {key:?} for {} writes",
                        applied.len()
                    ))
                })?;
            applied[index] = true;
        }
        Ok(applied)
    }
}

/// [`journal_batch`] for `batch` with every value bound: each write's row
/// with its index in `batch` as its key, padding rows all `NULL`.
fn batch_query(batch: &[JournalWrite]) -> Query<'static, Sqlite> {
    let (sql, rows) = journal_batch(batch.len());
    let args = (0_i64..)
        .zip(batch)
        .flat_map(|(key, write)| std::iter::once(Arg::Int(key)).chain(write.args.iter().cloned()));
    bind_padded(sql, rows, WRITE_VALUES, args)
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
        unlock: bool,
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
        // The fence whose lock the write releases (migration 0018), or none.
        let fence_values = fence_args(&last.label, fence)?;
        if unlock {
            args.extend(fence_values[1..].iter().cloned());
        } else {
            args.extend([Arg::OptText(None), Arg::OptInt(None)]);
        }
        args.extend(fence_values);
        debug_assert_eq!(
            args.len() + 1,
            WRITE_VALUES,
            "a batch row is the key and these"
        );
        Ok(Some(Self {
            args,
            what: format!("journaling run {} seq {}", row.run_id, row.seq),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::backend::{
        SELECT_LABEL_START, SELECT_RUNS_OF_LABEL, SELECT_RUNS_PAGE_OF_LABEL,
        SELECT_RUNS_WITH_VERDICT, SELECT_UNFINISHED,
    };
    use super::*;

    /// The steps of `EXPLAIN QUERY PLAN sql`.
    async fn query_plan(pool: &SqlitePool, sql: &str) -> Vec<String> {
        sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<String, _>("detail"))
            .collect()
    }

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
            ("SELECT_RUNS_WITH_VERDICT", SELECT_RUNS_WITH_VERDICT),
        ] {
            let plan = query_plan(&store.pool, sql).await;
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
        // Phase one's read of every label: the unfinished run and the
        // cursor by their indexes (the one-row subquery's own `SCAN` aside).
        let plan = query_plan(&store.pool, SELECT_LABEL_START).await;
        for table in ["runs", "cursors"] {
            assert!(
                plan.iter()
                    .any(|step| step.starts_with(&format!("SEARCH {table} USING"))),
                "SELECT_LABEL_START: {plan:?}"
            );
            assert!(
                !plan
                    .iter()
                    .any(|step| step.starts_with(&format!("SCAN {table}"))),
                "SELECT_LABEL_START scans {table}: {plan:?}"
            );
        }
        store.close().await;
    }

    /// A batch is padded up to one of five sizes (five cached statements),
    /// and its parameters are anonymous: sqlx looks each parameter's name
    /// up, which SQLite answers by walking the list of named ones, so a
    /// 64-write statement with numbered parameters (1,345 of them) spent a
    /// third of the cycle's CPU in `sqlite3_bind_parameter_name`.
    #[test]
    fn journal_batches_take_five_statements_of_anonymous_parameters() {
        for (batch, values) in [
            (
                journal_batch as fn(usize) -> (&'static str, usize),
                WRITE_VALUES,
            ),
            (acquire_batch, 3),
        ] {
            for (writes, rows) in [
                (1, 1),
                (2, 4),
                (4, 4),
                (5, 16),
                (17, 64),
                (65, 256),
                (256, 256),
            ] {
                let (sql, padded) = batch(writes);
                assert_eq!(padded, rows, "{writes} writes");
                assert_eq!(
                    sql.matches('?').count(),
                    rows * values + 1,
                    "{writes} writes"
                );
                assert!(
                    !sql.contains('$') && !sql.contains(":") && !sql.contains('@'),
                    "named parameters in {sql}"
                );
                let (again, _) = batch(writes);
                assert!(
                    std::ptr::eq(sql, again),
                    "the statement is built once per size"
                );
            }
        }
        assert_eq!(*BATCH_SIZES.last().unwrap(), GROUP_COMMIT_MAX);
    }

    /// Writes go through a connection of their own: with every reader
    /// connection of the pool held (64 labels reading), a lock is still
    /// taken and released at once instead of waiting for a reader.
    #[tokio::test]
    async fn writes_do_not_wait_for_a_readers_connection() {
        let dir = tempfile::tempdir().unwrap();
        let url = DbUrl::SqliteFile(dir.path().join("state.db"));
        let store = SqliteRunStore::open(
            url,
            StoreOptions {
                migrate: true,
                read_only: false,
            },
        )
        .await
        .unwrap();
        let mut readers = Vec::new();
        while let Some(reader) = store.pool.try_acquire() {
            readers.push(reader);
        }
        while readers.len() < crate::db::SQLITE_POOL_CONNECTIONS as usize {
            readers.push(store.pool.acquire().await.unwrap());
        }
        let label = retrain_core::domain::Label::new("dept").unwrap();
        let owner = retrain_core::domain::LockOwner("test".into());
        let locked = tokio::time::timeout(
            Duration::from_secs(5),
            super::super::locks::try_lock(&store, &label, &owner, Duration::from_secs(60)),
        )
        .await
        .expect("the lock write waited for a reader's connection")
        .unwrap();
        let retrain_core::domain::LockOutcome::Acquired { fence, .. } = locked else {
            panic!("{locked:?}");
        };
        tokio::time::timeout(
            Duration::from_secs(5),
            super::super::locks::release(&store, &label, &fence),
        )
        .await
        .expect("the release waited for a reader's connection")
        .unwrap();
        drop(readers);
        store.close().await;
    }

    /// More writes than one statement takes are refused before the
    /// database is asked (the writer task never takes that many).
    #[tokio::test]
    async fn a_journal_batch_above_the_bound_is_refused() {
        let pool = DbUrl::SqliteMemory
            .sqlite_pool("state", false)
            .await
            .unwrap();
        let journal = SqliteJournal {
            writer: pool,
            url: DbUrl::SqliteMemory,
        };
        let batch: Vec<JournalWrite> = (0..=GROUP_COMMIT_MAX)
            .map(|n| JournalWrite {
                args: Vec::new(),
                what: format!("write {n}"),
            })
            .collect();
        let err = journal.commit(&batch).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Conflict(m) if m.contains("257 writes")),
            "{err:?}"
        );
    }
}
