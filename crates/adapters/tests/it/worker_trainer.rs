//! The worker trainer over the real SQLite store: a test task plays the
//! `retrain worker` through the `JobQueue` API (lease, report), and the
//! engine drives whole cycles with it.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use retrain_adapters::json_registry::JsonRegistry;
use retrain_adapters::settings::WorkerTrainerConfig;
use retrain_adapters::store::{
    open_stores, JobLease, JobQueue, JobReport, JobState, NewWorker, Reported, ResourceRequest,
    Resources, Stores, WorkerState,
};
use retrain_adapters::worker_trainer::{RemoteJobs, WorkerTrainer};
use retrain_core::domain::{Candidate, JobKey, RunId, TrainingOutcome, VersionTag};
use retrain_core::engine::{CycleRequest, Engine};
use retrain_core::machine::Outcome;
use retrain_core::ports::{MetadataRead, MetadataStore, PortError, Trainer, TrainingRequest};
use retrain_core::report::LabelStatus;
use retrain_core::CancellationToken;

use crate::store_contract::{dataset, label, plan};

const FAST: Duration = Duration::from_millis(20);

fn config(gpus: Option<u32>, queue_timeout: Duration) -> WorkerTrainerConfig {
    WorkerTrainerConfig {
        request: ResourceRequest {
            gpus,
            ..ResourceRequest::default()
        },
        command: vec!["python".into(), "train.py".into()],
        env: Default::default(),
        timeout: Duration::from_secs(60),
        queue_timeout,
    }
}

async fn sqlite() -> (tempfile::TempDir, Stores) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/state.db", dir.path().display());
    (dir, open_stores(&url, Default::default()).await.unwrap())
}

fn request(run: &str, attempt: u32) -> TrainingRequest {
    let run_id = RunId(run.into());
    TrainingRequest {
        label: label("seg"),
        job_key: JobKey::training(&run_id, attempt),
        run_id,
        attempt,
        dataset_name: "owner/ds".into(),
        dataset_version: VersionTag("v1".into()),
        lease: None,
        first_start: false,
    }
}

async fn register(queue: &dyn JobQueue, id: &str, gpus: u32) {
    queue
        .register_worker(&NewWorker {
            worker_id: id.into(),
            name: id.into(),
            hostname: "test".into(),
            labels: vec![],
            resources: Resources {
                gpus,
                ..Resources::default()
            },
            version: "test".into(),
            registered_at: Utc::now(),
        })
        .await
        .unwrap();
}

/// Lease until a job comes (the worker's long poll, compressed).
async fn lease(queue: &dyn JobQueue, worker: &str) -> String {
    for _ in 0..500 {
        if let JobLease::Assigned(job) = queue.lease(worker, Utc::now()).await.unwrap() {
            return job.job_key;
        }
        tokio::time::sleep(FAST).await;
    }
    panic!("no job for {worker}")
}

