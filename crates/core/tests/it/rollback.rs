//! `Engine::rollback`: production back to the previous (or a named)
//! version as a run of its own, refused without changing anything when it
//! makes no sense, exactly once across a crash, and without re-promoting
//! the rolled-back candidate at the next cycle.

use std::sync::atomic::Ordering;

use retrain_core::domain::{Label, RunId};
use retrain_core::engine::{
    CycleRequest, Engine, EngineError, RollbackOutcome, RollbackRefused, RollbackRequest,
};
use retrain_core::journal::{PromotionEvent, PromotionKind, RunFilter};
use retrain_core::machine::Stage;
use retrain_core::ports::RunStore;
use retrain_core::report::LabelStatus;
use retrain_core::CancellationToken;

use crate::support::*;

fn get(c: &std::sync::atomic::AtomicUsize) -> usize {
    c.load(Ordering::SeqCst)
}

fn department() -> Label {
    Label::new("department").unwrap()
}

fn request(to_version: Option<&str>, force: bool) -> RollbackRequest {
    RollbackRequest {
        label: department(),
        to_version: to_version.map(Into::into),
        by: "alice".into(),
        reason: "dice regressed in production".into(),
        force,
    }
}

/// Production "1": a worse model than the candidates, registered by hand
/// (no promotion event).
fn production_registered_by_hand(world: &World) {
    let worse = [("dice".to_string(), 0.5), ("iou".to_string(), 0.4)]
        .into_iter()
        .collect::<retrain_core::domain::Metrics>();
    let seeded = RunId("seeded-by-hand".into());
    world
        .versions
        .lock()
        .unwrap()
        .insert("1".into(), (worse.clone(), seeded.clone()));
    *world.production.lock().unwrap() = Some(("1".into(), worse, seeded));
}

/// Production "1" (registered by hand) and one cycle that promotes the
/// candidate as "2" with previous "1".
async fn promoted_twice(store: &MemStore, world: &World) -> Engine {
    production_registered_by_hand(world);
    let engine = engine(
        store,
        world,
        vec![binding(world, plan("department"), prepare(world))],
    );
    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.labels[0].status, LabelStatus::Promoted, "{report:?}");
    assert_eq!(production(world), "2");
    engine
}

fn production(world: &World) -> String {
    world.production.lock().unwrap().as_ref().unwrap().0.clone()
}

async fn run_count(store: &MemStore) -> usize {
    store.list_runs(&RunFilter::default()).await.unwrap().len()
}

