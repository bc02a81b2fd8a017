//! A fan-out worker process (`settle-bench fanout-worker`, hidden): holds `--count`
//! SSE subscribers, all from one `--source-ip`, and timestamps every event id each of
//! them receives. The parent drives it over stdin/stdout, one JSON object per line.
//!
//! Why a separate process: one process may open at most 20000 files here, and the
//! server holds one socket per subscriber too, so the subscribers cannot share the
//! server's or one another's limit. Why one source address per worker: one address
//! has about 28000 ephemeral ports towards one server port.
//!
//! Each subscriber is one hyper connection with a small exact read buffer and two
//! tasks (the connection, the body reader); the body is scanned for `id:` lines
//! only. The worker runs on one thread: it is one of several processes sharing the
//! machine with the server it measures.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{self, Conn};
use crate::sse::IdScanner;
use crate::sys;

/// Read buffer per subscriber: an event frame is well under 1 KiB, and hyper streams
/// a longer one through it in pieces.
pub const READ_BUF_BYTES: usize = 1024;
/// How often a report request checks whether every subscriber has the event.
const REPORT_POLL: Duration = Duration::from_millis(1);
const ERROR_SAMPLES: usize = 5;

#[derive(Args, Clone, Debug)]
pub struct WorkerArgs {
    /// The server.
    #[arg(long)]
    pub target: SocketAddr,
    /// Subscribers to hold.
    #[arg(long)]
    pub count: usize,
    /// The loopback address every subscriber's socket is bound to.
    #[arg(long)]
    pub source_ip: IpAddr,
    /// Subscriptions being opened at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Seconds to open all subscriptions; those still opening then count as failed.
    #[arg(long, default_value_t = 120)]
    pub connect_seconds: u64,
    /// Read buffer per subscriber, in bytes.
    #[arg(long, default_value_t = READ_BUF_BYTES)]
    pub read_buf: usize,
    /// The worker exits by itself after this many seconds, whatever happens.
    #[arg(long, default_value_t = 900)]
    pub max_seconds: u64,
}

/// Worker -> parent, one per line on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    /// Every subscription is open (or failed).
    Ready {
        connected: usize,
        failed: usize,
        error_samples: Vec<String>,
        /// The worker's own resident memory with all subscribers open.
        rss_kib: Option<u64>,
    },
    /// The arrivals of one event: wall-clock ns, one per subscriber that got it.
    Report {
        event_id: u64,
        arrivals_ns: Vec<u64>,
        /// Subscribers whose stream is still open.
        alive: usize,
    },
}

/// Parent -> worker, one per line on stdin.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum WorkerCommand {
    /// Report `event_id` once every open subscriber has it, or after `timeout_ms`.
    Report {
        event_id: u64,
        timeout_ms: u64,
    },
    Exit,
}

#[derive(Default)]
struct Shared {
    /// Event id -> arrival times. A std lock: one thread, held only to push.
    arrivals: Mutex<HashMap<u64, Vec<u64>>>,
    alive: AtomicUsize,
}

impl Shared {
    fn received(&self, event_id: u64) -> usize {
        self.arrivals
            .lock()
            .expect("arrivals lock poisoned")
            .get(&event_id)
            .map_or(0, Vec::len)
    }
}

/// Runs the worker until the parent says `exit`, closes stdin, or `--max-seconds`.
///
/// # Errors
/// When stdout or stdin fail.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    // Best effort: with the default limit the connects fail and are reported.
    let _ = sys::raise_nofile_limit();
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let shared = Arc::new(Shared::default());

    let opening = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut connecting = JoinSet::new();
    for _ in 0..args.count {
        let (opening, shared, args) = (opening.clone(), shared.clone(), args.clone());
        connecting.spawn(async move {
            let permit = opening.acquire_owned().await.context("semaphore closed")?;
            let mut conn = client::connect_from(args.target, args.source_ip, args.read_buf).await?;
            let body = conn.subscribe().await?;
            drop(permit);
            shared.alive.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(listen(conn, body, shared));
            anyhow::Ok(())
        });
    }
    let (mut connected, mut failed) = (0, 0);
    let mut error_samples = Vec::new();
    let connect_deadline = Instant::now() + Duration::from_secs(args.connect_seconds);
    loop {
        match tokio::time::timeout_at(connect_deadline, connecting.join_next()).await {
            Ok(Some(Ok(Ok(())))) => connected += 1,
            Ok(Some(Ok(Err(err)))) => {
                failed += 1;
                if error_samples.len() < ERROR_SAMPLES {
                    error_samples.push(format!("{err:#}"));
                }
            }
            Ok(Some(Err(err))) => {
                failed += 1;
                if error_samples.len() < ERROR_SAMPLES {
                    error_samples.push(format!("connect task: {err}"));
                }
            }
            Ok(None) => break,
            Err(_) => {
                let unfinished = connecting.len();
                failed += unfinished;
                error_samples.push(format!(
                    "{unfinished} subscriptions not open after {} s",
                    args.connect_seconds
                ));
                connecting.abort_all();
                break;
            }
        }
    }
    emit(&WorkerMessage::Ready {
        connected,
        failed,
        error_samples,
        rss_kib: sys::rss_kib(None).ok(),
    })?;

    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = match tokio::time::timeout_at(deadline, commands.next_line()).await {
            Err(_) => break,       // --max-seconds
            Ok(Ok(None)) => break, // the parent is gone
            Ok(Err(err)) => return Err(err).context("reading commands from stdin"),
            Ok(Ok(Some(line))) => line,
        };
        let command: WorkerCommand =
            serde_json::from_str(&line).with_context(|| format!("parsing the command {line:?}"))?;
        match command {
            WorkerCommand::Report {
                event_id,
                timeout_ms,
            } => {
                let until = Instant::now() + Duration::from_millis(timeout_ms);
                while shared.received(event_id) < shared.alive.load(Ordering::SeqCst)
                    && Instant::now() < until
                {
                    tokio::time::sleep(REPORT_POLL).await;
                }
                let arrivals_ns = shared
                    .arrivals
                    .lock()
                    .expect("arrivals lock poisoned")
                    .remove(&event_id)
                    .unwrap_or_default();
                emit(&WorkerMessage::Report {
                    event_id,
                    arrivals_ns,
                    alive: shared.alive.load(Ordering::SeqCst),
                })?;
            }
            WorkerCommand::Exit => break,
        }
    }
    Ok(())
}

/// Reads one subscriber's stream until it ends, timestamping each event id.
async fn listen(conn: Conn, mut body: Incoming, shared: Arc<Shared>) {
    // The connection must outlive the body it streams.
    let _conn = conn;
    let mut scanner = IdScanner::default();
    while let Some(Ok(frame)) = body.frame().await {
        let Some(chunk) = frame.data_ref() else {
            continue;
        };
        let now = sys::wall_ns();
        scanner.feed(chunk, |event_id| {
            shared
                .arrivals
                .lock()
                .expect("arrivals lock poisoned")
                .entry(event_id)
                .or_default()
                .push(now);
        });
    }
    shared.alive.fetch_sub(1, Ordering::SeqCst);
}

fn emit(message: &WorkerMessage) -> anyhow::Result<()> {
    use std::io::Write;
    let line = serde_json::to_string(message).context("encoding a worker message")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").context("writing to the parent")?;
    stdout.flush().context("writing to the parent")
}
