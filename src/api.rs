//! The HTTP API: synchronous reads from the projection, asynchronous commands.
//!
//! A command handler validates what it can without state (shapes, lengths, ranges),
//! fingerprints the request, stores the command under its idempotency key, waits for
//! the shared fsync and only then answers 202: the 202 is a durable promise. What
//! depends on state (does the task exist, is `base_version` current) is the consumer's
//! job at apply time, reported as `command:failed`. What a request must be before a
//! handler sees it (the body guards, the extractors, the key, the inputs) is `extract`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::ApiError;
use crate::faults::{FaultSettings, FaultUpdate};
use crate::model::{
    unix_ms, unix_ms_ceil, CommandBody, CommandRecord, CommandStatus, CommandView, Task,
};
use crate::store::{Accepted, IntakeError, Store};
use crate::AppState;

mod extract;
mod snapshot;

pub use extract::{
    guard_bodies, AppJson, AppPath, AppQuery, BodyDeadlineExceeded, CreateTask, DeleteTask,
    IdempotencyKey, LikeTask, PathId, UpdateTask, BODY_DEADLINE, BODY_LIMIT_BYTES,
    BODY_STALL_TIMEOUT, IDEMPOTENCY_KEY_MAX,
};
use extract::{optional_json, valid_notes, valid_title};
pub use snapshot::{Snapshots, TaskList};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/tasks", get(tasks_list).post(tasks_create))
        .route(
            "/api/tasks/{id}",
            get(tasks_get).patch(tasks_update).delete(tasks_delete),
        )
        .route("/api/tasks/{id}/counts", get(tasks_counts))
        .route("/api/tasks/{id}/likes", post(tasks_like))
        .route("/api/commands", get(commands_by_key))
        .route("/api/commands/{command_id}", get(commands_get))
        .route("/api/dead-letters", get(dead_letters_list))
        .route("/api/faults", get(faults_get).put(faults_update))
        .route("/api/metrics", get(metrics_json))
        .route("/metrics", get(metrics_text))
}

// ----- reads ------------------------------------------------------------------------

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

async fn tasks_list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let body = state.snapshots.current(&state.store).await?;
    Ok(snapshot::response(body))
}

fn task_not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("task {id} does not exist"))
}

async fn tasks_get(
    State(state): State<AppState>,
    PathId(id): PathId,
) -> Result<Json<Arc<Task>>, ApiError> {
    state
        .store
        .task(id)
        .map(Json)
        .ok_or_else(|| task_not_found(id))
}

#[derive(Serialize)]
struct TaskCounts {
    id: Uuid,
    likes: i64,
    version: u64,
}

async fn tasks_counts(
    State(state): State<AppState>,
    PathId(id): PathId,
) -> Result<Json<TaskCounts>, ApiError> {
    let task = state.store.task(id).ok_or_else(|| task_not_found(id))?;
    Ok(Json(TaskCounts {
        id: task.id,
        likes: task.likes,
        version: task.version,
    }))
}

async fn commands_get(
    State(state): State<AppState>,
    PathId(command_id): PathId,
) -> Result<Json<CommandView>, ApiError> {
    let record = state.store.command_by_id(command_id).await?;
    record.map(|record| Json(record.view())).ok_or_else(|| {
        ApiError::NotFound(format!(
            "command {command_id} is unknown (or past its retention)"
        ))
    })
}

/// `GET /api/commands?key=K`: `key` is an idempotency key as the header carries it
/// unquoted, percent-encoded as a query value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandsQuery {
    key: Option<String>,
}

/// The command stored under an idempotency key: for a client that sent a command and
/// never saw its 202 (the answer was lost, the page went away), and so has no command
/// id to ask after. A 404 says no command with this key is pending or finished within
/// retention; it does not say one is not on its way.
async fn commands_by_key(
    State(state): State<AppState>,
    AppQuery(query): AppQuery<CommandsQuery>,
) -> Result<Json<CommandView>, ApiError> {
    let raw = query.key.ok_or_else(|| {
        ApiError::BadRequest(
            "name the command by its idempotency key: GET /api/commands?key=KEY".to_owned(),
        )
    })?;
    let IdempotencyKey(key) = IdempotencyKey::parse_bare(raw)
        .map_err(|why| ApiError::BadRequest(format!("malformed key: {why}")))?;
    let record = state.store.command_by_key(key.clone()).await?;
    record.map(|record| Json(record.view())).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no command under the idempotency key {key:?} (never accepted, or past its retention)"
        ))
    })
}

