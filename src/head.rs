//! A connection's first request head, judged before hyper reads it.
//!
//! Why: hyper refuses a head it cannot take (not HTTP/1.x, more header fields than it
//! keeps, a head longer than its buffer, a target that is not a URI, a
//! `Content-Length` that is not a number, a `Transfer-Encoding` that does not end in
//! `chunked`) with a bare status line and an empty body, and offers no hook to answer
//! otherwise. Every other error leaves this server as an RFC 9457 problem (`error`). So
//! the accept loop (`net`), which already reads each connection's first head for the
//! event-stream path, asks [`judge`] about it, and answers what hyper would
//! refuse itself: a problem+json body, and the connection closed. The status is
//! hyper's (a test holds it to hyper's own answers), but for two heads: an HTTP/2
//! preface gets 400 (hyper closes without an answer), and so does a `Content-Length`
//! past what a body can be (hyper: 431). The longest head is this server's choice,
//! [`MAX_HEAD_BYTES`], which `net` gives hyper too.
//!
//! `net` reads the first head until it is whole, however many segments it comes in,
//! and hands hyper what it read. A later request on a keep-alive connection is hyper's
//! to read: its bare answer to a head it cannot take is written as a problem on its way
//! out (`net::bare_errors`).

use axum::http::Uri;

use crate::error::ApiError;

/// Header fields a request may carry: hyper's own limit, past which it answers 431.
pub const MAX_HEADERS: usize = 100;
/// The longest request head this server takes, request line included (hyper's own
/// default is about 400 KiB; browsers and proxies send a few KiB). Longer is refused:
/// 414 when the request line alone is, 431 otherwise.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// What to do with the bytes of a head seen so far.
#[derive(Debug)]
pub enum Verdict {
    /// A whole head that hyper takes as it is.
    Pass,
    /// A head hyper would refuse without a body: answer this problem and close.
    Refuse(ApiError),
    /// Not whole yet.
    Partial,
}

/// Judges the first `bytes` of a connection: a head, whole or not yet, and maybe what
/// follows it.
pub fn judge(bytes: &[u8]) -> Verdict {
    // Not initialised: this runs for every new connection, and httparse writes each
    // header it parses before it is read.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    match request.parse_with_uninit_headers(bytes, &mut headers) {
        Err(httparse::Error::TooManyHeaders) => Verdict::Refuse(ApiError::HeaderFieldsTooLarge(
            format!("a request may carry at most {MAX_HEADERS} header fields"),
        )),
        Err(err) => Verdict::Refuse(ApiError::BadRequest(format!(
            "the request head does not parse as HTTP/1.1 ({err})"
        ))),
        Ok(httparse::Status::Partial) => Verdict::Partial,
        Ok(httparse::Status::Complete(_)) => match refusal(&request) {
            Some(problem) => Verdict::Refuse(problem),
            None => Verdict::Pass,
        },
    }
}

/// The problem for a head of [`MAX_HEAD_BYTES`] that is not whole.
pub fn too_long(seen: &[u8]) -> ApiError {
    let limit = MAX_HEAD_BYTES / 1024;
    if seen.contains(&b'\n') {
        ApiError::HeaderFieldsTooLarge(format!("a request head may be at most {limit} KiB"))
    } else {
        ApiError::UriTooLong(format!("a request line may be at most {limit} KiB"))
    }
}

/// What hyper would refuse in a head that parses: the checks of its request decoder
/// (hyper 1's `role.rs`), in its order. A `Content-Length` after a `Transfer-Encoding`
/// is not read at all, as there.
fn refusal(request: &httparse::Request) -> Option<ApiError> {
    let target = request.path.unwrap_or_default();
    if Uri::try_from(target).is_err() {
        return Some(ApiError::BadRequest(
            "the request target is not a valid URI".to_owned(),
        ));
    }
    let bad = |detail: &str| Some(ApiError::BadRequest(detail.to_owned()));
    let mut content_length = None;
    let mut transfer_coding: Option<&[u8]> = None;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if request.version == Some(0) {
                return bad("HTTP/1.0 has no Transfer-Encoding");
            }
            if !header
                .value
                .iter()
                .all(|byte| matches!(byte, b' '..=b'~' | b'\t'))
            {
                return bad("Transfer-Encoding must be visible ASCII");
            }
            transfer_coding = header
                .value
                .rsplit(|&byte| byte == b',')
                .next()
                .map(<[u8]>::trim_ascii);
        } else if header.name.eq_ignore_ascii_case("content-length") && transfer_coding.is_none() {
            let length = parse_length(header.value);
            if length.is_none() || content_length.is_some_and(|first| Some(first) != length) {
                return bad("Content-Length must be one number of bytes a body can have");
            }
            content_length = length;
        }
    }
    match transfer_coding {
        Some(last) if !last.eq_ignore_ascii_case(b"chunked") => {
            bad("a request's Transfer-Encoding must end in chunked")
        }
        _ => None,
    }
}

