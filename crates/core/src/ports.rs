//! Ports: the seven interfaces the engine drives (plus the lease provider that
//! wraps a trainer in a machine that must always be stopped).
//!
//! Each port instance is *bound* to one address (a Space, a metadata URL, a
//! model name): the wiring layer builds one per label from the config, so the
//! methods here take no addresses.
//!
//! Error contract: adapters translate their transport errors into
//! [`PortError`]; `Transient` means "the adapter already retried and gave up",
//! never "retry me". Messages must name what failed and must never contain a
//! secret.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{
    Candidate, DatasetCheckResult, DatasetVersion, FeedbackCounts, Fence, JobKey, Label,
    LabelCursor, Lease, LockOutcome, LockOwner, Metrics, ProductionModel, PromotedVersion, RunId,
    SpaceStage, TrainingHandle, TrainingOutcome, VersionTag,
};
use crate::journal::{
    JournalEntry, LabelStart, LabelStatusRow, ProductionRecord, PromotionEvent, RequestClaim,
    RunDetail, RunFilter, RunPage, RunSummary, Transition,
};
use crate::machine::LabelRun;
use crate::report::LabelReport;

/// Error returned by every port. The message is for humans and names the
/// resource involved (repo, URL, column, file), never a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum PortError {
    /// A network/server problem that persisted through the adapter's retries.
    #[error("{0}")]
    Transient(String),
    /// Authentication or permission refused (401/403).
    #[error("{0}")]
    Denied(String),
    /// The addressed resource does not exist (404, missing file).
    #[error("{0}")]
    NotFound(String),
    /// The other side answered with something we cannot accept (bad JSON,
    /// wrong SQL columns, malformed metadata).
    #[error("{0}")]
    InvalidResponse(String),
    /// Local misconfiguration discovered at call time.
    #[error("{0}")]
    Config(String),
    /// The operation failed for a reason not covered above (non-zero exit...).
    #[error("{0}")]
    Failed(String),
}

impl PortError {
    pub fn message(&self) -> &str {
        match self {
            Self::Transient(m)
            | Self::Denied(m)
            | Self::NotFound(m)
            | Self::InvalidResponse(m)
            | Self::Config(m)
            | Self::Failed(m) => m,
        }
    }
}

/// Reads how many reviewed samples arrived per label since a watermark.
///
/// One call returns every label the user's query reports; labels it does not
/// mention have zero counts. Implementations run the query read-only.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait CountSource: Send + Sync {
    async fn counts(
        &self,
        since: DateTime<Utc>,
    ) -> Result<BTreeMap<Label, FeedbackCounts>, PortError>;
    /// The counts of every label in `watermarks` since its *own*
    /// watermark (a label the source returns nothing for is absent: zero).
    /// A cycle asks this once for all its counts-triggered labels. A source
    /// that can count every label at its own watermark in one statement
    /// should; the default asks [`CountSource::counts`] once per distinct
    /// watermark ([`counts_per_distinct_watermark`]).
    async fn counts_per_label(
        &self,
        watermarks: &BTreeMap<Label, DateTime<Utc>>,
    ) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
        counts_per_distinct_watermark(self, watermarks).await
    }
}

/// The default [`CountSource::counts_per_label`]: one
/// [`CountSource::counts`] per distinct watermark, each label taken from the
/// answer at its own watermark.
pub async fn counts_per_distinct_watermark<S: CountSource + ?Sized>(
    source: &S,
    watermarks: &BTreeMap<Label, DateTime<Utc>>,
) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
    let distinct: std::collections::BTreeSet<DateTime<Utc>> =
        watermarks.values().copied().collect();
    let mut counted = BTreeMap::new();
    for since in distinct {
        let all = source.counts(since).await?;
        for (label, watermark) in watermarks {
            if *watermark == since {
                if let Some(counts) = all.get(label) {
                    counted.insert(label.clone(), *counts);
                }
            }
        }
    }
    Ok(counted)
}

