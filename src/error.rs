//! The HTTP error boundary: one enum, rendered as RFC 9457 `application/problem+json`.
//!
//! Every 4xx and 5xx leaves the server through [`ApiError`], including the rejections
//! of axum's own extractors and the router's 404/405, so a client parses one shape.
//! Server-side failures are logged with their cause and answered with a generic detail:
//! internals never leak.

use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tower_http::timeout::TimeoutError;

use crate::store::StoreError;

/// Media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Every error a request can end in: each variant names its status, and renders as
/// an RFC 9457 problem ([`IntoResponse`]). 5xx are logged; none shows internals.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed (bad JSON, bad path id, bad header).
    #[error("{0}")]
    BadRequest(String),
    /// 400: the `Idempotency-Key` header is missing or malformed.
    #[error("{0}")]
    BadIdempotencyKey(String),
    /// 404: no such resource.
    #[error("{0}")]
    NotFound(String),
    /// 405: the path exists, the method does not.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: a request with this idempotency key is being accepted right now.
    #[error("{0}")]
    KeyInFlight(String),
    /// 413: the body is larger than the limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 408: the request body stalled (`api::guard_bodies`).
    #[error("{0}")]
    RequestTimeout(String),
    /// 408: a connection's first request head began but was not whole in time (`net`).
    #[error("{0}")]
    HeadTimeout(String),
    /// 414: the request line is longer than a request head may be (`head`).
    #[error("{0}")]
    UriTooLong(String),
    /// 415: the body is not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 415: the body is encoded (`Content-Encoding`) in a way this server does not
    /// decode; answered with `Accept-Encoding: identity` (RFC 9110, 15.5.16).
    #[error("{0}")]
    UnsupportedContentCoding(String),
    /// 422: well-formed JSON that breaks a rule (a field, a range, a length).
    #[error("{0}")]
    Invalid(String),
    /// 422: the idempotency key was already used for a different request.
    #[error("{0}")]
    KeyReused(String),
    /// 431: more header fields, or a longer request head, than a request may have
    /// (`head`).
    #[error("{0}")]
    HeaderFieldsTooLarge(String),
    /// 500: a bug or a storage failure; the detail stays in the log.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
    /// 503: the process has as many files open as it may: this connection was taken
    /// only to be told so (`net`).
    #[error("the server holds as many connections as it may open files; retry shortly")]
    AtCapacity,
    /// 503: the server is shutting down and no longer accepts commands.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// 503: the server holds as many unapplied commands as it may (`--max-pending`,
    /// `--max-pending-bytes`), or applies them too far behind their due times
    /// (`--max-lag-ms`).
    #[error("{0}; nothing was stored, retry with the same Idempotency-Key")]
    Overloaded(crate::store::Refusal),
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        Self::Internal(err.into())
    }
}

/// RFC 9457 problem details. `type` is a relative URI that names the problem.
#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use ApiError::*;
        match self {
            BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request", "Bad request"),
            BadIdempotencyKey(_) => (
                StatusCode::BAD_REQUEST,
                "idempotency-key",
                "Missing or malformed Idempotency-Key",
            ),
            NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
            ),
            KeyInFlight(_) => (
                StatusCode::CONFLICT,
                "idempotency-key-in-flight",
                "A request with this Idempotency-Key is in progress",
            ),
            PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
            ),
            RequestTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "Request body timed out",
            ),
            HeadTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "Request head timed out",
            ),
            UriTooLong(_) => (StatusCode::URI_TOO_LONG, "uri-too-long", "URI too long"),
            UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            UnsupportedContentCoding(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-content-coding",
                "Unsupported content coding",
            ),
            Invalid(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "Validation failed",
            ),
            KeyReused(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency-Key reused with a different request",
            ),
            HeaderFieldsTooLarge(_) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header-fields-too-large",
                "Request header fields too large",
            ),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
            ),
            AtCapacity => (
                StatusCode::SERVICE_UNAVAILABLE,
                "at-capacity",
                "Service unavailable: no connection can be taken now",
            ),
            ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting-down",
                "Service unavailable",
            ),
            Overloaded(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "Overloaded: new commands are refused for now",
            ),
        }
    }
}

/// Longest `detail` a problem carries, in characters: one may quote what the client
/// sent (a path, a value), which can be tens of kilobytes.
const DETAIL_MAX_CHARS: usize = 500;

/// `detail` cut to [`DETAIL_MAX_CHARS`], saying so.
fn excerpt(detail: String) -> String {
    match detail.char_indices().nth(DETAIL_MAX_CHARS) {
        Some((cut, _)) => format!("{}… (cut at {DETAIL_MAX_CHARS} characters)", &detail[..cut]),
        None => detail,
    }
}

impl ApiError {
    /// The problem as a response whose body is at hand: for a writer that cannot wait
    /// for a body to be read (`net`), and for [`IntoResponse`].
    pub fn into_parts(self) -> (axum::http::response::Parts, Vec<u8>) {
        let (status, slug, title) = self.parts();
        let detail = match &self {
            ApiError::Internal(err) => {
                tracing::error!(error = ?err, "request failed");
                "the server could not complete the request; it has been logged".to_owned()
            }
            other => excerpt(other.to_string()),
        };
        let problem = Problem {
            kind: format!("/problems/{slug}"),
            title,
            status: status.as_u16(),
            detail,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let (mut parts, ()) = axum::http::Response::new(()).into_parts();
        parts.status = status;
        parts
            .headers
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if matches!(self, ApiError::UnsupportedContentCoding(_)) {
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            parts
                .headers
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        (parts, body)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (parts, body) = self.into_parts();
        Response::from_parts(parts, axum::body::Body::from(body))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::BytesRejection(rejection) => rejection.into(),
            JsonRejection::JsonDataError(err) => Self::Invalid(err.body_text()),
            JsonRejection::MissingJsonContentType(err) => {
                Self::UnsupportedMediaType(err.body_text())
            }
            other => Self::BadRequest(other.body_text()),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::PayloadTooLarge(rejection.body_text());
        }
        let stalled = std::iter::successors(
            Some(&rejection as &(dyn std::error::Error + 'static)),
            |err| err.source(),
        )
        .any(|err| err.is::<TimeoutError>());
        let late = std::iter::successors(
            Some(&rejection as &(dyn std::error::Error + 'static)),
            |err| err.source(),
        )
        .any(|err| err.is::<crate::api::BodyDeadlineExceeded>());
        if late {
            Self::RequestTimeout(format!(
                "the body was not whole {} s after its request",
                crate::api::BODY_DEADLINE.as_secs()
            ))
        } else if stalled {
            Self::RequestTimeout(format!(
                "no part of the body came for {} s",
                crate::api::BODY_STALL_TIMEOUT.as_secs()
            ))
        } else {
            Self::BadRequest(rejection.body_text())
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}
