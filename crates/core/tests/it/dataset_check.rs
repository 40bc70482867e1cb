//! The data gate (`dataset_check`): a failing check ends the run as
//! `dataset_rejected` before anything is leased or trained, records the
//! version as rejected (watermark unchanged) so it is never checked again,
//! and the next version is checked, passes and trains. Crash-resume never
//! runs a completed check twice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use retrain_core::domain::{JobKey, SpaceStage, VersionTag};
use retrain_core::engine::{CycleRequest, Engine, LabelBinding};
use retrain_core::machine::{LabelPlan, Outcome, Stage, Trigger};
use retrain_core::manifest::ManifestDocument;
use retrain_core::ports::{PortError, SpaceController};
use retrain_core::report::{CycleReport, LabelStatus};
use retrain_core::CancellationToken;

use crate::support::*;

fn get(c: &AtomicUsize) -> usize {
    c.load(Ordering::SeqCst)
}

/// A prepare job that publishes a new version at every restart: v2, v3, …
struct NumberedPrepare {
    world: World,
    published: AtomicUsize,
}

#[async_trait]
impl SpaceController for NumberedPrepare {
    async fn restart(&self, intent: &JobKey) -> Result<(), PortError> {
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
        let n = self.published.fetch_add(1, Ordering::SeqCst) + 2;
        *self.world.published.lock().unwrap() =
            Some(dataset(&format!("v{n}"), 500, 3600 * n as i64));
        Ok(())
    }
    async fn stage(&self) -> Result<SpaceStage, PortError> {
        Ok(SpaceStage::Running)
    }
    fn describe(&self) -> String {
        "numbered prepare".into()
    }
}

fn checked_plan() -> LabelPlan {
    let mut plan = plan("department");
    plan.dataset_check = true;
    plan.leased = true;
    plan
}

fn checked_binding(
    world: &World,
    plan: LabelPlan,
    prepare: Arc<dyn SpaceController>,
) -> LabelBinding {
    let mut binding = binding(world, plan, prepare);
    binding.dataset_check = Some(Arc::new(FakeDatasetCheck(world.clone())));
    binding
}

fn numbered(world: &World) -> Arc<dyn SpaceController> {
    Arc::new(NumberedPrepare {
        world: world.clone(),
        published: AtomicUsize::new(0),
    })
}

async fn cycle(engine: &Engine) -> CycleReport {
    engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_rejected_dataset_costs_nothing_is_never_rechecked_and_the_next_version_trains() {
    let world = World::new();
    world.bad_versions.lock().unwrap().insert("v2".into());
    let store = MemStore::new();
    let engine = engine(
        &store,
        &world,
        vec![checked_binding(&world, checked_plan(), numbered(&world))],
    );

    // Cycle 1: v2 is prepared, checked and rejected.
    let report = cycle(&engine).await;
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::DatasetRejected, "{label:?}");
    assert!(
        matches!(
            &label.outcome,
            Some(Outcome::DatasetRejected { version, reason })
                if version.as_str() == "v2" && reason.contains("mask_17.png")
        ),
        "{:?}",
        label.outcome
    );
    assert_eq!(get(&world.counters.checks), 1);
    assert_eq!(get(&world.counters.acquires), 0, "nothing leased");
    assert_eq!(get(&world.counters.starts), 0, "nothing trained");
    assert_eq!(
        get(&world.counters.notifies),
        1,
        "the rejection is notified"
    );
    let markdown = label.to_markdown();
    assert!(markdown.contains("dataset_rejected"), "{markdown}");
    assert!(
        markdown.contains("3 masks are not binary"),
        "the check's report: {markdown}"
    );
    assert!(
        markdown.contains("mask_17.png"),
        "the output tail: {markdown}"
    );
    let cursor = store.cursor_of("department");
    assert_eq!(cursor.watermark, None, "the watermark does not move");
    assert_eq!(cursor.consumed_version, None);
    assert_eq!(cursor.rejected_version, Some(VersionTag::new("v2")));
    assert!(report.any_rejected());

    // Cycle 2: still over threshold (watermark unchanged), a new version is
    // prepared; v2 is never checked again; v3 passes, is leased for and trained.
    let report = cycle(&engine).await;
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::Promoted, "{label:?}");
    assert_eq!(get(&world.counters.restarts), 2);
    assert_eq!(get(&world.counters.checks), 2);
    let checked: Vec<String> = world
        .checked
        .lock()
        .unwrap()
        .values()
        .map(|(v, _)| v.to_string())
        .collect();
    assert_eq!(
        checked.iter().filter(|v| *v == "v2").count(),
        1,
        "{checked:?}"
    );
    assert!(checked.contains(&"v3".to_string()), "{checked:?}");
    assert_eq!(get(&world.counters.acquires), 1);
    assert_eq!(get(&world.counters.starts), 1);
    assert_eq!(label.dataset_version, Some(VersionTag::new("v3")));
    let check = label.dataset_check.as_ref().expect("the check is reported");
    assert!(check.passed);
    assert!(label.to_markdown().contains("all 500 pairs valid"));
    let cursor = store.cursor_of("department");
    assert_eq!(cursor.consumed_version, Some(VersionTag::new("v3")));
    assert!(cursor.watermark.is_some());
    // The passing check's summary is in the run manifest.
    let run = store.run_snapshot(label.run_id.as_ref().unwrap());
    let manifest = ManifestDocument::from_run(&run);
    let recorded = manifest
        .dataset_check
        .clone()
        .expect("manifest records the check");
    assert!(recorded.passed);
    assert_eq!(recorded.summary["pairs"], 500);
    assert!(manifest.to_markdown().contains("dataset check: passed"));
}

