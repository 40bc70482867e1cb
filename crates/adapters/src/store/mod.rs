//! `RunStore` over SQLite (the embedded default) and Postgres (shared by
//! orchestrators on several machines).
//!
//! One implementation, [`SqlRunStore`], holds the rules; a dialect
//! ([`backend::Backend`]: `sqlite.rs`, `postgres.rs`) supplies its SQL, how
//! values and rows map to its column types, and its two fenced writes. Both
//! keep the same five tables (runs, transitions, cursors, locks, leases; see
//! `migrations/`) and the same semantics:
//! - `record` appends the journal line and upserts the run's snapshot
//!   atomically; `finish` does the same plus the cursor update;
//! - a label lock is a row (owner, expires_at, token) taken with an upsert
//!   that only overwrites an expired or released lock or one of the same
//!   owner, so a crashed holder frees the label after its TTL (at once for a
//!   contender on its host, which can tell the process is gone). Every
//!   acquisition increments the row's fencing token, and every write of a run
//!   applies only while its (owner, token) still holds the lock: see
//!   `locks.rs`. SQLite compares with this machine's clock (a SQLite file is
//!   shared by processes of one machine); Postgres compares with the
//!   database's `now()` so machines with skewed clocks still agree.
//!
//! Postgres advisory locks were considered and rejected: they belong to a
//! session, so they would die with a pooled connection and could not express
//! "held until expiry" for a holder that crashed mid-run.

mod artifacts;
mod backend;
mod deliveries;
mod group_commit;
mod jobs;
mod locks;
mod pending_gates;
mod postgres;
mod sqlite;
mod watch;

use std::borrow::Cow;
use std::sync::Arc;

use futures::future::BoxFuture;
use retrain_core::domain::{
    Fence, Label, LabelCursor, Lease, LockOutcome, LockOwner, RunId, VersionTag,
};
use retrain_core::journal::{
    JournalEntry, LabelStart, LabelStatusRow, ProductionRecord, PromotionEvent, RequestClaim,
    RunDetail, RunFilter, RunPage, RunSummary, Transition,
};
use retrain_core::machine::{LabelRun, Stage};
use retrain_core::ports::{RunStore, StoreError};
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

use crate::db::DbUrl;
use crate::AdapterError;

use backend::{
    cursor_of, lease_args, lease_of, snapshot_of, started_run_of, summary_of, transition_of, Arg,
    Backend, Columns, Statements,
};
use postgres::PostgresRunStore;
use sqlite::SqliteRunStore;
pub use watch::{JournalWaker, JournalWatch};

pub use artifacts::{ArtifactLog, ArtifactRecord};
pub use deliveries::{Delivery, DeliveryLog, DeliveryQuery, NewDelivery, Recorded};
pub use jobs::{
    format_size, log_tail, new_worker_id, JobQueue, JobReport, JobState, Lease as JobLease, NewJob,
    NewWorker, RemoteJob, RemoteJobSpec, Reported, ResourceRequest, Resources, StaleSweep, Worker,
    WorkerEvent, WorkerState, LOG_TAIL_BYTES, WORKER_EVENT_TYPES,
};
pub use pending_gates::{PendingGate, PendingGates};

/// The config key the store URL comes from (named in errors).
const KEY: &str = "state";

/// How a run store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Apply pending migrations on open (off: `retrain migrate` does it, and
    /// open fails if the schema is behind).
    pub migrate: bool,
    /// Open for reading only (`plan`, `status`, `runs`): nothing is created,
    /// migrated or written, not even the migrations table; a database that
    /// was never initialised is `AdapterError::NotInitialised`.
    pub read_only: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            migrate: true,
            read_only: false,
        }
    }
}

/// Open the run store at `url` (`sqlite://PATH`, `sqlite::memory:`,
/// `postgres://…`, `postgresql://…`, `postgresql+psycopg2://…`).
pub async fn open_run_store(
    url: &str,
    options: StoreOptions,
) -> Result<Arc<dyn RunStore>, AdapterError> {
    Ok(open_stores(url, options).await?.runs)
}

