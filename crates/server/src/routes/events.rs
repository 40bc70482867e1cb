//! `GET /v1/events`: Server-Sent Events of the lifecycle events derived
//! from the journal (`retrain_core::lifecycle`) and of the remote workers
//! and their jobs (`worker.*`, `job.*`: `JobQueue::worker_events_after`).
//!
//! **The stream is the journal.** Each event's `id` is its journal
//! position; worker events take their positions from the journal's
//! counter, so the two sources interleave in commit order under one `id`.
//! The stream reads both after the last position it sent, so it carries
//! the events of every replica sharing the store, and a client reconnecting
//! with `Last-Event-ID: <p>` gets exactly the events after `p`. Positions
//! grow in commit order (see `RunStore::journal_after`), so nothing is lost
//! or sent twice. Without `Last-Event-ID` (or `?after=`) the stream starts
//! at the end of the journal. Woken by `LISTEN/NOTIFY` on Postgres, by
//! polling on SQLite; keep-alive comments every 15 s; closed on shutdown.
//!
//! **Merging two sources without skipping.** One read takes the journal's
//! end `E` first (every position up to it is committed), then a page of
//! each source after the last position `p`. Everything in `(p, E]` of a
//! source whose page was not full was read; of a full page only up to its
//! last position. So the reader sends, in position order, what lies up to
//! the smallest of `E` and the full pages' ends, and moves `p` there: a
//! line committed between the reads lies beyond `E` and is read next time.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream};
use retrain_adapters::store::{JobQueue, JournalWaker, WorkerEvent, WORKER_EVENT_TYPES};
use retrain_core::domain::Label;
use retrain_core::lifecycle::{LifecycleEvent, EVENT_TYPES};
use retrain_core::ports::{RunStore, StoreError};
use retrain_core::CancellationToken;
use serde::Deserialize;

use super::{query, Authorized, ReadScope};
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// Journal lines (and worker events) read per store query.
const PAGE: u32 = 500;
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// After a store error, wait this long before reading again.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Only this label's events (its runs' and its jobs'; `worker.*` events
    /// have no label and are left out).
    pub label: Option<String>,
    /// Comma-separated event types (`training.started,verdict`,
    /// `worker.stale,job.lost`).
    pub types: Option<String>,
    /// Start after this journal position (`0`: from the beginning); the
    /// `Last-Event-ID` header takes precedence.
    pub after: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    description = "Server-Sent Events of the lifecycle events (`run.started`, `stage.changed`, `verdict`, `promoted`, …) and of the remote workers and their jobs (`worker.registered|stale|removed`, `job.queued|assigned|finished|failed|requeued|lost`). The stream is the journal: each event's `id` is its journal position (worker events share the journal's counter), so reconnecting with `Last-Event-ID` resumes exactly after it, from any replica. `?label=` keeps that label's run and job events (no `worker.*`). Keep-alive comments every 15 s.",
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
        queue: state.jobs.queue.clone(),
        waker: state.journal.subscribe(),
        shutdown: state.shutdown.clone(),
        position,
        label,
        types,
        ready: VecDeque::new(),
    };
    Ok(Sse::new(reader.into_stream()).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// Every type `?types=` accepts: the lifecycle events, then the worker
/// and job events.
fn known_types() -> impl Iterator<Item = &'static str> {
    EVENT_TYPES.iter().chain(WORKER_EVENT_TYPES.iter()).copied()
}

fn parse_types(raw: &str) -> Result<Vec<&'static str>, ApiError> {
    raw.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            known_types().find(|known| *known == t).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_event_type",
                    format!(
                        "types: unknown event type {t:?}; expected some of {}",
                        known_types().collect::<Vec<_>>().join(", ")
                    ),
                )
            })
        })
        .collect()
}

/// One event to send, of either source.
enum Item {
    Run(LifecycleEvent),
    Worker(WorkerEvent),
}

