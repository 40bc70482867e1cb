//! Logging set up in one place: text or JSONL on stderr (§9). JSON lines carry
//! the span fields (`run_id`, `label`, `stage`) plus `git_sha`. On a terminal,
//! a live status line per label replaces the per-poll log lines
//! (`progress.rs`).

use std::io::IsTerminal;

use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::args::LogFormat;
use crate::progress::{self, Progress, ProgressLayer};

/// How stderr is used, decided once from the flags and the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terminal {
    /// Colours in text logs.
    pub color: bool,
    /// Live status lines instead of per-poll log lines.
    pub status_lines: bool,
}

impl Terminal {
    /// `NO_COLOR` (non-empty) never colours; `CLICOLOR_FORCE` (not `0`)
    /// colours even when stderr is not a terminal; otherwise colours and
    /// status lines only on a terminal. Status lines also need text logs and
    /// text output, no GitHub Actions and a `TERM` other than `dumb`.
    pub fn detect(format: LogFormat, text_output: bool) -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let tty = std::io::stderr().is_terminal();
        let no_color = env("NO_COLOR").is_some();
        let forced = env("CLICOLOR_FORCE").is_some_and(|v| v != "0");
        let dumb = env("TERM").is_some_and(|t| t == "dumb");
        let github = env("GITHUB_ACTIONS").is_some_and(|v| v == "true");
        Self {
            color: !no_color && (forced || (tty && !dumb)),
            status_lines: tty && !dumb && !github && text_output && format == LogFormat::Text,
        }
    }
}

pub fn init(format: LogFormat, filter: Option<&str>, terminal: Terminal) {
    let filter = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("RETRAIN_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text if terminal.status_lines => {
            let progress = Progress::install();
            let layer = fmt::layer()
                .with_writer(progress.writer())
                .with_target(false)
                .with_ansi(terminal.color)
                .with_filter(filter_fn(|meta| !progress::is_poll_line(meta)));
            registry
                .with(layer)
                .with(ProgressLayer::new(progress))
                .try_init()
                .ok();
        }
        LogFormat::Text => {
            let layer = fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(terminal.color);
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
                git_sha = option_env!("RETRAIN_GIT_SHA").unwrap_or("unknown"),
                version = env!("CARGO_PKG_VERSION"),
                "retrain starting"
            );
        }
    }
}
