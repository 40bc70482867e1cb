//! One contract suite for every `RunStore`, run against SQLite (a temp file)
//! and Postgres (a fresh database per test).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use retrain_adapters::store::{open_run_store, StoreOptions};
use retrain_core::domain::{
    Candidate, CycleId, DatasetCheckResult, DatasetMetadata, DatasetVersion, Fence, Label,
    LabelCursor, Lease, LockOutcome, LockOwner, ProcessIdentity, ProductionModel, PromotedVersion,
    RunId, TrainingHandle, VersionTag,
};
use retrain_core::gate::Verdict;
use retrain_core::journal::PromotionKind;
use retrain_core::journal::{
    LabelStart, LabelStatusRow, RunDetail, RunFilter, RunPage, RunSummary, Transition,
};
use retrain_core::machine::{
    Action, Approval, Event, LabelPlan, LabelRun, PromoteMode, Rollback, Stage, Trigger,
};
use retrain_core::ports::{RunStore, StoreError};

use crate::pg;

pub fn label(name: &str) -> Label {
    Label::new(name).unwrap()
}

pub fn plan(name: &str) -> LabelPlan {
    LabelPlan {
        label: label(name),
        trigger: Trigger::Metadata { threshold: 1 },
        prepare: None,
        gate: None,
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

pub fn dataset(version: &str, samples: u64) -> DatasetVersion {
    let raw = format!(
        r#"{{"dataset_name":"owner/ds","version_tag":"{version}","num_samples":{samples},"created_at":"2025-10-30T11:53:01.110260+00:00"}}"#
    );
    DatasetVersion {
        metadata: DatasetMetadata::parse(raw.as_bytes()).unwrap(),
        revision: None,
    }
}

/// Microsecond precision: what both stores keep for timestamps.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

const LONG: Duration = Duration::from_secs(60);

/// Take `name`'s lock for `owner`, which must succeed; also returns the
/// owner it was taken over from, if any.
async fn acquire_from(
    store: &dyn RunStore,
    name: &str,
    owner: &LockOwner,
    ttl: Duration,
) -> (Fence, Option<String>) {
    match store.try_lock(&label(name), owner, ttl).await.unwrap() {
        LockOutcome::Acquired {
            fence,
            taken_over_from,
        } => {
            assert_eq!(&fence.owner, owner);
            (fence, taken_over_from)
        }
        busy => panic!("{owner} could not lock {name}: {busy:?}"),
    }
}

/// Take `name`'s lock for `owner`, which must succeed and take over nobody.
async fn acquire(store: &dyn RunStore, name: &str, owner: &LockOwner, ttl: Duration) -> Fence {
    let (fence, taken_over_from) = acquire_from(store, name, owner, ttl).await;
    assert_eq!(taken_over_from, None, "{owner} locking {name}");
    fence
}

/// Take `name`'s lock for the test driver (a new token every time).
async fn lock(store: &dyn RunStore, name: &str) -> Fence {
    acquire(store, name, &LockOwner("driver".into()), LONG).await
}

/// `name` locked by the driver and its run driven to training on `v1`: the
/// fence and the run.
async fn training(store: &dyn RunStore, name: &str) -> (Fence, LabelRun) {
    let fence = lock(store, name).await;
    let (run, _) = drive(
        store,
        &fence,
        name,
        Some(dataset("v1", 10)),
        Some(Stage::Training),
    )
    .await;
    (fence, run)
}

/// `owner` must find `name` busy, held by `holder`.
async fn assert_busy(store: &dyn RunStore, name: &str, owner: &LockOwner, holder: &LockOwner) {
    match store.try_lock(&label(name), owner, LONG).await.unwrap() {
        LockOutcome::Busy { owner, expires_at } => {
            assert_eq!(owner, holder.0);
            assert!(expires_at > Utc::now(), "{expires_at}");
        }
        acquired => panic!("{owner} took the lock of {name} from {holder}: {acquired:?}"),
    }
}

/// The identity of a process of this host that has exited and been reaped.
fn dead_process() -> ProcessIdentity {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    // Not reaped yet, so /proc still knows its start time.
    let identity = retrain_adapters::process::identity(child.id()).unwrap();
    child.wait().unwrap();
    identity
}

/// An owner naming this (live) process, unique per call.
fn live_owner() -> LockOwner {
    LockOwner::for_process("retrain", &retrain_adapters::process::current_identity())
}

fn step(run: &mut LabelRun, event: Event) -> Transition {
    let from = run.stage;
    run.step(&event).unwrap();
    Transition::after_step(run, from, event, now())
}

/// Drive a metadata-triggered run through the real machine, journaling
/// every transition under `fence`, until `stop_at` (or the end: then
/// `finish` commits the run and its cursor). Returns the run as last
/// journaled and the cursor.
async fn drive(
    store: &dyn RunStore,
    fence: &Fence,
    name: &str,
    published: Option<DatasetVersion>,
    stop_at: Option<Stage>,
) -> (LabelRun, Option<LabelCursor>) {
    let mut plan = plan(name);
    plan.dataset_check = name.starts_with("checked");
    let mut run = LabelRun::new(
        RunId::generate(),
        CycleId::generate(),
        plan,
        store.cursor(&label(name)).await.unwrap(),
    );
    let mut next = Event::Started { now: now() };
    loop {
        let t = step(&mut run, next);
        store.record(&t, fence).await.unwrap();
        if Some(run.stage) == stop_at {
            return (run, None);
        }
        let action = run.pending.first().cloned().expect("a pending action");
        next = match action {
            Action::ReadPublished => Event::PublishedRead {
                current: published.clone(),
            },
            Action::StartTraining { .. } => Event::TrainingStarted {
                handle: TrainingHandle {
                    kind: "test".into(),
                    data: serde_json::json!({"pid": 1}),
                },
            },
            Action::AwaitTraining { .. } => Event::TrainingFinished {
                candidate: Candidate {
                    id: "cand-1".into(),
                    metrics: BTreeMap::from([("dice".into(), 0.8)]),
                },
            },
            Action::Notify => Event::Notified { error: None },
            Action::Commit { cursor } => {
                let t = step(&mut run, Event::Committed);
                store.finish(&t, cursor.clone(), fence).await.unwrap();
                return (run, cursor);
            }
            // A dataset check (labels named `checked*`) rejects `bad*` versions.
            Action::CheckDataset { version, .. } => Event::DatasetChecked {
                result: DatasetCheckResult {
                    passed: !version.as_str().starts_with("bad"),
                    ..DatasetCheckResult::default()
                },
            },
            other => panic!("unexpected action in test run: {other:?}"),
        };
    }
}

/// The rest of a run stopped in `Training`: the transitions to `Done` (the
/// last one is the `finish`) and the cursor it commits.
fn rest_of_run(run: &LabelRun) -> (Vec<Transition>, Option<LabelCursor>) {
    let mut run = run.clone();
    assert_eq!(run.stage, Stage::Training);
    let finished = step(
        &mut run,
        Event::TrainingFinished {
            candidate: Candidate {
                id: "c".into(),
                metrics: BTreeMap::new(),
            },
        },
    );
    let notified = step(&mut run, Event::Notified { error: None });
    let Some(Action::Commit { cursor }) = run.pending.first().cloned() else {
        panic!("expected a commit, got {:?}", run.pending);
    };
    let committed = step(&mut run, Event::Committed);
    (vec![finished, notified, committed], cursor)
}

fn lease_of(run: &LabelRun, id: &str) -> Lease {
    let at = now();
    Lease {
        id: id.into(),
        label: run.label().clone(),
        run_id: run.run_id.clone(),
        provider: "ec2".into(),
        resources: vec!["i-0abc".into()],
        region: Some("eu-west-1".into()),
        acquired_at: at,
        max_until: at + chrono::Duration::hours(3),
        attributes: BTreeMap::new(),
        released_at: None,
    }
}

/// Everything a write of `run` could change: the run and its journal, its
/// label's cursor, the active leases.
async fn state_of(
    store: &dyn RunStore,
    run: &LabelRun,
) -> (Option<RunDetail>, LabelCursor, Vec<Lease>) {
    (
        store.run(&run.run_id).await.unwrap(),
        store.cursor(run.label()).await.unwrap(),
        store.active_leases().await.unwrap(),
    )
}

/// Every write of `run` (stopped in `Training`, with the active lease
/// `lease-1`) under the `stale` fence is refused as `Fenced`, naming
/// `holder` (`nobody` or an owner) and the stale owner and token, and
/// changes nothing; renewing fails and releasing does nothing.
async fn assert_stale_fence_writes_nothing(
    store: &dyn RunStore,
    run: &LabelRun,
    stale: &Fence,
    holder: &str,
) {
    let label = run.label();
    let before = state_of(store, run).await;
    let holder_before = store.lock_holder(label).await.unwrap();
    let assert_fenced = |result: Result<(), StoreError>, what: &str| match result {
        Err(StoreError::Fenced(message)) => {
            let expected = format!("lock of label {label} is held by {holder} (token ");
            assert!(message.starts_with(&expected), "{what}: {message}");
            let stale_part = format!("not by {} (token {})", stale.owner, stale.token);
            assert!(message.ends_with(&stale_part), "{what}: {message}");
        }
        other => panic!("{what} with a stale fence: {other:?}"),
    };
    let (rest, cursor) = rest_of_run(run);
    assert_fenced(store.record(&rest[0], stale).await, "record");
    assert_fenced(
        store.finish(&rest[2], cursor.clone(), stale).await,
        "finish",
    );
    assert!(cursor.is_some(), "the finish would move the cursor");
    let mut released = lease_of(run, "lease-1");
    released.released_at = Some(now());
    assert_fenced(
        store.put_lease(&released, stale).await,
        "put_lease (update)",
    );
    assert_fenced(
        store.put_lease(&lease_of(run, "lease-2"), stale).await,
        "put_lease (insert)",
    );
    assert!(!store.renew_lock(label, stale, LONG).await.unwrap());
    store.release_lock(label, stale).await.unwrap();
    assert_eq!(state_of(store, run).await, before, "a stale fence wrote");
    assert_eq!(store.lock_holder(label).await.unwrap(), holder_before);
}

pub async fn journal_snapshot_and_cursor_are_written_together(store: Arc<dyn RunStore>) {
    let fence = lock(store.as_ref(), "dept").await;
    let (run, cursor) = drive(
        store.as_ref(),
        &fence,
        "dept",
        Some(dataset("v1", 10)),
        None,
    )
    .await;
    assert!(run.is_done());
    let cursor = cursor.expect("a consumed dataset advances the cursor");
    assert_eq!(cursor.consumed_version, Some(VersionTag::new("v1")));
    assert_eq!(store.cursor(&label("dept")).await.unwrap(), cursor);
    assert_eq!(store.unfinished_run(&label("dept")).await.unwrap(), None);

    let detail = store
        .run(&run.run_id)
        .await
        .unwrap()
        .expect("run is stored");
    assert_eq!(detail.snapshot, run);
    assert_eq!(detail.summary.stage, Stage::Done);
    assert_eq!(detail.summary.outcome, "trained");
    assert_eq!(detail.summary.label, label("dept"));
    let seqs: Vec<u64> = detail.transitions.iter().map(|t| t.seq).collect();
    assert_eq!(seqs, (1..=run.seq).collect::<Vec<_>>());
    assert_eq!(detail.transitions.last().unwrap().to, Stage::Done);
    assert_eq!(detail.transitions[0].from, Stage::Created);
    assert_eq!(detail.transitions[0].event["event"], "started");

    // Untouched labels start from the epoch.
    assert_eq!(
        store.cursor(&label("other")).await.unwrap(),
        LabelCursor::default()
    );

    // Only `finish` moves the cursor: the journal writes of the next run
    // leave it alone.
    let (next, _) = drive(
        store.as_ref(),
        &fence,
        "dept",
        Some(dataset("v2", 20)),
        Some(Stage::Training),
    )
    .await;
    assert!(store.run(&next.run_id).await.unwrap().is_some());
    assert_eq!(store.cursor(&label("dept")).await.unwrap(), cursor);
}

/// A run whose dataset check rejected its version commits only the rejected
/// version (watermark and consumed version unchanged); a later training keeps
/// it while advancing the rest.
pub async fn a_rejected_dataset_version_is_kept_in_the_cursor(store: Arc<dyn RunStore>) {
    let name = "checked";
    let fence = lock(store.as_ref(), name).await;
    let (first, _) = drive(store.as_ref(), &fence, name, Some(dataset("v1", 10)), None).await;
    assert_eq!(first.outcome.as_ref().unwrap().short(), "trained");
    let consumed = store.cursor(&label(name)).await.unwrap();
    assert_eq!(consumed.rejected_version, None);

    let (run, cursor) = drive(
        store.as_ref(),
        &fence,
        name,
        Some(dataset("bad-2", 20)),
        None,
    )
    .await;
    assert_eq!(run.outcome.as_ref().unwrap().short(), "dataset_rejected");
    let expected = LabelCursor {
        rejected_version: Some(VersionTag::new("bad-2")),
        ..consumed.clone()
    };
    assert_eq!(cursor, Some(expected.clone()));
    assert_eq!(store.cursor(&label(name)).await.unwrap(), expected);
    let summary = store.run(&run.run_id).await.unwrap().unwrap().summary;
    assert_eq!(summary.outcome, "dataset_rejected");

    let (_, _) = drive(store.as_ref(), &fence, name, Some(dataset("v3", 30)), None).await;
    let cursor = store.cursor(&label(name)).await.unwrap();
    assert_eq!(cursor.consumed_version, Some(VersionTag::new("v3")));
    assert_eq!(cursor.rejected_version, Some(VersionTag::new("bad-2")));
}

/// `cursors` answers every label asked, in order, as `cursor` does (a
/// label never committed: the default cursor) with one read.
pub async fn cursors_are_read_for_many_labels_at_once(store: Arc<dyn RunStore>) {
    for name in ["alpha", "beta"] {
        let fence = lock(store.as_ref(), name).await;
        drive(store.as_ref(), &fence, name, Some(dataset("v1", 10)), None).await;
    }
    let asked = [label("beta"), label("never-seen"), label("alpha")];
    let cursors = store.cursors(&asked).await.unwrap();
    assert_eq!(cursors.len(), 3);
    for (name, cursor) in asked.iter().zip(&cursors) {
        assert_eq!(*cursor, store.cursor(name).await.unwrap(), "{name}");
    }
    assert!(cursors[0].watermark.is_some());
    assert_eq!(cursors[1], LabelCursor::default());
    assert!(store.cursors(&[]).await.unwrap().is_empty());
}

/// `finish_all`: the steps before the commit (here training finished and
/// notified) and the commit itself, with the cursor, as one fenced write.
pub async fn the_steps_before_the_commit_are_finished_with_it(store: Arc<dyn RunStore>) {
    let (fence, run) = training(store.as_ref(), "dept").await;
    let (rest, cursor) = rest_of_run(&run);
    let cursor_before = store.cursor(&label("dept")).await.unwrap();

    // A stale fence writes none of it, the cursor included.
    store.release_lock(&label("dept"), &fence).await.unwrap();
    let fresh = lock(store.as_ref(), "dept").await;
    let refused = store.finish_all(&rest, cursor.clone(), &fence).await;
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    let detail = store.run(&run.run_id).await.unwrap().unwrap();
    assert_eq!(
        detail.transitions.len() as u64,
        run.seq,
        "a stale finish wrote a line"
    );
    assert_eq!(store.cursor(&label("dept")).await.unwrap(), cursor_before);

    store
        .finish_all(&rest, cursor.clone(), &fresh)
        .await
        .unwrap();
    let detail = store.run(&run.run_id).await.unwrap().unwrap();
    let events: Vec<&str> = detail.transitions[run.seq as usize..]
        .iter()
        .map(|t| t.event["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["training_finished", "notified", "committed"]);
    assert_eq!(detail.summary.stage, Stage::Done);
    assert_eq!(detail.snapshot, rest.last().unwrap().snapshot);
    assert_eq!(store.cursor(&label("dept")).await.unwrap(), cursor.unwrap());
    assert_eq!(store.unfinished_run(&label("dept")).await.unwrap(), None);
}

/// `finish_and_unlock`: a run's last write releases its label's lock in
/// the same write, fenced like it; the other writes of the same group
/// commit (on a current-thread runtime, one batch) keep their locks.
pub async fn a_runs_last_write_releases_its_lock_with_it(store: Arc<dyn RunStore>) {
    let someone = LockOwner("someone-else".into());
    let driver = LockOwner("driver".into());
    let mut finishing = Vec::new();
    for name in ["dept", "kept"] {
        finishing.push(training(store.as_ref(), name).await);
    }
    let [(dept_fence, dept_run), (kept_fence, kept_run)] = &finishing[..] else {
        unreachable!()
    };
    let (dept_rest, dept_cursor) = rest_of_run(dept_run);
    let (kept_rest, kept_cursor) = rest_of_run(kept_run);

    // A stale fence neither writes nor releases the new holder's lock.
    store
        .release_lock(&label("dept"), dept_fence)
        .await
        .unwrap();
    let fresh = lock(store.as_ref(), "dept").await;
    let refused = store
        .finish_and_unlock(&dept_rest, dept_cursor.clone(), dept_fence)
        .await;
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    assert_busy(store.as_ref(), "dept", &someone, &driver).await;
    let detail = store.run(&dept_run.run_id).await.unwrap().unwrap();
    assert_eq!(detail.transitions.len() as u64, dept_run.seq);

    let (unlocked, kept) = tokio::join!(
        store.finish_and_unlock(&dept_rest, dept_cursor.clone(), &fresh),
        store.finish_all(&kept_rest, kept_cursor, kept_fence),
    );
    unlocked.unwrap();
    kept.unwrap();
    let detail = store.run(&dept_run.run_id).await.unwrap().unwrap();
    assert_eq!(detail.summary.stage, Stage::Done);
    assert_eq!(
        detail.transitions.last().unwrap().event["event"],
        "committed"
    );
    assert_eq!(
        store.cursor(&label("dept")).await.unwrap(),
        dept_cursor.unwrap()
    );
    // Released with the write: free for anyone, at the next token.
    assert_eq!(store.lock_holder(&label("dept")).await.unwrap(), None);
    let (next, taken_over_from) = acquire_from(store.as_ref(), "dept", &someone, LONG).await;
    assert_eq!(next.token, fresh.token + 1);
    assert_eq!(taken_over_from, None, "a released lock is not a takeover");
    // The plain commit keeps its lock.
    assert_busy(store.as_ref(), "kept", &someone, &driver).await;
    assert_eq!(
        store
            .run(&kept_run.run_id)
            .await
            .unwrap()
            .unwrap()
            .summary
            .stage,
        Stage::Done
    );
}

/// Consecutive transitions written as one (the engine batches the steps
/// that only read): every journal line, the snapshot of the last, all under
/// one fence check; a stale fence writes none of them.
pub async fn batched_transitions_are_written_together_and_fenced(store: Arc<dyn RunStore>) {
    let fence = lock(store.as_ref(), "dept").await;
    let mut run = LabelRun::new(
        RunId::generate(),
        CycleId::generate(),
        plan("dept"),
        LabelCursor::default(),
    );
    let batch = vec![
        step(&mut run, Event::Started { now: now() }),
        step(
            &mut run,
            Event::PublishedRead {
                current: Some(dataset("v1", 10)),
            },
        ),
    ];
    assert_eq!(
        run.stage,
        Stage::Training,
        "the dataset is there: train next"
    );
    store.record_all(&batch, &fence).await.unwrap();
    let detail = store
        .run(&run.run_id)
        .await
        .unwrap()
        .expect("run is stored");
    assert_eq!(
        detail.snapshot, run,
        "the snapshot is the last transition's"
    );
    assert_eq!(detail.summary.stage, Stage::Training);
    let events: Vec<&str> = detail
        .transitions
        .iter()
        .map(|t| t.event["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["started", "published_read"]);
    assert_eq!(
        store.unfinished_run(&label("dept")).await.unwrap(),
        Some(run.clone())
    );

    // A stale fence writes none of a batch.
    let stale = fence.clone();
    store.release_lock(&label("dept"), &fence).await.unwrap();
    let _fresh = lock(store.as_ref(), "dept").await;
    let mut next = run.clone();
    let started = || Event::TrainingStarted {
        handle: TrainingHandle {
            kind: "test".into(),
            data: serde_json::Value::Null,
        },
    };
    let more = vec![step(&mut next, started())];
    let refused = store.record_all(&more, &stale).await;
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    let after = store.run(&run.run_id).await.unwrap().unwrap();
    assert_eq!(after.transitions.len(), 2, "a stale batch wrote a line");
    assert_eq!(after.snapshot, run);

    // Transitions of two runs are not one write.
    let mut other = LabelRun::new(
        RunId::generate(),
        CycleId::generate(),
        plan("dept"),
        LabelCursor::default(),
    );
    let mut next = run.clone();
    let mixed = vec![
        step(&mut next, started()),
        step(&mut other, Event::Started { now: now() }),
    ];
    let fence = lock(store.as_ref(), "dept").await;
    assert!(matches!(
        store.record_all(&mixed, &fence).await,
        Err(StoreError::Conflict(_))
    ));
}

/// `retrain status` in one query gives what the label-by-label reads give.
pub async fn label_statuses_answer_for_every_label_at_once(store: Arc<dyn RunStore>) {
    let fence = lock(store.as_ref(), "dept").await;
    let (_, cursor) = drive(
        store.as_ref(),
        &fence,
        "dept",
        Some(dataset("v1", 10)),
        None,
    )
    .await;
    let (next, _) = drive(
        store.as_ref(),
        &fence,
        "dept",
        Some(dataset("v2", 20)),
        Some(Stage::Training),
    )
    .await;
    let free = lock(store.as_ref(), "free").await;
    store.release_lock(&label("free"), &free).await.unwrap();
    let labels = [label("dept"), label("never"), label("free")];
    let rows = store.label_statuses(&labels).await.unwrap();
    assert_eq!(rows.len(), 3);
    let dept = &rows[0];
    assert_eq!(Some(dept.cursor.clone()), cursor);
    assert_eq!(dept.cursor, store.cursor(&label("dept")).await.unwrap());
    let newest = store
        .list_runs(&RunFilter {
            label: Some(label("dept")),
            limit: Some(1),
        })
        .await
        .unwrap();
    assert_eq!(dept.last_run.as_ref(), newest.first());
    assert_eq!(dept.last_run.as_ref().unwrap().run_id, next.run_id);
    assert_eq!(dept.last_verdict, None, "not gated");
    assert_eq!(
        dept.locked_by,
        store.lock_holder(&label("dept")).await.unwrap()
    );
    assert_eq!(dept.locked_by.as_deref(), Some(fence.owner.0.as_str()));
    assert_eq!(dept.awaiting_approval, None);
    assert!(dept.waiting.is_empty());
    assert_eq!(dept.production, None, "never promoted");
    assert_eq!(rows[1], LabelStatusRow::default(), "a label never seen");
    assert_eq!(rows[2].locked_by, None, "a released lock");
}

pub async fn unfinished_runs_resume_from_their_snapshot(store: Arc<dyn RunStore>) {
    let (fence, run) = training(store.as_ref(), "dept").await;
    assert_eq!(run.stage, Stage::Training);
    let resumed = store.unfinished_run(&label("dept")).await.unwrap();
    assert_eq!(resumed.as_ref(), Some(&run));
    assert_eq!(store.unfinished_run(&label("urgency")).await.unwrap(), None);
    let summary = &store.list_runs(&RunFilter::default()).await.unwrap()[0];
    assert_eq!(summary.outcome, "running");
    assert_eq!(summary.stage, Stage::Training);

    // The same journal line twice is a conflict, and changes nothing.
    let mut replay = run.clone();
    replay.seq -= 1;
    let duplicate = step(&mut replay, Event::TrainingLost { reason: "x".into() });
    assert!(matches!(
        store.record(&duplicate, &fence).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.unfinished_run(&label("dept")).await.unwrap(),
        Some(run.clone())
    );

    // A new holder (a resumed engine) continues the run to its end: nothing
    // is left unfinished.
    let fence = lock(store.as_ref(), "dept").await;
    let (rest, cursor) = rest_of_run(&run);
    store.record(&rest[0], &fence).await.unwrap();
    store.record(&rest[1], &fence).await.unwrap();
    store.finish(&rest[2], cursor, &fence).await.unwrap();
    assert_eq!(store.unfinished_run(&label("dept")).await.unwrap(), None);
}

pub async fn locks_are_exclusive_renewable_and_expire(store: Arc<dyn RunStore>) {
    let dept = label("dept");
    let a = LockOwner("a".into());
    let b = LockOwner("b".into());
    assert_eq!(store.lock_holder(&dept).await.unwrap(), None);
    let fa = acquire(store.as_ref(), "dept", &a, LONG).await;
    match store.try_lock(&dept, &b, LONG).await.unwrap() {
        LockOutcome::Busy { owner, expires_at } => {
            assert_eq!(owner, "a");
            assert!(expires_at > Utc::now() + chrono::Duration::seconds(30));
        }
        other => panic!("expected busy, got {other:?}"),
    }
    // Re-entrant for the same owner (a resumed engine keeps its lock), with
    // a new token: the old fence is stale now.
    let fa2 = acquire(store.as_ref(), "dept", &a, LONG).await;
    assert!(fa2.token > fa.token);
    assert_eq!(
        store.lock_holder(&dept).await.unwrap().as_deref(),
        Some("a")
    );
    assert!(store.renew_lock(&dept, &fa2, LONG).await.unwrap());
    assert!(!store.renew_lock(&dept, &fa, LONG).await.unwrap());
    let fb = Fence {
        owner: b.clone(),
        token: fa2.token,
    };
    assert!(!store.renew_lock(&dept, &fb, LONG).await.unwrap());
    // Only the holder of the current token can release.
    store.release_lock(&dept, &fb).await.unwrap();
    store.release_lock(&dept, &fa).await.unwrap();
    assert_eq!(
        store.lock_holder(&dept).await.unwrap().as_deref(),
        Some("a")
    );
    store.release_lock(&dept, &fa2).await.unwrap();
    assert_eq!(store.lock_holder(&dept).await.unwrap(), None);
    // A released lock cannot be renewed.
    assert!(!store.renew_lock(&dept, &fa2, LONG).await.unwrap());
    let fb = acquire(store.as_ref(), "dept", &b, LONG).await;
    store.release_lock(&dept, &fb).await.unwrap();

    // A crashed holder's lock expires and can then be taken over; the old
    // holder's renewal then fails.
    let short = Duration::from_millis(300);
    let fa = acquire(store.as_ref(), "dept", &a, short).await;
    assert!(matches!(
        store.try_lock(&dept, &b, LONG).await.unwrap(),
        LockOutcome::Busy { .. }
    ));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(store.lock_holder(&dept).await.unwrap(), None);
    // An expired lock is not renewed, even before anyone takes it.
    assert!(!store.renew_lock(&dept, &fa, LONG).await.unwrap());
    // `a` never released it: `b` took it over (`acquire` asserts that the
    // re-entrant, released and fresh acquisitions above took over nobody).
    let (_, taken_over_from) = acquire_from(store.as_ref(), "dept", &b, LONG).await;
    assert_eq!(taken_over_from.as_deref(), Some("a"));
    assert!(!store.renew_lock(&dept, &fa, LONG).await.unwrap());
    assert_eq!(
        store.lock_holder(&dept).await.unwrap().as_deref(),
        Some("b")
    );

    // Locks are per label.
    acquire(store.as_ref(), "urgency", &a, LONG).await;
}

/// The heartbeat's round: every held lock of `renew_locks` is extended in
/// one call, each answer in the order asked; a stale, foreign, released or
/// expired fence gets `false` and extends nothing.
pub async fn many_locks_are_renewed_at_once_and_each_is_fenced(store: Arc<dyn RunStore>) {
    let a = LockOwner("a".into());
    let b = LockOwner("b".into());
    assert!(store.renew_locks(&[], LONG).await.unwrap().is_empty());
    let short = Duration::from_millis(400);
    let held_a = acquire(store.as_ref(), "held-a", &a, short).await;
    let held_b = acquire(store.as_ref(), "held-b", &a, short).await;
    let stale = acquire(store.as_ref(), "taken", &a, short).await;
    let current = acquire(store.as_ref(), "taken", &a, short).await;
    let theirs = acquire(store.as_ref(), "theirs", &b, LONG).await;
    let released = acquire(store.as_ref(), "released", &a, LONG).await;
    store
        .release_lock(&label("released"), &released)
        .await
        .unwrap();
    let expiring = acquire(store.as_ref(), "expiring", &a, Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let ask = vec![
        (label("held-a"), held_a.clone()),
        (label("taken"), stale),
        (label("held-b"), held_b.clone()),
        (
            label("theirs"),
            Fence {
                owner: a.clone(),
                token: theirs.token,
            },
        ),
        (label("released"), released),
        (label("expiring"), expiring),
        (label("taken"), current),
    ];
    let renewed = store.renew_locks(&ask, LONG).await.unwrap();
    assert_eq!(renewed, [true, false, true, false, false, false, true]);
    // Extended to the new TTL: still held long after the short one ran out.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for name in ["held-a", "held-b", "taken"] {
        assert_eq!(
            store.lock_holder(&label(name)).await.unwrap().as_deref(),
            Some("a"),
            "{name}"
        );
    }
    assert_eq!(
        store
            .lock_holder(&label("theirs"))
            .await
            .unwrap()
            .as_deref(),
        Some("b")
    );
    assert_eq!(store.lock_holder(&label("released")).await.unwrap(), None);
    assert_eq!(store.lock_holder(&label("expiring")).await.unwrap(), None);
}

pub async fn tokens_grow_with_every_acquisition(store: Arc<dyn RunStore>) {
    let store = store.as_ref();
    let a = LockOwner("a".into());
    let b = LockOwner("b".into());
    let mut tokens = Vec::new();
    let first = acquire(store, "dept", &a, LONG).await;
    assert_eq!(first.token, 1, "a label's first lock has token 1");
    tokens.push(first.token);
    // Re-acquisition by the same owner.
    let again = acquire(store, "dept", &a, LONG).await;
    tokens.push(again.token);
    // Release (the row stays), then another owner, then the first again.
    store.release_lock(&label("dept"), &again).await.unwrap();
    let fb = acquire(store, "dept", &b, LONG).await;
    tokens.push(fb.token);
    store.release_lock(&label("dept"), &fb).await.unwrap();
    tokens.push(
        acquire(store, "dept", &a, Duration::from_millis(300))
            .await
            .token,
    );
    // Takeover after expiry.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (fb, taken_over_from) = acquire_from(store, "dept", &b, LONG).await;
    assert_eq!(taken_over_from.as_deref(), Some("a"));
    tokens.push(fb.token);
    // Takeover from a dead holder.
    store.release_lock(&label("dept"), &fb).await.unwrap();
    let dead = LockOwner::for_process("retrain", &dead_process());
    tokens.push(acquire(store, "dept", &dead, LONG).await.token);
    let (live, taken_over_from) = acquire_from(store, "dept", &live_owner(), LONG).await;
    assert_eq!(taken_over_from.as_deref(), Some(dead.0.as_str()));
    tokens.push(live.token);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens must strictly increase: {tokens:?}"
    );
    // Tokens are per label.
    assert_eq!(acquire(store, "urgency", &a, LONG).await.token, 1);
}

pub async fn stale_fences_write_nothing_after_expiry_and_takeover(store: Arc<dyn RunStore>) {
    let store = store.as_ref();
    let a = LockOwner("a".into());
    let b = LockOwner("b".into());
    // Long enough to drive the run under load, short enough for a test.
    let fa = acquire(store, "dept", &a, Duration::from_millis(1500)).await;
    let (run, _) = drive(
        store,
        &fa,
        "dept",
        Some(dataset("v1", 10)),
        Some(Stage::Training),
    )
    .await;
    store
        .put_lease(&lease_of(&run, "lease-1"), &fa)
        .await
        .unwrap();
    // `a` pauses past its TTL: its lock expired, nobody holds the label.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_stale_fence_writes_nothing(store, &run, &fa, "nobody").await;
    // `b` takes the label over; `a` wakes up and tries to go on.
    let (fb, taken_over_from) = acquire_from(store, "dept", &b, LONG).await;
    assert_eq!(taken_over_from.as_deref(), Some("a"));
    assert!(fb.token > fa.token);
    assert_stale_fence_writes_nothing(store, &run, &fa, "b").await;
    // The new holder goes on where the journal stands.
    let (rest, cursor) = rest_of_run(&run);
    for t in &rest[..2] {
        store.record(t, &fb).await.unwrap();
    }
    let mut released = lease_of(&run, "lease-1");
    released.released_at = Some(now());
    store.put_lease(&released, &fb).await.unwrap();
    store.finish(&rest[2], cursor.clone(), &fb).await.unwrap();
    assert_eq!(store.cursor(&label("dept")).await.unwrap(), cursor.unwrap());
    assert!(store.active_leases().await.unwrap().is_empty());
    assert!(store.renew_lock(&label("dept"), &fb, LONG).await.unwrap());
}

pub async fn stale_fences_write_nothing_after_release_and_reacquisition(store: Arc<dyn RunStore>) {
    let store = store.as_ref();
    let a = LockOwner("a".into());
    let first = acquire(store, "dept", &a, LONG).await;
    let (run, _) = drive(
        store,
        &first,
        "dept",
        Some(dataset("v1", 10)),
        Some(Stage::Training),
    )
    .await;
    store
        .put_lease(&lease_of(&run, "lease-1"), &first)
        .await
        .unwrap();
    store.release_lock(&label("dept"), &first).await.unwrap();
    assert_stale_fence_writes_nothing(store, &run, &first, "nobody").await;
    // The same owner locks the label again: the first fence stays stale.
    let second = acquire(store, "dept", &a, LONG).await;
    assert!(second.token > first.token);
    assert_stale_fence_writes_nothing(store, &run, &first, "a").await;
    let (rest, _) = rest_of_run(&run);
    store.record(&rest[0], &second).await.unwrap();
}

/// Lock `count` labels `label-0…`, lock the `stale` ones again (so their
/// first fences are stale), and start a run for each: the fences, the runs
/// and each run's first transition, in label order.
async fn started_runs(
    store: &dyn RunStore,
    count: usize,
    stale: &[usize],
) -> (Vec<Fence>, Vec<LabelRun>, Vec<Transition>) {
    let names: Vec<String> = (0..count).map(|i| format!("label-{i}")).collect();
    let mut fences = Vec::new();
    for name in &names {
        fences.push(lock(store, name).await);
    }
    for &i in stale {
        lock(store, &names[i]).await;
    }
    let mut runs = Vec::new();
    let mut transitions = Vec::new();
    for name in &names {
        let mut run = LabelRun::new(
            RunId::generate(),
            CycleId::generate(),
            plan(name),
            LabelCursor::default(),
        );
        transitions.push(step(&mut run, Event::Started { now: now() }));
        runs.push(run);
    }
    (fences, runs, transitions)
}

/// Each write of `runs` (answered `results`) was fenced off and applied
/// nothing if its index is `stale`, else applied; the applied runs' ids.
async fn only_the_stale_were_fenced<'r>(
    store: &dyn RunStore,
    results: Vec<Result<(), StoreError>>,
    runs: &'r [LabelRun],
    stale: &[usize],
) -> Vec<&'r RunId> {
    let mut applied = Vec::new();
    for (i, result) in results.into_iter().enumerate() {
        let stored = store.run(&runs[i].run_id).await.unwrap();
        if stale.contains(&i) {
            assert!(
                matches!(result, Err(StoreError::Fenced(_))),
                "{i}: {result:?}"
            );
            assert_eq!(stored, None, "{i}: a fenced write was applied");
        } else {
            result.unwrap_or_else(|e| panic!("{i}: {e}"));
            assert_eq!(stored.unwrap().snapshot, runs[i], "{i}");
            applied.push(&runs[i].run_id);
        }
    }
    applied
}

/// Writes sent together (on SQLite: queued while the writer task is busy,
/// so committed in one group-commit transaction) succeed or are fenced off
/// one by one: a stale fence fails only its own write.
pub async fn a_fenced_write_fails_alone_among_concurrent_writes(store: Arc<dyn RunStore>) {
    // Two labels were locked again since: their first fences are stale.
    let stale = [3, 8];
    let (fences, runs, transitions) = started_runs(store.as_ref(), 12, &stale).await;
    let results = futures::future::join_all(
        transitions
            .iter()
            .zip(&fences)
            .map(|(t, fence)| store.record(t, fence)),
    )
    .await;
    only_the_stale_were_fenced(store.as_ref(), results, &runs, &stale).await;
}

pub async fn concurrent_lockers_get_one_winner_per_round(store: Arc<dyn RunStore>) {
    let dept = label("dept");
    let mut tokens = Vec::new();
    for round in 0..4 {
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let store = store.clone();
                let dept = dept.clone();
                tokio::spawn(async move {
                    store
                        .try_lock(&dept, &LockOwner(format!("owner-{round}-{i}")), LONG)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut busy = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                LockOutcome::Acquired {
                    fence,
                    taken_over_from,
                } => {
                    assert_eq!(taken_over_from, None, "the lock was released");
                    winners.push(fence);
                }
                LockOutcome::Busy { owner, .. } => busy.push(owner),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let winner = winners.pop().unwrap();
        assert!(
            busy.iter().all(|owner| *owner == winner.owner.0),
            "round {round}: the losers saw {busy:?}, the winner is {}",
            winner.owner
        );
        tokens.push(winner.token);
        store.release_lock(&dept, &winner).await.unwrap();
    }
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "distinct, growing tokens: {tokens:?}"
    );
}

pub async fn dead_holders_of_this_host_are_taken_over_at_once(store: Arc<dyn RunStore>) {
    let dept = label("dept");
    let dead = LockOwner::for_process("retrain", &dead_process());
    let held = acquire(store.as_ref(), "dept", &dead, LONG).await;
    let (run, _) = drive(store.as_ref(), &held, "dept", None, Some(Stage::Counting)).await;
    // Its lock is unexpired, but its process is gone: nobody holds it.
    assert_eq!(store.lock_holder(&dept).await.unwrap(), None);
    // Of several contenders, exactly one takes it, at once.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            let dept = dept.clone();
            tokio::spawn(async move { store.try_lock(&dept, &live_owner(), LONG).await.unwrap() })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        if let LockOutcome::Acquired {
            fence,
            taken_over_from,
        } = task.await.unwrap()
        {
            assert_eq!(taken_over_from.as_deref(), Some(dead.0.as_str()));
            winners.push(fence);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let winner = &winners[0];
    assert_eq!(winner.token, held.token + 1);
    assert_eq!(
        store.lock_holder(&dept).await.unwrap().as_deref(),
        Some(winner.owner.0.as_str())
    );
    // The dead holder's fence is stale: had it been a paused process, it
    // could not write any more.
    let mut next = run.clone();
    let t = step(&mut next, Event::PublishedRead { current: None });
    assert!(matches!(
        store.record(&t, &held).await,
        Err(StoreError::Fenced(_))
    ));
    store.record(&t, winner).await.unwrap();
}

pub async fn live_and_remote_holders_are_not_taken_early(store: Arc<dyn RunStore>) {
    let store = store.as_ref();
    // A live process of this host (this test).
    let live = live_owner();
    acquire(store, "dept", &live, LONG).await;
    assert_busy(store, "dept", &live_owner(), &live).await;
    // A process of another host, even one whose pid is free here.
    let remote = LockOwner::for_process(
        "retrain",
        &ProcessIdentity {
            host: "another-host.example".into(),
            ..dead_process()
        },
    );
    acquire(store, "urgency", &remote, LONG).await;
    assert_busy(store, "urgency", &live_owner(), &remote).await;
    assert_eq!(
        store
            .lock_holder(&label("urgency"))
            .await
            .unwrap()
            .as_deref(),
        Some(remote.0.as_str())
    );
    // An owner naming no process.
    let plain = LockOwner::generate("embedder");
    acquire(store, "seg", &plain, LONG).await;
    assert_busy(store, "seg", &live_owner(), &plain).await;
}

pub async fn leases_are_recorded_updated_and_released(store: Arc<dyn RunStore>) {
    let fence = lock(store.as_ref(), "seg").await;
    let at = now();
    let mut lease = Lease {
        id: "lease-1".into(),
        label: label("seg"),
        run_id: RunId::generate(),
        provider: "ec2".into(),
        resources: vec!["i-0abc".into(), "i-0def".into()],
        region: Some("eu-west-1".into()),
        acquired_at: at,
        max_until: at + chrono::Duration::hours(3),
        attributes: BTreeMap::new(),
        released_at: None,
    };
    assert!(store.active_leases().await.unwrap().is_empty());
    store.put_lease(&lease, &fence).await.unwrap();
    assert_eq!(store.active_leases().await.unwrap(), vec![lease.clone()]);
    lease
        .attributes
        .insert("public_ip".into(), "203.0.113.7".into());
    lease.region = None;
    store.put_lease(&lease, &fence).await.unwrap();
    assert_eq!(store.active_leases().await.unwrap(), vec![lease.clone()]);
    lease.released_at = Some(now());
    store.put_lease(&lease, &fence).await.unwrap();
    assert!(store.active_leases().await.unwrap().is_empty());
    // Administrative writes (`infra reap`) hold no lock.
    store.release_lock(&label("seg"), &fence).await.unwrap();
    lease.released_at = None;
    store.put_lease_unfenced(&lease).await.unwrap();
    assert_eq!(store.active_leases().await.unwrap(), vec![lease.clone()]);
}

pub async fn runs_are_listed_newest_first_and_shown(store: Arc<dyn RunStore>) {
    let store_ref = store.as_ref();
    let fence = lock(store_ref, "dept").await;
    let (first, _) = drive(store_ref, &fence, "dept", None, None).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let fence = lock(store_ref, "urgency").await;
    let (second, _) = drive(store_ref, &fence, "urgency", None, None).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let fence = lock(store_ref, "dept").await;
    let (third, _) = drive(
        store_ref,
        &fence,
        "dept",
        Some(dataset("v1", 3)),
        Some(Stage::Training),
    )
    .await;

    let all = store.list_runs(&RunFilter::default()).await.unwrap();
    let ids: Vec<&RunId> = all.iter().map(|s| &s.run_id).collect();
    assert_eq!(ids, vec![&third.run_id, &second.run_id, &first.run_id]);
    assert_eq!(all[2].outcome, "skipped");
    assert_eq!(all[0].outcome, "running");
    assert!(all[2].updated_at >= all[2].started_at);

    let dept = store
        .list_runs(&RunFilter {
            label: Some(label("dept")),
            limit: None,
        })
        .await
        .unwrap();
    assert_eq!(dept.len(), 2);
    assert!(dept.iter().all(|s| s.label == label("dept")));
    let one = store
        .list_runs(&RunFilter {
            label: None,
            limit: Some(1),
        })
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].run_id, third.run_id);

    let shown = store.run(&second.run_id).await.unwrap().unwrap();
    assert_eq!(shown.summary, all[1]);
    assert_eq!(shown.snapshot, second);
    assert_eq!(store.run(&RunId("nope".into())).await.unwrap(), None);
}

async fn sqlite_store(dir: &tempfile::TempDir) -> Arc<dyn RunStore> {
    let url = format!("sqlite://{}/nested/state.db", dir.path().display());
    open_run_store(
        &url,
        StoreOptions {
            migrate: true,
            read_only: false,
        },
    )
    .await
    .unwrap()
}

/// A run of `name` about to journal its promotion of `cand` over `v1`.
fn promoting_run(name: &str, cand: &str, approval: Option<Approval>) -> LabelRun {
    let mut run = LabelRun::new(
        RunId::generate(),
        CycleId::generate(),
        plan(name),
        LabelCursor::default(),
    );
    run.stage = Stage::Promoting;
    run.started_at = Some(now());
    run.candidate = Some(Candidate {
        id: cand.into(),
        metrics: BTreeMap::from([("dice".into(), 0.9)]),
    });
    run.baseline = Some(Box::new(ProductionModel {
        version: "1".into(),
        candidate_id: None,
        metrics: BTreeMap::from([("dice".into(), 0.8)]),
    }));
    run.approval = approval.map(Box::new);
    run
}

/// `runs_with_verdict`: the label's runs that have a gate verdict, newest
/// first, up to the limit, each with its start as stored; not a run
/// without a verdict, not another label's.
pub async fn runs_with_verdict_are_the_labels_gated_runs_newest_first(store: Arc<dyn RunStore>) {
    let fence = lock(store.as_ref(), "dept").await;
    let other_fence = lock(store.as_ref(), "other").await;
    let base = now();
    let gated = |name: &str, secs: i64, reason: &str| {
        let mut run = LabelRun::new(
            RunId::generate(),
            CycleId::generate(),
            plan(name),
            LabelCursor::default(),
        );
        let t = step(
            &mut run,
            Event::GateEvaluated {
                now: base + chrono::Duration::seconds(secs),
                candidate: Candidate {
                    id: format!("cand-{secs}"),
                    metrics: BTreeMap::from([("dice".into(), 0.8)]),
                },
                production: None,
                verdict: Verdict {
                    passed: true,
                    first_model: true,
                    forced: false,
                    comparisons: Vec::new(),
                    reason: reason.into(),
                },
                promote: false,
            },
        );
        (run, t)
    };
    let mut expected = Vec::new();
    for (secs, reason) in [(10, "first"), (30, "third"), (20, "second")] {
        let (run, t) = gated("dept", secs, reason);
        store.record(&t, &fence).await.unwrap();
        expected.push((run.started_at.unwrap(), run));
    }
    expected.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    // A run without a verdict, newer than all, and another label's.
    let (_ungated, _) = drive(
        store.as_ref(),
        &fence,
        "dept",
        Some(dataset("v1", 10)),
        None,
    )
    .await;
    let (_, t) = gated("other", 40, "elsewhere");
    store.record(&t, &other_fence).await.unwrap();

    let all = store.runs_with_verdict(&label("dept"), None).await.unwrap();
    let reasons: Vec<&str> = all
        .iter()
        .map(|(_, run)| run.verdict.as_ref().unwrap().reason.as_str())
        .collect();
    assert_eq!(reasons, ["third", "second", "first"]);
    assert_eq!(all, expected);
    let newest = store
        .runs_with_verdict(&label("dept"), Some(2))
        .await
        .unwrap();
    assert_eq!(newest, expected[..2]);
    assert!(store
        .runs_with_verdict(&label("nobody"), Some(5))
        .await
        .unwrap()
        .is_empty());
}

/// `label_start`: the label's unfinished run when it has one, else its
/// cursor (the default cursor for a label never seen), the same as
/// `unfinished_run` and `cursor` read one after the other.
pub async fn label_start_is_the_unfinished_run_else_the_cursor(store: Arc<dyn RunStore>) {
    let fence = lock(store.as_ref(), "dept").await;
    assert_eq!(
        store.label_start(&label("dept")).await.unwrap(),
        LabelStart::Fresh(LabelCursor::default())
    );
    let (_, cursor) = drive(
        store.as_ref(),
        &fence,
        "dept",
        Some(dataset("v1", 10)),
        None,
    )
    .await;
    let cursor = cursor.expect("a committed cursor");
    assert_ne!(cursor, LabelCursor::default());
    assert_eq!(
        store.label_start(&label("dept")).await.unwrap(),
        LabelStart::Fresh(cursor.clone())
    );
    let (waiting, _) = drive(
        store.as_ref(),
        &fence,
        "dept",
        Some(dataset("v2", 20)),
        Some(Stage::Training),
    )
    .await;
    assert_eq!(
        store.label_start(&label("dept")).await.unwrap(),
        LabelStart::Resume(Box::new(waiting.clone()))
    );
    assert_eq!(
        store.unfinished_run(&label("dept")).await.unwrap(),
        Some(waiting)
    );
    assert_eq!(store.cursor(&label("dept")).await.unwrap(), cursor);
}

/// `run_snapshots`: the latest snapshot of each asked run the store has,
/// finished or not, the same as a full read's; an unknown id is skipped;
/// nothing asked, nothing read.
pub async fn run_snapshots_are_the_asked_runs_latest_snapshots(store: Arc<dyn RunStore>) {
    let fence = lock(store.as_ref(), "dept").await;
    let other_fence = lock(store.as_ref(), "other").await;
    let (finished, _) = drive(
        store.as_ref(),
        &fence,
        "dept",
        Some(dataset("v1", 10)),
        None,
    )
    .await;
    let (waiting, _) = drive(
        store.as_ref(),
        &other_fence,
        "other",
        Some(dataset("v1", 10)),
        Some(Stage::Training),
    )
    .await;
    let (other, _) = drive(
        store.as_ref(),
        &fence,
        "dept",
        Some(dataset("v2", 20)),
        None,
    )
    .await;
    let unknown = RunId::generate();
    let asked = [
        waiting.run_id.clone(),
        unknown.clone(),
        finished.run_id.clone(),
    ];
    let mut got = store.run_snapshots(&asked).await.unwrap();
    got.sort_by(|a, b| a.run_id.as_str().cmp(b.run_id.as_str()));
    let mut expected = vec![finished.clone(), waiting.clone()];
    expected.sort_by(|a, b| a.run_id.as_str().cmp(b.run_id.as_str()));
    assert_eq!(got, expected, "not {other:?}, not {unknown}");
    for run in &got {
        let detail = store.run(&run.run_id).await.unwrap().unwrap();
        assert_eq!(&detail.snapshot, run);
    }
    assert!(store.run_snapshots(&[]).await.unwrap().is_empty());
    assert!(store.run_snapshots(&[unknown]).await.unwrap().is_empty());
}

pub async fn promotions_are_recorded_with_their_journal_write(store: Arc<dyn RunStore>) {
    let fence = lock(store.as_ref(), "dept").await;
    let mut auto = promoting_run("dept", "cand-a", None);
    let promoted = |v: &str| Event::Promoted {
        version: PromotedVersion {
            version: v.into(),
            previous: Some("1".into()),
        },
    };
    let t = step(&mut auto, promoted("2"));
    store.record(&t, &fence).await.unwrap();
    // A replayed journal line is refused and adds no second event.
    store.record(&t, &fence).await.unwrap_err();
    let by_hand = Approval {
        by: "alice".into(),
        reason: Some("looks good".into()),
        at: now(),
    };
    let mut manual = promoting_run("dept", "cand-b", Some(by_hand));
    let t2 = step(&mut manual, promoted("3"));
    store.record(&t2, &fence).await.unwrap();
    // Other journal writes record no promotion.
    let mut other = LabelRun::new(
        RunId::generate(),
        CycleId::generate(),
        plan("dept"),
        LabelCursor::default(),
    );
    let t3 = step(&mut other, Event::Started { now: now() });
    store.record(&t3, &fence).await.unwrap();

    let history = store.promotions(&label("dept")).await.unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[0].run_id, auto.run_id);
    assert_eq!(history[0].kind, PromotionKind::Promotion);
    assert_eq!(history[0].version, "2");
    assert_eq!(history[0].previous_version.as_deref(), Some("1"));
    assert_eq!(history[0].candidate_run.as_ref(), Some(&auto.run_id));
    assert_eq!(history[0].candidate_id.as_deref(), Some("cand-a"));
    assert_eq!(history[0].by, "auto");
    assert_eq!(history[0].reason, None);
    assert_eq!(history[0].at, t.at);
    assert_eq!(history[1].version, "3");
    assert_eq!(history[1].by, "alice");
    assert_eq!(history[1].reason.as_deref(), Some("looks good"));
    assert!(store.promotions(&label("other")).await.unwrap().is_empty());
    // The status statement reads production from the same history.
    let status = store
        .label_statuses(&[label("dept"), label("other")])
        .await
        .unwrap();
    let production = status[0].production.as_ref().unwrap();
    assert_eq!(
        (production.version.as_str(), production.since),
        ("3", t2.at)
    );
    assert_eq!(status[1].production, None);

    // A stale fence records no promotion event either.
    store.release_lock(&label("dept"), &fence).await.unwrap();
    let _new = lock(store.as_ref(), "dept").await;
    let mut late = promoting_run("dept", "cand-c", None);
    let t4 = step(&mut late, promoted("4"));
    assert!(matches!(
        store.record(&t4, &fence).await,
        Err(StoreError::Fenced(_))
    ));
    assert_eq!(store.promotions(&label("dept")).await.unwrap().len(), 2);
}

/// A write of several lines (the engine batches consecutive steps): the
/// lines take consecutive journal positions in their order, the promotion
/// among them is recorded once, and the run's verdict reason is what the
/// status listing shows.
pub async fn a_write_of_several_lines_takes_consecutive_positions(store: Arc<dyn RunStore>) {
    let fence = lock(store.as_ref(), "dept").await;
    let mut first = LabelRun::new(
        RunId::generate(),
        CycleId::generate(),
        plan("other"),
        LabelCursor::default(),
    );
    let other_fence = lock(store.as_ref(), "other").await;
    let started = step(&mut first, Event::Started { now: now() });
    store.record(&started, &other_fence).await.unwrap();
    let before = store.journal_end().await.unwrap();
    assert!(before >= 1);

    let mut run = promoting_run("dept", "cand-a", None);
    run.verdict = Some(Verdict {
        passed: true,
        first_model: false,
        forced: false,
        comparisons: Vec::new(),
        reason: "dice 0.9 > 0.8".into(),
    });
    let promoted = step(
        &mut run,
        Event::Promoted {
            version: PromotedVersion {
                version: "2".into(),
                previous: Some("1".into()),
            },
        },
    );
    let notified = step(&mut run, Event::Notified { error: None });
    let batch = vec![promoted, notified];
    store.record_all(&batch, &fence).await.unwrap();

    let lines = store.journal_after(before, None, 100).await.unwrap();
    let written: Vec<(u64, u64)> = lines.iter().map(|l| (l.position, l.seq)).collect();
    assert_eq!(
        written,
        [(before + 1, batch[0].seq), (before + 2, batch[1].seq)],
        "consecutive positions, in the write's order"
    );
    assert_eq!(store.journal_end().await.unwrap(), before + 2);
    let history = store.promotions(&label("dept")).await.unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].verdict.as_deref(), Some("dice 0.9 > 0.8"));
    let status = store.label_statuses(&[label("dept")]).await.unwrap();
    assert_eq!(status[0].last_verdict.as_deref(), Some("dice 0.9 > 0.8"));
    assert_eq!(
        store.run(&run.run_id).await.unwrap().unwrap().snapshot,
        run,
        "the snapshot is the last line's"
    );
}

pub async fn rollbacks_are_recorded_as_promotion_events_and_resume(store: Arc<dyn RunStore>) {
    let fence = lock(store.as_ref(), "dept").await;
    let mut run = LabelRun::new(
        RunId::generate(),
        CycleId::generate(),
        plan("dept"),
        LabelCursor::default(),
    );
    let requested = step(
        &mut run,
        Event::RollbackRequested {
            rollback: Rollback {
                to_version: "1".into(),
                from_version: Some("2".into()),
                by: "bob".into(),
                reason: "misroutes billing tickets".into(),
                forced: false,
                at: now(),
                restored_run: Some(RunId("promoted-1".into())),
                restored_candidate: Some("cand-1".into()),
            },
        },
    );
    store.record(&requested, &fence).await.unwrap();
    // Interrupted before the registry answered: the rollback run resumes.
    let unfinished = store.unfinished_run(&label("dept")).await.unwrap().unwrap();
    assert_eq!(unfinished.run_id, run.run_id);
    assert_eq!(unfinished.stage, Stage::RollingBack);
    assert_eq!(unfinished.rollback, run.rollback);
    assert!(store.promotions(&label("dept")).await.unwrap().is_empty());

    let rolled = step(
        &mut run,
        Event::RolledBack {
            version: PromotedVersion {
                version: "1".into(),
                previous: Some("2".into()),
            },
        },
    );
    store.record(&rolled, &fence).await.unwrap();
    let history = store.promotions(&label("dept")).await.unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    let event = &history[0];
    assert_eq!(event.run_id, run.run_id);
    assert_eq!(event.kind, PromotionKind::Rollback);
    assert_eq!(event.version, "1");
    assert_eq!(event.previous_version.as_deref(), Some("2"));
    assert_eq!(event.candidate_run, Some(RunId("promoted-1".into())));
    assert_eq!(event.candidate_id.as_deref(), Some("cand-1"));
    assert_eq!(event.verdict, None);
    assert_eq!(event.by, "bob");
    assert_eq!(event.reason.as_deref(), Some("misroutes billing tickets"));
    let summary = store
        .list_runs(&RunFilter::default())
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.run_id == run.run_id)
        .unwrap();
    assert_eq!(summary.stage, Stage::Notifying);
    assert_eq!(summary.outcome, "rolled_back");
}

