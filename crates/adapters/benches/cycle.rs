//! Whole-cycle benchmark (§11): N labels through count → prepare (one shared
//! restart) → await dataset → train → gate → promote → commit, on fast
//! in-memory fakes and a real SQLite `RunStore`, concurrency 64.
//!
//!     cargo bench -p retrain-adapters --bench cycle -- 1000
//!     cargo bench -p retrain-adapters --bench cycle -- 10000
//!
//! Prints wall time, transitions journaled, and peak RSS (VmHWM).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_adapters::store::{open_run_store, StoreOptions};
use retrain_core::domain::*;
use retrain_core::engine::{CycleRequest, Engine, EngineSettings, LabelBinding};
use retrain_core::gate::GatePolicy;
use retrain_core::machine::{LabelPlan, PromoteMode, Trigger};
use retrain_core::ports::*;
use retrain_core::report::LabelStatus;
use retrain_core::CancellationToken;

struct Counts;
#[async_trait]
impl CountSource for Counts {
    async fn counts(&self, _: DateTime<Utc>) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
        Ok(BTreeMap::new())
    }
}

/// Every label's dataset; `v2` appears once the shared prepare job restarts.
#[derive(Clone, Default)]
struct Hub {
    restarted: Arc<Mutex<bool>>,
}

struct Metadata(Hub);
#[async_trait]
impl MetadataStore for Metadata {
    async fn read(&self, _: Option<String>) -> Result<MetadataRead, PortError> {
        let tag = if *self.0.restarted.lock().unwrap() {
            "v2"
        } else {
            "v1"
        };
        Ok(MetadataRead::Published(DatasetVersion {
            metadata: DatasetMetadata {
                dataset_name: "bench".into(),
                version_tag: VersionTag::new(tag),
                num_samples: 1000,
                created_at: DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap(),
                splits: None,
                extra: Default::default(),
            },
            revision: None,
        }))
    }
    fn describe(&self) -> String {
        "bench".into()
    }
}

struct Prepare(Hub);
#[async_trait]
impl SpaceController for Prepare {
    async fn restart(&self, _intent: &JobKey) -> Result<(), PortError> {
        *self.0.restarted.lock().unwrap() = true;
        Ok(())
    }
    async fn stage(&self) -> Result<SpaceStage, PortError> {
        Ok(SpaceStage::Running)
    }
    fn describe(&self) -> String {
        "bench".into()
    }
}

struct Train;
#[async_trait]
impl Trainer for Train {
    async fn start(&self, _: &TrainingRequest) -> Result<TrainingHandle, PortError> {
        Ok(TrainingHandle {
            kind: "bench".into(),
            data: serde_json::Value::Null,
        })
    }
    async fn wait(
        &self,
        _: &TrainingRequest,
        _: &TrainingHandle,
    ) -> Result<TrainingOutcome, PortError> {
        Ok(TrainingOutcome::Finished(Candidate {
            id: "c".into(),
            metrics: [("dice".to_string(), 0.9), ("iou".to_string(), 0.8)]
                .into_iter()
                .collect(),
        }))
    }
    async fn cancel(&self, _: &TrainingHandle) -> Result<(), PortError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "bench".into()
    }
}

struct Registry;
#[async_trait]
impl ModelRegistry for Registry {
    async fn production(&self, _: Option<Lease>) -> Result<Option<ProductionModel>, PortError> {
        Ok(None)
    }
    async fn candidate_metrics(&self, _: String, _: Option<Lease>) -> Result<Metrics, PortError> {
        Ok(Metrics::new())
    }
    async fn promote(
        &self,
        _: Candidate,
        _: RunId,
        _: Option<Lease>,
    ) -> Result<PromotedVersion, PortError> {
        Ok(PromotedVersion {
            version: "1".into(),
            previous: None,
        })
    }
    async fn version_exists(&self, version: String, _: Option<Lease>) -> Result<bool, PortError> {
        Ok(version == "1")
    }
    async fn roll_back(
        &self,
        rollback: RegistryRollback,
        _: Option<Lease>,
    ) -> Result<PromotedVersion, PortError> {
        // The bench never rolls back; a registry with one version has
        // nothing to roll back to.
        Err(PortError::NotFound(format!(
            "bench registry has no version {} to roll back to",
            rollback.version
        )))
    }
    fn describe(&self) -> String {
        "bench".into()
    }
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() {
    let labels: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        // RETRAIN_BENCH_STATE overrides the store (e.g. a Postgres URL, or
        // `sqlite::memory:` to separate engine cost from storage cost).
        let url = std::env::var("RETRAIN_BENCH_STATE")
            .unwrap_or_else(|_| format!("sqlite://{}", dir.path().join("state.db").display()));
        let store = open_run_store(
            &url,
            StoreOptions {
                migrate: true,
                read_only: false,
            },
        )
        .await
        .unwrap();
        let hub = Hub::default();
        let prepare: Arc<dyn SpaceController> = Arc::new(Prepare(hub.clone()));
        let metadata: Arc<dyn MetadataStore> = Arc::new(Metadata(hub.clone()));
        let trainer: Arc<dyn Trainer> = Arc::new(Train);
        let registry: Arc<dyn ModelRegistry> = Arc::new(Registry);
        let bindings: Vec<LabelBinding> = (0..labels)
            .map(|i| LabelBinding {
                plan: LabelPlan {
                    label: Label::new(format!("label-{i}")).unwrap(),
                    trigger: Trigger::Metadata { threshold: 1 },
                    prepare: Some("shared".into()),
                    gate: Some(GatePolicy::seed_default()),
                    leased: false,
                    promote: PromoteMode::Auto,
                    max_attempts: 2,
                    max_step_retries: 5,
                    poll_interval: Duration::from_millis(1),
                    poll_timeout: Duration::from_secs(600),
                    dry_run: false,
                    approval_expires: retrain_core::machine::DEFAULT_APPROVAL_EXPIRES,
                    dataset_check: false,
                },
                metadata: metadata.clone(),
                prepare: Some(prepare.clone()),
                trainer: trainer.clone(),
                registry: Some(registry.clone()),
                lease: None,
                notifiers: Vec::new(),
                train_timeout: Duration::from_secs(60),
                dataset_check: None,
            })
            .collect();
        let engine = Engine::new(
            store.clone(),
            Some(Arc::new(Counts)),
            bindings,
            EngineSettings {
                max_parallel_labels: 64,
                ..EngineSettings::default()
            },
        );
        let started = Instant::now();
        let report = engine
            .run_cycle(CycleRequest::default(), CancellationToken::new())
            .await
            .unwrap();
        let elapsed = started.elapsed();
        let promoted = report
            .labels
            .iter()
            .filter(|l| l.status == LabelStatus::Promoted)
            .count();
        assert_eq!(
            promoted,
            labels,
            "every label should promote: {:?}",
            report.labels.first()
        );
        println!(
            "labels={labels} wall={:.3}s per_label={:.3}ms promoted={promoted} peak_rss={:.1}MiB",
            elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1000.0 / labels as f64,
            peak_rss_mib()
        );
    });
}
