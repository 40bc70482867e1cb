//! Logging set up in one place: text or JSONL on stderr (§9). JSON lines carry
//! the span fields (`run_id`, `label`, `stage`) plus `git_sha`.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

use crate::args::LogFormat;

pub fn init(format: LogFormat, filter: Option<&str>) {
    let filter = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("RETRAIN_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => {
            let layer = fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
            registry.with(layer).try_init().ok();
        }
        LogFormat::Json => {
            let layer = fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .with_current_span(true)
                .with_span_list(true)
                .flatten_event(true);
            registry.with(layer).try_init().ok();
            tracing::info!(
                git_sha = retrain_adapters::build_info::GIT_SHA,
                version = env!("CARGO_PKG_VERSION"),
                "retrain starting"
            );
        }
    }
}
