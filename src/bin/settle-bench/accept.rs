//! Phase 2, durable accept throughput: how many commands per second the server answers
//! 202 (each durable, fsync shared by group commit), beside the rate of a no-op route
//! (`GET /api/health`) on the same server and connections: the ceiling that HTTP
//! handling alone allows on this machine.
//!
//! Closed loop: `--concurrency` workers, each with its own keep-alive connection and
//! one request in flight, for `--duration` seconds per route. Each command creates a
//! new task, so the consumer applies them in full batches meanwhile, as in steady
//! state: its CPU is part of what the accept rate pays for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::{self, Conn};
use crate::commands;
use crate::not_started;
use crate::report::{self, CpuDuring, PhaseReport, TargetCheck, Verdict, HAD_PROBLEMS};
use crate::stats::{round3, CpuMeter, CpuPerRequest, CpuUsage, Summary};
use crate::Ctx;

const TARGET_RATE: f64 = 20_000.0;
const TARGET_RATIO: f64 = 0.5;
const TARGET_CONCURRENCY: usize = 64;
/// The shortest route judged against the targets: the default's.
const TARGET_DURATION_S: u64 = 10;
/// Pause between the two routes, so the first one's tail does not overlap the second.
const PAUSE: Duration = Duration::from_secs(1);
const ERROR_SAMPLES: usize = 5;

#[derive(Args, Clone, Debug)]
pub struct AcceptArgs {
    /// Concurrent keep-alive connections, each with one request in flight.
    #[arg(long, default_value_t = TARGET_CONCURRENCY, allow_negative_numbers = true, value_parser = crate::positive_usize())]
    pub concurrency: usize,
}

#[derive(Debug, Serialize)]
struct Parameters {
    concurrency: usize,
    duration_s_per_route: u64,
    noop_route: &'static str,
    command_route: &'static str,
}

/// One route's closed-loop run.
#[derive(Debug, Serialize)]
struct RouteResult {
    /// Answers with the expected status (200 for the no-op, 202 for commands).
    ok: u64,
    /// Other statuses and transport errors.
    errors: u64,
    error_samples: Vec<String>,
    elapsed_s: f64,
    rate_per_s: f64,
    latency_ms: Option<Summary>,
    /// The server's and the bench's CPU per answered request, in µs (`None` for no
    /// request answered).
    cpu_per_request: Option<CpuPerRequest>,
}

#[derive(Debug, Serialize)]
struct Results {
    noop: RouteResult,
    accept: RouteResult,
    /// accept rate / no-op rate.
    ratio: f64,
    /// The server's own counts (`GET /api/metrics`) from before the accept route to
    /// after it: on a `--target` server, what this phase added.
    server_accepted: Option<u64>,
    server_settled: Option<u64>,
    /// New commands the server answered 503 (a bound: `--max-pending`,
    /// `--max-pending-bytes`, `--max-lag-ms`); the bench counts them as errors.
    server_refused: Option<u64>,
    /// How far behind its due times the server's consumer applied when the accept
    /// route ended (`lag_ms`): the backlog the phase left, in time.
    server_lag_ms_at_end: Option<u64>,
}

#[derive(Deserialize)]
struct ServerMetrics {
    accepted: u64,
    settled: u64,
    /// 0 from a server from before `refused`.
    #[serde(default)]
    refused: u64,
    /// `None` from a server from before `lag_ms`.
    #[serde(default)]
    lag_ms: Option<u64>,
}

/// One worker's tally.
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    error_samples: Vec<String>,
    latencies_ms: Vec<f64>,
}

