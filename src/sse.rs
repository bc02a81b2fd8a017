//! `GET /api/events`: the event stream clients close their consistency window on.
//!
//! Each event is the frame stored in the durable log (see `hub`), so replayed and live
//! events are byte-identical. The seam between them (../shared/DESIGN.md): subscribe to the
//! broadcast first, then replay the log up to the projection's watermark, then take
//! live frames, skipping ids already sent. A subscriber that lags behind the broadcast,
//! or sees a gap, reads the missing ids back from the log: nothing is skipped silently.
//!
//! Two ways in, one response: the axum route below, and `direct`, which serves a
//! connection whose first request is an event stream on the socket itself (no HTTP
//! connection object and its buffers per subscriber). Both call [`events_response`].

pub mod direct;

use std::convert::Infallible;
use std::time::Duration;

use async_stream::stream;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::hub::{EventFrame, Hub};
use crate::metrics::Metrics;
use crate::model::EVENT_RESET;
use crate::store::Store;
use crate::AppState;

/// Keep-alive comment period: below the idle timeouts of common proxies.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The reconnection delay the stream suggests to clients, in milliseconds.
pub const RETRY_MS: u64 = 1_000;
/// Events read from the log per catch-up step, and at most this many bytes of them:
/// what a subscriber that is catching up holds while it writes them out (it reads
/// the next step only once the last is written).
const REPLAY_CHUNK: usize = 512;
const REPLAY_BYTES: usize = 256 << 10;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/events", get(events_stream))
}

/// The query of `GET /api/events`.
#[derive(Deserialize)]
pub struct EventsQuery {
    last_event_id: Option<String>,
}

/// Data of `event: reset`.
#[derive(Serialize)]
struct ResetEvent {
    /// The snapshot to refetch includes every event up to this id.
    watermark: u64,
    reason: &'static str,
}

/// An event id as the stream sends it: decimal digits only (no sign), at most u64.
fn parse_event_id(text: &str, source: &str) -> Result<u64, ApiError> {
    // No trimming: the header's surrounding whitespace is gone before it gets here, and
    // the query's (`%205`, `+5`) is not part of an id.
    let id = text
        .bytes()
        .all(|byte| byte.is_ascii_digit())
        .then(|| text.parse().ok())
        .flatten();
    id.ok_or_else(|| {
        ApiError::BadRequest(format!(
            "{source} must be a non-negative integer event id, got {text:?}"
        ))
    })
}

async fn events_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    events_response(state, &headers, query)
}

/// The answer to `GET /api/events`: every event after `Last-Event-ID` (or
/// `?last_event_id=`), then live ones; without either, live events only. A malformed
/// event id is a 400 problem.
pub fn events_response(
    state: AppState,
    headers: &HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    open_stream(state, headers, query).unwrap_or_else(IntoResponse::into_response)
}

