//! What every handler shares.

use std::sync::Arc;

use retrain_adapters::settings::Settings;
use retrain_adapters::store::{DeliveryLog, JournalWatch, PendingGates};
use retrain_adapters::worker_trainer::RemoteJobs;
use retrain_core::engine::Engine;
use retrain_core::ports::RunStore;
use retrain_core::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::artifacts::Artifacts;
use crate::auth::Tokens;
use crate::metrics::Metrics;
use crate::webhooks::LabelTarget;

/// Shared state of the server (cheap to clone).
#[derive(Clone)]
pub struct AppState {
    /// The engine every trigger and decision runs on: one per process, so
    /// its in-process lock table reports a label already driven here busy.
    pub engine: Arc<Engine>,
    pub store: Arc<dyn RunStore>,
    pub settings: Arc<Settings>,
    pub tokens: Arc<Tokens>,
    pub journal: Arc<JournalWatch>,
    /// Cancelled on shutdown: interrupts the cycles' waits (runs stay
    /// resumable, trainings are cancelled, leases stopped) and ends the
    /// event streams.
    pub shutdown: CancellationToken,
    /// Cycles and decisions under way, awaited on shutdown. They run as
    /// tasks of their own so that a client hanging up or a request timeout
    /// never drops an engine future half-way.
    pub work: TaskTracker,
    /// Every webhook delivery and schedule tick, with its outcome.
    pub deliveries: Arc<dyn DeliveryLog>,
    /// Registered versions accepted for gating and not gated yet.
    pub pending_gates: Arc<dyn PendingGates>,
    pub metrics: Arc<Metrics>,
    /// The remote job queue and worker registry, and the wake-up of the
    /// `lease-job` long polls (poked when this process enqueues).
    pub jobs: RemoteJobs,
    /// Uploaded artifacts: `[server] artifacts_dir` and their records.
    pub artifacts: Arc<Artifacts>,
    /// What the webhooks know of each label (from the settings).
    pub webhook_targets: Arc<Vec<LabelTarget>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("engine", &self.engine)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}
