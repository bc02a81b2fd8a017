//! What a request must be before a handler sees it: the body guards (size, stall),
//! the extractors whose rejections are problems, the `Idempotency-Key` header, the
//! command inputs and their checks, and optional JSON bodies.

use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use http_body::{Frame, SizeHint};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tower_http::timeout::RequestBodyTimeoutLayer;
use uuid::fmt::Hyphenated;
use uuid::Uuid;

use crate::error::ApiError;
use crate::model::{NOTES_MAX_CHARS, TITLE_MAX_CHARS};

/// Largest accepted request body.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;
/// Longest a request body may keep the server waiting for its next piece: then the
/// read fails and the request is answered 408.
pub const BODY_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a request body may take in all, however steadily it comes: then its read
/// fails and the request is answered 408.
pub const BODY_DEADLINE: Duration = Duration::from_secs(60);
/// Longest idempotency key, in characters (all visible ASCII).
pub const IDEMPOTENCY_KEY_MAX: usize = 255;

/// The routes of `router` with their request bodies guarded. A body that declares more
/// than [`BODY_LIMIT_BYTES`] is refused with 413 before any of it is read: a client that
/// waits on `Expect: 100-continue`, or never sends the body it announced, still gets its
/// answer (one without a declared length is cut off at the limit as it is read). A body
/// that stalls for [`BODY_STALL_TIMEOUT`], or is not whole [`BODY_DEADLINE`] after its
/// request came, fails its read: 408, and the connection is not held by a client that
/// went quiet mid-body, or sends a byte now and then.
pub fn guard_bodies<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .route_layer(RequestBodyTimeoutLayer::new(BODY_STALL_TIMEOUT))
        .route_layer(axum::middleware::from_fn(guard_body))
}

async fn guard_body(request: Request, next: Next) -> Response {
    let declared = request.body().size_hint().lower();
    if declared > BODY_LIMIT_BYTES as u64 {
        return ApiError::PayloadTooLarge(format!(
            "the body declares {declared} bytes; a request body may have at most \
             {BODY_LIMIT_BYTES} bytes"
        ))
        .into_response();
    }
    if request.body().is_end_stream() {
        // No body to wait for (a GET): no timer either.
        return next.run(request).await;
    }
    if let Some(coding) = content_coding(request.headers()) {
        return ApiError::UnsupportedContentCoding(format!(
            "the body is sent with Content-Encoding {coding}; send it unencoded (identity)"
        ))
        .into_response();
    }
    let deadline = tokio::time::Instant::now() + BODY_DEADLINE;
    next.run(request.map(|body| Body::new(Deadline::new(body, deadline))))
        .await
}

/// A content coding the request's body is sent in, other than `identity`: the server
/// decodes none, and would otherwise read the encoded bytes as JSON (RFC 9110, 8.4).
fn content_coding(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("(not visible ASCII)").split(','))
        .map(str::trim)
        .find(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("identity"))
        .map(str::to_owned)
}

/// A request body past its deadline ([`BODY_DEADLINE`]): the error its read fails with,
/// which the rejection names (`ApiError`'s `From<BytesRejection>`).
#[derive(Debug, thiserror::Error)]
#[error("the body was not whole {} s after its request", BODY_DEADLINE.as_secs())]
pub struct BodyDeadlineExceeded;

/// A body that fails with [`BodyDeadlineExceeded`] once `deadline` has passed, however
/// steadily its pieces come (the stall timeout resets at each one).
struct Deadline {
    body: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    fn new(body: Body, deadline: tokio::time::Instant) -> Self {
        Self {
            body,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }
}

impl HttpBody for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyDeadlineExceeded)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

// ----- extractors -------------------------------------------------------------------

/// A JSON body whose rejections are problem+json (400 syntax, 415 media type,
/// 413 size, 408 a body that stalled, 422 shape).
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct AppJson<T>(pub T);

/// A path parameter whose rejection is a 400 problem.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct AppPath<T>(pub T);

/// A task's or a command's id in a path: a UUID in the one form the API writes ids in,
/// hyphenated (8-4-4-4-12 hex digits, either case; written back in lowercase). A braced,
/// URN or unhyphenated spelling is a 400 problem, as in a body (`CreateTask::id`): an
/// id a client chose is found in the events and the task list as it wrote it, up to case.
pub struct PathId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let AppPath(id) = AppPath::<Hyphenated>::from_request_parts(parts, state).await?;
        Ok(Self(id.into_uuid()))
    }
}

/// A query string whose rejection is a 400 problem.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct AppQuery<T>(pub T);

/// The `Idempotency-Key` header (draft-ietf-httpapi-idempotency-key-header): 1 to 255
/// visible ASCII characters, bare or as an RFC 8941 string (`"abc"` is the key `abc`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey(pub String);

impl IdempotencyKey {
    /// # Errors
    /// A message saying what is wrong with the value.
    pub fn parse(raw: &[u8]) -> Result<Self, String> {
        let key = if raw.first() == Some(&b'"') {
            match sfv::Parser::parse_item(raw) {
                Ok(item) => match item.bare_item {
                    sfv::BareItem::String(text) if item.params.is_empty() => text,
                    _ => return Err("a quoted key must be a plain RFC 8941 string".to_owned()),
                },
                Err(err) => return Err(format!("not a valid RFC 8941 string: {err}")),
            }
        } else {
            String::from_utf8(raw.to_vec())
                .map_err(|_| "the key must be visible ASCII".to_owned())?
        };
        Self::parse_bare(key)
    }

