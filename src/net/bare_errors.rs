//! hyper's own error answers, written as problems.
//!
//! Why: hyper answers a request head it cannot take with a bare status line and an
//! empty body, and offers no hook to answer otherwise (hyperium/hyper#3225). The
//! accept loop judges a connection's first head itself (`head`), but a later request
//! on a keep-alive connection is hyper's to read. So the writer hyper is given sees
//! each answer's head go by, and one that only hyper writes, an error with no
//! `Content-Type` (every error of this server's own is a problem+json body, `error`),
//! is replaced with that status's problem, the connection closing as hyper closes it.
//! Anything else passes through untouched, at the cost of a look at its first bytes.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::http::StatusCode;
use tokio::io::AsyncWrite;

use crate::error::ApiError;

/// Header fields hyper's own error answer carries (connection, content-length, date),
/// with room to spare.
const BARE_HEAD_FIELDS: usize = 8;

/// Writes through to `W`, but for hyper's own error answers (see the module docs).
pub struct ProblemWriter<W> {
    inner: W,
    /// The problem being written in place of hyper's answer: its bytes, how many are
    /// written, and how many of hyper's bytes it stands for.
    replacing: Option<(Vec<u8>, usize, usize)>,
}

impl<W> ProblemWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            replacing: None,
        }
    }
}

/// The status of hyper's own error answer if `bytes` open with one: a whole response
/// head, 4xx or 5xx, with no `Content-Type`.
fn bare_error(bytes: &[u8]) -> Option<StatusCode> {
    if !(bytes.starts_with(b"HTTP/1.1 4") || bytes.starts_with(b"HTTP/1.1 5")) {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; BARE_HEAD_FIELDS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(httparse::Status::Complete(_))
            if !response
                .headers
                .iter()
                .any(|field| field.name.eq_ignore_ascii_case("content-type")) =>
        {
            StatusCode::from_u16(response.code?).ok()
        }
        _ => None,
    }
}

/// The problem for a status hyper answered a request head with.
fn problem_for(status: StatusCode) -> ApiError {
    const LATER: &str = "a later request on this connection";
    match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ApiError::HeaderFieldsTooLarge(format!(
            "{LATER} has a head larger, or more header fields, than a request may have"
        )),
        StatusCode::URI_TOO_LONG => {
            ApiError::UriTooLong(format!("{LATER} has a request line longer than it may be"))
        }
        StatusCode::REQUEST_TIMEOUT => {
            ApiError::HeadTimeout(format!("{LATER} did not send its head whole in time"))
        }
        _ => ApiError::BadRequest(format!(
            "{LATER} does not parse as HTTP/1.1 (answered {status}); the connection is closed"
        )),
    }
}

impl<W: AsyncWrite + Unpin> ProblemWriter<W> {
    /// Writes the problem under way; `Ready` with how many of hyper's bytes it stands
    /// for once it is all written.
    fn poll_replacing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some((problem, written, stands_for)) = &mut self.replacing else {
            return Poll::Ready(Ok(0));
        };
        while *written < problem.len() {
            let wrote = ready!(Pin::new(&mut self.inner).poll_write(cx, &problem[*written..]))?;
            if wrote == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += wrote;
        }
        let stands_for = *stands_for;
        self.replacing = None;
        Poll::Ready(Ok(stands_for))
    }

    /// Whether `first` (the start of what hyper writes now) is its own error answer:
    /// then its problem is under way in its place.
    fn replaces(&mut self, first: &[u8]) -> bool {
        if self.replacing.is_some() {
            return true;
        }
        let Some(status) = bare_error(first) else {
            return false;
        };
        tracing::debug!(%status, "hyper refused a later request head; answered as a problem");
        let problem = crate::net::problem_bytes(problem_for(status));
        self.replacing = Some((problem, 0, first.len()));
        true
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for ProblemWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.replaces(buf) {
            return this.poll_replacing(cx);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs.iter().find(|buf| !buf.is_empty());
        if first.is_some_and(|first| this.replaces(first)) {
            return this.poll_replacing(cx);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacing(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacing(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const BARE_400: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Sat, 28 Nov 2026 07:55:50 GMT\r\n\r\n";

    async fn written(pieces: &[&[u8]]) -> String {
        let mut out = Vec::new();
        let mut writer = ProblemWriter::new(&mut out);
        for piece in pieces {
            writer.write_all(piece).await.expect("written");
        }
        writer.shutdown().await.expect("shut");
        String::from_utf8(out).expect("text")
    }

    #[tokio::test]
    async fn hyper_s_bare_errors_become_problems_with_their_status() {
        for (bare, status) in [
            (BARE_400.to_vec(), "400"),
            (BARE_400.to_vec().replace_status(b"414 URI Too Long"), "414"),
            (
                BARE_400
                    .to_vec()
                    .replace_status(b"431 Request Header Fields Too Large"),
                "431",
            ),
        ] {
            const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            let out = written(&[OK.as_bytes(), &bare]).await;
            let problem = out
                .strip_prefix(OK)
                .expect("the answer before it, untouched");
            assert!(
                problem.starts_with(&format!("HTTP/1.1 {status} ")),
                "{problem}"
            );
            assert!(problem.contains("content-type: application/problem+json\r\n"));
            assert!(problem.contains("connection: close\r\n"));
            let body = problem.split_once("\r\n\r\n").expect("a head").1;
            let body: serde_json::Value = serde_json::from_str(body).expect("a problem");
            assert_eq!(body["status"].to_string(), status);
        }
    }

    #[tokio::test]
    async fn answers_of_this_server_s_own_pass_untouched() {
        let own = [
            &b"HTTP/1.1 404 Not Found\r\ncontent-type: application/problem+json\r\ncontent-length: 2\r\n\r\n{}"[..],
            b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 4",
            b"{\"title\":\"HTTP/1.1 400 Bad Request\"}",
        ];
        for piece in own {
            assert_eq!(written(&[piece]).await.as_bytes(), piece);
        }
    }

    trait ReplaceStatus {
        fn replace_status(self, status: &[u8]) -> Vec<u8>;
    }

    impl ReplaceStatus for Vec<u8> {
        fn replace_status(self, status: &[u8]) -> Vec<u8> {
            [
                &b"HTTP/1.1 "[..],
                status,
                &self[b"HTTP/1.1 400 Bad Request".len()..],
            ]
            .concat()
        }
    }
}
