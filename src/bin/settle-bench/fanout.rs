//! Phase 3, fan-out: N concurrent SSE subscribers on `/api/events`.
//!
//! 1. Memory per idle subscriber: the server's VmRSS before the subscribers connect
//!    and after they all have (and a settle pause), divided by N.
//! 2. Delivery: one command at a time; for each of its events, every subscriber's
//!    arrival time minus the event's `settled_at` (the server's wall clock when the
//!    consumer applied it, before the step's write to the apply log: a conservative
//!    start), and minus the first arrival at any subscriber (the spread of the fan-out
//!    itself).
//!
//! The subscribers live in worker processes (see `worker`), each on its own
//! 127.0.0.x source address; the bench keeps one observing subscriber of its own to
//! learn each event's id and `settled_at`.
//!
//! Layout: this file runs the phase; `room` decides how many subscribers it asks for
//! and how many each worker takes, `process` is the bench's end of a worker process,
//! `worker` the worker itself.

mod process;
mod room;
pub mod worker;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client;
use crate::commands::{self, LIKE_BODY};
use crate::not_started;
use crate::report::{self, CpuDuring, PhaseReport, TargetCheck, Verdict, HAD_PROBLEMS};
use crate::sse::Observer;
use crate::stats::{self, round3, CpuMeter, Summary};
use crate::sys;
use crate::Ctx;
use process::WorkerProcess;
use room::{check_room, max_subscribers, per_worker_within_limit, server_fd_limit, Subscribers};
use worker::{WorkerCommand, WorkerMessage};

const TARGET_SUBSCRIBERS: usize = 10_000;
const TARGET_P99_MS: f64 = 100.0;
const TARGET_KIB_PER_SUBSCRIBER: f64 = 10.0;
const TARGET_HELD: usize = 15_000;
/// How long the workers may wait for every subscriber to get one event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between events, so one event's delivery does not overlap the next one's.
const EVENT_PAUSE: Duration = Duration::from_millis(300);
/// How long the settle of the published command may take beyond the delay.
const SETTLE_GRACE: Duration = Duration::from_secs(10);
/// Worker source addresses are 127.0.0.2 to 127.0.0.254.
const MAX_WORKERS: usize = 253;
/// Well under the server's idle timeout for a keep-alive connection.
const KEEP_ALIVE_EVERY: Duration =
    Duration::from_secs(settle::net::HEADER_READ_TIMEOUT.as_secs() / 3);

#[derive(Args, Clone, Debug)]
pub struct FanoutArgs {
    /// Concurrent SSE subscribers, or `max`: as many as the server's open-file limit
    /// leaves room for (at most 50000), read from /proc once the bench's own
    /// connections are open [default: 10000; 200 with --smoke].
    #[arg(long, allow_negative_numbers = true)]
    pub subscribers: Option<Subscribers>,
    /// Subscribers per worker process, each worker on its own 127.0.0.x source
    /// address [default: 5000; 100 with --smoke].
    #[arg(long, allow_negative_numbers = true, value_parser = crate::positive_usize())]
    pub per_worker: Option<usize>,
    /// Events published, one at a time [default: 5; 2 with --smoke].
    #[arg(long, allow_negative_numbers = true, value_parser = crate::positive_usize())]
    pub events: Option<usize>,
    /// Pause before each memory reading, in ms [default: 2000; 300 with --smoke].
    #[arg(long, allow_negative_numbers = true)]
    pub settle_ms: Option<u64>,
    /// Subscriptions each worker opens at once.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = crate::positive_usize())]
    pub connect_concurrency: usize,
    /// Seconds the workers may take to open every subscription.
    #[arg(long, default_value_t = 120, allow_negative_numbers = true, value_parser = crate::positive_u64())]
    pub connect_seconds: u64,
}

#[derive(Debug, Serialize)]
struct Parameters {
    subscribers: usize,
    workers: usize,
    per_worker: usize,
    events: usize,
    settle_ms: u64,
    connect_concurrency: usize,
    worker_read_buf_bytes: usize,
}

