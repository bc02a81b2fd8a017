//! The HTTP server loop: accept, HTTP/1.1 connections, graceful shutdown.
//!
//! `axum::serve` would do, but three things it does not fit a server whose main load is
//! thousands of idle SSE subscribers and small latency-sensitive frames:
//! - it leaves Nagle's algorithm on, so an SSE frame written while the previous one is
//!   unacknowledged waits for the peer's delayed ACK (tens of milliseconds);
//! - it serves HTTP/1 and HTTP/2 on every connection (hyper-util's auto builder) and
//!   rebuilds the router for each one, which costs about 17 KiB per idle connection;
//! - it cannot be told how long to wait for a request head.
//!
//! So this loop sets `TCP_NODELAY`, serves HTTP/1.1 only (browsers speak HTTP/1.1 to a
//! plain-http origin anyway), shares one router across connections, bounds the time to
//! read a request head, and on shutdown stops accepting, lets every connection finish
//! its current response (event streams end on the same shutdown token; a response that
//! writes nothing for [`SHUTDOWN_STALL`], its client not reading, is cut) and waits for
//! them, up to [`DRAIN_TIMEOUT`]. A connection that opens with an event-stream request
//! skips hyper altogether (`sse::direct`): an idle subscriber then costs a few KiB. One
//! that opens with a head hyper would refuse with an empty body is answered here with
//! a problem (`head`). To tell them apart, the loop reads each connection's first head
//! itself; hyper then reads those bytes before the socket's. What hyper refuses of a
//! later request on the connection, it answers bare; the writer it is given puts that
//! status's problem in its place (`bare_errors`).

mod bare_errors;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::Router;
use bytes::{BufMut, Bytes, BytesMut};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use std::io::Cursor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::io::InspectWriter;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::bare_errors::ProblemWriter;
use crate::error::ApiError;
use crate::head::{self, Verdict};
use crate::sse::direct;
use crate::AppState;

/// Connections the kernel queues before they are accepted: after a restart, every
/// subscriber reconnects within about a second (`retry: 1000`), thousands at once; a
/// full queue drops the rest's SYNs, and they wait a second or more to try again. The
/// kernel caps it at `net.core.somaxconn` (4096 by default since Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;
/// How long a client may take to send a request head before its connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for open connections to finish their responses.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error, so that the loop does not spin on it; after `EMFILE`
/// (out of file descriptors) when the [`Reserve`] is in use, while connections close.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// How long the loop waits for a connection to refuse with the reserve let go of.
const RESERVE_ACCEPT_WAIT: Duration = Duration::from_millis(50);
/// Once the shutdown has begun, how long a connection served by hyper may write
/// nothing before it is closed: a client that does not read would otherwise hold the
/// drain for all of [`DRAIN_TIMEOUT`], where one still reading a large response may
/// finish it (one served on the socket ends at once: `sse::direct`). Seconds, not
/// less: the kernel's send buffer (megabytes, autotuned) takes a slow reader's bytes in
/// bursts, and a writer waits between them while the buffer drains.
const SHUTDOWN_STALL: Duration = Duration::from_secs(5);
/// How often running out of file descriptors is logged, with how many connections
/// were refused for it meanwhile.
const OUT_OF_FILES_LOG_EVERY: Duration = Duration::from_secs(10);
/// The first read of a connection's bytes: every head but a long one. A head not whole
/// in it is read on, up to `head::MAX_HEAD_BYTES`.
const FIRST_LOOK_BYTES: usize = 4096;
/// How many times a first head still arriving is judged before it is left to hyper
/// (see `first_request`).
const MAX_LOOKS: u32 = 8;
/// After refusing a head, how long and how much of what the client still sends is
/// read and dropped before closing: closing with unread bytes resets the connection,
/// and a reset can reach the client before it has read the answer.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
const REFUSAL_LINGER_BYTES: usize = 1 << 20;
/// The same for a connection refused at the open-file limit: only what has already
/// come (its request, usually), since the next one waits for its descriptor.
const AT_CAPACITY_LINGER: Duration = Duration::from_millis(20);

