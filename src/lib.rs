//! settle: a task server whose every write is an asynchronous command.
//!
//! A write answers 202 Accepted as soon as the command is durable under its
//! idempotency key; the consumer applies it about 700 ms later (or fails it) and the
//! hub pushes `projection:settled` / `command:failed` to every SSE subscriber, so a
//! client closes its consistency window on the event, never on a timer.
//!
//! Layout:
//! - `config`: flags and env vars, with their defaults.
//! - `model`: tasks, commands and events; the JSON contract.
//! - `store`: the intake log of accepted commands (one writer thread, group-committed
//!   fdatasync), sled trees for everything applied (finished commands' records and
//!   their indexes, tasks, event log), the apply log that makes each apply step
//!   durable against a crash until sled's checkpoint, the read projection, retention
//!   (compaction from the oldest chunk of events and records on). Its own Layout
//!   paragraph names its modules, among them `open` (opening and recovery),
//!   `durability` (sled's syncs and their failure), `read` (the read API) and the
//!   intake log's `intake::pending`, `intake::segments` and `intake::bound`.
//! - `consumer`: the due-time queue that applies commands in per-task order, with faults
//!   (one thread with a runtime of its own): `consumer::inbox` (deliveries and the
//!   handle that sends them), `consumer::schedule` (timers, per-task order, the due
//!   set), `consumer::step` (an apply step and the checkpoints it hands off).
//! - `faults`: the live fault knobs and their seeded RNG.
//! - `hub`: the in-memory broadcast of finished SSE frames.
//! - `lag`: how far behind its due times the consumer applies (metrics, `--max-lag-ms`).
//! - `sse`: `GET /api/events`, replay from the log then live, resumable by id.
//! - `api`: reads, commands, idempotency keys, faults and metrics routes.
//! - `net`: the HTTP/1.1 accept loop (TCP_NODELAY, graceful drain), the file limit.
//! - `head`: a connection's first request head, judged before hyper reads it, so that
//!   what hyper would refuse with an empty body gets a problem instead.
//! - `metrics`: counters, the window histogram and the apply step timings (JSON and
//!   OpenMetrics).
//! - `assets`: the embedded browser app and the 404 fallback.
//! - `error`: the problem+json error boundary.
//! - `build_info`: the commit and compiler a binary was built from (`build.rs`).
//! - `signal`: SIGINT and SIGTERM, which stop the server (and the load generator).

pub mod api;
pub mod assets;
pub mod build_info;
pub mod config;
pub mod consumer;
pub mod error;
pub mod faults;
pub mod head;
pub mod hub;
pub mod lag;
pub mod metrics;
pub mod model;
pub mod net;
pub mod signal;
pub mod sse;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::api::InFlight;
use crate::config::Config;
use crate::consumer::{Consumer, ConsumerHandle, ConsumerThread};
use crate::error::ApiError;
use crate::faults::Faults;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::{Intake, IntakeThread, PendingBound, Store, StoreError};

/// How long a start waits for the data directory's lock (see [`Store::open_waiting`]).
const STORE_LOCK_WAIT: Duration = Duration::from_secs(5);
/// How often the janitor trims the event log and expired command records.
pub const COMPACTION_PERIOD: Duration = Duration::from_secs(60);

/// Everything a handler needs, behind one `Arc`: axum clones the state for every
/// request, and each connection's task holds it, so a clone is one count and the
/// state one pointer wide (at 10000 subscribers each byte of it is 10 KB).
#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

