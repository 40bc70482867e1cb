//! Manual sign-off (`promote = "manual"`): a passed run parks in
//! `awaiting_approval`; `Engine::decide` promotes it exactly once, refuses a
//! stale approval, re-gates on request, and completes a crashed approval.

use std::sync::atomic::Ordering;

use retrain_core::domain::RunId;
use retrain_core::engine::{
    CycleRequest, Decision, DecisionOutcome, Engine, EngineError, LabelBinding,
};
use retrain_core::machine::{Outcome, PromoteMode, Stage, Trigger};
use retrain_core::report::{LabelReport, LabelStatus};
use retrain_core::CancellationToken;

use crate::support::*;

fn get(c: &std::sync::atomic::AtomicUsize) -> usize {
    c.load(Ordering::SeqCst)
}

fn manual(world: &World) -> LabelBinding {
    let mut plan = plan("department");
    plan.promote = PromoteMode::Manual;
    binding(world, plan, prepare(world))
}

/// Run one cycle: the run passes the gate and waits for approval.
async fn awaiting(engine: &Engine, store: &MemStore, world: &World) -> RunId {
    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::AwaitingApproval, "{label:?}");
    assert_eq!(
        get(&world.counters.promotes),
        0,
        "no promotion before approval"
    );
    assert!(world.production.lock().unwrap().is_none());
    assert_eq!(
        store.consumed("department").as_deref().unwrap(),
        "v2",
        "the cursor is committed while the run waits"
    );
    label.run_id.clone().unwrap()
}

/// A fresh world whose one manual label has run a cycle and waits for
/// approval: the world, the store, the engine and the waiting run.
async fn awaiting_approval() -> (World, MemStore, Engine, RunId) {
    let world = World::new();
    let store = MemStore::new();
    let engine = engine(&store, &world, vec![manual(&world)]);
    let run_id = awaiting(&engine, &store, &world).await;
    (world, store, engine, run_id)
}

fn applied(outcome: DecisionOutcome) -> LabelReport {
    match outcome {
        DecisionOutcome::Applied(report) => *report,
        other => panic!("expected an applied decision, got {other:?}"),
    }
}

const APPROVE: Decision = Decision::Approve { regate: false };

#[tokio::test(start_paused = true)]
async fn manual_run_waits_then_approve_promotes_exactly_once() {
    let (world, store, engine, run_id) = awaiting_approval().await;
    let stored = store.finished_runs("department");
    assert!(stored.is_empty(), "a waiting run is not done");

    let report = applied(
        engine
            .decide(&run_id, APPROVE, "alice", Some("looks good".into()))
            .await
            .unwrap(),
    );
    assert_eq!(report.status, LabelStatus::Promoted, "{report:?}");
    assert_eq!(get(&world.counters.promotes), 1);
    assert_eq!(world.production.lock().unwrap().as_ref().unwrap().2, run_id);

    match engine.decide(&run_id, APPROVE, "bob", None).await.unwrap() {
        DecisionOutcome::AlreadyApproved { by, .. } => assert_eq!(by, "alice"),
        other => panic!("expected already approved, got {other:?}"),
    }
    assert_eq!(get(&world.counters.promotes), 1, "no second promotion");
    // Rejecting what was approved and promoted is refused, not "already".
    let rejected = engine
        .decide(&run_id, Decision::Reject, "carol", None)
        .await;
    assert!(rejected.is_err(), "{rejected:?}");
}

#[tokio::test(start_paused = true)]
async fn approve_with_regate_promotes_a_candidate_that_still_passes() {
    let (world, _store, engine, run_id) = awaiting_approval().await;
    let report = applied(
        engine
            .decide(&run_id, Decision::Approve { regate: true }, "alice", None)
            .await
            .unwrap(),
    );
    assert_eq!(report.status, LabelStatus::Promoted, "{report:?}");
    assert_eq!(get(&world.counters.promotes), 1);
}