#[derive(Serialize)]
struct DeadLetters {
    dead_letters: Vec<CommandView>,
}

async fn dead_letters_list(State(state): State<AppState>) -> Result<Json<DeadLetters>, ApiError> {
    let dead_letters = state
        .store
        .blocking(Store::dead_letters)
        .await?
        .iter()
        .map(CommandRecord::view)
        .collect();
    Ok(Json(DeadLetters { dead_letters }))
}

async fn faults_get(State(state): State<AppState>) -> Json<FaultSettings> {
    Json(state.faults.settings())
}

async fn faults_update(
    State(state): State<AppState>,
    AppJson(update): AppJson<FaultUpdate>,
) -> Result<Json<FaultSettings>, ApiError> {
    update.validate().map_err(ApiError::Invalid)?;
    let settings = state.faults.update(update);
    tracing::info!(?settings, "fault settings changed");
    Ok(Json(settings))
}

async fn metrics_json(State(state): State<AppState>) -> Json<crate::metrics::MetricsReport> {
    state.metrics.set_pending(state.store.pending_count());
    Json(state.metrics.report())
}

/// `GET /metrics`: OpenMetrics for a client that asks for it (Prometheus does), the
/// classic Prometheus text format otherwise.
async fn metrics_text(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("application/openmetrics-text"));
    state.metrics.set_pending(state.store.pending_count());
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            state.metrics.openmetrics(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            state.metrics.prometheus_text(),
        )
            .into_response()
    }
}

// ----- commands ---------------------------------------------------------------------

async fn tasks_create(
    State(state): State<AppState>,
    key: IdempotencyKey,
    AppJson(input): AppJson<CreateTask>,
) -> Result<Response, ApiError> {
    let title = valid_title(&input.title)?;
    let notes = valid_notes(input.notes.as_deref().unwrap_or(""))?;
    let fingerprint = fingerprint(&Method::POST, "/api/tasks", &input)?;
    let task_id = input.id.unwrap_or_else(Uuid::now_v7);
    submit(
        &state,
        key,
        fingerprint,
        task_id,
        CommandBody::Create { title, notes },
    )
    .await
}

async fn tasks_update(
    State(state): State<AppState>,
    PathId(id): PathId,
    key: IdempotencyKey,
    AppJson(input): AppJson<UpdateTask>,
) -> Result<Response, ApiError> {
    if input.title.is_none() && input.notes.is_none() && input.done.is_none() {
        return Err(ApiError::Invalid(
            "nothing to change: send at least one of title, notes, done".to_owned(),
        ));
    }
    let body = CommandBody::Update {
        title: input.title.as_deref().map(valid_title).transpose()?,
        notes: input.notes.as_deref().map(valid_notes).transpose()?,
        done: input.done,
        base_version: input.base_version,
    };
    let fingerprint = fingerprint(&Method::PATCH, &format!("/api/tasks/{id}"), &input)?;
    submit(&state, key, fingerprint, id, body).await
}

async fn tasks_delete(
    State(state): State<AppState>,
    PathId(id): PathId,
    key: IdempotencyKey,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let input: DeleteTask = optional_json(&headers, body)?;
    let fingerprint = fingerprint(&Method::DELETE, &format!("/api/tasks/{id}"), &input)?;
    let body = CommandBody::Delete {
        base_version: input.base_version,
    };
    submit(&state, key, fingerprint, id, body).await
}

async fn tasks_like(
    State(state): State<AppState>,
    PathId(id): PathId,
    key: IdempotencyKey,
    AppJson(input): AppJson<LikeTask>,
) -> Result<Response, ApiError> {
    if input.delta != 1 && input.delta != -1 {
        return Err(ApiError::Invalid(format!(
            "delta must be 1 or -1, got {}",
            input.delta
        )));
    }
    let fingerprint = fingerprint(&Method::POST, &format!("/api/tasks/{id}/likes"), &input)?;
    submit(
        &state,
        key,
        fingerprint,
        id,
        CommandBody::Like { delta: input.delta },
    )
    .await
}