/// The run store, the server's delivery log, pending gates, the remote
/// job queue and artifact records, over one pool.
#[derive(Clone)]
pub struct Stores {
    pub runs: Arc<dyn RunStore>,
    pub deliveries: Arc<dyn DeliveryLog>,
    pub pending_gates: Arc<dyn PendingGates>,
    pub jobs: Arc<dyn JobQueue>,
    pub artifacts: Arc<dyn ArtifactLog>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

impl Stores {
    fn of<B: Backend>(store: SqlRunStore<B>) -> Self {
        let store = Arc::new(store);
        Self {
            runs: store.clone(),
            deliveries: store.clone(),
            pending_gates: store.clone(),
            jobs: store.clone(),
            artifacts: store,
        }
    }
}

/// Open the store at `url` as [`open_run_store`] does, with its delivery log.
pub async fn open_stores(url: &str, options: StoreOptions) -> Result<Stores, AdapterError> {
    let url = DbUrl::parse(KEY, url)?;
    match &url {
        DbUrl::SqliteFile(_) | DbUrl::SqliteMemory => Ok(Stores::of(SqlRunStore(
            SqliteRunStore::open(url.clone(), options).await?,
        ))),
        DbUrl::Postgres(_) => Ok(Stores::of(SqlRunStore(
            PostgresRunStore::open(url.clone(), options).await?,
        ))),
    }
}

/// Apply pending migrations to the store at `url` (`retrain migrate`).
pub async fn migrate(url: &str) -> Result<(), AdapterError> {
    // Close the pool before returning so SQLite checkpoints its WAL now,
    // not whenever the pool's connections happen to be dropped.
    match DbUrl::parse(KEY, url)? {
        url @ (DbUrl::SqliteFile(_) | DbUrl::SqliteMemory) => {
            let store = SqliteRunStore::open(url, StoreOptions::default()).await?;
            store.close().await;
        }
        url @ DbUrl::Postgres(_) => {
            let store = PostgresRunStore::open(url, StoreOptions::default()).await?;
            store.close().await;
        }
    }
    Ok(())
}

/// The run store over one dialect `B`: every `RunStore` rule lives here or
/// in `locks.rs`, once.
struct SqlRunStore<B>(B);

impl<B> std::fmt::Debug for SqlRunStore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlRunStore").finish_non_exhaustive()
    }
}

impl<B: Backend> SqlRunStore<B> {
    /// `finish_all`, and with `unlock` the release of the lock, as one
    /// fenced write.
    async fn finish_with(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
        unlock: bool,
    ) -> Result<(), StoreError> {
        let Some(last) = transitions.last() else {
            return Ok(());
        };
        one_run(transitions)?;
        let applied = self
            .0
            .journal(transitions, cursor.as_ref(), fence, unlock)
            .await?;
        locks::fenced(&self.0, &last.label, fence, applied).await
    }
}

#[async_trait::async_trait]
impl<B: Backend> RunStore for SqlRunStore<B> {
    async fn try_lock(
        &self,
        label: &Label,
        owner: &LockOwner,
        ttl: std::time::Duration,
    ) -> Result<LockOutcome, StoreError> {
        locks::try_lock(&self.0, label, owner, ttl).await
    }

    async fn renew_lock(
        &self,
        label: &Label,
        fence: &Fence,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError> {
        locks::renew(&self.0, label, fence, ttl).await
    }

    async fn renew_locks(
        &self,
        held: &[(Label, Fence)],
        ttl: std::time::Duration,
    ) -> Result<Vec<bool>, StoreError> {
        locks::renew_many(&self.0, held, ttl).await
    }

    async fn release_lock(&self, label: &Label, fence: &Fence) -> Result<(), StoreError> {
        locks::release(&self.0, label, fence).await
    }

    async fn cursor(&self, label: &Label) -> Result<LabelCursor, StoreError> {
        let b = &self.0;
        b.pool()
            .fetch_optional(backend::SELECT_CURSOR, vec![Arg::text(label)])
            .await
            .map_err(|e| b.error(&format!("reading the cursor of label {label}"), e))?
            .map_or_else(|| Ok(LabelCursor::default()), |row| cursor_of(&row, label))
    }

    async fn cursors(&self, labels: &[Label]) -> Result<Vec<LabelCursor>, StoreError> {
        let b = &self.0;
        let rows = b
            .pool()
            .fetch_all(backend::SELECT_CURSORS, Vec::new())
            .await
            .map_err(|e| b.error("reading the labels' cursors", e))?;
        let mut by_label = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let label = parse_label(&row.text("label")?, "-")?;
            let cursor = cursor_of(row, &label)?;
            by_label.insert(label, cursor);
        }
        Ok(labels
            .iter()
            .map(|label| by_label.remove(label).unwrap_or_default())
            .collect())
    }

