//! The engine's concurrency model: fenced locks held from phase one,
//! holders that lose their lock stop before acting, interrupts that keep
//! attempts, outages that keep the candidate. Each test failed on the
//! engine before fencing/intents/deferral existed.

use std::sync::atomic::Ordering;
use std::time::Duration;

use retrain_core::domain::LockOwner;
use retrain_core::engine::{CycleRequest, Engine, EngineSettings};
use retrain_core::machine::Stage;
use retrain_core::report::{CycleReport, LabelStatus};
use retrain_core::CancellationToken;

use crate::support::*;

fn get(c: &std::sync::atomic::AtomicUsize) -> usize {
    c.load(Ordering::SeqCst)
}

async fn cycle(engine: &Engine) -> CycleReport {
    engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap()
}

/// An engine over `store` with its own owner and the given lock TTL and
/// parallelism.
fn engine_as(
    store: &MemStore,
    world: &World,
    labels: &[&str],
    owner: &str,
    lock_ttl: Duration,
    parallel: usize,
) -> Engine {
    let bindings = labels
        .iter()
        .map(|l| binding(world, plan(l), prepare(world)))
        .collect();
    Engine::new(
        std::sync::Arc::new(store.clone()),
        Some(std::sync::Arc::new(FakeCounts(world.clone()))),
        bindings,
        EngineSettings {
            poll_jitter: 0.0,
            lock_ttl,
            max_parallel_labels: parallel,
            owner: LockOwner::generate(owner),
            ..EngineSettings::default()
        },
    )
}

/// Finding 1: with more labels than the parallelism and trainings longer
/// than `lock_ttl`, queued labels used to lose their locks (the heartbeat
/// started only in phase two) and a second orchestrator drove them too.
#[tokio::test(start_paused = true)]
async fn queued_labels_keep_their_locks_and_every_label_trains_once() {
    let world = World::new();
    *world.train_time.lock().unwrap() = Duration::from_secs(5);
    let store = MemStore::new();
    let labels = ["a", "b", "c", "d"];
    let ttl = Duration::from_secs(2);
    let first = engine_as(&store, &world, &labels, "first", ttl, 1);
    let second = engine_as(&store, &world, &labels, "second", ttl, 1);
    let (one, two) = tokio::join!(cycle(&first), async {
        // The second orchestrator starts while the first trains label `a`.
        tokio::time::sleep(Duration::from_secs(3)).await;
        cycle(&second).await
    });
    for label in labels {
        let trained = store
            .finished_runs(label)
            .iter()
            .filter(|r| r.candidate.is_some())
            .count();
        assert_eq!(trained, 1, "label {label} trained {trained} times");
    }
    assert_eq!(get(&world.counters.starts), 4);
    assert_eq!(
        store.fenced_writes(),
        0,
        "no stale holder ever tried to write"
    );
    let statuses = |r: &CycleReport| r.labels.iter().map(|l| l.status).collect::<Vec<_>>();
    // The labels share one fake registry: the first promotes, the others
    // (same metrics) are rejected; all of them were driven to the end.
    assert!(
        statuses(&one)
            .iter()
            .all(|s| matches!(s, LabelStatus::Promoted | LabelStatus::Rejected)),
        "{:?}",
        statuses(&one)
    );
    assert!(
        statuses(&two).iter().all(|s| *s == LabelStatus::Busy),
        "{:?}",
        statuses(&two)
    );
}

