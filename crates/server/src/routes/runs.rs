//! `/v1/runs`: trigger a cycle, list and show runs, approve or reject.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use retrain_core::domain::{Label, RunId};
use retrain_core::engine::{CycleRequest, CycleStarted, Decision, DecisionOutcome, LabelStart};
use retrain_core::journal::{RequestClaim, RunPage};
use retrain_core::manifest::ManifestDocument;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::{body, parse_body, query, ApproveScope, Authorized, ReadScope, TriggerScope};
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// `POST /v1/runs` (JSON or YAML).
#[derive(Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerBody {
    /// Labels to run; absent or empty: every configured label.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    #[serde(default)]
    pub dry_run: Option<bool>,
    /// Why (logged with the caller).
    #[serde(default)]
    pub reason: Option<String>,
}

const IDEMPOTENCY_KEY: &str = "idempotency-key";
const MAX_KEY_LEN: usize = 255;

/// Start a cycle in the background; answer `202` with each label's run id
/// (or `already_running`) once every label has been locked or found busy.
#[utoipa::path(
    post,
    path = "/v1/runs",
    tag = "runs",
    description = "Start a cycle (JSON, or YAML with `Content-Type: text/yaml`; an empty body runs every label). Answers once every label has been locked or found busy: a label already driven here or by another replica is reported `already_running`, never started twice. A repeated `Idempotency-Key` returns the first response.",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 printable ASCII characters")),
    request_body(content = TriggerBody, content_type = "application/json"),
    security(("bearer" = ["trigger"])),
    responses(
        (status = 202, description = "`{cycle_id, dry_run, triggered_by, labels: [{label, run_id, status, detail?}]}`; status is `started`, `resumed`, `planned`, `already_running` or the run's end", body = Object),
        (status = 400, description = "invalid or unknown label, invalid body or Idempotency-Key", body = ErrorBody),
        (status = 409, description = "`request_in_progress`: the first request with this Idempotency-Key is still being answered", body = ErrorBody),
        (status = 413, description = "body larger than `[server] body_limit`", body = ErrorBody),
        (status = 415, description = "neither JSON nor YAML", body = ErrorBody),
        (status = 422, description = "`idempotency_key_reused` for a different request", body = ErrorBody),
    )
)]
pub async fn trigger(
    Authorized(caller, _): Authorized<TriggerScope>,
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body(bytes)?;
    let request: TriggerBody = parse_body(&headers, &bytes)?;
    let labels = configured_labels(&state, request.labels.as_deref().unwrap_or_default())?;
    let dry_run = request.dry_run.unwrap_or(state.settings.dry_run);
    let key = idempotency_key(&headers)?;
    if let Some(key) = &key {
        let fingerprint = fingerprint(&caller, &labels, dry_run, request.reason.as_deref());
        match state.store.claim_request(key, &fingerprint).await? {
            RequestClaim::Claimed => {}
            RequestClaim::Seen {
                response: Some(first),
            } => {
                let first: Value = serde_json::from_str(&first).map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "store_corrupt",
                        format!("the stored response of this Idempotency-Key cannot be read: {e}"),
                    )
                })?;
                return Ok(accepted(first));
            }
            RequestClaim::Seen { response: None } => {
                return Err(ApiError::conflict(
                    "request_in_progress",
                    "a request with this Idempotency-Key is still being answered; retry shortly",
                ))
            }
            RequestClaim::Mismatch => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for a different request",
                ))
            }
        }
    }
    tracing::info!(
        by = %caller.name,
        reason = request.reason.as_deref().unwrap_or(""),
        labels = ?labels.iter().map(Label::as_str).collect::<Vec<_>>(),
        dry_run,
        "cycle triggered over HTTP"
    );
    let cycle = CycleRequest {
        labels: (!labels.is_empty()).then_some(labels),
        dry_run,
    };
    let answered = start_cycle(&state, cycle, caller, key);
    answered
        .await
        .map_err(|_| ApiError::unavailable("the server is shutting down"))?
        .map(accepted)
}

