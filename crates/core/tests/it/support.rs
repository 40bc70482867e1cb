//! Test doubles: an in-memory `RunStore` that can simulate a crash right after
//! the N-th journal write, and counting fakes of the other ports sharing one
//! simulated world (a prepare restart publishes a new dataset).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_core::domain::*;
use retrain_core::engine::{Clock, Engine, EngineSettings, LabelBinding, TokioClock};
use retrain_core::gate::GatePolicy;
use retrain_core::journal::{
    PromotionEvent, RunDetail, RunFilter, RunSummary, Transition, TransitionRecord,
};
use retrain_core::machine::{LabelPlan, LabelRun, PromoteMode, Stage, Trigger};
use retrain_core::ports::*;

#[derive(Default)]
struct StoreData {
    runs: BTreeMap<RunId, (LabelRun, bool)>,
    transitions: Vec<Transition>,
    cursors: HashMap<Label, LabelCursor>,
    /// label → (owner, expiry, fencing token); a released lock keeps its
    /// row (owner "") so tokens keep growing.
    locks: HashMap<Label, (String, DateTime<Utc>, u64)>,
    leases: BTreeMap<String, Lease>,
    /// Promotion events, in write order (one per run).
    promotions: Vec<PromotionEvent>,
    /// Writes refused because the writer's fence was stale.
    fenced: usize,
    /// Locks released by a run's commit write / by `release_lock`.
    unlocked_by_commit: usize,
    lock_releases: usize,
}