#[tokio::test(start_paused = true)]
async fn an_approval_whose_promotion_outlasts_lock_ttl_keeps_its_lock() {
    let world = World::new();
    let store = MemStore::new();
    let engine = engine(&store, &world, vec![manual(&world)]);
    let run_id = awaiting(&engine, &store, &world).await;
    // Ten times the default lock_ttl (60 s): only the heartbeat keeps the
    // lock valid, otherwise the run stops after the promotion as lock_lost.
    *world.promote_time.lock().unwrap() = std::time::Duration::from_secs(600);
    let report = applied(
        engine
            .decide(&run_id, APPROVE, "alice", None)
            .await
            .unwrap(),
    );
    assert_eq!(report.status, LabelStatus::Promoted, "{report:?}");
    assert_eq!(report.error, None);
    assert_eq!(store.run_snapshot(&run_id).stage, Stage::Done);
}

#[tokio::test(start_paused = true)]
async fn approve_refused_when_production_changed_since_the_verdict() {
    let (world, store, engine, run_id) = awaiting_approval().await;
    // Someone else promoted meanwhile.
    *world.production.lock().unwrap() = Some((
        "7".into(),
        world.candidate_metrics.lock().unwrap().clone(),
        RunId("other".into()),
    ));

    let err = engine
        .decide(&run_id, APPROVE, "alice", None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::ProductionChanged { recorded, current, .. }
            if recorded == "none" && current == "7"),
        "{err}"
    );
    assert_eq!(get(&world.counters.promotes), 0, "nothing promoted");
    assert_eq!(world.production.lock().unwrap().as_ref().unwrap().0, "7");
    let run = store.run_snapshot(&run_id);
    assert_eq!(run.stage, Stage::AwaitingApproval, "the run still waits");
}

#[tokio::test(start_paused = true)]
async fn approve_with_regate_rejects_a_now_worse_candidate() {
    let (world, store, engine, run_id) = awaiting_approval().await;
    // A better model reached production meanwhile.
    *world.production.lock().unwrap() = Some((
        "7".into(),
        [("dice".to_string(), 0.99), ("iou".to_string(), 0.95)]
            .into_iter()
            .collect(),
        RunId("other".into()),
    ));

    let report = applied(
        engine
            .decide(&run_id, Decision::Approve { regate: true }, "alice", None)
            .await
            .unwrap(),
    );
    assert_eq!(report.status, LabelStatus::Rejected, "{report:?}");
    assert_eq!(get(&world.counters.promotes), 0, "nothing promoted");
    assert_eq!(world.production.lock().unwrap().as_ref().unwrap().0, "7");
    let run = store.run_snapshot(&run_id);
    assert_eq!(run.stage, Stage::Done);
}

#[tokio::test(start_paused = true)]
async fn approval_crashing_after_the_promote_call_completes_once_on_restart() {
    let world = World::new();
    let store = MemStore::new();
    let run_id = {
        let engine = engine(&store, &world, vec![manual(&world)]);
        awaiting(&engine, &store, &world).await
    };

    // Journal writes of the approval: 1 = Approved, 2 = Promoted. The second
    // is lost: the registry promoted, the journal does not know.
    let crashing = store.losing_write(2);
    {
        let engine = engine(&crashing, &world, vec![manual(&world)]);
        let _ = engine.decide(&run_id, APPROVE, "alice", None).await;
    }
    assert_eq!(get(&world.counters.promotes), 1, "the registry was called");
    let run = store.run_snapshot(&run_id);
    assert_eq!(
        run.stage,
        Stage::Promoting,
        "the promotion is not journaled"
    );

    let restarted = store.restarted();
    let engine = engine(&restarted, &world, vec![manual(&world)]);
    // A rejection cannot take back an approval whose promotion is under way.
    let rejected = engine
        .decide(&run_id, Decision::Reject, "carol", None)
        .await;
    assert!(rejected.is_err(), "{rejected:?}");
    assert_eq!(restarted.run_snapshot(&run_id).stage, Stage::Promoting);
    let report = applied(
        engine
            .decide(&run_id, APPROVE, "alice", None)
            .await
            .unwrap(),
    );
    assert_eq!(report.status, LabelStatus::Promoted, "{report:?}");
    assert_eq!(get(&world.counters.promotes), 1, "promoted exactly once");
    assert_eq!(restarted.run_snapshot(&run_id).stage, Stage::Done);
    match engine.decide(&run_id, APPROVE, "bob", None).await.unwrap() {
        DecisionOutcome::AlreadyApproved { by, .. } => assert_eq!(by, "alice"),
        other => panic!("expected already approved, got {other:?}"),
    }
}