/// Controls the dataset-preparation job (an HF Space, a local command).
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait SpaceController: Send + Sync {
    /// Restart the job. Must be safe to call on a job in any state.
    ///
    /// `intent` is the journaled key of this restart. An adapter that can
    /// tell that the restart for `intent` already happened (a command job
    /// spawned for that key) must not restart again: a resumed run whose
    /// restart was sent but not journaled calls this a second time.
    async fn restart(&self, intent: &JobKey) -> Result<(), PortError>;
    /// Current stage; `SpaceStage::Error(..)` makes waiting labels fail fast.
    async fn stage(&self) -> Result<SpaceStage, PortError>;
    /// Human-readable address, for logs and reports.
    fn describe(&self) -> String;
}

/// What a metadata read found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetadataRead {
    /// Nothing published yet (404 / missing file).
    Absent,
    /// The store's change marker equals the one we passed: nothing new.
    Unchanged,
    Published(DatasetVersion),
}

/// Reads `dataset_metadata.json`.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait MetadataStore: Send + Sync {
    /// Read the published metadata. `known_revision` is the change marker of
    /// the last read; adapters that support it answer `Unchanged` cheaply.
    async fn read(&self, known_revision: Option<String>) -> Result<MetadataRead, PortError>;
    fn describe(&self) -> String;
}

/// Everything a trainer needs to start exactly one training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRequest {
    pub label: Label,
    pub run_id: RunId,
    pub attempt: u32,
    /// Deterministic key of this job (journaled as the intent before
    /// `start` is called). `start` is idempotent for it.
    pub job_key: JobKey,
    pub dataset_name: String,
    pub dataset_version: VersionTag,
    /// Present when the trainer runs under a lease (e.g. `public_ip`).
    pub lease: Option<Lease>,
    /// `true` when this process journaled the intent for `job_key` itself,
    /// under the lock it still holds, and this is the first `start` for
    /// it: no job can exist under the key yet, so a trainer whose `start`
    /// looks for one to adopt (a request whose answer cannot change what
    /// it does) may skip that lookup. `false` (the default, and always for
    /// a resumed run's journaled intent): a job may exist; look.
    #[serde(default)]
    pub first_start: bool,
}

/// Renewals the default [`RunStore::renew_locks`] keeps in flight at once.
pub const RENEW_LOCKS_IN_FLIGHT: usize = 32;

/// The default [`RunStore::renew_locks`]: one [`RunStore::renew_lock`] per
/// lock, [`RENEW_LOCKS_IN_FLIGHT`] at a time, answers in the order asked.
pub async fn renew_each<S: RunStore + ?Sized>(
    store: &S,
    held: &[(Label, Fence)],
    ttl: Duration,
) -> Result<Vec<bool>, StoreError> {
    let mut renewed = Vec::with_capacity(held.len());
    for chunk in held.chunks(RENEW_LOCKS_IN_FLIGHT) {
        let mut renewals = Vec::with_capacity(chunk.len());
        for (label, fence) in chunk {
            renewals.push(store.renew_lock(label, fence, ttl));
        }
        renewed.extend(futures::future::try_join_all(renewals).await?);
    }
    Ok(renewed)
}

