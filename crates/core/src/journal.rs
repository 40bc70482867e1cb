//! Journal records: what the `RunStore` persists for every transition, and the
//! read models `retrain runs` / `retrain status` render.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{CycleId, Label, RunId};
use crate::machine::{Action, Event, LabelRun, Stage};

/// One step of the state machine, persisted before any of `actions` runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub run_id: RunId,
    pub cycle_id: CycleId,
    pub label: Label,
    /// 0 for the creation of the run, then +1 per event.
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub from: Stage,
    pub to: Stage,
    pub event: Event,
    pub actions: Vec<Action>,
    /// The full state after the transition: what a resumed run starts from.
    pub snapshot: LabelRun,
}

impl Transition {
    pub fn is_final(&self) -> bool {
        self.to == Stage::Done
    }
}

/// Filter for `retrain runs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFilter {
    pub label: Option<Label>,
    pub limit: Option<u32>,
}

/// One line of `retrain runs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub run_id: RunId,
    pub cycle_id: CycleId,
    pub label: Label,
    pub stage: Stage,
    /// Short outcome (`skipped`, `promoted`, `rejected`, `failed`, `running`).
    pub outcome: String,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `retrain runs show ID`: the last snapshot plus the whole journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDetail {
    pub summary: RunSummary,
    pub snapshot: LabelRun,
    pub transitions: Vec<TransitionRecord>,
}

/// A journal line as stored (the snapshot is kept once, on the run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransitionRecord {
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub from: Stage,
    pub to: Stage,
    pub event: serde_json::Value,
    pub actions: serde_json::Value,
}