    async fn unfinished_run(&self, label: &Label) -> Result<Option<LabelRun>, StoreError> {
        let b = &self.0;
        b.pool()
            .fetch_optional(backend::SELECT_UNFINISHED, vec![Arg::text(label)])
            .await
            .map_err(|e| b.error(&format!("reading the unfinished run of label {label}"), e))?
            .map(|row| snapshot_of(&row))
            .transpose()
    }

    async fn label_start(&self, label: &Label) -> Result<LabelStart, StoreError> {
        let b = &self.0;
        let rows = b
            .pool()
            .fetch_all(backend::SELECT_LABEL_START, vec![Arg::text(label)])
            .await
            .map_err(|e| {
                b.error(
                    &format!("reading the unfinished run or cursor of label {label}"),
                    e,
                )
            })?;
        let mut cursor = LabelCursor::default();
        for row in &rows {
            match row.text("part")?.as_str() {
                "run" => return Ok(LabelStart::Resume(Box::new(snapshot_of(row)?))),
                "cursor" => cursor = cursor_of(row, label)?,
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "the start of label {label} read a part {other:?}"
                    )))
                }
            }
        }
        Ok(LabelStart::Fresh(cursor))
    }

    async fn record(&self, transition: &Transition, fence: &Fence) -> Result<(), StoreError> {
        let applied = self
            .0
            .journal(std::slice::from_ref(transition), None, fence, false)
            .await?;
        locks::fenced(&self.0, &transition.label, fence, applied).await
    }

    async fn record_all(
        &self,
        transitions: &[Transition],
        fence: &Fence,
    ) -> Result<(), StoreError> {
        let Some(first) = transitions.first() else {
            return Ok(());
        };
        one_run(transitions)?;
        let applied = self.0.journal(transitions, None, fence, false).await?;
        locks::fenced(&self.0, &first.label, fence, applied).await
    }

    async fn finish(
        &self,
        transition: &Transition,
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        let applied = self
            .0
            .journal(
                std::slice::from_ref(transition),
                cursor.as_ref(),
                fence,
                false,
            )
            .await?;
        locks::fenced(&self.0, &transition.label, fence, applied).await
    }

    async fn finish_all(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.finish_with(transitions, cursor, fence, false).await
    }

    /// One statement (SQLite: the `journal_writes_unlock` trigger, migration
    /// 0018) or transaction (Postgres) with the commit.
    async fn finish_and_unlock(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.finish_with(transitions, cursor, fence, true).await
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        let b = &self.0;
        let limit = Arg::Int(filter.limit.map_or(i64::MAX, i64::from));
        let (sql, args) = match &filter.label {
            Some(label) => (backend::SELECT_RUNS_OF_LABEL, vec![Arg::text(label), limit]),
            None => (backend::SELECT_RUNS, vec![limit]),
        };
        b.pool()
            .fetch_all(sql, args)
            .await
            .map_err(|e| b.error("listing runs", e))?
            .iter()
            .map(summary_of)
            .collect()
    }

    async fn runs_with_verdict(
        &self,
        label: &Label,
        limit: Option<usize>,
    ) -> Result<Vec<(chrono::DateTime<chrono::Utc>, LabelRun)>, StoreError> {
        let b = &self.0;
        let limit = limit.map_or(i64::MAX, |limit| i64::try_from(limit).unwrap_or(i64::MAX));
        b.pool()
            .fetch_all(
                backend::SELECT_RUNS_WITH_VERDICT,
                vec![Arg::text(label), Arg::Int(limit)],
            )
            .await
            .map_err(|e| b.error(&format!("reading the evaluated runs of label {label}"), e))?
            .iter()
            .map(started_run_of)
            .collect()
    }

    async fn list_runs_page(&self, page: &RunPage) -> Result<Vec<RunSummary>, StoreError> {
        let b = &self.0;
        let mut args = vec![
            Arg::OptText(page.status.clone()),
            Arg::OptText(page.after.as_ref().map(RunId::to_string)),
            Arg::Int(i64::from(page.limit)),
        ];
        let sql = match &page.label {
            Some(label) => {
                args.push(Arg::text(label));
                backend::SELECT_RUNS_PAGE_OF_LABEL
            }
            None => backend::SELECT_RUNS_PAGE,
        };
        b.pool()
            .fetch_all(sql, args)
            .await
            .map_err(|e| b.error("listing a page of runs", e))?
            .iter()
            .map(summary_of)
            .collect()
    }

    async fn label_statuses(&self, labels: &[Label]) -> Result<Vec<LabelStatusRow>, StoreError> {
        let b = &self.0;
        if labels.is_empty() {
            return Ok(Vec::new());
        }
        let names = labels
            .iter()
            .map(|label| serde_json::Value::String(label.to_string()))
            .collect();
        let mut args = vec![Arg::Json(serde_json::Value::Array(names))];
        args.extend(b.now_args());
        let row = b
            .pool()
            .fetch_optional(B::SELECT_STATUS, args)
            .await
            .map_err(|e| b.error("reading the labels' status", e))?;
        let statuses: Vec<StatusJson> = match row {
            Some(row) => {
                let text = row.text("statuses")?;
                serde_json::from_str(&text).map_err(|e| {
                    StoreError::Corrupt(format!("the labels' status is not the expected JSON: {e}"))
                })?
            }
            None => Vec::new(),
        };
        let mut by_label = std::collections::HashMap::with_capacity(statuses.len());
        for status in statuses {
            let (label, row) = status.into_row()?;
            by_label.insert(label, row);
        }
        Ok(labels
            .iter()
            .map(|label| by_label.remove(label).unwrap_or_default())
            .collect())
    }

    async fn promotions(&self, label: &Label) -> Result<Vec<PromotionEvent>, StoreError> {
        let b = &self.0;
        b.pool()
            .fetch_all(backend::SELECT_PROMOTIONS, vec![Arg::text(label)])
            .await
            .map_err(|e| {
                b.error(
                    &format!("reading the promotion history of label {label}"),
                    e,
                )
            })?
            .iter()
            .map(backend::promotion_of)
            .collect()
    }

    async fn run(&self, run_id: &RunId) -> Result<Option<RunDetail>, StoreError> {
        let b = &self.0;
        let what = format!("reading run {run_id}");
        let Some(row) = b
            .pool()
            .fetch_optional(backend::SELECT_RUN, vec![Arg::text(run_id)])
            .await
            .map_err(|e| b.error(&what, e))?
        else {
            return Ok(None);
        };
        let summary = summary_of(&row)?;
        let snapshot = snapshot_of(&row)?;
        let transitions = b
            .pool()
            .fetch_all(backend::SELECT_TRANSITIONS, vec![Arg::text(run_id)])
            .await
            .map_err(|e| b.error(&what, e))?
            .iter()
            .map(|row| transition_of(row, run_id))
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(RunDetail {
            summary,
            snapshot,
            transitions,
        }))
    }

    async fn run_snapshots(&self, run_ids: &[RunId]) -> Result<Vec<LabelRun>, StoreError> {
        let b = &self.0;
        if run_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = run_ids
            .iter()
            .map(|id| serde_json::Value::String(id.to_string()))
            .collect();
        b.pool()
            .fetch_all(
                B::SELECT_SNAPSHOTS,
                vec![Arg::Json(serde_json::Value::Array(ids))],
            )
            .await
            .map_err(|e| {
                b.error(
                    &format!("reading the snapshots of {} runs", run_ids.len()),
                    e,
                )
            })?
            .iter()
            .map(snapshot_of)
            .collect()
    }

    async fn put_lease(&self, lease: &Lease, fence: &Fence) -> Result<(), StoreError> {
        let applied = self.0.lease(lease, fence).await?;
        locks::fenced(&self.0, &lease.label, fence, applied).await
    }

    async fn put_lease_unfenced(&self, lease: &Lease) -> Result<(), StoreError> {
        let b = &self.0;
        b.writer()
            .execute(backend::UPSERT_LEASE, lease_args(lease)?)
            .await
            .map_err(|e| b.error(&format!("recording lease {}", lease.id), e))?;
        Ok(())
    }

    async fn active_leases(&self) -> Result<Vec<Lease>, StoreError> {
        let b = &self.0;
        b.pool()
            .fetch_all(backend::SELECT_ACTIVE_LEASES, Vec::new())
            .await
            .map_err(|e| b.error("listing active leases", e))?
            .iter()
            .map(lease_of)
            .collect()
    }

    async fn lock_holder(&self, label: &Label) -> Result<Option<String>, StoreError> {
        locks::holder(&self.0, label).await
    }

    async fn journal_after(
        &self,
        after: u64,
        label: Option<Label>,
        limit: u32,
    ) -> Result<Vec<JournalEntry>, StoreError> {
        let b = &self.0;
        let args = vec![
            Arg::Int(u64_to_i64(after, "journal position")?),
            Arg::OptText(label.as_ref().map(Label::to_string)),
            Arg::Int(i64::from(limit)),
        ];
        b.pool()
            .fetch_all(backend::SELECT_JOURNAL_AFTER, args)
            .await
            .map_err(|e| b.error(&format!("reading the journal after position {after}"), e))?
            .iter()
            .map(backend::journal_entry_of)
            .collect()
    }

    async fn journal_end(&self) -> Result<u64, StoreError> {
        let b = &self.0;
        let row = b
            .pool()
            .fetch_optional(backend::SELECT_JOURNAL_END, Vec::new())
            .await
            .map_err(|e| b.error("reading the end of the journal", e))?;
        match row {
            Some(row) => i64_to_u64(row.int("position")?, "journal position"),
            None => Ok(0),
        }
    }

    async fn claim_request(
        &self,
        key: &str,
        fingerprint: &str,
    ) -> Result<RequestClaim, StoreError> {
        let b = &self.0;
        let what = "claiming an idempotency key";
        let args = vec![
            Arg::text(key),
            Arg::text(fingerprint),
            Arg::Time(chrono::Utc::now()),
        ];
        let inserted = b
            .pool()
            .execute(backend::CLAIM_REQUEST, args)
            .await
            .map_err(|e| b.error(what, e))?;
        if inserted == 1 {
            return Ok(RequestClaim::Claimed);
        }
        let row = b
            .pool()
            .fetch_optional(backend::SELECT_REQUEST, vec![Arg::text(key)])
            .await
            .map_err(|e| b.error(what, e))?;
        let Some(row) = row else {
            // Released between our insert and read: the retry can claim it.
            return Ok(RequestClaim::Seen { response: None });
        };
        if row.text("fingerprint")? != fingerprint {
            return Ok(RequestClaim::Mismatch);
        }
        Ok(RequestClaim::Seen {
            response: row.opt_text("response")?,
        })
    }

    async fn complete_request(&self, key: &str, response: &str) -> Result<(), StoreError> {
        let b = &self.0;
        b.pool()
            .execute(
                backend::COMPLETE_REQUEST,
                vec![Arg::text(key), Arg::text(response)],
            )
            .await
            .map_err(|e| b.error("storing the response of an idempotent request", e))?;
        Ok(())
    }

    async fn release_request(&self, key: &str) -> Result<(), StoreError> {
        let b = &self.0;
        b.pool()
            .execute(backend::RELEASE_REQUEST, vec![Arg::text(key)])
            .await
            .map_err(|e| b.error("releasing an idempotency key", e))?;
        Ok(())
    }
}

