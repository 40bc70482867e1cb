//! What a cycle costs the store and the outside world (issue 11): polls
//! that saw nothing new write nothing, the read-only steps of phase one are
//! one write, labels waiting on one prepare job share its stage reads, and a
//! gated run reads its metrics history once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use retrain_core::domain::*;
use retrain_core::engine::{CycleRequest, EngineError};
use retrain_core::ports::*;
use retrain_core::report::{CycleReport, LabelStatus};
use retrain_core::CancellationToken;
use tokio::time::Instant;

use crate::support::*;

/// A prepare job whose dataset (`v2`) appears `after` its restart, counting
/// the reads of its stage and of the metadata.
struct Delayed {
    world: World,
    after: Duration,
    restarted_at: Mutex<Option<Instant>>,
    stage_reads: AtomicUsize,
    metadata_reads: AtomicUsize,
    last_metadata_read: Mutex<Option<Instant>>,
    /// What the prepare job's stage reads answer.
    stage: Mutex<SpaceStage>,
    /// `Engine::metadata_reads_skipped` at the end of the cycle.
    skipped: Mutex<u64>,
}

impl Delayed {
    fn new(world: &World, after: Duration) -> Arc<Self> {
        Arc::new(Self {
            world: world.clone(),
            after,
            restarted_at: Mutex::new(None),
            stage_reads: AtomicUsize::new(0),
            metadata_reads: AtomicUsize::new(0),
            last_metadata_read: Mutex::new(None),
            stage: Mutex::new(SpaceStage::Running),
            skipped: Mutex::new(0),
        })
    }
    fn published(&self) -> DatasetVersion {
        let restarted = *self.restarted_at.lock().unwrap();
        match restarted {
            Some(at) if at.elapsed() >= self.after => dataset("v2", 500, 3600),
            _ => dataset("v1", 10, 0),
        }
    }
}

struct DelayedPrepare(Arc<Delayed>);
#[async_trait]
impl SpaceController for DelayedPrepare {
    async fn restart(&self, _intent: &JobKey) -> Result<(), PortError> {
        self.0
            .world
            .counters
            .restarts
            .fetch_add(1, Ordering::SeqCst);
        self.0
            .restarted_at
            .lock()
            .unwrap()
            .get_or_insert(Instant::now());
        Ok(())
    }
    async fn stage(&self) -> Result<SpaceStage, PortError> {
        self.0.stage_reads.fetch_add(1, Ordering::SeqCst);
        Ok(self.0.stage.lock().unwrap().clone())
    }
    fn describe(&self) -> String {
        "delayed prepare".into()
    }
}

struct DelayedMetadata(Arc<Delayed>);
#[async_trait]
impl MetadataStore for DelayedMetadata {
    async fn read(&self, known: Option<String>) -> Result<MetadataRead, PortError> {
        self.0.metadata_reads.fetch_add(1, Ordering::SeqCst);
        *self.0.last_metadata_read.lock().unwrap() = Some(Instant::now());
        let published = self.0.published();
        Ok(if known.is_some() && published.revision == known {
            MetadataRead::Unchanged
        } else {
            MetadataRead::Published(published)
        })
    }
    fn describe(&self) -> String {
        "delayed metadata".into()
    }
}

/// One cycle of `labels` labels sharing one prepare job whose dataset
/// appears `after` the restart; the store and the delayed job, to count.
async fn cycle_with_delay(labels: &[&str], after: Duration) -> (MemStore, Arc<Delayed>) {
    let (store, delayed, report) = cycle_on(MemStore::new(), labels, after).await;
    // The first label promotes; the others' candidates are no better than
    // the production it just got, so they are rejected.
    for label in &report.unwrap().labels {
        assert!(
            matches!(label.status, LabelStatus::Promoted | LabelStatus::Rejected),
            "{label:?}"
        );
        assert_eq!(label.dataset_version.as_ref().unwrap().as_str(), "v2");
    }
    (store, delayed)
}

/// [`cycle_with_delay`] on `store`, whatever the cycle's outcome.
async fn cycle_on(
    store: MemStore,
    labels: &[&str],
    after: Duration,
) -> (MemStore, Arc<Delayed>, Result<CycleReport, EngineError>) {
    let (store, delayed, report, _) = cycle_scouting(
        store,
        labels,
        after,
        retrain_core::engine::DEFAULT_POLL_SCOUT_MAX_GAP,
    )
    .await;
    (store, delayed, report)
}