/// Findings 2 and 3: a holder whose renewals fail for longer than the TTL
/// stops before its next side effect, leaves the training job to the next
/// holder (no cancel, no second start), and the next holder finishes it.
#[tokio::test(start_paused = true)]
async fn a_holder_that_cannot_renew_stops_before_its_next_side_effect() {
    let world = World::new();
    *world.train_time.lock().unwrap() = Duration::from_secs(10);
    let store = MemStore::new();
    let ttl = Duration::from_secs(3);
    let stale = engine_as(&store, &world, &["department"], "stale", ttl, 1);
    let outage = store.renewals_fail.clone();
    let (report, ()) = tokio::join!(cycle(&stale), async {
        // The store becomes unreachable for this holder once training runs.
        tokio::time::sleep(Duration::from_millis(500)).await;
        outage.store(true, Ordering::SeqCst);
    });
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::LockLost, "{label:?}");
    assert!(
        label.error.as_deref().unwrap().contains("lock_ttl"),
        "{label:?}"
    );
    assert_eq!(get(&world.counters.starts), 1);
    assert_eq!(
        get(&world.counters.promotes),
        0,
        "no side effect after the loss"
    );
    assert_eq!(get(&world.counters.notifies), 0);
    assert_eq!(
        get(&world.counters.cancels),
        0,
        "the job is left to the next holder"
    );
    assert_eq!(
        store.fenced_writes(),
        0,
        "it stopped before even trying to write"
    );

    // Another orchestrator takes over after the TTL and finishes the same job.
    outage.store(false, Ordering::SeqCst);
    tokio::time::sleep(ttl).await;
    let next = engine_as(&store, &world, &["department"], "next", ttl, 1);
    let report = cycle(&next).await;
    assert_eq!(report.labels[0].status, LabelStatus::Promoted, "{report:?}");
    assert!(report.labels[0].resumed);
    assert_eq!(
        get(&world.counters.starts),
        1,
        "the job was adopted, not restarted"
    );
    assert_eq!(get(&world.counters.promotes), 1);
    assert_eq!(next.lock_takeovers(), 1, "the stale holder never released");
    assert_eq!(stale.lock_takeovers(), 0);

    // A lock released at the end of a run is free: taking it again is no
    // takeover, neither for its last holder nor for another engine.
    cycle(&next).await;
    assert_eq!(next.lock_takeovers(), 1);
    let third = engine_as(&store, &world, &["department"], "third", ttl, 1);
    cycle(&third).await;
    assert_eq!(third.lock_takeovers(), 0);
}

/// Finding 2: a holder paused past its TTL (no heartbeat at all) whose lock
/// was taken over is refused by the store at its next write: it does
/// nothing more, the new holder's run is untouched.
#[tokio::test(start_paused = true)]
async fn a_stale_fence_is_refused_by_the_store() {
    let world = World::new();
    let store = MemStore::new();
    let ttl = Duration::from_secs(2);
    let first = engine_as(&store, &world, &["department"], "first", ttl, 1);
    // Simulate a takeover between two of the first holder's writes: the
    // lock changes hands (new token) while the first engine trains.
    let takeover = {
        let store = store.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            store.hold_lock("department", "thief");
        }
    };
    let (report, ()) = tokio::join!(cycle(&first), takeover);
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::LockLost, "{label:?}");
    assert!(
        label.error.as_deref().unwrap().contains("thief"),
        "{label:?}"
    );
    assert_eq!(get(&world.counters.promotes), 0);
    assert_eq!(get(&world.counters.notifies), 0);
    assert!(store.cursor_of("department").consumed_version.is_none());
}

/// Finding 5: Ctrl-C during training used to record `TrainingLost` on
/// resume; two interrupts exhausted `max_attempts = 2`.
#[tokio::test(start_paused = true)]
async fn interrupting_training_twice_then_resuming_counts_one_attempt() {
    let world = World::new();
    *world.train_time.lock().unwrap() = Duration::from_secs(10);
    let store = MemStore::new();
    let engine = department_engine(&store, &world);
    for interrupt in 1..=2 {
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        let (report, ()) = tokio::join!(
            engine.run_cycle(CycleRequest::default(), cancel),
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                trigger.cancel();
            }
        );
        let label = &report.unwrap().labels[0];
        assert_eq!(label.status, LabelStatus::Interrupted, "{label:?}");
        assert_eq!(get(&world.counters.cancels), interrupt);
    }
    let report = cycle(&engine).await;
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::Promoted, "{label:?}");
    assert!(label.lost_attempts.is_empty(), "{label:?}");
    assert_eq!(
        get(&world.counters.starts),
        3,
        "two cancelled jobs, one finished"
    );
    let run = &store.finished_runs("department")[0];
    assert_eq!(run.attempt, 1, "attempts counted");
    assert_eq!(run.starts, 3);
    assert_eq!(run.cancelled_jobs.len(), 2);
}

