//! Remote workers (`retrain worker`) and their jobs: registration,
//! heartbeats, the `lease-job` long poll, log chunks, results, listing and
//! cleanup (the contract is in `docs/server.md`, "Workers").
//!
//! **Invariants** (the store enforces them, see `store/jobs.rs`): a job is
//! handed to one live worker that fits it, at most one job per worker; only
//! the worker holding a job may append to its log or report on it, so a
//! stale worker's late result is `409 job_not_awaited`; a drain cancel puts
//! the job back under the same key without using an attempt. A worker past
//! `[server] worker_ttl` is marked stale (its job lost) by [`sweep_stale`],
//! every `worker_ttl / 4`, on every replica (the sweep is idempotent).
//!
//! Worker and job events (`worker.registered|stale|removed`,
//! `job.queued|assigned|finished|failed|requeued|lost`) are written by the
//! store in the transaction of the change they report, with positions from
//! the journal's counter, and sent on `GET /v1/events` between the runs'
//! own events (see `routes/events.rs`). Here they are also logged with
//! `tracing` and counted in `retrain_worker_events`, once, by the process
//! that made the change.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use retrain_adapters::store::{
    new_worker_id, JobLease, JobReport, NewWorker, RemoteJob, Reported, Resources, Worker,
    WorkerState,
};
use retrain_core::domain::RunId;
use retrain_core::CancellationToken;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::{body, parse_body, AdminScope, Authorized, ReadScope, WorkerScope};
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// Default and largest `wait_secs` of `lease-job`.
const DEFAULT_WAIT_SECS: u32 = 25;
const MAX_WAIT_SECS: u32 = 60;
/// How often a long poll re-reads the queue for jobs enqueued by another
/// replica (this process's enqueues wake it at once).
const RECHECK: Duration = Duration::from_millis(500);
/// Longest worker name, hostname, version and label list accepted.
const MAX_TEXT: usize = 256;
const MAX_LABELS: usize = 256;

fn worker_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "worker_not_found",
        format!("no worker {id}: register again with POST /v1/workers"),
    )
}

fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

fn check_text(field: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() || value.len() > MAX_TEXT || value.chars().any(char::is_control) {
        return Err(invalid(
            "invalid_worker",
            format!("`{field}` must be 1..={MAX_TEXT} printable characters"),
        ));
    }
    Ok(())
}

/// `POST /v1/workers`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    name: String,
    hostname: String,
    #[serde(default)]
    labels: Vec<String>,
    resources: Resources,
    version: String,
}

fn worker_json(worker: &Worker) -> Value {
    json!({
        "worker_id": worker.worker_id,
        "name": worker.name,
        "hostname": worker.hostname,
        "labels": worker.labels,
        "resources": worker.resources,
        "version": worker.version,
        "state": worker.state,
        "job_key": worker.job_key,
        "registered_at": worker.registered_at,
        "last_heartbeat_at": worker.last_heartbeat_at,
    })
}

#[utoipa::path(
    post,
    path = "/v1/workers",
    tag = "workers",
    request_body(content = Object, content_type = "application/json", description = "`{name, hostname, labels?, resources, version}`"),
    security(("bearer" = ["worker"])),
    responses(
        (status = 201, description = "`{worker_id, heartbeat_interval_secs, worker_ttl_secs}`", body = Object),
        (status = 422, description = "`invalid_worker`: the registration is malformed", body = ErrorBody),
    )
)]
pub async fn register(
    Authorized(caller, _): Authorized<WorkerScope>,
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(bytes)?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "invalid_body",
            "expected {\"name\", \"hostname\", \"labels\", \"resources\", \"version\"}",
        ));
    }
    let request: RegisterBody = parse_body(&headers, &bytes)?;
    check_text("name", &request.name)?;
    check_text("hostname", &request.hostname)?;
    check_text("version", &request.version)?;
    if request.labels.len() > MAX_LABELS {
        return Err(invalid(
            "invalid_worker",
            format!("`labels`: at most {MAX_LABELS}"),
        ));
    }
    for label in &request.labels {
        retrain_core::domain::Label::new(label.as_str())
            .map_err(|e| invalid("invalid_worker", format!("`labels`: {e}")))?;
    }
    for tag in &request.resources.tags {
        check_text("resources.tags", tag)?;
    }
    let worker = state
        .jobs
        .queue
        .register_worker(&NewWorker {
            worker_id: new_worker_id(),
            name: request.name,
            hostname: request.hostname,
            labels: request.labels,
            resources: request.resources,
            version: request.version,
            registered_at: Utc::now(),
        })
        .await?;
    info!(
        event = "worker.registered",
        worker = %worker.worker_id,
        name = %worker.name,
        hostname = %worker.hostname,
        by = %caller.name,
        "worker registered"
    );
    state.metrics.worker_event("worker.registered");
    let server = &state.settings.server;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "worker_id": worker.worker_id,
            "heartbeat_interval_secs": server.heartbeat_interval.as_secs(),
            "worker_ttl_secs": server.worker_ttl.as_secs(),
        })),
    )
        .into_response())
}