/// Runs the accept phase.
///
/// # Errors
/// When the server cannot be started or connections cannot be opened.
pub async fn run(ctx: &Ctx, args: &AcceptArgs) -> anyhow::Result<PhaseReport> {
    let duration_s = ctx.duration_s(TARGET_DURATION_S);
    let concurrency = args.concurrency;
    let server = ctx.server().await?;
    let addr = server.info.addr;
    let run = Arc::new(commands::run_id());

    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        conns.push(client::connect(addr).await.map_err(not_started)?);
    }

    let pid = server.info.pid;
    let (noop, noop_cpu, mut conns) = closed_loop(
        conns,
        addr,
        pid,
        duration_s,
        StatusCode::OK,
        |conn, _, _| Box::pin(async move { conn.get("/api/health").await }),
    )
    .await;
    tokio::time::sleep(PAUSE).await;

    let metrics_before = match conns.first_mut() {
        Some(conn) => conn.metrics::<ServerMetrics>().await,
        None => None,
    };
    let (accept, accept_cpu, conns) =
        closed_loop(conns, addr, pid, duration_s, StatusCode::ACCEPTED, {
            let run = run.clone();
            move |conn, worker, index| {
                let key = format!("{run}-{worker}-{index}");
                Box::pin(async move {
                    conn.command(
                        "/api/tasks",
                        &key,
                        Bytes::from_static(br#"{"title":"accept bench"}"#),
                    )
                    .await
                })
            }
        })
        .await;

    let server_metrics = match conns.into_iter().next() {
        Some(mut conn) => conn.metrics::<ServerMetrics>().await,
        None => None,
    };
    let ratio = if noop.rate_per_s > 0.0 {
        round3(accept.rate_per_s / noop.rate_per_s)
    } else {
        0.0
    };
    let during = |count: fn(&ServerMetrics) -> u64| {
        let (before, after) = (metrics_before.as_ref()?, server_metrics.as_ref()?);
        Some(count(after).saturating_sub(count(before)))
    };
    let results = Results {
        ratio,
        server_accepted: during(|m| m.accepted),
        server_settled: during(|m| m.settled),
        server_refused: during(|m| m.refused),
        server_lag_ms_at_end: server_metrics.as_ref().and_then(|m| m.lag_ms),
        noop,
        accept,
    };

    let mut problems = Vec::new();
    if results.noop.ok == 0 || results.accept.ok == 0 {
        problems.push("a route answered no request successfully".to_owned());
    }
    if results.noop.errors + results.accept.errors > 0 {
        problems.push(format!(
            "{} no-op and {} command requests failed or got an unexpected status",
            results.noop.errors, results.accept.errors
        ));
    }
    match results.server_accepted {
        None => problems.push(
            "the server's counts could not be read (GET /api/metrics), so the bench's 202s are not checked against them".to_owned(),
        ),
        Some(server_accepted) if server_accepted < results.accept.ok => {
            problems.push(format!(
                "the server counts {server_accepted} accepted commands, the bench {}",
                results.accept.ok
            ));
        }
        Some(_) => {}
    }

    // The targets' parameter is the concurrency, over routes as long as the default's.
    let not_judged = [
        (concurrency != TARGET_CONCURRENCY, "another concurrency"),
        (duration_s < TARGET_DURATION_S, "routes shorter than 10 s"),
        (!problems.is_empty(), HAD_PROBLEMS),
    ];
    let targets = vec![
        TargetCheck::new(
            format!(
                "durable accept >= {TARGET_RATE:.0} commands/s at concurrency {TARGET_CONCURRENCY}"
            ),
            format!("{:.0} commands/s", results.accept.rate_per_s),
            Verdict::unless(&not_judged, || results.accept.rate_per_s >= TARGET_RATE),
        ),
        TargetCheck::new(
            format!("durable accept >= {TARGET_RATIO} of the no-op route's rate"),
            format!(
                "{ratio:.3} ({:.0} / {:.0} requests/s)",
                results.accept.rate_per_s, results.noop.rate_per_s
            ),
            Verdict::unless(&not_judged, || ratio >= TARGET_RATIO),
        ),
    ];
    let route_row = |label: &str, route: &RouteResult| {
        (
            label.to_owned(),
            format!(
                "{:.0}/s ({} ok, {} errors in {:.2} s; latency p50/p99/max {})",
                route.rate_per_s,
                route.ok,
                route.errors,
                route.elapsed_s,
                Summary::brief(route.latency_ms.as_ref())
            ),
        )
    };
    let rows = vec![
        report::server_row(&server.info),
        (
            "parameters".to_owned(),
            format!("concurrency {concurrency}, {duration_s} s per route, keep-alive"),
        ),
        route_row("no-op GET /api/health", &results.noop),
        route_row("accept POST /api/tasks (202)", &results.accept),
        ("ratio accept / no-op".to_owned(), format!("{ratio:.3}")),
        (
            "CPU per request, server / bench".to_owned(),
            format!(
                "no-op {}, accept {}",
                CpuPerRequest::brief(results.noop.cpu_per_request.as_ref()),
                CpuPerRequest::brief(results.accept.cpu_per_request.as_ref())
            ),
        ),
        (
            "server's counts, accept route".to_owned(),
            format!(
                "accepted {}, settled {}, refused {}; at the end the consumer applied {} ms behind due times",
                results
                    .server_accepted
                    .map_or("?".to_owned(), |v| v.to_string()),
                results
                    .server_settled
                    .map_or("?".to_owned(), |v| v.to_string()),
                results
                    .server_refused
                    .map_or("?".to_owned(), |v| v.to_string()),
                results
                    .server_lag_ms_at_end
                    .map_or("?".to_owned(), |v| v.to_string())
            ),
        ),
    ];
    let parameters = Parameters {
        concurrency,
        duration_s_per_route: duration_s,
        noop_route: "GET /api/health",
        command_route: "POST /api/tasks {\"title\":...} (a new task per command)",
    };
    let info = server.info.clone();
    server.stop().await?;
    Ok(PhaseReport {
        phase: "accept",
        parameters: serde_json::to_value(parameters)?,
        server: info,
        results: serde_json::to_value(results)?,
        cpu: vec![
            CpuDuring::new("no-op route", noop_cpu),
            CpuDuring::new("accept route", accept_cpu),
        ],
        targets,
        problems,
        rows,
    })
}

