//! Whole-cycle benchmark (§11): N labels through count → prepare (one shared
//! restart) → await dataset → train → gate → promote → commit, with a real
//! `RunStore` (SQLite in a temp dir, or `RETRAIN_BENCH_STATE`), concurrency 64
//! (or `RETRAIN_BENCH_PARALLEL`).
//!
//!     cargo bench -p retrain-adapters --bench cycle -- 1000
//!     cargo bench -p retrain-adapters --bench cycle -- 10000 --hub
//!
//! Two sets of fakes: in-memory ports (default; the dataset appears the
//! moment the prepare job restarts, poll interval 1 ms), or `--hub`: the
//! metadata and the shared prepare Space go over HTTP to the stateful fake
//! Hub (`testing::fake_hub`, loopback), one dataset repo per label, all
//! published 0.5 s after the prepare restart, poll interval 10 ms (the
//! issue-11 comparison's setup; trainer and registry stay in memory).
//!
//! `--hub-trainer` (with `--hub`): each label's trainer is a retrain Space
//! on the fake Hub too (`bench/train-{i}`, seed 000: `DATASET_VERSION` set,
//! the Space restarted, and that is the whole job), so the request counts
//! include what training costs over HTTP, as in the comparison.
//! The in-memory trainer still records each start (the reaction latency).
//!
//! `--no-gate`: no quality gate and no registry (`gate` unset): a label
//! ends `trained` once its training finishes, as in the issue-11
//! comparison ("gate none") and the seed-000 Python orchestrator, which
//! restarts the training and stops there. Without it every label is gated
//! against the (empty) production model and promoted.
//!
//! `--no-scout`: every waiting label reads its metadata every round
//! (`poll_scout_max_gap` zero) instead of one scout read per round for the
//! labels of the shared prepare job.
//!
//! Prints wall time, durable store writes per label (journal writes, lease
//! records), HTTP requests per label (`--hub`), peak RSS (VmHWM), and the
//! phases: when the shared prepare job restarted (the end of phase one),
//! the first training start, the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_adapters::hf::{HfMetadataStore, HfSpaceController, HfSpaceTrainer};
use retrain_adapters::store::{open_run_store, StoreOptions};
use retrain_adapters::testing::fake_hub::FakeHub;
use retrain_core::domain::*;
use retrain_core::engine::{CycleRequest, Engine, EngineSettings, LabelBinding};
use retrain_core::gate::GatePolicy;
use retrain_core::journal::{
    JournalEntry, LabelStart, LabelStatusRow, PromotionEvent, RequestClaim, RunDetail, RunFilter,
    RunPage, RunSummary, Transition,
};
use retrain_core::machine::LabelRun;
use retrain_core::machine::{LabelPlan, PromoteMode, Trigger};
use retrain_core::ports::*;
use retrain_core::report::LabelStatus;
use retrain_core::CancellationToken;

struct Counts;
#[async_trait]
impl CountSource for Counts {
    async fn counts(&self, _: DateTime<Utc>) -> Result<BTreeMap<Label, FeedbackCounts>, PortError> {
        Ok(BTreeMap::new())
    }
}

/// Every label's dataset; `v2` appears once the shared prepare job restarts.
#[derive(Clone, Default)]
struct Hub {
    restarted: Arc<Mutex<bool>>,
}

struct Metadata(Hub);
#[async_trait]
impl MetadataStore for Metadata {
    async fn read(&self, _: Option<String>) -> Result<MetadataRead, PortError> {
        let tag = if *self.0.restarted.lock().unwrap() {
            "v2"
        } else {
            "v1"
        };
        Ok(MetadataRead::Published(DatasetVersion {
            metadata: DatasetMetadata {
                dataset_name: "bench".into(),
                version_tag: VersionTag::new(tag),
                num_samples: 1000,
                created_at: DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap(),
                splits: None,
                extra: Default::default(),
            },
            revision: None,
        }))
    }
    fn describe(&self) -> String {
        "bench".into()
    }
}

struct Prepare(Hub);
#[async_trait]
impl SpaceController for Prepare {
    async fn restart(&self, _intent: &JobKey) -> Result<(), PortError> {
        *self.0.restarted.lock().unwrap() = true;
        Ok(())
    }
    async fn stage(&self) -> Result<SpaceStage, PortError> {
        Ok(SpaceStage::Running)
    }
    fn describe(&self) -> String {
        "bench".into()
    }
}