/// In-memory `RunStore`. `crash_after(n)`: the n-th journal write (record or
/// finish) is persisted, then every call fails, as if the process died.
#[derive(Clone, Default)]
pub struct MemStore {
    data: Arc<Mutex<StoreData>>,
    crash_after: Option<usize>,
    /// With `crash_after`: the crashing write itself is lost (the process
    /// died between a side effect and the journal write of its outcome).
    lose_crashing_write: bool,
    writes: Arc<AtomicUsize>,
    /// Lock expiry follows tokio's (possibly paused) clock.
    clock: Arc<TokioClock>,
    /// While set, lock renewals and releases fail (a store outage seen by
    /// one holder).
    pub renewals_fail: Arc<AtomicBool>,
    /// How long each lock renewal takes (a loaded store); zero by default.
    pub renew_latency: Arc<Mutex<Duration>>,
    /// `list_runs` calls (each metrics-history read makes one).
    pub run_listings: Arc<AtomicUsize>,
    /// `renew_locks` calls (one per heartbeat batch).
    pub renew_batches: Arc<AtomicUsize>,
    /// While set, the commit writes (`finish_all`, `finish_and_unlock`)
    /// fail as a store outage would, writing nothing.
    pub commits_fail: Arc<AtomicBool>,
    /// While set, lease records are refused as fenced (`StoreError::Fenced`),
    /// as if another driver had taken the label's lock just before.
    pub leases_fenced: Arc<AtomicBool>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
    /// The n-th journal write is lost and every later call fails.
    pub fn losing_write(&self, n: usize) -> Self {
        Self {
            lose_crashing_write: true,
            ..self.crashing_after(n)
        }
    }
    pub fn crashing_after(&self, n: usize) -> Self {
        Self {
            crash_after: Some(n),
            lose_crashing_write: false,
            writes: Arc::new(AtomicUsize::new(0)),
            renewals_fail: Arc::default(),
            ..self.clone()
        }
    }
    /// A new process on the same database: locks of the dead one have expired.
    pub fn restarted(&self) -> Self {
        for lock in self.data.lock().unwrap().locks.values_mut() {
            lock.0.clear();
        }
        Self {
            crash_after: None,
            lose_crashing_write: false,
            writes: Arc::new(AtomicUsize::new(0)),
            renewals_fail: Arc::default(),
            ..self.clone()
        }
    }
    /// Whether this write is the lost one (then nothing is persisted).
    fn loses_this_write(&self) -> bool {
        self.lose_crashing_write
            && self
                .crash_after
                .is_some_and(|n| self.writes.load(Ordering::SeqCst) + 1 >= n)
    }
    /// Writes refused by fencing so far.
    pub fn fenced_writes(&self) -> usize {
        self.data.lock().unwrap().fenced
    }
    /// Refuse the write unless `fence` holds `label`'s unexpired lock.
    fn fence(&self, label: &Label, fence: &Fence) -> Result<(), StoreError> {
        let mut d = self.data.lock().unwrap();
        let now = self.now();
        match d.locks.get(label) {
            Some((owner, expires, token))
                if owner == &fence.owner.0 && *token == fence.token && *expires > now =>
            {
                Ok(())
            }
            other => {
                let holder = other
                    .map(|(o, _, t)| format!("{o} (token {t})"))
                    .unwrap_or_else(|| "nobody".into());
                d.fenced += 1;
                Err(StoreError::Fenced(format!(
                    "lock of label {label} is held by {holder}, not by {fence}"
                )))
            }
        }
    }
    /// The events of every journal line written, in write order.
    pub fn journal_events(&self) -> Vec<&'static str> {
        let d = self.data.lock().unwrap();
        d.transitions.iter().map(|t| t.event.name()).collect()
    }
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }
    fn crashed(&self) -> bool {
        self.crash_after
            .is_some_and(|n| self.writes.load(Ordering::SeqCst) >= n)
    }
    fn check(&self) -> Result<(), StoreError> {
        if self.crashed() {
            Err(StoreError::Unavailable("simulated crash".into()))
        } else {
            Ok(())
        }
    }
    /// `finish_all`, and with `unlock` the release of the lock, as one
    /// write (one crash point).
    fn write_finish(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
        unlock: bool,
    ) -> Result<(), StoreError> {
        let Some(last) = transitions.last() else {
            return Ok(());
        };
        self.check()?;
        if self.commits_fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "simulated outage of commits".into(),
            ));
        }
        self.fence(&last.label, fence)?;
        if self.loses_this_write() {
            return self.after_write();
        }
        for transition in transitions {
            self.store_transition(transition);
        }
        let mut d = self.data.lock().unwrap();
        if let Some(c) = cursor {
            d.cursors.insert(last.label.clone(), c);
        }
        if unlock {
            if let Some(lock) = d.locks.get_mut(&last.label) {
                lock.0.clear();
            }
            d.unlocked_by_commit += 1;
        }
        drop(d);
        self.after_write()
    }
    /// Locks released by their run's commit write (`finish_and_unlock`).
    pub fn unlocked_by_commit(&self) -> usize {
        self.data.lock().unwrap().unlocked_by_commit
    }
    /// `release_lock` calls (a release of a lock no longer held included).
    pub fn lock_releases(&self) -> usize {
        self.data.lock().unwrap().lock_releases
    }
    fn after_write(&self) -> Result<(), StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.check()
    }
    /// The dataset version `label`'s cursor has consumed, if any.
    pub fn consumed(&self, label: &str) -> Option<String> {
        self.cursor_of(label)
            .consumed_version
            .map(|v| v.as_str().to_owned())
    }

    pub fn cursor_of(&self, label: &str) -> LabelCursor {
        self.data
            .lock()
            .unwrap()
            .cursors
            .get(&Label::new(label).unwrap())
            .cloned()
            .unwrap_or_default()
    }
    pub fn finished_runs(&self, label: &str) -> Vec<LabelRun> {
        let label = Label::new(label).unwrap();
        self.data
            .lock()
            .unwrap()
            .runs
            .values()
            .filter(|(r, done)| *done && r.label() == &label)
            .map(|(r, _)| r.clone())
            .collect()
    }
    /// The journaled snapshot of `run_id`.
    pub fn run_snapshot(&self, run_id: &RunId) -> LabelRun {
        self.data.lock().unwrap().runs[run_id].0.clone()
    }
    pub fn hold_lock(&self, label: &str, owner: &str) {
        let expires = self.now() + chrono::Duration::hours(1);
        let mut d = self.data.lock().unwrap();
        let entry =
            d.locks
                .entry(Label::new(label).unwrap())
                .or_insert((String::new(), expires, 0));
        *entry = (owner.into(), expires, entry.2 + 1);
    }
    /// A promotion event written as if by an earlier run (history the
    /// engine did not make itself).
    pub fn record_promotion(&self, event: PromotionEvent) {
        self.data.lock().unwrap().promotions.push(event);
    }
    pub fn leases(&self) -> Vec<Lease> {
        self.data.lock().unwrap().leases.values().cloned().collect()
    }
    fn store_transition(&self, t: &Transition) {
        let mut d = self.data.lock().unwrap();
        d.runs
            .insert(t.run_id.clone(), (t.snapshot.clone(), t.to == Stage::Done));
        d.transitions.push(t.clone());
        if let Some(event) = t.promotion_event() {
            if !d.promotions.iter().any(|p| p.run_id == event.run_id) {
                d.promotions.push(event);
            }
        }
    }
}