/// Migrations embedded in the binary (no migrations directory at run time).
#[derive(Debug, Clone, Copy)]
struct Embedded(&'static [(i64, &'static str, &'static str)]);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

const SQLITE_MIGRATIONS: Embedded = Embedded(&[
    (
        1,
        "run store",
        include_str!("../../migrations/sqlite/0001_run_store.sql"),
    ),
    (
        2,
        "journal inbox",
        include_str!("../../migrations/sqlite/0002_journal_inbox.sql"),
    ),
    (
        3,
        "fencing tokens",
        include_str!("../../migrations/sqlite/0003_fencing.sql"),
    ),
    (
        4,
        "promotion events",
        include_str!("../../migrations/sqlite/0004_promotions.sql"),
    ),
    (
        5,
        "rejected dataset version",
        include_str!("../../migrations/sqlite/0005_rejected_version.sql"),
    ),
    (
        8,
        "journal positions and idempotency keys",
        include_str!("../../migrations/sqlite/0008_journal_positions.sql"),
    ),
    (
        9,
        "webhook deliveries",
        include_str!("../../migrations/sqlite/0009_webhook_deliveries.sql"),
    ),
    (
        10,
        "remote jobs and workers",
        include_str!("../../migrations/sqlite/0010_remote_jobs.sql"),
    ),
    (
        11,
        "run artifacts",
        include_str!("../../migrations/sqlite/0011_run_artifacts.sql"),
    ),
    (
        12,
        "pending gates",
        include_str!("../../migrations/sqlite/0012_pending_gates.sql"),
    ),
    (
        13,
        "worker and job events",
        include_str!("../../migrations/sqlite/0013_worker_events.sql"),
    ),
    (
        14,
        "lock takeovers",
        include_str!("../../migrations/sqlite/0014_lock_previous_owner.sql"),
    ),
    (
        15,
        "status indexes",
        include_str!("../../migrations/sqlite/0015_status_indexes.sql"),
    ),
    (
        16,
        "journal writes and verdict column",
        include_str!("../../migrations/sqlite/0016_journal_writes.sql"),
    ),
    (
        17,
        "journal batches",
        include_str!("../../migrations/sqlite/0017_journal_batches.sql"),
    ),
    (
        18,
        "unlock with the commit",
        include_str!("../../migrations/sqlite/0018_unlock_with_commit.sql"),
    ),
]);

const POSTGRES_MIGRATIONS: Embedded = Embedded(&[
    (
        1,
        "run store",
        include_str!("../../migrations/postgres/0001_run_store.sql"),
    ),
    (
        2,
        "fencing tokens",
        include_str!("../../migrations/postgres/0002_fencing.sql"),
    ),
    (
        3,
        "promotion events",
        include_str!("../../migrations/postgres/0003_promotions.sql"),
    ),
    (
        4,
        "rejected dataset version",
        include_str!("../../migrations/postgres/0004_rejected_version.sql"),
    ),
    (
        7,
        "journal positions and idempotency keys",
        include_str!("../../migrations/postgres/0007_journal_positions.sql"),
    ),
    (
        8,
        "webhook deliveries",
        include_str!("../../migrations/postgres/0008_webhook_deliveries.sql"),
    ),
    (
        9,
        "remote jobs and workers",
        include_str!("../../migrations/postgres/0009_remote_jobs.sql"),
    ),
    (
        10,
        "run artifacts",
        include_str!("../../migrations/postgres/0010_run_artifacts.sql"),
    ),
    (
        11,
        "pending gates",
        include_str!("../../migrations/postgres/0011_pending_gates.sql"),
    ),
    (
        12,
        "worker and job events",
        include_str!("../../migrations/postgres/0012_worker_events.sql"),
    ),
    (
        13,
        "lock takeovers",
        include_str!("../../migrations/postgres/0013_lock_previous_owner.sql"),
    ),
    (
        14,
        "status indexes",
        include_str!("../../migrations/postgres/0014_status_indexes.sql"),
    ),
    (
        15,
        "verdict column",
        include_str!("../../migrations/postgres/0015_verdict_column.sql"),
    ),
    (
        16,
        "json columns",
        include_str!("../../migrations/postgres/0016_json_columns.sql"),
    ),
    (
        17,
        "journal positions per statement",
        include_str!("../../migrations/postgres/0017_journal_positions_per_statement.sql"),
    ),
    (
        18,
        "hot run updates",
        include_str!("../../migrations/postgres/0018_hot_run_updates.sql"),
    ),
]);

/// Apply `source` on open, or check that nothing is pending.
async fn prepare_schema<'c, A>(
    source: Embedded,
    url: &DbUrl,
    options: StoreOptions,
    conn: A,
) -> Result<(), AdapterError>
where
    A: sqlx::Acquire<'c> + Copy,
    <A::Connection as std::ops::Deref>::Target: sqlx::migrate::Migrate,
{
    let migrator = Migrator::new(source)
        .await
        .map_err(|e| AdapterError::Unavailable(format!("{KEY}: embedded migrations: {e}")))?;
    if options.migrate {
        // Two processes opening a fresh SQLite file race here (SQLite has no
        // advisory lock): the loser fails on "table already exists" after the
        // winner commits, and a retry then finds the migration applied.
        // Postgres serialises migrators itself, so a retry is a no-op there.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match migrator.run(conn).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= 3 => {
                    return Err(AdapterError::Unavailable(format!(
                        "{KEY}: migrating {} failed: {}",
                        url.redacted(),
                        url.scrub(e)
                    )))
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await,
            }
        }
    }
    let mut conn = conn.acquire().await.map_err(|e| {
        AdapterError::Unavailable(format!("{KEY}: {}: {}", url.redacted(), url.scrub(e)))
    })?;
    use sqlx::migrate::Migrate;
    if !options.read_only {
        conn.ensure_migrations_table().await.map_err(|e| {
            AdapterError::Unavailable(format!("{KEY}: {}: {}", url.redacted(), url.scrub(e)))
        })?;
    }
    let applied = match conn.list_applied_migrations().await {
        Ok(applied) => applied,
        // Read-only on a database nobody migrated: no migrations table.
        Err(_) if options.read_only => {
            return Err(AdapterError::NotInitialised(format!(
            "{KEY}: {} has no retrain schema yet (run `retrain migrate` or a first `retrain run`)",
            url.redacted()
        )))
        }
        Err(e) => {
            return Err(AdapterError::Unavailable(format!(
                "{KEY}: {}: {}",
                url.redacted(),
                url.scrub(e)
            )))
        }
    };
    if options.read_only && applied.is_empty() {
        return Err(AdapterError::NotInitialised(format!(
            "{KEY}: {} has no retrain schema yet",
            url.redacted()
        )));
    }
    let pending = migrator
        .iter()
        .filter(|m| !applied.iter().any(|a| a.version == m.version))
        .count();
    if pending > 0 {
        return Err(AdapterError::Unavailable(format!(
            "{KEY}: {} has {pending} pending migration(s); run `retrain migrate`",
            url.redacted()
        )));
    }
    Ok(())
}

