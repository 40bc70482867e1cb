//! Engine tests: every §3 invariant, crash-resume at every journaled step,
//! locks, shared prepare, dry-run, failure isolation, leases.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use retrain_core::domain::{Label, Lease, LockOutcome, LockOwner, RunId, SpaceStage};
use retrain_core::engine::CycleRequest;
use retrain_core::mocks::{MockCountSource, MockSpaceController, MockTrainer};
use retrain_core::ports::RunStore;

use retrain_core::report::LabelStatus;
use retrain_core::CancellationToken;

use crate::support::*;

fn get(c: &std::sync::atomic::AtomicUsize) -> usize {
    c.load(Ordering::SeqCst)
}

async fn cycle(engine: &retrain_core::engine::Engine) -> retrain_core::report::CycleReport {
    engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn first_cycle_promotes_and_second_cycle_skips() {
    let world = World::new();
    let store = MemStore::new();
    let engine = department_engine(&store, &world);
    let report = cycle(&engine).await;
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::Promoted, "{label:?}");
    assert_eq!(label.dataset_version.as_ref().unwrap().as_str(), "v2");
    assert_eq!(get(&world.counters.restarts), 1);
    assert_eq!(get(&world.counters.starts), 1);
    assert_eq!(get(&world.counters.promotes), 1);
    let cursor = store.cursor_of("department");
    assert_eq!(cursor.consumed_version.unwrap().as_str(), "v2");
    assert_eq!(
        cursor.watermark,
        Some(dataset("v2", 500, 3600).metadata.created_at)
    );

    let second = cycle(&engine).await;
    assert_eq!(second.labels[0].status, LabelStatus::Skipped);
    assert_eq!(second.labels[0].measured, Some(6));
    assert_eq!(
        get(&world.counters.restarts),
        1,
        "no second prepare restart"
    );
    assert_eq!(get(&world.counters.starts), 1, "no second training");
}

/// A training intent this engine has just journaled is started as a first
/// start (the trainer need not look for a job to adopt); the intent of a
/// resumed run is not (the crash campaign below covers that side: a
/// resumed intent called first would start a second job there).
#[tokio::test(start_paused = true)]
async fn an_intent_journaled_now_is_a_first_start() {
    let world = World::new();
    let store = MemStore::new();
    let engine = department_engine(&store, &world);
    assert_eq!(cycle(&engine).await.labels[0].status, LabelStatus::Promoted);
    assert_eq!(get(&world.counters.starts), 1);
    assert_eq!(get(&world.counters.first_starts), 1);
    assert_eq!(get(&world.counters.adopted), 0);
}

/// A job whose start is the whole job (`Trainer::start_is_the_job`): its
/// handle is journaled with its outcome, one write instead of two, and the
/// journal keeps every line.
#[tokio::test(start_paused = true)]
async fn the_handle_of_a_job_whose_start_is_the_job_goes_with_its_outcome() {
    async fn run(start_is_the_job: bool) -> (usize, Vec<&'static str>) {
        let world = World::new();
        world
            .start_is_the_job
            .store(start_is_the_job, Ordering::SeqCst);
        let store = MemStore::new();
        let engine = department_engine(&store, &world);
        assert_eq!(cycle(&engine).await.labels[0].status, LabelStatus::Promoted);
        assert_eq!(get(&world.counters.starts), 1);
        (store.writes(), store.journal_events())
    }
    let (waited, waited_lines) = run(false).await;
    let (started, started_lines) = run(true).await;
    assert_eq!(started, waited - 1, "one write fewer");
    assert_eq!(started_lines, waited_lines, "the same journal lines");
    assert!(started_lines.contains(&"training_started"));
}

/// A trainer whose job runs after its start (`Trainer::start_is_the_job`
/// left at its default): the job's handle is durable before the wait, so a
/// process that dies while the job runs leaves a run that knows its job.
#[tokio::test(start_paused = true)]
async fn the_handle_of_a_running_job_is_journaled_before_the_wait() {
    let world = World::new();
    let store = MemStore::new();
    let mut b = binding(&world, plan("department"), prepare(&world));
    b.trainer = Arc::new(SlowTrainer::default());
    let e = engine(&store, &world, vec![b]);
    let cancel = CancellationToken::new();
    let (c, watched) = (cancel.clone(), store.clone());
    let during = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let lines = watched.journal_events();
        c.cancel();
        lines
    });
    e.run_cycle(CycleRequest::default(), cancel).await.unwrap();
    let lines = during.await.unwrap();
    assert_eq!(lines.last(), Some(&"training_started"), "{lines:?}");
}

/// The final state of an uninterrupted run, for comparison.
#[derive(Debug, PartialEq)]
struct Final {
    consumed: Option<String>,
    production: Option<String>,
    restarts: usize,
    starts: usize,
    promotes: usize,
    acquires: usize,
    releases: usize,
    active_leases: usize,
}