fn candidate(id: &str) -> Candidate {
    Candidate {
        id: id.into(),
        metrics: [("dice".to_owned(), 0.93), ("iou".to_owned(), 0.88)].into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_is_idempotent_and_wait_returns_the_workers_result() {
    let (_dir, stores) = sqlite().await;
    let jobs = RemoteJobs::new(stores.jobs.clone());
    let trainer = WorkerTrainer::new(jobs.clone(), config(Some(1), Duration::from_secs(60)))
        .with_poll_interval(FAST);
    let req = request("r1", 1);
    let woken = jobs.enqueued.clone();
    let notified = woken.notified();
    let handle = trainer.start(&req).await.unwrap();
    // The server's long polls are woken by the enqueue.
    tokio::time::timeout(Duration::from_secs(1), notified)
        .await
        .expect("enqueue wakes the lease-job long polls");
    assert_eq!(trainer.start(&req).await.unwrap(), handle);
    assert_eq!(stores.jobs.jobs_of_run("r1").await.unwrap().len(), 1);
    let job = stores.jobs.job("r1/train/1").await.unwrap().unwrap();
    assert_eq!(job.spec.command, vec!["python", "train.py"]);
    assert_eq!(job.spec.dataset_version, "v1");
    assert_eq!(job.spec.request.gpus, Some(1));
    assert_eq!(job.spec.timeout_secs, 60);

    register(stores.jobs.as_ref(), "cpu", 0).await;
    register(stores.jobs.as_ref(), "gpu", 1).await;
    assert_eq!(
        stores.jobs.lease("cpu", Utc::now()).await.unwrap(),
        JobLease::NoneFits
    );
    let queue = stores.jobs.clone();
    let worker = tokio::spawn(async move {
        let key = lease(queue.as_ref(), "gpu").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        queue
            .report(
                &key,
                Some("gpu"),
                &JobReport::Finished(candidate("c-1")),
                Utc::now(),
            )
            .await
            .unwrap()
    });
    let outcome = trainer.wait(&req, &handle).await.unwrap();
    assert_eq!(outcome, TrainingOutcome::Finished(candidate("c-1")));
    assert_eq!(worker.await.unwrap(), Reported::Accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_losses_cancels_and_queue_timeouts() {
    let (_dir, stores) = sqlite().await;
    let jobs = RemoteJobs::new(stores.jobs.clone());
    let q = stores.jobs.as_ref();
    register(q, "w", 0).await;

    // A failure reported by the worker fails the training with its message.
    let trainer = WorkerTrainer::new(jobs.clone(), config(None, Duration::from_secs(60)))
        .with_poll_interval(FAST);
    let failing = request("r2", 1);
    let handle = trainer.start(&failing).await.unwrap();
    let key = lease(q, "w").await;
    q.report(
        &key,
        Some("w"),
        &JobReport::Failed {
            message: "CUDA out of memory".into(),
            exit_status: Some("exit status 1".into()),
        },
        Utc::now(),
    )
    .await
    .unwrap();
    let err = trainer.wait(&failing, &handle).await.unwrap_err();
    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    assert!(err.to_string().contains("CUDA out of memory"), "{err}");
    assert!(err.to_string().contains("worker w"), "{err}");

    // A worker gone stale: the job is lost.
    let lost = request("r3", 1);
    let handle = trainer.start(&lost).await.unwrap();
    lease(q, "w").await;
    q.heartbeat(
        "w",
        WorkerState::Running,
        None,
        Utc::now() - chrono::Duration::seconds(120),
    )
    .await
    .unwrap();
    q.mark_stale(Utc::now() - chrono::Duration::seconds(60), Utc::now())
        .await
        .unwrap();
    let TrainingOutcome::Lost { reason } = trainer.wait(&lost, &handle).await.unwrap() else {
        panic!("a stale worker's job is lost")
    };
    assert!(reason.contains("stopped sending heartbeats"), "{reason}");

    // Cancel: a queued job leaves the queue.
    let cancelled = request("r4", 1);
    let handle = trainer.start(&cancelled).await.unwrap();
    trainer.cancel(&handle).await.unwrap();
    assert_eq!(
        q.job("r4/train/1").await.unwrap().unwrap().state,
        JobState::Failed
    );

    // Nobody fits within queue_timeout: the label fails naming the request,
    // and the job is out of the queue.
    let picky = WorkerTrainer::new(jobs.clone(), config(Some(8), Duration::from_millis(300)))
        .with_poll_interval(FAST);
    let waiting = request("r5", 1);
    let handle = picky.start(&waiting).await.unwrap();
    let err = picky.wait(&waiting, &handle).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("no worker with gpu≥8"), "{text}");
    assert!(text.contains("queue_timeout (300ms)"), "{text}");
    assert!(q.queue().await.unwrap().is_empty());
}

// ---- Engine-level: whole cycles with the worker trainer ----

#[derive(Debug)]
struct Published;

#[async_trait::async_trait]
impl MetadataStore for Published {
    async fn read(&self, _known: Option<String>) -> Result<MetadataRead, PortError> {
        Ok(MetadataRead::Published(dataset("v1", 100)))
    }
    fn describe(&self) -> String {
        "fake metadata".into()
    }
}

fn engine(stores: &Stores, dir: &tempfile::TempDir, max_attempts: u32) -> Engine {
    let mut plan = plan("seg");
    plan.max_attempts = max_attempts;
    plan.gate = Some(retrain_core::gate::GatePolicy::seed_default());
    let trainer = WorkerTrainer::new(
        RemoteJobs::new(stores.jobs.clone()),
        config(None, Duration::from_secs(60)),
    )
    .with_poll_interval(FAST);
    crate::common::one_label_engine(
        stores.runs.clone(),
        plan,
        Arc::new(Published),
        Arc::new(trainer),
        Some(Arc::new(JsonRegistry::open(
            dir.path().join("registry.json"),
            "seg-model".into(),
        ))),
    )
}

/// The worker's side of one job: lease, then report what `act` says.
async fn play_worker(
    queue: Arc<dyn JobQueue>,
    worker: &'static str,
    report: Option<JobReport>,
) -> String {
    let key = lease(queue.as_ref(), worker).await;
    queue.append_log(&key, worker, "epoch 1/1\n").await.unwrap();
    match report {
        Some(report) => {
            assert_eq!(
                queue
                    .report(&key, Some(worker), &report, Utc::now())
                    .await
                    .unwrap(),
                Reported::Accepted
            );
        }
        // The worker dies: its heartbeat stops and the sweep declares it
        // stale.
        None => {
            queue
                .heartbeat(
                    worker,
                    WorkerState::Running,
                    Some(&key),
                    Utc::now() - chrono::Duration::seconds(300),
                )
                .await
                .unwrap();
            let sweep = queue
                .mark_stale(Utc::now() - chrono::Duration::seconds(60), Utc::now())
                .await
                .unwrap();
            assert_eq!(sweep.lost_jobs, vec![key.clone()]);
        }
    }
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_trains_on_a_worker_and_promotes() {
    let (dir, stores) = sqlite().await;
    register(stores.jobs.as_ref(), "w1", 0).await;
    let engine = engine(&stores, &dir, 2);
    let worker = tokio::spawn(play_worker(
        stores.jobs.clone(),
        "w1",
        Some(JobReport::Finished(candidate("c-1"))),
    ));
    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    let seg = &report.labels[0];
    assert_eq!(seg.status, LabelStatus::Promoted, "{:?}", seg.error);
    assert_eq!(seg.candidate.as_ref().unwrap().id, "c-1");
    let key = worker.await.unwrap();
    let run = seg.run_id.clone().unwrap();
    assert_eq!(key, format!("{run}/train/1"));
    let jobs = stores.jobs.jobs_of_run(run.as_str()).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].log_tail, "epoch 1/1\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_job_is_attempted_again_and_promotes() {
    let (dir, stores) = sqlite().await;
    register(stores.jobs.as_ref(), "dies", 0).await;
    let engine = engine(&stores, &dir, 2);
    let queue = stores.jobs.clone();
    let workers = tokio::spawn(async move {
        let first = play_worker(queue.clone(), "dies", None).await;
        register(queue.as_ref(), "lives", 0).await;
        let second = play_worker(queue, "lives", Some(JobReport::Finished(candidate("c-2")))).await;
        (first, second)
    });
    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    let seg = &report.labels[0];
    assert_eq!(seg.status, LabelStatus::Promoted, "{:?}", seg.error);
    assert_eq!(seg.lost_attempts.len(), 1, "{:?}", seg.lost_attempts);
    let (first, second) = workers.await.unwrap();
    let run = seg.run_id.clone().unwrap();
    assert_eq!(first, format!("{run}/train/1"));
    assert_eq!(second, format!("{run}/train/2"));
    let states: Vec<JobState> = stores
        .jobs
        .jobs_of_run(run.as_str())
        .await
        .unwrap()
        .iter()
        .map(|j| j.state)
        .collect();
    assert_eq!(states, vec![JobState::Lost, JobState::Finished]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_jobs_stop_at_max_attempts() {
    let (dir, stores) = sqlite().await;
    let engine = engine(&stores, &dir, 2);
    let queue = stores.jobs.clone();
    let workers = tokio::spawn(async move {
        for worker in ["one", "two"] {
            register(queue.as_ref(), worker, 0).await;
            play_worker(queue.clone(), worker, None).await;
        }
    });
    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    workers.await.unwrap();
    let seg = &report.labels[0];
    assert_eq!(seg.status, LabelStatus::Failed);
    assert_eq!(seg.lost_attempts.len(), 2, "{:?}", seg.lost_attempts);
    assert!(!matches!(seg.outcome, Some(Outcome::Promoted { .. })));
    let run = seg.run_id.clone().unwrap();
    // No third job was ever enqueued.
    assert_eq!(
        stores.jobs.jobs_of_run(run.as_str()).await.unwrap().len(),
        2
    );
}