/// A journal write is one run's: refuse transitions of several.
fn one_run(transitions: &[Transition]) -> Result<(), StoreError> {
    let Some(first) = transitions.first() else {
        return Ok(());
    };
    match transitions.iter().find(|t| t.run_id != first.run_id) {
        Some(other) => Err(StoreError::Conflict(format!(
            "one journal write carries transitions of runs {} and {}",
            first.run_id, other.run_id
        ))),
        None => Ok(()),
    }
}

/// Short outcome stored on the run row (`running` until one is known).
fn outcome_of(run: &LabelRun) -> &'static str {
    run.outcome.as_ref().map_or("running", |o| o.short())
}

fn parse_stage(raw: &str, run_id: &str) -> Result<Stage, StoreError> {
    serde_json::from_value(serde_json::Value::String(raw.to_owned()))
        .map_err(|_| StoreError::Corrupt(format!("run {run_id}: unknown stage `{raw}`")))
}

fn parse_label(raw: &str, run_id: &str) -> Result<Label, StoreError> {
    Label::new(raw).map_err(|e| StoreError::Corrupt(format!("run {run_id}: {e}")))
}

/// Encode something we own as JSON. Failure means a bug (non-string map
/// keys...), reported as a conflict rather than a panic.
fn to_json<T: serde::Serialize>(value: &T, what: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(value).map_err(|e| cannot_encode(what, e))
}