/// Serves the app (`crate::app`) on `listener` until `shutdown` is cancelled, then
/// drains.
pub async fn serve(listener: TcpListener, state: AppState, shutdown: CancellationToken) {
    let app = crate::app(state.clone());
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // The longest head this server takes, also on a keep-alive connection's later
        // requests, which `head` does not see (hyper's own default is about 400 KiB).
        // hyper bounds its write buffer by the same size: a larger response is flushed
        // in parts, as a body stream is anyway.
        .max_buf_size(head::MAX_HEAD_BYTES);
    // Shared: every connection's task holds it, a subscriber's too.
    let builder = Arc::new(builder);
    let reserve = Reserve::new();
    let mut out_of_files = OutOfFiles::default();
    loop {
        // Taken again if a refusal could not take it back (the process was still out
        // of files then): a cheap look when it is held.
        reserve.refill();
        let stream = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(err) if is_out_of_files(&err) => {
                    out_of_files.note(&err);
                    if reserve.release() {
                        // The connection `accept` could not take: told why, with the
                        // descriptor just let go of, which is taken again after.
                        // Not for long: `accept` fails with EMFILE also on an empty
                        // queue, and the next connection may come when there is
                        // room for it again.
                        let refused = tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => None,
                            accepted = tokio::time::timeout(RESERVE_ACCEPT_WAIT, listener.accept()) => {
                                accepted.ok().and_then(Result::ok)
                            }
                        };
                        let reserve = reserve.clone();
                        connections.spawn(async move {
                            if let Some((stream, _peer)) = refused {
                                refuse(stream, ApiError::AtCapacity, AT_CAPACITY_LINGER).await;
                            }
                            reserve.refill();
                        });
                    } else {
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                    continue;
                }
                Err(err) => {
                    on_accept_error(err).await;
                    continue;
                }
            },
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let state = state.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut stream = stream;
            match sniff(&mut stream, &shutdown).await {
                Some(First::Events(request)) => {
                    if let Err(err) = direct::serve(stream, request, state).await {
                        tracing::debug!(error = %err, "event stream ended with an error");
                    }
                }
                // Boxed: a connection's task is as large as its largest state for its
                // whole life, and an idle subscriber must not carry a refusal's buffers.
                Some(First::Refused(problem)) => {
                    Box::pin(refuse(stream, problem, REFUSAL_LINGER)).await;
                }
                // Boxed too: a subscriber's task would otherwise carry hyper's
                // connection state, which it never uses, for as long as it is open.
                Some(First::Http(read)) => {
                    Box::pin(serve_http(
                        stream, read, &builder, service, watcher, &shutdown,
                    ))
                    .await;
                }
                None => {}
            }
        });
    }
    drop(listener);
    connections.close();
    let drained = async {
        graceful.shutdown().await;
        connections.wait().await;
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the drain timeout; closing"
        );
    }
}

/// Serves a connection with hyper, which reads `read` (the bytes read from it so far)
/// and then the socket's.
async fn serve_http(
    stream: TcpStream,
    read: Bytes,
    builder: &http1::Builder,
    service: TowerToHyperService<Router>,
    watcher: Watcher,
    shutdown: &CancellationToken,
) {
    let (reader, writer) = stream.into_split();
    // What it writes is counted: after the shutdown, a response that goes on coming out
    // may finish (up to the drain timeout); one whose client stopped reading is closed.
    let written = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&written);
    let writer = InspectWriter::new(ProblemWriter::new(writer), move |bytes: &[u8]| {
        counted.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    });
    let io = tokio::io::join(Cursor::new(read).chain(reader), writer);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let grace_over = async {
        shutdown.cancelled().await;
        loop {
            let before = written.load(Ordering::Relaxed);
            tokio::time::sleep(SHUTDOWN_STALL).await;
            if written.load(Ordering::Relaxed) == before {
                break;
            }
        }
    };
    tokio::select! {
        served = watcher.watch(connection) => {
            if let Err(err) = served {
                tracing::debug!(error = %err, "connection ended with an error");
            }
        }
        () = grace_over => {
            tracing::debug!("connection's response stalled after the shutdown; closed");
        }
    }
}