#[tokio::test(start_paused = true)]
async fn without_a_prepare_job_a_rejected_version_is_skipped_until_a_new_one_is_published() {
    let world = World::new();
    *world.published.lock().unwrap() = Some(dataset("v5", 500, 60));
    world.bad_versions.lock().unwrap().insert("v5".into());
    let mut plan = checked_plan();
    plan.trigger = Trigger::Metadata { threshold: 10 };
    plan.prepare = None;
    let store = MemStore::new();
    let mut binding = checked_binding(&world, plan, prepare(&world));
    binding.prepare = None;
    let engine = engine(&store, &world, vec![binding]);

    assert_eq!(
        cycle(&engine).await.labels[0].status,
        LabelStatus::DatasetRejected
    );
    let report = cycle(&engine).await;
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::Skipped, "{label:?}");
    assert!(
        matches!(&label.outcome, Some(Outcome::Skipped { reason, .. }) if reason.contains("rejected by the dataset check")),
        "{:?}",
        label.outcome
    );
    assert_eq!(get(&world.counters.checks), 1, "never checked again");

    *world.published.lock().unwrap() = Some(dataset("v6", 600, 120));
    assert_eq!(cycle(&engine).await.labels[0].status, LabelStatus::Promoted);
    assert_eq!(get(&world.counters.checks), 2);
    assert_eq!(get(&world.counters.starts), 1);
}

#[tokio::test(start_paused = true)]
async fn a_check_that_cannot_run_fails_the_run_without_rejecting_the_version() {
    struct Broken;
    #[async_trait]
    impl retrain_core::ports::DatasetCheck for Broken {
        async fn check(
            &self,
            _: &retrain_core::ports::DatasetCheckRequest,
        ) -> Result<retrain_core::domain::DatasetCheckResult, PortError> {
            Err(PortError::Failed(
                "command `python` timed out after 300s".into(),
            ))
        }
        fn describe(&self) -> String {
            "command: python check.py".into()
        }
    }
    let world = World::new();
    let store = MemStore::new();
    let mut binding = binding(&world, checked_plan(), prepare(&world));
    binding.dataset_check = Some(Arc::new(Broken));
    let engine = engine(&store, &world, vec![binding]);
    let report = cycle(&engine).await;
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::Failed, "{label:?}");
    match &label.outcome {
        Some(Outcome::Failed { stage, reason }) => {
            assert_eq!(*stage, Stage::Checking);
            assert!(reason.contains("timed out after 300s"), "{reason}");
            assert!(reason.contains("python check.py"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        get(&world.counters.acquires) + get(&world.counters.starts),
        0
    );
    assert_eq!(store.cursor_of("department").rejected_version, None);
}

#[tokio::test(start_paused = true)]
async fn a_crash_at_any_journal_write_never_runs_a_completed_check_twice() {
    // Uninterrupted: how many journal writes a rejected run makes.
    let world = World::new();
    world.bad_versions.lock().unwrap().insert("v2".into());
    let store = MemStore::new();
    let e = engine(
        &store,
        &world,
        vec![checked_binding(&world, checked_plan(), prepare(&world))],
    );
    assert_eq!(
        cycle(&e).await.labels[0].status,
        LabelStatus::DatasetRejected
    );
    let steps = store.writes();

    for lose_write in [false, true] {
        for crash_at in 1..=steps {
            let world = World::new();
            world.bad_versions.lock().unwrap().insert("v2".into());
            let store = MemStore::new();
            let crashing = if lose_write {
                store.losing_write(crash_at)
            } else {
                store.crashing_after(crash_at)
            };
            let first = engine(
                &crashing,
                &world,
                vec![checked_binding(&world, checked_plan(), prepare(&world))],
            );
            let _ = cycle(&first).await;
            drop(first);
            let second = engine(
                &store.restarted(),
                &world,
                vec![checked_binding(&world, checked_plan(), prepare(&world))],
            );
            let _ = cycle(&second).await;
            let what = format!("crash at write {crash_at} (write lost: {lose_write})");
            // (A crash after the final write lets the second cycle start a
            // new run, which waits in vain for a version other than v2.)
            let rejected = store
                .finished_runs("department")
                .into_iter()
                .filter(|r| matches!(r.outcome, Some(Outcome::DatasetRejected { .. })))
                .count();
            assert_eq!(rejected, 1, "{what}");
            assert!(
                get(&world.counters.checks) <= 1,
                "{what}: the check ran twice"
            );
            assert_eq!(get(&world.counters.starts), 0, "{what}");
            assert_eq!(get(&world.counters.acquires), 0, "{what}");
            assert_eq!(
                store.cursor_of("department").rejected_version,
                Some(VersionTag::new("v2")),
                "{what}"
            );
        }
    }
}