/// [`to_json`] as text, without building a `serde_json::Value` first.
fn to_json_text<T: serde::Serialize>(value: &T, what: &str) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| cannot_encode(what, e))
}

fn cannot_encode(what: &str, error: serde_json::Error) -> StoreError {
    StoreError::Conflict(format!("cannot encode {what} as JSON: {error}"))
}

/// One label's status as the status statement (`backend::select_status`)
/// encodes it: an array of these fields in this order (serde reads a struct
/// from a sequence by position); times as the dialect writes them in JSON
/// (RFC 3339 either way).
#[derive(serde::Deserialize)]
struct StatusJson {
    label: String,
    watermark: Option<String>,
    consumed_version: Option<String>,
    consumed_num_samples: Option<i64>,
    rejected_version: Option<String>,
    run_id: Option<String>,
    cycle_id: Option<String>,
    stage: Option<String>,
    outcome: Option<String>,
    started_at: Option<String>,
    updated_at: Option<String>,
    verdict: Option<String>,
    /// The owner of the label's lock while it is live (unexpired, not
    /// released).
    live_owner: Option<String>,
    /// Run ids, newest first, comma-joined.
    awaiting: Option<String>,
    production_version: Option<String>,
    production_since: Option<String>,
}

impl StatusJson {
    fn into_row(self) -> Result<(Label, LabelStatusRow), StoreError> {
        let label = parse_label(&self.label, "-")?;
        let time = |raw: &str, what: &str| {
            chrono::DateTime::parse_from_rfc3339(raw)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|_| {
                    StoreError::Corrupt(format!(
                        "{what} of label {label} is not an RFC 3339 timestamp: {raw:?}"
                    ))
                })
        };
        let last_run = match self.run_id {
            Some(run_id) => {
                let missing = |column: &str| {
                    StoreError::Corrupt(format!("run {run_id} of label {label} has no {column}"))
                };
                let run_time = |raw: Option<&str>, column: &str| {
                    time(
                        raw.ok_or_else(|| missing(column))?,
                        &format!("{column} of the newest run"),
                    )
                };
                let started = run_time(self.started_at.as_deref(), "started_at")?;
                let updated = run_time(self.updated_at.as_deref(), "updated_at")?;
                let cycle_id = self.cycle_id.clone().ok_or_else(|| missing("cycle_id"))?;
                let stage = self.stage.clone().ok_or_else(|| missing("stage"))?;
                let outcome = self.outcome.clone().ok_or_else(|| missing("outcome"))?;
                Some(summary(
                    run_id,
                    cycle_id,
                    &self.label,
                    &stage,
                    outcome,
                    started,
                    updated,
                )?)
            }
            None => None,
        };
        let waiting: Vec<RunId> = self
            .awaiting
            .map(|runs| runs.split(',').map(|id| RunId(id.to_owned())).collect())
            .unwrap_or_default();
        let production = match self.production_version {
            Some(version) => Some(ProductionRecord {
                version,
                since: time(
                    self.production_since.as_deref().unwrap_or_default(),
                    "production time",
                )?,
            }),
            None => None,
        };
        let cursor = LabelCursor {
            watermark: self
                .watermark
                .as_deref()
                .map(|raw| time(raw, "watermark"))
                .transpose()?,
            consumed_version: self.consumed_version.map(VersionTag),
            consumed_num_samples: self
                .consumed_num_samples
                .map(|n| i64_to_u64(n, &format!("consumed_num_samples of label {label}")))
                .transpose()?,
            rejected_version: self.rejected_version.map(VersionTag),
        };
        let row = LabelStatusRow {
            cursor,
            last_run,
            last_verdict: self.verdict,
            locked_by: self.live_owner.filter(|owner| !locks::is_dead_here(owner)),
            awaiting_approval: waiting.first().cloned(),
            waiting,
            production,
        };
        Ok((label, row))
    }
}

