//! `GET /v1/events`: Server-Sent Events of the lifecycle events derived
//! from the journal (`retrain_core::lifecycle`).
//!
//! **The stream is the journal.** Each event's `id` is its journal
//! position; the stream reads the store's journal after the last position
//! it sent, so it carries the events of every replica sharing the store,
//! and a client reconnecting with `Last-Event-ID: <p>` gets exactly the
//! events after `p`. Positions grow in commit order (see
//! `RunStore::journal_after`), so nothing is lost or sent twice. Without
//! `Last-Event-ID` (or `?after=`) the stream starts at the end of the
//! journal. Woken by `LISTEN/NOTIFY` on Postgres, by polling on SQLite;
//! keep-alive comments every 15 s; closed on shutdown.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream};
use retrain_adapters::store::JournalWaker;
use retrain_core::domain::Label;
use retrain_core::lifecycle::{LifecycleEvent, EVENT_TYPES};
use retrain_core::ports::RunStore;
use retrain_core::CancellationToken;
use serde::Deserialize;

use super::{query, Authorized, ReadScope};
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// Journal lines read per store query.
const PAGE: u32 = 500;
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// After a store error, wait this long before reading again.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Only this label's events.
    pub label: Option<String>,
    /// Comma-separated event types (`training.started,verdict`).
    pub types: Option<String>,
    /// Start after this journal position (`0`: from the beginning); the
    /// `Last-Event-ID` header takes precedence.
    pub after: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    description = "Server-Sent Events of the lifecycle events (`run.started`, `stage.changed`, `verdict`, `promoted`, …). The stream is the journal: each event's `id` is its journal position, so reconnecting with `Last-Event-ID` resumes exactly after it, from any replica. Keep-alive comments every 15 s.",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "resume after this journal position"),
    ),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, description = "an event stream: `id: <position>`, `event: <type>`, `data: <JSON event>`", body = String, content_type = "text/event-stream"),
        (status = 400, description = "invalid label, event type or Last-Event-ID", body = ErrorBody),
    )
)]
pub async fn stream(
    Authorized(_, _): Authorized<ReadScope>,
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let params = query(params)?;
    let label = params
        .label
        .as_deref()
        .map(Label::new)
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_label", format!("label: {e}")))?;
    let types = match params.types.as_deref() {
        None => None,
        Some(raw) => Some(parse_types(raw)?),
    };
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_last_event_id",
                        "Last-Event-ID: expected a journal position (a whole number)",
                    )
                })?,
        ),
    };
    let position = match last_event_id.or(params.after) {
        Some(position) => position,
        None => state.store.journal_end().await?,
    };
    let reader = Reader {
        store: state.store.clone(),
        waker: state.journal.subscribe(),
        shutdown: state.shutdown.clone(),
        position,
        label,
        types,
        ready: VecDeque::new(),
    };
    Ok(Sse::new(reader.into_stream()).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

fn parse_types(raw: &str) -> Result<Vec<&'static str>, ApiError> {
    raw.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            EVENT_TYPES
                .iter()
                .copied()
                .find(|known| *known == t)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_event_type",
                        format!(
                            "types: unknown event type {t:?}; expected some of {}",
                            EVENT_TYPES.join(", ")
                        ),
                    )
                })
        })
        .collect()
}

/// One client's position in the journal.
struct Reader {
    store: std::sync::Arc<dyn RunStore>,
    waker: JournalWaker,
    shutdown: CancellationToken,
    /// The last journal position read (sent or filtered out).
    position: u64,
    label: Option<Label>,
    types: Option<Vec<&'static str>>,
    ready: VecDeque<LifecycleEvent>,
}

impl Reader {
    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> {
        stream::unfold(self, |mut reader| async move {
            let event = reader.next().await?;
            Some((Ok(event), reader))
        })
    }

    /// The next event to send, `None` once the server shuts down.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.shutdown.is_cancelled() {
                return None;
            }
            if let Some(event) = self.ready.pop_front() {
                return Some(sse(&event));
            }
            match self
                .store
                .journal_after(self.position, self.label.clone(), PAGE)
                .await
            {
                Ok(entries) if !entries.is_empty() => {
                    for entry in &entries {
                        self.position = entry.position;
                        let Some(event) = LifecycleEvent::of(entry) else {
                            continue;
                        };
                        if self.types.as_ref().is_none_or(|t| t.contains(&event.kind)) {
                            self.ready.push_back(event);
                        }
                    }
                }
                Ok(_) => {
                    tokio::select! {
                        () = self.waker.wait() => {}
                        () = self.shutdown.cancelled() => return None,
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "event stream: reading the journal failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(RETRY_AFTER_ERROR) => {}
                        () = self.shutdown.cancelled() => return None,
                    }
                }
            }
        }
    }
}

fn sse(event: &LifecycleEvent) -> Event {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    Event::default()
        .id(event.id.to_string())
        .event(event.kind)
        .data(data)
}
