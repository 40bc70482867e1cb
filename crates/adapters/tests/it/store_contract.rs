//! One contract suite for every `RunStore`, run against SQLite (a temp file)
//! and Postgres (a fresh database per test).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use retrain_adapters::store::{open_run_store, StoreOptions};
use retrain_core::domain::{
    Candidate, CycleId, DatasetMetadata, DatasetVersion, Label, LabelCursor, Lease, LockOutcome,
    LockOwner, RunId, TrainingHandle, TrainingOutcome, VersionTag,
};
use retrain_core::journal::{RunFilter, Transition};
use retrain_core::machine::{Action, Event, LabelPlan, LabelRun, PromoteMode, Stage, Trigger};
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

fn step(run: &mut LabelRun, event: Event) -> Transition {
    let from = run.stage;
    run.step(&event).unwrap();
    Transition {
        run_id: run.run_id.clone(),
        cycle_id: run.cycle_id.clone(),
        label: run.label().clone(),
        seq: run.seq,
        at: now(),
        from,
        to: run.stage,
        event,
        actions: run.pending.clone(),
        snapshot: run.clone(),
    }
}

/// Drive a metadata-triggered run through the real machine, journaling
/// every transition, until `stop_at` (or the end: then `finish` commits the
/// run and its cursor). Returns the run as last journaled and the cursor.
async fn drive(
    store: &dyn RunStore,
    name: &str,
    published: Option<DatasetVersion>,
    stop_at: Option<Stage>,
) -> (LabelRun, Option<LabelCursor>) {
    let mut run = LabelRun::new(
        RunId::generate(),
        CycleId::generate(),
        plan(name),
        store.cursor(&label(name)).await.unwrap(),
    );
    let mut next = Event::Started { now: now() };
    loop {
        let t = step(&mut run, next);
        store.record(&t).await.unwrap();
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
                store.finish(&t, cursor.clone()).await.unwrap();
                return (run, cursor);
            }
            other => panic!("unexpected action in test run: {other:?}"),
        };
    }
}

pub async fn journal_snapshot_and_cursor_are_written_together(store: Arc<dyn RunStore>) {
    let (run, cursor) = drive(store.as_ref(), "dept", Some(dataset("v1", 10)), None).await;
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
}

pub async fn unfinished_runs_resume_from_their_snapshot(store: Arc<dyn RunStore>) {
    let (run, _) = drive(
        store.as_ref(),
        "dept",
        Some(dataset("v1", 10)),
        Some(Stage::Training),
    )
    .await;
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
        store.record(&duplicate).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.unfinished_run(&label("dept")).await.unwrap(),
        Some(run.clone())
    );

    // Continue the resumed run to its end: nothing is left unfinished.
    let mut run = run;
    let t = step(
        &mut run,
        Event::TrainingFinished {
            candidate: Candidate {
                id: "c".into(),
                metrics: BTreeMap::new(),
            },
        },
    );
    store.record(&t).await.unwrap();
    let t = step(&mut run, Event::Notified { error: None });
    store.record(&t).await.unwrap();
    let Some(Action::Commit { cursor }) = run.pending.first().cloned() else {
        panic!("expected a commit, got {:?}", run.pending);
    };
    let t = step(&mut run, Event::Committed);
    store.finish(&t, cursor).await.unwrap();
    assert_eq!(store.unfinished_run(&label("dept")).await.unwrap(), None);
    let _ = TrainingOutcome::Lost {
        reason: String::new(),
    };
}