/// Journal positions: every line once, in commit order, across labels;
/// reading on from any position seen repeats and loses nothing; a label
/// filter keeps the positions of the whole journal.
pub async fn the_journal_is_read_after_a_position_in_commit_order(store: Arc<dyn RunStore>) {
    let store_ref = store.as_ref();
    assert_eq!(store.journal_after(0, None, 100).await.unwrap(), vec![]);
    assert_eq!(store.journal_end().await.unwrap(), 0);
    let fence = lock(store_ref, "dept").await;
    let (dept, _) = drive(store_ref, &fence, "dept", None, None).await;
    let fence = lock(store_ref, "urgency").await;
    let (urgency, _) = drive(
        store_ref,
        &fence,
        "urgency",
        Some(dataset("v1", 3)),
        Some(Stage::Training),
    )
    .await;

    let all = store.journal_after(0, None, 1000).await.unwrap();
    let lines = |run: &LabelRun| store_ref_lines(run, &all);
    // One line per event (`seq` counts them).
    assert_eq!(lines(&dept), dept.seq as usize);
    assert_eq!(lines(&urgency), urgency.seq as usize);
    let positions: Vec<u64> = all.iter().map(|e| e.position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert_eq!(
        store.journal_end().await.unwrap(),
        *positions.last().unwrap()
    );
    // Commit order: dept's run was journaled entirely before urgency's.
    let first_urgency = all
        .iter()
        .position(|e| e.label == label("urgency"))
        .unwrap();
    assert!(all[..first_urgency]
        .iter()
        .all(|e| e.label == label("dept")));
    assert_eq!(all[0].event_name(), "started");
    assert_eq!(all[0].run_id, dept.run_id);
    assert_eq!(all[0].seq, 1);

    // Paging: any split point gives the rest exactly once.
    for split in [1usize, 3, all.len() - 1] {
        let after = all[split - 1].position;
        let rest = store.journal_after(after, None, 1000).await.unwrap();
        assert_eq!(rest, all[split..].to_vec());
    }
    let page = store.journal_after(0, None, 2).await.unwrap();
    assert_eq!(page, all[..2].to_vec());

    let only_urgency = store
        .journal_after(0, Some(label("urgency")), 1000)
        .await
        .unwrap();
    let expected: Vec<_> = all
        .iter()
        .filter(|e| e.label == label("urgency"))
        .cloned()
        .collect();
    assert_eq!(only_urgency, expected);

    // Later lines get larger positions.
    let fence = lock(store_ref, "dept").await;
    let _ = drive(store_ref, &fence, "dept", None, None).await;
    let newer = store
        .journal_after(all.last().unwrap().position, None, 1000)
        .await
        .unwrap();
    assert!(!newer.is_empty());
    assert!(newer.iter().all(|e| e.label == label("dept")));
}

fn store_ref_lines(run: &LabelRun, all: &[retrain_core::journal::JournalEntry]) -> usize {
    all.iter().filter(|e| e.run_id == run.run_id).count()
}

/// Concurrent writers of different labels still get distinct, gap-free
/// positions and each line appears once.
pub async fn concurrent_journal_writers_get_distinct_positions(store: Arc<dyn RunStore>) {
    let names = ["a", "b", "c", "d"];
    let mut tasks = Vec::new();
    for name in names {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let fence = lock(store.as_ref(), name).await;
            drive(store.as_ref(), &fence, name, None, None).await.0
        }));
    }
    let mut expected = 0;
    for task in tasks {
        expected += task.await.unwrap().seq as usize;
    }
    let all = store.journal_after(0, None, 1000).await.unwrap();
    assert_eq!(all.len(), expected);
    let positions: Vec<u64> = all.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=expected as u64).collect::<Vec<_>>());
}