/// The largest `Content-Length` hyper takes (it keeps the two values above for itself,
/// and answers 431 to them).
const MAX_CONTENT_LENGTH: u64 = u64::MAX - 2;

/// A `Content-Length` value as hyper reads one: ASCII digits only (no sign, no list),
/// at most [`MAX_CONTENT_LENGTH`].
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let length: u64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    (length <= MAX_CONTENT_LENGTH).then_some(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(verdict: Verdict) -> Option<u16> {
        match verdict {
            Verdict::Refuse(problem) => Some(
                axum::response::IntoResponse::into_response(problem)
                    .status()
                    .as_u16(),
            ),
            _ => None,
        }
    }

    #[test]
    fn heads_hyper_takes_pass() {
        for head in [
            &b"GET /api/tasks HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET /api/tasks?x=%ff HTTP/1.0\r\n\r\n",
            b"POST /api/tasks HTTP/1.1\r\nContent-Length: 12\r\n\r\n{\"title\":1}",
            b"POST /api/tasks HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n",
            b"POST /api/tasks HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n",
            // hyper does not read a Content-Length after a Transfer-Encoding.
            b"POST /api/tasks HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
        ] {
            let verdict = judge(head);
            assert!(
                matches!(verdict, Verdict::Pass),
                "{}: {verdict:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn heads_hyper_would_refuse_bare_are_problems_with_its_status() {
        let many_fields: Vec<u8> = (0..=MAX_HEADERS)
            .flat_map(|n| format!("X-Field-{n}: v\r\n").into_bytes())
            .collect();
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (b"GARBAGE\r\n\r\n".to_vec(), 400),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
                400,
            ),
            (b"GET / HTTP/9.9\r\n\r\n".to_vec(), 400),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), 400),
            (b"GET /api/tasks/\xff\xfe HTTP/1.1\r\n\r\n".to_vec(), 400),
            (b"GET /a b HTTP/1.1\r\n\r\n".to_vec(), 400),
            (
                b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_vec(),
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_vec(),
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n".to_vec(),
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n".to_vec(),
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: \xe9chunked\r\n\r\n".to_vec(),
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".to_vec(),
                400,
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                400,
            ),
            (
                [&b"GET / HTTP/1.1\r\n"[..], &many_fields, b"\r\n"].concat(),
                431,
            ),
        ];
        for (head, expected) in cases {
            assert_eq!(
                status(judge(&head)),
                Some(expected),
                "{}",
                String::from_utf8_lossy(&head)
            );
        }
    }

    #[test]
    fn a_head_not_whole_is_partial() {
        assert!(matches!(
            judge(b"GET /api/tasks HTTP/1.1\r\nHost: x\r\n"),
            Verdict::Partial
        ));
    }

    /// What hyper, configured as `net` configures it, answers to `head` on a connection
    /// of its own: its status, `None` when it closes without an answer.
    async fn hyper_status(head: &[u8]) -> Option<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(1 << 20);
        let service = hyper::service::service_fn(|_request| async {
            Ok::<_, std::convert::Infallible>(axum::http::Response::new(axum::body::Body::empty()))
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.max_buf_size(MAX_HEAD_BYTES);
        let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let served = tokio::spawn(connection);
        let (mut read, mut write) = tokio::io::split(client);
        // The write side stays open: hyper (without half-close) drops a request whose
        // client closed its side. Each head here ends in hyper closing the connection.
        let _ = write.write_all(head).await;
        // Up to the end of the answer's head, or the end of the connection.
        let mut answer = Vec::new();
        let read_head = async {
            let mut chunk = [0u8; 1024];
            while !answer.windows(4).any(|window| window == b"\r\n\r\n") {
                match read.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => answer.extend_from_slice(&chunk[..read]),
                }
            }
        };
        let answered = tokio::time::timeout(std::time::Duration::from_secs(10), read_head).await;
        assert!(answered.is_ok(), "hyper neither answered nor closed");
        served.abort();
        let answer = String::from_utf8_lossy(&answer);
        answer.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    /// The refusals follow hyper's own: checked against hyper itself, so that an upgrade
    /// that moves its rules shows here. Where this server says more than hyper does, the
    /// difference is named.
    #[tokio::test]
    async fn each_refusal_is_hyper_s_own_status_or_a_named_difference() {
        let many_fields: Vec<u8> = (0..=MAX_HEADERS)
            .flat_map(|n| format!("X-Field-{n}: v\r\n").into_bytes())
            .collect();
        let long_line = [
            &b"GET /"[..],
            &vec![b'a'; MAX_HEAD_BYTES],
            b" HTTP/1.1\r\n\r\n",
        ]
        .concat();
        let long_field = [
            &b"GET / HTTP/1.1\r\nX-Big: "[..],
            &vec![b'a'; 2 * MAX_HEAD_BYTES],
            b"\r\n\r\n",
        ]
        .concat();
        // (head, hyper's status, ours when it differs)
        let cases: Vec<(Vec<u8>, Option<u16>, Option<u16>)> = vec![
            (
                b"GET /api/tasks HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                Some(200),
                None,
            ),
            (b"GARBAGE\r\n\r\n".to_vec(), Some(400), None),
            (b"GET / HTTP/9.9\r\n\r\n".to_vec(), Some(400), None),
            (
                b"GET /api/tasks/\xff\xfe HTTP/1.1\r\n\r\n".to_vec(),
                Some(400),
                None,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
                Some(400),
                None,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n".to_vec(),
                Some(400),
                None,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_vec(),
                Some(400),
                None,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".to_vec(),
                Some(400),
                None,
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                Some(400),
                None,
            ),
            (
                [&b"GET / HTTP/1.1\r\n"[..], &many_fields, b"\r\n"].concat(),
                Some(431),
                None,
            ),
            (long_field, Some(431), None),
            (long_line, Some(414), None),
            // Named differences: a length past any body is malformed input here, and an
            // HTTP/2 preface gets an answer.
            (
                b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n".to_vec(),
                Some(431),
                Some(400),
            ),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
                None,
                Some(400),
            ),
        ];
        for (head, hyper, differs) in cases {
            let shown = String::from_utf8_lossy(&head[..head.len().min(60)]).into_owned();
            assert_eq!(
                hyper_status(&head).await,
                hyper,
                "hyper's answer to {shown:?}"
            );
            let bounded = &head[..head.len().min(MAX_HEAD_BYTES)];
            let ours = match judge(bounded) {
                Verdict::Pass => Some(200),
                // As much as a head may be, and still not whole: what `net`
                // answers.
                Verdict::Partial => status(Verdict::Refuse(too_long(bounded))),
                refused => status(refused),
            };
            assert_eq!(ours, differs.or(hyper), "our answer to {shown:?}");
        }
    }

    #[test]
    fn a_head_too_long_is_414_when_its_request_line_is_and_431_otherwise() {
        let line = [&b"GET /"[..], &vec![b'a'; MAX_HEAD_BYTES]].concat();
        let fields = [
            &b"GET / HTTP/1.1\r\nX-Big: "[..],
            &vec![b'a'; MAX_HEAD_BYTES],
        ]
        .concat();
        let status = |problem: ApiError| {
            axum::response::IntoResponse::into_response(problem)
                .status()
                .as_u16()
        };
        assert_eq!(status(too_long(&line[..MAX_HEAD_BYTES])), 414);
        assert_eq!(status(too_long(&fields[..MAX_HEAD_BYTES])), 431);
    }
}
