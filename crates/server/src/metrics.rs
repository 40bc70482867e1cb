//! `GET /metrics`: Prometheus/OpenMetrics text from `prometheus-client`.
//!
//! One [`Metrics`] per application (an explicit registry, not a global
//! recorder, so several servers in one test process do not mix their
//! counts). Run and stage metrics are derived from the journal, not from
//! calls inside the core: when a run finishes, [`Metrics::observe_run`]
//! reads its transitions and records the outcome and the time spent in each
//! stage. Lease figures are read from the store at scrape time.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use retrain_adapters::http::RetryCount;
use retrain_adapters::store::{JobState, RemoteJob, Worker, WorkerState};
use retrain_core::domain::Lease;
use retrain_core::domain::RunId;
use retrain_core::journal::RunDetail;
use retrain_core::ports::RunStore;

/// Label sets: `(name, value)` pairs.
type Labels = Vec<(&'static str, String)>;

fn stage_histogram() -> Histogram {
    // 0.1 s … ~1.8 h: from a count query to a long training job.
    Histogram::new(exponential_buckets(0.1, 3.0, 11))
}

/// The engine's counters that the metrics mirror (`Engine::lock_takeovers`,
/// `Engine::metadata_reads_skipped`).
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineCounts {
    pub lock_takeovers: u64,
    pub metadata_reads_skipped: u64,
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    runs: Family<Labels, Counter>,
    stage_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    webhook_deliveries: Family<Labels, Counter>,
    http_requests: Family<Labels, Counter>,
    schedule_ticks: Family<Labels, Counter>,
    cycles_started: Family<Labels, Counter>,
    open_leases: Gauge,
    lease_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    workers: Family<Labels, Gauge>,
    queued_jobs: Family<Labels, Gauge>,
    queue_wait_seconds: Histogram,
    job_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    worker_events: Family<Labels, Counter>,
    lock_takeovers: Counter,
    metadata_reads_skipped: Counter,
    http_retries: Family<Labels, Counter>,
    /// Scrapes are serialised (the lease gauges are set, then encoded).
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("retrain");
        let runs = Family::<Labels, Counter>::default();
        registry.register("runs", "Runs finished, by outcome", runs.clone());
        let stage_seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(stage_histogram);
        registry.register(
            "stage_duration_seconds",
            "Time runs spent in each stage (from the journal)",
            stage_seconds.clone(),
        );
        let webhook_deliveries = Family::<Labels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Inbound webhook deliveries, by source and result",
            webhook_deliveries.clone(),
        );
        let http_requests = Family::<Labels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests, by route and status",
            http_requests.clone(),
        );
        let schedule_ticks = Family::<Labels, Counter>::default();
        registry.register(
            "schedule_ticks",
            "Schedule ticks, by result (fired, taken by another replica, failed)",
            schedule_ticks.clone(),
        );
        let cycles_started = Family::<Labels, Counter>::default();
        registry.register(
            "cycles_started",
            "Cycles started by this server, by trigger (http, webhook, schedule)",
            cycles_started.clone(),
        );
        let open_leases = Gauge::default();
        registry.register(
            "open_leases",
            "Leases (machines started for training) not yet released",
            open_leases.clone(),
        );
        let lease_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "open_lease_seconds",
            "Seconds the open leases have been held, summed",
            lease_seconds.clone(),
        );
        let workers = Family::<Labels, Gauge>::default();
        registry.register(
            "workers",
            "Registered workers, by state (read from the store at scrape time)",
            workers.clone(),
        );
        let queued_jobs = Family::<Labels, Gauge>::default();
        registry.register(
            "worker_jobs",
            "Worker jobs queued or held, by state (read from the store at scrape time)",
            queued_jobs.clone(),
        );
        let queue_wait_seconds = stage_histogram();
        registry.register(
            "worker_job_queue_wait_seconds",
            "Time worker jobs waited in the queue before a worker took them",
            queue_wait_seconds.clone(),
        );
        let job_seconds: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(stage_histogram);
        registry.register(
            "worker_job_duration_seconds",
            "Time from assignment to the worker's report, by result",
            job_seconds.clone(),
        );
        let worker_events = Family::<Labels, Counter>::default();
        registry.register(
            "worker_events",
            "Worker and job events made by this process (worker.registered|stale|removed, job.assigned|finished|failed|requeued|lost)",
            worker_events.clone(),
        );
        let lock_takeovers = Counter::default();
        registry.register(
            "lock_takeovers",
            "Label locks this server took over from an owner that never released them (expired, or its process gone)",
            lock_takeovers.clone(),
        );
        let metadata_reads_skipped = Counter::default();
        registry.register(
            "metadata_reads_skipped",
            "Dataset metadata reads that waiting labels skipped because another label of their prepare job read that round (poll.scout_max_gap)",
            metadata_reads_skipped.clone(),
        );
        let http_retries = Family::<Labels, Counter>::default();
        registry.register(
            "http_retries",
            "HTTP requests resent by the adapters of this process, by adapter and reason",
            http_retries.clone(),
        );
        Self {
            registry,
            lock_takeovers,
            metadata_reads_skipped,
            http_retries,
            workers,
            queued_jobs,
            queue_wait_seconds,
            job_seconds,
            worker_events,
            runs,
            stage_seconds,
            webhook_deliveries,
            http_requests,
            schedule_ticks,
            cycles_started,
            open_leases,
            lease_seconds,
            scrape: Mutex::new(()),
        }
    }

    pub fn webhook_delivery(&self, source: &str, result: &str) {
        self.webhook_deliveries
            .get_or_create(&vec![
                ("source", source.to_owned()),
                ("result", result.to_owned()),
            ])
            .inc();
    }

    /// `route` is the matched route template (`/v1/runs/{id}`), never the
    /// raw path, so the label set stays bounded.
    pub fn http_request(&self, route: &str, status: u16) {
        self.http_requests
            .get_or_create(&vec![
                ("route", route.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// A cycle this server started: `http` (`POST /v1/runs`), `webhook`
    /// or `schedule`.
    pub fn cycle_started(&self, trigger: &'static str) {
        self.cycles_started
            .get_or_create(&vec![("trigger", trigger.to_owned())])
            .inc();
    }

    /// Observe the runs (by id) that a cycle, a decision or a rollback
    /// drove, as [`Metrics::observe_run`] (those not finished are skipped).
    /// Metrics never fail a request: a run that cannot be read is logged.
    pub async fn observe_finished(
        &self,
        store: &dyn RunStore,
        runs: impl IntoIterator<Item = RunId>,
    ) {
        for run_id in runs {
            match store.run(&run_id).await {
                Ok(Some(detail)) => self.observe_run(&detail),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(run = %run_id, error = %e, "metrics: cannot read the run")
                }
            }
        }
    }

    pub fn schedule_tick(&self, result: &str) {
        self.schedule_ticks
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }

    /// Count a worker or job event (`worker.stale`, `job.assigned`…).
    pub fn worker_event(&self, event: &str) {
        self.worker_events
            .get_or_create(&vec![("event", event.to_owned())])
            .inc();
    }

    pub fn queue_wait(&self, seconds: f64) {
        self.queue_wait_seconds.observe(seconds);
    }

    pub fn job_duration(&self, result: &str, seconds: f64) {
        self.job_seconds
            .get_or_create(&vec![("result", result.to_owned())])
            .observe(seconds);
    }

    /// Set the worker and queue gauges from the store's rows (before
    /// [`Metrics::render`]).
    pub fn set_workers(&self, workers: &[Worker], queue: &[RemoteJob]) {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        for state in [
            WorkerState::Idle,
            WorkerState::Running,
            WorkerState::Draining,
            WorkerState::Stale,
        ] {
            let n = workers.iter().filter(|w| w.state == state).count();
            self.workers
                .get_or_create(&vec![("state", state.as_str().to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for state in [JobState::Queued, JobState::Assigned, JobState::Cancelling] {
            let n = queue.iter().filter(|j| j.state == state).count();
            self.queued_jobs
                .get_or_create(&vec![("state", state.as_str().to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Bring the counters kept elsewhere up to date (before
    /// [`Metrics::render`]): the engine's lock takeovers and skipped
    /// metadata reads, and the adapters' HTTP resends. All only grow, so
    /// each counter is advanced by the difference.
    pub fn set_counted_elsewhere(&self, engine: EngineCounts, retries: &[RetryCount]) {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        advance(&self.lock_takeovers, engine.lock_takeovers);
        advance(&self.metadata_reads_skipped, engine.metadata_reads_skipped);
        for retry in retries {
            let counter = self.http_retries.get_or_create(&vec![
                ("adapter", retry.adapter.to_owned()),
                ("reason", retry.reason.to_owned()),
            ]);
            advance(&counter, retry.count);
        }
    }

    /// Record a finished run: its outcome and, from consecutive journal
    /// lines, the time it spent in each stage it left.
    pub fn observe_run(&self, run: &RunDetail) {
        if !run.snapshot.is_done() {
            return;
        }
        let outcome = run
            .snapshot
            .outcome
            .as_ref()
            .map_or("unknown", |o| o.short());
        self.runs
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
        for (from, seconds) in stage_durations(run) {
            self.stage_seconds
                .get_or_create(&vec![("stage", from.to_owned())])
                .observe(seconds);
        }
    }

    /// The text exposition, with the lease gauges set from `leases` (the
    /// store's active leases) as of `now`.
    pub fn render(&self, leases: &[Lease], now: DateTime<Utc>) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.open_leases
            .set(i64::try_from(leases.len()).unwrap_or(i64::MAX));
        let held: f64 = leases
            .iter()
            .map(|l| (now - l.acquired_at).num_milliseconds().max(0) as f64 / 1000.0)
            .sum();
        self.lease_seconds.set(held);
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Advance `counter` to `total` (a total that only grows).
fn advance(counter: &Counter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// `(stage left, seconds spent in it)`: from the journal line that entered
/// a stage to the one that left it (lines that stay in a stage, such as
/// polls, do not split it).
pub fn stage_durations(run: &RunDetail) -> Vec<(&'static str, f64)> {
    let mut durations = Vec::new();
    let Some(first) = run.transitions.first() else {
        return durations;
    };
    let (mut stage, mut entered) = (first.to, first.at);
    for line in &run.transitions[1..] {
        if line.to != stage {
            let seconds = (line.at - entered).num_milliseconds().max(0) as f64 / 1000.0;
            durations.push((stage.as_str(), seconds));
            (stage, entered) = (line.to, line.at);
        }
    }
    durations
}

/// The `Content-Type` of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;
    use retrain_core::domain::{CycleId, Label, LabelCursor, RunId};
    use retrain_core::journal::{RunSummary, TransitionRecord};
    use retrain_core::machine::{LabelPlan, LabelRun, Outcome, PromoteMode, Stage, Trigger};

    fn detail(stages: &[(Stage, Stage, i64)], outcome: Option<Outcome>) -> RunDetail {
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let label = Label::new("dept").unwrap();
        let plan = LabelPlan {
            label: label.clone(),
            trigger: Trigger::Metadata { threshold: 1 },
            prepare: None,
            gate: None,
            leased: false,
            promote: PromoteMode::Auto,
            max_attempts: 1,
            max_step_retries: 1,
            poll_interval: std::time::Duration::from_secs(1),
            poll_timeout: std::time::Duration::from_secs(1),
            dry_run: false,
            approval_expires: retrain_core::machine::DEFAULT_APPROVAL_EXPIRES,
            dataset_check: false,
        };
        let mut snapshot = LabelRun::new(
            RunId::generate(),
            CycleId::generate(),
            plan,
            LabelCursor::default(),
        );
        snapshot.stage = stages.last().map_or(Stage::Created, |s| s.1);
        snapshot.outcome = outcome;
        RunDetail {
            summary: RunSummary {
                run_id: snapshot.run_id.clone(),
                cycle_id: snapshot.cycle_id.clone(),
                label,
                stage: snapshot.stage,
                outcome: "x".into(),
                started_at: t0,
                updated_at: t0,
            },
            transitions: stages
                .iter()
                .enumerate()
                .map(|(i, (from, to, secs))| TransitionRecord {
                    seq: i as u64 + 1,
                    at: t0 + chrono::Duration::seconds(*secs),
                    from: *from,
                    to: *to,
                    event: serde_json::json!({"event": "committed"}),
                    actions: serde_json::json!([]),
                })
                .collect(),
            snapshot,
        }
    }

    #[test]
    fn stage_durations_come_from_consecutive_journal_lines() {
        let run = detail(
            &[
                (Stage::Created, Stage::Counting, 0),
                (Stage::Counting, Stage::Training, 2),
                (Stage::Training, Stage::Training, 5),
                (Stage::Training, Stage::Done, 62),
            ],
            Some(Outcome::Trained { candidate: None }),
        );
        assert_eq!(
            stage_durations(&run),
            vec![("counting", 2.0), ("training", 60.0)]
        );
    }

    #[test]
    fn rendering_shows_runs_stages_webhooks_http_and_leases() {
        let metrics = Metrics::new();
        metrics.observe_run(&detail(
            &[
                (Stage::Created, Stage::Counting, 0),
                (Stage::Counting, Stage::Done, 3),
            ],
            Some(Outcome::Promoted {
                version: "2".into(),
            }),
        ));
        // An unfinished run is not counted.
        metrics.observe_run(&detail(&[(Stage::Created, Stage::Counting, 0)], None));
        metrics.webhook_delivery("github", "bad_signature");
        metrics.webhook_delivery("github", "bad_signature");
        metrics.http_request("/v1/hooks/github", 401);
        metrics.schedule_tick("fired");
        let text = metrics.render(&[], Utc::now());
        for line in [
            "retrain_runs_total{outcome=\"promoted\"} 1",
            "retrain_stage_duration_seconds_count{stage=\"counting\"} 1",
            "retrain_webhook_deliveries_total{source=\"github\",result=\"bad_signature\"} 2",
            "retrain_http_requests_total{route=\"/v1/hooks/github\",status=\"401\"} 1",
            "retrain_schedule_ticks_total{result=\"fired\"} 1",
            "retrain_open_leases 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("outcome=\"unknown\""), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn takeovers_and_retries_follow_the_totals_counted_elsewhere() {
        let metrics = Metrics::new();
        let retries = |hf, mlflow| {
            vec![
                RetryCount {
                    adapter: "hf",
                    reason: "http_5xx",
                    count: hf,
                },
                RetryCount {
                    adapter: "mlflow",
                    reason: "connect",
                    count: mlflow,
                },
            ]
        };
        let engine = |lock_takeovers, metadata_reads_skipped| EngineCounts {
            lock_takeovers,
            metadata_reads_skipped,
        };
        metrics.set_counted_elsewhere(engine(2, 40), &retries(3, 1));
        // A second scrape with the same totals adds nothing; new totals add
        // the difference.
        metrics.set_counted_elsewhere(engine(2, 40), &retries(3, 1));
        metrics.set_counted_elsewhere(engine(5, 90), &retries(7, 1));
        let text = metrics.render(&[], Utc::now());
        for line in [
            "retrain_lock_takeovers_total 5",
            "retrain_metadata_reads_skipped_total 90",
            "retrain_http_retries_total{adapter=\"hf\",reason=\"http_5xx\"} 7",
            "retrain_http_retries_total{adapter=\"mlflow\",reason=\"connect\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