#[derive(Debug, Serialize)]
struct Memory {
    server_rss_before_kib: Option<u64>,
    server_rss_after_kib: Option<u64>,
    /// (after - before) / connected subscribers.
    server_kib_per_subscriber: Option<f64>,
    /// Kernel slab growth (machine-wide, both ends of each connection): not in RSS.
    kernel_slab_kib_per_subscriber: Option<f64>,
    server_open_fds_after: Option<usize>,
    worker_rss_kib_per_subscriber: Option<f64>,
}

#[derive(Debug, Serialize)]
struct EventResult {
    event_id: u64,
    expected: usize,
    received: usize,
    /// Arrival at each subscriber - the event's `settled_at`.
    since_settled_ms: Option<Summary>,
    /// Arrival at each subscriber - the first arrival at any subscriber.
    since_first_ms: Option<Summary>,
    /// Arrival at the bench's own observing subscriber - `settled_at`.
    observer_since_settled_ms: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    connected: usize,
    failed_to_connect: usize,
    connect_error_samples: Vec<String>,
    connect_s: f64,
    /// The server's own count (`GET /api/metrics`), the observer included.
    server_subscribers: Option<u64>,
    memory: Memory,
    events: Vec<EventResult>,
    all_events_since_settled_ms: Option<Summary>,
    all_events_since_first_ms: Option<Summary>,
}

#[derive(Deserialize)]
struct ServerMetrics {
    subscribers: u64,
}

