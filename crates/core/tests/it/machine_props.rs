//! Property tests of the pure machine: random environments answer every
//! action with a random plausible outcome (and sometimes an impossible event);
//! the machine's invariants must hold on every path.

use std::time::Duration;

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use retrain_core::domain::{
    Candidate, CorrectRatio, CycleId, DatasetCheckResult, DatasetMetadata, DatasetVersion,
    FeedbackCounts, Label, LabelCursor, Lease, ProductionModel, PromotedVersion, RunId, SpaceStage,
    TrainingHandle, VersionTag,
};
use retrain_core::gate::GatePolicy;
use retrain_core::machine::{
    Action, Event, LabelPlan, LabelRun, Outcome, PromoteMode, Rollback, Stage, Trigger,
    DEFAULT_APPROVAL_EXPIRES,
};

fn dataset(tag: u8, n: u64, created: i64) -> DatasetVersion {
    DatasetVersion {
        metadata: DatasetMetadata {
            dataset_name: "owner/ds".into(),
            version_tag: VersionTag::new(format!("v{tag}")),
            num_samples: n,
            created_at: DateTime::<Utc>::from_timestamp(1_700_000_000 + created, 0).unwrap(),
            splits: None,
            extra: Default::default(),
        },
        revision: None,
    }
}

#[derive(Debug, Clone)]
struct Scenario {
    counts_trigger: bool,
    prepare: bool,
    gated: bool,
    leased: bool,
    dry_run: bool,
    max_attempts: u32,
    consumed: Option<u8>,
    choices: Vec<u8>,
    /// `promote = "manual"`.
    manual: bool,
    /// A `dataset_check` runs before the lease and the training.
    checked: bool,
    /// The version the dataset check rejected before this run.
    rejected: Option<u8>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.2),
        1u32..4,
        prop::option::of(0u8..3),
        prop::collection::vec(any::<u8>(), 1..120),
        any::<bool>(),
        prop::option::of(0u8..5),
    )
        .prop_map(
            |(
                counts_trigger,
                prepare,
                gated,
                leased,
                dry_run,
                max_attempts,
                consumed,
                choices,
                checked,
                rejected,
            )| {
                Scenario {
                    counts_trigger,
                    prepare,
                    gated,
                    leased,
                    dry_run,
                    max_attempts,
                    consumed,
                    choices,
                    manual: false,
                    checked,
                    rejected,
                }
            },
        )
}

fn plan(s: &Scenario) -> LabelPlan {
    LabelPlan {
        label: Label::new("department").unwrap(),
        trigger: if s.counts_trigger {
            Trigger::Counts {
                threshold: 20,
                correct_ratio: CorrectRatio::default(),
            }
        } else {
            Trigger::Metadata { threshold: 10 }
        },
        prepare: s.prepare.then(|| "prep".to_string()),
        gate: s.gated.then(GatePolicy::seed_default),
        leased: s.leased,
        promote: if s.manual {
            PromoteMode::Manual
        } else {
            PromoteMode::Auto
        },
        max_attempts: s.max_attempts,
        max_step_retries: 5,
        poll_interval: Duration::from_secs(60),
        poll_timeout: Duration::from_secs(600),
        dry_run: s.dry_run,
        approval_expires: DEFAULT_APPROVAL_EXPIRES,
        dataset_check: s.checked,
    }
}

fn start_cursor(s: &Scenario) -> LabelCursor {
    LabelCursor {
        watermark: None,
        consumed_version: s.consumed.map(|c| VersionTag::new(format!("v{c}"))),
        consumed_num_samples: s.consumed.map(|_| 5),
        rejected_version: s.rejected.map(|c| VersionTag::new(format!("v{c}"))),
    }
}

/// What happened along one path.
#[derive(Debug, Default)]
struct Trace {
    starts: Vec<VersionTag>,
    lost: usize,
    cancelled: usize,
    deferred: usize,
    /// Promotions that took effect (`Promoted` answered).
    promoted: usize,
    promotes: usize,
    /// An `Approved` event was accepted (manual scenarios).
    approved: bool,
    side_effects_in_dry_run: usize,
    trained_dataset: Option<DatasetVersion>,
    commits: Vec<Option<LabelCursor>>,
    /// Versions the dataset check was asked about.
    checked: Vec<VersionTag>,
    /// Leases asked for.
    leases: usize,
}

