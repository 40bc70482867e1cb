//! The audit trail (seed 004, §9): the label's metrics history in its
//! reports.

use tracing::warn;

use super::Engine;
use crate::history::metric_points_besides;
use crate::machine::LabelRun;
use crate::report::{with_history, LabelReport, HISTORY_LEN};

impl Engine {
    /// `report` (of `run`) with the label's last evaluated candidates, `run`
    /// included, for the chart in its markdown. Only gated runs with a
    /// verdict read the store; a read failure leaves the chart out.
    pub(super) async fn with_history(&self, run: &LabelRun, report: LabelReport) -> LabelReport {
        if run.plan.gate.is_none() || run.verdict.is_none() {
            return report;
        }
        match metric_points_besides(
            self.store.as_ref(),
            run.label(),
            Some(HISTORY_LEN),
            Some(run),
        )
        .await
        {
            Ok(points) => with_history(report, points),
            Err(error) => {
                warn!(%error, "could not read the metrics history; the report has no chart");
                report
            }
        }
    }
}
