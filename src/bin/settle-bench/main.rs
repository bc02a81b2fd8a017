//! settle-bench: the load generator of issue 4. It measures what the server adds to
//! the consistency window (`overhead`), how many durable commands per second it
//! accepts beside a no-op route (`accept`), and how it fans one event out to many SSE
//! subscribers and what an idle subscriber costs (`fanout`); `all` runs the three.
//!
//! ```text
//! cargo build --release --bins
//! target/release/settle-bench all                 # the full run (a few minutes)
//! target/release/settle-bench all --smoke         # seconds, for CI
//! target/release/settle-bench fanout --subscribers 15000 --json fanout.json
//! target/release/settle-bench fanout --subscribers max   # up to the server's fd limit
//! ```
//!
//! By default every phase starts its own `settle` (the binary next to this one) on a
//! loopback port with a fresh data directory and stops it afterwards; `--target` points
//! the bench at a running server instead. Every loop is bounded in count and time.
//! Each run prints the machine, versions and parameters, a table per phase, and one
//! JSON document (also written with `--json PATH`; with `--json -` the document alone
//! goes to stdout and the rest to stderr). The exit status is 0 when every phase
//! measured what it meant to (no lost command, no missing event), 1 otherwise, 2 when
//! the bench could not run; targets that are not met do not change it. On SIGINT or
//! SIGTERM it stops the server and workers it started, removes the server's data
//! directory, and dies by the signal.
//!
//! Layout:
//! - `client`: one keep-alive hyper HTTP/1.1 connection per socket, optional source IP.
//! - `sse`: the SSE parser, the id-only scanner, the observing subscriber.
//! - `commands`: the bench's commands and how their events are recognised.
//! - `server`: starting, describing and stopping the server under test.
//! - `overhead`, `accept`, `fanout`: the three phases (`fanout` also holds the
//!   subscriber worker processes).
//! - `stats`: percentiles and CPU accounting; `sys`: /proc and rlimits;
//!   `report`: the tables and the JSON document.

mod accept;
mod client;
mod commands;
mod fanout;
mod overhead;
mod report;
mod server;
mod sse;
mod stats;
mod sys;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::accept::AcceptArgs;
use crate::fanout::worker::WorkerArgs;
use crate::fanout::FanoutArgs;
use crate::overhead::OverheadArgs;
use crate::report::{Document, PhaseReport, Versions};
use crate::server::Server;
use crate::sys::Machine;
use settle::signal::Signal;

/// The server's delay in a smoke run: short, so the run takes seconds.
const SMOKE_DELAY_MS: u64 = 200;
/// The server's delay otherwise: the project's default window.
const DEFAULT_DELAY_MS: u64 = 700;

#[derive(Parser)]
#[command(
    name = "settle-bench",
    version = settle::build_info::version(),
    about = "Benchmarks a settle server: window overhead, durable accept throughput, SSE fan-out."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Settle overhead: event arrival - 202 - delay, at a steady command rate.
    Overhead {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: OverheadArgs,
    },
    /// Durable accept throughput at a concurrency, beside a no-op route's rate.
    Accept {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: AcceptArgs,
    },
    /// SSE fan-out: memory per idle subscriber, time for one event to reach all.
    Fanout {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        args: FanoutArgs,
    },
    /// overhead, accept and fanout in sequence (each with a fresh server).
    All {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        overhead: OverheadArgs,
        #[command(flatten)]
        accept: AcceptArgs,
        #[command(flatten)]
        fanout: FanoutArgs,
    },
    /// Internal: holds fan-out subscribers for the `fanout` phase.
    #[command(hide = true)]
    FanoutWorker(WorkerArgs),
}

