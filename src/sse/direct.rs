//! The direct path of `GET /api/events`: a connection whose first request is an event
//! stream is answered on the socket itself, without an HTTP connection object.
//!
//! Why: hyper keeps a read buffer and a write buffer (8 KiB each) and its connection
//! state for a connection's whole life, because the connection may carry another
//! request. An SSE subscriber never sends one: its connection is a single response that
//! lasts for hours, and at ten thousand subscribers those buffers are most of the
//! server's memory. Here a subscriber costs its task, its broadcast receiver and its
//! keep-alive timer, a few KiB.
//!
//! Only an unambiguous request takes this path: the connection's first head parses as
//! HTTP/1.1 (httparse), is `GET /api/events` with no body and no upgrade. Anything
//! else, and every connection that has served another request first, goes to hyper
//! with the bytes the accept loop (`net`) read, or is refused there (`head`). The
//! answer is the same response as the
//! routed handler's ([`events_response`]), status line and headers written as they are,
//! with `Connection: close` and a close-delimited body, which every SSE client reads.

use std::io;

use axum::extract::Query;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};
use axum::response::Response;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::events_response;
use crate::AppState;

/// The path this module serves, and the first bytes of a request for it.
const EVENTS_PATH: &str = "/api/events";
const EVENTS_REQUEST_PREFIX: &[u8] = b"GET /api/events";
/// Most request headers considered; a request with more goes to hyper.
const MAX_HEADERS: usize = 32;

/// A parsed `GET /api/events` request head.
pub struct EventsRequest {
    uri: Uri,
    headers: HeaderMap,
}

/// An event-stream request that this module can answer, from a connection's first
/// bytes, or `None` for hyper (also while the head is not whole).
pub fn parse(bytes: &[u8]) -> Option<EventsRequest> {
    // A cheap look first: nearly every connection is something else.
    if !bytes.starts_with(EVENTS_REQUEST_PREFIX) {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(_) = request.parse(bytes).ok()? else {
        return None;
    };
    if request.method != Some("GET") || request.version != Some(1) {
        return None;
    }
    let uri: Uri = request.path?.parse().ok()?;
    if uri.path() != EVENTS_PATH {
        return None;
    }
    let mut header_map = HeaderMap::with_capacity(request.headers.len());
    for header in request.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(header.value).ok()?;
        header_map.append(name, value);
    }
    let has_body = header_map.contains_key("transfer-encoding")
        || header_map
            .get("content-length")
            .is_some_and(|length| length.as_bytes() != b"0");
    if has_body || header_map.contains_key("upgrade") {
        return None;
    }
    Some(EventsRequest {
        uri,
        headers: header_map,
    })
}

/// Answers the request on the socket: the response head, then the body until it ends
/// (shutdown), the client goes away, or a write fails.
///
/// # Errors
/// When the socket fails; the stream is over then.
pub async fn serve(
    mut stream: TcpStream,
    request: EventsRequest,
    state: AppState,
) -> io::Result<()> {
    let query = Query::try_from_uri(&request.uri);
    let shutdown = state.shutdown.clone();
    let response = events_response(state, &request.headers, query);
    let (mut reader, mut writer) = stream.split();
    writer.write_all(&closing_head(&response)).await?;
    let mut body = response.into_body().into_data_stream();
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            chunk = body.next() => match chunk {
                // A client that does not read holds the write up: not past shutdown,
                // which would otherwise wait the whole drain timeout for it.
                Some(Ok(bytes)) => tokio::select! {
                    written = writer.write_all(&bytes) => written?,
                    () = shutdown.cancelled() => return Ok(()),
                },
                Some(Err(err)) => return Err(io::Error::other(err)),
                None => break,
            },
            // The client sends nothing more; a read returns only when it hangs up.
            read = reader.read(&mut scratch) => {
                if read? == 0 {
                    return Ok(());
                }
            }
        }
    }
    writer.shutdown().await
}

/// The status line and headers of `response`, and `Connection: close`: its body ends
/// where the connection does, or where its own `Content-Length` says (RFC 9112,
/// section 6.3).
pub(crate) fn closing_head<B>(response: &Response<B>) -> Vec<u8> {
    let status = response.status();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in response.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"connection: close\r\n\r\n");
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_stream_request_is_recognised_with_its_resume_point() {
        let head =
            b"GET /api/events?last_event_id=7 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 9\r\n\r\n";
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(b"pipelined bytes are not part of the head");
        let request = parse(&bytes).expect("an events request");
        assert_eq!(request.uri.query(), Some("last_event_id=7"));
        assert_eq!(request.headers["last-event-id"], "9");
    }

    #[test]
    fn anything_unusual_is_left_to_hyper() {
        for head in [
            &b"GET /api/events HTTP/1.1\r\nHost: x\r\n"[..],
            b"GET /api/eventsource HTTP/1.1\r\n\r\n",
            b"GET /api/events/ HTTP/1.1\r\n\r\n",
            b"GET /api/events HTTP/1.0\r\n\r\n",
            b"POST /api/events HTTP/1.1\r\n\r\n",
            b"GET /api/events HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /api/events HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"GET /api/tasks HTTP/1.1\r\n\r\n",
        ] {
            assert!(parse(head).is_none(), "{}", String::from_utf8_lossy(head));
        }
    }
}
