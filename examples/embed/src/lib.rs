//! retrain embedded in "another service": a ticket router that keeps the
//! reviews of its predictions in memory and retrains its model through
//! `retrain-core`'s [`Engine`], without a config file or the `retrain` binary.
//!
//! What the service provides itself (two ports):
//!
//! - [`FeedbackBuffer`]: a [`CountSource`] over the reviews it holds in
//!   memory (instead of SQL over a database);
//! - [`DatasetExporter`]: a [`SpaceController`] (the "prepare" job) that
//!   exports the buffer as a versioned dataset and publishes its
//!   `dataset_metadata.json`, in-process.
//!
//! What it takes from `retrain-adapters` (public constructors, 0.x API):
//! the embedded SQLite [`RunStore`](retrain_core::ports::RunStore)
//! ([`open_run_store`]), a command trainer ([`CommandTrainer`], §6
//! protocol), the file metadata reader ([`FileMetadataStore`]), the JSON
//! registry and the log notifier. See `docs/embedding.md`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_adapters::command::{CommandSpec, CommandTrainer};
use retrain_adapters::file_metadata::FileMetadataStore;
use retrain_adapters::json_registry::JsonRegistry;
use retrain_adapters::log_notifier::LogNotifier;
use retrain_adapters::store::{open_run_store, StoreOptions};
use retrain_core::domain::{CorrectRatio, FeedbackCounts, JobKey, Label, LockOwner, SpaceStage};
use retrain_core::engine::{Engine, EngineSettings, LabelBinding};
use retrain_core::gate::{FirstModelPolicy, GatePolicy, MetricRule, Require};
use retrain_core::machine::{LabelPlan, PromoteMode, RunManifest, Trigger};
use retrain_core::ports::{CountSource, MetadataStore, PortError, SpaceController, Trainer};

/// One reviewed prediction of the service.
#[derive(Debug, Clone, PartialEq)]
pub struct Review {
    pub label: Label,
    pub text: String,
    pub predicted: String,
    pub corrected: String,
    pub reviewed_at: DateTime<Utc>,
}

/// The service's in-memory review buffer, shared with the engine as its
/// [`CountSource`].
#[derive(Debug, Clone, Default)]
pub struct FeedbackBuffer {
    reviews: Arc<Mutex<Vec<Review>>>,
}