/// The trainer, recording when each training started (for the reaction
/// latency: publication → training start).
#[derive(Default)]
struct Train {
    started: Mutex<Vec<Instant>>,
}
#[async_trait]
impl Trainer for Train {
    async fn start(&self, _: &TrainingRequest) -> Result<TrainingHandle, PortError> {
        self.started.lock().unwrap().push(Instant::now());
        Ok(TrainingHandle {
            kind: "bench".into(),
            data: serde_json::Value::Null,
        })
    }
    async fn wait(
        &self,
        _: &TrainingRequest,
        _: &TrainingHandle,
    ) -> Result<TrainingOutcome, PortError> {
        Ok(bench_candidate())
    }
    async fn cancel(&self, _: &TrainingHandle) -> Result<(), PortError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "bench".into()
    }
}

/// A label's retrain Space on the fake Hub (`--hub-trainer`), recording
/// each start like [`Train`]; its outcome carries the metrics the gate
/// needs (a seed-000 Space reports none).
struct SpaceTrain {
    space: HfSpaceTrainer,
    record: Arc<Train>,
}
#[async_trait]
impl Trainer for SpaceTrain {
    async fn start(&self, request: &TrainingRequest) -> Result<TrainingHandle, PortError> {
        self.record.start(request).await?;
        self.space.start(request).await
    }
    async fn wait(
        &self,
        request: &TrainingRequest,
        handle: &TrainingHandle,
    ) -> Result<TrainingOutcome, PortError> {
        self.space.wait(request, handle).await?;
        Ok(bench_candidate())
    }
    async fn cancel(&self, handle: &TrainingHandle) -> Result<(), PortError> {
        self.space.cancel(handle).await
    }
    fn describe(&self) -> String {
        self.space.describe()
    }
    fn start_is_the_job(&self) -> bool {
        self.space.start_is_the_job()
    }
}

fn bench_candidate() -> TrainingOutcome {
    TrainingOutcome::Finished(Candidate {
        id: "c".into(),
        metrics: [("dice".to_string(), 0.9), ("iou".to_string(), 0.8)]
            .into_iter()
            .collect(),
    })
}

struct Registry;
#[async_trait]
impl ModelRegistry for Registry {
    async fn production(&self, _: Option<Lease>) -> Result<Option<ProductionModel>, PortError> {
        Ok(None)
    }
    async fn candidate_metrics(&self, _: String, _: Option<Lease>) -> Result<Metrics, PortError> {
        Ok(Metrics::new())
    }
    async fn promote(
        &self,
        _: Candidate,
        _: RunId,
        _: Option<Lease>,
    ) -> Result<PromotedVersion, PortError> {
        Ok(PromotedVersion {
            version: "1".into(),
            previous: None,
        })
    }
    async fn version_exists(&self, version: String, _: Option<Lease>) -> Result<bool, PortError> {
        Ok(version == "1")
    }
    async fn roll_back(
        &self,
        rollback: RegistryRollback,
        _: Option<Lease>,
    ) -> Result<PromotedVersion, PortError> {
        // The bench never rolls back; a registry with one version has
        // nothing to roll back to.
        Err(PortError::NotFound(format!(
            "bench registry has no version {} to roll back to",
            rollback.version
        )))
    }
    fn describe(&self) -> String {
        "bench".into()
    }
}

/// The real store, counting the writes that must be durable before the
/// engine goes on (each one is a commit, or a share of a group commit),
/// the lock calls and the reads. It forwards *every* method, those with a
/// default included: a default left in place here would answer with the
/// trait's label-by-label fallback instead of the store's one statement
/// (until 2026-12-04 the metrics-history read did, three statements per
/// gated label instead of one).
struct CountingStore {
    inner: Arc<dyn RunStore>,
    writes: AtomicU64,
    /// Lock calls: acquisitions, releases of their own, renewals.
    lock_calls: AtomicU64,
    /// Read calls (each one statement on the SQL stores).
    reads: AtomicU64,
}