fn refused(result: Result<RollbackOutcome, EngineError>) -> RollbackRefused {
    match result {
        Err(EngineError::RollbackRefused(refused)) => refused,
        other => panic!("expected a refused rollback, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn rollback_restores_the_previous_version_and_records_who_and_why() {
    let world = World::new();
    let store = MemStore::new();
    let engine = promoted_twice(&store, &world).await;
    let cursor = store.cursor_of("department");
    let notified = get(&world.counters.notifies);

    let outcome = engine.rollback(request(None, false)).await.unwrap();
    assert!(!outcome.resumed);
    let report = outcome.report;
    assert_eq!(report.status, LabelStatus::RolledBack, "{report:?}");
    assert_eq!(production(&world), "1", "production restored");
    assert_eq!(get(&world.counters.rollbacks), 1);
    assert_eq!(get(&world.counters.notifies), notified + 1, "notified once");
    let summary = report.rollback_summary().unwrap();
    assert_eq!(
        summary,
        "rolled back from version 2 to version 1 by alice because dice regressed in production"
    );
    assert!(report.to_markdown().contains(&summary));

    let run_id = report.run_id.clone().unwrap();
    let run = store.run_snapshot(&run_id);
    assert_eq!(run.stage, Stage::Done);
    assert_eq!(store.cursor_of("department"), cursor, "no cursor moves");

    let history = store.promotions(&department()).await.unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    let (promotion, rollback) = (&history[0], &history[1]);
    assert_eq!(promotion.kind, PromotionKind::Promotion);
    assert_eq!(rollback.kind, PromotionKind::Rollback);
    assert_eq!(rollback.run_id, run_id);
    assert_eq!(rollback.version, "1");
    assert_eq!(rollback.previous_version.as_deref(), Some("2"));
    assert_eq!(rollback.by, "alice");
    assert_eq!(
        rollback.reason.as_deref(),
        Some("dice regressed in production")
    );
    assert_eq!(rollback.verdict, None);
}

#[tokio::test(start_paused = true)]
async fn the_next_cycle_does_not_re_promote_the_rolled_back_candidate() {
    let world = World::new();
    let store = MemStore::new();
    let engine = promoted_twice(&store, &world).await;
    engine.rollback(request(None, false)).await.unwrap();
    let consumed = store.cursor_of("department");
    assert_eq!(consumed.consumed_version.as_ref().unwrap().as_str(), "v2");

    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::Skipped, "{label:?}");
    assert_eq!(get(&world.counters.promotes), 1, "no second promotion");
    assert_eq!(get(&world.counters.starts), 1, "no second training");
    assert_eq!(production(&world), "1", "production stays restored");
    assert_eq!(store.cursor_of("department"), consumed);
}

#[tokio::test(start_paused = true)]
async fn refusals_change_nothing_and_say_why() {
    let world = World::new();
    let store = MemStore::new();
    let engine = promoted_twice(&store, &world).await;
    // Registered, but never production for this label.
    world
        .versions
        .lock()
        .unwrap()
        .insert("7".into(), (Default::default(), RunId("elsewhere".into())));
    let runs = run_count(&store).await;

    let never = refused(engine.rollback(request(Some("7"), false)).await);
    assert!(
        matches!(&never, RollbackRefused::NeverProduction { version, lineage, .. }
            if version == "7" && lineage == "1, 2"),
        "{never}"
    );
    assert!(never.to_string().contains("--force"), "{never}");
    let already = refused(engine.rollback(request(Some("2"), false)).await);
    assert!(
        matches!(&already, RollbackRefused::AlreadyProduction { version, .. } if version == "2"),
        "{already}"
    );
    let unknown = refused(engine.rollback(request(Some("99"), true)).await);
    assert!(
        matches!(&unknown, RollbackRefused::UnknownVersion { version, .. } if version == "99"),
        "{unknown}"
    );
    let mut no_reason = request(None, false);
    no_reason.reason = "  ".into();
    assert_eq!(
        refused(engine.rollback(no_reason).await),
        RollbackRefused::MissingReason
    );

    assert_eq!(run_count(&store).await, runs, "nothing journaled");
    assert_eq!(get(&world.counters.rollbacks), 0);
    assert_eq!(production(&world), "2");
    assert_eq!(store.promotions(&department()).await.unwrap().len(), 1);

    // --force: a registered version that never was production.
    let forced = engine.rollback(request(Some("7"), true)).await.unwrap();
    assert_eq!(forced.report.status, LabelStatus::RolledBack);
    assert!(forced.report.rollback.as_ref().unwrap().forced);
    assert_eq!(production(&world), "7");
}

#[tokio::test(start_paused = true)]
async fn no_earlier_version_is_refused() {
    let world = World::new();
    let store = MemStore::new();
    let engine = department_engine(&store, &world);
    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.labels[0].status, LabelStatus::Promoted);
    // The first model: nothing was production before it.
    let none = refused(engine.rollback(request(None, false)).await);
    assert!(
        matches!(&none, RollbackRefused::NoPreviousVersion { .. }),
        "{none}"
    );
    assert!(none.to_string().contains("--to VERSION"), "{none}");
    let unknown = engine
        .rollback(RollbackRequest {
            label: Label::new("nope").unwrap(),
            ..request(None, false)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, EngineError::UnknownLabel(..)),
        "{unknown}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rollback_crashing_after_the_registry_call_completes_once() {
    let world = World::new();
    let store = MemStore::new();
    promoted_twice(&store, &world).await;

    // Journal writes of the rollback: 1 = RollbackRequested, 2 = RolledBack.
    // The second is lost: the registry moved production, the journal does
    // not know.
    let crashing = store.losing_write(2);
    {
        let engine = department_engine(&crashing, &world);
        let _ = engine.rollback(request(None, false)).await;
    }
    assert_eq!(get(&world.counters.rollbacks), 1, "the registry was called");
    assert_eq!(production(&world), "1");
    let history = store.promotions(&department()).await.unwrap();
    assert_eq!(history.len(), 1, "the rollback is not journaled yet");

    // The next `rollback` completes the interrupted one instead of rolling
    // back again (which would go further back).
    let restarted = store.restarted();
    let engine = department_engine(&restarted, &world);
    let outcome = engine.rollback(request(None, false)).await.unwrap();
    assert!(outcome.resumed);
    assert_eq!(outcome.report.status, LabelStatus::RolledBack);
    assert_eq!(
        get(&world.counters.rollbacks),
        1,
        "rolled back exactly once"
    );
    assert_eq!(production(&world), "1");
    let history = restarted.promotions(&department()).await.unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].kind, PromotionKind::Rollback);
    assert_eq!(history[1].previous_version.as_deref(), Some("2"));
    let run = restarted.run_snapshot(outcome.report.run_id.as_ref().unwrap());
    assert_eq!(run.stage, Stage::Done);
}