/// Runs the fan-out phase.
///
/// # Errors
/// When the server or the workers cannot be started, or a worker stops answering.
pub async fn run(ctx: &Ctx, args: &FanoutArgs) -> anyhow::Result<PhaseReport> {
    let per_worker = per_worker_within_limit(ctx.pick(args.per_worker, 100, 5000));
    let event_count = ctx.pick(args.events, 2, 5);
    let settle = Duration::from_millis(ctx.pick(args.settle_ms, 300, 2000));
    let check_workers = |subscribers: usize| {
        let worker_count = subscribers.div_ceil(per_worker);
        if worker_count > MAX_WORKERS {
            bail!("{worker_count} workers needed for {subscribers} subscribers, at most {MAX_WORKERS}: raise --per-worker");
        }
        Ok(worker_count)
    };
    if let Some(Subscribers::Count(count)) = args.subscribers {
        check_workers(count).map_err(not_started)?;
    }
    let exe = std::env::current_exe()
        .context("locating settle-bench for its workers")
        .map_err(not_started)?;

    let server = ctx.server().await?;
    // Before anything is sent to the server: max needs its PID and limit, a count is
    // checked against them when they are known.
    let fd_limit = match args.subscribers {
        Some(Subscribers::Max) => Some(server_fd_limit(&server).map_err(not_started)?),
        _ => server_fd_limit(&server).ok(),
    };
    let addr = server.info.addr;
    let settle_timeout =
        Duration::from_millis(server.info.delay_ms + server.info.jitter_ms) + SETTLE_GRACE;
    let run = commands::run_id();
    // Until the subscribers connect, a failure is one to begin (`NotStarted`).
    let mut conn = client::connect(addr).await.map_err(not_started)?;
    let mut observer = Observer::connect(addr).await.map_err(not_started)?;
    // The task the published likes go to, created before the memory baseline.
    let task = commands::create_tasks(&mut conn, &mut observer, 1, &run, settle_timeout)
        .await
        .map_err(not_started)?[0];
    let subscribers = match (args.subscribers, fd_limit) {
        (Some(Subscribers::Max), Some(fd_limit)) => max_subscribers(fd_limit),
        (Some(Subscribers::Count(count)), _) => check_room(count, fd_limit),
        _ => check_room(ctx.pick(None, 200, TARGET_SUBSCRIBERS), fd_limit),
    }
    .map_err(not_started)?;
    let worker_count = check_workers(subscribers).map_err(not_started)?;

    tokio::time::sleep(settle).await;
    let rss_before = server.rss_kib();
    let slab_before = sys::kernel_slab_kib();

    let connect_started = Instant::now();
    let mut workers = Vec::with_capacity(worker_count);
    let mut remaining = subscribers;
    for index in 0..worker_count {
        let count = remaining.min(per_worker);
        remaining -= count;
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, u8::try_from(index + 2)?));
        workers.push(WorkerProcess::spawn(&exe, addr, count, source, args)?);
    }
    let ready_timeout = Duration::from_secs(args.connect_seconds + 30);
    let readies = {
        let all_ready =
            futures::future::join_all(workers.iter_mut().map(|w| w.receive(ready_timeout)));
        tokio::pin!(all_ready);
        // Connecting can outlast the server's idle timeout for a keep-alive connection
        // (near the file limit, the last subscribers wait for a descriptor): keep the
        // bench's own connection in use, so that it still holds its descriptor when the
        // events are published.
        let mut keep_alive = tokio::time::interval_at(
            tokio::time::Instant::now() + KEEP_ALIVE_EVERY,
            KEEP_ALIVE_EVERY,
        );
        loop {
            tokio::select! {
                readies = &mut all_ready => break readies,
                _ = keep_alive.tick() => {
                    conn.get("/api/health")
                        .await
                        .context("keeping the publishing connection alive while subscribers connect")?;
                }
            }
        }
    };
    let connect_s = connect_started.elapsed().as_secs_f64();
    let (mut connected, mut failed) = (0, 0);
    let mut connect_error_samples = Vec::new();
    let mut worker_rss = Some(0);
    for ready in readies {
        match ready? {
            WorkerMessage::Ready {
                connected: ok,
                failed: not_ok,
                error_samples,
                rss_kib,
            } => {
                connected += ok;
                failed += not_ok;
                connect_error_samples.extend(error_samples);
                worker_rss = worker_rss.zip(rss_kib).map(|(sum, rss)| sum + rss);
            }
            other => bail!("a worker sent {other:?} before it was ready"),
        }
    }
    connect_error_samples.truncate(10);

    tokio::time::sleep(settle).await;
    let rss_after = server.rss_kib();
    let slab_after = sys::kernel_slab_kib();
    let server_fds = server.info.pid.and_then(sys::open_fds);
    let server_subscribers = conn
        .metrics::<ServerMetrics>()
        .await
        .map(|metrics| metrics.subscribers);
    let per_subscriber = |before: Option<u64>, after: Option<u64>| match (before, after) {
        (Some(before), Some(after)) if connected > 0 => {
            Some(round3((after as f64 - before as f64) / connected as f64))
        }
        _ => None,
    };
    let memory = Memory {
        server_rss_before_kib: rss_before,
        server_rss_after_kib: rss_after,
        server_kib_per_subscriber: per_subscriber(rss_before, rss_after),
        kernel_slab_kib_per_subscriber: per_subscriber(slab_before, slab_after),
        server_open_fds_after: server_fds,
        worker_rss_kib_per_subscriber: per_subscriber(Some(0), worker_rss),
    };

    let worker_pids: Vec<u32> = workers.iter().map(|w| w.pid).collect();
    let cpu = CpuMeter::start(server.info.pid, &worker_pids);
    let mut events = Vec::with_capacity(event_count);
    let mut all_since_settled = Vec::new();
    let mut all_since_first = Vec::new();
    let mut problems = Vec::new();
    for index in 0..event_count {
        let (status, body) = conn
            .command(
                &commands::like_path(task),
                &format!("{run}-event-{index}"),
                Bytes::from_static(LIKE_BODY),
            )
            .await?;
        if status != StatusCode::ACCEPTED {
            bail!(
                "publishing a like answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let command_id = commands::accepted_command_id(&body)?;
        let mut found = commands::wait_for_events(
            &mut observer,
            [command_id.clone()].into(),
            Instant::now() + settle_timeout,
        )
        .await;
        let Some(event) = found.remove(&command_id).filter(|event| event.settled) else {
            problems.push(format!("event {index}: the like did not settle"));
            continue;
        };
        let event_id = event
            .observed
            .event
            .id
            .context("a settled event without an id")?;
        let settled_at_ns = event
            .data
            .settled_at_ns()
            .context("a settled event without a readable settled_at")?;

        let command = WorkerCommand::Report {
            event_id,
            timeout_ms: u64::try_from(EVENT_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
        };
        for worker in &mut workers {
            worker.send(&command).await?;
        }
        let reports = futures::future::join_all(
            workers
                .iter_mut()
                .map(|w| w.receive(EVENT_TIMEOUT + Duration::from_secs(5))),
        )
        .await;
        let mut arrivals = Vec::with_capacity(connected);
        for report in reports {
            match report? {
                WorkerMessage::Report { arrivals_ns, .. } => arrivals.extend(arrivals_ns),
                other => bail!("a worker sent {other:?} instead of a report"),
            }
        }
        let first = arrivals.iter().copied().min().unwrap_or(settled_at_ns);
        let to_ms = |from: u64| -> Vec<f64> {
            arrivals
                .iter()
                .map(|&at| stats::ms_between(at, from))
                .collect()
        };
        let (mut since_settled, mut since_first) = (to_ms(settled_at_ns), to_ms(first));
        all_since_settled.extend_from_slice(&since_settled);
        all_since_first.extend_from_slice(&since_first);
        if arrivals.len() < connected {
            problems.push(format!(
                "event {event_id} reached {} of {connected} subscribers within {EVENT_TIMEOUT:?}",
                arrivals.len()
            ));
        }
        events.push(EventResult {
            event_id,
            expected: connected,
            received: arrivals.len(),
            since_settled_ms: Summary::of(&mut since_settled),
            since_first_ms: Summary::of(&mut since_first),
            observer_since_settled_ms: round3(stats::ms_between(
                event.observed.wall_ns,
                settled_at_ns,
            )),
        });
        tokio::time::sleep(EVENT_PAUSE).await;
    }
    let cpu = cpu.finish();
    for worker in workers {
        worker.stop().await;
    }
    drop(observer);

    if failed > 0 {
        problems.push(format!(
            "{failed} of {subscribers} subscribers could not connect{}",
            connect_error_samples
                .first()
                .map_or(String::new(), |sample| format!(" (e.g. {sample})"))
        ));
    }
    let results = Results {
        connected,
        failed_to_connect: failed,
        connect_error_samples,
        connect_s: round3(connect_s),
        server_subscribers,
        memory,
        all_events_since_settled_ms: Summary::of(&mut all_since_settled),
        all_events_since_first_ms: Summary::of(&mut all_since_first),
        events,
    };

    let p99 = results.all_events_since_settled_ms.map(|s| s.p99);
    let kib = results.memory.server_kib_per_subscriber;
    // Latency is a target at exactly 10000 subscribers, all connected; memory per
    // subscriber at 10000 or more, on a server that had none before; holding at 15000
    // or more.
    let latency_not_judged = [
        // A failed subscriber is a problem too (below).
        (connected != TARGET_SUBSCRIBERS, "not 10000 subscribers"),
        (!problems.is_empty(), HAD_PROBLEMS),
    ];
    let memory_not_judged = [
        (
            connected < TARGET_SUBSCRIBERS,
            "fewer than 10000 subscribers",
        ),
        (
            !server.info.started_by_bench,
            "a --target server may reuse the memory of subscribers it had before",
        ),
    ];
    let targets = vec![
        TargetCheck::new(
            format!("{TARGET_SUBSCRIBERS} subscribers: one event reaches all with p99 <= {TARGET_P99_MS} ms"),
            format!(
                "p99 {} ms (max {} ms) from settled_at over {connected} subscribers",
                p99.map_or("?".to_owned(), |p| format!("{p:.1}")),
                results
                    .all_events_since_settled_ms
                    .map_or("?".to_owned(), |s| format!("{:.1}", s.max)),
            ),
            Verdict::unless(&latency_not_judged, || p99.is_some_and(|p| p <= TARGET_P99_MS)),
        ),
        TargetCheck::new(
            format!("at most {TARGET_KIB_PER_SUBSCRIBER} KiB of server memory per idle subscriber"),
            format!(
                "{} KiB per subscriber over {connected}",
                kib.map_or("?".to_owned(), |k| format!("{k:.2}")),
            ),
            Verdict::unless(&memory_not_judged, || {
                kib.is_some_and(|k| k <= TARGET_KIB_PER_SUBSCRIBER)
            }),
        ),
        TargetCheck::new(
            format!("hold at least {TARGET_HELD} subscribers (as many as the fd limits allow)"),
            format!(
                "{connected} held, {failed} failed; server open fds {} of soft limit {}",
                server_fds.map_or("?".to_owned(), |v| v.to_string()),
                sys::show_limit(server.info.nofile_soft)
            ),
            Verdict::unless(&[(subscribers < TARGET_HELD, "fewer than 15000 asked for")], || {
                connected >= TARGET_HELD
            }),
        ),
    ];

    let show = |value: Option<f64>| value.map_or("?".to_owned(), |v| format!("{v:.2}"));
    let mut rows = vec![
        report::server_row(&server.info),
        (
            "parameters".to_owned(),
            format!(
                "{subscribers} subscribers in {worker_count} worker processes, {event_count} events"
            ),
        ),
        (
            "subscribers".to_owned(),
            format!(
                "{connected} connected, {failed} failed, in {connect_s:.2} s; the server counts {}",
                server_subscribers.map_or("?".to_owned(), |n| n.to_string())
            ),
        ),
        (
            "server RSS before / after".to_owned(),
            format!(
                "{} / {} KiB ({} open fds after)",
                rss_before.map_or("?".to_owned(), |v| v.to_string()),
                rss_after.map_or("?".to_owned(), |v| v.to_string()),
                server_fds.map_or("?".to_owned(), |v| v.to_string()),
            ),
        ),
        (
            "server memory per idle subscriber".to_owned(),
            format!(
                "{} KiB (kernel slab, both ends, machine-wide: {} KiB; worker RSS: {} KiB)",
                show(kib),
                show(results.memory.kernel_slab_kib_per_subscriber),
                show(results.memory.worker_rss_kib_per_subscriber),
            ),
        ),
    ];
    for event in &results.events {
        rows.push((
            format!("event {} since settled_at", event.event_id),
            format!(
                "{} of {}: p50/p99/max {}",
                event.received,
                event.expected,
                Summary::brief(event.since_settled_ms.as_ref())
            ),
        ));
        rows.push((
            format!("event {} since first arrival", event.event_id),
            format!(
                "p50/p99/max {}",
                Summary::brief(event.since_first_ms.as_ref())
            ),
        ));
    }
    rows.push((
        "all events since settled_at".to_owned(),
        format!(
            "p50/p99/max {}",
            Summary::brief(results.all_events_since_settled_ms.as_ref())
        ),
    ));
    rows.push((
        "all events since first arrival".to_owned(),
        format!(
            "p50/p99/max {}",
            Summary::brief(results.all_events_since_first_ms.as_ref())
        ),
    ));
    let parameters = Parameters {
        subscribers,
        workers: worker_count,
        per_worker,
        events: event_count,
        settle_ms: u64::try_from(settle.as_millis()).unwrap_or(u64::MAX),
        connect_concurrency: args.connect_concurrency,
        worker_read_buf_bytes: worker::READ_BUF_BYTES,
    };
    let info = server.info.clone();
    server.stop().await?;
    Ok(PhaseReport {
        phase: "fanout",
        parameters: serde_json::to_value(parameters)?,
        server: info,
        results: serde_json::to_value(results)?,
        cpu: vec![CpuDuring::new("event deliveries", cpu)],
        targets,
        problems,
        rows,
    })
}