/// The run row as of a journal write's last transition, shared by both
/// dialects.
struct RunRow<'a> {
    run_id: &'a str,
    cycle_id: &'a str,
    label: &'a str,
    stage: &'static str,
    outcome: &'static str,
    done: bool,
    started_at: chrono::DateTime<chrono::Utc>,
    /// The run as JSON text, serialised straight from the run: a write
    /// serialises its ≈ 2 KiB snapshot once, with no intermediate
    /// `serde_json::Value`.
    snapshot: String,
    /// The verdict's reason, stored in a column of its own so that the
    /// status listing does not parse every newest run's snapshot.
    verdict: Option<&'a str>,
    seq: i64,
}

impl<'a> RunRow<'a> {
    fn of(transition: &'a Transition) -> Result<Self, StoreError> {
        let run = &transition.snapshot;
        if run.run_id != transition.run_id {
            return Err(StoreError::Conflict(format!(
                "transition of run {} carries the snapshot of run {}",
                transition.run_id, run.run_id
            )));
        }
        Ok(Self {
            run_id: transition.run_id.as_str(),
            cycle_id: &transition.cycle_id.0,
            label: transition.label.as_str(),
            stage: transition.to.as_str(),
            outcome: outcome_of(run),
            done: transition.is_final(),
            started_at: run.started_at.unwrap_or(transition.at),
            snapshot: to_json_text(run, "the run snapshot")?,
            verdict: run.verdict.as_ref().map(|v| v.reason.as_str()),
            seq: seq_of(transition)?,
        })
    }
}