#[tokio::test(start_paused = true)]
async fn a_cycle_completes_an_interrupted_rollback() {
    let world = World::new();
    let store = MemStore::new();
    promoted_twice(&store, &world).await;
    // Crash right after the intent was journaled, before the registry call.
    let crashing = store.crashing_after(1);
    {
        let engine = department_engine(&crashing, &world);
        let _ = engine.rollback(request(None, false)).await;
    }
    let restarted = store.restarted();
    let engine = department_engine(&restarted, &world);
    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::RolledBack, "{label:?}");
    assert!(label.resumed);
    assert_eq!(get(&world.counters.rollbacks), 1);
    assert_eq!(production(&world), "1");
    assert_eq!(get(&world.counters.promotes), 1, "nothing promoted again");
}

/// A rollback is refused while a run of the label is between its promotion
/// intent and its outcome: the promotion may be moving production right
/// now. Nothing is written.
#[tokio::test(start_paused = true)]
async fn a_rollback_is_refused_while_a_promotion_is_in_flight() {
    // Production "1" (registered by hand), and a cycle whose process dies
    // right after journaling its promotion intent: the first crash point
    // that leaves the run in `promoting`.
    let seeded_world = || {
        let world = World::new();
        production_registered_by_hand(&world);
        world
    };
    let mut in_flight = None;
    for writes in 1..20 {
        let (world, store) = (seeded_world(), MemStore::new());
        {
            let engine = department_engine(&store.crashing_after(writes), &world);
            let _ = engine
                .run_cycle(CycleRequest::default(), CancellationToken::new())
                .await;
        }
        let store = store.restarted();
        let unfinished = store.unfinished_run(&department()).await.unwrap();
        if let Some(run) = unfinished.filter(|run| run.stage == Stage::Promoting) {
            in_flight = Some((world, store, run));
            break;
        }
    }
    let (world, store, promoting) = in_flight.expect("no crash point left a run promoting");
    assert_eq!(production(&world), "1", "the promotion never happened");
    let (runs, writes) = (run_count(&store).await, store.writes());

    let engine = department_engine(&store, &world);
    let refusal = refused(engine.rollback(request(Some("1"), true)).await);
    assert!(
        matches!(&refusal, RollbackRefused::PromotionInFlight { run_id, .. }
            if *run_id == promoting.run_id),
        "{refusal:?}"
    );
    assert_eq!(run_count(&store).await, runs, "no rollback run");
    assert_eq!(store.writes(), writes, "nothing written");
    assert_eq!(get(&world.counters.rollbacks), 0);
}

/// A rollback names the run and candidate whose promotion first made its
/// target production (not a later rollback to it, not another version's).
#[tokio::test(start_paused = true)]
async fn a_rollback_names_the_promotion_that_made_its_target_production() {
    let world = World::new();
    let store = MemStore::new();
    let metrics = [("dice".to_string(), 0.8), ("iou".to_string(), 0.7)]
        .into_iter()
        .collect::<retrain_core::domain::Metrics>();
    let base = chrono::DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let promotion = |version: &str, previous: Option<&str>, days: i64| {
        let run = RunId(format!("run-promoting-{version}"));
        world
            .versions
            .lock()
            .unwrap()
            .insert(version.into(), (metrics.clone(), run.clone()));
        PromotionEvent {
            run_id: run.clone(),
            label: department(),
            kind: PromotionKind::Promotion,
            version: version.into(),
            previous_version: previous.map(Into::into),
            candidate_run: Some(run),
            candidate_id: Some(format!("candidate-{version}")),
            verdict: None,
            by: "auto".into(),
            reason: None,
            at: base + chrono::Duration::days(days),
        }
    };
    store.record_promotion(promotion("2", None, 0));
    store.record_promotion(promotion("3", Some("2"), 1));
    store.record_promotion(promotion("4", Some("3"), 2));
    *world.production.lock().unwrap() =
        Some(("4".into(), metrics.clone(), RunId("run-promoting-4".into())));

    let engine = department_engine(&store, &world);
    let outcome = engine.rollback(request(Some("3"), false)).await.unwrap();
    assert_eq!(outcome.report.status, LabelStatus::RolledBack);
    assert_eq!(production(&world), "3");
    let run = store.run_snapshot(outcome.report.run_id.as_ref().unwrap());
    let rollback = run.rollback.as_deref().unwrap();
    assert_eq!(rollback.to_version, "3");
    assert_eq!(rollback.from_version.as_deref(), Some("4"));
    assert!(!rollback.forced, "3 was production");
    assert_eq!(rollback.restored_run, Some(RunId("run-promoting-3".into())));
    assert_eq!(rollback.restored_candidate.as_deref(), Some("candidate-3"));
}
