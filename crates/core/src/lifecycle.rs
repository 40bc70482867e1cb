//! Lifecycle events derived from the journal (`GET /v1/events`).
//!
//! **The stream is the journal:** each journal line maps to at most one
//! lifecycle event, whose id is the line's journal position, so a client
//! resuming after position `p` misses and repeats nothing. A line that
//! means several things (a training started *and* the stage changed) is
//! named by its most specific meaning; every event carries `from` and `to`,
//! so stage changes are visible on every event.

use serde::Serialize;

use crate::journal::JournalEntry;
use crate::machine::Stage;

/// Every lifecycle event type, as named on the stream.
pub const EVENT_TYPES: &[&str] = &[
    "run.started",
    "stage.changed",
    "dataset.published",
    "training.started",
    "training.finished",
    "training.lost",
    "verdict",
    "promoted",
    "awaiting_approval",
    "approved",
    "rejected",
    "rolled_back",
    "lease.acquired",
    "lease.released",
    "run.finished",
    "run.failed",
];

/// One event of the stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LifecycleEvent {
    /// The journal position (the SSE `id`).
    pub id: u64,
    /// One of [`EVENT_TYPES`] (the SSE `event`).
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub label: String,
    pub run_id: String,
    pub cycle_id: String,
    pub seq: u64,
    pub at: chrono::DateTime<chrono::Utc>,
    pub from: Stage,
    pub to: Stage,
    /// The journaled event as stored.
    pub event: serde_json::Value,
}

impl LifecycleEvent {
    /// The lifecycle event a journal line means, if any (reads such as
    /// `counts_read` that change nothing visible are not events).
    pub fn of(entry: &JournalEntry) -> Option<Self> {
        let kind = kind_of(entry)?;
        Some(Self {
            id: entry.position,
            kind,
            label: entry.label.to_string(),
            run_id: entry.run_id.to_string(),
            cycle_id: entry.cycle_id.to_string(),
            seq: entry.seq,
            at: entry.at,
            from: entry.from,
            to: entry.to,
            event: entry.event.clone(),
        })
    }
}

fn kind_of(entry: &JournalEntry) -> Option<&'static str> {
    let name = entry.event_name();
    let specific = match name {
        "started" => Some("run.started"),
        // The run accepted a new dataset: read at once (no prepare job) or
        // found by a poll, it moves on to leasing or training.
        "published_read" | "polled" => {
            let accepted =
                entry.from != entry.to && matches!(entry.to, Stage::Leasing | Stage::Training);
            accepted.then_some("dataset.published")
        }
        "training_started" => Some("training.started"),
        "training_finished" => Some("training.finished"),
        "training_lost" => Some("training.lost"),
        "baseline_read" | "regated" | "gate_evaluated" => Some("verdict"),
        "promoted" => Some("promoted"),
        "approved" => Some("approved"),
        "rejected" => Some("rejected"),
        "rolled_back" => Some("rolled_back"),
        "lease_acquired" | "lease_renewed" => Some("lease.acquired"),
        "lease_released" => Some("lease.released"),
        "action_failed" => Some("run.failed"),
        _ => None,
    };
    if specific.is_some() {
        return specific;
    }
    if entry.to == Stage::Done && entry.from != Stage::Done {
        return Some("run.finished");
    }
    if entry.to == Stage::AwaitingApproval && entry.from != Stage::AwaitingApproval {
        return Some("awaiting_approval");
    }
    (entry.from != entry.to).then_some("stage.changed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CycleId, Label, RunId};
    use serde_json::json;

    fn entry(event: serde_json::Value, from: Stage, to: Stage) -> JournalEntry {
        JournalEntry {
            position: 7,
            run_id: RunId("r1".into()),
            cycle_id: CycleId("c1".into()),
            label: Label::new("urgency").unwrap(),
            seq: 3,
            at: chrono::Utc::now(),
            from,
            to,
            event,
        }
    }

    fn kind(event: serde_json::Value, from: Stage, to: Stage) -> Option<&'static str> {
        LifecycleEvent::of(&entry(event, from, to)).map(|e| e.kind)
    }

    #[test]
    fn journal_lines_map_to_their_most_specific_event() {
        use Stage::*;
        assert_eq!(
            kind(json!({"event": "started"}), Created, Counting),
            Some("run.started")
        );
        assert_eq!(
            kind(json!({"event": "counts_read"}), Counting, Counting),
            None
        );
        assert_eq!(
            kind(json!({"event": "counts_read"}), Counting, Preparing),
            Some("stage.changed")
        );
        assert_eq!(
            kind(
                json!({"event": "polled", "dataset": null}),
                AwaitingDataset,
                AwaitingDataset
            ),
            None
        );
        assert_eq!(
            kind(
                json!({"event": "polled", "dataset": {"metadata": {}}}),
                AwaitingDataset,
                Training
            ),
            Some("dataset.published")
        );
        assert_eq!(
            kind(json!({"event": "published_read"}), Counting, Leasing),
            Some("dataset.published")
        );
        assert_eq!(
            kind(json!({"event": "published_read"}), Counting, Preparing),
            Some("stage.changed")
        );
        assert_eq!(
            kind(json!({"event": "training_started"}), Training, Training),
            Some("training.started")
        );
        assert_eq!(
            kind(json!({"event": "baseline_read"}), Gating, Promoting),
            Some("verdict")
        );
        assert_eq!(
            kind(json!({"event": "notified"}), Notifying, AwaitingApproval),
            Some("awaiting_approval")
        );
        assert_eq!(
            kind(json!({"event": "committed"}), Finishing, Done),
            Some("run.finished")
        );
        assert_eq!(
            kind(json!({"event": "action_failed"}), Training, Releasing),
            Some("run.failed")
        );
        assert_eq!(
            kind(json!({"event": "lease_renewed"}), Training, Training),
            Some("lease.acquired")
        );
    }

    #[test]
    fn every_kind_is_a_declared_type_and_the_id_is_the_position() {
        let event = LifecycleEvent::of(&entry(
            json!({"event": "promoted"}),
            Stage::Promoting,
            Stage::Releasing,
        ))
        .unwrap();
        assert_eq!(event.id, 7);
        assert!(EVENT_TYPES.contains(&event.kind));
    }
}