/// Idempotency keys: one claimer, the stored response read back, a
/// different request with the same key refused, a released claim free again.
pub async fn idempotency_keys_are_claimed_once(store: Arc<dyn RunStore>) {
    use retrain_core::journal::RequestClaim;
    assert_eq!(
        store.claim_request("k1", "fp-a").await.unwrap(),
        RequestClaim::Claimed
    );
    assert_eq!(
        store.claim_request("k1", "fp-a").await.unwrap(),
        RequestClaim::Seen { response: None }
    );
    assert_eq!(
        store.claim_request("k1", "fp-b").await.unwrap(),
        RequestClaim::Mismatch
    );
    store
        .complete_request("k1", r#"{"cycle_id":"c"}"#)
        .await
        .unwrap();
    assert_eq!(
        store.claim_request("k1", "fp-a").await.unwrap(),
        RequestClaim::Seen {
            response: Some(r#"{"cycle_id":"c"}"#.into())
        }
    );
    // A stored response is never released.
    store.release_request("k1").await.unwrap();
    assert!(matches!(
        store.claim_request("k1", "fp-a").await.unwrap(),
        RequestClaim::Seen { response: Some(_) }
    ));
    // An unanswered claim is.
    assert_eq!(
        store.claim_request("k2", "fp").await.unwrap(),
        RequestClaim::Claimed
    );
    store.release_request("k2").await.unwrap();
    assert_eq!(
        store.claim_request("k2", "fp").await.unwrap(),
        RequestClaim::Claimed
    );
    // Concurrent claims: exactly one wins.
    let claims = futures::future::join_all((0..8).map(|_| {
        let store = store.clone();
        async move { store.claim_request("k3", "fp").await.unwrap() }
    }))
    .await;
    assert_eq!(
        claims
            .iter()
            .filter(|c| **c == RequestClaim::Claimed)
            .count(),
        1,
        "{claims:?}"
    );
}

/// Keyset pages: newest first, each after the previous page's last run, not
/// shifted by runs started in between; filtered by label and by outcome or
/// stage; an unknown cursor gives an empty page.
pub async fn runs_are_paged_by_keyset(store: Arc<dyn RunStore>) {
    let store_ref = store.as_ref();
    let mut started = Vec::new();
    for name in ["dept", "urgency", "dept", "urgency"] {
        let fence = lock(store_ref, name).await;
        started.push(drive(store_ref, &fence, name, None, None).await.0.run_id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let newest_first: Vec<RunId> = started.iter().rev().cloned().collect();
    let page = |after: Option<&RunId>, limit| RunPage {
        label: None,
        status: None,
        after: after.cloned(),
        limit,
    };
    let first = store.list_runs_page(&page(None, 3)).await.unwrap();
    let ids: Vec<RunId> = first.iter().map(|r| r.run_id.clone()).collect();
    assert_eq!(ids, newest_first[..3]);
    // A run started between two pages goes before the first page only.
    let fence = lock(store_ref, "dept").await;
    let (late, _) = drive(store_ref, &fence, "dept", None, None).await;
    let second = store.list_runs_page(&page(Some(&ids[2]), 3)).await.unwrap();
    let rest: Vec<RunId> = second.iter().map(|r| r.run_id.clone()).collect();
    assert_eq!(rest, newest_first[3..]);
    let newest = store.list_runs_page(&page(None, 1)).await.unwrap();
    assert_eq!(newest[0].run_id, late.run_id);
    assert!(store
        .list_runs_page(&page(Some(&RunId("nope".into())), 3))
        .await
        .unwrap()
        .is_empty());
    let all = store.list_runs(&RunFilter::default()).await.unwrap();
    let mut sqls = Vec::new();
    let filters = [
        (Some(label("urgency")), None),
        (None, Some("skipped".to_owned())),
        (None, Some("done".to_owned())),
        (None, Some("training".to_owned())),
        (Some(label("dept")), Some("skipped".to_owned())),
    ];
    for (label_filter, status) in filters {
        let query = RunPage {
            label: label_filter,
            status,
            after: Some(newest_first[0].clone()),
            limit: 10,
        };
        let sql = store.list_runs_page(&query).await.unwrap();
        assert_eq!(sql, expected_page(&all, &query), "{query:?}");
        sqls.push(sql.len());
    }
    assert_eq!(
        sqls,
        [1, 3, 3, 0, 2],
        "urgency; skipped; done; training; dept and skipped"
    );
}

/// What a page must hold, from the full listing.
fn expected_page(all: &[RunSummary], query: &RunPage) -> Vec<RunSummary> {
    let start = query
        .after
        .as_ref()
        .and_then(|after| all.iter().position(|r| &r.run_id == after))
        .map_or(0, |at| at + 1);
    all[start..]
        .iter()
        .filter(|r| query.label.as_ref().is_none_or(|l| &r.label == l))
        .filter(|r| {
            query
                .status
                .as_deref()
                .is_none_or(|s| r.outcome == s || r.stage.as_str() == s)
        })
        .take(query.limit as usize)
        .cloned()
        .collect()
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    super::$name(super::sqlite_store(&dir).await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(url) = super::pg::fresh_database().await else { return };
                    let store = retrain_adapters::store::open_run_store(
                        &url,
                        retrain_adapters::store::StoreOptions { migrate: true, read_only: false },
                    )
                    .await
                    .unwrap();
                    super::$name(store).await;
                }
            )*
        }
    };
}

contract!(
    journal_snapshot_and_cursor_are_written_together,
    the_steps_before_the_commit_are_finished_with_it,
    a_runs_last_write_releases_its_lock_with_it,
    batched_transitions_are_written_together_and_fenced,
    a_write_of_several_lines_takes_consecutive_positions,
    label_statuses_answer_for_every_label_at_once,
    unfinished_runs_resume_from_their_snapshot,
    locks_are_exclusive_renewable_and_expire,
    many_locks_are_renewed_at_once_and_each_is_fenced,
    tokens_grow_with_every_acquisition,
    stale_fences_write_nothing_after_expiry_and_takeover,
    stale_fences_write_nothing_after_release_and_reacquisition,
    a_fenced_write_fails_alone_among_concurrent_writes,
    concurrent_lockers_get_one_winner_per_round,
    dead_holders_of_this_host_are_taken_over_at_once,
    live_and_remote_holders_are_not_taken_early,
    leases_are_recorded_updated_and_released,
    runs_are_listed_newest_first_and_shown,
    runs_are_paged_by_keyset,
    promotions_are_recorded_with_their_journal_write,
    runs_with_verdict_are_the_labels_gated_runs_newest_first,
    run_snapshots_are_the_asked_runs_latest_snapshots,
    label_start_is_the_unfinished_run_else_the_cursor,
    a_rejected_dataset_version_is_kept_in_the_cursor,
    cursors_are_read_for_many_labels_at_once,
    rollbacks_are_recorded_as_promotion_events_and_resume,
    the_journal_is_read_after_a_position_in_commit_order,
    concurrent_journal_writers_get_distinct_positions,
    idempotency_keys_are_claimed_once,
);

/// Acquisitions queued together (a current-thread runtime queues them all
/// before the store's writer task runs) are one batch, one statement per
/// round: each gets what it would have got alone, in queue order, a label
/// asked twice included.
pub async fn acquisitions_in_one_batch_each_get_their_own_outcome(store: Arc<dyn RunStore>) {
    let (me, other) = (LockOwner("me".into()), LockOwner("other".into()));
    let ttl = Duration::from_secs(60);
    let held = store.try_lock(&label("held"), &other, ttl).await.unwrap();
    assert!(matches!(held, LockOutcome::Acquired { .. }));
    let names = ["free", "held", "twice", "fresh"].map(label);
    let [free_label, held_label, twice_label, fresh_label] = &names;
    let (free, held, twice, rival, again, fresh) = tokio::join!(
        store.try_lock(free_label, &me, ttl),
        store.try_lock(held_label, &me, ttl),
        store.try_lock(twice_label, &me, ttl),
        store.try_lock(twice_label, &other, ttl),
        store.try_lock(twice_label, &me, ttl),
        store.try_lock(fresh_label, &other, ttl),
    );
    let token = |outcome: Result<LockOutcome, StoreError>| match outcome.unwrap() {
        LockOutcome::Acquired { fence, .. } => Some((fence.owner.0, fence.token)),
        LockOutcome::Busy { .. } => None,
    };
    assert_eq!(token(free), Some(("me".into(), 1)));
    assert_eq!(token(held), None, "another owner's unexpired lock");
    // `twice`: taken by me, refused to the rival, then re-taken by me (a
    // re-acquisition by the same owner), each a round of its own.
    assert_eq!(token(twice), Some(("me".into(), 1)));
    assert_eq!(token(rival), None);
    assert_eq!(token(again), Some(("me".into(), 2)));
    assert_eq!(token(fresh), Some(("other".into(), 1)));
}

mod batched_acquisitions {
    #[tokio::test(flavor = "current_thread")]
    async fn sqlite() {
        let dir = tempfile::tempdir().unwrap();
        super::acquisitions_in_one_batch_each_get_their_own_outcome(
            super::sqlite_store(&dir).await,
        )
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn postgres() {
        let Some(url) = super::pg::fresh_database().await else {
            return;
        };
        let store = super::open_run_store(&url, super::StoreOptions::default())
            .await
            .unwrap();
        super::acquisitions_in_one_batch_each_get_their_own_outcome(store).await;
        // One transaction took the first round's locks (the rows share their
        // `xmin`), another the third round's `twice`.
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let xmin = |name: &'static str| {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, String>("SELECT xmin::text FROM locks WHERE label = $1")
                    .bind(name)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(xmin("free").await, xmin("fresh").await);
        assert_ne!(xmin("free").await, xmin("twice").await);
    }
}

/// Postgres: the group commit numbers its journal lines from the one
/// `journal_head` row. Were that row gone, the lines would be dropped while
/// the run moved on; the write fails instead, naming it, and changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_journal_without_its_head_row_fails_and_writes_nothing() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let store = open_run_store(&url, StoreOptions::default()).await.unwrap();
    let (fence, mut run) = training(store.as_ref(), "dept").await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("DELETE FROM journal_head")
        .execute(&pool)
        .await
        .unwrap();
    let next = step(
        &mut run,
        Event::TrainingFinished {
            candidate: Candidate {
                id: "cand-1".into(),
                metrics: BTreeMap::from([("dice".into(), 0.8)]),
            },
        },
    );
    let refused = store.record(&next, &fence).await;
    match refused {
        Err(StoreError::Corrupt(message)) => {
            assert!(message.contains("journal_head"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let detail = store.run(&run.run_id).await.unwrap().unwrap();
    assert_eq!(detail.summary.stage, Stage::Training);
    assert_eq!(detail.transitions.len() as u64, next.seq - 1);
}

/// Postgres migration 0016 makes the snapshot and the journal lines `json`
/// (not `jsonb`, see the migration) and compresses them with lz4 where the
/// server has it; 0017 has the group commit number its lines itself. A
/// process of the version before them, still running when a newer one
/// migrated, must keep journaling and reading: its statements cast to
/// `jsonb`, leave the position to the trigger, and its reads decode `jsonb`
/// (the forms below are that version's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_schema_keeps_the_previous_versions_statements_working() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let store = open_run_store(&url, StoreOptions::default()).await.unwrap();
    let (_fence, run) = training(store.as_ref(), "dept").await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();

    let lz4: bool = sqlx::query_scalar(
        "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    for (table, column) in [
        ("runs", "snapshot"),
        ("transitions", "event"),
        ("transitions", "actions"),
    ] {
        let (kind, compression): (String, String) = sqlx::query_as(
            "SELECT format_type(atttypid, atttypmod), attcompression::text FROM pg_attribute
             WHERE attrelid = $1::regclass AND attname = $2",
        )
        .bind(table)
        .bind(column)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(kind, "json", "{table}.{column}");
        assert_eq!(compression == "l", lz4, "{table}.{column}: {compression:?}");
    }

    // The previous version's group commit: the snapshot as text cast to
    // `jsonb`, the lines as `jsonb[]`.
    let (snapshot, line_count): (String, i64) = sqlx::query_as(
        "SELECT r.snapshot::text, (SELECT count(*) FROM transitions t WHERE t.run_id = r.run_id)
         FROM runs r WHERE r.run_id = $1",
    )
    .bind(run.run_id.as_str())
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO runs (run_id, cycle_id, label, stage, outcome, done, started_at, updated_at,
                           snapshot, verdict)
         SELECT run_id, cycle_id, label, stage, outcome, done, started_at, updated_at,
                snapshot::jsonb, verdict
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::boolean[],
                     $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[])
              AS run(run_id, cycle_id, label, stage, outcome, done, started_at, updated_at,
                     snapshot, verdict)
         ON CONFLICT (run_id) DO UPDATE SET
            stage = excluded.stage, outcome = excluded.outcome, done = excluded.done,
            updated_at = excluded.updated_at, snapshot = excluded.snapshot,
            verdict = excluded.verdict",
    )
    .bind(vec![run.run_id.as_str()])
    .bind(vec![run.cycle_id.0.as_str()])
    .bind(vec!["dept"])
    .bind(vec!["training"])
    .bind(vec!["running"])
    .bind(vec![false])
    .bind(vec![Utc::now()])
    .bind(vec![Utc::now()])
    .bind(vec![snapshot.as_str()])
    .bind(vec![None::<String>])
    .execute(&pool)
    .await
    .unwrap();
    let event = serde_json::json!({"event": "heartbeat"});
    sqlx::query(
        "INSERT INTO transitions (run_id, seq, at, from_stage, to_stage, event, actions)
         SELECT run_id, seq, at, from_stage, to_stage, event, actions
         FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[], $5::text[],
                     $6::jsonb[], $7::jsonb[])
              WITH ORDINALITY AS line(run_id, seq, at, from_stage, to_stage, event, actions, n)
         ORDER BY n",
    )
    .bind(vec![run.run_id.as_str()])
    .bind(vec![line_count + 1])
    .bind(vec![Utc::now()])
    .bind(vec!["training"])
    .bind(vec!["training"])
    .bind(vec![event.clone()])
    .bind(vec![serde_json::json!([])])
    .execute(&pool)
    .await
    .unwrap();

    // Its line, which comes without a position, takes the next one from
    // the per-line trigger (migration 0017 keeps it for such lines), after
    // those this version's statement gave: consecutive, the head at the last.
    let positions: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM transitions WHERE run_id = $1 ORDER BY seq")
            .bind(run.run_id.as_str())
            .fetch_all(&pool)
            .await
            .unwrap();
    let expected: Vec<i64> = (1..=line_count + 1).collect();
    assert_eq!(positions, expected);
    let head: i64 = sqlx::query_scalar("SELECT position FROM journal_head")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(head, line_count + 1);

    // Its reads decode `jsonb` or `json` alike; so do this version's.
    let sqlx::types::Json(old_read): sqlx::types::Json<LabelRun> =
        sqlx::query_scalar("SELECT snapshot FROM runs WHERE run_id = $1")
            .bind(run.run_id.as_str())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(old_read, run);
    let detail = store.run(&run.run_id).await.unwrap().unwrap();
    assert_eq!(detail.transitions.len() as i64, line_count + 1);
    assert_eq!(detail.transitions.last().unwrap().event, event);
    let resumed = store.unfinished_run(&label("dept")).await.unwrap();
    assert_eq!(resumed, Some(run));
}

/// On a current-thread runtime every write of the test is queued before the
/// SQLite writer task runs, so they are committed as one batch: the stale
/// ones are refused and the others of that same transaction still commit.
#[tokio::test(flavor = "current_thread")]
async fn sqlite_a_fenced_write_fails_alone_in_its_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    a_fenced_write_fails_alone_among_concurrent_writes(sqlite_store(&dir).await).await;
}