/// What a connection opens with, by its first bytes.
enum First {
    /// An event-stream request, answered on the socket (`sse::direct`).
    Events(direct::EventsRequest),
    /// A head hyper would refuse with an empty body: answered here with this problem.
    Refused(ApiError),
    /// Anything else: hyper's, with the bytes read from the connection so far.
    Http(Bytes),
}

/// Waits for a new connection's first request head (as long as hyper would wait for
/// one) and tells what it opens with. A head begun but not whole in that time is
/// refused 408. `None`: nothing came in time (a browser opens connections ahead of
/// its requests: closed without a word), the client hung up, or shutdown started first
/// (an idle connection must not hold up the drain).
async fn sniff(stream: &mut TcpStream, shutdown: &CancellationToken) -> Option<First> {
    let mut read = BytesMut::with_capacity(FIRST_LOOK_BYTES);
    let first = tokio::time::timeout(HEADER_READ_TIMEOUT, first_request(stream, &mut read));
    tokio::select! {
        _ = shutdown.cancelled() => None,
        sniffed = first => match sniffed {
            Ok(Ok(first)) => Some(first),
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "connection closed before its first request");
                None
            }
            Err(_) if read.is_empty() => None,
            Err(_) => Some(First::Refused(ApiError::HeadTimeout(format!(
                "the request head was not whole {} s after the connection opened",
                HEADER_READ_TIMEOUT.as_secs()
            )))),
        },
    }
}

/// Reads until the first request head is whole (or longer than a head may be) and
/// judges it.
///
/// A head is judged on the first read (garbage is refused at once), and after that
/// only when the bytes read may have ended it (an empty line): a head sent a byte at a
/// time costs one parse, not one per byte. One still not whole after [`MAX_LOOKS`]
/// (empty lines before its request line) is left to hyper.
async fn first_request(stream: &mut TcpStream, read: &mut BytesMut) -> io::Result<First> {
    let mut looks = 0;
    loop {
        if read.len() == read.capacity() {
            read.reserve(read.len());
        }
        let before = read.len();
        let room = head::MAX_HEAD_BYTES - before;
        if stream.read_buf(&mut (&mut *read).limit(room)).await? == 0 {
            if read.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            // The client stopped sending mid-head: hyper answers that as it does.
            return Ok(First::Http(read.split().freeze()));
        }
        let full = read.len() == head::MAX_HEAD_BYTES;
        let may_end = ends_a_line_on_an_empty_one(&read[before.saturating_sub(2)..]);
        if !full && before > 0 && !may_end {
            continue;
        }
        looks += 1;
        if let Some(request) = direct::parse(read) {
            return Ok(First::Events(request));
        }
        match head::judge(read) {
            // Copied: the head alone, not the buffer's room, stays with the connection.
            Verdict::Pass => return Ok(First::Http(Bytes::copy_from_slice(read))),
            Verdict::Refuse(problem) => return Ok(First::Refused(problem)),
            Verdict::Partial if full => return Ok(First::Refused(head::too_long(read))),
            Verdict::Partial if looks == MAX_LOOKS => {
                return Ok(First::Http(read.split().freeze()))
            }
            Verdict::Partial => {}
        }
    }
}

/// Whether `bytes` hold the end of a head: a line break followed by an empty line
/// (`\n\n` or `\n\r\n`, as httparse takes either).
fn ends_a_line_on_an_empty_one(bytes: &[u8]) -> bool {
    bytes
        .windows(2)
        .enumerate()
        .any(|(at, pair)| pair == b"\n\n" || pair == b"\n\r" && bytes.get(at + 2) == Some(&b'\n'))
}

/// `problem` as it goes on the wire: a head that closes the connection, and the body.
pub(crate) fn problem_bytes(problem: ApiError) -> Vec<u8> {
    let (mut parts, body) = problem.into_parts();
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let mut answer = direct::closing_head(&Response::from_parts(parts, ()));
    answer.extend_from_slice(&body);
    answer
}