/// A binding of `plan` whose metadata is `job`'s, restarting through `prepare`.
fn delayed_binding(
    world: &World,
    plan: retrain_core::machine::LabelPlan,
    prepare: Arc<dyn SpaceController>,
    job: &Arc<Delayed>,
) -> retrain_core::engine::LabelBinding {
    let mut binding = binding(world, plan, prepare);
    binding.metadata = Arc::new(DelayedMetadata(job.clone()));
    binding
}

/// An engine over `bindings`, jitter off, scouting with `max_gap`.
fn scouting_engine(
    store: &MemStore,
    world: &World,
    bindings: Vec<retrain_core::engine::LabelBinding>,
    max_gap: Duration,
) -> retrain_core::engine::Engine {
    retrain_core::engine::Engine::new(
        Arc::new(store.clone()),
        Some(Arc::new(FakeCounts(world.clone()))),
        bindings,
        retrain_core::engine::EngineSettings {
            poll_jitter: 0.0,
            poll_scout_max_gap: max_gap,
            ..retrain_core::engine::EngineSettings::default()
        },
    )
}

/// One cycle of `engine`, and when it began (tokio's clock: paused in
/// these tests).
async fn timed_cycle(
    engine: &retrain_core::engine::Engine,
) -> (Result<CycleReport, EngineError>, Instant) {
    let started = Instant::now();
    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await;
    (report, started)
}

/// Every label of `report` failed, with an error that mentions `what`.
fn assert_every_label_failed_with(report: &CycleReport, what: &str) {
    for label in &report.labels {
        assert!(
            label.error.as_deref().is_some_and(|e| e.contains(what)),
            "{label:?}"
        );
    }
}

/// [`cycle_on`] with `poll_scout_max_gap` set to `max_gap`; also how long
/// the cycle took (tokio's clock: paused in these tests).
async fn cycle_scouting(
    store: MemStore,
    labels: &[&str],
    after: Duration,
    max_gap: Duration,
) -> (
    MemStore,
    Arc<Delayed>,
    Result<CycleReport, EngineError>,
    Duration,
) {
    let world = World::new();
    let delayed = Delayed::new(&world, after);
    let bindings = labels
        .iter()
        .map(|label| {
            delayed_binding(
                &world,
                plan(label),
                Arc::new(DelayedPrepare(delayed.clone())),
                &delayed,
            )
        })
        .collect();
    let engine = scouting_engine(&store, &world, bindings, max_gap);
    let (report, started) = timed_cycle(&engine).await;
    *delayed.skipped.lock().unwrap() = engine.metadata_reads_skipped();
    (store, delayed, report, started.elapsed())
}

#[tokio::test(start_paused = true)]
async fn a_poll_that_observed_nothing_new_writes_nothing() {
    // poll_interval is 1 s: about 3 polls, then about 30.
    let (short, short_job) = cycle_with_delay(&["department"], Duration::from_secs(3)).await;
    let (long, long_job) = cycle_with_delay(&["department"], Duration::from_secs(30)).await;
    let polls = |job: &Delayed| job.metadata_reads.load(Ordering::SeqCst);
    assert!(
        polls(&long_job) >= polls(&short_job) + 25,
        "the long wait should poll more: {} vs {}",
        polls(&long_job),
        polls(&short_job)
    );
    assert_eq!(
        long.writes(),
        short.writes(),
        "27 more polls that saw nothing new must not write"
    );
}

#[tokio::test(start_paused = true)]
async fn the_read_only_steps_of_phase_one_are_one_write() {
    let (store, _) = cycle_with_delay(&["department"], Duration::from_secs(3)).await;
    // Written one by one: started, counts_read, published_read,
    // prepare_restarted, the first poll, the poll that saw the dataset,
    // training_started, training_finished, baseline_read, promoted,
    // notified, committed (12). Batched: started + counts_read +
    // published_read go as one write, the unchanged polls not at all, and
    // notified with committed.
    assert!(
        store.writes() <= 10,
        "{} journal writes for one run",
        store.writes()
    );
    // Every transition that was written is a journal line, in order.
    let run = &store.finished_runs("department")[0];
    assert_eq!(run.stage, retrain_core::machine::Stage::Done);
}

/// The commit is a write of its own, so the step that leads to it (here
/// `notified`) is not written on its own but with `committed`: a run that
/// promoted and notified costs one write less, and no stored state is
/// "notified, commit pending".
#[tokio::test(start_paused = true)]
async fn the_step_before_the_commit_is_written_with_it() {
    let (store, _) = cycle_with_delay(&["department"], Duration::from_secs(3)).await;
    let events = store.journal_events();
    assert_eq!(events[events.len() - 2..], ["notified", "committed"]);
    // The same cycle, the process gone after every write but the last.
    let crashing = MemStore::new().crashing_after(store.writes() - 1);
    let (cut, _, _) = cycle_on(crashing, &["department"], Duration::from_secs(3)).await;
    let events = cut.journal_events();
    assert_eq!(events.last(), Some(&"promoted"), "{events:?}");
    assert!(!events.contains(&"notified"), "{events:?}");
}