fn expiring(world: &World, expires: std::time::Duration) -> LabelBinding {
    let mut binding = manual(world);
    binding.plan.approval_expires = expires;
    binding
}

const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

#[tokio::test(start_paused = true)]
async fn an_unapproved_candidate_expires_at_the_first_cycle_after_approval_expires() {
    let world = World::new();
    let store = MemStore::new();
    let engine = engine(&store, &world, vec![expiring(&world, HOUR)]);
    let run_id = awaiting(&engine, &store, &world).await;
    let notified = get(&world.counters.notifies);

    // Within approval_expires: a cycle leaves it waiting.
    tokio::time::advance(HOUR / 2).await;
    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(store.run_snapshot(&run_id).stage, Stage::AwaitingApproval);
    assert!(report.labels[0].closed_runs.is_empty());

    // The first cycle after it: expired (journaled, notified), never promoted.
    tokio::time::advance(HOUR).await;
    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.labels[0].closed_runs, vec![run_id.clone()]);
    let run = store.run_snapshot(&run_id);
    assert_eq!(run.stage, Stage::Done);
    match &run.outcome {
        Some(Outcome::Expired { reason }) => {
            assert!(reason.contains("approval_expires = 1h"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        get(&world.counters.notifies),
        notified + 1,
        "expiry is notified"
    );
    assert_eq!(
        store.consumed("department").as_deref().unwrap(),
        "v2",
        "the dataset stays consumed"
    );

    // It can never be approved (or rejected) afterwards, and nothing changes.
    let err = engine
        .decide(&run_id, APPROVE, "alice", None)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::ApprovalClosed { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("can no longer be approved") && message.contains("expired"),
        "{message}"
    );
    assert!(engine
        .decide(&run_id, Decision::Reject, "bob", Some("late".into()))
        .await
        .is_err());
    assert_eq!(get(&world.counters.promotes), 0);
    assert!(world.production.lock().unwrap().is_none());
    assert_eq!(
        store.run_snapshot(&run_id),
        run,
        "a refused decision changes nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn approving_after_approval_expires_expires_the_run_instead_of_promoting() {
    let world = World::new();
    let store = MemStore::new();
    let engine = engine(&store, &world, vec![expiring(&world, HOUR)]);
    let run_id = awaiting(&engine, &store, &world).await;
    // No cycle ran since: the decision itself applies the expiry.
    tokio::time::advance(HOUR * 2).await;
    let err = engine
        .decide(&run_id, APPROVE, "alice", None)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::ApprovalClosed { .. }), "{err}");
    assert_eq!(get(&world.counters.promotes), 0);
    assert!(matches!(
        store.run_snapshot(&run_id).outcome,
        Some(Outcome::Expired { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_newer_waiting_candidate_supersedes_the_older_one_which_can_never_be_approved() {
    let world = World::new();
    // Metadata-triggered, no prepare job: each published version is a candidate.
    let mut binding = manual(&world);
    binding.plan.trigger = Trigger::Metadata { threshold: 10 };
    binding.plan.prepare = None;
    binding.prepare = None;
    *world.published.lock().unwrap() = Some(dataset("v2", 500, 60));
    let store = MemStore::new();
    let engine = engine(&store, &world, vec![binding]);
    let older = awaiting(&engine, &store, &world).await;

    *world.published.lock().unwrap() = Some(dataset("v3", 600, 120));
    tokio::time::advance(HOUR).await;
    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    let newer = report.labels[0].run_id.clone().unwrap();
    assert_eq!(report.labels[0].status, LabelStatus::AwaitingApproval);
    // The report names the run it closed (the CLI rewrites its manifest).
    assert_eq!(report.labels[0].closed_runs, vec![older.clone()]);
    // Neither the parked runs' commits nor the closing of the older one
    // (under the newer one's lock) released the lock; each cycle did,
    // after its closing.
    assert_eq!(store.unlocked_by_commit(), 0);
    assert_eq!(store.lock_releases(), 2);

    // Superseded at once (journaled on the old run, notified), not at the next cycle.
    let old = store.run_snapshot(&older);
    assert_eq!(old.stage, Stage::Done);
    assert_eq!(
        old.outcome,
        Some(Outcome::Superseded {
            by_run: newer.clone()
        })
    );
    assert!(store
        .finished_runs("department")
        .iter()
        .any(|r| r.run_id == older));
    let err = engine
        .decide(&older, APPROVE, "alice", None)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("superseded") && message.contains(newer.as_str()),
        "{message}"
    );
    // Closing the old run did not move the cursor back to its dataset.
    assert_eq!(store.consumed("department").as_deref().unwrap(), "v3");

    // The newer one is approved and promoted once.
    let report = applied(engine.decide(&newer, APPROVE, "alice", None).await.unwrap());
    assert_eq!(report.status, LabelStatus::Promoted, "{report:?}");
    assert_eq!(get(&world.counters.promotes), 1);
    assert_eq!(world.production.lock().unwrap().as_ref().unwrap().2, newer);
    assert_eq!(store.consumed("department").as_deref().unwrap(), "v3");
}

/// A registry-announced candidate (MLflow webhook): a better one is gated,
/// journaled as a run, promoted once and notified; a worse one is rejected
/// and production is unchanged; with `promote = "manual"` it waits for an
/// approval that then promotes it. No cursor moves (nothing was trained).
#[tokio::test(start_paused = true)]
async fn a_registered_candidate_is_gated_then_promoted_or_rejected() {
    let world = World::new();
    let store = MemStore::new();
    let engine = department_engine(&store, &world);
    let label = retrain_core::domain::Label::new("department").unwrap();

    // A promotion slower than lock_ttl keeps its lock (heartbeat).
    *world.promote_time.lock().unwrap() = std::time::Duration::from_secs(600);
    let (outcome, report) = engine
        .gate_and_promote(&label, "models:/seg/1")
        .await
        .unwrap();
    assert!(outcome.verdict.passed, "{outcome:?}");
    assert_eq!(report.status, LabelStatus::Promoted, "{report:?}");
    assert_eq!(report.error, None);
    assert_eq!(get(&world.counters.promotes), 1);
    assert_eq!(get(&world.counters.notifies), 1);
    let run_id = outcome.run_id.clone().unwrap();
    assert_eq!(world.production.lock().unwrap().as_ref().unwrap().2, run_id);
    assert_eq!(store.run_snapshot(&run_id).stage, Stage::Done);
    assert_eq!(store.cursor_of("department").consumed_version, None);

    // Worse than production now: rejected, production unchanged.
    *world.candidate_metrics.lock().unwrap() =
        [("dice".to_string(), 0.1), ("iou".to_string(), 0.1)]
            .into_iter()
            .collect();
    let (outcome, report) = engine
        .gate_and_promote(&label, "models:/seg/2")
        .await
        .unwrap();
    assert!(!outcome.verdict.passed);
    assert_eq!(report.status, LabelStatus::Rejected, "{report:?}");
    assert_eq!(get(&world.counters.promotes), 1);
    assert_eq!(world.production.lock().unwrap().as_ref().unwrap().2, run_id);

    // A label being driven is reported busy, nothing journaled.
    store.hold_lock("department", "other-replica");
    let busy = engine.gate_and_promote(&label, "models:/seg/3").await;
    assert!(matches!(busy, Err(EngineError::Busy(..))), "{busy:?}");
}

#[tokio::test(start_paused = true)]
async fn a_registered_candidate_waits_for_approval_in_manual_mode() {
    let world = World::new();
    let store = MemStore::new();
    let engine = engine(&store, &world, vec![manual(&world)]);
    let label = retrain_core::domain::Label::new("department").unwrap();
    let (outcome, report) = engine
        .gate_and_promote(&label, "models:/seg/1")
        .await
        .unwrap();
    assert_eq!(report.status, LabelStatus::AwaitingApproval, "{report:?}");
    assert_eq!(get(&world.counters.promotes), 0);
    let run_id = outcome.run_id.unwrap();
    let approved = applied(
        engine
            .decide(&run_id, APPROVE, "alice", None)
            .await
            .unwrap(),
    );
    assert_eq!(approved.status, LabelStatus::Promoted);
    assert_eq!(get(&world.counters.promotes), 1);
}
