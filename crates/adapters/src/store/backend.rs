//! What a SQL dialect supplies to the one `RunStore` implementation
//! ([`super::SqlRunStore`]): how to bind values and run a statement, how to
//! read timestamps and JSON back, the clock arguments of lock statements,
//! its lock SQL, and its two fenced writes (journal, lease), which differ in
//! shape (a single conditional statement on SQLite, a `FOR SHARE`
//! transaction on Postgres). Everything else (the shared SQL, decoding rows,
//! the lock rules in `locks.rs`) is written once.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_core::domain::{CycleId, Fence, Label, LabelCursor, Lease, LockOwner, RunId};
use retrain_core::journal::{
    JournalEntry, PromotionEvent, PromotionKind, RunSummary, Transition, TransitionRecord,
};
use retrain_core::ports::StoreError;
use serde::de::DeserializeOwned;

use super::{i64_to_u64, parse_stage, summary};
use crate::db::DbUrl;

/// A value bound to a statement. Each dialect maps times and JSON to its
/// own column types (RFC 3339 text and JSON text on SQLite, `TIMESTAMPTZ`
/// and `JSONB` or `json` on Postgres: the run snapshot and the journal
/// lines are `json` since migration 0016).
#[derive(Debug, Clone)]
pub(super) enum Arg {
    Text(String),
    OptText(Option<String>),
    Int(i64),
    OptInt(Option<i64>),
    Float(f64),
    Bool(bool),
    Time(DateTime<Utc>),
    OptTime(Option<DateTime<Utc>>),
    Json(serde_json::Value),
}

impl Arg {
    pub(super) fn text(value: impl std::fmt::Display) -> Self {
        Self::Text(value.to_string())
    }
}

/// The lock statements of a dialect (see `locks.rs` for the rules and the
/// arguments each one takes).
pub(super) struct LockSql {
    /// Take the lock from one dead holder (`owner` and `token` as read):
    /// `RETURNING token, previous_owner`, no row when it changed hands meanwhile.
    pub(super) take: &'static str,
    /// `owner, token, expires_at, live` of the label's lock row.
    pub(super) row: &'static str,
    /// Extend the expiry of exactly this (label, owner, token), if unexpired.
    pub(super) renew: &'static str,
    /// [`LockSql::renew`] for many locks in one statement: `$1` a JSON array
    /// of `{"label", "owner", "token"}`, then the expiry arguments;
    /// `RETURNING label, owner, token` of every lock extended.
    pub(super) renew_many: &'static str,
    /// Mark exactly this (label, owner, token), if unexpired, released:
    /// owner `''`, expiry in the past. The row (and its token) stays.
    pub(super) release: &'static str,
}

/// How a dialect binds [`Arg`]s (the one thing its statements do
/// differently).
pub(super) trait Bind: sqlx::Database {
    fn bind(query: Query<'_, Self>, arg: Arg) -> Query<'_, Self>;

    fn rows_affected(result: &Self::QueryResult) -> u64;
}

pub(super) type Query<'q, DB> = sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>;

/// Running one statement with [`Arg`]s on a pool: written once for every
/// dialect's pool.
pub(super) trait Statements: Send + Sync {
    type Row: StoreRow + Send;

    fn fetch_optional(
        &self,
        sql: &'static str,
        args: Vec<Arg>,
    ) -> impl Future<Output = Result<Option<Self::Row>, sqlx::Error>> + Send;

    fn fetch_all(
        &self,
        sql: &'static str,
        args: Vec<Arg>,
    ) -> impl Future<Output = Result<Vec<Self::Row>, sqlx::Error>> + Send;

