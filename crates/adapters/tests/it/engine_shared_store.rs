//! Two engines (two orchestrators) sharing one run store never drive the
//! same label at once: each label is trained exactly once, the other engine
//! reports it busy — also when labels queue behind a small parallelism for
//! longer than the lock TTL, and when one holder cannot renew its locks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use retrain_adapters::store::{open_run_store, StoreOptions};
use retrain_core::domain::{
    Candidate, Fence, Label, LabelCursor, Lease, LockOutcome, LockOwner, RunId, TrainingHandle,
    TrainingOutcome,
};
use retrain_core::engine::{CycleRequest, Engine, EngineSettings, LabelBinding};
use retrain_core::journal::{PromotionEvent, RunDetail, RunFilter, RunSummary, Transition};
use retrain_core::machine::LabelRun;
use retrain_core::ports::{
    MetadataRead, MetadataStore, PortError, RunStore, StoreError, Trainer, TrainingRequest,
};
use retrain_core::report::LabelStatus;
use retrain_core::CancellationToken;

use crate::pg;
use crate::store_contract::{dataset, label, plan};

#[derive(Debug)]
struct Published;

#[async_trait]
impl MetadataStore for Published {
    async fn read(&self, _known: Option<String>) -> Result<MetadataRead, PortError> {
        Ok(MetadataRead::Published(dataset("v1", 100)))
    }
    fn describe(&self) -> String {
        "fake metadata".into()
    }
}

/// Counts starts per label; training takes long enough that both engines'
/// lock attempts overlap with it.
#[derive(Debug)]
struct CountingTrainer {
    starts: Mutex<HashMap<Label, u32>>,
    train_time: Duration,
}

impl Default for CountingTrainer {
    fn default() -> Self {
        Self::taking(Duration::from_millis(500))
    }
}

impl CountingTrainer {
    fn taking(train_time: Duration) -> Self {
        Self {
            starts: Mutex::default(),
            train_time,
        }
    }
    fn starts(&self) -> HashMap<Label, u32> {
        self.starts.lock().unwrap().clone()
    }
}

#[async_trait]
impl Trainer for CountingTrainer {
    async fn start(&self, request: &TrainingRequest) -> Result<TrainingHandle, PortError> {
        *self
            .starts
            .lock()
            .unwrap()
            .entry(request.label.clone())
            .or_default() += 1;
        Ok(TrainingHandle {
            kind: "fake".into(),
            data: serde_json::json!({}),
        })
    }
    async fn wait(
        &self,
        _request: &TrainingRequest,
        _handle: &TrainingHandle,
    ) -> Result<TrainingOutcome, PortError> {
        tokio::time::sleep(self.train_time).await;
        Ok(TrainingOutcome::Finished(Candidate {
            id: "cand".into(),
            metrics: Default::default(),
        }))
    }
    async fn cancel(&self, _handle: &TrainingHandle) -> Result<(), PortError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "fake trainer".into()
    }
}

const LABELS: &[&str] = &["a", "b", "c", "d", "e", "f"];

fn engine(store: Arc<dyn RunStore>, trainer: Arc<CountingTrainer>, name: &str) -> Engine {
    engine_with(store, trainer, name, LABELS, Duration::from_secs(30), 16)
}

fn engine_with(
    store: Arc<dyn RunStore>,
    trainer: Arc<CountingTrainer>,
    name: &str,
    labels: &[&str],
    lock_ttl: Duration,
    parallel: usize,
) -> Engine {
    let bindings = labels
        .iter()
        .map(|l| LabelBinding {
            plan: plan(l),
            metadata: Arc::new(Published),
            prepare: None,
            trainer: trainer.clone(),
            registry: None,
            lease: None,
            notifiers: Vec::new(),
            train_timeout: Duration::from_secs(30),
            dataset_check: None,
        })
        .collect();
    Engine::new(
        store,
        None,
        bindings,
        EngineSettings {
            max_parallel_labels: parallel,
            lock_ttl,
            poll_jitter: 0.0,
            owner: LockOwner::generate(name),
            ..EngineSettings::default()
        },
    )
}