/// `POST /v1/workers/{id}/heartbeat`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatBody {
    state: Option<WorkerState>,
    #[serde(default)]
    job_key: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/workers/{id}/heartbeat",
    tag = "workers",
    params(("id" = String, Path, description = "worker id")),
    request_body(content = Object, content_type = "application/json", description = "`{state: idle|running|draining, job_key}`"),
    security(("bearer" = ["worker"])),
    responses(
        (status = 200, description = "`{cancel: [job_key]}`: the jobs this worker must kill now", body = Object),
        (status = 404, description = "`worker_not_found`: register again", body = ErrorBody),
        (status = 422, description = "`invalid_heartbeat`", body = ErrorBody),
    )
)]
pub async fn heartbeat(
    Authorized(_, _): Authorized<WorkerScope>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let bytes = body(bytes)?;
    let request: HeartbeatBody = parse_body(&headers, &bytes)?;
    let worker_state = request.state.unwrap_or(if request.job_key.is_some() {
        WorkerState::Running
    } else {
        WorkerState::Idle
    });
    if worker_state == WorkerState::Stale {
        return Err(invalid(
            "invalid_heartbeat",
            "`state` must be idle, running or draining",
        ));
    }
    let now = Utc::now();
    let cancel = state
        .jobs
        .queue
        .heartbeat(&id, worker_state, request.job_key.as_deref(), now)
        .await?
        .ok_or_else(|| worker_not_found(&id))?;
    if worker_state == WorkerState::Idle && request.job_key.is_none() {
        // It runs nothing, yet holds a job assigned two heartbeats ago or
        // more: the lease answer never reached it. The job goes back to
        // the queue (same key, no attempt used) instead of holding the
        // worker `worker_busy` forever.
        let grace = chrono::Duration::from_std(2 * state.settings.server.heartbeat_interval)
            .unwrap_or(chrono::Duration::MAX);
        let released = state
            .jobs
            .queue
            .release_unclaimed(&id, now - grace, now)
            .await?;
        for job in &released {
            warn!(event = "job.requeued", job = %job, worker = %id, "the worker never took its job: back to the queue");
            state.metrics.worker_event("job.requeued");
        }
        if !released.is_empty() {
            state.jobs.enqueued.notify_waiters();
        }
    }
    if !cancel.is_empty() {
        info!(worker = %id, jobs = ?cancel, "telling the worker to stop jobs it no longer holds");
    }
    Ok(Json(json!({ "cancel": cancel })))
}

/// `POST /v1/workers/{id}/lease-job`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseBody {
    wait_secs: Option<u32>,
}

/// The `Job` a worker runs.
fn job_json(job: &RemoteJob) -> Value {
    let run = &job.run_id;
    json!({
        "job_key": job.job_key,
        "run_id": run,
        "label": job.label,
        "attempt": job.attempt,
        "dataset": {"name": job.spec.dataset_name, "version": job.spec.dataset_version},
        "command": job.spec.command,
        "env": job.spec.env,
        "timeout_secs": job.spec.timeout_secs,
        "results_url": format!("/v1/runs/{run}/results"),
        "logs_url": format!("/v1/runs/{run}/logs"),
        "artifacts_url": format!("/v1/runs/{run}/artifacts"),
    })
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds().max(0) as f64 / 1000.0
}