    /// Rows affected.
    fn execute(
        &self,
        sql: &'static str,
        args: Vec<Arg>,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;

    /// Run `statements` in order in one transaction (all or nothing); the
    /// rows each one returned.
    fn transaction(
        &self,
        statements: Vec<(&'static str, Vec<Arg>)>,
    ) -> impl Future<Output = Result<Vec<Vec<Self::Row>>, sqlx::Error>> + Send;
}

/// `args` bound in order (`$1`, `$2`, …).
pub(super) fn bind<DB: Bind>(query: Query<'_, DB>, args: Vec<Arg>) -> Query<'_, DB> {
    args.into_iter().fold(query, DB::bind)
}

impl<DB> Statements for sqlx::Pool<DB>
where
    DB: Bind,
    DB::Row: StoreRow,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
{
    type Row = DB::Row;

    async fn fetch_optional(
        &self,
        sql: &'static str,
        args: Vec<Arg>,
    ) -> Result<Option<DB::Row>, sqlx::Error> {
        bind(sqlx::query(sql), args).fetch_optional(self).await
    }

    async fn fetch_all(
        &self,
        sql: &'static str,
        args: Vec<Arg>,
    ) -> Result<Vec<DB::Row>, sqlx::Error> {
        bind(sqlx::query(sql), args).fetch_all(self).await
    }

    async fn execute(&self, sql: &'static str, args: Vec<Arg>) -> Result<u64, sqlx::Error> {
        let result = bind(sqlx::query(sql), args).execute(self).await?;
        Ok(DB::rows_affected(&result))
    }

    async fn transaction(
        &self,
        statements: Vec<(&'static str, Vec<Arg>)>,
    ) -> Result<Vec<Vec<DB::Row>>, sqlx::Error> {
        let mut tx = self.begin().await?;
        let mut rows = Vec::with_capacity(statements.len());
        for (sql, args) in statements {
            rows.push(bind(sqlx::query(sql), args).fetch_all(&mut *tx).await?);
        }
        tx.commit().await?;
        Ok(rows)
    }
}

/// A lock as an acquisition took it: its new token and the owner the row
/// had before (`''`: released or new).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Taken {
    pub(super) token: i64,
    pub(super) previous_owner: String,
}

impl Taken {
    /// From a row answering `RETURNING token, previous_owner`.
    pub(super) fn of(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(Self {
            token: row.int("token")?,
            previous_owner: row.text("previous_owner")?,
        })
    }
}

/// A dialect: SQLite or Postgres.
#[async_trait]
pub(super) trait Backend: Send + Sync + 'static {
    type Pool: Statements;

    const LOCKS: LockSql;
    /// [`select_status`] in this dialect (arguments: the labels as a JSON
    /// array, then [`Backend::now_args`]).
    const SELECT_STATUS: &'static str;
    /// The `run_id` and `snapshot` of the runs whose ids are in the JSON
    /// array `$1` (`RunStore::run_snapshots`).
    const SELECT_SNAPSHOTS: &'static str;
    /// Append `$3` to the log tail of job `$1` held by worker `$2`, keeping
    /// its last 65,536 characters (see `jobs.rs`).
    const APPEND_LOG: &'static str;

    fn pool(&self) -> &Self::Pool;

    fn url(&self) -> &DbUrl;

    /// Arguments appended to a lock statement that compares with "now":
    /// the client's clock on SQLite, none on Postgres (`now()` in the SQL).
    fn now_args(&self) -> Vec<Arg>;

    /// Arguments appended to a lock statement that also sets an expiry
    /// `ttl` from now: `[now, now + ttl]` on SQLite, `[ttl seconds]` on
    /// Postgres.
    fn expiry_args(&self, ttl: Duration) -> Vec<Arg>;

    /// Journal `transitions` (consecutive ones of one run, oldest first: a
    /// journal line each, the run's snapshot as of the last) and the cursor,
    /// and with `unlock` release the label's lock, all in one atomic write,
    /// if `fence` holds the label's lock, checked atomically with the write;
    /// `false`: nothing written.
    async fn journal(
        &self,
        transitions: &[Transition],
        cursor: Option<&LabelCursor>,
        fence: &Fence,
        unlock: bool,
    ) -> Result<bool, StoreError>;

    /// Upsert `lease` if `fence` holds its label's lock (atomically);
    /// `false`: nothing written.
    async fn lease(&self, lease: &Lease, fence: &Fence) -> Result<bool, StoreError>;

    /// Take `label`'s lock for `owner` if it is free, expired or its own,
    /// with `token + 1` (a first insert is token 1): the lock as taken (its
    /// token and the owner the row had before: see `locks::acquired`), or
    /// `None` (someone else's unexpired lock). Each dialect queues it for a
    /// writer task that takes every queued acquisition in one statement per
    /// round (`locks::acquire_in_rounds`).
    async fn acquire(
        &self,
        label: &Label,
        owner: &LockOwner,
        ttl: Duration,
    ) -> Result<Option<Taken>, StoreError>;

    /// A driver error of `what`, secret-free.
    fn error(&self, what: &str, error: sqlx::Error) -> StoreError {
        super::store_error(self.url(), what, error)
    }

    /// The pool this process's writes (locks, leases, the journal) go
    /// through. SQLite takes one writer at a time, so its store writes
    /// through a pool of one connection of its own: writers queue for that
    /// connection (one wake-up each) instead of meeting SQLite's busy
    /// handler (sleeps of 1, 2, 5, 10… ms while the lock may be free for
    /// most of them), and never wait for a connection a reader holds while
    /// the others wait behind them. Writers of other processes still meet
    /// the busy handler. Postgres takes concurrent writers: its one pool.
    fn writer(&self) -> &Self::Pool {
        self.pool()
    }
}

/// Plain columns (text, integers, flags): decoded the same way on both
/// dialects, so implemented once for every row type that can.
pub(super) trait Columns {
    fn text(&self, column: &str) -> Result<String, StoreError>;
    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, column: &str) -> Result<i64, StoreError>;
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError>;
    fn flag(&self, column: &str) -> Result<bool, StoreError>;
}

impl<R> Columns for R
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn text(&self, column: &str) -> Result<String, StoreError> {
        self.try_get(column).map_err(|e| corrupt_column(column, e))
    }
    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError> {
        self.try_get(column).map_err(|e| corrupt_column(column, e))
    }
    fn int(&self, column: &str) -> Result<i64, StoreError> {
        self.try_get(column).map_err(|e| corrupt_column(column, e))
    }
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
        self.try_get(column).map_err(|e| corrupt_column(column, e))
    }
    fn flag(&self, column: &str) -> Result<bool, StoreError> {
        self.try_get(column).map_err(|e| corrupt_column(column, e))
    }
}