    /// A key as it is, never quoted: 1 to 255 visible ASCII characters.
    ///
    /// # Errors
    /// A message saying what is wrong with the value.
    pub fn parse_bare(key: String) -> Result<Self, String> {
        if key.is_empty() || key.len() > IDEMPOTENCY_KEY_MAX {
            return Err(format!(
                "the key must be 1 to {IDEMPOTENCY_KEY_MAX} characters, got {}",
                key.len()
            ));
        }
        if !key.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(
                "the key must be visible ASCII (no spaces or control characters)".to_owned(),
            );
        }
        Ok(Self(key))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all("idempotency-key").iter();
        let value = values.next().ok_or_else(|| {
            ApiError::BadIdempotencyKey("every command needs an Idempotency-Key header".to_owned())
        })?;
        if values.next().is_some() {
            return Err(ApiError::BadIdempotencyKey(
                "send exactly one Idempotency-Key header".to_owned(),
            ));
        }
        Self::parse(value.as_bytes())
            .map_err(|why| ApiError::BadIdempotencyKey(format!("malformed Idempotency-Key: {why}")))
    }
}

// ----- inputs -----------------------------------------------------------------------

/// `POST /api/tasks`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    /// Chosen by the client so an optimistic UI has a stable id; generated if absent.
    /// Hyphenated only, as a path's id ([`PathId`]).
    #[serde(default, with = "uuid::serde::hyphenated::option")]
    pub id: Option<Uuid>,
    pub title: String,
    #[serde(default)]
    pub notes: Option<String>,
}

/// `PATCH /api/tasks/{id}`: at least one of title, notes, done.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateTask {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub notes: Option<String>,
    #[serde(default)]
    pub done: Option<bool>,
    #[serde(default)]
    pub base_version: Option<u64>,
}

/// `DELETE /api/tasks/{id}`'s optional body.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteTask {
    #[serde(default)]
    pub base_version: Option<u64>,
}

/// `POST /api/tasks/{id}/likes`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LikeTask {
    pub delta: i64,
}

pub(super) fn valid_title(title: &str) -> Result<String, ApiError> {
    let trimmed = title.trim();
    let chars = trimmed.chars().count();
    if chars == 0 || chars > TITLE_MAX_CHARS {
        return Err(ApiError::Invalid(format!(
            "title must be 1 to {TITLE_MAX_CHARS} characters after trimming, got {chars}"
        )));
    }
    Ok(trimmed.to_owned())
}

pub(super) fn valid_notes(notes: &str) -> Result<String, ApiError> {
    let chars = notes.chars().count();
    if chars > NOTES_MAX_CHARS {
        return Err(ApiError::Invalid(format!(
            "notes must be at most {NOTES_MAX_CHARS} characters, got {chars}"
        )));
    }
    Ok(notes.to_owned())
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(Ok(value)) = headers.get(header::CONTENT_TYPE).map(|v| v.to_str()) else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A body that may be empty; when present it must be JSON.
pub(super) fn optional_json<T: DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType(
            "Expected request with `Content-Type: application/json`".to_owned(),
        ));
    }
    let Json(value) = Json::<T>::from_bytes(&body)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use axum::routing::post;

    use super::*;

    /// `body` as a JSON `POST` to a route whose body is guarded and read as JSON.
    async fn guarded_json_post(body: axum::body::Body) -> Response {
        use tower::ServiceExt;

        let app: Router = guard_bodies(Router::new().route(
            "/",
            post(|AppJson(_): AppJson<serde_json::Value>| async { StatusCode::OK }),
        ));
        let request = Request::post("/")
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .expect("a request");
        app.oneshot(request).await.expect("an answer")
    }

    /// Whether the body never starts or stops halfway, the read fails after
    /// [`BODY_STALL_TIMEOUT`] and the client is told so: 408, a problem.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_is_answered_408() {
        use futures::stream::{self, StreamExt};

        type Piece = Result<Bytes, std::io::Error>;
        let bodies: [(&str, stream::BoxStream<'static, Piece>); 2] = [
            ("never starts", stream::pending().boxed()),
            (
                "stops halfway",
                stream::once(async { Ok(Bytes::from_static(b"{\"title\":")) })
                    .chain(stream::pending())
                    .boxed(),
            ),
        ];
        for (what, body) in bodies {
            let started = tokio::time::Instant::now();
            let response = guarded_json_post(axum::body::Body::from_stream(body)).await;
            assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT, "{what}");
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                crate::error::PROBLEM_JSON,
                "{what}"
            );
            assert!(started.elapsed() >= BODY_STALL_TIMEOUT, "{what}");
        }
    }

    /// A body that comes a byte at a time, each within the stall timeout, fails its
    /// read once [`BODY_DEADLINE`] has passed: 408, a problem that says so.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_trickles_past_its_deadline_is_answered_408() {
        use futures::stream;

        let trickle = stream::unfold((), |()| async {
            tokio::time::sleep(BODY_STALL_TIMEOUT / 2).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b" ")), ()))
        });
        let started = tokio::time::Instant::now();
        // Bounded: without its deadline the body would trickle on for a day.
        let response = tokio::time::timeout(
            2 * BODY_DEADLINE,
            guarded_json_post(axum::body::Body::from_stream(trickle)),
        )
        .await
        .expect("answered within twice the deadline");
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(started.elapsed() >= BODY_DEADLINE);
        assert!(started.elapsed() < BODY_DEADLINE + BODY_STALL_TIMEOUT);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("a body");
        let problem: serde_json::Value = serde_json::from_slice(&body).expect("a problem");
        assert_eq!(problem["status"], 408);
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|detail| detail.contains("not whole")),
            "{problem}"
        );
    }
}