/// Finding 6: a registry outage at promotion used to fail the run and
/// commit the cursor: a passed model was never promoted.
#[tokio::test(start_paused = true)]
async fn a_registry_outage_defers_the_promotion_to_the_next_cycle() {
    let world = World::new();
    world.promote_outages.store(2, Ordering::SeqCst);
    let store = MemStore::new();
    let engine = department_engine(&store, &world);
    for cycle_no in 1..=2 {
        let report = cycle(&engine).await;
        let label = &report.labels[0];
        assert_eq!(
            label.status,
            LabelStatus::Deferred,
            "cycle {cycle_no}: {label:?}"
        );
        assert_eq!(label.stage, Some(Stage::Promoting));
        assert!(label.error.as_deref().unwrap().contains("503"), "{label:?}");
        assert!(report.any_failed(), "a deferred label is not a success");
        assert!(
            store.cursor_of("department").consumed_version.is_none(),
            "the cursor waits for the promotion"
        );
        assert_eq!(get(&world.counters.notifies), 0);
    }
    let report = cycle(&engine).await;
    assert_eq!(report.labels[0].status, LabelStatus::Promoted, "{report:?}");
    assert_eq!(get(&world.counters.promotes), 1);
    assert_eq!(get(&world.counters.starts), 1, "never retrained");
    assert_eq!(get(&world.counters.restarts), 1);
    assert_eq!(
        get(&world.counters.count_queries),
        1,
        "resumes, no new count"
    );
    let finished = store.finished_runs("department");
    assert_eq!(finished.len(), 1, "one run, committed once");
    assert_eq!(store.consumed("department").as_deref().unwrap(), "v2");
}

/// After `max_step_retries` failing cycles the run fails (and says why).
#[tokio::test(start_paused = true)]
async fn a_lasting_outage_fails_the_run_after_max_step_retries() {
    let world = World::new();
    world.promote_outages.store(100, Ordering::SeqCst);
    let store = MemStore::new();
    let mut p = plan("department");
    p.max_step_retries = 2;
    let engine = engine(&store, &world, vec![binding(&world, p, prepare(&world))]);
    assert_eq!(cycle(&engine).await.labels[0].status, LabelStatus::Deferred);
    let report = cycle(&engine).await;
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::Failed, "{label:?}");
    assert!(
        label
            .error
            .as_deref()
            .unwrap()
            .contains("max_step_retries = 2"),
        "{label:?}"
    );
    assert_eq!(get(&world.counters.notifies), 1, "the failure is notified");
}

/// A notifier outage is retried next cycle without re-sending to the
/// notifiers that already delivered.
#[tokio::test(start_paused = true)]
async fn a_notifier_outage_is_retried_without_repeating_deliveries() {
    let world = World::new();
    world.notifier_outages.store(1, Ordering::SeqCst);
    let store = MemStore::new();
    let engine = department_engine(&store, &world);
    let first = cycle(&engine).await;
    assert_eq!(first.labels[0].status, LabelStatus::Deferred, "{first:?}");
    assert_eq!(
        get(&world.counters.promotes),
        1,
        "promoted before notifying"
    );
    let second = cycle(&engine).await;
    assert_eq!(second.labels[0].status, LabelStatus::Promoted, "{second:?}");
    assert_eq!(get(&world.counters.notifies), 1);
    assert_eq!(get(&world.counters.promotes), 1);
}

/// A reading failure of the baseline (registry down) keeps the candidate.
#[tokio::test(start_paused = true)]
async fn a_registry_outage_while_gating_keeps_the_candidate() {
    let world = World::new();
    world.registry_outages.store(1, Ordering::SeqCst);
    let store = MemStore::new();
    let engine = department_engine(&store, &world);
    let first = cycle(&engine).await;
    assert_eq!(first.labels[0].status, LabelStatus::Deferred);
    assert_eq!(first.labels[0].stage, Some(Stage::Gating));
    let second = cycle(&engine).await;
    assert_eq!(second.labels[0].status, LabelStatus::Promoted);
    assert_eq!(get(&world.counters.starts), 1);
}

/// A trainer result with NaN is gated fail-closed, naming the metric.
#[tokio::test(start_paused = true)]
async fn a_nan_metric_is_rejected_naming_the_metric() {
    let world = World::new();
    world
        .candidate_metrics
        .lock()
        .unwrap()
        .insert("dice".into(), f64::NAN);
    let store = MemStore::new();
    let engine = department_engine(&store, &world);
    let report = cycle(&engine).await;
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::Rejected, "{label:?}");
    let reason = &label.verdict.as_ref().unwrap().reason;
    assert!(
        reason.contains("dice") && reason.contains("NaN"),
        "{reason}"
    );
    assert_eq!(get(&world.counters.promotes), 0);
}