pub(super) fn corrupt_column(column: &str, error: sqlx::Error) -> StoreError {
    StoreError::Corrupt(format!("column {column}: {error}"))
}

/// Reading a result row: timestamps and JSON are dialect-specific.
pub(super) trait StoreRow: Columns {
    /// A timestamp column; `what` names it in the error.
    fn time(&self, column: &str, what: &str) -> Result<DateTime<Utc>, StoreError>;

    fn opt_time(&self, column: &str, what: &str) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// A JSON column decoded as `T`; the error is the decoder's message.
    fn json<T: DeserializeOwned>(&self, column: &str) -> Result<T, String>;
}

// ---- Shared SQL (`$N` placeholders work on both dialects) ----

pub(super) const SELECT_CURSOR: &str =
    "SELECT watermark, consumed_version, consumed_num_samples, rejected_version FROM cursors WHERE label = $1";

/// Every cursor (one row per label ever committed: as small as the label
/// list, whatever the run history).
pub(super) const SELECT_CURSORS: &str =
    "SELECT label, watermark, consumed_version, consumed_num_samples, rejected_version FROM cursors";

/// The unfinished run of label `$1` (its `run_id` and `snapshot`), the one
/// text of [`SELECT_UNFINISHED`] and [`SELECT_LABEL_START`].
/// `done = FALSE` (not `NOT done`) so both dialects use the
/// `(label, done, started_at)` index however long a label's history.
macro_rules! unfinished_of_label {
    () => {
        "SELECT run_id, snapshot FROM runs
         WHERE label = $1 AND done = FALSE AND stage <> 'awaiting_approval'
         ORDER BY started_at DESC, run_id DESC LIMIT 1"
    };
}

pub(super) const SELECT_UNFINISHED: &str = unfinished_of_label!();