/// Answer `action` with an outcome chosen by `choice`.
fn respond(action: &Action, run: &LabelRun, choice: u8, clock: &mut i64) -> Event {
    if choice.is_multiple_of(17) {
        return Event::ActionFailed {
            reason: "injected".into(),
        };
    }
    // An outage of the registry, a notifier or the lease provider.
    let retryable = matches!(
        action,
        Action::ReadBaseline
            | Action::Promote { .. }
            | Action::Notify
            | Action::ReleaseLease { .. }
            | Action::RollBack { .. }
    );
    if retryable && choice % 6 == 1 {
        return Event::StepDeferred {
            error: "503".into(),
            done: vec!["slack".into()],
        };
    }
    let now = |c: &i64| DateTime::<Utc>::from_timestamp(1_700_000_000 + *c, 0).unwrap();
    match action {
        Action::ReadCounts { .. } => Event::CountsRead {
            counts: FeedbackCounts {
                misclassified: u64::from(choice % 40),
                correct: u64::from(choice / 3),
            },
        },
        Action::ReadPublished => Event::PublishedRead {
            current: (!choice.is_multiple_of(4)).then(|| dataset(choice % 3, u64::from(choice), 0)),
        },
        Action::RestartPrepare { .. } => Event::PrepareRestarted { now: now(clock) },
        Action::Poll { delay_ms, .. } => {
            *clock += (*delay_ms / 1000) as i64 + 1;
            Event::Polled {
                now: now(clock),
                dataset: (!choice.is_multiple_of(3))
                    .then(|| dataset(choice % 5, u64::from(choice) * 2, *clock)),
                prepare_stage: match choice % 29 {
                    0 => Some(SpaceStage::Error("BUILD_ERROR".into())),
                    1 => Some(SpaceStage::Unknown("WEIRD".into())),
                    _ => Some(SpaceStage::Running),
                },
            }
        }
        Action::AcquireLease { .. } => Event::LeaseAcquired {
            lease: Lease {
                id: run.run_id.to_string(),
                label: run.label().clone(),
                run_id: run.run_id.clone(),
                provider: "ec2".into(),
                resources: vec!["i-1".into()],
                region: None,
                acquired_at: now(clock),
                max_until: now(clock),
                attributes: Default::default(),
                released_at: None,
            },
        },
        Action::StartTraining { .. } => Event::TrainingStarted {
            handle: TrainingHandle {
                kind: "test".into(),
                data: serde_json::json!({}),
            },
        },
        Action::AwaitTraining { .. } => {
            if choice % 7 == 3 {
                Event::TrainingCancelled {
                    reason: "interrupted".into(),
                }
            } else if choice.is_multiple_of(5) {
                Event::TrainingLost {
                    reason: "host rebooted".into(),
                }
            } else {
                Event::TrainingFinished {
                    candidate: Candidate {
                        id: "cand".into(),
                        metrics: [
                            ("dice".to_string(), f64::from(choice) / 255.0),
                            ("iou".to_string(), f64::from(choice % 7) / 7.0),
                        ]
                        .into_iter()
                        .collect(),
                    },
                }
            }
        }
        Action::ReadBaseline => Event::BaselineRead {
            production: (choice.is_multiple_of(2)).then(|| ProductionModel {
                version: "1".into(),
                candidate_id: None,
                metrics: [("dice".to_string(), 0.5), ("iou".to_string(), 0.5)]
                    .into_iter()
                    .collect(),
            }),
        },
        Action::Promote { .. } => Event::Promoted {
            version: PromotedVersion {
                version: "2".into(),
                previous: None,
            },
        },
        Action::ReleaseLease { .. } => Event::LeaseReleased,
        Action::Notify => Event::Notified { error: None },
        Action::Commit { .. } => Event::Committed,
        Action::RollBack { version } => Event::RolledBack {
            version: PromotedVersion {
                version: version.clone(),
                previous: Some("3".into()),
            },
        },
        Action::CheckDataset { .. } => Event::DatasetChecked {
            result: DatasetCheckResult {
                passed: !choice.is_multiple_of(3),
                summary: Default::default(),
                report_md: Some("## masks\n3 masks are not binary".into()),
                detail: choice.is_multiple_of(2).then(|| "exit status 1".into()),
            },
        },
    }
}