#[derive(Args, Clone, Debug)]
struct CommonArgs {
    /// Measure a running server at this loopback URL (http://127.0.0.1:PORT) instead
    /// of starting one per phase.
    #[arg(long)]
    target: Option<String>,
    /// The PID of the --target server, for its memory and CPU (read from /proc)
    /// [default: the process whose socket listens on the --target address].
    #[arg(long, requires = "target")]
    server_pid: Option<u32>,
    /// The settle binary to start [default: `settle` beside this executable].
    #[arg(long, conflicts_with = "target")]
    server_bin: Option<PathBuf>,
    /// --delay-ms of the started server [default: 700; 200 with --smoke]. A --target
    /// server's own setting is read from GET /api/faults.
    #[arg(long, conflicts_with = "target", allow_negative_numbers = true)]
    delay_ms: Option<u64>,
    /// Where the started server's fresh data directory is made [default: the system's
    /// temporary directory]. `/dev/shm` takes the disk out of the measurement.
    #[arg(long, conflicts_with = "target")]
    data_parent: Option<PathBuf>,
    /// Seconds each timed phase runs: overhead 30, accept 10 per route [default; 2 with
    /// --smoke]. `fanout` is not timed (its --events sets how many it publishes).
    #[arg(long, allow_negative_numbers = true, value_parser = crate::positive_u64())]
    duration: Option<u64>,
    /// Also write the JSON document to this file; `-`: the JSON document alone on
    /// stdout (for `jq`), the human report on stderr.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A seconds-long run for CI: small defaults for every parameter not given.
    #[arg(long)]
    smoke: bool,
}

/// What every phase shares: the resolved common flags.
pub struct Ctx {
    pub smoke: bool,
    duration: Option<u64>,
    target: Option<SocketAddr>,
    server_pid: Option<u32>,
    server_bin: Option<PathBuf>,
    delay_ms: u64,
    data_parent: Option<PathBuf>,
    /// A `--target`'s process, as the last phase found it.
    target_process: std::sync::Mutex<Option<server::ServerProcess>>,
    /// Why the server a failed phase started is gone, if it exited by itself.
    death_note: server::DeathNote,
}

impl Ctx {
    fn new(common: &CommonArgs) -> anyhow::Result<Self> {
        let target = common
            .target
            .as_deref()
            .map(server::parse_target)
            .transpose()?;
        let server_bin = match (&target, &common.server_bin) {
            (Some(_), _) => None,
            (None, Some(path)) => Some(path.clone()),
            (None, None) => Some(server::default_server_binary()?),
        };
        let delay_ms = common.delay_ms.unwrap_or(if common.smoke {
            SMOKE_DELAY_MS
        } else {
            DEFAULT_DELAY_MS
        });
        Ok(Self {
            smoke: common.smoke,
            duration: common.duration,
            target,
            server_pid: common.server_pid,
            server_bin,
            delay_ms,
            data_parent: common.data_parent.clone(),
            target_process: std::sync::Mutex::default(),
            death_note: server::DeathNote::default(),
        })
    }

    /// An explicit flag, else the smoke or the full default.
    pub fn pick<T>(&self, explicit: Option<T>, smoke: T, full: T) -> T {
        explicit.unwrap_or(if self.smoke { smoke } else { full })
    }

    /// `--duration`, else 2 s for a smoke run, else the phase's default.
    pub fn duration_s(&self, full: u64) -> u64 {
        self.pick(self.duration, 2, full)
    }

    fn found_target(&self) -> std::sync::MutexGuard<'_, Option<server::ServerProcess>> {
        // Phases run one after another: a poisoned lock held nothing half-written.
        self.target_process
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A fresh server for one phase, or the `--target`.
    ///
    /// # Errors
    /// When the server cannot be started or does not answer.
    pub async fn server(&self) -> anyhow::Result<Server> {
        let server = match (&self.target, &self.server_bin) {
            (Some(addr), _) => {
                let found = self.found_target().clone();
                Server::attach(*addr, self.server_pid, found)
                    .await
                    .inspect(|server| *self.found_target() = server.process())
            }
            (None, Some(binary)) => {
                let note = self.death_note.clone();
                Server::start(binary, self.delay_ms, self.data_parent.as_deref(), note).await
            }
            (None, None) => Err(anyhow::anyhow!("no server to measure")),
        };
        server.map_err(not_started)
    }

    /// What a started server that exited by itself left in the death note, once.
    fn take_death_note(&self) -> Option<server::Death> {
        self.death_note.lock().ok()?.take()
    }
}