impl AppState {
    pub fn new(inner: AppStateInner) -> Self {
        Self(Arc::new(inner))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppStateInner;

    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

/// The handles in [`AppState`]; each is cheap to clone.
#[derive(Clone)]
pub struct AppStateInner {
    pub store: Store,
    /// Where handlers accept commands: the intake log's writer, one fsync per batch.
    pub intake: Intake,
    pub hub: Hub,
    pub faults: Faults,
    pub metrics: Metrics,
    pub consumer: ConsumerHandle,
    pub in_flight: InFlight,
    /// The last snapshot `GET /api/tasks` built, shared while nothing changes.
    pub snapshots: api::Snapshots,
    /// A client retry of a command pending longer than this re-enqueues it at once.
    pub redeliver_after: Duration,
    /// Cancelled when shutdown starts: event streams end on it.
    pub shutdown: CancellationToken,
}

/// The whole HTTP surface, for `serve` and for in-process tests.
pub fn app(state: AppState) -> Router {
    api::guard_bodies(Router::new().merge(api::router()).merge(sse::router()))
        .fallback(assets::serve)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(api::BODY_LIMIT_BYTES))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

/// Runs the server on an already bound listener until `shutdown` is cancelled, then
/// drains: streams end, the consumer finishes its step and checkpoints what it applied.
///
/// # Errors
/// When the store cannot be opened, the consumer or the intake log cannot start, or
/// the listener has no local address; after the drain, when a sync of sled's files
/// failed, or the intake writer or the consumer panicked (each also starts the
/// shutdown).
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("reading the bound address")?;
    // On the blocking pool: opening reads the store back (recovery, the projection),
    // and may wait for the directory's lock.
    let data_dir = config.data_dir.clone();
    let stop = shutdown.clone();
    let opened =
        tokio::task::spawn_blocking(move || Store::open_waiting(&data_dir, STORE_LOCK_WAIT, &stop))
            .await
            .map_err(StoreError::from)
            .and_then(|opened| opened);
    let store = match opened {
        Ok(store) => store,
        // Nothing was started yet, so there is nothing to drain.
        Err(StoreError::Stopped(_)) => {
            tracing::info!("shut down before the store was opened");
            return Ok(());
        }
        Err(err) => {
            return Err(err)
                .with_context(|| format!("opening the store in {}", config.data_dir.display()))
        }
    };
    let running = Running::start(store, &config, shutdown.clone()).await?;
    tracing::info!("listening on http://{addr}");
    net::serve(listener, running.state.clone(), shutdown).await;
    running.drain().await
}

/// Everything that runs beside the HTTP surface, started on an opened store: the
/// consumer, the intake log's writer, the janitor and the watch on the store's syncs.
struct Running {
    state: AppState,
    intake_writer: IntakeThread,
    consumer: ConsumerThread,
    janitor: JoinHandle<()>,
    sync_watch: JoinHandle<()>,
}

impl Running {
    /// Starts the background work and builds the handlers' state.
    ///
    /// # Errors
    /// When the consumer or the intake log cannot start.
    async fn start(
        store: Store,
        config: &Config,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let hub = Hub::new();
        let faults = Faults::from_config(config);
        let metrics = Metrics::new();

        let redeliver_after = Duration::from_millis(config.redeliver_after_ms);
        let (consumer, consumer_handle) = Consumer::new(
            store.clone(),
            hub.clone(),
            faults.clone(),
            metrics.clone(),
            redeliver_after,
        );
        // The intake writer hands each batch's new commands on once they are durable,
        // whether or not their requests are still there to be answered. It starts
        // first: nothing reaches it before the listener serves, and the consumer's
        // thread, once started, stops only with the shutdown.
        let on_durable = {
            let metrics = metrics.clone();
            let consumer = consumer_handle.clone();
            move |records: &[model::CommandRecord]| {
                metrics.commands_accepted(records.len());
                consumer.schedule_blocking(records);
            }
        };
        let bound = PendingBound {
            commands: config.max_pending,
            bytes: config.max_pending_bytes,
            max_lag: (config.max_lag_ms > 0).then(|| Duration::from_millis(config.max_lag_ms)),
            lag: metrics.lag(),
        };
        let (intake, intake_writer) =
            Intake::start(store.clone(), bound, Box::new(on_durable), shutdown.clone())
                .context("starting the intake log")?;
        let consumer = match consumer.start(shutdown.clone()).await {
            Ok(consumer) => consumer,
            Err(err) => {
                intake.stop(intake_writer).await;
                return Err(err).context("starting the consumer");
            }
        };
        let janitor = tokio::spawn(run_janitor(store.clone(), config.clone(), shutdown.clone()));
        let sync_watch = stop_on_sync_failure(&store, shutdown.clone());
        let state = AppState::new(AppStateInner {
            store,
            intake,
            hub,
            faults,
            metrics,
            consumer: consumer_handle,
            in_flight: InFlight::default(),
            snapshots: api::Snapshots::default(),
            redeliver_after,
            shutdown,
        });
        Ok(Self {
            state,
            intake_writer,
            consumer,
            janitor,
            sync_watch,
        })
    }