/// `RunStore::label_start` in one statement: the row of [`SELECT_UNFINISHED`]
/// (`part = 'run'`), then the label's cursor row (`part = 'cursor'`), each
/// if it exists. The `NULL`s of a part take the other part's column types.
pub(super) const SELECT_LABEL_START: &str = concat!(
    "SELECT 'run' AS part, run_id, snapshot,
            NULL AS watermark, NULL AS consumed_version, NULL AS consumed_num_samples,
            NULL AS rejected_version
     FROM (",
    unfinished_of_label!(),
    ") AS unfinished
     UNION ALL
     SELECT 'cursor', NULL, NULL,
            watermark, consumed_version, consumed_num_samples, rejected_version
     FROM cursors WHERE label = $1"
);

/// Newest first. `$1`: `i64::MAX` for "no limit" (SQLite and Postgres
/// disagree on the spelling of "no limit", not on a large one).
pub(super) const SELECT_RUNS: &str =
    "SELECT run_id, cycle_id, label, stage, outcome, started_at, updated_at FROM runs
     ORDER BY started_at DESC, run_id DESC LIMIT $1";

/// [`SELECT_RUNS`] of label `$1` (limit `$2`). A statement of its own, not
/// `($1 IS NULL OR label = $1)`: with that disjunction neither planner
/// reads the label's runs by the `(label, started_at DESC, run_id DESC)`
/// index, and SQLite scanned every run of every label, for each label (the
/// engine lists a label's runs for its metrics history at every verdict:
/// quadratic in the labels).
pub(super) const SELECT_RUNS_OF_LABEL: &str =
    "SELECT run_id, cycle_id, label, stage, outcome, started_at, updated_at FROM runs
     WHERE label = $1
     ORDER BY started_at DESC, run_id DESC LIMIT $2";

/// The runs of label `$1` that have a verdict (the `verdict` column is the
/// verdict's reason, set exactly when the snapshot has one: migrations
/// 0015/0016), newest first, at most `$2`: read by the label's
/// `runs_newest_by_label` index until the limit, one statement for a
/// report's metrics history instead of a listing and a read per run.
pub(super) const SELECT_RUNS_WITH_VERDICT: &str = "SELECT run_id, started_at, snapshot FROM runs
     WHERE label = $1 AND verdict IS NOT NULL
     ORDER BY started_at DESC, run_id DESC LIMIT $2";

/// `GET /v1/runs`: a keyset page after run `$2` (compared as the row value
/// (started_at, run_id) read from the store itself, so no timestamp is
/// re-encoded); `$1` matches the outcome or the stage. The label filter is
/// [`SELECT_RUNS_PAGE_OF_LABEL`].
pub(super) const SELECT_RUNS_PAGE: &str =
    "SELECT run_id, cycle_id, label, stage, outcome, started_at, updated_at FROM runs
     WHERE (CAST($1 AS TEXT) IS NULL OR outcome = $1 OR stage = $1)
       AND (CAST($2 AS TEXT) IS NULL
            OR (started_at, run_id) < (SELECT a.started_at, a.run_id FROM runs a WHERE a.run_id = $2))
     ORDER BY started_at DESC, run_id DESC LIMIT $3";

/// [`SELECT_RUNS_PAGE`] of label `$4` (read by its index, as
/// [`SELECT_RUNS_OF_LABEL`]).
pub(super) const SELECT_RUNS_PAGE_OF_LABEL: &str =
    "SELECT run_id, cycle_id, label, stage, outcome, started_at, updated_at FROM runs
     WHERE label = $4
       AND (CAST($1 AS TEXT) IS NULL OR outcome = $1 OR stage = $1)
       AND (CAST($2 AS TEXT) IS NULL
            OR (started_at, run_id) < (SELECT a.started_at, a.run_id FROM runs a WHERE a.run_id = $2))
     ORDER BY started_at DESC, run_id DESC LIMIT $3";

/// The status of the labels asked for (`$1`, a JSON array of names) in one
/// statement: cursor, newest run (with its verdict reason), live lock, the
/// runs awaiting approval (newest first, comma-joined: run ids hold no
/// comma), the production version (the newest promotion event, promotion or
/// rollback). A dialect supplies how the names are read from `$1`, how a
/// lock is live (`$2` = now on SQLite), the predicate of
/// `runs_awaiting_approval` (on Postgres a generated column, so that a
/// stage change does not touch that index: migration 0018), the column
/// that identifies a row (SQLite: `rowid`, which its indexes carry, so the
/// newest run and promotion are found by a covering index probe and read
/// by one table seek), and its JSON functions: the statement answers **one
/// row**, a JSON array of one array per label (the fields in the order of
/// [`StatusJson`](super::StatusJson)), because sqlx hands each result row
/// from its SQLite worker thread to the caller on its own (a copy of every
/// column, a wake-up), which cost more than the statement itself at 1,000
/// labels. The statement is driven by the labels asked for: each one's
/// newest run, waiting runs and newest promotion are index probes
/// (`runs_newest_by_label`, `runs_awaiting_approval`,
/// `promotions_newest_by_label`), so its cost does not grow with the run
/// history (a window over every run did: `docs/BENCHMARKS.md`).
macro_rules! select_status {
    ($labels:literal, $live:literal, $awaiting:literal, $row:literal, $aggregate:literal, $array:literal, $aggregated:literal) => {
        concat!(
            "WITH labels AS (",
            $labels,
            "),
             status AS (
             SELECT labels.label AS label,
                    c.watermark, c.consumed_version, c.consumed_num_samples, c.rejected_version,
                    r.run_id, r.cycle_id, r.stage, r.outcome, r.started_at, r.updated_at,
                    r.verdict,
                    CASE WHEN ",
            $live,
            " THEN k.owner END AS live_owner,
                    (SELECT string_agg(w.run_id, ',' ORDER BY w.started_at DESC, w.run_id DESC)
                     FROM runs w
                     WHERE w.label = labels.label AND ",
            $awaiting,
            ") AS awaiting,
                    p.version AS production_version, p.at AS production_since
             FROM labels
             LEFT JOIN cursors c ON c.label = labels.label
             LEFT JOIN runs r ON r.",
            $row,
            " = (
                 SELECT n.",
            $row,
            " FROM runs n WHERE n.label = labels.label
                 ORDER BY n.started_at DESC, n.run_id DESC LIMIT 1)
             LEFT JOIN locks k ON k.label = labels.label
             LEFT JOIN promotions p ON p.",
            $row,
            " = (
                 SELECT q.",
            $row,
            " FROM promotions q WHERE q.label = labels.label
                 ORDER BY q.at DESC, q.run_id DESC LIMIT 1))
             SELECT ",
            $aggregate,
            "(",
            $array,
            "(
                 label, watermark, consumed_version, consumed_num_samples, rejected_version,
                 run_id, cycle_id, stage, outcome, started_at, updated_at, verdict,
                 live_owner, awaiting, production_version, production_since
             )",
            $aggregated,
            " AS statuses
             FROM status"
        )
    };
}
pub(super) use select_status;

