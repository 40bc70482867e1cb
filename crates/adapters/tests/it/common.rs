//! Shared helpers for adapter integration tests.

pub use retrain_adapters::testing::services::service_url;

use std::sync::Arc;
use std::time::Duration;

use retrain_core::engine::{Engine, EngineSettings, LabelBinding};
use retrain_core::machine::LabelPlan;
use retrain_core::ports::{MetadataStore, ModelRegistry, RunStore, Trainer};

/// An engine over `store` driving one label, no count source and no
/// prepare job, poll jitter off: the whole-cycle tests of one adapter.
pub fn one_label_engine(
    store: Arc<dyn RunStore>,
    plan: LabelPlan,
    metadata: Arc<dyn MetadataStore>,
    trainer: Arc<dyn Trainer>,
    registry: Option<Arc<dyn ModelRegistry>>,
) -> Engine {
    Engine::new(
        store,
        None,
        vec![LabelBinding {
            plan,
            metadata,
            prepare: None,
            trainer,
            registry,
            lease: None,
            notifiers: Vec::new(),
            train_timeout: Duration::from_secs(60),
            dataset_check: None,
        }],
        EngineSettings {
            poll_jitter: 0.0,
            ..EngineSettings::default()
        },
    )
}