    /// Once every handler is done (the shutdown has started): stops and drains the
    /// background work, then tells how the server ended.
    ///
    /// # Errors
    /// When a sync of sled's files (or a write to the apply log) failed, also while the
    /// server stopped (it must not end in a clean exit), or the intake writer or the
    /// consumer panicked: the failed sync first, as it is what the operator must act on
    /// before the next start, then
    /// the writer (a panic holding the pending table's lock poisons it for the
    /// consumer, whose panic would follow from it).
    async fn drain(self) -> anyhow::Result<()> {
        let Self {
            state,
            intake_writer,
            consumer,
            janitor,
            sync_watch,
        } = self;
        let intake_ran = state.intake.stop(intake_writer).await;
        let consumer_ran = consumer.join().await;
        let _ = janitor.await;
        let _ = sync_watch.await;
        tracing::info!("shut down");
        anyhow::ensure!(
            !state.store.sled_sync_has_failed(),
            "a sync of sled's files failed, which stopped the server; reboot the machine before the next start (see the data directory's intake/sync-failed)"
        );
        anyhow::ensure!(
            !state.store.apply_log_has_failed(),
            "a write to the apply log failed, which stopped the server (the log above says why); the next start applies again what the disk lacks"
        );
        anyhow::ensure!(
            intake_ran,
            "the intake writer panicked, which stopped the server; every command it made durable (answered 202 or not) applies on the next start"
        );
        anyhow::ensure!(
            consumer_ran,
            "the consumer panicked, which stopped the server; accepted commands resume on the next start"
        );
        Ok(())
    }
}

/// Stops the server (cancels `shutdown`) once a sync of sled's files fails, wherever
/// it fails (a checkpoint before a segment release, a seq block's reservation on the
/// accept path), or a step's write to the apply log, also when nothing is pending:
/// nothing more can be made durable.
/// Ends with the shutdown.
fn stop_on_sync_failure(store: &Store, shutdown: CancellationToken) -> JoinHandle<()> {
    let failed = store.sync_failed();
    tokio::spawn(async move {
        tokio::select! {
            () = failed => {
                tracing::error!("a sync of sled's files (or a write to the apply log) failed; stopping the server");
                shutdown.cancel();
            }
            () = shutdown.cancelled() => {}
        }
    })
}

/// Trims the event log to its retention and drops expired command records.
async fn run_janitor(store: Store, config: Config, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(COMPACTION_PERIOD);
    let retention =
        time::Duration::hours(i64::try_from(config.command_retention_hours).unwrap_or(i64::MAX));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let keep_events = config.event_retention;
        let cutoff = time::OffsetDateTime::now_utc() - retention;
        match store
            .blocking(move |store| store.compact(keep_events, cutoff))
            .await
        {
            Ok((0, 0)) => {}
            Ok((events, commands)) => tracing::info!(events, commands, "compacted"),
            Err(err) => tracing::error!(error = %err, "compaction failed"),
        }
    }
}

/// Runs the body of one of the server's threads; a panic in it stops the server
/// (cancels `shutdown`, logged with the thread's `name`) and is passed on to whoever
/// joins the thread, so the drain reports it.
pub(crate) fn stopping_on_panic(name: &str, shutdown: &CancellationToken, body: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        tracing::error!("the {name} panicked; stopping the server");
        shutdown.cancel();
        std::panic::resume_unwind(panic);
    }
}