/// Drive with a bounded number of steps; optionally round-trip the state
/// through JSON (a crash + resume) at the steps where `choice.is_multiple_of(11)`.
fn drive(s: &Scenario) -> (LabelRun, Trace) {
    let mut run = LabelRun::new(
        RunId::generate(),
        CycleId::generate(),
        plan(s),
        start_cursor(s),
    );
    let mut trace = Trace::default();
    let mut clock = 0i64;
    let mut actions = run
        .step(&Event::Started {
            now: DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap(),
        })
        .unwrap();
    let mut i = 0;
    while let Some(action) = actions.first().cloned() {
        let choice = s.choices[i % s.choices.len()].wrapping_add((i / s.choices.len()) as u8);
        i += 1;
        assert!(i < 500, "machine did not terminate");
        if s.dry_run && action.is_side_effect() {
            trace.side_effects_in_dry_run += 1;
        }
        match &action {
            Action::StartTraining { version, .. } => {
                trace.starts.push(version.clone());
                trace.trained_dataset = run.dataset.as_deref().cloned();
            }
            Action::Promote { .. } => trace.promotes += 1,
            Action::Commit { cursor } => trace.commits.push(cursor.clone()),
            Action::CheckDataset { version, .. } => {
                assert!(
                    trace.starts.is_empty() && trace.leases == 0,
                    "checked after the lease or a training"
                );
                trace.checked.push(version.clone());
            }
            Action::AcquireLease { .. } => trace.leases += 1,
            _ => {}
        }
        // An impossible event now and then must be refused without effect.
        if choice.is_multiple_of(13) {
            let before = run.clone();
            if run.step(&Event::Committed).is_err() {
                assert_eq!(run, before, "a refused event changed the state");
            } else {
                // `Committed` is valid only when finishing.
                assert_eq!(before.stage, Stage::Finishing);
                break;
            }
        }
        if choice.is_multiple_of(11) {
            // Crash + resume: the persisted snapshot is all that survives.
            let json = serde_json::to_string(&run).unwrap();
            run = serde_json::from_str(&json).unwrap();
            assert_eq!(run.pending, actions, "resume re-issues the pending actions");
        }
        let event = respond(&action, &run, choice, &mut clock);
        match &event {
            Event::TrainingLost { .. } => trace.lost += 1,
            Event::TrainingCancelled { .. } => trace.cancelled += 1,
            Event::StepDeferred { .. } => trace.deferred += 1,
            Event::Promoted { .. } => trace.promoted += 1,
            _ => {}
        }
        actions = run.step(&event).expect("a plausible event was refused");
        if s.manual && !trace.approved {
            assert!(
                !actions.iter().any(|a| matches!(a, Action::Promote { .. })),
                "manual promotion emitted Promote before an Approved event"
            );
        }
        assert!(
            run.is_done() || run.is_awaiting_approval() || !actions.is_empty(),
            "run left in stage {} with nothing to do after {event:?}",
            run.stage
        );
        if matches!(event, Event::StepDeferred { .. }) && !run.is_done() && run.step_error.is_some()
        {
            assert_eq!(actions, run.pending, "a deferred step is retried as it was");
            assert!(run.step_retries < run.plan.max_step_retries);
        }
    }
    assert!(
        run.is_done() || (s.manual && run.is_awaiting_approval()),
        "run stopped in stage {}",
        run.stage
    );
    (run, trace)
}

/// A gated, manual scenario (`promote = "manual"`), not a dry run.
fn manual_scenario() -> impl Strategy<Value = (Scenario, Vec<u8>)> {
    (scenario(), prop::collection::vec(any::<u8>(), 1..40)).prop_map(|(mut s, decisions)| {
        s.manual = true;
        s.gated = true;
        s.dry_run = false;
        (s, decisions)
    })
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(1_700_100_000 + secs, 0).unwrap()
}

