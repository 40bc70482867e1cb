//! Logging set up in one place: text or JSONL on stderr (§9), and with
//! `--log-dir DIR` the same JSONL per stage in `DIR/<stage>.log` (seed 004's
//! `logs/{task}.log`). Every JSON line has seed 004's fields: `ts`, `level`,
//! `run_id`, `label`, `stage`, `git_sha`, `inputs`, `outputs`, `metrics`,
//! `duration_s`, `status` (null where a line is not a step), plus `message`
//! and `target`. Steps are the engine's `retrain::audit` events, one per
//! journaled transition. On a terminal, a live status line per label
//! replaces the per-poll log lines (`progress.rs`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{self, FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::args::LogFormat;
use crate::progress::{self, Progress, ProgressLayer};

/// The fields every JSON line carries (seed 004).
pub const AUDIT_FIELDS: &[&str] = &[
    "run_id",
    "ts",
    "label",
    "stage",
    "level",
    "git_sha",
    "inputs",
    "outputs",
    "metrics",
    "duration_s",
    "status",
];

/// When this process started (set first thing in `main`).
static PROCESS_START: std::sync::OnceLock<chrono::DateTime<chrono::Utc>> =
    std::sync::OnceLock::new();

pub fn mark_process_start() {
    PROCESS_START.get_or_init(chrono::Utc::now);
}

/// A step of the process itself (`startup`: process start → cycle start;
/// `finish`: cycle end → now), so that the steps' `duration_s` account for
/// the whole wall time.
pub fn process_step(
    stage: &str,
    run_id: &str,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) {
    let duration_s = (to - from).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
    tracing::info!(target: "retrain::audit", run_id, stage, status = "ok", inputs = "{}", outputs = "{}", metrics = "{}", duration_s, "step");
}

pub fn process_started() -> chrono::DateTime<chrono::Utc> {
    *PROCESS_START.get_or_init(chrono::Utc::now)
}

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

pub fn init(format: LogFormat, filter: Option<&str>, log_dir: Option<PathBuf>, terminal: Terminal) {
    let filter = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("RETRAIN_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    if let Some(dir) = &log_dir {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("warning: --log-dir {}: {e}", dir.display());
        }
    }
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => {
            // With --log-dir, the JSONL files come from a second layer.
            if terminal.status_lines {
                let progress = Progress::install();
                let layer = fmt::layer()
                    .with_writer(progress.writer())
                    .with_target(false)
                    .with_ansi(terminal.color)
                    .with_filter(filter_fn(|meta| {
                        !progress::is_poll_line(meta) && !is_audit_step(meta)
                    }));
                registry
                    .with(layer)
                    .with(ProgressLayer::new(progress))
                    .with(log_files(log_dir))
                    .try_init()
                    .ok();
            } else {
                let layer = fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .with_ansi(terminal.color)
                    .with_filter(filter_fn(|meta| !is_audit_step(meta)));
                registry
                    .with(layer)
                    .with(log_files(log_dir))
                    .try_init()
                    .ok();
            }
        }
        LogFormat::Json => {
            let layer = fmt::layer()
                .fmt_fields(JsonFields::new())
                .event_format(AuditFormat { log_dir })
                .with_writer(std::io::stderr);
            registry.with(layer).try_init().ok();
            tracing::info!(version = env!("CARGO_PKG_VERSION"), "retrain starting");
        }
    }
}

/// The per-transition audit steps are structured records for JSON logs and
/// `--log-dir`; text logs on stderr stay readable without them.
fn is_audit_step(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() == "retrain::audit"
}

/// The `--log-dir` layer: the same JSONL lines, one file per stage.
fn log_files<S>(log_dir: Option<PathBuf>) -> Option<impl tracing_subscriber::Layer<S>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    log_dir.map(|dir| {
        fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(AuditFormat { log_dir: Some(dir) })
            .with_writer(std::io::sink)
    })
}

/// One JSON object per event with the seed-004 fields.
struct AuditFormat {
    log_dir: Option<PathBuf>,
}

/// Event fields as JSON; `inputs`/`outputs`/`metrics` arrive as JSON text.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        let parsed = match field.name() {
            "inputs" | "outputs" | "metrics" => serde_json::from_str(value).ok(),
            _ => None,
        };
        self.0.insert(
            field.name().to_owned(),
            parsed.unwrap_or_else(|| Value::String(value.to_owned())),
        );
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0
            .insert(field.name().to_owned(), serde_json::json!(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
}

/// A file name for a stage: `[a-z0-9_-]` only.
fn file_stem(stage: Option<&Value>) -> String {
    let stem: String = stage
        .and_then(Value::as_str)
        .unwrap_or("retrain")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    if stem.is_empty() {
        "retrain".into()
    } else {
        stem
    }
}

impl<S, N> FormatEvent<S, N> for AuditFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = Map::new();
        // Span fields (outermost first), then the event's own.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(formatted) = extensions.get::<FormattedFields<N>>() {
                    if let Ok(Value::Object(map)) = serde_json::from_str(formatted.as_str()) {
                        fields.extend(map);
                    }
                }
            }
        }
        event.record(&mut JsonVisitor(&mut fields));
        let mut line = Map::new();
        line.insert(
            "ts".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        line.insert(
            "git_sha".into(),
            Value::String(retrain_adapters::build_info::GIT_SHA.into()),
        );
        line.insert(
            "target".into(),
            Value::String(event.metadata().target().into()),
        );
        for key in AUDIT_FIELDS {
            line.entry(*key)
                .or_insert_with(|| fields.remove(*key).unwrap_or(Value::Null));
        }
        line.extend(fields);
        let text = Value::Object(line);
        if let Some(dir) = &self.log_dir {
            let path = dir.join(format!("{}.log", file_stem(text.get("stage"))));
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| writeln!(f, "{text}"));
            if let Err(e) = written {
                eprintln!("warning: writing {}: {e}", path.display());
            }
        }
        writeln!(writer, "{text}")
    }
}
