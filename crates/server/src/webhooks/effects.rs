//! [`WebhookEffects`] and the schedule's [`TickHandler`] over this
//! process's engine: cycles and gates run as tracked tasks of their own
//! (awaited on shutdown, interrupted by it), so a webhook is answered at
//! once and a sender hanging up drops nothing.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_core::domain::{Label, RunId};
use retrain_core::engine::{CycleRequest, EngineError};

use super::{GateRequest, WebhookEffects};
use crate::metrics::Metrics;
use crate::schedule::TickHandler;
use crate::state::AppState;

/// How long a gate waits for a label that is being driven (its cycle holds
/// the lock) before giving up, and how often it retries meanwhile.
const BUSY_PATIENCE: Duration = Duration::from_secs(6 * 3600);
const BUSY_RETRY: Duration = Duration::from_secs(20);

/// The engine-backed effects of webhooks and schedule ticks.
#[derive(Debug, Clone)]
pub struct EngineEffects {
    state: AppState,
    metrics: Arc<Metrics>,
}

impl EngineEffects {
    pub fn new(state: AppState, metrics: Arc<Metrics>) -> Self {
        Self { state, metrics }
    }

    /// Record the finished runs' outcomes and stage durations.
    async fn observe(&self, runs: impl IntoIterator<Item = RunId>) {
        self.metrics
            .observe_finished(self.state.store.as_ref(), runs)
            .await;
    }

    fn spawn_cycle(&self, labels: Option<Vec<Label>>, reason: String, trigger: &'static str) {
        self.metrics.cycle_started(trigger);
        let effects = self.clone();
        let cancel = self.state.shutdown.child_token();
        let request = CycleRequest {
            labels,
            dry_run: self.state.settings.dry_run,
        };
        self.state.work.spawn(async move {
            tracing::info!(%reason, labels = ?request.labels, "cycle triggered");
            match effects.state.engine.run_cycle(request, cancel).await {
                Ok(report) => {
                    tracing::info!(cycle_id = %report.cycle_id, %reason, "cycle finished");
                    let runs: Vec<RunId> = report
                        .labels
                        .iter()
                        .filter_map(|l| l.run_id.clone())
                        .collect();
                    effects.observe(runs).await;
                }
                Err(e) => tracing::warn!(%reason, error = %e, "cycle failed"),
            }
        });
    }
}

#[async_trait]
impl WebhookEffects for EngineEffects {
    fn wake(&self, labels: &[Label]) {
        for label in labels {
            self.state.engine.wake(label);
        }
    }

    async fn start(&self, labels: Vec<Label>, reason: String) -> Result<(), String> {
        if self.state.shutdown.is_cancelled() {
            return Err("the server is shutting down".into());
        }
        self.spawn_cycle(Some(labels), reason, "webhook");
        Ok(())
    }

    async fn gate(&self, requests: Vec<GateRequest>) -> Result<(), String> {
        if self.state.shutdown.is_cancelled() {
            return Err("the server is shutting down".into());
        }
        for request in requests {
            let effects = self.clone();
            self.state.work.spawn(async move {
                let candidate = request.candidate_id();
                let started = tokio::time::Instant::now();
                loop {
                    let gated = effects
                        .state
                        .engine
                        .gate_and_promote(&request.label, &candidate)
                        .await;
                    match gated {
                        Ok((outcome, report)) => {
                            tracing::info!(
                                label = %request.label,
                                candidate,
                                passed = outcome.verdict.passed,
                                status = ?report.status,
                                "registered version gated"
                            );
                            effects.observe(outcome.run_id).await;
                            return;
                        }
                        // The label's cycle holds the lock: gate after it.
                        Err(EngineError::Busy(_, holder))
                            if started.elapsed() < BUSY_PATIENCE =>
                        {
                            tracing::info!(label = %request.label, %holder, "gate waits for the label's run to finish");
                            tokio::select! {
                                () = effects.state.shutdown.cancelled() => return,
                                () = tokio::time::sleep(BUSY_RETRY) => {}
                            }
                        }
                        Err(e) => {
                            tracing::warn!(label = %request.label, candidate, error = %e, "gating the registered version failed");
                            return;
                        }
                    }
                }
            });
        }
        Ok(())
    }
}

#[async_trait]
impl TickHandler for EngineEffects {
    async fn fire(&self, tick: DateTime<Utc>) -> Result<(), String> {
        if self.state.shutdown.is_cancelled() {
            return Err("the server is shutting down".into());
        }
        self.spawn_cycle(None, format!("schedule tick {tick}"), "schedule");
        Ok(())
    }
}
