//! `history::metric_points{,_besides}`: a label's evaluated candidates for
//! reports and `retrain metrics`, read through `RunStore::runs_with_verdict`
//! (here its default, over the in-memory store).

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use retrain_core::domain::{
    Candidate, CycleId, Fence, Label, LabelCursor, LockOutcome, LockOwner, RunId,
};
use retrain_core::gate::Verdict;
use retrain_core::history::{metric_points, metric_points_besides};
use retrain_core::journal::Transition;
use retrain_core::machine::{Event, LabelRun};
use retrain_core::ports::RunStore;

use crate::support::*;

fn base() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

async fn fence(store: &MemStore, label: &str) -> Fence {
    let outcome = store
        .try_lock(
            &Label::new(label).unwrap(),
            &LockOwner("history".into()),
            std::time::Duration::from_secs(3600),
        )
        .await
        .unwrap();
    let LockOutcome::Acquired { fence, .. } = outcome else {
        panic!("{outcome:?}");
    };
    fence
}

/// A run of `label` gated `minutes` after the base time (its start), with
/// candidate `cand-<minutes>` scoring `dice`, journaled under `fence`.
async fn gated(store: &MemStore, fence: &Fence, label: &str, minutes: i64, dice: f64) -> LabelRun {
    let mut run = LabelRun::new(
        RunId::generate(),
        CycleId::generate(),
        plan(label),
        LabelCursor::default(),
    );
    let t = step(
        &mut run,
        Event::GateEvaluated {
            now: base() + Duration::minutes(minutes),
            candidate: Candidate {
                id: format!("cand-{minutes}"),
                metrics: BTreeMap::from([("dice".into(), dice)]),
            },
            production: None,
            verdict: Verdict {
                passed: true,
                first_model: true,
                forced: false,
                comparisons: Vec::new(),
                reason: "first model".into(),
            },
            promote: false,
        },
    );
    store.record(&t, fence).await.unwrap();
    run
}

fn step(run: &mut LabelRun, event: Event) -> Transition {
    let from = run.stage;
    run.step(&event).unwrap();
    Transition::after_step(run, from, event, base())
}

fn candidates(points: &[retrain_core::report::MetricPoint]) -> Vec<&str> {
    points.iter().map(|p| p.candidate.as_str()).collect()
}

/// The newest evaluated candidates of the label, oldest first, up to the
/// limit; not a run without a verdict (one that only started), not another
/// label's.
#[tokio::test]
async fn the_history_is_the_newest_evaluated_candidates_oldest_first() {
    let store = MemStore::new();
    let department = fence(&store, "department").await;
    let other = fence(&store, "other").await;
    for minutes in [10, 50, 30, 20, 40] {
        gated(&store, &department, "department", minutes, 0.5).await;
    }
    gated(&store, &other, "other", 60, 0.5).await;
    // Started, counted, never gated.
    let mut started = LabelRun::new(
        RunId::generate(),
        CycleId::generate(),
        plan("department"),
        LabelCursor::default(),
    );
    let t = step(
        &mut started,
        Event::Started {
            now: base() + Duration::minutes(70),
        },
    );
    store.record(&t, &department).await.unwrap();

    let label = Label::new("department").unwrap();
    let all = metric_points(&store, &label, None).await.unwrap();
    assert_eq!(
        candidates(&all),
        ["cand-10", "cand-20", "cand-30", "cand-40", "cand-50"]
    );
    assert_eq!(all[0].at, base() + Duration::minutes(10));
    let newest = metric_points(&store, &label, Some(3)).await.unwrap();
    assert_eq!(candidates(&newest), ["cand-30", "cand-40", "cand-50"]);
}

/// A run in hand (its verdict newer than what is journaled) takes the place
/// of its stored snapshot, at its start as stored, and counts in the limit.
#[tokio::test]
async fn the_run_in_hand_replaces_its_stored_snapshot() {
    let store = MemStore::new();
    let department = fence(&store, "department").await;
    for minutes in [10, 20, 30] {
        gated(&store, &department, "department", minutes, 0.5).await;
    }
    let mut current = gated(&store, &department, "department", 40, 0.5).await;
    // Re-gated in memory: other metrics; its in-memory start is not the
    // stored one (the stored one is what the chart shows).
    current.candidate.as_mut().unwrap().metrics = BTreeMap::from([("dice".into(), 0.9)]);
    current.started_at = Some(base() + Duration::minutes(99));

    let label = Label::new("department").unwrap();
    let points = metric_points_besides(&store, &label, Some(3), Some(&current))
        .await
        .unwrap();
    assert_eq!(candidates(&points), ["cand-20", "cand-30", "cand-40"]);
    let last = points.last().unwrap();
    assert_eq!(last.run_id, current.run_id);
    assert_eq!(
        last.metrics["dice"], 0.9,
        "the run in hand, not the stored one"
    );
    assert_eq!(
        last.at,
        base() + Duration::minutes(40),
        "its start as stored"
    );
}

/// `RunStore::run_snapshots`' default (what the CLI writes manifests from):
/// each asked run's stored snapshot, an unknown id skipped.
#[tokio::test]
async fn run_snapshots_default_reads_the_asked_runs_and_skips_unknown_ids() {
    let store = MemStore::new();
    let department = fence(&store, "department").await;
    let first = gated(&store, &department, "department", 10, 0.5).await;
    let second = gated(&store, &department, "department", 20, 0.6).await;
    gated(&store, &department, "department", 30, 0.7).await;
    let unknown = RunId::generate();
    let got = store
        .run_snapshots(&[second.run_id.clone(), unknown.clone(), first.run_id.clone()])
        .await
        .unwrap();
    assert_eq!(got, [second, first]);
    assert!(store.run_snapshots(&[unknown]).await.unwrap().is_empty());
}