/// Starts and awaits training jobs.
///
/// Contract (the engine relies on it for exactly-once training): `start` is
/// **idempotent for `request.job_key`**. The engine journals the intent
/// (the key) before calling `start` and the handle after it returns; a crash
/// in between makes the resumed run call `start` again with the same key,
/// and the trainer must then return the handle of the job already started
/// for that key (running or finished) instead of starting another one. Only
/// when no job for the key exists may it start one.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait Trainer: Send + Sync {
    /// Start the job for `request.job_key`, or adopt the one already started
    /// for it, and return a handle that survives a restart of the
    /// orchestrator (it is journaled).
    async fn start(&self, request: &TrainingRequest) -> Result<TrainingHandle, PortError>;
    /// Wait for the job of `handle` (possibly started by an earlier process).
    /// `Lost` when the job is gone without a result; `Err` when it failed.
    async fn wait(
        &self,
        request: &TrainingRequest,
        handle: &TrainingHandle,
    ) -> Result<TrainingOutcome, PortError>;
    /// Stop the job (timeout, interrupt). Best effort, idempotent.
    async fn cancel(&self, handle: &TrainingHandle) -> Result<(), PortError>;
    fn describe(&self) -> String;
    /// Whether the job runs elsewhere and outlives this process (a remote
    /// worker's job): an interrupt (SIGTERM, a server restart) then leaves
    /// it running, and the resumed run awaits the same handle instead of
    /// cancelling it and starting another. Only honoured for runs without a
    /// lease (stopping a lease stops its job). Default: `false`, the job is
    /// cancelled on interrupt.
    fn outlives_interrupt(&self) -> bool {
        false
    }
    /// How the job of `handle` ended as this trainer saw it (a command
    /// trainer: `exit status 0`), for the run manifest; `None` when it cannot
    /// tell (a remote trainer, a job started by an earlier process).
    fn job_exit(&self, _handle: &TrainingHandle) -> Option<String> {
        None
    }
    /// Whether `start` is the whole job, so that `wait` answers at once,
    /// with no I/O and no effect (a seed-000 retrain Space, which trains
    /// and deploys on its own once restarted). The engine then journals the
    /// job's handle together with its outcome, one durable write instead of
    /// two: a crash before that write leaves the journaled intent, whose
    /// resumed `start` adopts the job (idempotent for the key), exactly as
    /// a crash between a start and its handle's own write does. Default:
    /// `false`, the handle is journaled before the wait.
    fn start_is_the_job(&self) -> bool {
        false
    }
}

/// What a dataset check examines: one accepted dataset version of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetCheckRequest {
    pub label: Label,
    pub run_id: RunId,
    /// Deterministic key of the check (journaled as the intent before
    /// `check` is called).
    pub job_key: JobKey,
    pub dataset_name: String,
    pub dataset_version: VersionTag,
}

/// Examines a dataset version before anything is leased or trained
/// (`dataset_check`, seed 002's data QA).
///
/// Contract: a verdict, passing or failing (`passed = false`, e.g. a
/// command that exited non-zero), is `Ok`; `Err` means the check could not
/// give one (it could not start, timed out, or wrote an invalid result), and
/// the run fails without rejecting the version. **Idempotent for
/// `request.job_key`:** a key whose check already completed returns that
/// recorded result without running again (a resumed run whose result was
/// not journaled asks a second time); a check interrupted before it
/// completed is run again from the start, which is harmless because a
/// check only reads the dataset.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait DatasetCheck: Send + Sync {
    /// Run the check for `request.job_key` (or return its recorded result).
    /// Cancel-safe: dropping the future stops the check.
    async fn check(&self, request: &DatasetCheckRequest) -> Result<DatasetCheckResult, PortError>;
    /// Human-readable description (the command line), for logs and reports.
    fn describe(&self) -> String;
}

