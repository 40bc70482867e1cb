//! Two engines (two orchestrators) sharing one run store never drive the
//! same label at once: each label is trained exactly once, the other engine
//! reports it busy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use retrain_adapters::store::{open_run_store, StoreOptions};
use retrain_core::domain::{Candidate, Label, LockOwner, TrainingHandle, TrainingOutcome};
use retrain_core::engine::{CycleRequest, Engine, EngineSettings, LabelBinding};
use retrain_core::ports::{
    MetadataRead, MetadataStore, PortError, RunStore, Trainer, TrainingRequest,
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
#[derive(Debug, Default)]
struct CountingTrainer {
    starts: Mutex<HashMap<Label, u32>>,
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
        tokio::time::sleep(Duration::from_millis(500)).await;
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
    let bindings = LABELS
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
        })
        .collect();
    Engine::new(
        store,
        None,
        bindings,
        EngineSettings {
            max_parallel_labels: 16,
            lock_ttl: Duration::from_secs(30),
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
    let starts = trainer.starts.lock().unwrap().clone();
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