fn accepted(body: Value) -> Response {
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

/// Run the cycle in a tracked task; the receiver gets the `202` body after
/// phase one (stored under the idempotency key first, if any). The task
/// outlives the request: a client hanging up never drops the cycle.
fn start_cycle(
    state: &AppState,
    request: CycleRequest,
    caller: Caller,
    key: Option<String>,
) -> oneshot::Receiver<Result<Value, ApiError>> {
    let (answer, answered) = oneshot::channel();
    let engine = state.engine.clone();
    let store = state.store.clone();
    let cancel = state.shutdown.child_token();
    let dry_run = request.dry_run;
    let metrics = state.metrics.clone();
    metrics.cycle_started("http");
    state.work.spawn(async move {
        let (started_tx, mut started_rx) = oneshot::channel();
        let cycle =
            engine.run_cycle_announcing(request, cancel, started_tx, Some(caller.name.clone()));
        tokio::pin!(cycle);
        let (started, mut finished) = tokio::select! {
            biased;
            started = &mut started_rx => (started.ok(), None),
            finished = &mut cycle => (started_rx.try_recv().ok(), Some(finished)),
        };
        let response = match started {
            Some(started) => Ok(trigger_response(&started, dry_run, &caller)),
            None => {
                // The cycle stopped before phase one ended (unknown label,
                // store down): its error is the answer.
                let ended = match finished.take() {
                    Some(ended) => ended,
                    None => cycle.as_mut().await,
                };
                let error = match &ended {
                    Err(e) => cycle_error(e),
                    Ok(_) => ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "the cycle ended without announcing its runs",
                    ),
                };
                finished = Some(ended);
                Err(error)
            }
        };
        if let Some(key) = &key {
            let stored = match &response {
                Ok(body) => store.complete_request(key, &body.to_string()).await,
                // Nothing was started: a retry with the same key may act.
                Err(_) => store.release_request(key).await,
            };
            if let Err(e) = stored {
                tracing::warn!(error = %e, "could not store the answer to an Idempotency-Key");
            }
        }
        let _ = answer.send(response);
        let report = match finished {
            Some(finished) => finished,
            None => cycle.await,
        };
        match report {
            Ok(report) => {
                tracing::info!(
                    cycle_id = %report.cycle_id,
                    interrupted = report.interrupted,
                    labels = report.labels.len(),
                    "cycle finished"
                );
                // Counted as the webhook and schedule cycles are.
                let runs: Vec<RunId> = report
                    .labels
                    .iter()
                    .filter_map(|l| l.run_id.clone())
                    .collect();
                metrics.observe_finished(store.as_ref(), runs).await;
            }
            Err(e) => tracing::warn!(error = %e, "cycle failed"),
        }
    });
    answered
}

/// The API error of a cycle that could not start (by reference: the
/// cycle's result is still logged afterwards).
fn cycle_error(error: &retrain_core::engine::EngineError) -> ApiError {
    use retrain_core::engine::EngineError;
    match error {
        EngineError::UnknownLabel(..) => ApiError::bad_request("unknown_label", error.to_string()),
        EngineError::Store(_) => ApiError::unavailable(error.to_string()),
        _ => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cycle_failed",
            error.to_string(),
        ),
    }
}

fn trigger_response(started: &CycleStarted, dry_run: bool, caller: &Caller) -> Value {
    let labels: Vec<Value> = started
        .labels
        .iter()
        .map(|(label, start)| match start {
            LabelStart::Driving { run_id, resumed } => json!({
                "label": label,
                "run_id": run_id,
                "status": if dry_run { "planned" } else if *resumed { "resumed" } else { "started" },
            }),
            LabelStart::Busy { holder } => json!({
                "label": label,
                "run_id": Value::Null,
                "status": "already_running",
                "detail": holder,
            }),
            LabelStart::Ended {
                run_id,
                status,
                error,
            } => json!({
                "label": label,
                "run_id": run_id,
                "status": status.as_str(),
                "detail": error,
            }),
        })
        .collect();
    json!({
        "cycle_id": started.cycle_id,
        "dry_run": dry_run,
        "triggered_by": caller.name,
        "labels": labels,
    })
}

/// The requested labels, each valid and configured (400 naming the first
/// that is not).
fn configured_labels(state: &AppState, raw: &[String]) -> Result<Vec<Label>, ApiError> {
    let mut labels = Vec::new();
    for name in raw {
        let label = Label::new(name)
            .map_err(|e| ApiError::bad_request("invalid_label", format!("labels: {e}")))?;
        if !state.settings.labels.contains_key(&label) {
            let known: Vec<&str> = state.settings.labels.keys().map(Label::as_str).collect();
            return Err(ApiError::bad_request(
                "unknown_label",
                format!("unknown label `{label}` (configured: {})", known.join(", ")),
            ));
        }
        if !labels.contains(&label) {
            labels.push(label);
        }
    }
    Ok(labels)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| {
            !k.is_empty() && k.len() <= MAX_KEY_LEN && k.chars().all(|c| c.is_ascii_graphic())
        })
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                format!("Idempotency-Key: expected 1 to {MAX_KEY_LEN} printable ASCII characters"),
            )
        })?;
    Ok(Some(key.to_owned()))
}