/// Whether an orchestrator other than the engine's can take `label`'s lock
/// right now (nobody holds it).
async fn lock_is_free(store: &MemStore, label: &str) -> bool {
    let outcome = store
        .try_lock(
            &Label::new(label).unwrap(),
            &LockOwner("another-orchestrator".into()),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    matches!(outcome, LockOutcome::Acquired { .. })
}

#[tokio::test(start_paused = true)]
async fn a_finished_runs_commit_releases_its_lock_in_the_same_write() {
    let labels = ["a", "b", "c"];
    let (store, _) = cycle_with_delay(&labels, Duration::from_secs(3)).await;
    assert_eq!(store.unlocked_by_commit(), labels.len());
    assert_eq!(store.lock_releases(), 0, "no release write of its own");
    for label in labels {
        assert!(lock_is_free(&store, label).await, "{label} is still locked");
    }
}

#[tokio::test(start_paused = true)]
async fn a_commit_that_failed_leaves_the_lock_to_its_own_release() {
    let store = MemStore::new();
    store.commits_fail.store(true, Ordering::SeqCst);
    let (store, _, report) = cycle_on(store, &["department"], Duration::from_secs(3)).await;
    let report = report.unwrap();
    assert!(
        report.labels[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("outage of commits")),
        "{report:?}"
    );
    assert_eq!(store.unlocked_by_commit(), 0);
    assert_eq!(store.lock_releases(), 1, "released on its own");
    assert!(lock_is_free(&store, "department").await);
}

#[tokio::test(start_paused = true)]
async fn labels_waiting_on_one_prepare_job_share_its_stage_reads() {
    let labels = ["a", "b", "c", "d", "e"];
    let (_, job) = cycle_with_delay(&labels, Duration::from_secs(10)).await;
    let stage_reads = job.stage_reads.load(Ordering::SeqCst);
    // Each label polls about 11 times (1 s interval, 10 s wait); one stage
    // read per round serves all five.
    assert!(
        stage_reads <= 14,
        "{stage_reads} stage reads for 5 labels waiting 10 s on one job"
    );
}

/// The five labels of [`cycle_scouting`] waiting 10 s (1 s poll interval)
/// on one prepare job: its metadata reads, and how long the cycle took.
async fn five_labels_waiting(max_gap: Duration) -> (usize, Duration) {
    let (reads, _, took) = five_labels_waiting_skipping(max_gap).await;
    (reads, took)
}

/// [`five_labels_waiting`], also the reads the engine counts as skipped.
async fn five_labels_waiting_skipping(max_gap: Duration) -> (usize, u64, Duration) {
    let labels = ["a", "b", "c", "d", "e"];
    let (_, job, report, took) =
        cycle_scouting(MemStore::new(), &labels, Duration::from_secs(10), max_gap).await;
    for label in &report.unwrap().labels {
        assert!(
            matches!(label.status, LabelStatus::Promoted | LabelStatus::Rejected),
            "{label:?}"
        );
        assert_eq!(label.dataset_version.as_ref().unwrap().as_str(), "v2");
    }
    let skipped = *job.skipped.lock().unwrap();
    (job.metadata_reads.load(Ordering::SeqCst), skipped, took)
}

#[tokio::test(start_paused = true)]
async fn labels_waiting_on_one_prepare_job_share_one_metadata_read_per_round() {
    let (shared, skipped, took_shared) =
        five_labels_waiting_skipping(Duration::from_secs(300)).await;
    let (alone, none_skipped, took_alone) = five_labels_waiting_skipping(Duration::ZERO).await;
    // Every poll either reads or is counted as skipped.
    assert_eq!(none_skipped, 0);
    assert_eq!(
        shared as u64 + skipped,
        alone as u64,
        "{shared} + {skipped}"
    );
    // Without scouting every label reads every round: 5 × 11 and the
    // phase-one reads.
    assert!(alone >= 5 * 11, "every label reads every round: {alone}");
    // With it, one read per round (11), the phase-one reads (5) and each
    // label's read once the scout saw v2 (4).
    assert!(
        (11..=11 + 5 + 4 + 2).contains(&shared),
        "{shared} metadata reads for 5 labels waiting 10 s on one job"
    );
    // The scout wakes the others the moment it sees v2: nobody waits for
    // its next poll.
    assert_eq!(
        took_shared, took_alone,
        "the cycle took {took_shared:?} with scouting, {took_alone:?} without"
    );
}

#[tokio::test(start_paused = true)]
async fn a_label_waiting_on_a_scouted_job_still_reads_every_max_gap() {
    // Gap 3 s: each of the four others reads on its own every 3 s on top of
    // the scout's read per round.
    let (reads, _) = five_labels_waiting(Duration::from_secs(3)).await;
    let (scouted, _) = five_labels_waiting(Duration::from_secs(300)).await;
    assert!(
        reads >= scouted + 4 * 2,
        "{reads} metadata reads with a 3 s gap, {scouted} with 300 s"
    );
}

/// An engine over `labels` sharing the prepare job `job` (stage and
/// metadata alike), jitter off, scouting at its default.
fn engine_on_one_job(
    store: &MemStore,
    world: &World,
    labels: &[&str],
    job: &Arc<Delayed>,
) -> retrain_core::engine::Engine {
    let bindings = labels
        .iter()
        .map(|label| {
            delayed_binding(
                world,
                plan(label),
                Arc::new(DelayedPrepare(job.clone())),
                job,
            )
        })
        .collect();
    scouting_engine(
        store,
        world,
        bindings,
        retrain_core::engine::DEFAULT_POLL_SCOUT_MAX_GAP,
    )
}

#[tokio::test(start_paused = true)]
async fn a_job_in_error_fails_every_label_waiting_on_it_within_a_round() {
    // Labels that skip their metadata read still see the stage the job's
    // last read found: they fail fast together, not one per scout round.
    let world = World::new();
    let job = Delayed::new(&world, Duration::from_secs(3600));
    *job.stage.lock().unwrap() = SpaceStage::Error("BUILD_ERROR".into());
    let labels = ["a", "b", "c", "d", "e"];
    let engine = engine_on_one_job(&MemStore::new(), &world, &labels, &job);
    let (report, started) = timed_cycle(&engine).await;
    assert_every_label_failed_with(&report.unwrap(), "BUILD_ERROR");
    // The scout fails at its first poll, the others at their next (1 s).
    assert!(
        started.elapsed() <= Duration::from_secs(2),
        "the five labels took {:?} to fail",
        started.elapsed()
    );
}

/// [`DelayedPrepare`] counting the stage reads made through this one
/// label's binding.
struct OwnStageReads(DelayedPrepare, Arc<AtomicUsize>);
#[async_trait]
impl SpaceController for OwnStageReads {
    async fn restart(&self, intent: &JobKey) -> Result<(), PortError> {
        self.0.restart(intent).await
    }
    async fn stage(&self) -> Result<SpaceStage, PortError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.stage().await
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

#[tokio::test(start_paused = true)]
async fn a_label_that_skips_its_read_starts_no_stage_read() {
    // b is woken at 0.6 s, so from then on it polls 0.6 s into each of a's
    // scout rounds, when a's stage read is older than half a poll
    // interval. Skipping its metadata read, b takes that stage read
    // instead of starting one through its own binding.
    let world = World::new();
    let job = Delayed::new(&world, Duration::from_secs(10));
    let own: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::default()).collect();
    let bindings = ["a", "b"]
        .iter()
        .zip(&own)
        .map(|(label, reads)| {
            let prepare = OwnStageReads(DelayedPrepare(job.clone()), reads.clone());
            delayed_binding(&world, plan(label), Arc::new(prepare), &job)
        })
        .collect();
    let engine = scouting_engine(
        &MemStore::new(),
        &world,
        bindings,
        retrain_core::engine::DEFAULT_POLL_SCOUT_MAX_GAP,
    );
    let wake_b = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        engine.wake(&Label::new("b").unwrap());
    };
    let (report, ()) = tokio::join!(
        engine.run_cycle(CycleRequest::default(), CancellationToken::new()),
        wake_b
    );
    for label in &report.unwrap().labels {
        assert_eq!(label.dataset_version.as_ref().unwrap().as_str(), "v2");
    }
    let (a, b) = (own[0].load(Ordering::SeqCst), own[1].load(Ordering::SeqCst));
    // a scouts every second for 10 s; b read once, when woken, then after
    // the publication.
    assert!(a >= 9, "the scout read the stage {a} times");
    assert!(b <= 2, "b, skipping, started {b} stage reads");
    assert!(job.stage_reads.load(Ordering::SeqCst) <= 14);
}