type Exchange<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = anyhow::Result<(StatusCode, Bytes)>> + Send + 'a>,
>;

/// Every connection sends requests back to back until `duration_s` is over. Returns
/// the tally, the CPU used meanwhile (by the server `server_pid`, the bench and the
/// rest) and the connections (a broken one is replaced, or left out).
async fn closed_loop<F>(
    conns: Vec<Conn>,
    addr: SocketAddr,
    server_pid: Option<u32>,
    duration_s: u64,
    expected: StatusCode,
    request: F,
) -> (RouteResult, CpuUsage, Vec<Conn>)
where
    F: for<'a> Fn(&'a mut Conn, usize, u64) -> Exchange<'a> + Clone + Send + Sync + 'static,
{
    let cpu = CpuMeter::start(server_pid, &[]);
    let start = Instant::now();
    let end = start + Duration::from_secs(duration_s);
    let mut workers = Vec::with_capacity(conns.len());
    for (worker, mut conn) in conns.into_iter().enumerate() {
        let request = request.clone();
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut index = 0u64;
            while Instant::now() < end {
                let sent_at = Instant::now();
                let outcome = request(&mut conn, worker, index).await;
                index += 1;
                match outcome {
                    Ok((status, _)) if status == expected => {
                        tally.ok += 1;
                        tally
                            .latencies_ms
                            .push(sent_at.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok((status, body)) => {
                        tally.error(format!("{status}: {}", String::from_utf8_lossy(&body)));
                    }
                    Err(err) => {
                        tally.error(format!("{err:#}"));
                        match client::connect(addr).await.context("reconnecting") {
                            Ok(fresh) => conn = fresh,
                            Err(err) => {
                                tally.error(format!("{err:#}"));
                                return (tally, None);
                            }
                        }
                    }
                }
            }
            (tally, Some(conn))
        }));
    }
    let mut total = Tally::default();
    let mut conns = Vec::new();
    for worker in workers {
        match worker.await {
            Ok((tally, conn)) => {
                total.ok += tally.ok;
                total.errors += tally.errors;
                for sample in tally.error_samples {
                    if total.error_samples.len() < ERROR_SAMPLES {
                        total.error_samples.push(sample);
                    }
                }
                total.latencies_ms.extend(tally.latencies_ms);
                conns.extend(conn);
            }
            Err(err) => total.error(format!("worker task failed: {err}")),
        }
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    let cpu = cpu.finish();
    let result = RouteResult {
        ok: total.ok,
        errors: total.errors,
        error_samples: total.error_samples,
        elapsed_s: round3(elapsed_s),
        rate_per_s: round3(total.ok as f64 / elapsed_s.max(1e-9)),
        latency_ms: Summary::of(&mut total.latencies_ms),
        cpu_per_request: cpu.per_request(total.ok),
    };
    (result, cpu, conns)
}

impl Tally {
    fn error(&mut self, message: String) {
        self.errors += 1;
        if self.error_samples.len() < ERROR_SAMPLES {
            self.error_samples.push(message);
        }
    }
}