/// The same on a current-thread runtime: the unlocking write and the plain
/// one are committed as one batch statement.
#[tokio::test(flavor = "current_thread")]
async fn sqlite_a_runs_last_write_releases_its_lock_within_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    a_runs_last_write_releases_its_lock_with_it(sqlite_store(&dir).await).await;
}

#[tokio::test]
async fn in_memory_sqlite_works_for_tests() {
    let store = open_run_store("sqlite::memory:", StoreOptions::default())
        .await
        .unwrap();
    journal_snapshot_and_cursor_are_written_together(store).await;
}

#[tokio::test]
async fn sqlite_corrupt_snapshot_names_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/state.db", dir.path().display());
    let store = open_run_store(&url, StoreOptions::default()).await.unwrap();
    let fence = lock(store.as_ref(), "dept").await;
    let (run, _) = drive(store.as_ref(), &fence, "dept", None, Some(Stage::Counting)).await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}/state.db", dir.path().display()))
        .await
        .unwrap();
    sqlx::query("UPDATE runs SET snapshot = '{not json'")
        .execute(&pool)
        .await
        .unwrap();
    let err = store.unfinished_run(&label("dept")).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert!(err.to_string().contains(run.run_id.as_str()), "{err}");
}

#[tokio::test]
async fn postgres_corrupt_snapshot_names_the_run() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let store = open_run_store(&url, StoreOptions::default()).await.unwrap();
    let fence = lock(store.as_ref(), "dept").await;
    let (run, _) = drive(store.as_ref(), &fence, "dept", None, Some(Stage::Counting)).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(r#"UPDATE runs SET snapshot = '{"not": "a run"}'"#)
        .execute(&pool)
        .await
        .unwrap();
    let err = store.run(&run.run_id).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert!(err.to_string().contains(run.run_id.as_str()), "{err}");
}