#[async_trait]
impl RunStore for MemStore {
    async fn try_lock(
        &self,
        label: &Label,
        owner: &LockOwner,
        ttl: Duration,
    ) -> Result<LockOutcome, StoreError> {
        self.check()?;
        let now = self.now();
        let mut d = self.data.lock().unwrap();
        let entry = d
            .locks
            .entry(label.clone())
            .or_insert((String::new(), now, 0));
        if !entry.0.is_empty() && entry.0 != owner.0 && entry.1 > now {
            return Ok(LockOutcome::Busy {
                owner: entry.0.clone(),
                expires_at: entry.1,
            });
        }
        let previous = std::mem::take(&mut entry.0);
        *entry = (
            owner.0.clone(),
            now + chrono::Duration::from_std(ttl).unwrap(),
            entry.2 + 1,
        );
        Ok(LockOutcome::Acquired {
            fence: Fence {
                owner: owner.clone(),
                token: entry.2,
            },
            taken_over_from: (!previous.is_empty() && previous != owner.0).then_some(previous),
        })
    }
    async fn renew_lock(
        &self,
        label: &Label,
        fence: &Fence,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.check()?;
        if self.renewals_fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("simulated outage".into()));
        }
        let latency = *self.renew_latency.lock().unwrap();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let now = self.now();
        let mut d = self.data.lock().unwrap();
        match d.locks.get_mut(label) {
            Some((holder, expires, token))
                if holder == &fence.owner.0 && *token == fence.token && *expires > now =>
            {
                *expires = now + chrono::Duration::from_std(ttl).unwrap();
                Ok(true)
            }
            _ => Ok(false),
        }
    }
    async fn renew_locks(
        &self,
        held: &[(Label, Fence)],
        ttl: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        self.renew_batches.fetch_add(1, Ordering::SeqCst);
        retrain_core::ports::renew_each(self, held, ttl).await
    }
    async fn release_lock(&self, label: &Label, fence: &Fence) -> Result<(), StoreError> {
        self.check()?;
        // A holder cut off from the store cannot release either.
        if self.renewals_fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("simulated outage".into()));
        }
        let d = &mut *self.data.lock().unwrap();
        d.lock_releases += 1;
        if let Some(lock) = d.locks.get_mut(label) {
            if lock.0 == fence.owner.0 && lock.2 == fence.token {
                lock.0.clear();
            }
        }
        Ok(())
    }
    async fn cursor(&self, label: &Label) -> Result<LabelCursor, StoreError> {
        self.check()?;
        Ok(self
            .data
            .lock()
            .unwrap()
            .cursors
            .get(label)
            .cloned()
            .unwrap_or_default())
    }
    async fn unfinished_run(&self, label: &Label) -> Result<Option<LabelRun>, StoreError> {
        self.check()?;
        Ok(self
            .data
            .lock()
            .unwrap()
            .runs
            .values()
            .rfind(|(r, done)| !done && !r.is_awaiting_approval() && r.label() == label)
            .map(|(r, _)| r.clone()))
    }
    async fn record(&self, transition: &Transition, fence: &Fence) -> Result<(), StoreError> {
        self.check()?;
        self.fence(&transition.label, fence)?;
        if self.loses_this_write() {
            return self.after_write();
        }
        self.store_transition(transition);
        self.after_write()
    }
    /// One atomic write (one crash point), like the SQL stores.
    async fn record_all(
        &self,
        transitions: &[Transition],
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.check()?;
        if let Some(first) = transitions.first() {
            self.fence(&first.label, fence)?;
        }
        if self.loses_this_write() {
            return self.after_write();
        }
        for transition in transitions {
            self.store_transition(transition);
        }
        self.after_write()
    }
    async fn finish(
        &self,
        transition: &Transition,
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.finish_all(std::slice::from_ref(transition), cursor, fence)
            .await
    }
    /// One atomic write (one crash point), like the SQL stores.
    async fn finish_all(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.write_finish(transitions, cursor, fence, false)
    }
    /// One atomic write (one crash point), like the SQL stores: the lock is
    /// released by the write, with no `release_lock` call.
    async fn finish_and_unlock(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.write_finish(transitions, cursor, fence, true)
    }
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        self.run_listings.fetch_add(1, Ordering::SeqCst);
        let d = self.data.lock().unwrap();
        Ok(d.runs
            .values()
            .rev()
            .filter(|(r, _)| filter.label.as_ref().is_none_or(|l| l == r.label()))
            .map(|(r, _)| summary(r, &d.transitions))
            .collect())
    }
    async fn promotions(&self, label: &Label) -> Result<Vec<PromotionEvent>, StoreError> {
        let d = self.data.lock().unwrap();
        Ok(d.promotions
            .iter()
            .filter(|p| &p.label == label)
            .cloned()
            .collect())
    }
    async fn run(&self, run_id: &RunId) -> Result<Option<RunDetail>, StoreError> {
        let d = self.data.lock().unwrap();
        Ok(d.runs.get(run_id).map(|(r, _)| RunDetail {
            summary: summary(r, &d.transitions),
            snapshot: r.clone(),
            transitions: d
                .transitions
                .iter()
                .filter(|t| &t.run_id == run_id)
                .map(|t| TransitionRecord {
                    seq: t.seq,
                    at: t.at,
                    from: t.from,
                    to: t.to,
                    event: serde_json::to_value(&t.event).unwrap(),
                    actions: serde_json::to_value(&t.actions).unwrap(),
                })
                .collect(),
        }))
    }
    async fn put_lease(&self, lease: &Lease, fence: &Fence) -> Result<(), StoreError> {
        self.check()?;
        if self.leases_fenced.load(Ordering::SeqCst) {
            return Err(StoreError::Fenced(format!(
                "lock of label {} is held by thief",
                lease.label
            )));
        }
        self.fence(&lease.label, fence)?;
        self.put_lease_unfenced(lease).await
    }

    async fn put_lease_unfenced(&self, lease: &Lease) -> Result<(), StoreError> {
        self.check()?;
        self.data
            .lock()
            .unwrap()
            .leases
            .insert(lease.id.clone(), lease.clone());
        Ok(())
    }
    async fn active_leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.check()?;
        Ok(self
            .data
            .lock()
            .unwrap()
            .leases
            .values()
            .filter(|l| l.released_at.is_none())
            .cloned()
            .collect())
    }
    async fn lock_holder(&self, label: &Label) -> Result<Option<String>, StoreError> {
        let d = self.data.lock().unwrap();
        let now = self.now();
        Ok(d.locks
            .get(label)
            .filter(|(h, e, _)| !h.is_empty() && *e > now)
            .map(|(h, _, _)| h.clone()))
    }
}