pub async fn locks_are_exclusive_renewable_and_expire(store: Arc<dyn RunStore>) {
    let dept = label("dept");
    let a = LockOwner("a".into());
    let b = LockOwner("b".into());
    let long = Duration::from_secs(60);
    assert_eq!(store.lock_holder(&dept).await.unwrap(), None);
    assert_eq!(
        store.try_lock(&dept, &a, long).await.unwrap(),
        LockOutcome::Acquired
    );
    match store.try_lock(&dept, &b, long).await.unwrap() {
        LockOutcome::Busy { owner, expires_at } => {
            assert_eq!(owner, "a");
            assert!(expires_at > Utc::now() + chrono::Duration::seconds(30));
        }
        other => panic!("expected busy, got {other:?}"),
    }
    // Re-entrant for the same owner (a resumed engine keeps its lock).
    assert_eq!(
        store.try_lock(&dept, &a, long).await.unwrap(),
        LockOutcome::Acquired
    );
    assert_eq!(
        store.lock_holder(&dept).await.unwrap().as_deref(),
        Some("a")
    );
    assert!(store.renew_lock(&dept, &a, long).await.unwrap());
    assert!(!store.renew_lock(&dept, &b, long).await.unwrap());
    // Only the owner can release.
    store.release_lock(&dept, &b).await.unwrap();
    assert_eq!(
        store.lock_holder(&dept).await.unwrap().as_deref(),
        Some("a")
    );
    store.release_lock(&dept, &a).await.unwrap();
    assert_eq!(store.lock_holder(&dept).await.unwrap(), None);
    assert_eq!(
        store.try_lock(&dept, &b, long).await.unwrap(),
        LockOutcome::Acquired
    );
    store.release_lock(&dept, &b).await.unwrap();

    // A crashed holder's lock expires and can then be taken over; the old
    // holder's renewal then fails.
    let short = Duration::from_millis(300);
    assert_eq!(
        store.try_lock(&dept, &a, short).await.unwrap(),
        LockOutcome::Acquired
    );
    assert!(matches!(
        store.try_lock(&dept, &b, long).await.unwrap(),
        LockOutcome::Busy { .. }
    ));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(store.lock_holder(&dept).await.unwrap(), None);
    assert_eq!(
        store.try_lock(&dept, &b, long).await.unwrap(),
        LockOutcome::Acquired
    );
    assert!(!store.renew_lock(&dept, &a, long).await.unwrap());
    assert_eq!(
        store.lock_holder(&dept).await.unwrap().as_deref(),
        Some("b")
    );

    // Locks are per label.
    assert_eq!(
        store.try_lock(&label("urgency"), &a, long).await.unwrap(),
        LockOutcome::Acquired
    );
}

pub async fn concurrent_lockers_get_one_winner(store: Arc<dyn RunStore>) {
    let dept = label("dept");
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            let dept = dept.clone();
            tokio::spawn(async move {
                store
                    .try_lock(
                        &dept,
                        &LockOwner(format!("owner-{i}")),
                        Duration::from_secs(60),
                    )
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut acquired = 0;
    for task in tasks {
        if task.await.unwrap() == LockOutcome::Acquired {
            acquired += 1;
        }
    }
    assert_eq!(acquired, 1);
}

pub async fn leases_are_recorded_updated_and_released(store: Arc<dyn RunStore>) {
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
    store.put_lease(&lease).await.unwrap();
    assert_eq!(store.active_leases().await.unwrap(), vec![lease.clone()]);
    lease
        .attributes
        .insert("public_ip".into(), "203.0.113.7".into());
    lease.region = None;
    store.put_lease(&lease).await.unwrap();
    assert_eq!(store.active_leases().await.unwrap(), vec![lease.clone()]);
    lease.released_at = Some(now());
    store.put_lease(&lease).await.unwrap();
    assert!(store.active_leases().await.unwrap().is_empty());
}

pub async fn runs_are_listed_newest_first_and_shown(store: Arc<dyn RunStore>) {
    let (first, _) = drive(store.as_ref(), "dept", None, None).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (second, _) = drive(store.as_ref(), "urgency", None, None).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (third, _) = drive(
        store.as_ref(),
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
    unfinished_runs_resume_from_their_snapshot,
    locks_are_exclusive_renewable_and_expire,
    concurrent_lockers_get_one_winner,
    leases_are_recorded_updated_and_released,
    runs_are_listed_newest_first_and_shown,
);

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
    let (run, _) = drive(store.as_ref(), "dept", None, Some(Stage::Counting)).await;
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
    let (run, _) = drive(store.as_ref(), "dept", None, Some(Stage::Counting)).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(r#"UPDATE runs SET snapshot = '{"not": "a run"}'"#)
        .execute(&pool)
        .await
        .unwrap();
    let err = store.run(&run.run_id).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert!(err.to_string().contains(run.run_id.as_str()), "{err}");
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
    assert_eq!(
        a.try_lock(
            &label("dept"),
            &LockOwner("a".into()),
            Duration::from_secs(5)
        )
        .await
        .unwrap(),
        LockOutcome::Acquired
    );
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