/// Two stores opened separately on the same database: as two processes would.
async fn two_engines_drive_each_label_once(url: &str) {
    let store_a = open_run_store(
        url,
        StoreOptions {
            migrate: true,
            read_only: false,
        },
    )
    .await
    .unwrap();
    let store_b = open_run_store(
        url,
        StoreOptions {
            migrate: true,
            read_only: false,
        },
    )
    .await
    .unwrap();
    let trainer = Arc::new(CountingTrainer::default());
    let a = engine(store_a.clone(), trainer.clone(), "a");
    let b = engine(store_b, trainer.clone(), "b");
    let (ra, rb) = tokio::join!(
        a.run_cycle(CycleRequest::default(), CancellationToken::new()),
        b.run_cycle(CycleRequest::default(), CancellationToken::new()),
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let starts = trainer.starts();
    for name in LABELS {
        let l = label(name);
        let sa = ra.labels.iter().find(|r| r.label == l).unwrap();
        let sb = rb.labels.iter().find(|r| r.label == l).unwrap();
        let statuses = [sa.status, sb.status];
        assert!(
            statuses.contains(&LabelStatus::Busy) && statuses.contains(&LabelStatus::Trained),
            "label {name}: {statuses:?} ({:?} / {:?})",
            sa.error,
            sb.error
        );
        assert_eq!(starts.get(&l), Some(&1), "label {name} trained {starts:?}");
    }
    // Everything finished and every lock was released.
    for name in LABELS {
        assert_eq!(store_a.unfinished_run(&label(name)).await.unwrap(), None);
        assert_eq!(store_a.lock_holder(&label(name)).await.unwrap(), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_engines_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/state.db", dir.path().display());
    // As `retrain migrate` would, before the orchestrators start.
    retrain_adapters::store::migrate(&url).await.unwrap();
    two_engines_drive_each_label_once(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_engines_share_one_database() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    two_engines_drive_each_label_once(&url).await;
}

async fn open(url: &str) -> Arc<dyn RunStore> {
    open_run_store(url, StoreOptions::default()).await.unwrap()
}

/// Issue 9, finding 1, on a real database: four labels queue behind
/// `max_parallel_labels = 1` with trainings (5 s) longer than the lock TTL
/// (2 s). The heartbeat keeps every queued label's lock, so the second
/// orchestrator finds them all busy and nothing is trained twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_queued_labels_keep_their_locks_past_the_ttl() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let labels = ["a", "b", "c", "d"];
    let ttl = Duration::from_secs(2);
    let trainer = Arc::new(CountingTrainer::taking(Duration::from_secs(5)));
    let first = engine_with(open(&url).await, trainer.clone(), "first", &labels, ttl, 1);
    let second = engine_with(open(&url).await, trainer.clone(), "second", &labels, ttl, 1);
    let (one, two) = tokio::join!(
        first.run_cycle(CycleRequest::default(), CancellationToken::new()),
        async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            second
                .run_cycle(CycleRequest::default(), CancellationToken::new())
                .await
        }
    );
    let (one, two) = (one.unwrap(), two.unwrap());
    let starts = trainer.starts();
    for name in labels {
        assert_eq!(
            starts.get(&label(name)),
            Some(&1),
            "label {name}: {starts:?}"
        );
    }
    assert!(
        one.labels.iter().all(|l| l.status == LabelStatus::Trained),
        "{:?}",
        one.labels
            .iter()
            .map(|l| (&l.label, l.status, &l.error))
            .collect::<Vec<_>>()
    );
    assert!(
        two.labels.iter().all(|l| l.status == LabelStatus::Busy),
        "{:?}",
        two.labels
            .iter()
            .map(|l| (&l.label, l.status))
            .collect::<Vec<_>>()
    );
}

/// A store whose lock renewals fail while `outage` is set (the holder lost
/// its network path to the database; other orchestrators still reach it).
struct RenewalOutage {
    inner: Arc<dyn RunStore>,
    outage: Arc<AtomicBool>,
}

#[async_trait]
impl RunStore for RenewalOutage {
    async fn try_lock(
        &self,
        label: &Label,
        owner: &LockOwner,
        ttl: Duration,
    ) -> Result<LockOutcome, StoreError> {
        self.inner.try_lock(label, owner, ttl).await
    }
    async fn renew_lock(
        &self,
        label: &Label,
        fence: &Fence,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        if self.outage.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection reset".into()));
        }
        self.inner.renew_lock(label, fence, ttl).await
    }
    async fn release_lock(&self, label: &Label, fence: &Fence) -> Result<(), StoreError> {
        self.inner.release_lock(label, fence).await
    }
    async fn cursor(&self, label: &Label) -> Result<LabelCursor, StoreError> {
        self.inner.cursor(label).await
    }
    async fn unfinished_run(&self, label: &Label) -> Result<Option<LabelRun>, StoreError> {
        self.inner.unfinished_run(label).await
    }
    async fn record(&self, transition: &Transition, fence: &Fence) -> Result<(), StoreError> {
        self.inner.record(transition, fence).await
    }
    async fn finish(
        &self,
        transition: &Transition,
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.inner.finish(transition, cursor, fence).await
    }
    async fn finish_all(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.inner.finish_all(transitions, cursor, fence).await
    }
    async fn finish_and_unlock(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.inner
            .finish_and_unlock(transitions, cursor, fence)
            .await
    }
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        self.inner.list_runs(filter).await
    }
    async fn run(&self, run_id: &RunId) -> Result<Option<RunDetail>, StoreError> {
        self.inner.run(run_id).await
    }
    async fn put_lease(&self, lease: &Lease, fence: &Fence) -> Result<(), StoreError> {
        self.inner.put_lease(lease, fence).await
    }
    async fn put_lease_unfenced(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.put_lease_unfenced(lease).await
    }
    async fn active_leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.inner.active_leases().await
    }
    async fn lock_holder(&self, label: &Label) -> Result<Option<String>, StoreError> {
        self.inner.lock_holder(label).await
    }
    async fn promotions(&self, label: &Label) -> Result<Vec<PromotionEvent>, StoreError> {
        self.inner.promotions(label).await
    }
}