#[tokio::test(start_paused = true)]
async fn every_label_of_a_scouted_job_reads_its_own_dataset_at_its_deadline() {
    // Nothing is ever published; the two labels share the job, so each
    // round one of them scouts. Each still reads at its deadline (5 s),
    // whichever scouted last.
    let world = World::new();
    let labels = ["a", "b"];
    let jobs: Vec<Arc<Delayed>> = labels
        .iter()
        .map(|_| Delayed::new(&world, Duration::from_secs(3600)))
        .collect();
    let bindings = labels
        .iter()
        .zip(&jobs)
        .map(|(label, job)| {
            let mut plan = plan(label);
            plan.poll_timeout = Duration::from_secs(5);
            delayed_binding(&world, plan, Arc::new(DelayedPrepare(job.clone())), job)
        })
        .collect();
    let engine = scouting_engine(
        &MemStore::new(),
        &world,
        bindings,
        retrain_core::engine::DEFAULT_POLL_SCOUT_MAX_GAP,
    );
    let (report, started) = timed_cycle(&engine).await;
    assert_every_label_failed_with(&report.unwrap(), "timed out");
    let reads: Vec<usize> = jobs
        .iter()
        .map(|job| job.metadata_reads.load(Ordering::SeqCst))
        .collect();
    // One scout read per round between them, not one each.
    assert!(reads.iter().sum::<usize>() <= 2 + 6 + 2, "{reads:?}");
    for (label, job) in labels.iter().zip(&jobs) {
        let last = job.last_metadata_read.lock().unwrap().unwrap();
        assert!(
            last.duration_since(started) >= Duration::from_secs(5),
            "{label} last read its dataset {:?} into the cycle, before its deadline",
            last.duration_since(started)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_gated_run_reads_its_metrics_history_once() {
    let (store, _) = cycle_with_delay(&["department"], Duration::from_secs(1)).await;
    // The notification reads it; the cycle report reuses that read.
    assert_eq!(store.run_listings.load(Ordering::SeqCst), 1);
}

/// Issue 11 at 10,000 labels: the heartbeat renewed every held lock one
/// after the other, so a round took `labels × renewal latency`; once that
/// passed `lock_ttl − lock_ttl / 3` (10,000 renewals at 4 ms on a loaded
/// SQLite store), labels renewed late in a round ran out of validity and
/// stopped as `lock_lost` although nobody else wanted them. Here 300 labels,
/// 20 ms per renewal: 6 s one by one, against a 3 s `lock_ttl`.
#[tokio::test(start_paused = true)]
async fn many_held_labels_keep_their_locks_when_each_renewal_is_slow() {
    let world = World::new();
    let store = MemStore::new();
    *store.renew_latency.lock().unwrap() = Duration::from_millis(20);
    let delayed = Delayed::new(&world, Duration::from_secs(8));
    let labels: Vec<String> = (0..300).map(|i| format!("label-{i}")).collect();
    let bindings = labels
        .iter()
        .map(|label| {
            // Triggered by the published dataset (the fake counts know
            // only a few labels), as in the cycle bench.
            let mut plan = plan(label);
            plan.trigger = retrain_core::machine::Trigger::Metadata { threshold: 1 };
            delayed_binding(
                &world,
                plan,
                Arc::new(DelayedPrepare(delayed.clone())),
                &delayed,
            )
        })
        .collect();
    let engine = retrain_core::engine::Engine::new(
        Arc::new(store.clone()),
        Some(Arc::new(FakeCounts(world.clone()))),
        bindings,
        retrain_core::engine::EngineSettings {
            poll_jitter: 0.0,
            lock_ttl: Duration::from_secs(3),
            max_parallel_labels: 64,
            ..retrain_core::engine::EngineSettings::default()
        },
    );
    let started = tokio::time::Instant::now();
    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    // One `renew_locks` call (one statement on the SQL stores) per
    // heartbeat round of 300 labels, not one per label.
    let rounds = started.elapsed().as_secs() + 1; // every lock_ttl / 3 = 1 s
    let batches = store.renew_batches.load(Ordering::SeqCst) as u64;
    assert!(
        (1..=rounds).contains(&batches),
        "{batches} renewal calls in {rounds} heartbeat rounds"
    );
    let stopped: Vec<_> = report
        .labels
        .iter()
        .filter(|l| !matches!(l.status, LabelStatus::Promoted | LabelStatus::Rejected))
        .map(|l| (l.label.to_string(), l.status, l.error.clone()))
        .collect();
    assert!(
        stopped.is_empty(),
        "{} of {} labels stopped, first: {:?}",
        stopped.len(),
        labels.len(),
        stopped.first()
    );
    assert_eq!(store.fenced_writes(), 0);
}