fn open_stream(
    state: AppState,
    headers: &HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let mut sent_ids = headers.get_all("last-event-id").iter();
    let last_event_id = match sent_ids.next() {
        Some(_) if sent_ids.next().is_some() => {
            return Err(ApiError::BadRequest(
                "send at most one Last-Event-ID header".to_owned(),
            ));
        }
        Some(value) => {
            let text = value.to_str().map_err(|_| {
                ApiError::BadRequest("Last-Event-ID is not visible ASCII".to_owned())
            })?;
            Some(parse_event_id(text, "Last-Event-ID")?)
        }
        None => match query.last_event_id.as_deref() {
            Some(text) => Some(parse_event_id(text, "last_event_id")?),
            None => None,
        },
    };

    let body = event_stream(
        state.store.clone(),
        state.hub.clone(),
        state.metrics.clone(),
        state.shutdown.clone(),
        last_event_id,
    );
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// A `reset` frame: events up to and including `watermark` that the client has not
/// seen may be gone; it refetches the snapshot, whose own watermark says which of the
/// events that follow the reset it already includes.
fn reset_frame(watermark: u64, reason: &'static str) -> Option<Bytes> {
    EventFrame::encode(watermark, EVENT_RESET, &ResetEvent { watermark, reason })
        .ok()
        .map(|frame| frame.bytes)
}

/// The SSE byte stream after `last_event_id` (live only when `None`): a `retry:` hint,
/// a `reset` when part of that history is gone, the replay of what the log holds, then
/// live events, keep-alive
/// comments, and the end when `shutdown` is cancelled. The log is read on the blocking
/// pool ([`Store::blocking`]); if a read fails, the stream ends (the client
/// reconnects after `retry`).
pub fn event_stream(
    store: Store,
    hub: Hub,
    metrics: Metrics,
    shutdown: CancellationToken,
    last_event_id: Option<u64>,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    // Subscribe before reading the watermark: nothing published after it is missed.
    let mut live = hub.subscribe();
    let head = store.watermark();

    stream! {
        let _subscriber = metrics.subscriber();
        yield Ok::<Bytes, Infallible>(Bytes::from(format!(": settle\nretry: {RETRY_MS}\n\n")));

        let mut sent = head;
        match last_event_id {
            // Perhaps given out before a power loss and lost with it
            // (`store::event_ids`): the client may hold what those events did.
            Some(last) if store.is_hole(last, last) => {
                if let Some(reset) = reset_frame(head, "history_lost") {
                    yield Ok(reset);
                }
            }
            // Ahead of this log (another data directory): its history is unknown here.
            Some(last) if last > head => {
                if let Some(reset) = reset_frame(head, "unknown_event_id") {
                    yield Ok(reset);
                }
            }
            // From there on; if compaction has taken `last + 1`, the replay below resets.
            Some(last) => sent = last,
            None => {}
        }

        let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
        keep_alive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Catch up to `target` from the log, then go live.
        let mut target = head;
        loop {
            while sent < target {
                let (after, upto) = (sent, target);
                let read = store.blocking(move |store| store.events_after(after, upto, REPLAY_CHUNK, REPLAY_BYTES));
                match read.await {
                    Ok(frames) => {
                        // The log no longer holds `sent + 1` (compacted before a resume,
                        // or under a lagging subscriber's replay, up to all of it): `reset`
                        // first, under the last id it no longer holds, so that ids only
                        // grow; then what it holds, as for any resume. Ids that no event
                        // ever held (a hole) are read past.
                        let lost_upto = frames.first().map_or(target, |frame| frame.id - 1);
                        if lost_upto > sent && store.is_hole(sent + 1, lost_upto) {
                            sent = lost_upto;
                        } else if lost_upto > sent {
                            tracing::info!(sent, lost_upto, "event log no longer holds a subscriber's next events; resetting");
                            if let Some(reset) = reset_frame(lost_upto, "history_compacted") {
                                yield Ok(reset);
                            }
                            sent = lost_upto;
                        }
                        for frame in frames {
                            sent = frame.id;
                            yield Ok(frame.bytes);
                        }
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "event log read failed; closing stream");
                        return;
                    }
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                received = live.recv() => match received {
                    Ok(frame) if frame.id <= sent => {}
                    Ok(frame) if frame.id == sent + 1 => {
                        sent = frame.id;
                        yield Ok(frame.bytes.clone());
                    }
                    Ok(frame) => {
                        // A gap: the missing ids are in the log; this one comes after them.
                        target = frame.id;
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "subscriber lagged; catching up from the log");
                        target = store.watermark();
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = keep_alive.tick() => yield Ok(Bytes::from_static(b": keep-alive\n\n")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::store::event_ids_testing::{lose_the_apply_log, open, settle};

    /// The events a stream from `last_event_id` sends before it waits for live ones,
    /// as (id, event type).
    async fn replayed(store: &Store, last_event_id: u64) -> Vec<(u64, String)> {
        let stream = event_stream(
            store.clone(),
            Hub::new(),
            Metrics::new(),
            CancellationToken::new(),
            Some(last_event_id),
        );
        let mut stream = std::pin::pin!(stream);
        let mut events = Vec::new();
        while let Ok(Some(Ok(bytes))) =
            tokio::time::timeout(Duration::from_millis(500), stream.next()).await
        {
            let text = String::from_utf8(bytes.to_vec()).expect("UTF-8");
            let field = |name: &str| {
                text.lines()
                    .find_map(|line| line.strip_prefix(name))
                    .map(|value| value.trim().to_owned())
            };
            if let (Some(id), Some(event)) = (field("id:"), field("event:")) {
                events.push((id.parse().expect("a numeric id"), event));
            }
        }
        events
    }

    /// After a power loss took events 3 and 4 (`store::event_ids`): a client that saw
    /// them resets; one that did not reads on across their ids as if there were none.
    #[tokio::test]
    async fn a_resume_reads_past_a_hole_in_the_ids_and_resets_from_inside_one() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = open(dir.path(), Some("boot-1"));
        settle(&store, &["a", "b"]);
        store.checkpoint().expect("in sled, synced");
        settle(&store, &["c", "d"]);
        drop(store);
        lose_the_apply_log(dir.path());
        let store = open(dir.path(), Some("boot-2"));
        let [(first, last)] = store.event_id_holes() else {
            panic!("one hole: {:?}", store.event_id_holes());
        };
        assert_eq!(*first, 3);
        // No event since the hole: a client that resumes from the snapshot's watermark
        // goes live with no reset; one that saw a lost event resets to it.
        assert_eq!(store.watermark(), 2);
        assert_eq!(replayed(&store, store.watermark()).await, []);
        assert_eq!(replayed(&store, 4).await, [(2, "reset".to_owned())]);
        let next = settle(&store, &["e"])[0];
        assert_eq!(next, last + 1);

        let settled = |id| (id, "projection:settled".to_owned());
        assert_eq!(replayed(&store, 1).await, [settled(2), settled(next)]);
        assert_eq!(replayed(&store, 2).await, [settled(next)], "no reset");
        for seen in [3, 4, *last] {
            assert_eq!(
                replayed(&store, seen).await,
                [(next, "reset".to_owned())],
                "from {seen}, which the server no longer has"
            );
        }
        assert_eq!(replayed(&store, next).await, []);
    }
}