/// One engine never drives a label twice at once (two triggers in one
/// process): the second is reported busy and the first is not fenced out.
#[tokio::test(start_paused = true)]
async fn two_cycles_of_one_engine_never_drive_the_same_label() {
    let world = World::new();
    let store = MemStore::new();
    let engine = engine_as(
        &store,
        &world,
        &["department"],
        "server",
        Duration::from_secs(60),
        4,
    );
    let (one, two) = tokio::join!(cycle(&engine), async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        cycle(&engine).await
    });
    assert_eq!(one.labels[0].status, LabelStatus::Promoted, "{one:?}");
    assert_eq!(two.labels[0].status, LabelStatus::Busy, "{two:?}");
    assert_eq!(get(&world.counters.starts), 1);
    assert_eq!(store.fenced_writes(), 0);
}

/// A webhook's `Engine::wake` cuts a poll interval short: with a 60 s
/// interval, a publication announced after 1 s is picked up at once.
#[tokio::test(start_paused = true)]
async fn wake_cuts_the_poll_interval_short() {
    let world = World::new();
    let store = MemStore::new();
    let mut p = plan("department");
    p.poll_interval = Duration::from_secs(60);
    p.poll_timeout = Duration::from_secs(600);
    // The prepare job publishes nothing by itself (error-free, no dataset).
    let quiet: std::sync::Arc<dyn retrain_core::ports::SpaceController> =
        std::sync::Arc::new(QuietPrepare);
    let engine = std::sync::Arc::new(engine(&store, &world, vec![binding(&world, p, quiet)]));
    let label = retrain_core::domain::Label::new("department").unwrap();
    let started = tokio::time::Instant::now();
    let waker = {
        let engine = engine.clone();
        let world = world.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            *world.published.lock().unwrap() = Some(dataset("v2", 500, 3600));
            engine.wake(&label);
        }
    };
    let (report, ()) = tokio::join!(cycle(&engine), waker);
    assert_eq!(report.labels[0].status, LabelStatus::Promoted, "{report:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "woken after {took:?}");
}

/// A prepare job that restarts without publishing anything.
struct QuietPrepare;

#[async_trait::async_trait]
impl retrain_core::ports::SpaceController for QuietPrepare {
    async fn restart(
        &self,
        _: &retrain_core::domain::JobKey,
    ) -> Result<(), retrain_core::ports::PortError> {
        Ok(())
    }
    async fn stage(
        &self,
    ) -> Result<retrain_core::domain::SpaceStage, retrain_core::ports::PortError> {
        Ok(retrain_core::domain::SpaceStage::Running)
    }
    fn describe(&self) -> String {
        "quiet prepare".into()
    }
}

#[test]
fn engines_describe_themselves_and_name_their_process() {
    let process = retrain_core::domain::ProcessIdentity {
        host: "h".into(),
        pid: 7,
        start: 9,
    };
    let settings = EngineSettings::for_process(&process);
    assert_eq!(settings.owner.process(), Some(process));
    assert_eq!(settings.lock_ttl, Duration::from_secs(60));
    let world = World::new();
    let store = MemStore::new();
    let engine = engine_as(&store, &world, &["a", "b"], "me", Duration::from_secs(5), 3);
    assert_eq!(engine.labels().count(), 2);
    assert_eq!(engine.settings().lock_ttl, Duration::from_secs(5));
    assert_eq!(engine.settings().max_parallel_labels, 3);
    let debug = format!("{engine:?}");
    assert!(
        debug.contains("\"a\"") && debug.contains("\"b\""),
        "{debug}"
    );
    let binding = engine.labels().next().unwrap();
    let debug = format!("{binding:?}");
    assert!(
        debug.contains("fake metadata") && debug.contains("fake trainer"),
        "{debug}"
    );
}