pub(super) const SELECT_PROMOTIONS: &str =
    "SELECT run_id, label, kind, version, previous_version, candidate_run, candidate_id,
            verdict, by_whom, reason, at
     FROM promotions WHERE label = $1 ORDER BY at, run_id";

pub(super) fn promotion_of<R: StoreRow>(row: &R) -> Result<PromotionEvent, StoreError> {
    let run_id = row.text("run_id")?;
    let field = |name: &str| format!("{name} of promotion event {run_id}");
    let kind = row.text("kind")?;
    Ok(PromotionEvent {
        label: Label::new(row.text("label")?)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", field("label"))))?,
        kind: PromotionKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("{}: {kind:?}", field("kind"))))?,
        version: row.text("version")?,
        previous_version: row.opt_text("previous_version")?,
        candidate_run: row.opt_text("candidate_run")?.map(RunId),
        candidate_id: row.opt_text("candidate_id")?,
        verdict: row.opt_text("verdict")?,
        by: row.text("by_whom")?,
        reason: row.opt_text("reason")?,
        at: row.time("at", &field("time"))?,
        run_id: RunId(run_id),
    })
}

pub(super) const SELECT_RUN: &str =
    "SELECT run_id, cycle_id, label, stage, outcome, started_at, updated_at, snapshot
     FROM runs WHERE run_id = $1";

pub(super) const SELECT_TRANSITIONS: &str =
    "SELECT seq, at, from_stage, to_stage, event, actions FROM transitions
     WHERE run_id = $1 ORDER BY seq";

