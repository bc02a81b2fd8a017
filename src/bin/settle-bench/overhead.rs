//! Phase 1, overhead: what the server adds to the configured delay.
//!
//! Commands go out at a steady rate, each under its own idempotency key; one SSE
//! subscriber in this process receives the events. Per command,
//! `overhead = (settled event received) - (202 received) - delay`, all on this
//! process's monotonic clock. The server starts the delay when it accepts, before the
//! accept's fsync and the 202, so the figure can be slightly negative; the overhead
//! from when the request was *sent* is reported beside it as an upper bound.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use settle::metrics::StepsReport;
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior};

use crate::client::{self, Conn};
use crate::commands::{self, LIKE_BODY};
use crate::not_started;
use crate::report::{self, CpuDuring, PhaseReport, TargetCheck, Verdict, HAD_PROBLEMS};
use crate::sse::Observer;
use crate::stats::{self, round3, CpuMeter, Summary};
use crate::Ctx;

/// The issue's target: p99 at most this, at this rate.
const TARGET_P99_MS: f64 = 5.0;
const TARGET_RATE: u64 = 1000;
/// The shortest run judged against the target ("sustained"): the default's.
const TARGET_DURATION_S: u64 = 30;
/// How long after the last command its event may take beyond delay + jitter.
const SETTLE_GRACE: Duration = Duration::from_secs(10);
/// Error messages kept in the report (the count has them all).
const ERROR_SAMPLES: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Each command creates a new task: no two commands share a task.
    Create,
    /// Each command likes one of `--tasks` pre-created tasks, round robin, so some
    /// commands queue behind earlier ones on the same task (per-task order).
    Like,
}

#[derive(Args, Clone, Debug)]
pub struct OverheadArgs {
    /// Commands per second [default: 1000; 200 with --smoke].
    #[arg(long, allow_negative_numbers = true, value_parser = crate::positive_u64())]
    pub rate: Option<u64>,
    /// Most commands awaiting their 202 at once; also the number of keep-alive
    /// connections the commands go over.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = crate::positive_usize())]
    pub max_in_flight: usize,
    /// What each overhead command is.
    #[arg(long, value_enum, default_value_t = Workload::Like)]
    pub workload: Workload,
    /// How many tasks `--workload like` spreads its likes over.
    #[arg(long, default_value_t = 100, allow_negative_numbers = true, value_parser = crate::positive_usize())]
    pub tasks: usize,
}

#[derive(Debug, Serialize)]
struct Parameters {
    rate: u64,
    duration_s: u64,
    max_in_flight: usize,
    workload: Workload,
    tasks: Option<usize>,
    pacing: &'static str,
}

#[derive(Debug, Serialize)]
struct Results {
    sent: u64,
    accepted: usize,
    errors: usize,
    error_samples: Vec<String>,
    settled: usize,
    failed: usize,
    unsettled: usize,
    /// Commands answered 202 per second of the sending interval.
    achieved_rate: f64,
    /// How far the sender fell behind its schedule at worst.
    max_schedule_lag_ms: f64,
    /// The figure of the issue: event received - 202 received - delay.
    overhead_from_202_ms: Option<Summary>,
    /// Event received - request sent - delay: an upper bound that includes the accept.
    overhead_from_send_ms: Option<Summary>,
    /// The first part of the overhead, on the server's clock: the event's `settled_at`
    /// (its apply step began) - `accepted_at` - delay. The timer (the server sleeps
    /// until `accepted_at` + delay) and the wait for the step running when the command
    /// fell due.
    delay_to_step_ms: Option<Summary>,
    /// The rest, across the two processes' shared wall clock: event received -
    /// `settled_at`. The step's transaction, its write to the apply log, the publish and
    /// the delivery.
    step_to_received_ms: Option<Summary>,
    /// Request sent to 202 received.
    accept_latency_ms: Option<Summary>,
    /// The server's own timing of its apply steps since it started (so with a started
    /// server, this phase and its setup): where most of the overhead goes.
    server_apply_steps: Option<StepsReport>,
}