impl Item {
    fn position(&self) -> u64 {
        match self {
            Self::Run(event) => event.id,
            Self::Worker(event) => event.position,
        }
    }

    fn kind(&self) -> &str {
        match self {
            Self::Run(event) => event.kind,
            Self::Worker(event) => &event.kind,
        }
    }

    fn sse(&self) -> Event {
        let data = match self {
            Self::Run(event) => serde_json::to_string(event),
            Self::Worker(event) => serde_json::to_string(event),
        };
        Event::default()
            .id(self.position().to_string())
            .event(self.kind())
            .data(data.unwrap_or_else(|_| "{}".into()))
    }
}

/// One client's position in the journal.
struct Reader {
    store: std::sync::Arc<dyn RunStore>,
    queue: std::sync::Arc<dyn JobQueue>,
    waker: JournalWaker,
    shutdown: CancellationToken,
    /// The last journal position read (sent or filtered out).
    position: u64,
    label: Option<Label>,
    types: Option<Vec<&'static str>>,
    ready: VecDeque<Item>,
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
            if let Some(item) = self.ready.pop_front() {
                return Some(item.sse());
            }
            match self.read().await {
                Ok(true) => {}
                Ok(false) => {
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

    /// Read on from `position` (see the module docs for why nothing is
    /// skipped); queue what passes the filters. `false`: nothing new.
    async fn read(&mut self) -> Result<bool, StoreError> {
        let end = self.store.journal_end().await?;
        if end <= self.position {
            return Ok(false);
        }
        let label = self.label.as_ref().map(Label::to_string);
        let (lines, worker_events) = tokio::try_join!(
            self.store
                .journal_after(self.position, self.label.clone(), PAGE),
            self.queue
                .worker_events_after(self.position, label.as_deref(), PAGE),
        )?;
        let upto = read_upto(
            end,
            PAGE as usize,
            &[
                lines.iter().map(|l| l.position).collect(),
                worker_events.iter().map(|e| e.position).collect(),
            ],
        );
        let mut items: Vec<Item> = lines
            .iter()
            .filter(|line| line.position <= upto)
            .filter_map(LifecycleEvent::of)
            .map(Item::Run)
            .chain(
                worker_events
                    .into_iter()
                    .filter(|event| event.position <= upto)
                    .map(Item::Worker),
            )
            .filter(|item| {
                self.types
                    .as_ref()
                    .is_none_or(|types| types.contains(&item.kind()))
            })
            .collect();
        items.sort_by_key(Item::position);
        self.ready.extend(items);
        self.position = upto;
        Ok(true)
    }
}

/// How far one read of several sources may advance: to the journal's `end`
/// read before them, but not past the last position of a page that came
/// back full (`page` long), whose source may hold more below `end`.
fn read_upto(end: u64, page: usize, pages: &[Vec<u64>]) -> u64 {
    pages
        .iter()
        .filter(|positions| positions.len() >= page)
        .filter_map(|positions| positions.last().copied())
        .fold(end, u64::min)
}

#[cfg(test)]
mod tests {
    use super::read_upto;

    #[test]
    fn a_read_advances_to_the_end_unless_a_page_is_full() {
        // Neither page full: everything up to the end was read.
        assert_eq!(read_upto(9, 3, &[vec![1, 4], vec![2]]), 9);
        // A full page stops the read at its last position, even when the
        // other source went further.
        assert_eq!(read_upto(9, 3, &[vec![1, 2, 3], vec![4, 5]]), 3);
        assert_eq!(read_upto(9, 2, &[vec![1, 3, 5], vec![2, 4]]), 4);
        // Two full pages: the smaller end.
        assert_eq!(read_upto(20, 2, &[vec![7, 8], vec![5, 6]]), 6);
        // Nothing read: the end (all of it was filtered or empty).
        assert_eq!(read_upto(9, 3, &[vec![], vec![]]), 9);
    }
}
