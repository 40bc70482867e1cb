//! The live status line per label on a terminal.
//!
//! The engine logs one `current_len=… required_len=… version=…` line per
//! dataset poll (`retrain_core::engine::poll`), inside the spans `label`
//! (`label = …`) and `stage` (`stage = …`). On a terminal, [`ProgressLayer`]
//! turns those spans and events into one indicatif line per label (stage,
//! elapsed, `current_len/required_len`, version) and the text log layer
//! leaves the per-poll lines out; every other log line is printed above the
//! status lines. When stderr is not a terminal (or with `--output json`,
//! `--log-format json`, under GitHub Actions, `TERM=dumb`) this layer is
//! not installed and the logs are exactly the plain ones.
//!
//! [`render_status`] is the pure formatting of one line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressState, ProgressStyle};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Where the engine logs its per-poll line.
const POLL_TARGET: &str = "retrain_core::engine::poll";

/// What one status line shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelStatus {
    pub label: String,
    pub stage: Option<String>,
    /// `(current_len, required_len)` of the last dataset poll.
    pub lengths: Option<(u64, u64)>,
    /// `version_tag` of the last dataset seen (`None`: nothing published yet).
    pub version: Option<String>,
}

/// `5s`, `1m05s`, `2h03m`.
pub fn format_elapsed(elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// One status line: `department  awaiting_dataset  1m05s  len 120/130  version v7`.
pub fn render_status(status: &LabelStatus, elapsed: Duration) -> String {
    let mut line = format!(
        "{:<16} {:<16} {:>6}",
        status.label,
        status.stage.as_deref().unwrap_or("starting"),
        format_elapsed(elapsed)
    );
    if let Some((current, required)) = status.lengths {
        let _ = write!(line, "  len {current}/{required}");
    }
    match (&status.version, status.lengths) {
        (Some(version), _) => {
            let _ = write!(line, "  version {version}");
        }
        (None, Some(_)) => line.push_str("  no dataset yet"),
        (None, None) => {}
    }
    line.trim_end().to_owned()
}

/// The numbers of a poll line: `current_len=120 required_len=130 version=v7 …`.
/// `version=none` means nothing is published yet.
pub fn parse_poll_message(message: &str) -> Option<(u64, u64, Option<String>)> {
    let mut current = None;
    let mut required = None;
    let mut version = None;
    for pair in message.split_whitespace() {
        match pair.split_once('=') {
            Some(("current_len", v)) => current = v.parse().ok(),
            Some(("required_len", v)) => required = v.parse().ok(),
            Some(("version", v)) => version = (v != "none").then(|| v.to_owned()),
            _ => {}
        }
    }
    Some((current?, required?, version))
}

/// Whether an event is the engine's per-poll line (shown as a status line
/// on a terminal instead of being logged).
pub fn is_poll_line(metadata: &Metadata<'_>) -> bool {
    metadata.target() == POLL_TARGET && *metadata.level() == Level::INFO
}

struct Bar {
    bar: ProgressBar,
    status: Arc<Mutex<LabelStatus>>,
}

/// The live status lines, one per label, until [`finish`].
#[derive(Clone)]
pub struct Progress {
    multi: MultiProgress,
    bars: Arc<Mutex<BTreeMap<String, Bar>>>,
}

static PROGRESS: OnceLock<Progress> = OnceLock::new();

impl Progress {
    /// Install the process-wide status lines (once).
    pub fn install() -> Self {
        PROGRESS
            .get_or_init(|| Progress {
                multi: MultiProgress::new(),
                bars: Arc::default(),
            })
            .clone()
    }

    /// A log writer that prints above the status lines.
    pub fn writer(&self) -> SuspendingWriter {
        SuspendingWriter {
            multi: self.multi.clone(),
        }
    }

    fn update(&self, label: &str, change: impl FnOnce(&mut LabelStatus)) {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        let bar = bars.entry(label.to_owned()).or_insert_with(|| {
            let status = Arc::new(Mutex::new(LabelStatus {
                label: label.to_owned(),
                ..LabelStatus::default()
            }));
            let shown = status.clone();
            let style = ProgressStyle::with_template("{spinner} {status}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner())
                .with_key(
                    "status",
                    move |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                        let status = shown.lock().unwrap_or_else(|e| e.into_inner());
                        let _ = w.write_str(&render_status(&status, state.elapsed()));
                    },
                );
            let bar = self.multi.add(ProgressBar::new_spinner().with_style(style));
            bar.enable_steady_tick(Duration::from_millis(200));
            Bar { bar, status }
        });
        change(&mut bar.status.lock().unwrap_or_else(|e| e.into_inner()));
        bar.bar.tick();
    }
}

/// Stop and erase every status line, before the report (which says how each
/// label ended) is printed. A no-op when none was installed.
pub fn finish() {
    if let Some(progress) = PROGRESS.get() {
        let mut bars = progress.bars.lock().unwrap_or_else(|e| e.into_inner());
        for bar in bars.values() {
            bar.bar.finish_and_clear();
        }
        bars.clear();
        let _ = progress.multi.clear();
    }
}

/// `MakeWriter` for the text log layer: each line is written with the status
/// lines suspended, so they are redrawn below it.
#[derive(Clone)]
pub struct SuspendingWriter {
    multi: MultiProgress,
}

impl std::io::Write for SuspendingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.multi
            .suspend(|| std::io::stderr().lock().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SuspendingWriter {
    type Writer = SuspendingWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The value of a `label` span's `label` field, kept in its extensions.
struct LabelField(String);

/// Collects one named field (or the message) as text.
#[derive(Default)]
struct FieldText {
    wanted: &'static str,
    value: Option<String>,
    /// Structured poll fields, if the engine ever logs them as fields.
    current_len: Option<u64>,
    required_len: Option<u64>,
    version: Option<String>,
}

impl Visit for FieldText {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == self.wanted {
            self.value = Some(format!("{value:?}"));
        } else if field.name() == "version" {
            self.version = Some(format!("{value:?}"));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == self.wanted {
            self.value = Some(value.to_owned());
        } else if field.name() == "version" {
            self.version = Some(value.to_owned());
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "current_len" => self.current_len = Some(value),
            "required_len" => self.required_len = Some(value),
            name if name == self.wanted => self.value = Some(value.to_string()),
            _ => {}
        }
    }
}

/// The tracing layer feeding [`Progress`].
pub struct ProgressLayer {
    progress: Progress,
}

impl ProgressLayer {
    pub fn new(progress: Progress) -> Self {
        Self { progress }
    }
}

/// The label of the innermost `label` span around `span`.
fn label_of<'a, S>(
    scope: impl Iterator<Item = tracing_subscriber::registry::SpanRef<'a, S>>,
) -> Option<String>
where
    S: Subscriber + for<'l> LookupSpan<'l>,
{
    for span in scope {
        if let Some(LabelField(label)) = span.extensions().get::<LabelField>() {
            return Some(label.clone());
        }
    }
    None
}

impl<S> Layer<S> for ProgressLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let wanted = match attrs.metadata().name() {
            "label" => "label",
            "stage" => "stage",
            _ => return,
        };
        let mut visitor = FieldText {
            wanted,
            ..FieldText::default()
        };
        attrs.record(&mut visitor);
        let (Some(value), Some(span)) = (visitor.value, ctx.span(id)) else {
            return;
        };
        if wanted == "label" {
            span.extensions_mut().insert(LabelField(value));
            return;
        }
        if let Some(label) = label_of(span.scope()) {
            self.progress.update(&label, |s| s.stage = Some(value));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if !is_poll_line(event.metadata()) {
            return;
        }
        let Some(label) = ctx.event_scope(event).and_then(|scope| label_of(scope)) else {
            return;
        };
        let mut visitor = FieldText {
            wanted: "message",
            ..FieldText::default()
        };
        event.record(&mut visitor);
        let parsed = match (visitor.current_len, visitor.required_len) {
            (Some(current), Some(required)) => {
                Some((current, required, visitor.version.filter(|v| v != "none")))
            }
            _ => visitor.value.as_deref().and_then(parse_poll_message),
        };
        if let Some((current, required, version)) = parsed {
            self.progress.update(&label, |s| {
                s.lengths = Some((current, required));
                s.version = version;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_line_shows_label_stage_elapsed_lengths_and_version() {
        let status = LabelStatus {
            label: "department".into(),
            stage: Some("awaiting_dataset".into()),
            lengths: Some((120, 130)),
            version: Some("v20261202_0730".into()),
        };
        assert_eq!(
            render_status(&status, Duration::from_secs(65)),
            "department       awaiting_dataset  1m05s  len 120/130  version v20261202_0730"
        );
        let nothing_yet = LabelStatus {
            version: None,
            lengths: Some((0, 130)),
            ..status.clone()
        };
        assert!(render_status(&nothing_yet, Duration::from_secs(3))
            .ends_with("3s  len 0/130  no dataset yet"));
        let starting = LabelStatus {
            label: "urgency".into(),
            ..LabelStatus::default()
        };
        assert_eq!(
            render_status(&starting, Duration::ZERO),
            "urgency          starting             0s"
        );
    }

    #[test]
    fn elapsed_is_compact() {
        assert_eq!(format_elapsed(Duration::from_millis(900)), "0s");
        assert_eq!(format_elapsed(Duration::from_secs(59)), "59s");
        assert_eq!(format_elapsed(Duration::from_secs(3599)), "59m59s");
        assert_eq!(format_elapsed(Duration::from_secs(7380)), "2h03m");
    }

    #[test]
    fn the_engines_poll_line_parses() {
        assert_eq!(
            parse_poll_message("current_len=240 required_len=130 version=v7 prepare_stage=-"),
            Some((240, 130, Some("v7".into())))
        );
        assert_eq!(
            parse_poll_message("current_len=0 required_len=130 version=none prepare_stage=RUNNING"),
            Some((0, 130, None))
        );
        assert_eq!(parse_poll_message("woken early by a webhook"), None);
    }
}