/// What makes two requests "the same": who asked, and what.
fn fingerprint(caller: &Caller, labels: &[Label], dry_run: bool, reason: Option<&str>) -> String {
    let canonical = json!({
        "by": caller.name,
        "labels": labels,
        "dry_run": dry_run,
        "reason": reason,
    });
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

/// `GET /v1/runs` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this label's runs.
    pub label: Option<String>,
    /// An outcome (`promoted`, `rejected`, `running`, …) or a stage
    /// (`training`, `awaiting_approval`, …).
    pub status: Option<String>,
    /// `next_cursor` of the previous page (opaque). Pages are keyset-based:
    /// runs started while paging appear before the first page, never shift
    /// the following ones.
    pub cursor: Option<String>,
    /// Page size, 1..=500 (default 50).
    pub limit: Option<u32>,
}

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

/// Runs newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/runs",
    tag = "runs",
    params(ListQuery),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, description = "`{runs: [RunSummary], next_cursor}` (`next_cursor` null on the last page)", body = Object),
        (status = 400, description = "invalid label, query or cursor", body = ErrorBody),
    )
)]
pub async fn list(
    Authorized(_, _): Authorized<ReadScope>,
    State(state): State<AppState>,
    params: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = query(params)?;
    let label = params
        .label
        .as_deref()
        .map(Label::new)
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_label", format!("label: {e}")))?;
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1..={MAX_PAGE}, got {limit}"),
        ));
    }
    let after = params.cursor.as_deref().map(decode_cursor).transpose()?;
    // One more than the page: whether there is a next page.
    let mut page = state
        .store
        .list_runs_page(&RunPage {
            label,
            status: params.status,
            after,
            limit: limit + 1,
        })
        .await?;
    let next_cursor =
        (page.len() > limit as usize).then(|| encode_cursor(&page[limit as usize - 1].run_id));
    page.truncate(limit as usize);
    Ok(Json(json!({"runs": page, "next_cursor": next_cursor})))
}

/// The cursor is opaque to clients (they pass `next_cursor` back): the
/// last run id of the page, base64url-encoded, so its format can change
/// without breaking them.
fn encode_cursor(run_id: &RunId) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(run_id.as_str())
}

fn decode_cursor(cursor: &str) -> Result<RunId, ApiError> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|id| !id.is_empty())
        .map(RunId)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_cursor",
                "cursor: not a next_cursor of GET /v1/runs",
            )
        })
}

async fn detail(state: &AppState, id: &str) -> Result<retrain_core::journal::RunDetail, ApiError> {
    state
        .store
        .run(&RunId(id.to_owned()))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no run with id {id}")))
}

/// One run: its summary, report (verdict table included), journal and manifest.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}",
    tag = "runs",
    params(("id" = String, Path, description = "run id")),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, description = "`{run, report, journal, manifest}`; `manifest.artifacts`: `[{name, size_bytes, sha256, uploaded_at, uploaded_by}]`", body = Object),
        (status = 404, description = "no such run", body = ErrorBody),
    )
)]
pub async fn show(
    Authorized(_, _): Authorized<ReadScope>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let detail = detail(&state, &id).await?;
    let report = retrain_core::report::LabelReport::from_run(&detail.snapshot, false);
    // Worker jobs of the run (state, worker, log tail); empty for other trainers.
    let jobs = state.jobs.queue.jobs_of_run(&id).await?;
    let mut manifest =
        serde_json::to_value(ManifestDocument::from_run(&detail.snapshot)).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("serializing the manifest of run {id}: {e}"),
            )
        })?;
    // Uploaded by remote trainers (`PUT /v1/runs/{id}/artifacts/{name}`).
    manifest["artifacts"] = json!(
        state
            .artifacts
            .log()
            .artifacts(&detail.summary.run_id)
            .await?
    );
    Ok(Json(json!({
        "run": detail.summary,
        "report": report,
        "journal": detail.transitions,
        "manifest": manifest,
        "jobs": super::workers::jobs_json(&jobs),
    })))
}