fn final_state(store: &MemStore, world: &World) -> Final {
    Final {
        consumed: store
            .cursor_of("department")
            .consumed_version
            .map(|v| v.to_string()),
        production: world
            .production
            .lock()
            .unwrap()
            .as_ref()
            .map(|(v, _, _)| v.clone()),
        restarts: get(&world.counters.restarts),
        starts: get(&world.counters.starts),
        promotes: get(&world.counters.promotes),
        acquires: get(&world.counters.acquires),
        releases: get(&world.counters.releases),
        active_leases: store
            .leases()
            .iter()
            .filter(|l| l.released_at.is_none())
            .count(),
    }
}

#[tokio::test(start_paused = true)]
async fn crash_after_every_journaled_step_resumes_to_the_same_final_state() {
    crash_campaign(false).await;
}

/// The same campaign with a trainer whose start is the whole job: its
/// handle is journaled with its outcome, one write later than otherwise,
/// and a crash before that write must still adopt the job, not start it
/// again (`final_state` counts the starts).
#[tokio::test(start_paused = true)]
async fn crash_after_every_journaled_step_resumes_when_the_start_is_the_job() {
    crash_campaign(true).await;
}

/// Crash after every journal write of a leased, gated, promoted run (the
/// write kept, or lost), resume with a new engine, and compare with the
/// uninterrupted run.
async fn crash_campaign(start_is_the_job: bool) {
    let mut leased = plan("department");
    leased.leased = true;
    let new_world = || {
        let world = World::new();
        world
            .start_is_the_job
            .store(start_is_the_job, Ordering::SeqCst);
        world
    };

    // The uninterrupted run: its final state and how many journal writes it makes.
    let world = new_world();
    let store = MemStore::new();
    let e = engine(
        &store,
        &world,
        vec![binding(&world, leased.clone(), prepare(&world))],
    );
    assert_eq!(cycle(&e).await.labels[0].status, LabelStatus::Promoted);
    let expected = final_state(&store, &world);
    let steps = store.writes();
    // One write fewer when the handle goes with the outcome.
    let least = if start_is_the_job { 9 } else { 10 };
    assert!(
        steps >= least,
        "expected a journal write per transition, got {steps}"
    );
    assert_eq!(expected.acquires, 1);
    assert_eq!(expected.releases, 1);

    // Two kinds of crash after every journal write: the write persisted
    // (the process died right after it), or the write lost (the process
    // died between a side effect and the journal write of its outcome: the
    // resumed run repeats the intent, and the ports' idempotency per job key
    // / run id must absorb it).
    for lose_write in [false, true] {
        for crash_at in 1..=steps {
            let world = new_world();
            let store = MemStore::new();
            let crashing = if lose_write {
                store.losing_write(crash_at)
            } else {
                store.crashing_after(crash_at)
            };
            let first = engine(
                &crashing,
                &world,
                vec![binding(&world, leased.clone(), prepare(&world))],
            );
            let _ = cycle(&first).await;
            drop(first);

            let restarted = store.restarted();
            let second = engine(
                &restarted,
                &world,
                vec![binding(&world, leased.clone(), prepare(&world))],
            );
            let report = cycle(&second).await;
            let what = format!("crash at write {crash_at} (write lost: {lose_write})");
            assert!(
                matches!(
                    report.labels[0].status,
                    LabelStatus::Promoted | LabelStatus::Skipped
                ),
                "{what}: {:?}",
                report.labels[0]
            );
            assert_eq!(final_state(&store, &world), expected, "{what}");
            let promoted_runs = store
                .finished_runs("department")
                .into_iter()
                .filter(|r| r.promoted.is_some())
                .count();
            assert_eq!(promoted_runs, 1, "{what}");
            // Notifications are at-least-once: never lost, repeated at most
            // once (a crash between sending and journaling it).
            let notifies = get(&world.counters.notifies);
            assert!(
                (1..=2).contains(&notifies),
                "{what}: {notifies} notifications"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn shared_prepare_job_is_restarted_once_for_all_labels() {
    let world = World::new();
    let store = MemStore::new();
    let mut mock = MockSpaceController::new();
    let w = world.clone();
    mock.expect_restart().times(1).returning(move |_| {
        *w.published.lock().unwrap() = Some(dataset("v2", 500, 3600));
        Ok(())
    });
    mock.expect_stage().returning(|| Ok(SpaceStage::Running));
    mock.expect_describe()
        .return_const("mock prepare".to_string());
    let shared: Arc<dyn retrain_core::ports::SpaceController> = Arc::new(mock);
    let labels = ["a", "b", "c", "d", "e"];
    let bindings = labels
        .iter()
        .map(|l| binding(&world, plan(l), shared.clone()))
        .collect();
    let e = engine(&store, &world, bindings);
    let report = cycle(&e).await;
    // Every label saw the new dataset (one registry is shared here, so the
    // first promotion makes the others' equal metrics a reject).
    assert!(
        report.labels.iter().all(|l| matches!(
            l.status,
            LabelStatus::Promoted | LabelStatus::Rejected
        ) && l.dataset_version.as_ref().map(|v| v.as_str())
            == Some("v2")),
        "{report:?}"
    );
    assert_eq!(
        get(&world.counters.starts),
        labels.len(),
        "one training per label"
    );
}

#[tokio::test(start_paused = true)]
async fn one_count_query_per_cycle_for_labels_sharing_a_watermark() {
    let world = World::new();
    let store = MemStore::new();
    let mut counts = MockCountSource::new();
    // One call for every label at its own watermark (read before the
    // cycle), never one per label or per watermark.
    counts.expect_counts().times(0);
    counts
        .expect_counts_per_label()
        .withf(|watermarks| {
            watermarks.len() == 3
                && watermarks
                    .values()
                    .all(|w| *w == chrono::DateTime::<chrono::Utc>::UNIX_EPOCH)
        })
        .times(1)
        .returning(|_| Ok(Default::default()));
    let bindings = ["a", "b", "c"]
        .iter()
        .map(|l| binding(&world, plan(l), prepare(&world)))
        .collect();
    let e = retrain_core::engine::Engine::new(
        Arc::new(store.clone()),
        Some(Arc::new(counts)),
        bindings,
        Default::default(),
    );
    let report = cycle(&e).await;
    assert!(report
        .labels
        .iter()
        .all(|l| l.status == LabelStatus::Skipped));
}

#[tokio::test(start_paused = true)]
async fn dry_run_reads_only() {
    let world = World::new();
    let store = MemStore::new();
    let mut prepare_mock = MockSpaceController::new();
    prepare_mock.expect_restart().times(0);
    prepare_mock
        .expect_describe()
        .return_const("mock".to_string());
    let mut trainer = MockTrainer::new();
    trainer.expect_start().times(0);
    trainer.expect_describe().return_const("mock".to_string());
    let mut b = binding(&world, plan("department"), Arc::new(prepare_mock));
    b.trainer = Arc::new(trainer);
    let e = engine(&store, &world, vec![b]);
    let report = e
        .run_cycle(
            CycleRequest {
                labels: None,
                dry_run: true,
            },
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert!(report.dry_run);
    assert_eq!(report.labels[0].status, LabelStatus::Planned);
    assert_eq!(store.writes(), 0, "dry-run journals nothing");
    assert_eq!(get(&world.counters.promotes), 0);
    assert!(store.finished_runs("department").is_empty());
}

#[tokio::test(start_paused = true)]
async fn one_label_failing_never_stops_another() {
    let world = World::new();
    let failing_world = World::new();
    *failing_world.trainer_fails.lock().unwrap() = true;
    let store = MemStore::new();
    let mut bad = binding(&world, plan("a"), prepare(&world));
    bad.trainer = Arc::new(FakeTrainer(failing_world.clone()));
    let good = binding(&world, plan("b"), prepare(&world));
    let e = engine(&store, &world, vec![bad, good]);
    let report = cycle(&e).await;
    let a = &report.labels[0];
    let b = &report.labels[1];
    assert_eq!(a.status, LabelStatus::Failed);
    assert!(
        a.error.as_ref().unwrap().contains("CUDA out of memory"),
        "{a:?}"
    );
    assert_eq!(b.status, LabelStatus::Promoted);
    assert_eq!(
        store.cursor_of("a").consumed_version,
        None,
        "failed training consumes nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn a_label_locked_by_another_orchestrator_is_reported_busy() {
    let world = World::new();
    let store = MemStore::new();
    store.hold_lock("department", "other-host-42");
    let e = department_engine(&store, &world);
    let report = cycle(&e).await;
    assert_eq!(report.labels[0].status, LabelStatus::Busy);
    assert!(report.labels[0]
        .error
        .as_ref()
        .unwrap()
        .contains("other-host-42"));
    assert_eq!(get(&world.counters.count_queries), 0);
}

#[tokio::test(start_paused = true)]
async fn two_engines_on_one_store_never_drive_the_same_label() {
    let world = World::new();
    let store = MemStore::new();
    let e1 = department_engine(&store, &world);
    let e2 = department_engine(&store, &world);
    let (r1, r2) = tokio::join!(cycle(&e1), cycle(&e2));
    let statuses = [r1.labels[0].status, r2.labels[0].status];
    assert!(statuses.contains(&LabelStatus::Busy), "{statuses:?}");
    assert_eq!(get(&world.counters.starts), 1);
    assert_eq!(get(&world.counters.restarts), 1);
}

#[tokio::test(start_paused = true)]
async fn lost_trainings_are_retried_up_to_max_attempts() {
    let world = World::new();
    world.lose_trainings.store(1, Ordering::SeqCst);
    let store = MemStore::new();
    let e = department_engine(&store, &world);
    let report = cycle(&e).await;
    assert_eq!(report.labels[0].status, LabelStatus::Promoted);
    assert_eq!(report.labels[0].lost_attempts.len(), 1);
    assert_eq!(get(&world.counters.starts), 2);

    let world = World::new();
    world.lose_trainings.store(5, Ordering::SeqCst);
    let store = MemStore::new();
    let e = department_engine(&store, &world);
    let report = cycle(&e).await;
    assert_eq!(report.labels[0].status, LabelStatus::Failed);
    assert!(report.labels[0]
        .error
        .as_ref()
        .unwrap()
        .contains("max_attempts"));
    assert_eq!(get(&world.counters.starts), 2);
}

/// An unreleased lease `lease-<label>` of `label`'s run, running until
/// `max_until`.
fn active_lease(label: &str, max_until: chrono::DateTime<chrono::Utc>) -> Lease {
    Lease {
        id: format!("lease-{label}"),
        label: Label::new(label).unwrap(),
        run_id: RunId(format!("run-{label}")),
        provider: "fake".into(),
        resources: vec![format!("i-{label}")],
        region: None,
        acquired_at: max_until - chrono::Duration::hours(2),
        max_until,
        attributes: Default::default(),
        released_at: None,
    }
}

#[tokio::test(start_paused = true)]
async fn reaping_stops_expired_and_orphaned_leases_and_with_force_every_one() {
    let world = World::new();
    let store = MemStore::new();
    let labels = ["live", "expired", "orphaned"];
    let bindings = labels
        .iter()
        .map(|label| {
            let mut p = plan(label);
            p.leased = true;
            binding(&world, p, prepare(&world))
        })
        .collect();
    let e = engine(&store, &world, bindings);
    let now = chrono::Utc::now();
    for (label, max_until) in [
        ("live", now + chrono::Duration::hours(1)),
        ("expired", now - chrono::Duration::minutes(1)),
        ("orphaned", now + chrono::Duration::hours(1)),
    ] {
        store
            .put_lease_unfenced(&active_lease(label, max_until))
            .await
            .unwrap();
        // Its machines are running.
        world
            .running_leases
            .lock()
            .unwrap()
            .insert(format!("lease-{label}"));
        if label != "orphaned" {
            // A live orchestrator drives the run that holds this lease.
            let owner = LockOwner(format!("orchestrator-{label}"));
            let taken = store
                .try_lock(
                    &Label::new(label).unwrap(),
                    &owner,
                    Duration::from_secs(600),
                )
                .await
                .unwrap();
            assert!(matches!(taken, LockOutcome::Acquired { .. }));
        }
    }
    let ids = |leases: Vec<Lease>| -> Vec<String> {
        let mut ids: Vec<String> = leases.into_iter().map(|l| l.id).collect();
        ids.sort();
        ids
    };
    let reaped = ids(e.reap_leases(false).await.unwrap());
    assert_eq!(reaped, ["lease-expired", "lease-orphaned"]);
    assert_eq!(get(&world.counters.releases), 2);
    // The live run's lease goes only when forced.
    let forced = ids(e.reap_leases(true).await.unwrap());
    assert_eq!(forced, ["lease-live"]);
    assert_eq!(get(&world.counters.releases), 3);
}

/// A lease provider whose `release` fails (transiently) `failures` times
/// before it succeeds, recording when each call came.
struct FlakyRelease {
    failures: std::sync::atomic::AtomicUsize,
    calls: std::sync::Mutex<Vec<tokio::time::Instant>>,
}

#[async_trait::async_trait]
impl retrain_core::ports::LeaseProvider for FlakyRelease {
    fn plan(&self) -> retrain_core::ports::LeasePlan {
        retrain_core::ports::LeasePlan {
            provider: "flaky".into(),
            resources: vec!["i-flaky".into()],
            region: None,
            max: Duration::from_secs(3600),
        }
    }
    async fn acquire(&self, lease: Lease) -> Result<Lease, retrain_core::ports::PortError> {
        Ok(lease)
    }
    async fn release(&self, _: &Lease) -> Result<(), retrain_core::ports::PortError> {
        self.calls.lock().unwrap().push(tokio::time::Instant::now());
        let left = self.failures.load(Ordering::SeqCst);
        if left == 0 {
            return Ok(());
        }
        self.failures.store(left - 1, Ordering::SeqCst);
        Err(retrain_core::ports::PortError::Transient(
            "ec2 answered 503".into(),
        ))
    }
}

/// Reap one orphaned lease through a provider failing `failures` times:
/// whether it was reaped, and the delays between the release calls.
async fn reap_through_flaky_release(failures: usize) -> (bool, Vec<Duration>) {
    let world = World::new();
    let store = MemStore::new();
    let provider = Arc::new(FlakyRelease {
        failures: failures.into(),
        calls: Default::default(),
    });
    let mut p = plan("department");
    p.leased = true;
    let mut b = binding(&world, p, prepare(&world));
    b.lease = Some(provider.clone());
    let e = engine(&store, &world, vec![b]);
    let max_until = chrono::Utc::now() + chrono::Duration::hours(1);
    store
        .put_lease_unfenced(&active_lease("department", max_until))
        .await
        .unwrap();
    let reaped = !e.reap_leases(false).await.unwrap().is_empty();
    let calls = provider.calls.lock().unwrap().clone();
    let gaps = calls.windows(2).map(|w| w[1] - w[0]).collect();
    (reaped, gaps)
}

#[tokio::test(start_paused = true)]
async fn releasing_a_lease_retries_transient_failures_with_backoff_three_times() {
    // Two failures: released at the third call, after 1 s then 2 s.
    let (reaped, gaps) = reap_through_flaky_release(2).await;
    assert!(reaped);
    assert_eq!(gaps, [Duration::from_secs(1), Duration::from_secs(2)]);
    // Failing for good: three calls, then given up (the lease stays active).
    let (reaped, gaps) = reap_through_flaky_release(usize::MAX).await;
    assert!(!reaped);
    assert_eq!(gaps, [Duration::from_secs(1), Duration::from_secs(2)]);
}

#[tokio::test(start_paused = true)]
async fn a_leased_run_trains_and_promotes_under_its_lease_and_a_plain_one_under_none() {
    for leased in [true, false] {
        let world = World::new();
        let store = MemStore::new();
        let mut p = plan("department");
        p.leased = leased;
        let e = engine(&store, &world, vec![binding(&world, p, prepare(&world))]);
        let report = cycle(&e).await;
        assert_eq!(report.labels[0].status, LabelStatus::Promoted);
        let lease = store.leases().first().map(|l| l.id.clone());
        assert_eq!(lease.is_some(), leased);
        for l in store.leases() {
            // The provider's `max` (one hour) from the acquisition on.
            assert_eq!(l.max_until - l.acquired_at, chrono::Duration::hours(1));
        }
        let under = world.under_lease.lock().unwrap().clone();
        let steps: Vec<&str> = under.iter().map(|(step, _)| *step).collect();
        assert_eq!(steps, ["start", "promote"]);
        // The lease is released only after the promotion.
        assert!(under.iter().all(|(_, id)| *id == lease), "{under:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_released_on_success_reject_and_failure() {
    for case in ["promote", "reject", "fail"] {
        let world = World::new();
        match case {
            "reject" => {
                *world.production.lock().unwrap() = Some((
                    "1".into(),
                    [("dice".to_string(), 0.99), ("iou".to_string(), 0.99)]
                        .into_iter()
                        .collect(),
                    retrain_core::domain::RunId("old".into()),
                ))
            }
            "fail" => *world.trainer_fails.lock().unwrap() = true,
            _ => {}
        }
        let store = MemStore::new();
        let mut p = plan("department");
        p.leased = true;
        let e = engine(&store, &world, vec![binding(&world, p, prepare(&world))]);
        let report = cycle(&e).await;
        let expected = match case {
            "promote" => LabelStatus::Promoted,
            "reject" => LabelStatus::Rejected,
            _ => LabelStatus::Failed,
        };
        assert_eq!(report.labels[0].status, expected, "{case}");
        assert_eq!(get(&world.counters.acquires), 1, "{case}");
        assert_eq!(get(&world.counters.releases), 1, "{case}");
        assert!(
            store.leases().iter().all(|l| l.released_at.is_some()),
            "{case}"
        );
        if case == "reject" {
            assert_eq!(get(&world.counters.promotes), 0);
            let verdict = report.labels[0].verdict.as_ref().unwrap();
            assert!(!verdict.passed);
            assert_eq!(verdict.comparisons.len(), 2);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_error_stage_of_the_prepare_job_fails_fast() {
    let world = World::new();
    let store = MemStore::new();
    let mut p = plan("department");
    p.poll_timeout = Duration::from_secs(24 * 3600);
    let broken = Arc::new(FakePrepare {
        world: world.clone(),
        stage: SpaceStage::Error("BUILD_ERROR".into()),
    });
    let e = engine(&store, &world, vec![binding(&world, p, broken)]);
    let started = tokio::time::Instant::now();
    let report = cycle(&e).await;
    assert_eq!(report.labels[0].status, LabelStatus::Failed);
    assert!(report.labels[0]
        .error
        .as_ref()
        .unwrap()
        .contains("BUILD_ERROR"));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "did not wait for the timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unchanged_version_is_never_accepted_and_the_poll_times_out() {
    let world = World::new();
    let store = MemStore::new();
    // A prepare job that restarts but never publishes a new version.
    let mut mock = MockSpaceController::new();
    mock.expect_restart().times(1).returning(|_| Ok(()));
    mock.expect_stage().returning(|| Ok(SpaceStage::Running));
    mock.expect_describe().return_const("mock".to_string());
    *world.published.lock().unwrap() = Some(dataset("v1", 1_000_000, 0));
    let e = engine(
        &store,
        &world,
        vec![binding(&world, plan("department"), Arc::new(mock))],
    );
    let report = cycle(&e).await;
    assert_eq!(report.labels[0].status, LabelStatus::Failed);
    assert!(report.labels[0]
        .error
        .as_ref()
        .unwrap()
        .contains("timed out"));
    assert_eq!(get(&world.counters.starts), 0);
}

#[tokio::test(start_paused = true)]
async fn interrupt_leaves_the_run_resumable_and_stops_the_lease() {
    let world = World::new();
    let store = MemStore::new();
    let mut p = plan("department");
    p.leased = true;
    let slow = Arc::new(SlowTrainer::default());
    let mut b = binding(&world, p.clone(), prepare(&world));
    b.trainer = slow;
    let e = engine(&store, &world, vec![b]);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        c.cancel();
    });
    let report = e.run_cycle(CycleRequest::default(), cancel).await.unwrap();
    assert!(report.interrupted);
    assert_eq!(report.labels[0].status, LabelStatus::Interrupted);
    assert_eq!(
        get(&world.counters.releases),
        1,
        "lease stopped on interrupt"
    );

    // The next run resumes the journaled run instead of starting over.
    let restarted = store.restarted();
    let e2 = engine(
        &restarted,
        &world,
        vec![binding(&world, p, prepare(&world))],
    );
    let report = cycle(&e2).await;
    assert!(report.labels[0].resumed);
    assert_eq!(report.labels[0].status, LabelStatus::Promoted);
    assert_eq!(
        get(&world.counters.restarts),
        1,
        "prepare not restarted on resume"
    );
}

/// A trainer that does not say its jobs outlive an interrupt (the port's
/// default: a local job) has its job cancelled on interrupt, lease or not.
#[tokio::test(start_paused = true)]
async fn an_interrupt_cancels_a_local_job_without_a_lease_too() {
    let world = World::new();
    let store = MemStore::new();
    let slow = Arc::new(SlowTrainer::default());
    let mut b = binding(&world, plan("department"), prepare(&world));
    b.trainer = slow.clone();
    let e = engine(&store, &world, vec![b]);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        c.cancel();
    });
    let report = e.run_cycle(CycleRequest::default(), cancel).await.unwrap();
    assert_eq!(report.labels[0].status, LabelStatus::Interrupted);
    assert_eq!(slow.cancels.load(Ordering::SeqCst), 1);
}

/// A remote worker's job keeps running while the orchestrator restarts: the
/// interrupt neither cancels it nor journals it cancelled, and the resumed
/// run awaits that same job (no second start) to promotion. With a lease the
/// job is cancelled as before (stopping the lease stops it).
#[tokio::test(start_paused = true)]
async fn an_interrupt_leaves_a_job_that_outlives_it_running_for_the_resumed_run() {
    for leased in [false, true] {
        let world = World::new();
        world.detached_jobs.store(true, Ordering::SeqCst);
        *world.train_time.lock().unwrap() = Duration::from_secs(50);
        let store = MemStore::new();
        let mut p = plan("department");
        p.leased = leased;
        let e = engine(
            &store,
            &world,
            vec![binding(&world, p.clone(), prepare(&world))],
        );
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            c.cancel();
        });
        let report = e.run_cycle(CycleRequest::default(), cancel).await.unwrap();
        assert_eq!(report.labels[0].status, LabelStatus::Interrupted);
        assert_eq!(get(&world.counters.starts), 1);
        let expected_cancels = usize::from(leased);
        assert_eq!(
            get(&world.counters.cancels),
            expected_cancels,
            "leased: {leased}"
        );

        let restarted = store.restarted();
        let e2 = engine(
            &restarted,
            &world,
            vec![binding(&world, p, prepare(&world))],
        );
        let report = cycle(&e2).await;
        assert!(report.labels[0].resumed);
        assert_eq!(
            report.labels[0].status,
            LabelStatus::Promoted,
            "leased: {leased}: {:?}",
            report.labels[0]
        );
        if leased {
            assert_eq!(
                get(&world.counters.starts),
                2,
                "a cancelled job is restarted"
            );
        } else {
            assert_eq!(
                get(&world.counters.starts),
                1,
                "the same job awaited, not restarted"
            );
            assert_eq!(get(&world.counters.adopted), 0);
        }
    }
}

/// Trains forever; counts its cancels. Keeps the port's default
/// `outlives_interrupt` (a local job: cancelled on interrupt).
#[derive(Default)]
struct SlowTrainer {
    cancels: std::sync::atomic::AtomicUsize,
}
#[async_trait::async_trait]
impl retrain_core::ports::Trainer for SlowTrainer {
    async fn start(
        &self,
        _: &retrain_core::ports::TrainingRequest,
    ) -> Result<retrain_core::domain::TrainingHandle, retrain_core::ports::PortError> {
        Ok(retrain_core::domain::TrainingHandle {
            kind: "slow".into(),
            data: serde_json::json!({}),
        })
    }
    async fn wait(
        &self,
        _: &retrain_core::ports::TrainingRequest,
        _: &retrain_core::domain::TrainingHandle,
    ) -> Result<retrain_core::domain::TrainingOutcome, retrain_core::ports::PortError> {
        std::future::pending().await
    }
    async fn cancel(
        &self,
        _: &retrain_core::domain::TrainingHandle,
    ) -> Result<(), retrain_core::ports::PortError> {
        self.cancels.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn describe(&self) -> String {
        "slow".into()
    }
}

/// A registry that never answers (the leased host went away mid-gate).
struct HangingRegistry;
#[async_trait::async_trait]
impl retrain_core::ports::ModelRegistry for HangingRegistry {
    async fn production(
        &self,
        _: Option<retrain_core::domain::Lease>,
    ) -> Result<Option<retrain_core::domain::ProductionModel>, retrain_core::ports::PortError> {
        std::future::pending().await
    }
    async fn candidate_metrics(
        &self,
        _: String,
        _: Option<retrain_core::domain::Lease>,
    ) -> Result<retrain_core::domain::Metrics, retrain_core::ports::PortError> {
        std::future::pending().await
    }
    async fn promote(
        &self,
        _: retrain_core::domain::Candidate,
        _: retrain_core::domain::RunId,
        _: Option<retrain_core::domain::Lease>,
    ) -> Result<retrain_core::domain::PromotedVersion, retrain_core::ports::PortError> {
        std::future::pending().await
    }
    async fn version_exists(
        &self,
        _: String,
        _: Option<retrain_core::domain::Lease>,
    ) -> Result<bool, retrain_core::ports::PortError> {
        std::future::pending().await
    }
    async fn roll_back(
        &self,
        _: retrain_core::ports::RegistryRollback,
        _: Option<retrain_core::domain::Lease>,
    ) -> Result<retrain_core::domain::PromotedVersion, retrain_core::ports::PortError> {
        std::future::pending().await
    }
    fn describe(&self) -> String {
        "hanging".into()
    }
}

#[tokio::test(start_paused = true)]
async fn a_run_interrupted_while_gating_renews_its_lease_on_resume() {
    let world = World::new();
    let store = MemStore::new();
    let mut p = plan("department");
    p.leased = true;
    let mut b = binding(&world, p.clone(), prepare(&world));
    b.registry = Some(Arc::new(HangingRegistry));
    let e = engine(&store, &world, vec![b]);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        c.cancel();
    });
    let report = e.run_cycle(CycleRequest::default(), cancel).await.unwrap();
    assert_eq!(report.labels[0].status, LabelStatus::Interrupted);
    assert_eq!(get(&world.counters.acquires), 1);
    assert_eq!(get(&world.counters.releases), 1, "stopped on interrupt");

    let restarted = store.restarted();
    let e2 = engine(
        &restarted,
        &world,
        vec![binding(&world, p, prepare(&world))],
    );
    let report = cycle(&e2).await;
    assert!(report.labels[0].resumed);
    assert_eq!(
        report.labels[0].status,
        LabelStatus::Promoted,
        "{:?}",
        report.labels[0]
    );
    assert_eq!(
        get(&world.counters.acquires),
        2,
        "the machines were started again before gating"
    );
    assert_eq!(get(&world.counters.releases), 2);
    assert_eq!(get(&world.counters.starts), 1, "no second training");
}

/// A notifier that fails for good (not transiently) does not hold the run
/// back: the run finishes and records which notifier failed and why. A run
/// whose notifiers all delivered records no error.
#[tokio::test(start_paused = true)]
async fn a_notifier_failing_for_good_is_recorded_on_the_finished_run() {
    struct Refusing;
    #[async_trait::async_trait]
    impl retrain_core::ports::Notifier for Refusing {
        async fn notify(
            &self,
            _: &retrain_core::report::LabelReport,
        ) -> Result<(), retrain_core::ports::PortError> {
            Err(retrain_core::ports::PortError::Denied(
                "401 bad token".into(),
            ))
        }
        fn describe(&self) -> String {
            "refusing".into()
        }
    }
    for refusing in [false, true] {
        let world = World::new();
        let store = MemStore::new();
        let mut department = binding(&world, plan("department"), prepare(&world));
        if refusing {
            department.notifiers.push(Arc::new(Refusing));
        }
        let engine = engine(&store, &world, vec![department]);
        let report = cycle(&engine).await;
        assert_eq!(report.labels[0].status, LabelStatus::Promoted, "{report:?}");
        assert_eq!(
            get(&world.counters.notifies),
            1,
            "the other notifier delivered"
        );
        let runs = store.finished_runs("department");
        let expected = refusing.then_some("refusing: 401 bad token");
        assert_eq!(runs[0].notify_error.as_deref(), expected);
    }
}

/// `run_cycle_announcing` tells, once phase one is over, what became of
/// each label (in the engine's label order): a run driven (its id,
/// journaled by then, its manifest naming what triggered the cycle), a
/// label another driver holds; and, for a cycle interrupted before it
/// began, labels that ended in phase one.
#[tokio::test(start_paused = true)]
async fn a_cycle_announces_each_labels_start_after_phase_one() {
    use retrain_core::engine::LabelStart;
    let world = World::new();
    let store = MemStore::new();
    store.hold_lock("busy", "other-host-42");
    let e = engine(
        &store,
        &world,
        vec![
            binding(&world, plan("driven"), prepare(&world)),
            binding(&world, plan("busy"), prepare(&world)),
        ],
    );
    let announced_cycle = |cancel: CancellationToken| {
        let e = &e;
        async move {
            let (started, announced) = tokio::sync::oneshot::channel();
            let report = e
                .run_cycle_announcing(
                    CycleRequest::default(),
                    cancel,
                    started,
                    Some("github push abc123".into()),
                )
                .await
                .unwrap();
            let announced = announced.await.expect("the cycle announced its start");
            assert_eq!(announced.cycle_id, report.cycle_id);
            (report, announced.labels)
        }
    };

    let (report, labels) = announced_cycle(CancellationToken::new()).await;
    let names: Vec<&str> = labels.iter().map(|(label, _)| label.as_str()).collect();
    assert_eq!(names, ["busy", "driven"]);
    assert!(
        matches!(&labels[0].1, LabelStart::Busy { holder } if holder.contains("other-host-42")),
        "{labels:?}"
    );
    let driven = report
        .labels
        .iter()
        .find(|l| l.label.as_str() == "driven")
        .unwrap();
    assert_ne!(driven.status, LabelStatus::Busy);
    assert_eq!(
        labels[1].1,
        LabelStart::Driving {
            run_id: driven.run_id.clone().unwrap(),
            resumed: false,
        }
    );
    // What started the cycle is recorded in the run's manifest.
    let run = store.run_snapshot(driven.run_id.as_ref().unwrap());
    assert_eq!(
        run.manifest.triggered_by.as_deref(),
        Some("github push abc123")
    );

    // Interrupted before any label began: each ended in phase one.
    let cancelled = CancellationToken::new();
    cancelled.cancel();
    let (_, labels) = announced_cycle(cancelled).await;
    assert_eq!(labels.len(), 2);
    for (label, start) in &labels {
        assert!(
            matches!(
                start,
                LabelStart::Ended {
                    run_id: None,
                    status: LabelStatus::Interrupted,
                    ..
                }
            ),
            "{label}: {start:?}"
        );
    }
}

/// A lease record refused as fenced means the label's lock is gone: the
/// run stops as lock-lost, starts no machine, and writes nothing more
/// (not even its failure) under the lock it no longer holds.
#[tokio::test(start_paused = true)]
async fn a_fenced_lease_record_stops_the_run_as_lock_lost() {
    let mut leased = plan("department");
    leased.leased = true;
    let world = World::new();
    let store = MemStore::new();
    store.leases_fenced.store(true, Ordering::SeqCst);
    let e = engine(
        &store,
        &world,
        vec![binding(&world, leased, prepare(&world))],
    );
    let report = cycle(&e).await;
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::LockLost, "{label:?}");
    assert!(
        label.error.as_deref().unwrap_or_default().contains("thief"),
        "{label:?}"
    );
    assert_eq!(get(&world.counters.acquires), 0, "no machine started");
    assert_eq!(get(&world.counters.starts), 0, "no training");
    let run = store.run_snapshot(label.run_id.as_ref().unwrap());
    assert_eq!(run.outcome, None, "the failure was not journaled");
    assert_ne!(run.stage, retrain_core::machine::Stage::Done);
}

/// The metrics history (a `list_runs` read per report) is read only for a
/// run with a verdict to chart: a gated label whose training failed has
/// none, and its report and notification read nothing.
#[tokio::test(start_paused = true)]
async fn a_run_without_a_verdict_reads_no_metrics_history() {
    let world = World::new();
    *world.trainer_fails.lock().unwrap() = true;
    let store = MemStore::new();
    let e = department_engine(&store, &world);
    let report = cycle(&e).await;
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::Failed, "{label:?}");
    assert!(label.history.is_empty(), "{label:?}");
    assert_eq!(get(&world.counters.notifies), 1, "the failure was notified");
    assert_eq!(get(&store.run_listings), 0, "no history read");

    // A run with a verdict reads it (the control).
    let world = World::new();
    let store = MemStore::new();
    let e = department_engine(&store, &world);
    assert_eq!(cycle(&e).await.labels[0].status, LabelStatus::Promoted);
    assert!(get(&store.run_listings) > 0);
}