/// The model registry holding the production model.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait ModelRegistry: Send + Sync {
    /// The production model and its metrics; `None` when there is none yet.
    async fn production(&self, lease: Option<Lease>) -> Result<Option<ProductionModel>, PortError>;
    /// Metrics of a candidate by id (used by `retrain gate --candidate`).
    async fn candidate_metrics(
        &self,
        candidate_id: String,
        lease: Option<Lease>,
    ) -> Result<Metrics, PortError>;
    /// Register and promote `candidate`, archiving the previous production
    /// version. Must be idempotent per `run_id`: a second call for the same
    /// run returns the version the first one produced.
    async fn promote(
        &self,
        candidate: Candidate,
        run_id: RunId,
        lease: Option<Lease>,
    ) -> Result<PromotedVersion, PortError>;
    /// Whether `version` is a registered version of the model (validates
    /// `retrain rollback --to` before anything is journaled).
    async fn version_exists(
        &self,
        version: String,
        lease: Option<Lease>,
    ) -> Result<bool, PortError>;
    /// Make the earlier version `rollback.version` production again, marking
    /// the version it replaces as rolled back by `rollback.by` because
    /// `rollback.reason`. Returns the restored version and the one it
    /// replaced (`previous`). Must be idempotent per `rollback.run_id`: a
    /// second call for the same rollback run changes nothing and returns
    /// what the first one returned (a resumed run calls it again after a
    /// crash between the call and its journal write).
    async fn roll_back(
        &self,
        rollback: RegistryRollback,
        lease: Option<Lease>,
    ) -> Result<PromotedVersion, PortError>;
    fn describe(&self) -> String;
}

/// What [`ModelRegistry::roll_back`] does, on behalf of which run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryRollback {
    /// The registry version that becomes production again.
    pub version: String,
    /// The rollback run: the idempotency key.
    pub run_id: RunId,
    pub by: String,
    pub reason: String,
}

/// Sends the per-label report somewhere people look.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait Notifier: Send + Sync {
    async fn notify(&self, report: &LabelReport) -> Result<(), PortError>;
    fn describe(&self) -> String;
}

/// Starts and stops the machines a trainer runs on (EC2).
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait LeaseProvider: Send + Sync {
    /// Resources (instance ids) this provider would lease, its region and max duration.
    fn plan(&self) -> LeasePlan;
    /// Start the resources of `lease` and wait until they are usable; returns
    /// the lease with attributes filled in (e.g. `public_ip`).
    async fn acquire(&self, lease: Lease) -> Result<Lease, PortError>;
    /// Stop the resources. Idempotent: stopping stopped machines succeeds.
    async fn release(&self, lease: &Lease) -> Result<(), PortError>;
}

/// What a lease provider will lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasePlan {
    pub provider: String,
    pub resources: Vec<String>,
    pub region: Option<String>,
    pub max: Duration,
}

/// Error of the run store. Store errors abort the label (the journal is the
/// source of truth; acting without it would break the invariants).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("run store unavailable: {0}")]
    Unavailable(String),
    #[error("run store data is corrupt: {0}")]
    Corrupt(String),
    #[error("run store conflict: {0}")]
    Conflict(String),
    /// The write carried a fence whose lock is no longer held (expired, or
    /// taken by another orchestrator): nothing was written. The message names
    /// the current holder, if any.
    #[error("lock lost: {0}")]
    Fenced(String),
}