/// The server's `apply_steps` (`GET /api/metrics`); `None` if it does not say (an
/// older server, a broken connection).
async fn fetch_apply_steps(conn: &mut Conn) -> Option<StepsReport> {
    #[derive(Deserialize)]
    struct Metrics {
        apply_steps: StepsReport,
    }
    conn.metrics::<Metrics>()
        .await
        .map(|metrics| metrics.apply_steps)
}

/// Commands the schedule owes `elapsed` after its start at `rate` per second: command
/// i goes at i / rate, so the first at once, and a tick just before the end of d
/// seconds is owed rate × d (a run whose last ticks come late sends fewer).
/// How long past the end of the sending interval the sender may wait for a free
/// connection to send what was scheduled before it.
const END_GRACE: Duration = Duration::from_millis(100);

fn owed(elapsed: Duration, rate: u64) -> u64 {
    (elapsed.as_secs_f64() * rate as f64) as u64 + 1
}

fn brief_steps(steps: &StepsReport) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    let (t, f) = (&steps.transaction_us, &steps.flush_us);
    let r = &steps.release_sync_us;
    let releases = format!("{} segment release syncs, max {:.2} ms", r.count, ms(r.max));
    format!(
        "{} steps of {} / {} commands (p50 / max); transaction {:.2} / {:.2} / {:.2} ms, flush {:.2} / {:.2} / {:.2} ms (p50 / p99 / max); {releases}",
        steps.commands.count,
        steps.commands.p50,
        steps.commands.max,
        ms(t.p50),
        ms(t.p99),
        ms(t.max),
        ms(f.p50),
        ms(f.p99),
        ms(f.max),
    )
}

/// One command that got its 202.
struct Sent {
    command_id: String,
    sent_at: Instant,
    accepted_at: Instant,
}

/// What the sending tasks record; a std lock, held only to push.
#[derive(Default)]
struct Ledger {
    sent: Vec<Sent>,
    errors: usize,
    error_samples: Vec<String>,
}

impl Ledger {
    fn error(&mut self, message: String) {
        self.errors += 1;
        if self.error_samples.len() < ERROR_SAMPLES {
            self.error_samples.push(message);
        }
    }
}

