//! [`WebhookEffects`] and the schedule's [`TickHandler`] over this
//! process's engine: cycles and gates run as tracked tasks of their own
//! (awaited on shutdown, interrupted by it), so a webhook is answered at
//! once and a sender hanging up drops nothing.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_adapters::store::PendingGate;
use retrain_core::domain::{Label, RunId};
use retrain_core::engine::{CycleRequest, EngineError};
use retrain_core::journal::LabelStatusRow;
use retrain_core::machine::Stage;

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

    /// Record each request as pending (durably, before the delivery is
    /// answered), then gate it in a task of its own.
    async fn gate(&self, requests: Vec<GateRequest>) -> Result<(), String> {
        if self.state.shutdown.is_cancelled() {
            return Err("the server is shutting down".into());
        }
        let now = Utc::now();
        for request in &requests {
            let pending = PendingGate {
                label: request.label.to_string(),
                model: request.model.clone(),
                version: request.version.clone(),
                candidate_run_id: request.candidate_run_id.clone(),
                received_at: now,
            };
            // Unrecorded, it would be lost by a restart while it waits: refuse
            // the delivery instead (the claim is given up, the sender retries).
            self.state
                .pending_gates
                .add(&pending)
                .await
                .map_err(|e| format!("cannot record the gate to do: {e}"))?;
        }
        for request in requests {
            self.spawn_gate(request);
        }
        Ok(())
    }
}

impl EngineEffects {
    /// Resume the runs a previous process left unfinished (stopped or killed
    /// mid-run): one cycle of their labels, as the next trigger would do. A
    /// server is triggered rarely (a schedule, webhooks), and a run whose
    /// remote job finished while the server was down would otherwise wait
    /// for that trigger. A run awaiting approval waits for its sign-off, not
    /// for a cycle.
    pub async fn resume_interrupted_runs(&self) {
        if self.state.settings.dry_run {
            return;
        }
        let labels: Vec<Label> = self
            .state
            .engine
            .labels()
            .map(|binding| binding.plan.label.clone())
            .collect();
        let statuses = match self.state.store.label_statuses(&labels).await {
            Ok(statuses) => statuses,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the labels' runs; interrupted runs resume at the next trigger");
                return;
            }
        };
        let interrupted: Vec<Label> = labels
            .into_iter()
            .zip(statuses)
            .filter(|(_, status)| interrupted(status))
            .map(|(label, _)| label)
            .collect();
        if interrupted.is_empty() {
            return;
        }
        tracing::info!(labels = ?interrupted, "resuming the runs a previous process left unfinished");
        self.spawn_cycle(
            Some(interrupted),
            "resume the runs a previous process left unfinished".into(),
            "resume",
        );
    }

    /// Resume the gates a previous process accepted and did not finish (it
    /// stopped while the label's run held the lock).
    pub async fn resume_pending_gates(&self) {
        let pending = match self.state.pending_gates.list().await {
            Ok(pending) => pending,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pending gates; they resume at the next start");
                return;
            }
        };
        for gate in pending {
            let Ok(label) = Label::new(&gate.label) else {
                tracing::warn!(
                    label = gate.label,
                    "a pending gate names an invalid label; dropped"
                );
                let _ = self
                    .state
                    .pending_gates
                    .remove(&gate.label, &gate.model, &gate.version)
                    .await;
                continue;
            };
            tracing::info!(%label, model = gate.model, version = gate.version, "resuming a pending gate");
            self.spawn_gate(GateRequest {
                label,
                model: gate.model,
                version: gate.version,
                candidate_run_id: gate.candidate_run_id,
            });
        }
    }

    /// Gate `request` until it is done, waiting while its label is busy; the
    /// pending row goes once it is (or when gating failed for good). A
    /// replica that finds the row gone stops: another one gated it.
    fn spawn_gate(&self, request: GateRequest) {
        let effects = self.clone();
        self.state.work.spawn(async move {
            let candidate = request.candidate_id();
            let label = request.label.to_string();
            let pending = effects.state.pending_gates.clone();
            let done = || async {
                if let Err(e) = pending
                    .remove(&label, &request.model, &request.version)
                    .await
                {
                    tracing::warn!(%label, candidate, error = %e, "cannot clear the pending gate; it is gated again at the next start");
                }
            };
            let started = tokio::time::Instant::now();
            loop {
                match pending
                    .is_pending(&label, &request.model, &request.version)
                    .await
                {
                    Ok(false) => return,
                    Ok(true) => {}
                    // Gate anyway: the engine's lock keeps it to one run.
                    Err(e) => tracing::warn!(%label, error = %e, "cannot read the pending gate"),
                }
                let gated = effects
                    .state
                    .engine
                    .gate_and_promote(&request.label, &candidate)
                    .await;
                match gated {
                    Ok((outcome, report)) => {
                        tracing::info!(
                            %label,
                            candidate,
                            passed = outcome.verdict.passed,
                            status = ?report.status,
                            "registered version gated"
                        );
                        done().await;
                        effects.observe(outcome.run_id).await;
                        return;
                    }
                    // The label's cycle holds the lock: gate after it.
                    Err(EngineError::Busy(_, holder)) if started.elapsed() < BUSY_PATIENCE => {
                        tracing::info!(%label, %holder, "gate waits for the label's run to finish");
                        tokio::select! {
                            // Still pending: the next start resumes it.
                            () = effects.state.shutdown.cancelled() => return,
                            () = tokio::time::sleep(BUSY_RETRY) => {}
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%label, candidate, error = %e, "gating the registered version failed");
                        done().await;
                        return;
                    }
                }
            }
        });
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

/// Whether the newest run of a label is unfinished. Whoever may drive it
/// is the lock's business: a live holder (another replica) answers the
/// cycle busy, a dead one of this host or an expired one is taken over.
fn interrupted(status: &LabelStatusRow) -> bool {
    status
        .last_run
        .as_ref()
        .is_some_and(|run| !matches!(run.stage, Stage::Done | Stage::AwaitingApproval))
}