/// The run as Markdown (as `retrain runs show --format md`).
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/report.md",
    tag = "runs",
    params(("id" = String, Path, description = "run id")),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, description = "the run's report", body = String, content_type = "text/markdown"),
        (status = 404, description = "no such run", body = ErrorBody),
    )
)]
pub async fn report_md(
    Authorized(_, _): Authorized<ReadScope>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let detail = detail(&state, &id).await?;
    let report = retrain_core::history::stored_run_report(state.store.as_ref(), &detail).await?;
    let markdown = retrain_core::manifest::run_markdown(&detail, &report);
    Ok((
        [(header::CONTENT_TYPE, "text/markdown; charset=utf-8")],
        markdown,
    )
        .into_response())
}

/// `POST /v1/runs/{id}/approve|reject`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    pub reason: Option<String>,
    /// Approve only: gate again against the current production first.
    #[serde(default)]
    pub regate: bool,
}

/// Approve a candidate awaiting approval: promote it (identity = the
/// token's name).
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/approve",
    tag = "runs",
    params(("id" = String, Path, description = "run id")),
    request_body(content = DecisionBody, content_type = "application/json"),
    security(("bearer" = ["approve"])),
    responses(
        (status = 200, description = "`{run_id, decided_by, status, report}`", body = Object),
        (status = 404, description = "no such run", body = ErrorBody),
        (status = 409, description = "`not_awaiting_approval`, `already_approved`, `approval_closed`, `production_changed` (approve with `regate`) or `label_busy`", body = ErrorBody),
    )
)]
pub async fn approve(
    Authorized(caller, _): Authorized<ApproveScope>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: DecisionBody = parse_body(&headers, &body(bytes)?)?;
    let decision = Decision::Approve {
        regate: body.regate,
    };
    decide(state, id, decision, caller, body.reason).await
}

/// Reject a candidate awaiting approval (a reason is required).
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/reject",
    tag = "runs",
    params(("id" = String, Path, description = "run id")),
    request_body(content = DecisionBody, content_type = "application/json"),
    security(("bearer" = ["approve"])),
    responses(
        (status = 200, description = "`{run_id, decided_by, status, report}`", body = Object),
        (status = 400, description = "`reason_required`, or `regate` given", body = ErrorBody),
        (status = 404, description = "no such run", body = ErrorBody),
        (status = 409, description = "`not_awaiting_approval`, `approval_closed` or `label_busy`", body = ErrorBody),
    )
)]
pub async fn reject(
    Authorized(caller, _): Authorized<ApproveScope>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: DecisionBody = parse_body(&headers, &body(bytes)?)?;
    if body.regate {
        return Err(ApiError::bad_request(
            "invalid_body",
            "regate applies to approve only",
        ));
    }
    if body.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        return Err(ApiError::bad_request(
            "reason_required",
            "a rejection needs a reason: {\"reason\": \"…\"}",
        ));
    }
    decide(state, id, Decision::Reject, caller, body.reason).await
}

/// Apply a decision in a tracked task (it drives the run to its end; a
/// client hanging up must not drop it half-way), identity = token name.
async fn decide(
    state: AppState,
    id: String,
    decision: Decision,
    caller: Caller,
    reason: Option<String>,
) -> Result<Response, ApiError> {
    let engine = state.engine.clone();
    let run_id = RunId(id.clone());
    let by = caller.name.clone();
    let task = state
        .work
        .spawn(async move { engine.decide(&run_id, decision, &by, reason).await });
    let outcome = task
        .await
        .map_err(|_| ApiError::unavailable("the server is shutting down"))??;
    if let DecisionOutcome::Applied(report) = &outcome {
        // The decision finished the run: counted as a cycle's runs are.
        let runs = report.run_id.clone();
        state
            .metrics
            .observe_finished(state.store.as_ref(), runs)
            .await;
    }
    match outcome {
        DecisionOutcome::Applied(report) => Ok(Json(json!({
            "run_id": id,
            "decided_by": caller.name,
            "status": report.status.as_str(),
            "report": report,
        }))
        .into_response()),
        DecisionOutcome::AlreadyApproved { by, at } => Err(ApiError::conflict(
            "already_approved",
            format!(
                "run {id} was already approved by {by} at {}",
                at.to_rfc3339()
            ),
        )),
    }
}