/// The Postgres store's journal writer task, held in the middle of a group
/// commit: a transaction of the test holds the `journal_head` row lock (as
/// another process's uncommitted journal write would), and one write is
/// queued, which the writer task takes alone and which then waits for that
/// lock at its first journal line, after its fence check. Everything queued
/// meanwhile goes into the writer task's next batch.
struct HeldJournalWriter {
    head: sqlx::Transaction<'static, sqlx::Postgres>,
    first: tokio::task::JoinHandle<Result<(), StoreError>>,
    first_run: RunId,
}

impl HeldJournalWriter {
    /// Hold `store`'s writer task with a write of `first` (locked by the
    /// test) journaled under `fence`.
    async fn hold(
        store: &Arc<dyn RunStore>,
        pool: &sqlx::PgPool,
        first: &str,
        fence: Fence,
    ) -> Self {
        let mut head = pool.begin().await.unwrap();
        sqlx::query("UPDATE journal_head SET position = position")
            .execute(&mut *head)
            .await
            .unwrap();
        let head_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *head)
            .await
            .unwrap();
        let mut run = LabelRun::new(
            RunId::generate(),
            CycleId::generate(),
            plan(first),
            LabelCursor::default(),
        );
        let transition = step(&mut run, Event::Started { now: now() });
        let first = tokio::spawn({
            let store = store.clone();
            async move { store.record(&transition, &fence).await }
        });
        // Until the write waits for the lock (polled: nothing else signals
        // it). Only `head` holds anything, so whatever waits for it is the
        // write, at `journal_head`.
        let waiting = "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND pg_blocking_pids(pid) @> ARRAY[$1]";
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while sqlx::query_scalar::<_, i64>(waiting)
            .bind(head_pid)
            .fetch_one(pool)
            .await
            .unwrap()
            == 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the journal write never waited for the journal_head lock"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            head,
            first,
            first_run: run.run_id,
        }
    }

    /// Let the held batch commit; the run it journaled.
    async fn release(self) -> RunId {
        self.head.rollback().await.unwrap();
        self.first.await.unwrap().unwrap();
        self.first_run
    }
}

/// Queue every write of `writes` at once: one poll of `join_all` sends each
/// to the writer task (a journal write is queued on its first poll).
async fn queue_all<F: std::future::Future>(
    writes: impl IntoIterator<Item = F>,
) -> std::pin::Pin<Box<futures::future::JoinAll<F>>> {
    let mut all = Box::pin(futures::future::join_all(writes));
    assert!(futures::poll!(all.as_mut()).is_pending());
    all
}

/// The distinct transactions that wrote the journal lines of `runs`.
async fn journal_transactions(pool: &sqlx::PgPool, runs: &[&RunId]) -> Vec<String> {
    let runs: Vec<&str> = runs.iter().map(|r| r.as_str()).collect();
    sqlx::query_scalar("SELECT DISTINCT xmin::text FROM transitions WHERE run_id = ANY($1)")
        .bind(runs)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Concurrent journal writes of different labels on Postgres are committed
/// together (one transaction for all of them, not one each), and a stale
/// fence among them fails its own write only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_journal_writes_share_one_transaction() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let store = open_run_store(&url, StoreOptions::default()).await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let stale = [3, 8];
    let (fences, runs, transitions) = started_runs(store.as_ref(), 16, &stale).await;
    let held =
        HeldJournalWriter::hold(&store, &pool, "first", lock(store.as_ref(), "first").await).await;
    let writes = queue_all(
        transitions
            .iter()
            .zip(&fences)
            .map(|(t, fence)| store.record(t, fence)),
    )
    .await;
    let first_run = held.release().await;
    let results = writes.await;
    let applied = only_the_stale_were_fenced(store.as_ref(), results, &runs, &stale).await;
    let together = journal_transactions(&pool, &applied).await;
    assert_eq!(
        together.len(),
        1,
        "{} writes in transactions {together:?}",
        applied.len()
    );
    let first = journal_transactions(&pool, &[&first_run]).await;
    assert_ne!(
        first, together,
        "the held write and the queued ones in one transaction"
    );
}

/// A write that breaks a constraint (here: a journal line written twice)
/// fails its group commit; the writes queued with it are retried one by one
/// and succeed, and only the bad one reports the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_bad_write_fails_alone_in_its_group_commit() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let store = open_run_store(&url, StoreOptions::default()).await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut fences = Vec::new();
    let mut runs = Vec::new();
    let mut transitions = Vec::new();
    for name in ["a", "dup", "b"] {
        fences.push(lock(store.as_ref(), name).await);
        let mut run = LabelRun::new(
            RunId::generate(),
            CycleId::generate(),
            plan(name),
            LabelCursor::default(),
        );
        transitions.push(step(&mut run, Event::Started { now: now() }));
        runs.push(run);
    }
    store.record(&transitions[1], &fences[1]).await.unwrap();
    let held =
        HeldJournalWriter::hold(&store, &pool, "first", lock(store.as_ref(), "first").await).await;
    let writes = queue_all(
        transitions
            .iter()
            .zip(&fences)
            .map(|(t, fence)| store.record(t, fence)),
    )
    .await;
    held.release().await;
    let results = writes.await;
    results[0].as_ref().unwrap();
    results[2].as_ref().unwrap();
    let err = results[1].as_ref().unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(err.to_string().contains(runs[1].run_id.as_str()), "{err}");
    for i in [0, 2] {
        assert_eq!(
            store.run(&runs[i].run_id).await.unwrap().unwrap().snapshot,
            runs[i]
        );
    }
}

/// The fence check of a group commit share-locks the label's lock row until
/// the batch commits: a takeover of an expired lock waits for it, so the
/// lock cannot change hands between the check and the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_takeover_waits_for_the_group_commit_in_flight() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let store = open_run_store(&url, StoreOptions::default()).await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let a = LockOwner("a".into());
    let fence = acquire(store.as_ref(), "dept", &a, Duration::from_millis(500)).await;
    let held = HeldJournalWriter::hold(&store, &pool, "dept", fence.clone()).await;
    // The lock expires while the write is in flight; a takeover starts.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let takeover = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .try_lock(&label("dept"), &LockOwner("b".into()), LONG)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!takeover.is_finished(), "the takeover did not wait");
    let run = held.release().await;
    assert!(
        store.run(&run).await.unwrap().is_some(),
        "the write was applied"
    );
    let LockOutcome::Acquired {
        fence: taken,
        taken_over_from,
    } = takeover.await.unwrap().unwrap()
    else {
        panic!("the expired lock is free once the write committed");
    };
    assert_eq!(taken.token, fence.token + 1);
    assert_eq!(
        taken_over_from.as_deref(),
        Some(fence.owner.0.as_str()),
        "the expired holder never released: a takeover"
    );
}