/// Runs the overhead phase.
///
/// # Errors
/// When the server cannot be started or the setup fails.
pub async fn run(ctx: &Ctx, args: &OverheadArgs) -> anyhow::Result<PhaseReport> {
    let rate = ctx.pick(args.rate, 200, TARGET_RATE);
    let duration_s = ctx.duration_s(TARGET_DURATION_S);
    let server = ctx.server().await?;
    let addr = server.info.addr;
    let delay = Duration::from_millis(server.info.delay_ms);
    let settle_timeout = delay + Duration::from_millis(server.info.jitter_ms) + SETTLE_GRACE;
    let run = commands::run_id();

    // Until the first paced command, a failure is one to begin (`NotStarted`).
    let mut observer = Observer::connect(addr).await.map_err(not_started)?;
    // Used in turn (first out, last back in): at the default rate no connection sits
    // idle long enough for the server to close it (`settle::net::HEADER_READ_TIMEOUT`),
    // as the bottom of a stack would while a steady rate needs only its top. At rates
    // too low for that, `send_one` replaces a closed connection before sending.
    let mut pool = VecDeque::with_capacity(args.max_in_flight);
    for _ in 0..args.max_in_flight {
        pool.push_back(client::connect(addr).await.map_err(not_started)?);
    }
    let tasks = match args.workload {
        Workload::Like => commands::create_tasks(
            pool.front_mut().expect("at least one connection"),
            &mut observer,
            args.tasks,
            &run,
            settle_timeout,
        )
        .await
        .map_err(not_started)?,
        Workload::Create => Vec::new(),
    };

    let connections = pool.len();
    let permits = Arc::new(Semaphore::new(connections));
    let lost = Arc::new(AtomicUsize::new(0));
    let pool = Arc::new(Mutex::new(pool));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let cpu = CpuMeter::start(server.info.pid, &[]);

    // Pacing: a 1 ms tick sends every command the schedule (`rate` per second from
    // `start`, command i at i / rate, the first at once) owes by now. Missed ticks are
    // skipped (MissedTickBehavior::Skip) but the commands they owed go out at the next
    // tick, so the average rate holds; when all `max_in_flight` connections are busy
    // the sender waits, falls behind, and the lag is reported. Sending stops when the
    // duration is over, once the commands scheduled before its end are out (the first
    // tick past it may still owe the last of them), waiting for a connection no later
    // than END_GRACE past it.
    let start = Instant::now();
    let end = start + Duration::from_secs(duration_s);
    let scheduled_total = rate.saturating_mul(duration_s);
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut issued: u64 = 0;
    let mut max_lag = Duration::ZERO;
    'pacing: loop {
        ticker.tick().await;
        let now = Instant::now();
        // Every connection broken and none replaced (the server is gone): nothing more
        // can be sent.
        if lost.load(Ordering::SeqCst) == connections {
            break;
        }
        let due = owed(now - start, rate).min(scheduled_total);
        while issued < due {
            // A permit may never come back (its connection broke).
            let Ok(permit) =
                tokio::time::timeout_at(end + END_GRACE, permits.clone().acquire_owned()).await
            else {
                break 'pacing;
            };
            let permit = permit.context("the connection semaphore closed")?;
            let scheduled = start + Duration::from_secs_f64(issued as f64 / rate as f64);
            max_lag = max_lag.max(Instant::now().saturating_duration_since(scheduled));
            let conn = pool
                .lock()
                .expect("pool lock poisoned")
                .pop_front()
                .expect("every permit stands for a pooled connection");
            let (path, body) = match args.workload {
                Workload::Like => (
                    commands::like_path(tasks[(issued as usize) % tasks.len()]),
                    Bytes::from_static(LIKE_BODY),
                ),
                Workload::Create => (
                    "/api/tasks".to_owned(),
                    Bytes::from(format!(r#"{{"title":"overhead {issued}"}}"#)),
                ),
            };
            let key = format!("{run}-{issued}");
            let (pool, ledger, lost) = (pool.clone(), ledger.clone(), lost.clone());
            tokio::spawn(async move {
                let conn = send_one(conn, addr, &path, &key, body, &ledger).await;
                match conn {
                    Some(conn) => pool.lock().expect("pool lock poisoned").push_back(conn),
                    // The connection broke and could not be replaced: one permit fewer.
                    None => {
                        lost.fetch_add(1, Ordering::SeqCst);
                        permit.forget();
                    }
                }
            });
            issued += 1;
        }
        if now >= end || issued >= scheduled_total {
            break;
        }
    }
    let sending_s = start.elapsed().as_secs_f64();
    // Wait for every 202: each permit back, or forgotten with its broken connection.
    // Bounded: every request times out after REQUEST_TIMEOUT.
    let drained_by = Instant::now() + client::REQUEST_TIMEOUT + Duration::from_secs(1);
    while permits.available_permits() + lost.load(Ordering::SeqCst) < connections
        && Instant::now() < drained_by
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let (sent, errors, error_samples) = {
        let mut ledger = ledger.lock().expect("ledger lock poisoned");
        (
            std::mem::take(&mut ledger.sent),
            ledger.errors,
            ledger.error_samples.clone(),
        )
    };
    let pending: HashSet<String> = sent.iter().map(|s| s.command_id.clone()).collect();
    let events =
        commands::wait_for_events(&mut observer, pending, Instant::now() + settle_timeout).await;
    let cpu = cpu.finish();
    let server_apply_steps = match client::connect(addr).await {
        Ok(mut conn) => fetch_apply_steps(&mut conn).await,
        Err(_) => None,
    };

    let delay_ms = delay.as_secs_f64() * 1000.0;
    let mut from_202 = Vec::with_capacity(sent.len());
    let mut from_send = Vec::with_capacity(sent.len());
    let mut delay_to_step = Vec::with_capacity(sent.len());
    let mut step_to_received = Vec::with_capacity(sent.len());
    let mut accept_latency = Vec::with_capacity(sent.len());
    let (mut settled, mut failed) = (0, 0);
    let mut failure_reason = None;
    for command in &sent {
        accept_latency.push(ms(command.accepted_at - command.sent_at));
        let Some(event) = events.get(&command.command_id) else {
            continue;
        };
        if !event.settled {
            failed += 1;
            failure_reason = failure_reason.or(event.data.reason.clone());
            continue;
        }
        settled += 1;
        let received = event.observed.at;
        from_202.push(signed_ms(received, command.accepted_at) - delay_ms);
        from_send.push(signed_ms(received, command.sent_at) - delay_ms);
        if let (Some(accepted_ns), Some(step_ns)) =
            (event.data.accepted_at_ns(), event.data.settled_at_ns())
        {
            delay_to_step.push(stats::ms_between(step_ns, accepted_ns) - delay_ms);
            step_to_received.push(stats::ms_between(event.observed.wall_ns, step_ns));
        }
    }
    let accepted = sent.len();
    let results = Results {
        sent: issued,
        accepted,
        errors,
        error_samples,
        settled,
        failed,
        unsettled: accepted - settled - failed,
        achieved_rate: round3(accepted as f64 / sending_s.max(1e-9)),
        max_schedule_lag_ms: round3(max_lag.as_secs_f64() * 1000.0),
        overhead_from_202_ms: Summary::of(&mut from_202),
        overhead_from_send_ms: Summary::of(&mut from_send),
        delay_to_step_ms: Summary::of(&mut delay_to_step),
        step_to_received_ms: Summary::of(&mut step_to_received),
        accept_latency_ms: Summary::of(&mut accept_latency),
        server_apply_steps,
    };

    let mut problems = Vec::new();
    if results.accepted == 0 {
        problems.push("no command was accepted".to_owned());
    }
    if results.errors > 0 {
        problems.push(format!("{} commands were not answered 202", results.errors));
    }
    if results.failed > 0 {
        problems.push(format!(
            "{} commands failed (command:failed, reason {})",
            results.failed,
            failure_reason.as_deref().unwrap_or("?")
        ));
    }
    if results.unsettled > 0 {
        problems.push(format!(
            "{} accepted commands had no event within {settle_timeout:?} of the last send",
            results.unsettled
        ));
    }
    if server.info.jitter_ms > 0 {
        problems.push(format!(
            "the server adds up to {} ms of jitter, which counts as overhead here",
            server.info.jitter_ms
        ));
    }

    let p99 = results.overhead_from_202_ms.map(|s| s.p99);
    // Sustained: at the target's rate, for as long as the default run.
    let not_judged = [
        (rate < TARGET_RATE, "a lower rate"),
        (duration_s < TARGET_DURATION_S, "shorter than 30 s"),
        (!problems.is_empty(), HAD_PROBLEMS),
    ];
    let target = TargetCheck::new(
        format!("overhead p99 <= {TARGET_P99_MS} ms at {TARGET_RATE} commands/s for {TARGET_DURATION_S} s"),
        format!(
            "p99 {} ms at {:.0} commands/s achieved",
            p99.map_or("?".to_owned(), |p| format!("{p:.2}")),
            results.achieved_rate
        ),
        Verdict::unless(&not_judged, || {
            p99.is_some_and(|p| p <= TARGET_P99_MS)
                && results.achieved_rate >= 0.99 * TARGET_RATE as f64
        }),
    );

    let rows = vec![
        report::server_row(&server.info),
        (
            "parameters".to_owned(),
            format!(
                "{rate} commands/s for {duration_s} s, {:?} workload{}, at most {} in flight",
                args.workload,
                if args.workload == Workload::Like {
                    format!(" over {} tasks", tasks.len())
                } else {
                    String::new()
                },
                args.max_in_flight
            ),
        ),
        (
            "commands".to_owned(),
            format!(
                "{} sent, {} accepted (202), {} errors, {} settled, {} failed, {} without event",
                results.sent,
                results.accepted,
                results.errors,
                results.settled,
                results.failed,
                results.unsettled
            ),
        ),
        (
            "achieved rate".to_owned(),
            format!(
                "{:.1} commands/s (max lag behind schedule {:.2} ms)",
                results.achieved_rate, results.max_schedule_lag_ms
            ),
        ),
        (
            "overhead from 202 p50/p99/max".to_owned(),
            Summary::brief(results.overhead_from_202_ms.as_ref()),
        ),
        (
            "  of which accepted + delay -> step began".to_owned(),
            Summary::brief(results.delay_to_step_ms.as_ref()),
        ),
        (
            "  of which step began -> received".to_owned(),
            Summary::brief(results.step_to_received_ms.as_ref()),
        ),
        (
            "overhead from send p50/p99/max".to_owned(),
            Summary::brief(results.overhead_from_send_ms.as_ref()),
        ),
        (
            "202 latency p50/p99/max".to_owned(),
            Summary::brief(results.accept_latency_ms.as_ref()),
        ),
        (
            "server apply steps (since start)".to_owned(),
            results
                .server_apply_steps
                .as_ref()
                .map_or_else(|| "not reported".to_owned(), brief_steps),
        ),
    ];
    let parameters = Parameters {
        rate,
        duration_s,
        max_in_flight: args.max_in_flight,
        workload: args.workload,
        tasks: (args.workload == Workload::Like).then_some(tasks.len()),
        pacing: "1 ms tokio interval, MissedTickBehavior::Skip, sends what the schedule owes at each tick",
    };
    let info = server.info.clone();
    drop(observer);
    server.stop().await?;
    Ok(PhaseReport {
        phase: "overhead",
        parameters: serde_json::to_value(parameters)?,
        server: info,
        results: serde_json::to_value(results)?,
        cpu: vec![CpuDuring::new("whole phase", cpu)],
        targets: vec![target],
        problems,
        rows,
    })
}

/// Sends one command and records its 202. Returns the connection for reuse, a new one
/// if it broke, or `None` if no new one could be opened.
async fn send_one(
    mut conn: Conn,
    addr: std::net::SocketAddr,
    path: &str,
    key: &str,
    body: Bytes,
    ledger: &Mutex<Ledger>,
) -> Option<Conn> {
    if conn.is_closed() {
        conn = match client::connect(addr).await {
            Ok(fresh) => fresh,
            Err(err) => {
                ledger
                    .lock()
                    .expect("ledger lock poisoned")
                    .error(format!("{err:#}"));
                return None;
            }
        };
    }
    let sent_at = Instant::now();
    let outcome = conn.command(path, key, body).await;
    let accepted_at = Instant::now();
    match outcome {
        Ok((StatusCode::ACCEPTED, body)) => {
            let record = commands::accepted_command_id(&body).map(|command_id| Sent {
                command_id,
                sent_at,
                accepted_at,
            });
            let mut ledger = ledger.lock().expect("ledger lock poisoned");
            match record {
                Ok(record) => ledger.sent.push(record),
                Err(err) => ledger.error(format!("{err:#}")),
            }
            Some(conn)
        }
        Ok((status, body)) => {
            ledger
                .lock()
                .expect("ledger lock poisoned")
                .error(format!("{status}: {}", String::from_utf8_lossy(&body)));
            Some(conn)
        }
        Err(err) => {
            ledger
                .lock()
                .expect("ledger lock poisoned")
                .error(format!("{err:#}"));
            drop(conn);
            client::connect(addr).await.ok()
        }
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// `later - earlier` in milliseconds, negative if `later` is earlier.
fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    if later >= earlier {
        ms(later - earlier)
    } else {
        -ms(earlier - later)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_owes_the_first_command_at_once_and_one_more_per_period() {
        let ms = Duration::from_millis;
        assert_eq!(owed(Duration::ZERO, 1000), 1);
        assert_eq!(owed(ms(1) - Duration::from_nanos(1), 1000), 1);
        assert_eq!(owed(ms(1), 1000), 2);
        // The last tick before the end of a 30 s run: exactly 30000.
        assert_eq!(
            owed(Duration::from_secs(30) - Duration::from_nanos(1), 1000),
            30000
        );
        assert_eq!(
            owed(Duration::from_secs(2) - Duration::from_nanos(1), 200),
            400
        );
    }
}