/// `updated_at` is the time of the run's last journaled transition.
fn summary(r: &LabelRun, transitions: &[Transition]) -> RunSummary {
    let updated_at = transitions
        .iter()
        .rev()
        .find(|t| t.run_id == r.run_id)
        .map_or_else(Utc::now, |t| t.at);
    RunSummary {
        run_id: r.run_id.clone(),
        cycle_id: r.cycle_id.clone(),
        label: r.label().clone(),
        stage: r.stage,
        outcome: r
            .outcome
            .as_ref()
            .map(|o| o.short())
            .unwrap_or("running")
            .into(),
        started_at: r.started_at.unwrap_or_else(Utc::now),
        updated_at,
    }
}

pub fn dataset(tag: &str, n: u64, created_secs: i64) -> DatasetVersion {
    DatasetVersion {
        metadata: DatasetMetadata {
            dataset_name: "owner/ds".into(),
            version_tag: VersionTag::new(tag),
            num_samples: n,
            created_at: DateTime::<Utc>::from_timestamp(1_700_000_000 + created_secs, 0).unwrap(),
            splits: None,
            extra: Default::default(),
        },
        revision: Some(tag.into()),
    }
}

/// Side-effect counters shared by every fake of one world.
#[derive(Default, Debug)]
pub struct Counters {
    pub count_queries: AtomicUsize,
    pub restarts: AtomicUsize,
    pub starts: AtomicUsize,
    pub promotes: AtomicUsize,
    pub acquires: AtomicUsize,
    pub releases: AtomicUsize,
    pub notifies: AtomicUsize,
    /// Jobs the trainer cancelled.
    pub cancels: AtomicUsize,
    /// `start` calls that adopted the job already started for their key.
    pub adopted: AtomicUsize,
    /// `start` calls the engine marked `first_start` (no lookup).
    pub first_starts: AtomicUsize,
    /// Rollbacks that moved production (not the idempotent repeats).
    pub rollbacks: AtomicUsize,
    /// Dataset checks run (not counting recorded results returned again).
    pub checks: AtomicUsize,
}