/// Long poll: a fitting queued job as soon as there is one, or 204 after
/// `wait_secs` (bounded by `[server] request_timeout`, which would cut the
/// request otherwise).
#[utoipa::path(
    post,
    path = "/v1/workers/{id}/lease-job",
    tag = "workers",
    params(("id" = String, Path, description = "worker id")),
    request_body(content = Object, content_type = "application/json", description = "`{wait_secs}` (default 25, max 60)"),
    security(("bearer" = ["worker"])),
    responses(
        (status = 200, description = "a job that fits this worker", body = Object),
        (status = 204, description = "no job within `wait_secs` (or the worker is draining or stale)"),
        (status = 404, description = "`worker_not_found`", body = ErrorBody),
        (status = 409, description = "`worker_busy`: it holds a job already", body = ErrorBody),
        (status = 422, description = "`invalid_lease`", body = ErrorBody),
    )
)]
pub async fn lease_job(
    Authorized(_, _): Authorized<WorkerScope>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(bytes)?;
    let request: LeaseBody = parse_body(&headers, &bytes)?;
    let wait_secs = request.wait_secs.unwrap_or(DEFAULT_WAIT_SECS);
    if wait_secs > MAX_WAIT_SECS {
        return Err(invalid(
            "invalid_lease",
            format!("`wait_secs` must be at most {MAX_WAIT_SECS}, got {wait_secs}"),
        ));
    }
    let limit = state
        .settings
        .server
        .request_timeout
        .saturating_sub(Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs.into()).min(limit);
    loop {
        // Registered before the queue is read, so an enqueue in between
        // still wakes this poll.
        let enqueued = state.jobs.enqueued.notified();
        match state.jobs.queue.lease(&id, Utc::now()).await? {
            JobLease::Assigned(job) => {
                state.metrics.worker_event("job.assigned");
                if let Some(at) = job.assigned_at {
                    state
                        .metrics
                        .queue_wait(seconds_between(job.enqueued_at, at));
                }
                info!(event = "job.assigned", job = %job.job_key, worker = %id, "job assigned");
                return Ok(Json(job_json(&job)).into_response());
            }
            JobLease::Busy { job_key } => {
                return Err(ApiError::conflict(
                    "worker_busy",
                    format!("worker {id} already holds job {job_key}: report it first"),
                ))
            }
            JobLease::UnknownWorker => return Err(worker_not_found(&id)),
            // A draining worker takes nothing; a stale one heartbeats first.
            JobLease::NotTaking(_) => return Ok(StatusCode::NO_CONTENT.into_response()),
            JobLease::NoneFits => {}
        }
        tokio::select! {
            () = enqueued => {}
            () = tokio::time::sleep(RECHECK) => {}
            () = tokio::time::sleep_until(deadline) => {
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
            () = state.shutdown.cancelled() => {
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
        }
    }
}

/// `DELETE /v1/workers/{id}`: its held job goes back to the queue.
#[utoipa::path(
    delete,
    path = "/v1/workers/{id}",
    tag = "workers",
    params(("id" = String, Path, description = "worker id")),
    security(("bearer" = ["worker"])),
    responses(
        (status = 204, description = "deregistered; its held job went back to the queue"),
        (status = 404, description = "`worker_not_found`", body = ErrorBody),
    )
)]
pub async fn deregister(
    Authorized(_, _): Authorized<WorkerScope>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !state.jobs.queue.deregister_worker(&id).await? {
        return Err(worker_not_found(&id));
    }
    info!(event = "worker.removed", worker = %id, "worker deregistered");
    state.metrics.worker_event("worker.removed");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/v1/workers",
    tag = "workers",
    security(("bearer" = ["read"])),
    responses(
        (status = 200, description = "`{workers: [Worker]}`", body = Object),
    )
)]
pub async fn list(
    Authorized(_, _): Authorized<ReadScope>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let workers = state.jobs.queue.workers().await?;
    Ok(Json(json!({
        "workers": workers.iter().map(worker_json).collect::<Vec<_>>()
    })))
}

#[utoipa::path(
    get,
    path = "/v1/workers/{id}",
    tag = "workers",
    params(("id" = String, Path, description = "worker id")),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, description = "the worker", body = Object),
        (status = 404, description = "`worker_not_found`", body = ErrorBody),
    )
)]
pub async fn show(
    Authorized(_, _): Authorized<ReadScope>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let worker = state
        .jobs
        .queue
        .worker(&id)
        .await?
        .ok_or_else(|| worker_not_found(&id))?;
    Ok(Json(worker_json(&worker)))
}

