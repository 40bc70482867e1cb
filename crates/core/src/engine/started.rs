//! Announcing a cycle's runs before the cycle ends (`POST /v1/runs` answers
//! `202` with each label's run id while the cycle goes on in the background).
//!
//! The announcement is sent once, after phase one: by then every label has
//! either taken its lock and journaled its run (so the id is durable and
//! the run can be looked up) or been reported busy, failed or interrupted.
//! Nothing else about the cycle changes; a dropped receiver is ignored.

use tokio::sync::oneshot;

use super::Begun;
use crate::domain::{CycleId, Label, RunId};
use crate::report::LabelStatus;

/// What phase one did with one label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelStart {
    /// The cycle drives this run (created now, or resumed when `resumed`).
    Driving { run_id: RunId, resumed: bool },
    /// Another driver (this process or another replica) holds the label.
    Busy { holder: String },
    /// The label ended in phase one (failed, interrupted, nothing to do);
    /// the run id is set when a run was journaled.
    Ended {
        run_id: Option<RunId>,
        status: LabelStatus,
        error: Option<String>,
    },
}

/// The announcement of a cycle after phase one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleStarted {
    pub cycle_id: CycleId,
    /// In the order the labels were requested.
    pub labels: Vec<(Label, LabelStart)>,
}

/// Where the announcement goes (`None`: nobody asked).
pub(super) type Announce = Option<oneshot::Sender<CycleStarted>>;

/// Send what phase one found to `announce`, if anyone listens.
pub(super) fn announce(announce: Announce, cycle_id: &CycleId, begun: &[Begun]) {
    let Some(sender) = announce else {
        return;
    };
    let labels = begun
        .iter()
        .map(|begun| match begun {
            Begun::Task(task) => (
                task.run.label().clone(),
                LabelStart::Driving {
                    run_id: task.run.run_id.clone(),
                    resumed: task.resumed,
                },
            ),
            Begun::Done(report) if report.status == LabelStatus::Busy => (
                report.label.clone(),
                LabelStart::Busy {
                    holder: report.error.clone().unwrap_or_default(),
                },
            ),
            Begun::Done(report) => (
                report.label.clone(),
                LabelStart::Ended {
                    run_id: report.run_id.clone(),
                    status: report.status,
                    error: report.error.clone(),
                },
            ),
        })
        .collect();
    let _ = sender.send(CycleStarted {
        cycle_id: cycle_id.clone(),
        labels,
    });
}