/// Hash of method, path and the parsed body: the same key with another request is
/// refused. The parsed body, not the bytes, so formatting differences do not matter.
fn fingerprint<T: Serialize>(method: &Method, path: &str, input: &T) -> Result<String, ApiError> {
    let body = serde_json::to_vec(input).map_err(|err| ApiError::Internal(err.into()))?;
    let mut hasher = Sha256::new();
    hasher.update(method.as_str().as_bytes());
    hasher.update(b"\n");
    hasher.update(path.as_bytes());
    hasher.update(b"\n");
    hasher.update(&body);
    // Lower-case hex in one string (not a string per byte, as this once was).
    Ok(format!("{:x}", hasher.finalize()))
}

/// Keys whose first request is between its fingerprint check and its durable 202.
pub type InFlight = Arc<DashMap<String, ()>>;

/// Releases an in-flight key however the request ends.
struct InFlightGuard<'a> {
    in_flight: &'a InFlight,
    key: &'a str,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.in_flight.remove(self.key);
    }
}

async fn submit(
    state: &AppState,
    IdempotencyKey(key): IdempotencyKey,
    fingerprint: String,
    task_id: Uuid,
    body: CommandBody,
) -> Result<Response, ApiError> {
    // A failed sync of sled's files stops the server: 503 from then on, as in its drain.
    if state.shutdown.is_cancelled() || state.store.sync_has_failed() {
        return Err(ApiError::ShuttingDown);
    }
    // The draft's answer to a duplicate that races the original: 409, retry later.
    if state.in_flight.insert(key.clone(), ()).is_some() {
        return Err(ApiError::KeyInFlight(
            "the first request with this key is still being accepted; retry shortly".to_owned(),
        ));
    }
    let _guard = InFlightGuard {
        in_flight: &state.in_flight,
        key: &key,
    };
    let accepted_at = OffsetDateTime::now_utc();
    let due_at_ms = unix_ms_ceil(accepted_at) + millis(state.faults.command_delay());
    let record = CommandRecord::accepted(
        task_id,
        key.clone(),
        fingerprint,
        body,
        accepted_at,
        due_at_ms,
    );
    let accepted_now = state.intake.accept(record).await.map_err(|err| match err {
        // The seq block this accept needed could not be reserved: the server stops.
        IntakeError::Store(_) if state.store.sync_has_failed() => ApiError::ShuttingDown,
        IntakeError::Store(err) => ApiError::from(err),
        IntakeError::Stopped => ApiError::ShuttingDown,
    })?;
    // The intake answers once the command (or the original of a replay) is durable;
    // a new one is already counted and scheduled.
    match accepted_now {
        Accepted::New(record) => {
            tracing::debug!(command_id = %record.command_id, kind = ?record.kind(), %task_id, "command accepted");
            Ok(accepted(&record, false))
        }
        Accepted::Replay(existing) => {
            state.metrics.command_deduplicated();
            let age = accepted_at - existing.accepted_at;
            let overdue = existing.status == CommandStatus::Pending
                && age >= state.redeliver_after
                && unix_ms(accepted_at) >= existing.due_at_ms;
            if overdue {
                state.consumer.redeliver(&existing).await;
            }
            tracing::debug!(command_id = %existing.command_id, overdue, "idempotent replay");
            Ok(accepted(&existing, true))
        }
        Accepted::KeyReused(existing) => Err(ApiError::KeyReused(format!(
            "Idempotency-Key {key:?} was used for another request (command {})",
            existing.command_id
        ))),
        Accepted::Overloaded(refusal) => {
            state.metrics.command_refused();
            Err(ApiError::Overloaded(refusal))
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn accepted(record: &CommandRecord, replayed: bool) -> Response {
    let location = format!("/api/commands/{}", record.command_id);
    let mut response = (StatusCode::ACCEPTED, Json(record.accepted_response())).into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, location);
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stored records keep their fingerprints across versions of the server: a retry
    /// after an upgrade must still match, so the form is pinned (`sha256sum` of the
    /// same bytes).
    #[test]
    fn a_fingerprint_is_the_lower_case_hex_sha_256_of_method_path_and_body() {
        let print = fingerprint(&Method::POST, "/api/tasks", &serde_json::json!({ "a": 1 }))
            .expect("a fingerprint");
        assert_eq!(
            print,
            "5ece87e88d77748985d7b89c72a127cb1d034e251184cd447321b80970c396f2"
        );
    }
}