/// Waits for a thread of the server's on the blocking pool. `false` (and logged) when
/// it panicked.
pub(crate) async fn join_thread(thread: std::thread::JoinHandle<()>, name: &str) -> bool {
    let joined = tokio::task::spawn_blocking(move || thread.join())
        .await
        .is_ok_and(|joined| joined.is_ok());
    if !joined {
        tracing::error!("the {name} thread panicked");
    }
    joined
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A store in a fresh directory, and the watch that stops the server on its failed
    /// sync.
    fn watched() -> (tempfile::TempDir, Store, CancellationToken, JoinHandle<()>) {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let shutdown = CancellationToken::new();
        let watch = stop_on_sync_failure(&store, shutdown.clone());
        (dir, store, shutdown, watch)
    }

    /// A sync can fail outside the consumer (reserving a seq block, on the accept path)
    /// while nothing is pending: the server must stop, not go on answering every
    /// accept with an error until someone restarts it.
    #[tokio::test]
    async fn a_failed_sync_stops_the_server_also_with_nothing_pending() {
        let (_dir, store, shutdown, watch) = watched();
        assert!(!shutdown.is_cancelled());
        store.fail_sled_sync();
        tokio::time::timeout(Duration::from_secs(10), shutdown.cancelled())
            .await
            .expect("the shutdown starts");
        watch.await.expect("the watch ends");
    }

    /// What a client and the operator meet once a sync fails: the server stops by
    /// itself, an accept answers 503 problem+json (not 500, not a 202 it cannot keep),
    /// and `serve`'s drain ends in the sync's error (exit status 1), not a clean exit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_failed_sync_accepts_answer_503_and_the_drain_ends_in_its_error() {
        use axum::body::Body;
        use axum::http::{header, Request, StatusCode};
        use tower::ServiceExt as _;

        let dir = tempfile::tempdir().expect("a temp dir");
        let config = Config::for_tests(dir.path());
        let store = Store::open(dir.path()).expect("a store");
        let shutdown = CancellationToken::new();
        let running = Running::start(store.clone(), &config, shutdown.clone())
            .await
            .expect("started");
        let router = app(running.state.clone());
        let create = |key: &str| {
            Request::post("/api/tasks")
                .header("Idempotency-Key", key)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(r#"{"title":"t"}"#))
                .expect("a request")
        };
        let before = router
            .clone()
            .oneshot(create("before"))
            .await
            .expect("answered");
        assert_eq!(before.status(), StatusCode::ACCEPTED);

        store.fail_sled_sync();
        // From the failure on, not only once the shutdown has started: a handler that
        // has not seen the shutdown yet answers 503 too.
        let unaware = app(AppState::new(AppStateInner {
            shutdown: CancellationToken::new(),
            ..(*running.state).clone()
        }));
        let after = unaware.oneshot(create("after")).await.expect("answered");
        assert_eq!(after.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            after.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert!(store.pending_command("after").is_none(), "nothing stored");
        tokio::time::timeout(Duration::from_secs(10), shutdown.cancelled())
            .await
            .expect("the server stops by itself");
        let later = router.oneshot(create("later")).await.expect("answered");
        assert_eq!(later.status(), StatusCode::SERVICE_UNAVAILABLE);

        let ended = tokio::time::timeout(Duration::from_secs(30), running.drain())
            .await
            .expect("the drain ends");
        let err = ended.expect_err("a failed sync is no clean exit");
        assert!(
            err.to_string().contains("a sync of sled's files failed"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_sync_watch_ends_with_the_shutdown() {
        let (_dir, store, shutdown, watch) = watched();
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), watch)
            .await
            .expect("the watch ends")
            .expect("without a panic");
        assert!(!store.sync_has_failed());
    }
}