/// One Postgres group commit (one statement) applies each write's own
/// parts and nothing of another's: the run end that releases its lock and
/// writes its cursor, a run end that keeps its lock, a promotion event;
/// and two stale writes (a run end with a cursor and a release, a
/// promotion) write no line, cursor, release or event. The applied lines
/// take consecutive journal positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_group_commit_applies_each_writes_own_parts() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let store = open_run_store(&url, StoreOptions::default()).await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let someone = LockOwner("someone-else".into());
    let driver = LockOwner("driver".into());
    let (dept_fence, dept_run) = training(store.as_ref(), "dept").await;
    let (kept_fence, kept_run) = training(store.as_ref(), "kept").await;
    let (gone_fence, gone_run) = training(store.as_ref(), "gone").await;
    store
        .release_lock(&label("gone"), &gone_fence)
        .await
        .unwrap();
    let gone_holder = lock(store.as_ref(), "gone").await;
    let promo_fence = lock(store.as_ref(), "promo").await;
    let promoted = Event::Promoted {
        version: PromotedVersion {
            version: "2".into(),
            previous: Some("1".into()),
        },
    };
    let mut promo_run = promoting_run("promo", "cand-a", None);
    let promotion = step(&mut promo_run, promoted.clone());
    let mut late_run = promoting_run("gone", "cand-b", None);
    let late_promotion = step(&mut late_run, promoted);
    let (dept_rest, dept_cursor) = rest_of_run(&dept_run);
    let (kept_rest, kept_cursor) = rest_of_run(&kept_run);
    let (gone_rest, gone_cursor) = rest_of_run(&gone_run);
    let gone_before = store.cursor(&label("gone")).await.unwrap();

    let before: i64 = sqlx::query_scalar("SELECT position FROM journal_head")
        .fetch_one(&pool)
        .await
        .unwrap();
    let held =
        HeldJournalWriter::hold(&store, &pool, "first", lock(store.as_ref(), "first").await).await;
    let (dept, kept, promo, gone, late) = (
        store.finish_and_unlock(&dept_rest, dept_cursor.clone(), &dept_fence),
        store.finish_all(&kept_rest, kept_cursor.clone(), &kept_fence),
        store.record(&promotion, &promo_fence),
        store.finish_and_unlock(&gone_rest, gone_cursor, &gone_fence),
        store.record(&late_promotion, &gone_fence),
    );
    let writes = queue_all([dept, kept, promo, gone, late]).await;
    let first_run = held.release().await;
    let results = writes.await;
    for (i, result) in results.iter().enumerate().take(3) {
        result.as_ref().unwrap_or_else(|e| panic!("{i}: {e}"));
    }
    for result in &results[3..] {
        assert!(matches!(result, Err(StoreError::Fenced(_))), "{result:?}");
    }
    let batch: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT xmin::text, run_id FROM transitions WHERE position > $1 AND run_id <> $2",
    )
    .bind(before)
    .bind(first_run.as_str())
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut written: Vec<&str> = batch.iter().map(|(_, run)| run.as_str()).collect();
    written.sort_unstable();
    let mut applied = [
        dept_run.run_id.as_str(),
        kept_run.run_id.as_str(),
        promo_run.run_id.as_str(),
    ];
    applied.sort_unstable();
    assert_eq!(
        written, applied,
        "the batch wrote lines of exactly these runs"
    );
    assert!(
        batch.iter().all(|(tx, _)| *tx == batch[0].0),
        "in one transaction: {batch:?}"
    );

    // The applied writes' own parts.
    assert_eq!(store.lock_holder(&label("dept")).await.unwrap(), None);
    assert_busy(store.as_ref(), "kept", &someone, &driver).await;
    assert_eq!(
        store.cursor(&label("dept")).await.unwrap(),
        dept_cursor.unwrap()
    );
    assert_eq!(
        store.cursor(&label("kept")).await.unwrap(),
        kept_cursor.unwrap()
    );
    for (run, rest) in [(&dept_run, &dept_rest), (&kept_run, &kept_rest)] {
        let detail = store.run(&run.run_id).await.unwrap().unwrap();
        assert_eq!(detail.summary.stage, Stage::Done);
        assert_eq!(detail.snapshot, rest.last().unwrap().snapshot);
    }
    let history = store.promotions(&label("promo")).await.unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].run_id, promo_run.run_id);

    // The stale writes': nothing.
    let detail = store.run(&gone_run.run_id).await.unwrap().unwrap();
    assert_eq!(detail.transitions.len() as u64, gone_run.seq);
    assert_eq!(store.cursor(&label("gone")).await.unwrap(), gone_before);
    assert_busy(store.as_ref(), "gone", &someone, &gone_holder.owner).await;
    assert!(store.promotions(&label("gone")).await.unwrap().is_empty());
    assert_eq!(store.run(&late_run.run_id).await.unwrap(), None);

    // Every journal line has its own position, none skipped.
    let positions: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM transitions ORDER BY position")
            .fetch_all(&pool)
            .await
            .unwrap();
    let expected: Vec<i64> = (1..=positions.len() as i64).collect();
    assert_eq!(positions, expected);
}

/// A run's row is rewritten at every journal write. A stage change is a
/// heap-only (HOT) update, which touches none of the table's indexes;
/// entering `awaiting_approval` is not (it enters the partial index of the
/// runs awaiting approval). Migration 0018; counted by Postgres for the
/// transaction in flight.
#[tokio::test]
async fn postgres_a_runs_stage_change_touches_no_index() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let _migrated = open_run_store(&url, StoreOptions::default()).await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO runs (run_id, cycle_id, label, stage, outcome, done, started_at, updated_at,
                           snapshot)
         VALUES ('r', 'c', 'dept', 'counting', 'running', FALSE, now(), now(), '{}')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    let counts = "SELECT pg_stat_get_xact_tuples_updated('runs'::regclass),
                         pg_stat_get_xact_tuples_hot_updated('runs'::regclass)";
    for (stage, expected) in [
        ("preparing", (1, 1)),
        ("awaiting_dataset", (2, 2)),
        ("training", (3, 3)),
        ("awaiting_approval", (4, 3)),
    ] {
        sqlx::query(
            "UPDATE runs SET stage = $1, updated_at = now(), snapshot = json_build_object('stage', $1::text)
             WHERE run_id = 'r'",
        )
        .bind(stage)
        .execute(&mut *tx)
        .await
        .unwrap();
        let (updated, hot): (i64, i64) = sqlx::query_as(counts).fetch_one(&mut *tx).await.unwrap();
        assert_eq!((updated, hot), expected, "after the update to {stage}");
    }
}

#[tokio::test]
async fn opening_without_migrate_refuses_a_stale_schema() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/state.db", dir.path().display());
    let err = open_run_store(
        &url,
        StoreOptions {
            migrate: false,
            read_only: false,
        },
    )
    .await
    .err()
    .expect("opening should fail")
    .to_string();
    assert!(err.contains("retrain migrate"), "{err}");
    retrain_adapters::store::migrate(&url).await.unwrap();
    open_run_store(
        &url,
        StoreOptions {
            migrate: false,
            read_only: false,
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_opening_writes_nothing() {
    use retrain_adapters::AdapterError;
    let read_only = StoreOptions {
        migrate: false,
        read_only: true,
    };
    // A fresh Postgres database: not initialised, and still no table after.
    if let Some(url) = pg::fresh_database().await {
        let err = open_run_store(&url, read_only)
            .await
            .err()
            .expect("fresh database");
        assert!(matches!(err, AdapterError::NotInitialised(_)), "{err}");
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(tables, 0, "a read-only open created tables");
        retrain_adapters::store::migrate(&url).await.unwrap();
        let store = open_run_store(&url, read_only).await.unwrap();
        let label = retrain_core::domain::Label::new("a").unwrap();
        let owner = retrain_core::domain::LockOwner("reader".into());
        assert!(store.cursor(&label).await.is_ok());
        assert!(
            store
                .try_lock(&label, &owner, std::time::Duration::from_secs(5))
                .await
                .is_err(),
            "a read-only store accepted a write"
        );
    }
    // A migrated SQLite file: readable, writes refused, nothing written.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let url = format!("sqlite://{}", path.display());
    retrain_adapters::store::migrate(&url).await.unwrap();
    let store = open_run_store(&url, read_only).await.unwrap();
    let label = retrain_core::domain::Label::new("a").unwrap();
    let owner = retrain_core::domain::LockOwner("reader".into());
    assert!(store.cursor(&label).await.is_ok());
    assert!(
        store
            .try_lock(&label, &owner, std::time::Duration::from_secs(5))
            .await
            .is_err(),
        "a read-only SQLite store accepted a write"
    );
    drop(store);
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let locks: i64 = sqlx::query_scalar("SELECT count(*) FROM locks")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(locks, 0);
}

#[tokio::test]
async fn bad_urls_name_the_key_and_hide_passwords() {
    for url in ["mysql://root:hunter2@db/x", "redis://h", ""] {
        let err = open_run_store(url, StoreOptions::default())
            .await
            .err()
            .expect("opening should fail")
            .to_string();
        assert!(err.starts_with("state:"), "{err}");
        assert!(
            err.contains("sqlite://") && err.contains("postgres://"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }
    // Unreachable server: the error names the host but not the password.
    let err = open_run_store(
        "postgresql+psycopg2://bob:hunter2@127.0.0.1:1/db",
        StoreOptions::default(),
    )
    .await
    .err()
    .expect("opening should fail")
    .to_string();
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(err.contains("refused"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_opening_a_fresh_sqlite_file_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/state.db", dir.path().display());
    let (a, b) = tokio::join!(
        open_run_store(&url, StoreOptions::default()),
        open_run_store(&url, StoreOptions::default()),
    );
    let (a, b) = match (a, b) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => panic!("both opens must succeed: {:?} / {:?}", a.err(), b.err()),
    };
    acquire(a.as_ref(), "dept", &LockOwner("a".into()), LONG).await;
    assert!(matches!(
        b.try_lock(
            &label("dept"),
            &LockOwner("b".into()),
            Duration::from_secs(5)
        )
        .await
        .unwrap(),
        LockOutcome::Busy { .. }
    ));
}

// ---- The server's delivery log (same store, table `webhook_deliveries`) ----

mod deliveries {
    use std::sync::Arc;

    use chrono::{Duration as Span, SubsecRound, Utc};
    use retrain_adapters::store::{
        open_stores, DeliveryLog, DeliveryQuery, NewDelivery, Recorded, StoreOptions,
    };

    fn delivery(source: &str, id: Option<&str>, claim: bool, outcome: &str) -> NewDelivery {
        NewDelivery {
            source: source.into(),
            delivery_id: id.map(str::to_owned),
            claim,
            outcome: outcome.into(),
            status: if claim { 202 } else { 401 },
            detail: Some(format!("{outcome} detail")),
            received_at: Utc::now().trunc_subsecs(6),
        }
    }

    fn seq(recorded: Recorded) -> i64 {
        match recorded {
            Recorded::Recorded { seq } => seq,
            Recorded::AlreadyClaimed => panic!("expected the delivery to be recorded"),
        }
    }

    /// Every delivery is logged, newest first, filtered by source and paged
    /// by `seq`; settling sets the final outcome.
    pub async fn deliveries_are_logged_newest_first_and_paged(log: Arc<dyn DeliveryLog>) {
        let first = delivery("github", Some("g-1"), true, "accepted");
        let a = seq(log.record(&first).await.unwrap());
        let b = seq(log
            .record(&delivery("mlflow", Some("m-1"), false, "bad_signature"))
            .await
            .unwrap());
        let c = seq(log
            .record(&delivery("huggingface", None, false, "missing_header"))
            .await
            .unwrap());
        assert!(a < b && b < c, "{a} {b} {c}");
        log.settle(a, "started", 202, Some("started dept"), true)
            .await
            .unwrap();

        let all = log
            .list(&DeliveryQuery {
                source: None,
                before: None,
                limit: 10,
            })
            .await
            .unwrap();
        assert_eq!(all.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![c, b, a]);
        let settled = &all[2];
        assert_eq!(settled.source, "github");
        assert_eq!(settled.delivery_id.as_deref(), Some("g-1"));
        assert!(settled.claimed);
        assert_eq!(settled.outcome, "started");
        assert_eq!(settled.status, 202);
        assert_eq!(settled.detail.as_deref(), Some("started dept"));
        assert_eq!(settled.received_at, first.received_at);
        assert_eq!(all[0].delivery_id, None);

        let page = log
            .list(&DeliveryQuery {
                source: None,
                before: Some(c),
                limit: 1,
            })
            .await
            .unwrap();
        assert_eq!(page.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![b]);
        let mlflow = log
            .list(&DeliveryQuery {
                source: Some("mlflow".into()),
                before: None,
                limit: 10,
            })
            .await
            .unwrap();
        assert_eq!(mlflow.len(), 1);
        assert_eq!(mlflow[0].outcome, "bad_signature");
        assert!(!mlflow[0].claimed);

        let missing = log.settle(c + 1000, "x", 200, None, true).await;
        assert!(missing.is_err(), "settling an unknown delivery must fail");
        // Claiming needs an id.
        assert!(log
            .record(&delivery("github", None, true, "accepted"))
            .await
            .is_err());
    }

    /// A delivery id is claimed once across every handle on the store (two
    /// replicas), whoever races; unclaimed records of the same id are still
    /// logged; a claim given up can be taken again.
    pub async fn a_delivery_id_is_claimed_once_across_replicas(
        one: Arc<dyn DeliveryLog>,
        two: Arc<dyn DeliveryLog>,
    ) {
        let mut racers = Vec::new();
        for i in 0..8 {
            let log = if i % 2 == 0 { one.clone() } else { two.clone() };
            racers.push(tokio::spawn(async move {
                log.record(&delivery("mlflow", Some("d-1"), true, "accepted"))
                    .await
                    .unwrap()
            }));
        }
        let mut won = Vec::new();
        for racer in racers {
            if let Recorded::Recorded { seq } = racer.await.unwrap() {
                won.push(seq);
            }
        }
        assert_eq!(won.len(), 1, "exactly one claim of d-1 wins: {won:?}");
        // The replay itself is logged, unclaimed.
        seq(two
            .record(&delivery("mlflow", Some("d-1"), false, "replayed_delivery"))
            .await
            .unwrap());
        // Same id from another source is another delivery.
        seq(one
            .record(&delivery("github", Some("d-1"), true, "accepted"))
            .await
            .unwrap());
        // The action failed transiently: the claim is given up, a retry acts.
        one.settle(won[0], "unavailable", 503, None, false)
            .await
            .unwrap();
        let retry = seq(two
            .record(&delivery("mlflow", Some("d-1"), true, "accepted"))
            .await
            .unwrap());
        assert_eq!(
            two.record(&delivery("mlflow", Some("d-1"), true, "accepted"))
                .await
                .unwrap(),
            Recorded::AlreadyClaimed
        );
        let last = one.last_claimed("mlflow").await.unwrap().unwrap();
        assert_eq!(last.seq, retry);
        assert_eq!(one.last_claimed("schedule").await.unwrap(), None);
    }

    /// The schedule keeps its last fired tick as the newest claim.
    pub async fn the_last_claimed_tick_is_the_newest(log: Arc<dyn DeliveryLog>) {
        let base = Utc::now().trunc_subsecs(0);
        for minutes in [0, 5, 10] {
            let tick = (base + Span::minutes(minutes)).to_rfc3339();
            let mut d = delivery("schedule", Some(&tick), true, "fired");
            d.status = 0;
            seq(log.record(&d).await.unwrap());
        }
        let last = log.last_claimed("schedule").await.unwrap().unwrap();
        assert_eq!(
            last.delivery_id.as_deref(),
            Some((base + Span::minutes(10)).to_rfc3339().as_str())
        );
        assert_eq!(last.status, 0);
    }

    async fn sqlite_pair() -> (
        tempfile::TempDir,
        Arc<dyn DeliveryLog>,
        Arc<dyn DeliveryLog>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/state.db", dir.path().display());
        let one = open_stores(&url, StoreOptions::default()).await.unwrap();
        let two = open_stores(&url, StoreOptions::default()).await.unwrap();
        (dir, one.deliveries, two.deliveries)
    }

    async fn postgres_pair() -> Option<(Arc<dyn DeliveryLog>, Arc<dyn DeliveryLog>)> {
        let url = crate::pg::fresh_database().await?;
        let one = open_stores(&url, StoreOptions::default()).await.unwrap();
        let two = open_stores(&url, StoreOptions::default()).await.unwrap();
        Some((one.deliveries, two.deliveries))
    }

    macro_rules! delivery_contract {
        ($($name:ident),* $(,)?) => {
            mod sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let (_dir, one, _two) = super::sqlite_pair().await;
                        super::$name(one).await;
                    }
                )*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn a_delivery_id_is_claimed_once_across_replicas() {
                    let (_dir, one, two) = super::sqlite_pair().await;
                    super::a_delivery_id_is_claimed_once_across_replicas(one, two).await;
                }
            }
            mod postgres {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let Some((one, _two)) = super::postgres_pair().await else { return };
                        super::$name(one).await;
                    }
                )*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn a_delivery_id_is_claimed_once_across_replicas() {
                    let Some((one, two)) = super::postgres_pair().await else { return };
                    super::a_delivery_id_is_claimed_once_across_replicas(one, two).await;
                }
            }
        };
    }

    delivery_contract!(
        deliveries_are_logged_newest_first_and_paged,
        the_last_claimed_tick_is_the_newest,
    );
}