/// Answers a refused connection with its problem and closes it, after reading for up
/// to `linger_for` what the client still sends.
async fn refuse(mut stream: TcpStream, problem: ApiError, linger_for: Duration) {
    tracing::debug!(detail = %problem, "request head refused");
    let answer = problem_bytes(problem);
    let answered = async {
        stream.write_all(&answer).await?;
        stream.shutdown().await
    };
    if let Err(err) = answered.await {
        tracing::debug!(error = %err, "could not answer a refused head");
        return;
    }
    let linger = async {
        let mut scratch = [0u8; 4096];
        let mut left = REFUSAL_LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(read) => left = left.saturating_sub(read),
            }
        }
    };
    let _ = tokio::time::timeout(linger_for, linger).await;
}

/// Whether an accept failed for want of a file descriptor, in the process or the
/// system.
fn is_out_of_files(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// One file descriptor held back for when the process has no other: let go of, it
/// lets the loop take the next connection in the queue and tell it so (503,
/// [`ApiError::AtCapacity`]) rather than leave it, and every one queued behind it,
/// waiting for an answer that does not come. Taken again once that answer is sent.
/// (The way nginx and libev answer `EMFILE`.)
#[derive(Clone)]
struct Reserve(std::sync::Arc<std::sync::Mutex<Option<std::fs::File>>>);

impl Reserve {
    fn new() -> Self {
        let reserve = Self(std::sync::Arc::default());
        reserve.refill();
        reserve
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<std::fs::File>> {
        // A std lock: held for a take or an open, never across an await.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the descriptor (again) if it is not held: it may fail while the process
    /// is still out of them, and is tried again after the next refusal.
    fn refill(&self) {
        let mut slot = self.slot();
        if slot.is_none() {
            *slot = std::fs::File::open("/dev/null").ok();
        }
    }

    /// Lets the descriptor go; `false` if it was not held.
    fn release(&self) -> bool {
        self.slot().take().is_some()
    }
}

/// Out of file descriptors: logged once per [`OUT_OF_FILES_LOG_EVERY`], not once per
/// connection refused, which under a flood would be thousands of lines.
#[derive(Default)]
struct OutOfFiles {
    logged_at: Option<tokio::time::Instant>,
    since: u64,
}

impl OutOfFiles {
    fn note(&mut self, err: &io::Error) {
        self.since += 1;
        let now = tokio::time::Instant::now();
        if self
            .logged_at
            .is_some_and(|at| now < at + OUT_OF_FILES_LOG_EVERY)
        {
            return;
        }
        tracing::error!(error = %err, failed_accepts = self.since, "out of file descriptors: waiting connections are answered 503 until some close");
        self.logged_at = Some(now);
        self.since = 0;
    }
}

async fn on_accept_error(err: io::Error) {
    // A peer that gave up before we accepted it is its own business.
    if matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %err, "accept error");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

/// Binds a listener on `addr` with a queue of [`LISTEN_BACKLOG`] connections not yet
/// accepted (`SO_REUSEADDR` set, as `TcpListener::bind` sets it).
///
/// # Errors
/// When the socket cannot be made, bound or put to listen.
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises this process's soft limit of open files to its hard limit: every SSE
/// subscriber holds one. Returns the limit now in force.
///
/// # Errors
/// When the limit cannot be read or raised.
pub fn raise_open_file_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;

    /// A first head begun but not whole within [`HEADER_READ_TIMEOUT`] is refused 408,
    /// a problem; a connection on which nothing came (a browser's spare) is closed
    /// without a word.
    #[tokio::test(start_paused = true)]
    async fn a_first_head_that_stalls_is_refused_408_and_a_silent_connection_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let address = listener.local_addr().expect("its address");
        let shutdown = CancellationToken::new();
        for (sent, answer) in [(&b"GET /api/ta"[..], Some(408)), (&b""[..], None)] {
            let mut client = TcpStream::connect(address).await.expect("a connection");
            client.write_all(sent).await.expect("sent");
            let (mut server, _) = listener.accept().await.expect("accepted");
            let started = tokio::time::Instant::now();
            let status = match sniff(&mut server, &shutdown).await {
                Some(First::Refused(problem)) => Some(problem.into_response().status().as_u16()),
                Some(_) => panic!("{sent:?}: not refused"),
                None => None,
            };
            assert_eq!(status, answer, "{sent:?}");
            assert_eq!(
                started.elapsed(),
                HEADER_READ_TIMEOUT,
                "{sent:?}: after the timeout"
            );
        }
    }
}