/// `GET /v1/workers/queue`: queued and held jobs, oldest first.
#[utoipa::path(
    get,
    path = "/v1/workers/queue",
    tag = "workers",
    security(("bearer" = ["read"])),
    responses(
        (status = 200, description = "`{jobs: [...]}`: queued and assigned jobs", body = Object),
    )
)]
pub async fn queue(
    Authorized(_, _): Authorized<ReadScope>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let now = Utc::now();
    let jobs: Vec<Value> = state
        .jobs
        .queue
        .queue()
        .await?
        .iter()
        .map(|job| {
            let waited_until = job.assigned_at.unwrap_or(now);
            json!({
                "job_key": job.job_key,
                "run_id": job.run_id,
                "label": job.label,
                "state": job.state,
                "request": job.spec.request,
                "worker_id": job.worker_id,
                "enqueued_at": job.enqueued_at,
                "waiting_secs": seconds_between(job.enqueued_at, waited_until),
            })
        })
        .collect();
    Ok(Json(json!({ "jobs": jobs })))
}

/// `POST /v1/admin/workers/cleanup`: sweep, then remove the stale workers.
#[utoipa::path(
    post,
    path = "/v1/admin/workers/cleanup",
    tag = "workers",
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "`{removed: [worker_id]}`", body = Object),
    )
)]
pub async fn cleanup(
    Authorized(caller, _): Authorized<AdminScope>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    sweep_once(&state).await?;
    let removed = state.jobs.queue.remove_stale().await?;
    for worker in &removed {
        info!(event = "worker.removed", worker = %worker, by = %caller.name, "stale worker removed");
        state.metrics.worker_event("worker.removed");
    }
    Ok(Json(json!({ "removed": removed })))
}

/// The run `id` exists (404 `run_not_found` otherwise) and `job_key` is
/// one of its jobs (409 `code` otherwise).
async fn job_of_run(
    state: &AppState,
    run_id: &str,
    job_key: &str,
    code: &'static str,
) -> Result<RemoteJob, ApiError> {
    if state.store.run(&RunId(run_id.to_owned())).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "run_not_found",
            format!("no run with id {run_id}"),
        ));
    }
    match state.jobs.queue.job(job_key).await? {
        Some(job) if job.run_id == run_id => Ok(job),
        _ => Err(ApiError::conflict(
            code,
            format!("run {run_id} has no job {job_key}"),
        )),
    }
}

/// `POST /v1/runs/{id}/logs`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogBody {
    job_key: String,
    worker_id: String,
    chunk: String,
}

#[utoipa::path(
    post,
    path = "/v1/runs/{id}/logs",
    tag = "workers",
    params(("id" = String, Path, description = "run id")),
    request_body(content = Object, content_type = "application/json", description = "`{job_key, worker_id, chunk}`"),
    security(("bearer" = ["worker"])),
    responses(
        (status = 204, description = "appended to the job's 64 KiB log tail"),
        (status = 404, description = "`run_not_found`", body = ErrorBody),
        (status = 409, description = "`job_not_assigned` to this worker", body = ErrorBody),
    )
)]
pub async fn logs(
    Authorized(_, _): Authorized<WorkerScope>,
    State(state): State<AppState>,
    Path(run_id): Path<String>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let bytes = body(bytes)?;
    let request: LogBody = parse_body(&headers, &bytes)?;
    job_of_run(&state, &run_id, &request.job_key, "job_not_assigned").await?;
    if !state
        .jobs
        .queue
        .append_log(&request.job_key, &request.worker_id, &request.chunk)
        .await?
    {
        return Err(ApiError::conflict(
            "job_not_assigned",
            format!(
                "job {} is not assigned to worker {}",
                request.job_key, request.worker_id
            ),
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A worker's failure report.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Failure {
    message: String,
    #[serde(default)]
    exit_status: Option<String>,
}

/// Which report a results body is, validated; the error names the field.
/// The fields of a report body. A Python worker writes bare `NaN` /
/// `Infinity` metrics (§6 allows them; the gate then rejects the candidate
/// naming the metric): the fields are read from a copy with those tokens
/// quoted, and [`report_of`] reads the result itself from the bytes.
fn report_fields(
    headers: &HeaderMap,
    bytes: &Bytes,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let parsed = match parse_body::<BTreeMap<String, Value>>(headers, bytes) {
        Ok(parsed) => parsed,
        Err(strict) => match retrain_adapters::command::quote_non_finite(bytes) {
            Some(quoted) => parse_body(headers, &Bytes::from(quoted)).map_err(|_| strict)?,
            None => return Err(strict),
        },
    };
    Ok(parsed.into_iter().collect())
}

fn report_of(body: &serde_json::Map<String, Value>, raw: &[u8]) -> Result<JobReport, ApiError> {
    const FIELDS: [&str; 6] = [
        "job_key",
        "worker_id",
        "candidate",
        "metrics",
        "failed",
        "cancelled",
    ];
    if let Some(unknown) = body.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(invalid(
            "invalid_result",
            format!(
                "unknown field `{unknown}` (expected one of: {})",
                FIELDS.join(", ")
            ),
        ));
    }
    let kinds = ["candidate", "failed", "cancelled"]
        .iter()
        .filter(|k| body.contains_key(**k))
        .count();
    if kinds != 1 {
        return Err(invalid(
            "invalid_result",
            "expected exactly one of `candidate` (a result), `failed` or `cancelled`",
        ));
    }
    if let Some(failed) = body.get("failed") {
        let failure: Failure = serde_json::from_value(failed.clone())
            .map_err(|e| invalid("invalid_result", format!("field `failed`: {e}")))?;
        return Ok(JobReport::Failed {
            message: failure.message,
            exit_status: failure.exit_status,
        });
    }
    if let Some(cancelled) = body.get("cancelled") {
        return match cancelled {
            Value::Bool(true) => Ok(JobReport::Cancelled),
            _ => Err(invalid("invalid_result", "field `cancelled` must be true")),
        };
    }
    // The §6 result, parsed exactly as a `$RETRAIN_RESULT` file is (its
    // reader ignores the other fields of the body).
    let is_json = |bytes: &[u8]| serde_json::from_slice::<Value>(bytes).is_ok();
    let json_text = is_json(raw)
        || retrain_adapters::command::quote_non_finite(raw).is_some_and(|q| is_json(&q));
    let reserialized;
    let result: &[u8] = if json_text {
        raw
    } else {
        // A YAML body: its result fields, as JSON.
        let mut result = serde_json::Map::new();
        for field in ["candidate", "metrics"] {
            if let Some(value) = body.get(field) {
                result.insert(field.to_owned(), value.clone());
            }
        }
        reserialized = serde_json::to_vec(&result)
            .map_err(|e| invalid("invalid_result", format!("result: {e}")))?;
        &reserialized
    };
    let candidate = retrain_adapters::command::parse_result_json(result)
        .map_err(|e| invalid("invalid_result", format!("the result {e}")))?;
    Ok(JobReport::Finished(candidate))
}

fn text_field<'a>(
    body: &'a serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(_) => Err(invalid(
            "invalid_result",
            format!("field `{field}` must be a non-empty string"),
        )),
    }
}