impl CountingStore {
    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
    fn locked(&self) {
        self.lock_calls.fetch_add(1, Ordering::Relaxed);
    }
    fn read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl RunStore for CountingStore {
    async fn try_lock(
        &self,
        label: &Label,
        owner: &LockOwner,
        ttl: Duration,
    ) -> Result<LockOutcome, StoreError> {
        self.locked();
        self.inner.try_lock(label, owner, ttl).await
    }
    async fn renew_lock(
        &self,
        label: &Label,
        fence: &Fence,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.locked();
        self.inner.renew_lock(label, fence, ttl).await
    }
    async fn renew_locks(
        &self,
        held: &[(Label, Fence)],
        ttl: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        self.locked();
        self.inner.renew_locks(held, ttl).await
    }
    async fn release_lock(&self, label: &Label, fence: &Fence) -> Result<(), StoreError> {
        self.locked();
        self.inner.release_lock(label, fence).await
    }
    async fn cursor(&self, label: &Label) -> Result<LabelCursor, StoreError> {
        self.read();
        self.inner.cursor(label).await
    }
    async fn cursors(&self, labels: &[Label]) -> Result<Vec<LabelCursor>, StoreError> {
        self.read();
        self.inner.cursors(labels).await
    }
    async fn unfinished_run(&self, label: &Label) -> Result<Option<LabelRun>, StoreError> {
        self.read();
        self.inner.unfinished_run(label).await
    }
    async fn label_start(&self, label: &Label) -> Result<LabelStart, StoreError> {
        self.read();
        self.inner.label_start(label).await
    }
    async fn record(&self, transition: &Transition, fence: &Fence) -> Result<(), StoreError> {
        self.wrote();
        self.inner.record(transition, fence).await
    }
    async fn record_all(
        &self,
        transitions: &[Transition],
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.wrote();
        self.inner.record_all(transitions, fence).await
    }
    async fn finish(
        &self,
        transition: &Transition,
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.wrote();
        self.inner.finish(transition, cursor, fence).await
    }
    async fn finish_all(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.wrote();
        self.inner.finish_all(transitions, cursor, fence).await
    }
    async fn finish_and_unlock(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.wrote();
        self.inner
            .finish_and_unlock(transitions, cursor, fence)
            .await
    }
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        self.read();
        self.inner.list_runs(filter).await
    }
    async fn list_runs_page(&self, page: &RunPage) -> Result<Vec<RunSummary>, StoreError> {
        self.read();
        self.inner.list_runs_page(page).await
    }
    async fn label_statuses(&self, labels: &[Label]) -> Result<Vec<LabelStatusRow>, StoreError> {
        self.read();
        self.inner.label_statuses(labels).await
    }
    async fn promotions(&self, label: &Label) -> Result<Vec<PromotionEvent>, StoreError> {
        self.read();
        self.inner.promotions(label).await
    }
    async fn run(&self, run_id: &RunId) -> Result<Option<RunDetail>, StoreError> {
        self.read();
        self.inner.run(run_id).await
    }
    async fn runs_with_verdict(
        &self,
        label: &Label,
        limit: Option<usize>,
    ) -> Result<Vec<(DateTime<Utc>, LabelRun)>, StoreError> {
        self.read();
        self.inner.runs_with_verdict(label, limit).await
    }
    async fn run_snapshots(&self, run_ids: &[RunId]) -> Result<Vec<LabelRun>, StoreError> {
        self.read();
        self.inner.run_snapshots(run_ids).await
    }
    async fn put_lease(&self, lease: &Lease, fence: &Fence) -> Result<(), StoreError> {
        self.wrote();
        self.inner.put_lease(lease, fence).await
    }
    async fn put_lease_unfenced(&self, lease: &Lease) -> Result<(), StoreError> {
        self.wrote();
        self.inner.put_lease_unfenced(lease).await
    }
    async fn active_leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.read();
        self.inner.active_leases().await
    }
    async fn lock_holder(&self, label: &Label) -> Result<Option<String>, StoreError> {
        self.read();
        self.inner.lock_holder(label).await
    }
    async fn journal_after(
        &self,
        after: u64,
        label: Option<Label>,
        limit: u32,
    ) -> Result<Vec<JournalEntry>, StoreError> {
        self.read();
        self.inner.journal_after(after, label, limit).await
    }
    async fn journal_end(&self) -> Result<u64, StoreError> {
        self.read();
        self.inner.journal_end().await
    }
    async fn claim_request(
        &self,
        key: &str,
        fingerprint: &str,
    ) -> Result<RequestClaim, StoreError> {
        self.wrote();
        self.inner.claim_request(key, fingerprint).await
    }
    async fn complete_request(&self, key: &str, response: &str) -> Result<(), StoreError> {
        self.wrote();
        self.inner.complete_request(key, response).await
    }
    async fn release_request(&self, key: &str) -> Result<(), StoreError> {
        self.wrote();
        self.inner.release_request(key).await
    }
}

