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
    /// The journal line of `run` having just taken `event` from stage
    /// `from`, at `at`: the run as it is now is the snapshot, its pending
    /// actions the line's actions.
    pub fn after_step(run: &LabelRun, from: Stage, event: Event, at: DateTime<Utc>) -> Self {
        Self {
            run_id: run.run_id.clone(),
            cycle_id: run.cycle_id.clone(),
            label: run.label().clone(),
            seq: run.seq,
            at,
            from,
            to: run.stage,
            event,
            actions: run.pending.clone(),
            snapshot: run.clone(),
        }
    }

    pub fn is_final(&self) -> bool {
        self.to == Stage::Done
    }

    /// The promotion event this transition records, if it is the one that
    /// journals a promotion (`Event::Promoted`) or a rollback
    /// (`Event::RolledBack`). The store writes it in the
    /// same fenced statement/transaction as the journal line, so a promotion
    /// is in the history exactly when it is in the journal.
    pub fn promotion_event(&self) -> Option<PromotionEvent> {
        let (Event::Promoted { version } | Event::RolledBack { version }) = &self.event else {
            return None;
        };
        let run = &self.snapshot;
        let (by, reason) = match (&run.rollback, &run.approval) {
            (Some(r), _) => (r.by.clone(), Some(r.reason.clone())),
            (None, Some(a)) => (a.by.clone(), a.reason.clone()),
            (None, None) => (AUTO.to_owned(), None),
        };
        let recorded_previous = match &run.rollback {
            Some(r) => r.from_version.clone(),
            None => run.baseline.as_ref().map(|b| b.version.clone()),
        };
        let candidate_id = match &run.rollback {
            Some(r) => r.restored_candidate.clone(),
            None => run.candidate.as_ref().map(|c| c.id.clone()),
        };
        Some(PromotionEvent {
            run_id: self.run_id.clone(),
            label: self.label.clone(),
            kind: run.promotion_kind(),
            version: version.version.clone(),
            previous_version: version.previous.clone().or(recorded_previous),
            candidate_run: run.candidate_run().cloned(),
            candidate_id,
            verdict: run.verdict.as_ref().map(|v| v.reason.clone()),
            by,
            reason,
            at: self.at,
        })
    }
}

/// `by` of a promotion nobody approved by hand.
pub const AUTO: &str = "auto";

/// What changed production: a gated promotion or a rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromotionKind {
    Promotion,
    Rollback,
}

impl PromotionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Promotion => "promotion",
            Self::Rollback => "rollback",
        }
    }
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "promotion" => Some(Self::Promotion),
            "rollback" => Some(Self::Rollback),
            _ => None,
        }
    }
}

/// One change of a label's production model (`retrain history`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromotionEvent {
    /// The run that changed production (one event per run at most).
    pub run_id: RunId,
    pub label: Label,
    pub kind: PromotionKind,
    /// The registry version that became production.
    pub version: String,
    /// The version that was production before.
    pub previous_version: Option<String>,
    /// The run that trained the candidate (the run itself for a promotion).
    pub candidate_run: Option<RunId>,
    pub candidate_id: Option<String>,
    /// The gate's reason (promotions).
    pub verdict: Option<String>,
    /// `auto`, or who approved / rolled back.
    pub by: String,
    /// Why (the approver's or the rollback's reason).
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

/// Filter for `retrain runs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFilter {
    pub label: Option<Label>,
    pub limit: Option<u32>,
}

/// One page of runs, newest first (by start time, then run id), for the
/// server's `GET /v1/runs`: keyset-paged, so runs started while a client
/// pages never shift the pages after its cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPage {
    pub label: Option<Label>,
    /// An outcome (`promoted`, `running`…) or a stage (`awaiting_approval`…).
    pub status: Option<String>,
    /// Only runs listed after this one (the previous page's last); a run id
    /// the store does not know gives an empty page.
    pub after: Option<RunId>,
    pub limit: u32,
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

/// What a cycle starts a label from, read under its lock
/// ([`RunStore::label_start`](crate::ports::RunStore::label_start)).
#[derive(Debug, Clone, PartialEq)]
pub enum LabelStart {
    /// The label's unfinished run, as last journaled: resumed.
    Resume(Box<crate::machine::LabelRun>),
    /// No unfinished run: a new one starts from this cursor.
    Fresh(crate::domain::LabelCursor),
}

/// One label's line of `retrain status`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LabelStatusRow {
    pub cursor: crate::domain::LabelCursor,
    /// The label's newest run.
    pub last_run: Option<RunSummary>,
    /// The verdict reason of the newest run, if it was gated.
    pub last_verdict: Option<String>,
    /// Owner of the label's live lock (see [`RunStore::lock_holder`](crate::ports::RunStore::lock_holder)).
    pub locked_by: Option<String>,
    /// The newest run of the label waiting for a sign-off (the first of
    /// `waiting`).
    pub awaiting_approval: Option<RunId>,
    /// Every run of the label waiting for a sign-off, newest first.
    pub waiting: Vec<RunId>,
    /// The label's production version: that of its newest promotion event
    /// (promotion or rollback) in the store.
    pub production: Option<ProductionRecord>,
}

/// A label's production version as the store's promotion history says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductionRecord {
    pub version: String,
    /// When it became production.
    pub since: DateTime<Utc>,
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

/// One journal line with its position in the whole store's journal (all
/// labels, all replicas): what `GET /v1/events` streams. Positions grow in
/// commit order, so a reader that has seen position `p` has seen every line
/// committed before it and can resume with [`crate::ports::RunStore::journal_after`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub position: u64,
    pub run_id: RunId,
    pub cycle_id: CycleId,
    pub label: Label,
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub from: Stage,
    pub to: Stage,
    /// The journaled event as stored (`{"event": "training_started", …}`).
    pub event: serde_json::Value,
}

impl JournalEntry {
    /// The journal name of the event (`training_started`, …).
    pub fn event_name(&self) -> &str {
        self.event
            .get("event")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
    }
}

/// What an `Idempotency-Key` claim found (see
/// [`crate::ports::RunStore::claim_request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestClaim {
    /// The key is new: the caller acts, then stores its response.
    Claimed,
    /// The key was used before with this fingerprint; `response` is the
    /// stored first response, `None` while the first request is still
    /// being answered.
    Seen { response: Option<String> },
    /// The key was used before for a different request.
    Mismatch,
}