/// The durable journal, cursors, label locks and leases.
///
/// **Fencing contract.** `try_lock` returns a [`Fence`] whose token is larger
/// than that of every earlier acquisition of the label's lock. `record`,
/// `finish`, `put_lease`, `renew_lock` and `release_lock`
/// check, *in the same statement or transaction as the write*, that exactly
/// this lock (label, owner, token) is still held and unexpired, and
/// otherwise write nothing and return [`StoreError::Fenced`]. So a holder
/// whose lock expired (a pause longer than the TTL) can never overwrite the
/// work of the orchestrator that took the label over.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait RunStore: Send + Sync {
    /// Take `label`'s lock for `owner` unless another owner holds an
    /// unexpired one. A lock held by a process of this host that no longer
    /// exists (see `LockOwner::process`) may be taken at once. Every
    /// acquisition, re-acquisition by the same owner included, gets a new,
    /// larger token.
    async fn try_lock(
        &self,
        label: &Label,
        owner: &LockOwner,
        ttl: Duration,
    ) -> Result<LockOutcome, StoreError>;
    /// Extend a held lock; `false` if it was lost (expired and taken, or
    /// released).
    async fn renew_lock(
        &self,
        label: &Label,
        fence: &Fence,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    /// Extend several held locks at once (the heartbeat's round): for each
    /// `(label, fence)` of `held`, in order, whether exactly that lock was
    /// extended (`false`: lost, as in [`RunStore::renew_lock`]). A store
    /// that can do it in one statement should (10,000 held labels are one
    /// round trip instead of 10,000); the default renews them one by one,
    /// [`RENEW_LOCKS_IN_FLIGHT`] at a time.
    async fn renew_locks(
        &self,
        held: &[(Label, Fence)],
        ttl: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        renew_each(self, held, ttl).await
    }
    /// Release the lock if `fence` still holds it (a no-op otherwise).
    async fn release_lock(&self, label: &Label, fence: &Fence) -> Result<(), StoreError>;

    async fn cursor(&self, label: &Label) -> Result<LabelCursor, StoreError>;
    /// The cursors of `labels`, in that order (a label the store never saw
    /// gets the default cursor). A cycle reads its counts-triggered labels'
    /// watermarks with it; the SQL stores answer in one statement, the
    /// default asks [`RunStore::cursor`] label by label.
    async fn cursors(&self, labels: &[Label]) -> Result<Vec<LabelCursor>, StoreError> {
        let mut cursors = Vec::with_capacity(labels.len());
        for label in labels {
            cursors.push(self.cursor(label).await?);
        }
        Ok(cursors)
    }
    /// The unfinished run of `label`, if any, as last journaled.
    async fn unfinished_run(&self, label: &Label) -> Result<Option<LabelRun>, StoreError>;
    /// What a cycle starts `label` from: its unfinished run, else its
    /// cursor. The SQL stores answer in one statement (a cycle's phase one
    /// reads this for every label, under each label's lock); this default
    /// asks [`RunStore::unfinished_run`], then [`RunStore::cursor`].
    async fn label_start(&self, label: &Label) -> Result<LabelStart, StoreError> {
        Ok(match self.unfinished_run(label).await? {
            Some(run) => LabelStart::Resume(Box::new(run)),
            None => LabelStart::Fresh(self.cursor(label).await?),
        })
    }
    /// Append `transition` to the journal and store its snapshot, atomically,
    /// if `fence` still holds the label's lock. When the transition records a
    /// promotion ([`Transition::promotion_event`]), the promotion event is
    /// written in the same atomic, fenced write (once per run: a second
    /// event for the same run is ignored), so `promotions` and the journal
    /// never disagree.
    async fn record(&self, transition: &Transition, fence: &Fence) -> Result<(), StoreError>;
    /// Append several consecutive transitions of one run (oldest first) as
    /// one write: every journal line, and the run's snapshot as of the last
    /// one. The engine batches the steps that only read (start, counts,
    /// published version, polls) and writes them before the next action
    /// that is not a read. A store should apply them atomically and fenced
    /// like [`RunStore::record`]; this default writes them one by one, which
    /// is also correct (a prefix of read-only steps is a state the run
    /// can resume from).
    async fn record_all(
        &self,
        transitions: &[Transition],
        fence: &Fence,
    ) -> Result<(), StoreError> {
        for transition in transitions {
            self.record(transition, fence).await?;
        }
        Ok(())
    }
    /// Record the final transition and (optionally) advance the cursor,
    /// atomically, if `fence` still holds the label's lock (promotion events
    /// as in [`RunStore::record`]).
    async fn finish(
        &self,
        transition: &Transition,
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError>;
    /// [`RunStore::finish`] of the last of `transitions` (one run's, oldest
    /// first), written with the ones before it atomically and fenced, as
    /// one write. The engine does not write a step whose only next action
    /// is the commit on its own: the commit is a write, and it carries that
    /// step (so a run that notified and commits costs one write, not two).
    /// Nothing to write for no transitions.
    async fn finish_all(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError>;
    /// [`RunStore::finish_all`], and the release of the label's lock by
    /// `fence`, as one write: the last write of a label's run when nothing
    /// else of that label follows under the lock (the engine's commit of a
    /// finished run), so the release costs no write of its own. Applied
    /// only while `fence` holds the lock, like `finish_all`; refused, it
    /// releases nothing either. No default, like `finish_all`: a store
    /// writes the commit and the release together, or it would have to
    /// decide what a release failing after a written commit means.
    async fn finish_and_unlock(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError>;

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError>;
    /// A page of runs (see [`RunPage`]). The SQL stores answer with one
    /// keyset query; this default filters [`RunStore::list_runs`] (every
    /// run of the label) in memory.
    async fn list_runs_page(&self, page: &RunPage) -> Result<Vec<RunSummary>, StoreError> {
        let runs = self
            .list_runs(&RunFilter {
                label: page.label.clone(),
                limit: None,
            })
            .await?;
        let start = match &page.after {
            None => 0,
            Some(after) => match runs.iter().position(|r| &r.run_id == after) {
                Some(at) => at + 1,
                None => runs.len(),
            },
        };
        Ok(runs
            .into_iter()
            .skip(start)
            .filter(|r| {
                page.status
                    .as_deref()
                    .is_none_or(|s| r.outcome == s || r.stage.as_str() == s)
            })
            .take(page.limit as usize)
            .collect())
    }
    /// `retrain status`: one row per label of `labels`, in that order (a
    /// label the store never saw gets an empty row). The SQL stores answer
    /// with one query for all labels; this default composes the row from
    /// the other reads, label by label.
    async fn label_statuses(&self, labels: &[Label]) -> Result<Vec<LabelStatusRow>, StoreError> {
        let mut rows = Vec::with_capacity(labels.len());
        for label in labels {
            let runs = self
                .list_runs(&RunFilter {
                    label: Some(label.clone()),
                    limit: None,
                })
                .await?;
            let last_verdict = match runs.first() {
                Some(last) => self
                    .run(&last.run_id)
                    .await?
                    .and_then(|detail| detail.snapshot.verdict.map(|v| v.reason)),
                None => None,
            };
            let waiting: Vec<RunId> = runs
                .iter()
                .filter(|r| r.stage == crate::machine::Stage::AwaitingApproval)
                .map(|r| r.run_id.clone())
                .collect();
            let production = self
                .promotions(label)
                .await?
                .pop()
                .map(|event| ProductionRecord {
                    version: event.version,
                    since: event.at,
                });
            rows.push(LabelStatusRow {
                cursor: self.cursor(label).await?,
                awaiting_approval: waiting.first().cloned(),
                waiting,
                production,
                last_run: runs.into_iter().next(),
                last_verdict,
                locked_by: self.lock_holder(label).await?,
            });
        }
        Ok(rows)
    }
    /// The promotion events of `label` (production lineage), oldest first.
    async fn promotions(&self, label: &Label) -> Result<Vec<PromotionEvent>, StoreError>;
    async fn run(&self, run_id: &RunId) -> Result<Option<RunDetail>, StoreError>;
    /// The runs of `label` that have a gate verdict, newest first, at most
    /// `limit` (all if `None`): each run's start time as stored, and its
    /// snapshot. The metrics history of a report reads them
    /// (`history.rs`, at every verdict's notification). The SQL stores
    /// answer with one statement, read newest first by the label's index
    /// until `limit`; this default lists every run of the label and reads
    /// the ones that may have been evaluated one by one.
    async fn runs_with_verdict(
        &self,
        label: &Label,
        limit: Option<usize>,
    ) -> Result<Vec<(DateTime<Utc>, LabelRun)>, StoreError> {
        let mut summaries = self
            .list_runs(&RunFilter {
                label: Some(label.clone()),
                limit: None,
            })
            .await?;
        summaries.sort_by_key(|s| std::cmp::Reverse(s.started_at));
        let mut runs = Vec::new();
        for summary in summaries {
            if limit.is_some_and(|limit| runs.len() >= limit) {
                break;
            }
            if !crate::report::may_be_evaluated(&summary.outcome) {
                continue;
            }
            if let Some(detail) = self.run(&summary.run_id).await? {
                if detail.snapshot.verdict.is_some() {
                    runs.push((summary.started_at, detail.snapshot));
                }
            }
        }
        Ok(runs)
    }

    /// The latest snapshot of each run of `run_ids` that the store has (an
    /// unknown id is skipped), in no particular order: what a run's
    /// manifest is written from after a cycle. The SQL stores answer with
    /// one statement for the whole slice (callers bound its length); this
    /// default reads the runs one by one, journal lines included.
    async fn run_snapshots(&self, run_ids: &[RunId]) -> Result<Vec<LabelRun>, StoreError> {
        let mut runs = Vec::with_capacity(run_ids.len());
        for run_id in run_ids {
            if let Some(detail) = self.run(run_id).await? {
                runs.push(detail.snapshot);
            }
        }
        Ok(runs)
    }

    /// Insert or update a lease record of a run, fenced on the lease's label
    /// like a journal write.
    async fn put_lease(&self, lease: &Lease, fence: &Fence) -> Result<(), StoreError>;
    /// Insert or update a lease record outside a run: administrative writes
    /// (`infra reap`, `infra start|stop`) that hold no label lock.
    async fn put_lease_unfenced(&self, lease: &Lease) -> Result<(), StoreError>;
    /// Leases not yet released.
    async fn active_leases(&self) -> Result<Vec<Lease>, StoreError>;
    /// Whether the owner of `label`'s lock is alive (lock held and unexpired).
    async fn lock_holder(&self, label: &Label) -> Result<Option<String>, StoreError>;

    /// Up to `limit` journal lines with a position greater than `after`
    /// (of `label` only, if given), in position order. **Contract:**
    /// positions are assigned in commit order, so no line can appear later
    /// with a position at or below one already returned; reading on from
    /// the last position seen loses and repeats nothing (the event stream's
    /// `Last-Event-ID`). Optional capability: a store without journal
    /// positions answers `Unavailable`.
    async fn journal_after(
        &self,
        after: u64,
        label: Option<Label>,
        limit: u32,
    ) -> Result<Vec<JournalEntry>, StoreError> {
        let _ = (after, label, limit);
        Err(StoreError::Unavailable(
            "this run store keeps no journal positions".into(),
        ))
    }

    /// The last position handed out (0: none yet); a stream starting
    /// "now" reads after it. A store whose other event tables share the
    /// journal's counter (the SQL stores' worker events) answers the last
    /// position of any of them, so every position up to it is committed.
    async fn journal_end(&self) -> Result<u64, StoreError> {
        Err(StoreError::Unavailable(
            "this run store keeps no journal positions".into(),
        ))
    }

    /// Claim an idempotency `key` for a request with `fingerprint` (a hash
    /// of what was asked). Atomic across every process sharing the store:
    /// exactly one claimer gets [`RequestClaim::Claimed`]. Optional
    /// capability, as [`RunStore::journal_after`].
    async fn claim_request(
        &self,
        key: &str,
        fingerprint: &str,
    ) -> Result<RequestClaim, StoreError> {
        let _ = (key, fingerprint);
        Err(StoreError::Unavailable(
            "this run store keeps no idempotency keys".into(),
        ))
    }

    /// Store the response to the request that claimed `key`.
    async fn complete_request(&self, key: &str, response: &str) -> Result<(), StoreError> {
        let _ = (key, response);
        Err(StoreError::Unavailable(
            "this run store keeps no idempotency keys".into(),
        ))
    }

    /// Forget a claimed `key` whose request failed before it was answered,
    /// so that a retry with the same key can act.
    async fn release_request(&self, key: &str) -> Result<(), StoreError> {
        let _ = key;
        Err(StoreError::Unavailable(
            "this run store keeps no idempotency keys".into(),
        ))
    }
}