/// A holder whose renewals fail for longer than the TTL stops before its
/// next side effect (nothing more is journaled by it), and the orchestrator
/// that takes the label over finishes the same training (no second start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_holder_that_cannot_renew_stops_and_the_next_one_finishes() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let ttl = Duration::from_secs(2);
    let trainer = Arc::new(CountingTrainer::taking(Duration::from_secs(6)));
    let outage = Arc::new(AtomicBool::new(false));
    let flaky: Arc<dyn RunStore> = Arc::new(RenewalOutage {
        inner: open(&url).await,
        outage: outage.clone(),
    });
    let stale = engine_with(flaky, trainer.clone(), "stale", &["a"], ttl, 1);
    let cut = outage.clone();
    let (report, ()) = tokio::join!(
        stale.run_cycle(CycleRequest::default(), CancellationToken::new()),
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            cut.store(true, Ordering::SeqCst);
        }
    );
    let report = report.unwrap();
    assert_eq!(
        report.labels[0].status,
        LabelStatus::LockLost,
        "{:?}",
        report.labels[0]
    );
    let store = open(&url).await;
    let run = store
        .unfinished_run(&label("a"))
        .await
        .unwrap()
        .expect("the run stays resumable");
    assert!(
        run.handle.is_some(),
        "the job's handle was journaled before the outage"
    );

    tokio::time::sleep(ttl).await;
    let next = engine_with(store.clone(), trainer.clone(), "next", &["a"], ttl, 1);
    let report = next
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        report.labels[0].status,
        LabelStatus::Trained,
        "{:?}",
        report.labels[0]
    );
    assert!(report.labels[0].resumed);
    assert_eq!(trainer.starts().get(&label("a")), Some(&1));
    assert_eq!(store.unfinished_run(&label("a")).await.unwrap(), None);
}