// ---- The server's pending gates (same store, table `pending_gates`) ----

mod pending_gates {
    use chrono::{Duration as Span, SubsecRound, Utc};
    use retrain_adapters::store::{open_stores, PendingGate, StoreOptions, Stores};

    fn gate(label: &str, version: &str, minutes_ago: i64) -> PendingGate {
        PendingGate {
            label: label.into(),
            model: "seg".into(),
            version: version.into(),
            candidate_run_id: (version == "2").then(|| "run-2".to_owned()),
            received_at: (Utc::now() - Span::minutes(minutes_ago)).trunc_subsecs(6),
        }
    }

    /// What one replica adds, another sees (a restart resumes it); adding
    /// twice keeps one row; removing is final and idempotent.
    async fn pending_gates_survive_a_restart_and_are_removed_once(one: Stores, two: Stores) {
        let (one, two) = (one.pending_gates, two.pending_gates);
        assert!(one.list().await.unwrap().is_empty());
        let newer = gate("seg", "3", 1);
        let older = gate("seg", "2", 5);
        one.add(&newer).await.unwrap();
        one.add(&older).await.unwrap();
        one.add(&older).await.unwrap();
        assert_eq!(
            two.list().await.unwrap(),
            vec![older.clone(), newer.clone()]
        );
        assert!(two.is_pending("seg", "seg", "2").await.unwrap());
        assert!(!two.is_pending("other", "seg", "2").await.unwrap());
        two.remove("seg", "seg", "2").await.unwrap();
        two.remove("seg", "seg", "2").await.unwrap();
        assert!(!one.is_pending("seg", "seg", "2").await.unwrap());
        assert_eq!(one.list().await.unwrap(), vec![newer]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_pending_gates_survive_a_restart_and_are_removed_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/state.db", dir.path().display());
        let one = open_stores(&url, StoreOptions::default()).await.unwrap();
        let two = open_stores(&url, StoreOptions::default()).await.unwrap();
        pending_gates_survive_a_restart_and_are_removed_once(one, two).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_pending_gates_survive_a_restart_and_are_removed_once() {
        let Some(url) = crate::pg::fresh_database().await else {
            return;
        };
        let one = open_stores(&url, StoreOptions::default()).await.unwrap();
        let two = open_stores(&url, StoreOptions::default()).await.unwrap();
        pending_gates_survive_a_restart_and_are_removed_once(one, two).await;
    }
}

// ---- The server's artifact records (same store, table `run_artifacts`) ----

mod artifacts {
    use chrono::{SubsecRound, Utc};
    use retrain_adapters::store::{open_stores, ArtifactLog, ArtifactRecord, StoreOptions};
    use retrain_core::domain::RunId;

    fn record(run: &str, name: &str, sha: char, size: u64) -> ArtifactRecord {
        ArtifactRecord {
            run_id: RunId(run.into()),
            name: name.into(),
            size_bytes: size,
            sha256: sha.to_string().repeat(64),
            uploaded_at: Utc::now().trunc_subsecs(6),
            uploaded_by: "worker-1".into(),
        }
    }

    /// One record per (run, name): a second upload replaces the first; a
    /// run lists only its own, by name.
    async fn artifacts_are_upserted_per_run_and_name(log: &dyn ArtifactLog) {
        let run = RunId("run-a".into());
        assert!(log.artifacts(&run).await.unwrap().is_empty());
        assert_eq!(log.artifact(&run, "model.bin").await.unwrap(), None);
        let first = record("run-a", "model.bin", 'a', 10);
        log.record_artifact(&first).await.unwrap();
        log.record_artifact(&record("run-a", "eval.json", 'b', 20))
            .await
            .unwrap();
        log.record_artifact(&record("run-b", "model.bin", 'c', 30))
            .await
            .unwrap();
        assert_eq!(log.artifact(&run, "model.bin").await.unwrap(), Some(first));
        let again = ArtifactRecord {
            uploaded_by: "worker-2".into(),
            ..record("run-a", "model.bin", 'd', 11)
        };
        log.record_artifact(&again).await.unwrap();
        let listed = log.artifacts(&run).await.unwrap();
        let names: Vec<_> = listed.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["eval.json", "model.bin"]);
        assert_eq!(listed[1], again);
        assert_eq!(
            log.artifacts(&RunId("run-b".into())).await.unwrap()[0].sha256,
            "c".repeat(64)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_artifacts_are_upserted_per_run_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/state.db", dir.path().display());
        let stores = open_stores(&url, StoreOptions::default()).await.unwrap();
        artifacts_are_upserted_per_run_and_name(stores.artifacts.as_ref()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_artifacts_are_upserted_per_run_and_name() {
        let Some(url) = crate::pg::fresh_database().await else {
            return;
        };
        let stores = open_stores(&url, StoreOptions::default()).await.unwrap();
        artifacts_are_upserted_per_run_and_name(stores.artifacts.as_ref()).await;
    }
}

/// Postgres: a journal write by anyone wakes a `JournalWatch` reader at
/// commit (NOTIFY), well before its 5 s safety poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_journal_watch_wakes_readers_at_commit() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let store = open_run_store(&url, StoreOptions::default()).await.unwrap();
    let watch = retrain_adapters::store::JournalWatch::open(&url)
        .await
        .unwrap();
    let mut waker = watch.subscribe();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let fence = lock(store.as_ref(), "dept").await;
            drive(store.as_ref(), &fence, "dept", None, None).await;
        })
    };
    let began = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(3), waker.wait())
        .await
        .expect("no wake-up within 3 s");
    // Woken by the write (made after 200 ms), not spuriously at once.
    assert!(
        began.elapsed() >= Duration::from_millis(150),
        "{:?}",
        began.elapsed()
    );
    writer.await.unwrap();
    assert!(store.journal_end().await.unwrap() > 0);
}

// ---- The remote job queue and worker registry (tables `remote_jobs`,
// `remote_workers`) ----

mod jobs {
    use std::sync::Arc;

    use chrono::{DateTime, Duration as Span, SubsecRound, Utc};
    use retrain_adapters::store::{
        open_stores, JobLease, JobQueue, JobReport, JobState, NewJob, NewWorker, RemoteJobSpec,
        Reported, ResourceRequest, Resources, Stores, WorkerState, LOG_TAIL_BYTES,
    };
    use retrain_core::domain::Candidate;

    fn now() -> DateTime<Utc> {
        Utc::now().trunc_subsecs(6)
    }

    fn job(key: &str, label: &str, gpus: Option<u32>) -> NewJob {
        NewJob {
            job_key: key.into(),
            run_id: key.split('/').next().unwrap().into(),
            label: label.into(),
            attempt: 1,
            spec: RemoteJobSpec {
                dataset_name: "ds".into(),
                dataset_version: "v1".into(),
                command: vec!["python".into(), "train.py".into()],
                env: [("EPOCHS".to_owned(), "3".to_owned())].into(),
                timeout_secs: 3600,
                request: ResourceRequest {
                    gpus,
                    ..ResourceRequest::default()
                },
            },
            enqueued_at: now(),
        }
    }

    fn worker(id: &str, gpus: u32, labels: &[&str]) -> NewWorker {
        NewWorker {
            worker_id: id.into(),
            name: format!("{id}-name"),
            hostname: "host".into(),
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            resources: Resources {
                cpus: 8,
                memory_bytes: 32 << 30,
                gpus,
                gpu_memory_bytes: if gpus > 0 { 24 << 30 } else { 0 },
                gpu_names: vec![],
                tags: vec![],
            },
            version: "0.1.0".into(),
            registered_at: now(),
        }
    }

    fn candidate(id: &str) -> Candidate {
        Candidate {
            id: id.into(),
            metrics: [("accuracy".to_owned(), 0.9)].into(),
        }
    }

    async fn assigned(queue: &dyn JobQueue, worker_id: &str) -> String {
        match queue.lease(worker_id, now()).await.unwrap() {
            JobLease::Assigned(job) => job.job_key,
            other => panic!("expected a job for {worker_id}, got {other:?}"),
        }
    }

    /// Enqueueing a key twice keeps one row, the first one.
    pub async fn enqueueing_a_key_twice_keeps_one_row(queue: Arc<dyn JobQueue>) {
        let first = queue.enqueue(&job("r1/train/1", "a", None)).await.unwrap();
        assert_eq!(first.state, JobState::Queued);
        let mut again = job("r1/train/1", "a", Some(4));
        again.attempt = 7;
        let second = queue.enqueue(&again).await.unwrap();
        assert_eq!(second, first, "the existing row is returned unchanged");
        assert_eq!(queue.jobs_of_run("r1").await.unwrap().len(), 1);
        assert_eq!(queue.queue().await.unwrap().len(), 1);
        assert_eq!(second.spec.env["EPOCHS"], "3");
        assert!(
            !format!("{:?}", second.spec).contains("\"3\""),
            "env values stay out of Debug"
        );
    }

    /// A job goes to a worker that fits (labels and resources), at most one
    /// job per worker; a drained job is re-queued under the same key.
    pub async fn jobs_go_to_fitting_workers_one_at_a_time(queue: Arc<dyn JobQueue>) {
        queue.register_worker(&worker("cpu", 0, &[])).await.unwrap();
        queue
            .register_worker(&worker("gpu", 1, &["b"]))
            .await
            .unwrap();
        queue
            .enqueue(&job("r2/train/1", "a", Some(1)))
            .await
            .unwrap();
        assert_eq!(queue.lease("cpu", now()).await.unwrap(), JobLease::NoneFits);
        // The GPU worker only takes label `b`.
        assert_eq!(queue.lease("gpu", now()).await.unwrap(), JobLease::NoneFits);
        queue
            .enqueue(&job("r3/train/1", "b", Some(1)))
            .await
            .unwrap();
        queue.enqueue(&job("r4/train/1", "b", None)).await.unwrap();
        assert_eq!(assigned(queue.as_ref(), "gpu").await, "r3/train/1");
        assert_eq!(
            queue.lease("gpu", now()).await.unwrap(),
            JobLease::Busy {
                job_key: "r3/train/1".into()
            }
        );
        let gpu = queue.worker("gpu").await.unwrap().unwrap();
        assert_eq!(gpu.job_key.as_deref(), Some("r3/train/1"));
        assert_eq!(
            queue.lease("nobody", now()).await.unwrap(),
            JobLease::UnknownWorker
        );
        // Draining: back to the queue, same key, and the worker is free.
        assert_eq!(
            queue
                .report("r3/train/1", Some("gpu"), &JobReport::Cancelled, now())
                .await
                .unwrap(),
            Reported::Accepted
        );
        let requeued = queue.job("r3/train/1").await.unwrap().unwrap();
        assert_eq!(
            (requeued.state, requeued.worker_id),
            (JobState::Queued, None)
        );
        queue
            .heartbeat("gpu", WorkerState::Draining, None, now())
            .await
            .unwrap();
        assert_eq!(
            queue.lease("gpu", now()).await.unwrap(),
            JobLease::NotTaking(WorkerState::Draining)
        );
        // A worker that says it runs nothing never got a job assigned to it
        // before the cutoff: the job goes back to the queue, same key.
        queue
            .register_worker(&worker("lost-answer", 1, &["b"]))
            .await
            .unwrap();
        assert_eq!(assigned(queue.as_ref(), "lost-answer").await, "r3/train/1");
        let released = queue
            .release_unclaimed("lost-answer", now() - Span::seconds(20), now())
            .await
            .unwrap();
        assert!(released.is_empty(), "a fresh assignment is left alone");
        let released = queue
            .release_unclaimed("lost-answer", now() + Span::seconds(1), now())
            .await
            .unwrap();
        assert_eq!(released, vec!["r3/train/1".to_owned()]);
        let job = queue.job("r3/train/1").await.unwrap().unwrap();
        assert_eq!(
            (job.state, job.worker_id, job.attempt),
            (JobState::Queued, None, 1)
        );
        queue.deregister_worker("lost-answer").await.unwrap();
        // Deregistering a worker re-queues the job it holds.
        queue
            .register_worker(&worker("gpu2", 2, &[]))
            .await
            .unwrap();
        assert_eq!(assigned(queue.as_ref(), "gpu2").await, "r2/train/1");
        assert!(queue.deregister_worker("gpu2").await.unwrap());
        assert!(!queue.deregister_worker("gpu2").await.unwrap());
        assert_eq!(
            queue.job("r2/train/1").await.unwrap().unwrap().state,
            JobState::Queued
        );
    }