/// After the automatic part, any interleaving of approve / reject / re-gate
/// (pass or fail) / crash-resume / repeated decisions, answering the actions
/// they cause (promotions sometimes deferred) until nothing is left to do.
fn decide(run: &mut LabelRun, trace: &mut Trace, decisions: &[u8]) {
    let mut actions = run.pending.clone();
    let mut rejected = false;
    for (i, d) in decisions.iter().copied().enumerate() {
        if actions.is_empty() {
            let event = match d % 7 {
                0 | 1 => Event::Approved {
                    by: "alice".into(),
                    reason: Some("ok".into()),
                    at: at(i as i64),
                },
                2 => Event::Rejected {
                    by: "bob".into(),
                    reason: "no".into(),
                    at: at(i as i64),
                },
                3 => Event::Regated {
                    production: None,
                    verdict: retrain_core::gate::evaluate(
                        &GatePolicy::seed_default(),
                        &run.candidate
                            .clone()
                            .unwrap_or(Candidate {
                                id: "c".into(),
                                metrics: Default::default(),
                            })
                            .metrics,
                        Some(
                            &[("dice".to_string(), 2.0), ("iou".to_string(), 2.0)]
                                .into_iter()
                                .collect(),
                        ),
                    ),
                },
                4 => Event::ApprovalExpired {
                    at: at(i as i64),
                    reason: "not approved within approval_expires = 7d".into(),
                },
                5 => Event::Superseded {
                    by_run: RunId::generate(),
                    at: at(i as i64),
                },
                _ => {
                    // Crash + resume.
                    let json = serde_json::to_string(&*run).unwrap();
                    *run = serde_json::from_str(&json).unwrap();
                    continue;
                }
            };
            let before = run.clone();
            match run.step(&event) {
                Ok(next) => {
                    assert_eq!(
                        before.stage,
                        Stage::AwaitingApproval,
                        "{event:?} accepted in {}",
                        before.stage
                    );
                    match event {
                        Event::Approved { .. } => trace.approved = true,
                        Event::Rejected { .. }
                        | Event::ApprovalExpired { .. }
                        | Event::Superseded { .. } => rejected = true,
                        Event::Regated { ref verdict, .. } if !verdict.passed => rejected = true,
                        _ => {}
                    }
                    actions = next;
                }
                Err(_) => {
                    assert_eq!(*run, before, "a refused decision changed the state");
                    assert_ne!(before.stage, Stage::AwaitingApproval);
                }
            }
            continue;
        }
        let action = actions[0].clone();
        if matches!(action, Action::Promote { .. }) {
            assert!(trace.approved, "Promote before Approved");
            assert!(!rejected, "a rejected run promotes");
            trace.promotes += 1;
        }
        let event = match action {
            Action::Promote { .. } if d % 3 == 0 => {
                trace.deferred += 1;
                Event::StepDeferred {
                    error: "registry down".into(),
                    done: Vec::new(),
                }
            }
            Action::Promote { .. } => {
                trace.promoted += 1;
                Event::Promoted {
                    version: PromotedVersion {
                        version: "2".into(),
                        previous: Some("1".into()),
                    },
                }
            }
            Action::ReleaseLease { .. } => Event::LeaseReleased,
            Action::Notify => Event::Notified { error: None },
            Action::Commit { ref cursor } => {
                // The cursor was committed before waiting: never again.
                assert_eq!(*cursor, None, "a decided run moved the cursor again");
                Event::Committed
            }
            other => panic!("unexpected action after the verdict: {other:?}"),
        };
        actions = run.step(&event).expect("a plausible event was refused");
    }
    if rejected {
        assert_eq!(trace.promoted, 0);
        assert!(run.promoted.is_none());
    }
    if run.is_done() {
        match &run.outcome {
            Some(
                Outcome::Expired { .. } | Outcome::Superseded { .. } | Outcome::Rejected { .. },
            ) => {
                assert!(run.promoted.is_none(), "a closed candidate was promoted");
            }
            Some(Outcome::Promoted { .. }) => assert!(run.approval.is_some()),
            _ => {}
        }
    }
}

/// What a rollback run did.
#[derive(Debug, Default)]
struct RollbackTrace {
    /// `RollBack` actions issued (retries after a deferral included).
    roll_backs: usize,
    /// Rollbacks that took effect (`RolledBack` answered).
    rolled_back: usize,
    deferred: usize,
    commits: Vec<Option<LabelCursor>>,
    /// Actions a rollback must never issue (training, promotion, leases…).
    foreign: Vec<Action>,
}