/// A transition's sequence number as the stores' integer column.
fn seq_of(transition: &Transition) -> Result<i64, StoreError> {
    i64::try_from(transition.seq).map_err(|_| {
        StoreError::Conflict(format!("sequence number {} is too large", transition.seq))
    })
}

/// Translate a driver error. Unique violations mean a journal line was
/// written twice (two writers on one run); everything else is the database
/// being unreachable or unwell.
fn store_error(url: &DbUrl, what: &str, error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(format!("{what}: {}", url.scrub(db.message())))
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(format!("{what}: {}", url.scrub(&error)))
        }
        _ => StoreError::Unavailable(format!(
            "{what} ({}): {}",
            url.redacted(),
            url.scrub(&error)
        )),
    }
}

fn summary(
    run_id: String,
    cycle_id: String,
    label: &str,
    stage: &str,
    outcome: String,
    started_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
) -> Result<RunSummary, StoreError> {
    Ok(RunSummary {
        label: parse_label(label, &run_id)?,
        stage: parse_stage(stage, &run_id)?,
        run_id: retrain_core::domain::RunId(run_id),
        cycle_id: retrain_core::domain::CycleId(cycle_id),
        outcome,
        started_at,
        updated_at,
    })
}

fn u64_to_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Conflict(format!("{what} {value} is too large")))
}

fn i64_to_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {value}")))
}

/// Lock TTL as a chrono duration, capped at ten years so that adding it to
/// a timestamp can never overflow.
fn ttl(ttl: std::time::Duration) -> chrono::Duration {
    let cap = chrono::Duration::days(3650);
    chrono::Duration::from_std(ttl).unwrap_or(cap).min(cap)
}