/// `--label` selects: only the requested labels are driven, unknown ones are
/// refused before anything runs.
#[tokio::test(start_paused = true)]
async fn a_cycle_drives_only_the_requested_labels() {
    let world = World::new();
    let store = MemStore::new();
    let engine = engine_as(
        &store,
        &world,
        &["a", "b", "c"],
        "me",
        Duration::from_secs(60),
        2,
    );
    let label = |l: &str| retrain_core::domain::Label::new(l).unwrap();
    let report = engine
        .run_cycle(
            CycleRequest {
                labels: Some(vec![label("b"), label("b")]),
                dry_run: false,
            },
            CancellationToken::new(),
        )
        .await
        .unwrap();
    let driven: Vec<_> = report.labels.iter().map(|l| l.label.as_str()).collect();
    assert_eq!(driven, ["b"]);
    let unknown = engine
        .run_cycle(
            CycleRequest {
                labels: Some(vec![label("zzz")]),
                dry_run: false,
            },
            CancellationToken::new(),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        unknown.contains("zzz") && unknown.contains("a, b, c"),
        "{unknown}"
    );
    let all = engine
        .run_cycle(
            CycleRequest {
                labels: Some(vec![]),
                dry_run: true,
            },
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(all.labels.len(), 3);
}

/// A trainer that records when each label's job started and makes label
/// `a`'s training last 30 s (the others take the world's 1 s).
struct SlowFirstLabel {
    inner: FakeTrainer,
    started: std::sync::Arc<std::sync::Mutex<Vec<(String, tokio::time::Instant)>>>,
}

#[async_trait::async_trait]
impl retrain_core::ports::Trainer for SlowFirstLabel {
    async fn start(
        &self,
        request: &retrain_core::ports::TrainingRequest,
    ) -> Result<retrain_core::domain::TrainingHandle, retrain_core::ports::PortError> {
        self.started
            .lock()
            .unwrap()
            .push((request.label.to_string(), tokio::time::Instant::now()));
        self.inner.start(request).await
    }
    async fn wait(
        &self,
        request: &retrain_core::ports::TrainingRequest,
        handle: &retrain_core::domain::TrainingHandle,
    ) -> Result<retrain_core::domain::TrainingOutcome, retrain_core::ports::PortError> {
        if request.label.as_str() == "a" {
            tokio::time::sleep(Duration::from_secs(29)).await;
        }
        self.inner.wait(request, handle).await
    }
    async fn cancel(
        &self,
        handle: &retrain_core::domain::TrainingHandle,
    ) -> Result<(), retrain_core::ports::PortError> {
        self.inner.cancel(handle).await
    }
    fn describe(&self) -> String {
        "slow first label".into()
    }
}

/// With two permits and label `a` training for 30 s, label `c` starts
/// training as soon as `b` is done, not after `a` (a permit is freed when
/// its label finishes, whatever the labels before it are doing), and the
/// cycle's report still lists the labels in their order.
#[tokio::test(start_paused = true)]
async fn a_slow_label_holds_only_its_own_permit() {
    let world = World::new();
    *world.train_time.lock().unwrap() = Duration::from_secs(1);
    let store = MemStore::new();
    let started = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let bindings = ["a", "b", "c"]
        .iter()
        .map(|l| {
            let mut binding = binding(&world, plan(l), prepare(&world));
            binding.trainer = std::sync::Arc::new(SlowFirstLabel {
                inner: FakeTrainer(world.clone()),
                started: started.clone(),
            });
            binding
        })
        .collect();
    let engine = Engine::new(
        std::sync::Arc::new(store.clone()),
        Some(std::sync::Arc::new(FakeCounts(world.clone()))),
        bindings,
        EngineSettings {
            poll_jitter: 0.0,
            max_parallel_labels: 2,
            ..EngineSettings::default()
        },
    );
    let began = tokio::time::Instant::now();
    let report = cycle(&engine).await;
    let order: Vec<&str> = report.labels.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(order, ["a", "b", "c"], "the report keeps the labels' order");
    assert!(
        report
            .labels
            .iter()
            .all(|r| r.stage == Some(Stage::Done) && r.candidate.is_some()),
        "every label trained and concluded: {report:?}"
    );
    let started = started.lock().unwrap().clone();
    let c = started
        .iter()
        .find(|(label, _)| label == "c")
        .map(|(_, at)| *at - began)
        .expect("c trained");
    assert!(
        c < Duration::from_secs(20),
        "c waited for a's permit: it started training {c:?} into the cycle"
    );
}
