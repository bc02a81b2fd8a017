//! hyper's own error answers, written as problems.
//!
//! Why: hyper answers a request head it cannot take with a bare status line and an
//! empty body, and offers no hook to answer otherwise (hyperium/hyper#3225). The
//! accept loop judges a connection's first head itself (`head`), but a later request
//! on a keep-alive connection is hyper's to read. So the writer hyper is given looks at
//! each write for hyper's own error answer, in exactly the shape hyper writes it (400,
//! 414 or 431 with its reason phrase, and the fields `connection: close`,
//! `content-length: 0` and `date`, nothing else, the write holding that head alone),
//! and writes that status's problem in its place; hyper then closes the connection, and
//! whatever it still writes is dropped. Every error of this server's own carries a
//! problem+json body (`error`), so none has that shape; nor can a piece of a body,
//! which would have to end where such a head ends.
//!
//! Not caught: an error answer hyper puts behind bytes of the answer before it that the
//! client has not read yet (a handler that answered before reading its body, a slow
//! reader, then a malformed request): that one still goes out bare.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::http::StatusCode;
use tokio::io::AsyncWrite;

use crate::error::ApiError;

/// The statuses hyper answers a head it cannot take with (`Server::on_error`).
const BARE_STATUSES: [StatusCode; 3] = [
    StatusCode::BAD_REQUEST,
    StatusCode::URI_TOO_LONG,
    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
];

/// Writes through to `W`, but for hyper's own error answers (see the module docs).
pub struct ProblemWriter<W> {
    inner: W,
    state: State,
}

enum State {
    /// Every write goes through.
    Passing,
    /// The problem is being written in place of hyper's answer, `written` bytes of it so
    /// far; it stands for `stands_for` bytes of hyper's.
    Replacing {
        problem: Vec<u8>,
        written: usize,
        stands_for: usize,
    },
    /// The problem is written: what hyper still writes is dropped.
    Replaced,
}

impl<W> ProblemWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            state: State::Passing,
        }
    }
}

/// The status of hyper's own error answer if `bytes` are one, whole and alone.
fn bare_error(bytes: &[u8]) -> Option<StatusCode> {
    if !(bytes.starts_with(b"HTTP/1.1 4") || bytes.starts_with(b"HTTP/1.0 4")) {
        return None;
    }
    // One more field than hyper writes: a head with more is not hyper's.
    let mut headers = [httparse::EMPTY_HEADER; 4];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(length)) = response.parse(bytes) else {
        return None;
    };
    let status = StatusCode::from_u16(response.code?).ok()?;
    let fields: Vec<_> = response
        .headers
        .iter()
        .map(|field| (field.name.to_ascii_lowercase(), field.value))
        .collect();
    let hyper_s = length == bytes.len()
        && bytes
            .windows(2)
            .all(|pair| pair[1] != b'\n' || pair[0] == b'\r')
        && BARE_STATUSES.contains(&status)
        && response.reason == status.canonical_reason()
        && fields.len() == 3
        && fields.contains(&("connection".to_owned(), &b"close"[..]))
        && fields.contains(&("content-length".to_owned(), &b"0"[..]))
        && fields.iter().any(|(name, _)| name == "date");
    hyper_s.then_some(status)
}

/// The problem for a status hyper answered a request head with.
fn problem_for(status: StatusCode) -> ApiError {
    const HEAD: &str = "a request head on this connection";
    match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ApiError::HeaderFieldsTooLarge(format!(
            "{HEAD} is larger, or has more header fields, than a request may have"
        )),
        StatusCode::URI_TOO_LONG => {
            ApiError::UriTooLong(format!("{HEAD} has a request line longer than it may be"))
        }
        _ => ApiError::BadRequest(format!(
            "{HEAD} does not parse as HTTP/1.1; the connection is closed"
        )),
    }
}

impl<W: AsyncWrite + Unpin> ProblemWriter<W> {
    /// Writes the problem under way, if one is; then `Ready` with how many of hyper's
    /// bytes it stands for (0 when none was under way).
    fn poll_replacing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let State::Replacing {
            problem,
            written,
            stands_for,
        } = &mut self.state
        else {
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
        self.state = State::Replaced;
        Poll::Ready(Ok(stands_for))
    }