/// `$1` the position to read after, `$2` an optional label, `$3` the limit.
pub(super) const SELECT_JOURNAL_AFTER: &str =
    "SELECT t.position, t.run_id, r.cycle_id, r.label, t.seq, t.at, t.from_stage, t.to_stage, t.event
     FROM transitions t JOIN runs r ON r.run_id = t.run_id
     WHERE t.position > $1 AND (CAST($2 AS TEXT) IS NULL OR r.label = $2)
     ORDER BY t.position LIMIT $3";

/// The last position of the journal's counter: journal lines and worker
/// events share it (migrations sqlite `0013` / postgres `0012`).
pub(super) const SELECT_JOURNAL_END: &str = "SELECT COALESCE(MAX(position), 0) AS position FROM (
        SELECT MAX(position) AS position FROM transitions
        UNION ALL SELECT MAX(position) FROM worker_events) ends";

/// `$1` key, `$2` fingerprint, `$3` now; one row affected: claimed.
pub(super) const CLAIM_REQUEST: &str =
    "INSERT INTO idempotency_keys (key, fingerprint, response, created_at)
     VALUES ($1, $2, NULL, $3) ON CONFLICT (key) DO NOTHING";

pub(super) const SELECT_REQUEST: &str =
    "SELECT fingerprint, response FROM idempotency_keys WHERE key = $1";

pub(super) const COMPLETE_REQUEST: &str =
    "UPDATE idempotency_keys SET response = $2 WHERE key = $1";

/// Only a claim still unanswered is released: a stored response stays.
pub(super) const RELEASE_REQUEST: &str =
    "DELETE FROM idempotency_keys WHERE key = $1 AND response IS NULL";

/// A journal line with its position (see [`SELECT_JOURNAL_AFTER`]).
pub(super) fn journal_entry_of<R: StoreRow>(row: &R) -> Result<JournalEntry, StoreError> {
    let run_id = RunId(row.text("run_id")?);
    let id = run_id.as_str().to_owned();
    let seq = row.int("seq")?;
    Ok(JournalEntry {
        position: i64_to_u64(
            row.int("position")?,
            &format!("position of run {id} seq {seq}"),
        )?,
        cycle_id: CycleId(row.text("cycle_id")?),
        label: super::parse_label(&row.text("label")?, &id)?,
        seq: i64_to_u64(seq, &format!("seq of run {id}"))?,
        at: row.time("at", &format!("time of run {id} seq {seq}"))?,
        from: parse_stage(&row.text("from_stage")?, &id)?,
        to: parse_stage(&row.text("to_stage")?, &id)?,
        event: json_column(row, "event", &format!("event of run {id}"))?,
        run_id,
    })
}

pub(super) const SELECT_ACTIVE_LEASES: &str =
    "SELECT * FROM leases WHERE released_at IS NULL ORDER BY acquired_at, id";

/// The lease upsert, `$1..$10` as bound by [`lease_args`].
pub(super) const UPSERT_LEASE: &str =
    "INSERT INTO leases (id, label, run_id, provider, resources, region, acquired_at, max_until, attributes, released_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
     ON CONFLICT (id) DO UPDATE SET
        label = excluded.label, run_id = excluded.run_id, provider = excluded.provider,
        resources = excluded.resources, region = excluded.region,
        acquired_at = excluded.acquired_at, max_until = excluded.max_until,
        attributes = excluded.attributes, released_at = excluded.released_at";

/// `$1..$10` of a lease write.
pub(super) fn lease_args(lease: &Lease) -> Result<Vec<Arg>, StoreError> {
    Ok(vec![
        Arg::text(&lease.id),
        Arg::text(&lease.label),
        Arg::text(&lease.run_id),
        Arg::text(&lease.provider),
        Arg::Json(super::to_json(&lease.resources, "lease resources")?),
        Arg::OptText(lease.region.clone()),
        Arg::Time(lease.acquired_at),
        Arg::Time(lease.max_until),
        Arg::Json(super::to_json(&lease.attributes, "lease attributes")?),
        Arg::OptTime(lease.released_at),
    ])
}