/// `POST /v1/runs/{id}/results`: a success, a failure or a drain cancel
/// of the job a worker holds.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/results",
    tag = "workers",
    params(("id" = String, Path, description = "run id")),
    request_body(content = Object, content_type = "application/json", description = "success `{job_key, worker_id, candidate, metrics}`, failure `{job_key, worker_id, failed: {message, exit_status}}` or `{job_key, worker_id, cancelled: true}`"),
    security(("bearer" = ["worker"])),
    responses(
        (status = 200, description = "`{accepted: true}` (the same success again is accepted again)", body = Object),
        (status = 404, description = "`run_not_found`", body = ErrorBody),
        (status = 409, description = "`job_not_awaited`: not this run's job held by this worker, or a different result", body = ErrorBody),
        (status = 422, description = "`invalid_result`, naming the field", body = ErrorBody),
    )
)]
pub async fn results(
    Authorized(_, _): Authorized<WorkerScope>,
    State(state): State<AppState>,
    Path(run_id): Path<String>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let bytes = body(bytes)?;
    let body = report_fields(&headers, &bytes)?;
    let job_key = text_field(&body, "job_key")?
        .ok_or_else(|| invalid("invalid_result", "missing field `job_key`"))?;
    let worker_id = text_field(&body, "worker_id")?;
    // Validated before anything is looked up or stored.
    let report = report_of(&body, &bytes)?;
    let job = job_of_run(&state, &run_id, job_key, "job_not_awaited").await?;
    // `worker_id` may be left out only for a job no worker holds, so one
    // worker's token cannot report another worker's job.
    if worker_id.is_none() && job.worker_id.is_some() {
        return Err(ApiError::conflict(
            "job_not_awaited",
            format!("job {job_key} is held by a worker: the report must name its `worker_id`"),
        ));
    }
    let now = Utc::now();
    match state
        .jobs
        .queue
        .report(job_key, worker_id, &report, now)
        .await?
    {
        Reported::Accepted => {
            let (event, result) = match &report {
                JobReport::Finished(_) => ("job.finished", "finished"),
                JobReport::Failed { .. } => ("job.failed", "failed"),
                JobReport::Cancelled => ("job.requeued", "cancelled"),
            };
            state.metrics.worker_event(event);
            if let Some(assigned) = job.assigned_at {
                state
                    .metrics
                    .job_duration(result, seconds_between(assigned, now));
            }
            info!(event, job = %job_key, worker = ?worker_id, "worker report accepted");
            if matches!(report, JobReport::Cancelled) {
                // Back in the queue: wake the long polls.
                state.jobs.enqueued.notify_waiters();
            }
            Ok(Json(json!({ "accepted": true })))
        }
        Reported::AlreadyAccepted => Ok(Json(json!({ "accepted": true }))),
        Reported::NotAwaited(why) => Err(ApiError::conflict(
            "job_not_awaited",
            format!("run {run_id} does not await this report: {why}"),
        )),
    }
}