    /// What to do with a write of `length` bytes that begins with `first`: `None` to
    /// pass it through, else its answer (the problem written, or dropped after it).
    fn poll_own(
        &mut self,
        cx: &mut Context<'_>,
        first: &[u8],
        length: usize,
    ) -> Option<Poll<io::Result<usize>>> {
        match self.state {
            State::Passing => {
                let status = bare_error(first)?;
                tracing::debug!(%status, "hyper refused a request head; answered as a problem");
                self.state = State::Replacing {
                    problem: crate::net::problem_bytes(problem_for(status)),
                    written: 0,
                    stands_for: first.len(),
                };
            }
            State::Replaced => return Some(Poll::Ready(Ok(length))),
            State::Replacing { .. } => {}
        }
        // Never more than this write holds, whatever the bare answer's length was.
        Some(
            self.poll_replacing(cx)
                .map_ok(|stands_for| stands_for.min(length)),
        )
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for ProblemWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(answer) = this.poll_own(cx, buf, buf.len()) {
            return answer;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs
            .iter()
            .find(|buf| !buf.is_empty())
            .map_or(&[][..], |buf| &buf[..]);
        let length = bufs.iter().map(|buf| buf.len()).sum();
        if let Some(answer) = this.poll_own(cx, first, length) {
            return answer;
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
    use std::future::poll_fn;
    use tokio::io::AsyncWriteExt;

    /// hyper's answer to a head it cannot take, as it writes it.
    const BARE_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Sat, 28 Nov 2026 07:55:50 GMT\r\n\r\n";

    fn bare(status_line: &str) -> Vec<u8> {
        [
            status_line.as_bytes(),
            &BARE_400[b"HTTP/1.1 400 Bad Request".len()..],
        ]
        .concat()
    }

    /// A socket that takes at most 7 bytes a write, and is not ready every other time.
    #[derive(Default)]
    struct Trickle {
        out: Vec<u8>,
        wait: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.wait = !self.wait;
            if self.wait {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let took = buf.len().min(7);
            self.out.extend_from_slice(&buf[..took]);
            Poll::Ready(Ok(took))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    async fn written(pieces: &[&[u8]]) -> String {
        let mut writer = ProblemWriter::new(Trickle::default());
        for piece in pieces {
            writer.write_all(piece).await.expect("written");
        }
        writer.shutdown().await.expect("shut");
        String::from_utf8(writer.inner.out).expect("text")
    }

    #[tokio::test]
    async fn hyper_s_bare_errors_become_problems_with_their_status() {
        const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        for (bare, status) in [
            (BARE_400.to_vec(), "400"),
            (bare("HTTP/1.0 400 Bad Request"), "400"),
            (bare("HTTP/1.1 414 URI Too Long"), "414"),
            (bare("HTTP/1.1 431 Request Header Fields Too Large"), "431"),
        ] {
            // Whatever hyper writes after its answer is dropped.
            let out = written(&[OK.as_bytes(), &bare, b"more"]).await;
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
            let body: serde_json::Value = serde_json::from_str(body).expect("a problem alone");
            assert_eq!(body["status"].to_string(), status);
        }
    }

    #[tokio::test]
    async fn anything_but_hyper_s_own_shape_passes_untouched() {
        let passing = [
            &b"HTTP/1.1 404 Not Found\r\ncontent-type: application/problem+json\r\ncontent-length: 2\r\n\r\n{}"[..],
            b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 4",
            // A piece of an event stream, a title in it.
            b"HTTP/1.1 400 x\",\"done\":false}\n\n",
            // hyper's head with more after it, with other fields, or another status.
            &[BARE_400, b"data"].concat(),
            &bare("HTTP/1.1 400 Bad Request").replace_bytes(b"close", b"keep-alive"),
            &bare("HTTP/1.1 500 Internal Server Error"),
            &bare("HTTP/1.1 400 Bad Thing"),
            &BARE_400.replace_bytes(b"\r\n", b"\n"),
        ];
        for piece in passing {
            assert_eq!(written(&[piece]).await.as_bytes(), piece);
        }
    }

    #[tokio::test]
    async fn a_vectored_write_is_replaced_too_and_counted_as_it_was() {
        let mut writer = ProblemWriter::new(Trickle::default());
        let slices = [io::IoSlice::new(b""), io::IoSlice::new(BARE_400)];
        let took = poll_fn(|cx| Pin::new(&mut writer).poll_write_vectored(cx, &slices))
            .await
            .expect("written");
        assert_eq!(took, BARE_400.len());
        let problem = crate::net::problem_bytes(problem_for(StatusCode::BAD_REQUEST));
        assert_eq!(writer.inner.out, problem);
    }

    /// A flush may finish the problem between two tries of hyper's write: the retry is
    /// counted as written, and the problem goes out once.
    #[tokio::test]
    async fn a_problem_finished_by_a_flush_is_not_written_again() {
        let mut writer = ProblemWriter::new(Trickle::default());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut writer)
            .poll_write(&mut cx, BARE_400)
            .is_pending());
        writer.flush().await.expect("flushed");
        let took = poll_fn(|cx| Pin::new(&mut writer).poll_write(cx, &BARE_400[..5]))
            .await
            .expect("written");
        assert_eq!(took, 5, "never more than the write holds");
        let problem = crate::net::problem_bytes(problem_for(StatusCode::BAD_REQUEST));
        assert_eq!(writer.inner.out, problem);
    }

    trait ReplaceBytes {
        fn replace_bytes(&self, from: &[u8], to: &[u8]) -> Vec<u8>;
    }

    impl ReplaceBytes for [u8] {
        fn replace_bytes(&self, from: &[u8], to: &[u8]) -> Vec<u8> {
            let text = String::from_utf8_lossy(self);
            let (from, to) = (String::from_utf8_lossy(from), String::from_utf8_lossy(to));
            text.replace(&*from, &to).into_bytes()
        }
    }
}
