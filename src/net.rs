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
//! its current response (event streams end on the same shutdown token) and waits for
//! them, up to [`DRAIN_TIMEOUT`]. A connection that opens with an event-stream request
//! skips hyper altogether (`sse::direct`): an idle subscriber then costs a few KiB.

use std::io;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::sse::direct;
use crate::AppState;

/// How long a client may take to send a request head before its connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for open connections to finish their responses.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error such as `EMFILE` (out of file descriptors), so that the
/// loop does not spin while connections close and free some.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves the app (`crate::app`) on `listener` until `shutdown` is cancelled, then
/// drains.
pub async fn serve(listener: TcpListener, state: AppState, shutdown: CancellationToken) {
    let app = crate::app(state.clone());
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let stream = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
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
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let state = state.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            match sniff(&stream, &shutdown).await {
                Some(Some(request)) => {
                    if let Err(err) = direct::serve(stream, request, state).await {
                        tracing::debug!(error = %err, "event stream ended with an error");
                    }
                }
                Some(None) => {
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    if let Err(err) = watcher.watch(connection).await {
                        tracing::debug!(error = %err, "connection ended with an error");
                    }
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

/// Waits for a new connection's first bytes (as long as hyper would wait for a request
/// head) and tells whether it opens with an event-stream request. `None`: the client
/// sent nothing in time or hung up, or shutdown started first (an idle connection must
/// not hold up the drain).
async fn sniff(
    stream: &TcpStream,
    shutdown: &CancellationToken,
) -> Option<Option<direct::EventsRequest>> {
    let first_bytes = tokio::time::timeout(HEADER_READ_TIMEOUT, direct::sniff(stream));
    tokio::select! {
        _ = shutdown.cancelled() => None,
        sniffed = first_bytes => match sniffed {
            Ok(Ok(sniffed)) => Some(sniffed),
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "connection closed before its first request");
                None
            }
            Err(_) => None,
        },
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

/// Raises this process's soft limit of open files to its hard limit: every SSE
/// subscriber holds one. Returns the limit now in force.
///
/// # Errors
/// When the limit cannot be read or raised.
pub fn raise_open_file_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}