impl FeedbackBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// A reviewer corrected (or confirmed) a prediction.
    pub fn record(&self, review: Review) {
        self.lock().push(review);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every review so far, oldest first.
    pub fn snapshot(&self) -> Vec<Review> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Review>> {
        // A panicked writer cannot leave a Vec half-pushed: keep serving.
        self.reviews.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The port contract: counts per label of the reviews newer than `since`
/// (the created_at of the last dataset the label consumed); labels without
/// reviews are simply absent.
#[async_trait]
impl CountSource for FeedbackBuffer {
    async fn counts(
        &self,
        since: DateTime<Utc>,
    ) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
        let mut counts: BTreeMap<Label, FeedbackCounts> = BTreeMap::new();
        for review in self.lock().iter().filter(|r| r.reviewed_at > since) {
            let entry = counts.entry(review.label.clone()).or_default();
            if review.predicted == review.corrected {
                entry.correct += 1;
            } else {
                entry.misclassified += 1;
            }
        }
        Ok(counts)
    }
}

/// The "prepare dataset" job, in-process: writes every review to
/// `<root>/<version>/train.jsonl`, then publishes
/// `<root>/dataset_metadata.json` (write + rename, so a reader never sees
/// half a file).
#[derive(Debug, Clone)]
pub struct DatasetExporter {
    buffer: FeedbackBuffer,
    root: PathBuf,
    dataset_name: String,
    /// Restart intents already carried out: `restart` is idempotent per
    /// intent (the port contract), because a resumed run may repeat one.
    done: Arc<Mutex<HashSet<JobKey>>>,
}

impl DatasetExporter {
    pub fn new(buffer: FeedbackBuffer, root: impl Into<PathBuf>, dataset_name: &str) -> Self {
        Self {
            buffer,
            root: root.into(),
            dataset_name: dataset_name.to_owned(),
            done: Arc::default(),
        }
    }

    /// Where the metadata is published (what [`FileMetadataStore`] reads).
    pub fn metadata_path(&self) -> PathBuf {
        self.root.join("dataset_metadata.json")
    }

    fn export(&self) -> std::io::Result<String> {
        let reviews = self.buffer.snapshot();
        let now = Utc::now();
        let version = format!("v{}", now.format("%Y%m%d_%H%M%S_%6f"));
        let dir = self.root.join(&version);
        std::fs::create_dir_all(&dir)?;
        let mut lines = String::new();
        for r in &reviews {
            lines
                .push_str(&serde_json::json!({ "text": r.text, "label": r.corrected }).to_string());
            lines.push('\n');
        }
        std::fs::write(dir.join("train.jsonl"), lines)?;
        let metadata = serde_json::json!({
            "dataset_name": self.dataset_name,
            "version_tag": version,
            "num_samples": reviews.len(),
            "created_at": now.to_rfc3339(),
        });
        let tmp = self.root.join(".dataset_metadata.json.tmp");
        std::fs::write(&tmp, metadata.to_string())?;
        std::fs::rename(&tmp, self.metadata_path())?;
        Ok(version)
    }
}

#[async_trait]
impl SpaceController for DatasetExporter {
    async fn restart(&self, intent: &JobKey) -> Result<(), PortError> {
        if self
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(intent)
        {
            return Ok(());
        }
        let version = self.export().map_err(|e| {
            PortError::Failed(format!(
                "exporting the dataset to {}: {e}",
                self.root.display()
            ))
        })?;
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(intent.clone());
        println!("exporter: published dataset {version}");
        Ok(())
    }

    async fn stage(&self) -> Result<SpaceStage, PortError> {
        Ok(SpaceStage::Running)
    }

    fn describe(&self) -> String {
        format!("in-process exporter to {}", self.root.display())
    }
}

/// How the embedded engine is set up.
#[derive(Debug, Clone)]
pub struct EmbedConfig {
    /// Everything retrain writes: `state.db`, `datasets/`, `jobs/`, `registry.json`.
    pub dir: PathBuf,
    pub label: Label,
    /// `dataset_len` (misclassified + capped correct) that triggers a run.
    pub threshold: u64,
    /// The training command (§6: writes `{"candidate", "metrics"}` to `$RETRAIN_RESULT`).
    pub train_command: Vec<String>,
    pub poll_interval: Duration,
}

impl EmbedConfig {
    /// A trainer that "trains" in one line of `sh`: enough to show the protocol.
    pub fn with_sh_trainer(dir: impl Into<PathBuf>, label: &str) -> anyhow::Result<Self> {
        Ok(Self {
            dir: dir.into(),
            label: Label::new(label).map_err(|e| anyhow::anyhow!("{e}"))?,
            threshold: 10,
            train_command: vec![
                "sh".into(),
                "-c".into(),
                r#"printf '{"candidate": "router-%s", "metrics": {"accuracy": 0.91}}' "$RETRAIN_DATASET_VERSION" > "$RETRAIN_RESULT""#.into(),
            ],
            poll_interval: Duration::from_millis(100),
        })
    }
}

/// The plan of the one label: counts-triggered, gated on accuracy.
pub fn label_plan(config: &EmbedConfig) -> anyhow::Result<LabelPlan> {
    let gate = GatePolicy::new(
        Require::All,
        vec![MetricRule::higher("accuracy")],
        FirstModelPolicy::Pass,
    )
    .map_err(|e| anyhow::anyhow!("gate: {e}"))?;
    Ok(LabelPlan {
        label: config.label.clone(),
        trigger: Trigger::Counts {
            threshold: config.threshold,
            correct_ratio: CorrectRatio::new(1.0).map_err(|e| anyhow::anyhow!("{e}"))?,
        },
        prepare: Some("in-process-exporter".into()),
        gate: Some(gate),
        leased: false,
        promote: PromoteMode::Auto,
        max_attempts: 2,
        max_step_retries: retrain_core::machine::DEFAULT_MAX_STEP_RETRIES,
        poll_interval: config.poll_interval,
        poll_timeout: Duration::from_secs(60),
        dry_run: false,
        approval_expires: retrain_core::machine::DEFAULT_APPROVAL_EXPIRES,
        dataset_check: false,
    })
}

/// Engine settings naming this service as the lock owner.
pub fn engine_settings() -> EngineSettings {
    EngineSettings {
        owner: LockOwner::generate("ticket-router"),
        manifest: RunManifest {
            binary_version: env!("CARGO_PKG_VERSION").to_owned(),
            config_hash: "embedded".to_owned(),
            ..RunManifest::default()
        },
        ..EngineSettings::default()
    }
}

/// Build the engine: the service's own ports plus retrain's adapters.
pub async fn build_engine(config: &EmbedConfig, buffer: &FeedbackBuffer) -> anyhow::Result<Engine> {
    std::fs::create_dir_all(&config.dir)?;
    let state_url = format!("sqlite://{}", config.dir.join("state.db").display());
    let store = open_run_store(&state_url, StoreOptions::default()).await?;
    let exporter = DatasetExporter::new(
        buffer.clone(),
        config.dir.join("datasets"),
        "ticket-router/reviews",
    );
    let metadata: Arc<dyn MetadataStore> = Arc::new(FileMetadataStore::new(&format!(
        "file://{}",
        exporter.metadata_path().display()
    ))?);
    let mut spec = CommandSpec::new(config.train_command.clone())?;
    spec.timeout = Some(Duration::from_secs(60));
    spec.workdir = Some(config.dir.clone());
    let trainer: Arc<dyn Trainer> = Arc::new(CommandTrainer::new(spec, config.dir.clone())?);
    let binding = LabelBinding {
        plan: label_plan(config)?,
        metadata,
        prepare: Some(Arc::new(exporter)),
        trainer,
        registry: Some(Arc::new(JsonRegistry::open(
            config.dir.join("registry.json"),
            "ticket-router".into(),
        ))),
        lease: None,
        notifiers: vec![Arc::new(LogNotifier::new())],
        train_timeout: Duration::from_secs(120),
        dataset_check: None,
    };
    let counts: Arc<dyn CountSource> = Arc::new(buffer.clone());
    Ok(Engine::new(
        store,
        Some(counts),
        vec![binding],
        engine_settings(),
    ))
}

/// `n` reviews of `label`, `wrong` of them misclassified, reviewed now.
pub fn simulate_reviews(buffer: &FeedbackBuffer, label: &Label, n: usize, wrong: usize) {
    let departments = ["billing", "technical", "shipping"];
    for i in 0..n {
        let truth = departments[i % departments.len()];
        let predicted = if i < wrong {
            departments[(i + 1) % departments.len()]
        } else {
            truth
        };
        buffer.record(Review {
            label: label.clone(),
            text: format!("ticket {i} about {truth}"),
            predicted: predicted.into(),
            corrected: truth.into(),
            reviewed_at: Utc::now(),
        });
    }
}

/// The registry file the JSON registry writes (for the service to read back).
pub fn registry_path(dir: &Path) -> PathBuf {
    dir.join("registry.json")
}

#[cfg(test)]
mod tests {
    //! The engine driven by the service's own `CountSource` with the other
    //! ports as `retrain_core::mocks` (mockall): the expectations state
    //! exactly which ports a cycle may touch.

    use std::sync::Arc;

    use retrain_core::domain::Label;
    use retrain_core::engine::{CycleRequest, Engine, LabelBinding};
    use retrain_core::mocks::{MockMetadataStore, MockSpaceController, MockTrainer};
    use retrain_core::ports::MetadataRead;
    use retrain_core::report::LabelStatus;
    use retrain_core::CancellationToken;

    use super::*;

    fn mocked_binding(
        config: &EmbedConfig,
        trainer: MockTrainer,
        prepare: MockSpaceController,
    ) -> LabelBinding {
        let mut metadata = MockMetadataStore::new();
        metadata
            .expect_read()
            .returning(|_| Ok(MetadataRead::Absent));
        metadata.expect_describe().return_const("mock metadata");
        LabelBinding {
            plan: label_plan(config).unwrap(),
            metadata: Arc::new(metadata),
            prepare: Some(Arc::new(prepare)),
            trainer: Arc::new(trainer),
            registry: None,
            lease: None,
            notifiers: Vec::new(),
            train_timeout: Duration::from_secs(10),
            dataset_check: None,
        }
    }

    #[tokio::test]
    async fn below_threshold_the_buffer_count_skips_without_touching_a_job() {
        let dir = tempfile::tempdir().unwrap();
        let config = EmbedConfig::with_sh_trainer(dir.path(), "department").unwrap();
        let buffer = FeedbackBuffer::new();
        let label = Label::new("department").unwrap();
        // 4 misclassified + 4 correct = dataset_len 8 < threshold 10.
        simulate_reviews(&buffer, &label, 8, 4);

        let mut trainer = MockTrainer::new();
        trainer.expect_start().never();
        trainer.expect_describe().return_const("mock trainer");
        let mut prepare = MockSpaceController::new();
        prepare.expect_restart().never();
        prepare.expect_describe().return_const("mock prepare");
        prepare
            .expect_stage()
            .returning(|| Ok(retrain_core::domain::SpaceStage::Running));

        let store = open_run_store("sqlite::memory:", StoreOptions::default())
            .await
            .unwrap();
        let engine = Engine::new(
            store,
            Some(Arc::new(buffer.clone())),
            vec![mocked_binding(&config, trainer, prepare)],
            engine_settings(),
        );
        let report = engine
            .run_cycle(CycleRequest::default(), CancellationToken::new())
            .await
            .unwrap();
        let label_report = &report.labels[0];
        assert_eq!(
            label_report.status,
            LabelStatus::Skipped,
            "{label_report:?}"
        );
        assert_eq!(label_report.measured, Some(8));
        let counts = label_report.counts.unwrap();
        assert_eq!((counts.misclassified, counts.correct), (4, 4));
    }

    #[tokio::test]
    async fn the_buffer_counts_only_reviews_after_the_watermark() {
        let buffer = FeedbackBuffer::new();
        let label = Label::new("department").unwrap();
        simulate_reviews(&buffer, &label, 6, 2);
        let watermark = Utc::now();
        tokio::time::sleep(Duration::from_millis(5)).await;
        simulate_reviews(&buffer, &label, 3, 3);
        let all = buffer.counts(DateTime::<Utc>::UNIX_EPOCH).await.unwrap();
        assert_eq!(all[&label].misclassified, 5);
        assert_eq!(all[&label].correct, 4);
        let newer = buffer.counts(watermark).await.unwrap();
        assert_eq!(newer[&label].misclassified, 3);
        assert_eq!(newer[&label].correct, 0);
    }
}