/// The in-memory metadata and prepare job, or the same over the fake Hub.
struct Sources {
    metadata: Vec<Arc<dyn MetadataStore>>,
    prepare: Arc<RecordRestart>,
    poll_interval: Duration,
    /// From the prepare job's restart to the publication of every label's
    /// new version.
    publication_delay: Duration,
    hub: Option<FakeHub>,
    /// Each label's retrain Space (`--hub-trainer`), else empty.
    train_spaces: Vec<HfSpaceTrainer>,
}

/// The prepare job's controller, recording when it was first restarted.
struct RecordRestart {
    inner: Arc<dyn SpaceController>,
    restarted_at: OnceLock<Instant>,
}

impl RecordRestart {
    fn new(inner: Arc<dyn SpaceController>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            restarted_at: OnceLock::new(),
        })
    }
}

#[async_trait]
impl SpaceController for RecordRestart {
    async fn restart(&self, intent: &JobKey) -> Result<(), PortError> {
        self.restarted_at.get_or_init(Instant::now);
        self.inner.restart(intent).await
    }
    async fn stage(&self) -> Result<SpaceStage, PortError> {
        self.inner.stage().await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

const PREPARE_SPACE: &str = "bench/prepare";
/// How long after its restart the fake Hub's prepare job publishes.
const PUBLICATION_DELAY: Duration = Duration::from_millis(500);
const METADATA_FILE: &str = "dataset_metadata.json";

fn metadata_json(repo: &str, tag: &str) -> serde_json::Value {
    serde_json::json!({
        "dataset_name": repo,
        "version_tag": tag,
        "num_samples": 1000,
        "created_at": "2025-10-30T11:53:01Z",
    })
}

async fn sources(labels: usize, over_hub: bool, hub_trainer: bool) -> Sources {
    if !over_hub {
        let hub = Hub::default();
        let metadata: Arc<dyn MetadataStore> = Arc::new(Metadata(hub.clone()));
        return Sources {
            metadata: vec![metadata; labels],
            prepare: RecordRestart::new(Arc::new(Prepare(hub))),
            poll_interval: Duration::from_millis(1),
            publication_delay: Duration::ZERO,
            hub: None,
            train_spaces: Vec::new(),
        };
    }
    let hub = FakeHub::start().await;
    hub.add_space(PREPARE_SPACE, "RUNNING");
    let client = hub.client();
    let metadata = (0..labels)
        .map(|i| {
            let repo = format!("bench/ds-{i}");
            hub.add_dataset(&repo, METADATA_FILE, Some(metadata_json(&repo, "v1")));
            hub.on_restart_publish(
                PREPARE_SPACE,
                &repo,
                METADATA_FILE,
                metadata_json(&repo, "v2"),
                PUBLICATION_DELAY,
            );
            let url = hub.metadata_url(&repo, METADATA_FILE);
            Arc::new(HfMetadataStore::from_url(client.clone(), &url).unwrap())
                as Arc<dyn MetadataStore>
        })
        .collect();
    let train_spaces = if hub_trainer {
        (0..labels)
            .map(|i| {
                let space = format!("bench/train-{i}");
                hub.add_space(&space, "RUNNING");
                HfSpaceTrainer::new(client.clone(), &space, None).unwrap()
            })
            .collect()
    } else {
        Vec::new()
    };
    let prepare = Arc::new(HfSpaceController::new(client, PREPARE_SPACE, false).unwrap());
    Sources {
        metadata,
        prepare: RecordRestart::new(prepare),
        poll_interval: Duration::from_millis(10),
        publication_delay: PUBLICATION_DELAY,
        hub: Some(hub),
        train_spaces,
    }
}

/// The fake Hub's requests by kind, per label: what each one is for.
fn request_breakdown(hub: &FakeHub, labels: usize) -> String {
    let mut kinds = BTreeMap::<String, usize>::new();
    for request in hub.requests() {
        let kind = if request.path.contains("/resolve/") {
            format!("metadata {}", request.method)
        } else {
            let action = request.path.rsplit('/').next().unwrap_or_default();
            let space = if request.path.contains(PREPARE_SPACE) {
                "prepare"
            } else {
                "trainer"
            };
            format!("{space} {} {action}", request.method)
        };
        *kinds.entry(kind).or_default() += 1;
    }
    let not_modified: u64 = (0..labels)
        .map(|i| hub.metadata_not_modified(&format!("bench/ds-{i}")))
        .sum();
    let mut out: Vec<String> = kinds
        .iter()
        .map(|(kind, n)| format!("{kind} {:.2}", *n as f64 / labels as f64))
        .collect();
    out.push(format!(
        "(of the metadata GETs, 304 Not Modified {:.2})",
        not_modified as f64 / labels as f64
    ));
    out.join(", ")
}

/// Reaction latency (the prepare job's publication → each label's training
/// start), median, p99 and max over the labels, in ms; the median alone
/// first, for the summary line.
fn reaction_ms(sources: &Sources, train: &Train) -> String {
    let Some(restarted) = sources.prepare.restarted_at.get() else {
        return "-".into();
    };
    let published = *restarted + sources.publication_delay;
    let mut reactions: Vec<f64> = train
        .started
        .lock()
        .unwrap()
        .iter()
        .map(|started| started.saturating_duration_since(published).as_secs_f64() * 1000.0)
        .collect();
    if reactions.is_empty() {
        return "-".into();
    }
    reactions.sort_by(f64::total_cmp);
    let at = |q: f64| reactions[((reactions.len() - 1) as f64 * q).round() as usize];
    eprintln!(
        "reaction (publication → training start): median {:.1} ms | p99 {:.1} ms | max {:.1} ms over {} labels",
        at(0.5),
        at(0.99),
        at(1.0),
        reactions.len()
    );
    format!("{:.1}", at(0.5))
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() {
    let labels: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let over_hub = std::env::args().any(|a| a == "--hub");
    let gated = !std::env::args().any(|a| a == "--no-gate");
    let expected = if gated {
        LabelStatus::Promoted
    } else {
        LabelStatus::Trained
    };
    let scout_max_gap = if std::env::args().any(|a| a == "--no-scout") {
        Duration::ZERO
    } else {
        retrain_core::engine::DEFAULT_POLL_SCOUT_MAX_GAP
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        // RETRAIN_BENCH_STATE overrides the store (e.g. a Postgres URL, or
        // `sqlite::memory:` to separate engine cost from storage cost).
        let url = std::env::var("RETRAIN_BENCH_STATE")
            .unwrap_or_else(|_| format!("sqlite://{}", dir.path().join("state.db").display()));
        let inner = open_run_store(&url, StoreOptions::default())
            .await
            .unwrap();
        let store = Arc::new(CountingStore {
            inner,
            writes: AtomicU64::new(0),
            lock_calls: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        });
        let hub_trainer = std::env::args().any(|a| a == "--hub-trainer");
        assert!(!hub_trainer || over_hub, "--hub-trainer needs --hub");
        let sources = sources(labels, over_hub, hub_trainer).await;
        let train = Arc::new(Train::default());
        let trainer: Arc<dyn Trainer> = train.clone();
        let registry: Arc<dyn ModelRegistry> = Arc::new(Registry);
        let bindings: Vec<LabelBinding> = (0..labels)
            .zip(&sources.metadata)
            .map(|(i, metadata)| LabelBinding {
                plan: LabelPlan {
                    label: Label::new(format!("label-{i}")).unwrap(),
                    trigger: Trigger::Metadata { threshold: 1 },
                    prepare: Some("shared".into()),
                    gate: gated.then(GatePolicy::seed_default),
                    leased: false,
                    promote: PromoteMode::Auto,
                    max_attempts: 2,
                    max_step_retries: 5,
                    poll_interval: sources.poll_interval,
                    poll_timeout: Duration::from_secs(600),
                    dry_run: false,
                    approval_expires: retrain_core::machine::DEFAULT_APPROVAL_EXPIRES,
                    dataset_check: false,
                },
                metadata: metadata.clone(),
                prepare: Some(sources.prepare.clone() as Arc<dyn SpaceController>),
                trainer: match sources.train_spaces.get(i) {
                    Some(space) => Arc::new(SpaceTrain {
                        space: space.clone(),
                        record: train.clone(),
                    }),
                    None => trainer.clone(),
                },
                registry: gated.then(|| registry.clone()),
                lease: None,
                notifiers: Vec::new(),
                train_timeout: Duration::from_secs(60),
                dataset_check: None,
            })
            .collect();
        let engine = Engine::new(
            store.clone(),
            Some(Arc::new(Counts)),
            bindings,
            EngineSettings {
                // RETRAIN_BENCH_PARALLEL: labels in flight (64 unless set).
                max_parallel_labels: std::env::var("RETRAIN_BENCH_PARALLEL")
                    .ok()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(64),
                // RETRAIN_BENCH_LOCK_TTL_MS: a shorter lock_ttl shows at a
                // few thousand labels what the default shows at 10,000.
                lock_ttl: std::env::var("RETRAIN_BENCH_LOCK_TTL_MS")
                    .ok()
                    .and_then(|ms| ms.parse().ok())
                    .map_or(retrain_core::engine::DEFAULT_LOCK_TTL, Duration::from_millis),
                poll_scout_max_gap: scout_max_gap,
                ..EngineSettings::default()
            },
        );
        let started = Instant::now();
        let report = engine
            .run_cycle(CycleRequest::default(), CancellationToken::new())
            .await
            .unwrap();
        let elapsed = started.elapsed();
        if let Some(restarted) = sources.prepare.restarted_at.get() {
            let first_start = train.started.lock().unwrap().iter().min().copied();
            eprintln!(
                "phases: prepare restarted at {:.1} ms, first training start at {} ms, end at {:.1} ms",
                restarted.duration_since(started).as_secs_f64() * 1000.0,
                first_start.map_or("-".into(), |t| format!(
                    "{:.1}",
                    t.duration_since(started).as_secs_f64() * 1000.0
                )),
                elapsed.as_secs_f64() * 1000.0,
            );
        }
        // Promoted (gated) or trained (`--no-gate`): every label's expected end.
        let promoted = report
            .labels
            .iter()
            .filter(|l| l.status == expected)
            .count();
        let mut statuses = BTreeMap::<String, usize>::new();
        for label in &report.labels {
            *statuses.entry(format!("{:?}", label.status)).or_default() += 1;
        }
        let mut errors = BTreeMap::<String, usize>::new();
        for label in report.labels.iter().filter(|l| l.status != expected) {
            let error = label.error.as_deref().unwrap_or("-").replace(label.label.as_str(), "L");
            *errors.entry(error).or_default() += 1;
        }
        for (error, n) in &errors {
            eprintln!("not promoted: {n} x {error}");
        }
        assert_eq!(
            promoted,
            labels,
            "every label should end {expected:?}; statuses {statuses:?}, first other: {:?}",
            report
                .labels
                .iter()
                .find(|l| l.status != expected)
                .map(|l| (&l.label, &l.status, &l.error))
        );
        if let Some(hub) = &sources.hub {
            eprintln!("requests: {}", request_breakdown(hub, labels));
        }
        let reaction = reaction_ms(&sources, &train);
        let writes = store.writes.load(Ordering::Relaxed);
        let lock_calls = store.lock_calls.load(Ordering::Relaxed);
        let reads = store.reads.load(Ordering::Relaxed);
        let requests = sources
            .hub
            .as_ref()
            .map_or(String::from("-"), |hub| {
                format!("{:.2}", hub.requests().len() as f64 / labels as f64)
            });
        println!(
            "labels={labels} gate={} wall={:.3}s per_label={:.3}ms {}={promoted} writes_per_label={:.2} lock_calls_per_label={:.2} reads_per_label={:.2} requests_per_label={requests} reaction_median_ms={reaction} peak_rss={:.1}MiB",
            if gated { "seed-default" } else { "none" },
            elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1000.0 / labels as f64,
            if gated { "promoted" } else { "trained" },
            writes as f64 / labels as f64,
            lock_calls as f64 / labels as f64,
            reads as f64 / labels as f64,
            peak_rss_mib()
        );
    });
}