/// A phase's failure before it measured anything: its server would not start or
/// answer, or had no room for the subscribers asked for. When every phase failed so,
/// the bench could not run (exit 2); a phase that fails once it measures (its server
/// died, a connection broke) makes a run with problems (exit 1).
#[derive(Debug)]
pub struct NotStarted(anyhow::Error);

impl std::fmt::Display for NotStarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for NotStarted {}

/// Marks `err` as a phase's failure to begin ([`NotStarted`]).
pub fn not_started(err: anyhow::Error) -> anyhow::Error {
    if err.is::<NotStarted>() {
        err
    } else {
        NotStarted(err).into()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        // A worker is one of many processes on a small machine: one thread each.
        Command::FanoutWorker(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the worker runtime")
            .and_then(|runtime| runtime.block_on(fanout::worker::run(args)))
            .map(|()| Outcome::Measured),
        command => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("building the runtime")
            .and_then(|runtime| runtime.block_on(run(command))),
    };
    match outcome {
        Ok(Outcome::Measured) => ExitCode::SUCCESS,
        Ok(Outcome::Problems) => ExitCode::from(1),
        Ok(Outcome::Interrupted(signal)) => die_by(signal),
        Err(err) => {
            eprintln!("settle-bench: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// The parser of a count flag: at least 1 (a zero would measure nothing, or hang).
fn positive_usize() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// [`positive_usize`] for a `u64` flag.
fn positive_u64() -> clap::builder::RangedU64ValueParser<u64> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// How a run ended, for the exit status.
enum Outcome {
    /// Every phase measured what it meant to (targets met or not).
    Measured,
    /// A phase found problems (a lost command, a missing event, a failed subscriber).
    Problems,
    /// SIGINT or SIGTERM: the run was cut short, once what it started was stopped.
    Interrupted(Signal),
}

/// Ends the process by `signal` once the bench has cleaned up, as an interrupted
/// program should: a shell then sees it killed by the signal (130, 143) and stops a
/// loop of runs too, where an exit with 130 would let the loop go on.
fn die_by(signal: Signal) -> ExitCode {
    // SAFETY: the runtime, and with it every thread that handled signals, is gone;
    // restoring the default action and raising the signal ends the process.
    unsafe {
        libc::signal(signal.number, libc::SIG_DFL);
        libc::raise(signal.number);
    }
    ExitCode::from(u8::try_from(128 + signal.number).unwrap_or(1))
}

/// Prints the JSON document (alone on stdout with `--json -`, after the report
/// otherwise) and writes it to the `--json` file, opened at the start.
fn write_document(
    document: &Document,
    json_on_stdout: bool,
    json_file: Option<&mut (std::fs::File, PathBuf)>,
) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(document).context("encoding the JSON document")?;
    if json_on_stdout {
        println!("{json}");
        return Ok(());
    }
    println!("\n{json}");
    if let Some((file, path)) = json_file {
        file.write_all(format!("{json}\n").as_bytes())
            .and_then(|()| file.flush())
            .with_context(|| format!("writing {}", path.display()))?;
        println!("(written to {})", path.display());
    }
    Ok(())
}

/// Runs the phases of one command.
async fn run(command: Command) -> anyhow::Result<Outcome> {
    let nofile = match sys::raise_nofile_limit() {
        Ok(limits) => Some(limits),
        Err(err) => {
            eprintln!("settle-bench: cannot raise the open-file limit: {err:#}");
            None
        }
    };
    let common = match &command {
        Command::Fanout { common, .. } if common.duration.is_some() => anyhow::bail!(
            "--duration times the overhead and accept phases; fanout is not timed (--events \
             sets how many events it publishes)"
        ),
        Command::Overhead { common, .. }
        | Command::Accept { common, .. }
        | Command::Fanout { common, .. }
        | Command::All { common, .. } => common.clone(),
        Command::FanoutWorker(_) => unreachable!("workers run in their own runtime"),
    };
    let ctx = Ctx::new(&common)?;
    // Blocking: the wake-up probe's round trips.
    let machine = tokio::task::spawn_blocking(move || Machine::describe(nofile))
        .await
        .context("describing the machine")?;
    let versions = Versions::collect();
    let mut document = Document {
        tool: "settle-bench",
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        machine,
        versions,
        phases: Vec::new(),
        errors: Vec::new(),
        ok: true,
    };
    // With `--json -` stdout carries the JSON document alone. A file is opened now, so
    // that a path that cannot be written fails the run before it measures.
    let json_on_stdout = common.json.as_deref() == Some(Path::new("-"));
    let mut json_file = match &common.json {
        Some(path) if !json_on_stdout => Some((
            std::fs::File::create(path)
                .with_context(|| format!("--json: cannot write {}", path.display()))?,
            path.clone(),
        )),
        _ => None,
    };
    let mut human: Box<dyn Write> = if json_on_stdout {
        Box::new(io::stderr())
    } else {
        Box::new(io::stdout())
    };
    document
        .print_header(&mut *human)
        .context("writing the report")?;

    type Phase<'a> =
        std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<PhaseReport>> + 'a>>;
    let phases: Vec<(&str, Phase)> = match &command {
        Command::Overhead { args, .. } => vec![("overhead", Box::pin(overhead::run(&ctx, args)))],
        Command::Accept { args, .. } => vec![("accept", Box::pin(accept::run(&ctx, args)))],
        Command::Fanout { args, .. } => vec![("fanout", Box::pin(fanout::run(&ctx, args)))],
        Command::All {
            overhead: overhead_args,
            accept: accept_args,
            fanout: fanout_args,
            ..
        } => vec![
            ("overhead", Box::pin(overhead::run(&ctx, overhead_args))),
            ("accept", Box::pin(accept::run(&ctx, accept_args))),
            ("fanout", Box::pin(fanout::run(&ctx, fanout_args))),
        ],
        Command::FanoutWorker(_) => unreachable!("workers run in their own runtime"),
    };
    // One after the other: each phase needs the machine to itself. An interrupt drops
    // the running phase, which kills what it started (the server, the fan-out workers)
    // and removes the server's data directory.
    let interrupted = settle::signal::stop_requested();
    tokio::pin!(interrupted);
    // Whether every phase that failed did so before measuring.
    let mut could_not_run = true;
    for (name, phase) in phases {
        let outcome = tokio::select! {
            // A signal that came between two phases stops the run before the next starts.
            biased;
            signal = &mut interrupted => {
                eprintln!("settle-bench: {} during the {name} phase: stopped what it started", signal.name);
                // What the phases before it measured is kept.
                document.errors.push(format!("{name}: interrupted by {}", signal.name));
                document.ok = false;
                write_document(&document, json_on_stdout, json_file.as_mut())?;
                return Ok(Outcome::Interrupted(signal));
            }
            outcome = phase => outcome,
        };
        match outcome {
            Ok(report) => {
                report
                    .print_table(&mut *human)
                    .context("writing the report")?;
                document.ok &= report.problems.is_empty();
                document.phases.push(report);
            }
            Err(err) => {
                let err = match ctx.take_death_note() {
                    Some(server::Death { status, last_lines }) => {
                        let explained = anyhow::anyhow!(
                            "the server exited during the run ({status}), so: {err:#}; its last lines:\n{last_lines}"
                        );
                        if err.is::<NotStarted>() {
                            not_started(explained)
                        } else {
                            explained
                        }
                    }
                    None => err,
                };
                could_not_run &= err.is::<NotStarted>();
                eprintln!("settle-bench: the {name} phase failed: {err:#}");
                document.errors.push(format!("{name}: {err:#}"));
            }
        }
    }
    document.ok &= document.errors.is_empty();

    write_document(&document, json_on_stdout, json_file.as_mut())?;
    // A signal while the report was written: the run is over, but it was asked to stop.
    if let Some(signal) = futures::FutureExt::now_or_never(&mut interrupted) {
        return Ok(Outcome::Interrupted(signal));
    }
    if document.phases.is_empty() && could_not_run {
        anyhow::bail!("no phase could run");
    }
    Ok(if document.ok {
        Outcome::Measured
    } else {
        Outcome::Problems
    })
}