    /// Two workers (on two handles of the store) lease one job at once:
    /// exactly one gets it.
    pub async fn two_concurrent_leases_of_one_job_one_wins(
        one: Arc<dyn JobQueue>,
        two: Arc<dyn JobQueue>,
    ) {
        one.enqueue(&job("r5/train/1", "a", None)).await.unwrap();
        for i in 0..6 {
            one.register_worker(&worker(&format!("w{i}"), 0, &[]))
                .await
                .unwrap();
        }
        let mut racers = Vec::new();
        for i in 0..6 {
            let queue = if i % 2 == 0 { one.clone() } else { two.clone() };
            racers.push(tokio::spawn(async move {
                queue.lease(&format!("w{i}"), now()).await.unwrap()
            }));
        }
        let mut winners = Vec::new();
        for racer in racers {
            match racer.await.unwrap() {
                JobLease::Assigned(job) => winners.push(job.worker_id.unwrap()),
                JobLease::NoneFits => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        let stored = two.job("r5/train/1").await.unwrap().unwrap();
        assert_eq!(stored.worker_id.as_ref(), Some(&winners[0]));
    }

    /// Only the holder's report counts, once; a retried identical result is
    /// accepted again, a different one is not.
    pub async fn only_the_holder_reports_once(queue: Arc<dyn JobQueue>) {
        queue.register_worker(&worker("w1", 0, &[])).await.unwrap();
        queue.register_worker(&worker("w2", 0, &[])).await.unwrap();
        queue.enqueue(&job("r6/train/1", "a", None)).await.unwrap();
        let result = JobReport::Finished(candidate("c-1"));
        // Not assigned yet: nobody's result counts.
        assert!(matches!(
            queue
                .report("r6/train/1", Some("w1"), &result, now())
                .await
                .unwrap(),
            Reported::NotAwaited(_)
        ));
        assigned(queue.as_ref(), "w1").await;
        let Reported::NotAwaited(why) = queue
            .report("r6/train/1", Some("w2"), &result, now())
            .await
            .unwrap()
        else {
            panic!("another worker's result must be refused")
        };
        assert!(why.contains("w1"), "{why}");
        assert!(!queue.append_log("r6/train/1", "w2", "x").await.unwrap());
        assert!(queue
            .append_log("r6/train/1", "w1", "epoch 1\n")
            .await
            .unwrap());
        assert_eq!(
            queue
                .report("r6/train/1", Some("w1"), &result, now())
                .await
                .unwrap(),
            Reported::Accepted
        );
        assert_eq!(
            queue
                .report("r6/train/1", Some("w1"), &result, now())
                .await
                .unwrap(),
            Reported::AlreadyAccepted
        );
        assert!(matches!(
            queue
                .report(
                    "r6/train/1",
                    Some("w1"),
                    &JobReport::Finished(candidate("c-2")),
                    now()
                )
                .await
                .unwrap(),
            Reported::NotAwaited(_)
        ));
        let done = queue.job("r6/train/1").await.unwrap().unwrap();
        assert_eq!(done.state, JobState::Finished);
        assert_eq!(done.result, Some(candidate("c-1")));
        assert_eq!(done.log_tail, "epoch 1\n");
        assert!(!queue.append_log("r6/train/1", "w1", "late").await.unwrap());
        assert_eq!(queue.worker("w1").await.unwrap().unwrap().job_key, None);
        // A failure is kept with its exit status.
        queue.enqueue(&job("r7/train/1", "a", None)).await.unwrap();
        assigned(queue.as_ref(), "w2").await;
        let failed = JobReport::Failed {
            message: "CUDA out of memory".into(),
            exit_status: Some("exit status 1".into()),
        };
        assert_eq!(
            queue
                .report("r7/train/1", Some("w2"), &failed, now())
                .await
                .unwrap(),
            Reported::Accepted
        );
        let job = queue.job("r7/train/1").await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert_eq!(
            job.failure.as_deref(),
            Some("CUDA out of memory (exit status 1)")
        );
    }

    /// The log tail keeps the last 64 KiB.
    pub async fn the_log_tail_is_bounded(queue: Arc<dyn JobQueue>) {
        queue.register_worker(&worker("w1", 0, &[])).await.unwrap();
        queue.enqueue(&job("r8/train/1", "a", None)).await.unwrap();
        assigned(queue.as_ref(), "w1").await;
        let line = format!("{}\n", "é".repeat(499));
        for _ in 0..150 {
            assert!(queue.append_log("r8/train/1", "w1", &line).await.unwrap());
        }
        queue
            .append_log("r8/train/1", "w1", "the end\n")
            .await
            .unwrap();
        let tail = queue.job("r8/train/1").await.unwrap().unwrap().log_tail;
        assert!(tail.len() <= LOG_TAIL_BYTES, "{}", tail.len());
        assert!(tail.len() > LOG_TAIL_BYTES - 8, "{}", tail.len());
        assert!(tail.ends_with("é\nthe end\n"));
    }

    /// A worker past the TTL goes stale and its job is lost (one sweep); its
    /// late result is refused; when it heartbeats again it is live and told
    /// to kill the job; cleanup removes only stale workers.
    pub async fn a_stale_worker_loses_its_job(queue: Arc<dyn JobQueue>) {
        queue.register_worker(&worker("old", 0, &[])).await.unwrap();
        queue
            .register_worker(&worker("fresh", 0, &[]))
            .await
            .unwrap();
        queue.enqueue(&job("r9/train/1", "a", None)).await.unwrap();
        assigned(queue.as_ref(), "old").await;
        let long_ago = now() - Span::seconds(120);
        queue
            .heartbeat("old", WorkerState::Running, Some("r9/train/1"), long_ago)
            .await
            .unwrap();
        let sweep = queue
            .mark_stale(now() - Span::seconds(60), now())
            .await
            .unwrap();
        assert_eq!(sweep.workers, vec!["old".to_owned()]);
        assert_eq!(sweep.lost_jobs, vec!["r9/train/1".to_owned()]);
        // Nothing more on a second sweep.
        let again = queue
            .mark_stale(now() - Span::seconds(60), now())
            .await
            .unwrap();
        assert!(again.workers.is_empty() && again.lost_jobs.is_empty());
        let lost = queue.job("r9/train/1").await.unwrap().unwrap();
        assert_eq!(lost.state, JobState::Lost);
        assert!(lost.failure.unwrap().contains("old"));
        assert_eq!(
            queue.worker("old").await.unwrap().unwrap().state,
            WorkerState::Stale
        );
        assert_eq!(
            queue.lease("old", now()).await.unwrap(),
            JobLease::NotTaking(WorkerState::Stale)
        );
        assert!(matches!(
            queue
                .report(
                    "r9/train/1",
                    Some("old"),
                    &JobReport::Finished(candidate("late")),
                    now()
                )
                .await
                .unwrap(),
            Reported::NotAwaited(_)
        ));
        let cancel = queue
            .heartbeat("old", WorkerState::Running, Some("r9/train/1"), now())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(cancel, vec!["r9/train/1".to_owned()]);
        assert_eq!(
            queue.worker("old").await.unwrap().unwrap().state,
            WorkerState::Running
        );
        assert_eq!(
            queue
                .heartbeat("gone", WorkerState::Idle, None, now())
                .await
                .unwrap(),
            None
        );
        // Cleanup: only the stale one goes.
        queue
            .heartbeat("old", WorkerState::Idle, None, long_ago)
            .await
            .unwrap();
        queue
            .mark_stale(now() - Span::seconds(60), now())
            .await
            .unwrap();
        assert_eq!(queue.remove_stale().await.unwrap(), vec!["old".to_owned()]);
        let left: Vec<String> = queue
            .workers()
            .await
            .unwrap()
            .into_iter()
            .map(|w| w.worker_id)
            .collect();
        assert_eq!(left, vec!["fresh".to_owned()]);
    }

    /// Cancelling: a queued job leaves the queue failed at once; a held one
    /// is `cancelling`, its worker is told on its heartbeat, and its
    /// cancelled report ends it (not re-queued).
    pub async fn cancelling_a_job(queue: Arc<dyn JobQueue>) {
        queue.enqueue(&job("r10/train/1", "a", None)).await.unwrap();
        assert_eq!(
            queue
                .cancel("r10/train/1", "no worker fits", now())
                .await
                .unwrap(),
            Some(JobState::Failed)
        );
        assert!(queue.queue().await.unwrap().is_empty());
        assert_eq!(queue.cancel("nope", "x", now()).await.unwrap(), None);
        queue.register_worker(&worker("w1", 0, &[])).await.unwrap();
        queue.enqueue(&job("r11/train/1", "a", None)).await.unwrap();
        assigned(queue.as_ref(), "w1").await;
        assert_eq!(
            queue
                .cancel("r11/train/1", "timed out", now())
                .await
                .unwrap(),
            Some(JobState::Cancelling)
        );
        let cancel = queue
            .heartbeat("w1", WorkerState::Running, Some("r11/train/1"), now())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(cancel, vec!["r11/train/1".to_owned()]);
        queue
            .report("r11/train/1", Some("w1"), &JobReport::Cancelled, now())
            .await
            .unwrap();
        let job = queue.job("r11/train/1").await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert_eq!(job.failure.as_deref(), Some("cancelled"));
    }

    async fn sqlite_pair() -> (tempfile::TempDir, Arc<dyn JobQueue>, Arc<dyn JobQueue>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/state.db", dir.path().display());
        let one = open_stores(&url, Default::default()).await.unwrap();
        let two = open_stores(&url, Default::default()).await.unwrap();
        (dir, one.jobs, two.jobs)
    }

    async fn postgres_pair() -> Option<(Arc<dyn JobQueue>, Arc<dyn JobQueue>)> {
        let url = crate::pg::fresh_database().await?;
        let one = open_stores(&url, Default::default()).await.unwrap();
        let two = open_stores(&url, Default::default()).await.unwrap();
        Some((one.jobs, two.jobs))
    }

    macro_rules! job_contract {
        ($($name:ident),* $(,)?) => {
            mod sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let (_dir, one, _two) = super::sqlite_pair().await;
                        super::$name(one).await;
                    }
                )*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn two_concurrent_leases_of_one_job_one_wins() {
                    let (_dir, one, two) = super::sqlite_pair().await;
                    super::two_concurrent_leases_of_one_job_one_wins(one, two).await;
                }
            }
            mod postgres {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let Some((one, _two)) = super::postgres_pair().await else { return };
                        super::$name(one).await;
                    }
                )*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn two_concurrent_leases_of_one_job_one_wins() {
                    let Some((one, two)) = super::postgres_pair().await else { return };
                    super::two_concurrent_leases_of_one_job_one_wins(one, two).await;
                }
            }
        };
    }

    // ---- Worker events (table `worker_events`): written by the queue's
    // changes, positioned on the journal's counter ----

    /// The types of the worker events after `after`, in position order.
    async fn kinds_after(queue: &dyn JobQueue, after: u64) -> Vec<String> {
        queue
            .worker_events_after(after, None, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    /// The last position of either table.
    async fn end(stores: &Stores) -> u64 {
        stores.runs.journal_end().await.unwrap()
    }

    /// Every change of the queue writes one event in its transaction, none
    /// when nothing changed (idempotent repeats, lost compare-and-sets);
    /// positions share the journal's counter (they interleave with journal
    /// lines, gap-free and strictly increasing); reads honour position,
    /// label and limit; `journal_end` covers both tables.
    pub async fn queue_changes_are_events_on_the_journals_positions(stores: Stores) {
        let queue = stores.jobs.as_ref();
        assert_eq!(
            queue.worker_events_after(0, None, 100).await.unwrap(),
            vec![]
        );
        assert_eq!(end(&stores).await, 0);

        queue.register_worker(&worker("w1", 1, &[])).await.unwrap();
        assert_eq!(end(&stores).await, 1, "the registration is position 1");
        // A journal run between worker events.
        let fence = super::lock(stores.runs.as_ref(), "dept").await;
        super::drive(stores.runs.as_ref(), &fence, "dept", None, None).await;
        let after_run = end(&stores).await;
        assert!(after_run > 2, "the run journaled several lines");

        queue
            .enqueue(&job("r1/train/1", "a", Some(1)))
            .await
            .unwrap();
        queue
            .enqueue(&job("r1/train/1", "a", Some(1)))
            .await
            .unwrap();
        assert_eq!(assigned(queue, "w1").await, "r1/train/1");
        assert!(matches!(
            queue.lease("w1", now()).await.unwrap(),
            JobLease::Busy { .. }
        ));
        let finished = JobReport::Finished(candidate("c1"));
        for _ in 0..2 {
            queue
                .report("r1/train/1", Some("w1"), &finished, now())
                .await
                .unwrap();
        }
        assert_eq!(
            kinds_after(queue, 0).await,
            [
                "worker.registered",
                "job.queued",
                "job.assigned",
                "job.finished"
            ],
            "one event per change, none for the repeats"
        );

        // A drain cancel gives the job back; another worker takes it and
        // goes stale: its `stale` comes before its job's `lost`.
        let mark = end(&stores).await;
        queue.enqueue(&job("r2/train/1", "b", None)).await.unwrap();
        assert_eq!(assigned(queue, "w1").await, "r2/train/1");
        queue
            .report("r2/train/1", Some("w1"), &JobReport::Cancelled, now())
            .await
            .unwrap();
        queue.register_worker(&worker("w2", 0, &[])).await.unwrap();
        assert_eq!(assigned(queue, "w2").await, "r2/train/1");
        let long_ago = now() - Span::seconds(120);
        queue
            .heartbeat("w2", WorkerState::Running, Some("r2/train/1"), long_ago)
            .await
            .unwrap();
        for _ in 0..2 {
            queue
                .mark_stale(now() - Span::seconds(60), now())
                .await
                .unwrap();
        }
        // A queued job cancelled (its queue timeout) fails.
        queue.enqueue(&job("r3/train/1", "a", None)).await.unwrap();
        queue
            .cancel("r3/train/1", "no worker fits", now())
            .await
            .unwrap();
        // Cleanup removes the stale worker; w1 deregisters (once).
        assert_eq!(queue.remove_stale().await.unwrap(), vec!["w2".to_owned()]);
        assert!(queue.deregister_worker("w1").await.unwrap());
        assert!(!queue.deregister_worker("w1").await.unwrap());
        assert_eq!(
            queue
                .heartbeat("w1", WorkerState::Idle, None, now())
                .await
                .unwrap(),
            None
        );
        let events = queue.worker_events_after(mark, None, 1000).await.unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "job.queued",
                "job.assigned",
                "job.requeued",
                "worker.registered",
                "job.assigned",
                "worker.stale",
                "job.lost",
                "job.queued",
                "job.failed",
                "worker.removed",
                "worker.removed",
            ]
        );
        let requeued = &events[2];
        assert_eq!(
            requeued.worker_id.as_deref(),
            Some("w1"),
            "the worker it left"
        );
        assert_eq!(requeued.job_key.as_deref(), Some("r2/train/1"));
        assert_eq!(requeued.run_id.as_deref(), Some("r2"));
        assert_eq!(requeued.label.as_deref(), Some("b"));
        assert_eq!(events[5].worker_id.as_deref(), Some("w2"));
        assert_eq!(events[5].label, None, "worker events have no label");
        assert_eq!(events[6].worker_id.as_deref(), Some("w2"));
        assert!(
            events[6].detail["reason"].as_str().unwrap().contains("w2"),
            "{:?}",
            events[6].detail
        );
        assert_eq!(events[8].detail["reason"], "no worker fits");
        assert_eq!(events[9].detail["reason"], "stale");
        assert_eq!(events[10].detail["reason"], "deregistered");

        // The details: facts, never the job's env values.
        let all = queue.worker_events_after(0, None, 1000).await.unwrap();
        assert_eq!(all[0].detail["name"], "w1-name");
        assert_eq!(all[0].detail["resources"]["gpus"], 1);
        assert_eq!(all[1].detail["attempt"], 1);
        assert_eq!(all[1].detail["request"]["gpus"], 1);
        assert_eq!(all[3].detail["candidate"], "c1");
        assert_eq!(all[3].worker_id.as_deref(), Some("w1"));
        for event in &all {
            assert!(!event.detail.to_string().contains("EPOCHS"), "{event:?}");
            assert!(
                (now() - event.at).num_seconds().abs() < 60,
                "{event:?} has no recent time"
            );
        }

        // One counter: worker events and journal lines together are exactly
        // 1..=end, each position once, and they interleave.
        let lines = stores.runs.journal_after(0, None, 1000).await.unwrap();
        let mut positions: Vec<u64> = lines
            .iter()
            .map(|l| l.position)
            .chain(all.iter().map(|e| e.position))
            .collect();
        assert!(all.windows(2).all(|w| w[0].position < w[1].position));
        positions.sort_unstable();
        let end = end(&stores).await;
        assert_eq!(positions, (1..=end).collect::<Vec<_>>());
        assert_eq!(end, all.last().unwrap().position, "journal_end covers both");
        assert_eq!(all[0].position, 1);
        assert!(lines
            .iter()
            .all(|l| l.position > 1 && l.position < all[1].position));

        // Paging, resuming and the label filter.
        assert_eq!(
            queue.worker_events_after(0, None, 2).await.unwrap(),
            all[..2]
        );
        assert_eq!(
            queue
                .worker_events_after(all[4].position, None, 1000)
                .await
                .unwrap(),
            all[5..]
        );
        let only_a = queue.worker_events_after(0, Some("a"), 1000).await.unwrap();
        let expected: Vec<_> = all
            .iter()
            .filter(|e| e.label.as_deref() == Some("a"))
            .cloned()
            .collect();
        assert_eq!(only_a, expected);
        assert_eq!(
            only_a.len(),
            5,
            "r1: queued, assigned, finished; r3: queued, failed: {only_a:?}"
        );
    }

    /// Journal writers and queue changes at once still get distinct,
    /// gap-free positions (and on Postgres, a sweep moving several jobs
    /// does not deadlock with reports on them).
    pub async fn concurrent_queue_and_journal_writers_share_one_counter(stores: Stores) {
        let mut tasks = Vec::new();
        for name in ["a", "b"] {
            let runs = stores.runs.clone();
            tasks.push(tokio::spawn(async move {
                let fence = super::lock(runs.as_ref(), name).await;
                super::drive(runs.as_ref(), &fence, name, None, None).await;
            }));
        }
        for n in 0..8 {
            let queue = stores.jobs.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("w{n}");
                queue.register_worker(&worker(&id, 0, &[])).await.unwrap();
                let key = format!("r{n}/train/1");
                queue.enqueue(&job(&key, "a", None)).await.unwrap();
                if let JobLease::Assigned(job) = queue.lease(&id, now()).await.unwrap() {
                    let report = JobReport::Finished(candidate("c"));
                    queue
                        .report(&job.job_key, Some(&id), &report, now())
                        .await
                        .unwrap();
                }
            }));
        }
        tasks.push({
            let queue = stores.jobs.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    queue
                        .mark_stale(now() + Span::seconds(1), now())
                        .await
                        .unwrap();
                }
            })
        });
        for task in tasks {
            task.await.unwrap();
        }
        let lines = stores.runs.journal_after(0, None, 10_000).await.unwrap();
        let events = stores
            .jobs
            .worker_events_after(0, None, 10_000)
            .await
            .unwrap();
        let registered = events
            .iter()
            .filter(|e| e.kind == "worker.registered")
            .count();
        assert_eq!(registered, 8);
        assert_eq!(events.iter().filter(|e| e.kind == "job.queued").count(), 8);
        let mut positions: Vec<u64> = lines
            .iter()
            .map(|l| l.position)
            .chain(events.iter().map(|e| e.position))
            .collect();
        positions.sort_unstable();
        let end = stores.runs.journal_end().await.unwrap();
        assert_eq!(positions, (1..=end).collect::<Vec<_>>());
    }

    async fn sqlite_stores() -> (tempfile::TempDir, Stores) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/state.db", dir.path().display());
        (dir, open_stores(&url, Default::default()).await.unwrap())
    }

    macro_rules! event_contract {
        ($($name:ident),* $(,)?) => {
            mod events_sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let (_dir, stores) = super::sqlite_stores().await;
                        super::$name(stores).await;
                    }
                )*
            }
            mod events_postgres {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let Some(url) = crate::pg::fresh_database().await else { return };
                        let stores = super::open_stores(&url, Default::default()).await.unwrap();
                        super::$name(stores).await;
                    }
                )*
            }
        };
    }

    event_contract!(
        queue_changes_are_events_on_the_journals_positions,
        concurrent_queue_and_journal_writers_share_one_counter,
    );

    job_contract!(
        enqueueing_a_key_twice_keeps_one_row,
        jobs_go_to_fitting_workers_one_at_a_time,
        only_the_holder_reports_once,
        the_log_tail_is_bounded,
        a_stale_worker_loses_its_job,
        cancelling_a_job,
    );
}