/// `(label, owner, token)` of a fence, the arguments of every lock check.
pub(super) fn fence_args(label: &Label, fence: &Fence) -> Result<Vec<Arg>, StoreError> {
    Ok(vec![
        Arg::text(label),
        Arg::text(&fence.owner),
        Arg::Int(super::u64_to_i64(fence.token, "fencing token")?),
    ])
}

// ---- Shared decoding ----

pub(super) fn cursor_of<R: StoreRow>(row: &R, label: &Label) -> Result<LabelCursor, StoreError> {
    let samples = row.opt_int("consumed_num_samples")?;
    Ok(LabelCursor {
        watermark: row.opt_time("watermark", &format!("watermark of label {label}"))?,
        consumed_version: row
            .opt_text("consumed_version")?
            .map(retrain_core::domain::VersionTag),
        consumed_num_samples: samples
            .map(|n| i64_to_u64(n, &format!("consumed_num_samples of label {label}")))
            .transpose()?,
        rejected_version: row
            .opt_text("rejected_version")?
            .map(retrain_core::domain::VersionTag),
    })
}

pub(super) fn snapshot_of<R: StoreRow>(
    row: &R,
) -> Result<retrain_core::machine::LabelRun, StoreError> {
    let run_id = row.text("run_id")?;
    json_column(row, "snapshot", &format!("snapshot of run {run_id}"))
}

/// A row of [`SELECT_RUNS_WITH_VERDICT`]: the run's start as stored, and
/// its snapshot.
pub(super) fn started_run_of<R: StoreRow>(
    row: &R,
) -> Result<(DateTime<Utc>, retrain_core::machine::LabelRun), StoreError> {
    let run_id = row.text("run_id")?;
    let at = row.time("started_at", &format!("started_at of run {run_id}"))?;
    Ok((at, snapshot_of(row)?))
}

pub(super) fn summary_of<R: StoreRow>(row: &R) -> Result<RunSummary, StoreError> {
    let run_id = row.text("run_id")?;
    let started = row.time("started_at", &format!("started_at of run {run_id}"))?;
    let updated = row.time("updated_at", &format!("updated_at of run {run_id}"))?;
    summary(
        run_id,
        row.text("cycle_id")?,
        &row.text("label")?,
        &row.text("stage")?,
        row.text("outcome")?,
        started,
        updated,
    )
}

pub(super) fn transition_of<R: StoreRow>(
    row: &R,
    run_id: &RunId,
) -> Result<TransitionRecord, StoreError> {
    let id = run_id.as_str();
    let seq = row.int("seq")?;
    Ok(TransitionRecord {
        seq: i64_to_u64(seq, &format!("seq of run {id}"))?,
        at: row.time("at", &format!("time of run {id} seq {seq}"))?,
        from: parse_stage(&row.text("from_stage")?, id)?,
        to: parse_stage(&row.text("to_stage")?, id)?,
        event: json_column(row, "event", &format!("event of run {id}"))?,
        actions: json_column(row, "actions", &format!("actions of run {id}"))?,
    })
}

pub(super) fn lease_of<R: StoreRow>(row: &R) -> Result<Lease, StoreError> {
    let id = row.text("id")?;
    let field = |name: &str| format!("{name} of lease {id}");
    Ok(Lease {
        label: Label::new(row.text("label")?)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", field("label"))))?,
        run_id: RunId(row.text("run_id")?),
        provider: row.text("provider")?,
        resources: json_column(row, "resources", &field("resources"))?,
        region: row.opt_text("region")?,
        acquired_at: row.time("acquired_at", &field("acquired_at"))?,
        max_until: row.time("max_until", &field("max_until"))?,
        attributes: json_column(row, "attributes", &field("attributes"))?,
        released_at: row.opt_time("released_at", &field("released_at"))?,
        id,
    })
}

/// A JSON column as `T`; `what` names it in the error.
fn json_column<R: StoreRow, T: DeserializeOwned>(
    row: &R,
    column: &str,
    what: &str,
) -> Result<T, StoreError> {
    row.json(column)
        .map_err(|e| StoreError::Corrupt(format!("{what} cannot be read: {e}")))
}