/// A port call (`"start"`, `"promote"`) and the id of the lease it was given.
pub type UnderLease = (&'static str, Option<String>);

/// The simulated outside world.
#[derive(Clone)]
pub struct World {
    pub counters: Arc<Counters>,
    pub published: Arc<Mutex<Option<DatasetVersion>>>,
    pub production: Arc<Mutex<Option<(String, Metrics, RunId)>>>,
    /// Every registered version: metrics and the run that promoted it.
    pub versions: Arc<Mutex<BTreeMap<String, (Metrics, RunId)>>>,
    /// Rollbacks done, by rollback run id (the registry is idempotent per run).
    pub rollbacks: Arc<Mutex<BTreeMap<RunId, PromotedVersion>>>,
    pub candidate_metrics: Arc<Mutex<Metrics>>,
    pub trainer_fails: Arc<Mutex<bool>>,
    pub lose_trainings: Arc<AtomicUsize>,
    /// Jobs started, by job key (the trainer is idempotent per key).
    pub jobs: Arc<Mutex<BTreeMap<JobKey, TrainingHandle>>>,
    /// Training duration (virtual time).
    pub train_time: Arc<Mutex<Duration>>,
    /// The fake trainer's jobs outlive an interrupt (a remote worker's).
    pub detached_jobs: Arc<AtomicBool>,
    /// The fake trainer's `start` is the whole job (`start_is_the_job`, a
    /// seed-000 Space): its `wait` answers at once.
    pub start_is_the_job: Arc<AtomicBool>,
    /// How long a registry promotion takes (virtual time).
    pub promote_time: Arc<Mutex<Duration>>,
    /// The next N registry calls (production or promote) fail with 503.
    pub registry_outages: Arc<AtomicUsize>,
    /// The next N notifications fail with a timeout.
    pub notifier_outages: Arc<AtomicUsize>,
    /// The next N promotions fail with 503 (reads work).
    pub promote_outages: Arc<AtomicUsize>,
    /// Leases whose machines are running.
    pub running_leases: Arc<Mutex<std::collections::BTreeSet<String>>>,
    /// Prepare restarts done, by intent key.
    pub restart_intents: Arc<Mutex<std::collections::BTreeSet<JobKey>>>,
    /// Dataset versions the fake dataset check rejects.
    pub bad_versions: Arc<Mutex<std::collections::BTreeSet<String>>>,
    /// Completed dataset checks by job key, with the version checked.
    pub checked: Arc<Mutex<BTreeMap<JobKey, (VersionTag, DatasetCheckResult)>>>,
    /// The lease id each trainer start and each promotion was given.
    pub under_lease: Arc<Mutex<Vec<UnderLease>>>,
}

impl World {
    pub fn new() -> Self {
        Self {
            counters: Arc::default(),
            published: Arc::new(Mutex::new(Some(dataset("v1", 10, 0)))),
            production: Arc::default(),
            versions: Arc::default(),
            rollbacks: Arc::default(),
            candidate_metrics: Arc::new(Mutex::new(
                [("dice".to_string(), 0.9), ("iou".to_string(), 0.8)]
                    .into_iter()
                    .collect(),
            )),
            trainer_fails: Arc::default(),
            lose_trainings: Arc::default(),
            jobs: Arc::default(),
            train_time: Arc::new(Mutex::new(Duration::from_secs(5))),
            promote_time: Arc::default(),
            detached_jobs: Arc::default(),
            start_is_the_job: Arc::default(),
            registry_outages: Arc::default(),
            notifier_outages: Arc::default(),
            promote_outages: Arc::default(),
            restart_intents: Arc::default(),
            running_leases: Arc::default(),
            bad_versions: Arc::default(),
            checked: Arc::default(),
            under_lease: Arc::default(),
        }
    }
}

impl World {
    fn outage(&self) -> Result<(), PortError> {
        if take_one(&self.registry_outages) {
            return Err(PortError::Transient(
                "registry answered 503 Service Unavailable".into(),
            ));
        }
        Ok(())
    }
}

/// Decrement `n` if positive; whether it was.
fn take_one(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

pub struct FakeCounts(pub World);
#[async_trait]
impl CountSource for FakeCounts {
    async fn counts(
        &self,
        since: DateTime<Utc>,
    ) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
        self.0.counters.count_queries.fetch_add(1, Ordering::SeqCst);
        // New feedback exists only before the first consumed dataset.
        let fresh = since == DateTime::<Utc>::UNIX_EPOCH;
        let counts = FeedbackCounts {
            misclassified: if fresh { 50 } else { 3 },
            correct: 100,
        };
        Ok(["department", "urgency", "a", "b", "c", "d", "e"]
            .iter()
            .map(|l| (Label::new(l).unwrap(), counts))
            .collect())
    }
}

pub struct FakeMetadata(pub World);
#[async_trait]
impl MetadataStore for FakeMetadata {
    async fn read(&self, known: Option<String>) -> Result<MetadataRead, PortError> {
        let published = self.0.published.lock().unwrap().clone();
        Ok(match published {
            None => MetadataRead::Absent,
            Some(d) if known.is_some() && d.revision == known => MetadataRead::Unchanged,
            Some(d) => MetadataRead::Published(d),
        })
    }
    fn describe(&self) -> String {
        "fake metadata".into()
    }
}

/// A prepare job that publishes `v2` (enough samples) when restarted.
pub struct FakePrepare {
    pub world: World,
    pub stage: SpaceStage,
}
#[async_trait]
impl SpaceController for FakePrepare {
    async fn restart(&self, intent: &JobKey) -> Result<(), PortError> {
        // The port's contract: a restart already done for `intent` is not redone.
        if !self
            .world
            .restart_intents
            .lock()
            .unwrap()
            .insert(intent.clone())
        {
            return Ok(());
        }
        self.world.counters.restarts.fetch_add(1, Ordering::SeqCst);
        if !self.stage.is_error() {
            *self.world.published.lock().unwrap() = Some(dataset("v2", 500, 3600));
        }
        Ok(())
    }
    async fn stage(&self) -> Result<SpaceStage, PortError> {
        Ok(self.stage.clone())
    }
    fn describe(&self) -> String {
        "fake prepare".into()
    }
}

/// A dataset check that rejects the versions in `World::bad_versions`.
pub struct FakeDatasetCheck(pub World);
#[async_trait]
impl DatasetCheck for FakeDatasetCheck {
    async fn check(&self, request: &DatasetCheckRequest) -> Result<DatasetCheckResult, PortError> {
        // The port's contract: a completed check of the key is not run again.
        if let Some((_, result)) = self.0.checked.lock().unwrap().get(&request.job_key) {
            return Ok(result.clone());
        }
        self.0.counters.checks.fetch_add(1, Ordering::SeqCst);
        let version = request.dataset_version.clone();
        let bad = self
            .0
            .bad_versions
            .lock()
            .unwrap()
            .contains(version.as_str());
        let result = DatasetCheckResult {
            passed: !bad,
            summary: serde_json::json!({ "pairs": 500, "bad_masks": if bad { 3 } else { 0 } })
                .as_object()
                .cloned()
                .unwrap_or_default(),
            report_md: Some(if bad {
                format!("## {version}\n3 masks are not binary")
            } else {
                format!("## {version}\nall 500 pairs valid")
            }),
            detail: bad.then(|| {
                "exit status 1; last output lines:\nmask_17.png: values {0, 128, 255}".into()
            }),
        };
        self.0
            .checked
            .lock()
            .unwrap()
            .insert(request.job_key.clone(), (version, result.clone()));
        Ok(result)
    }
    fn describe(&self) -> String {
        "fake dataset check".into()
    }
}

pub struct FakeTrainer(pub World);
#[async_trait]
impl Trainer for FakeTrainer {
    async fn start(&self, request: &TrainingRequest) -> Result<TrainingHandle, PortError> {
        self.0
            .under_lease
            .lock()
            .unwrap()
            .push(("start", request.lease.as_ref().map(|l| l.id.clone())));
        // The port's contract: idempotent for the job key. Like the Space
        // and workflow trainers, it looks for a job to adopt only when the
        // engine says one may exist: an engine that called a resumed
        // intent a first start would start a second job here.
        let mut jobs = self.0.jobs.lock().unwrap();
        if request.first_start {
            self.0.counters.first_starts.fetch_add(1, Ordering::SeqCst);
        } else if let Some(handle) = jobs.get(&request.job_key) {
            self.0.counters.adopted.fetch_add(1, Ordering::SeqCst);
            return Ok(handle.clone());
        }
        self.0.counters.starts.fetch_add(1, Ordering::SeqCst);
        let handle = TrainingHandle {
            kind: "fake".into(),
            data: serde_json::json!({
                "version": request.dataset_version,
                "attempt": request.attempt,
                "job": request.job_key,
            }),
        };
        jobs.insert(request.job_key.clone(), handle.clone());
        Ok(handle)
    }
    async fn wait(
        &self,
        _: &TrainingRequest,
        _: &TrainingHandle,
    ) -> Result<TrainingOutcome, PortError> {
        // Training takes (virtual) time, so concurrent engines overlap;
        // none when the start was the whole job.
        if !self.0.start_is_the_job.load(Ordering::SeqCst) {
            let train_time = *self.0.train_time.lock().unwrap();
            tokio::time::sleep(train_time).await;
        }
        if *self.0.trainer_fails.lock().unwrap() {
            return Err(PortError::Failed(
                "exit status 1: CUDA out of memory".into(),
            ));
        }
        if self.0.lose_trainings.load(Ordering::SeqCst) > 0 {
            self.0.lose_trainings.fetch_sub(1, Ordering::SeqCst);
            return Ok(TrainingOutcome::Lost {
                reason: "pid gone without result".into(),
            });
        }
        Ok(TrainingOutcome::Finished(Candidate {
            id: "run-123".into(),
            metrics: self.0.candidate_metrics.lock().unwrap().clone(),
        }))
    }
    async fn cancel(&self, _: &TrainingHandle) -> Result<(), PortError> {
        self.0.counters.cancels.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn describe(&self) -> String {
        "fake trainer".into()
    }
    fn outlives_interrupt(&self) -> bool {
        self.0.detached_jobs.load(Ordering::SeqCst)
    }
    fn start_is_the_job(&self) -> bool {
        self.0.start_is_the_job.load(Ordering::SeqCst)
    }
}

pub struct FakeRegistry(pub World);
#[async_trait]
impl ModelRegistry for FakeRegistry {
    async fn production(&self, _: Option<Lease>) -> Result<Option<ProductionModel>, PortError> {
        self.0.outage()?;
        Ok(self
            .0
            .production
            .lock()
            .unwrap()
            .as_ref()
            .map(|(v, m, _)| ProductionModel {
                version: v.clone(),
                candidate_id: None,
                metrics: m.clone(),
            }))
    }
    async fn candidate_metrics(&self, _: String, _: Option<Lease>) -> Result<Metrics, PortError> {
        Ok(self.0.candidate_metrics.lock().unwrap().clone())
    }
    async fn promote(
        &self,
        candidate: Candidate,
        run_id: RunId,
        lease: Option<Lease>,
    ) -> Result<PromotedVersion, PortError> {
        self.0
            .under_lease
            .lock()
            .unwrap()
            .push(("promote", lease.map(|l| l.id)));
        self.0.outage()?;
        let promote_time = *self.0.promote_time.lock().unwrap();
        tokio::time::sleep(promote_time).await;
        if take_one(&self.0.promote_outages) {
            return Err(PortError::Transient(
                "registry answered 503 Service Unavailable".into(),
            ));
        }
        let mut production = self.0.production.lock().unwrap();
        if let Some((v, _, r)) = production.as_ref() {
            if r == &run_id {
                return Ok(PromotedVersion {
                    version: v.clone(),
                    previous: None,
                });
            }
        }
        self.0.counters.promotes.fetch_add(1, Ordering::SeqCst);
        let previous = production.as_ref().map(|(v, _, _)| v.clone());
        // Numbered after every registered version (production may have
        // been rolled back to an older one), or after a production set by
        // the test itself.
        let newest = self
            .0
            .versions
            .lock()
            .unwrap()
            .keys()
            .chain(previous.iter())
            .map(|v| v.parse::<u32>().unwrap())
            .max()
            .unwrap_or(0);
        let version = (newest + 1).to_string();
        self.0
            .versions
            .lock()
            .unwrap()
            .insert(version.clone(), (candidate.metrics.clone(), run_id.clone()));
        *production = Some((version.clone(), candidate.metrics, run_id));
        Ok(PromotedVersion { version, previous })
    }
    async fn version_exists(&self, version: String, _: Option<Lease>) -> Result<bool, PortError> {
        self.0.outage()?;
        Ok(self.0.versions.lock().unwrap().contains_key(&version))
    }
    async fn roll_back(
        &self,
        rollback: RegistryRollback,
        _: Option<Lease>,
    ) -> Result<PromotedVersion, PortError> {
        self.0.outage()?;
        if take_one(&self.0.promote_outages) {
            return Err(PortError::Transient(
                "registry answered 503 Service Unavailable".into(),
            ));
        }
        let mut done = self.0.rollbacks.lock().unwrap();
        if let Some(result) = done.get(&rollback.run_id) {
            return Ok(result.clone());
        }
        let (metrics, promoted_by) = self
            .0
            .versions
            .lock()
            .unwrap()
            .get(&rollback.version)
            .cloned()
            .ok_or_else(|| PortError::NotFound(format!("no version {}", rollback.version)))?;
        self.0.counters.rollbacks.fetch_add(1, Ordering::SeqCst);
        let mut production = self.0.production.lock().unwrap();
        let previous = production.as_ref().map(|(v, _, _)| v.clone());
        *production = Some((rollback.version.clone(), metrics, promoted_by));
        let result = PromotedVersion {
            version: rollback.version,
            previous,
        };
        done.insert(rollback.run_id, result.clone());
        Ok(result)
    }
    fn describe(&self) -> String {
        "fake registry".into()
    }
}

pub struct FakeLease(pub World);
#[async_trait]
impl LeaseProvider for FakeLease {
    fn plan(&self) -> LeasePlan {
        LeasePlan {
            provider: "fake-ec2".into(),
            resources: vec!["i-0abc".into()],
            region: Some("eu-west-1".into()),
            max: Duration::from_secs(3600),
        }
    }
    async fn acquire(&self, mut lease: Lease) -> Result<Lease, PortError> {
        // Like EC2: starting running machines is a no-op.
        if self
            .0
            .running_leases
            .lock()
            .unwrap()
            .insert(lease.id.clone())
        {
            self.0.counters.acquires.fetch_add(1, Ordering::SeqCst);
        }
        lease
            .attributes
            .insert("public_ip".into(), "10.0.0.1".into());
        Ok(lease)
    }
    async fn release(&self, lease: &Lease) -> Result<(), PortError> {
        // Like EC2: stopping stopped machines is a no-op.
        if self.0.running_leases.lock().unwrap().remove(&lease.id) {
            self.0.counters.releases.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

pub struct CountingNotifier(pub World);
#[async_trait]
impl Notifier for CountingNotifier {
    async fn notify(&self, _: &retrain_core::report::LabelReport) -> Result<(), PortError> {
        if take_one(&self.0.notifier_outages) {
            return Err(PortError::Transient("webhook timed out".into()));
        }
        self.0.counters.notifies.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn describe(&self) -> String {
        "counting".into()
    }
}

pub fn plan(label: &str) -> LabelPlan {
    LabelPlan {
        label: Label::new(label).unwrap(),
        trigger: Trigger::Counts {
            threshold: 40,
            correct_ratio: CorrectRatio::default(),
        },
        prepare: Some("hf-space://owner/prepare".into()),
        gate: Some(GatePolicy::seed_default()),
        leased: false,
        promote: PromoteMode::Auto,
        max_attempts: 2,
        max_step_retries: 5,
        poll_interval: Duration::from_secs(1),
        poll_timeout: Duration::from_secs(60),
        dry_run: false,
        approval_expires: retrain_core::machine::DEFAULT_APPROVAL_EXPIRES,
        dataset_check: false,
    }
}

/// A binding with every port faked over `world`.
pub fn binding(world: &World, plan: LabelPlan, prepare: Arc<dyn SpaceController>) -> LabelBinding {
    let leased = plan.leased;
    LabelBinding {
        plan,
        metadata: Arc::new(FakeMetadata(world.clone())),
        prepare: Some(prepare),
        trainer: Arc::new(FakeTrainer(world.clone())),
        registry: Some(Arc::new(FakeRegistry(world.clone()))),
        lease: leased.then(|| Arc::new(FakeLease(world.clone())) as Arc<dyn LeaseProvider>),
        notifiers: vec![Arc::new(CountingNotifier(world.clone()))],
        train_timeout: Duration::from_secs(60),
        dataset_check: None,
    }
}

pub fn engine(store: &MemStore, world: &World, bindings: Vec<LabelBinding>) -> Engine {
    Engine::new(
        Arc::new(store.clone()),
        Some(Arc::new(FakeCounts(world.clone()))),
        bindings,
        EngineSettings {
            poll_jitter: 0.0,
            ..EngineSettings::default()
        },
    )
}

/// An engine over `store` driving the one label `department` (the default
/// [`plan`], the shared [`prepare`] Space): the common case.
pub fn department_engine(store: &MemStore, world: &World) -> Engine {
    engine(
        store,
        world,
        vec![binding(world, plan("department"), prepare(world))],
    )
}

pub fn prepare(world: &World) -> Arc<dyn SpaceController> {
    Arc::new(FakePrepare {
        world: world.clone(),
        stage: SpaceStage::Running,
    })
}