/// A rollback run answered by `respond`, with crash/resume and impossible
/// events injected like [`drive`].
fn drive_rollback(s: &Scenario) -> (LabelRun, RollbackTrace) {
    let mut run = LabelRun::new(
        RunId::generate(),
        CycleId::generate(),
        plan(s),
        LabelCursor {
            watermark: None,
            consumed_version: s.consumed.map(|c| VersionTag::new(format!("v{c}"))),
            consumed_num_samples: s.consumed.map(|_| 5),
            rejected_version: None,
        },
    );
    let mut trace = RollbackTrace::default();
    let mut clock = 0i64;
    let mut actions = run
        .step(&Event::RollbackRequested {
            rollback: Rollback {
                to_version: "1".into(),
                from_version: Some("3".into()),
                by: "alice".into(),
                reason: "dice regressed in production".into(),
                forced: false,
                at: at(0),
                restored_run: None,
                restored_candidate: None,
            },
        })
        .unwrap();
    let mut i = 0;
    while let Some(action) = actions.first().cloned() {
        let choice = s.choices[i % s.choices.len()].wrapping_add((i / s.choices.len()) as u8);
        i += 1;
        assert!(i < 200, "rollback run did not terminate");
        match &action {
            Action::RollBack { .. } => trace.roll_backs += 1,
            Action::Commit { cursor } => trace.commits.push(cursor.clone()),
            Action::Notify => {}
            other => trace.foreign.push(other.clone()),
        }
        if choice.is_multiple_of(13) {
            let before = run.clone();
            if run.step(&Event::Started { now: at(1) }).is_ok() {
                panic!("a rollback run accepted Started in stage {}", before.stage);
            }
            assert_eq!(run, before, "a refused event changed the state");
        }
        if choice.is_multiple_of(11) {
            let json = serde_json::to_string(&run).unwrap();
            run = serde_json::from_str(&json).unwrap();
            assert_eq!(run.pending, actions, "resume re-issues the pending actions");
        }
        let event = respond(&action, &run, choice, &mut clock);
        match &event {
            Event::RolledBack { .. } => trace.rolled_back += 1,
            Event::StepDeferred { .. } => trace.deferred += 1,
            _ => {}
        }
        actions = run.step(&event).expect("a plausible event was refused");
        assert!(
            run.is_done() || !actions.is_empty(),
            "rollback run left in stage {} with nothing to do after {event:?}",
            run.stage
        );
    }
    assert!(run.is_done(), "rollback run stopped in stage {}", run.stage);
    (run, trace)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn a_rollback_moves_production_at_most_once_and_never_the_cursor(mut s in scenario()) {
        s.dry_run = false;
        let (run, trace) = drive_rollback(&s);
        prop_assert!(trace.rolled_back <= 1, "{trace:?}");
        prop_assert!(trace.roll_backs <= 1 + trace.deferred, "{trace:?}");
        prop_assert!(trace.foreign.is_empty(), "a rollback trains, promotes or leases nothing: {trace:?}");
        prop_assert!(!trace.commits.is_empty());
        prop_assert!(trace.commits.iter().all(Option::is_none), "a rollback never moves the cursor");
        match &run.outcome {
            Some(Outcome::RolledBack { from, to }) => {
                prop_assert_eq!(trace.rolled_back, 1);
                prop_assert_eq!(to.as_str(), "1");
                prop_assert_eq!(from.as_deref(), Some("3"));
            }
            Some(Outcome::Failed { stage, .. }) => {
                prop_assert_eq!(trace.rolled_back, 0);
                prop_assert_eq!(*stage, Stage::RollingBack);
            }
            other => prop_assert!(false, "unexpected outcome {other:?}"),
        }
    }

    #[test]
    fn never_two_trainings_per_version_unless_lost(s in scenario()) {
        let (run, trace) = drive(&s);
        // A cancelled job (interrupt) is started again without counting.
        prop_assert!(trace.starts.len() <= 1 + trace.lost + trace.cancelled, "{trace:?}");
        prop_assert!((trace.starts.len() - trace.cancelled) as u32 <= s.max_attempts);
        prop_assert!(run.attempt <= s.max_attempts);
        prop_assert_eq!(run.starts as usize, trace.starts.len());
        if let Some(first) = trace.starts.first() {
            prop_assert!(trace.starts.iter().all(|v| v == first), "one run trains one version");
        }
        prop_assert!(run.is_done() || run.pending.is_empty());
    }

    #[test]
    fn never_two_promotions_per_run(s in scenario()) {
        let (_, trace) = drive(&s);
        // A deferred promotion is retried (idempotent per run id): it takes
        // effect at most once.
        prop_assert!(trace.promoted <= 1);
        prop_assert!(trace.promotes <= 1 + trace.deferred, "{trace:?}");
    }

    #[test]
    fn manual_promotes_only_after_approval_and_at_most_once((s, decisions) in manual_scenario()) {
        let (mut run, mut trace) = drive(&s);
        prop_assert_eq!(trace.promotes, 0, "no Promote without an Approved event");
        let waiting = run.is_awaiting_approval();
        if waiting {
            // The automatic part committed the dataset before waiting.
            prop_assert!(run.dataset.is_some() && trace.commits.last().is_some_and(Option::is_some));
        }
        decide(&mut run, &mut trace, &decisions);
        prop_assert!(trace.promoted <= 1, "{trace:?}");
        prop_assert!(trace.promotes <= 1 + trace.deferred, "{trace:?}");
        if trace.promoted == 1 {
            prop_assert!(run.approval.is_some());
        }
    }

    #[test]
    fn dry_run_never_emits_a_side_effect(mut s in scenario()) {
        s.dry_run = true;
        let (run, trace) = drive(&s);
        prop_assert_eq!(trace.side_effects_in_dry_run, 0);
        prop_assert!(run.is_done());
        prop_assert!(trace.starts.is_empty());
    }

    #[test]
    fn finishing_after_training_advances_the_watermark_to_the_dataset(s in scenario()) {
        let (run, trace) = drive(&s);
        if run.is_done() && !s.dry_run {
            // A failed commit is retried with the same cursor.
            prop_assert!(!trace.commits.is_empty());
            prop_assert!(trace.commits.iter().all(|c| *c == trace.commits[0]));
            let committed = trace.commits[0].clone();
            if let Some(Outcome::DatasetRejected { version, .. }) = &run.outcome {
                // Only the rejected version is recorded: the watermark and
                // the consumed version stay where they were.
                let expected = LabelCursor { rejected_version: Some(version.clone()), ..start_cursor(&s) };
                prop_assert_eq!(committed, Some(expected));
                prop_assert!(trace.starts.is_empty() && trace.leases == 0, "a rejected dataset was leased for or trained");
            } else if run.candidate.is_some() {
                let dataset = run.dataset.clone().expect("trained on a dataset");
                let cursor = committed.expect("a trained run commits a cursor");
                prop_assert_eq!(cursor.watermark, Some(dataset.metadata.created_at));
                prop_assert_eq!(cursor.consumed_version, Some(dataset.metadata.version_tag.clone()));
                prop_assert_eq!(trace.trained_dataset.map(|d| d.metadata.version_tag), Some(dataset.metadata.version_tag));
            } else {
                prop_assert!(committed.is_none(), "no training result, no cursor advance");
            }
        }
    }

    #[test]
    fn a_consumed_version_is_never_trained_again(s in scenario()) {
        let (_, trace) = drive(&s);
        if let Some(consumed) = s.consumed {
            let consumed = VersionTag::new(format!("v{consumed}"));
            prop_assert!(!trace.starts.contains(&consumed),
                "a consumed version must never be retrained");
        }
    }

    #[test]
    fn a_rejected_version_is_never_checked_or_trained_again(s in scenario()) {
        let (run, trace) = drive(&s);
        if let Some(rejected) = s.rejected {
            let rejected = VersionTag::new(format!("v{rejected}"));
            prop_assert!(!trace.checked.contains(&rejected), "a rejected version was checked again");
            prop_assert!(!trace.starts.contains(&rejected), "a rejected version was trained");
        }
        if s.checked && !trace.starts.is_empty() {
            // Trained only what the check passed, and checked it once.
            prop_assert_eq!(trace.checked.len(), 1);
            prop_assert!(run.dataset_check.as_ref().is_some_and(|c| c.passed));
            prop_assert_eq!(&trace.checked[0], &trace.starts[0]);
        }
        if !s.checked {
            prop_assert!(trace.checked.is_empty());
        }
    }
}
