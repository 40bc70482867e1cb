//! The embedded default notifier: one `info` line per label report.

use async_trait::async_trait;
use retrain_core::ports::{Notifier, PortError};
use retrain_core::report::LabelReport;
use tracing::info;

/// Logs each label report through `tracing` (the CLI's log sink decides
/// where it goes: terminal, JSONL).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogNotifier;

impl LogNotifier {
    pub fn new() -> Self {
        Self
    }
}

#[async_trait]
impl Notifier for LogNotifier {
    async fn notify(&self, report: &LabelReport) -> Result<(), PortError> {
        let run_id = report
            .run_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let version = report
            .promoted
            .as_ref()
            .map(|p| p.version.clone())
            .unwrap_or_default();
        let dataset = report
            .dataset_version
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let candidate = report
            .candidate
            .as_ref()
            .map(|c| c.id.clone())
            .unwrap_or_default();
        let verdict = report
            .verdict
            .as_ref()
            .map(|v| v.reason.clone())
            .unwrap_or_default();
        let error = report.error.clone().unwrap_or_default();
        info!(
            label = %report.label,
            run_id = %run_id,
            status = report.status.as_str(),
            dataset = %dataset,
            candidate = %candidate,
            version = %version,
            verdict = %verdict,
            error = %error,
            "label report"
        );
        Ok(())
    }

    fn describe(&self) -> String {
        "log".into()
    }
}