/// One staleness sweep: workers past `worker_ttl` stale, their jobs lost.
async fn sweep_once(state: &AppState) -> Result<(), ApiError> {
    let now = Utc::now();
    let ttl = chrono::Duration::from_std(state.settings.server.worker_ttl)
        .unwrap_or(chrono::Duration::MAX);
    let sweep = state.jobs.queue.mark_stale(now - ttl, now).await?;
    for worker in &sweep.workers {
        warn!(event = "worker.stale", worker = %worker, "worker missed its heartbeats: stale");
        state.metrics.worker_event("worker.stale");
    }
    for job in &sweep.lost_jobs {
        warn!(event = "job.lost", job = %job, "the job's worker went stale: job lost");
        state.metrics.worker_event("job.lost");
    }
    Ok(())
}

/// Mark stale workers every `worker_ttl / 4` until shutdown, the first
/// time one `worker_ttl` after start: while no server listened, the workers
/// could not heartbeat, and a restart that took longer than `worker_ttl`
/// must not make every running job a lost attempt.
pub async fn sweep_stale(state: AppState, shutdown: CancellationToken) {
    let every = state.settings.server.worker_ttl / 4;
    tokio::select! {
        () = shutdown.cancelled() => return,
        () = tokio::time::sleep(state.settings.server.worker_ttl.saturating_sub(every)) => {}
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if let Err(e) = sweep_once(&state).await {
            warn!(error = %e, "marking stale workers failed; retrying at the next sweep");
        }
    }
}

/// The jobs of a run for `GET /v1/runs/{id}`.
pub fn jobs_json(jobs: &[RemoteJob]) -> Value {
    Value::Array(
        jobs.iter()
            .map(|job| {
                json!({
                    "job_key": job.job_key,
                    "attempt": job.attempt,
                    "state": job.state,
                    "worker_id": job.worker_id,
                    "enqueued_at": job.enqueued_at,
                    "assigned_at": job.assigned_at,
                    "finished_at": job.finished_at,
                    "failure": job.failure,
                    "log_tail": job.log_tail,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(content_type: &str, body: &str) -> Result<JobReport, ApiError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::CONTENT_TYPE,
            content_type.parse().unwrap(),
        );
        let bytes = Bytes::from(body.to_owned());
        let fields = report_fields(&headers, &bytes)?;
        report_of(&fields, &bytes)
    }

    #[test]
    fn python_non_finite_metrics_are_read_as_the_result_file_would_be() {
        let body = r#"{"job_key": "r/train/1", "worker_id": "w", "candidate": "c", "metrics": {"dice": NaN, "iou": -Infinity, "f1": 0.5}}"#;
        match report("application/json", body).unwrap() {
            JobReport::Finished(candidate) => {
                assert_eq!(candidate.id, "c");
                assert!(candidate.metrics["dice"].is_nan());
                assert_eq!(candidate.metrics["iou"], f64::NEG_INFINITY);
                assert_eq!(candidate.metrics["f1"], 0.5);
            }
            other => panic!("{other:?}"),
        }
        // Broken JSON stays refused, and a non-finite candidate is no id.
        assert!(report("application/json", r#"{"job_key": "k", "candidate": NaN}"#).is_err());
        assert!(report("application/json", r#"{"job_key": "k", "candidate": "c""#).is_err());
    }

    #[test]
    fn a_yaml_report_is_read_too() {
        let body = "job_key: r/train/1\nworker_id: w\ncandidate: c\nmetrics:\n  dice: 0.8\n";
        match report("text/yaml", body).unwrap() {
            JobReport::Finished(candidate) => assert_eq!(candidate.metrics["dice"], 0.8),
            other => panic!("{other:?}"),
        }
    }
}
