//! The bench's output: a human table per phase and one JSON document for the run.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::Value;

use crate::server::ServerInfo;
use crate::stats::CpuUsage;
use crate::sys::{self, Machine};

/// One target of issue 4, checked against one run.
#[derive(Clone, Debug, Serialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    /// `None` when the run's parameters are not the target's (fewer subscribers,
    /// another rate or concurrency, as in a smoke run's defaults): then it says nothing
    /// about the target. `--smoke` itself changes only defaults, not the verdict.
    pub met: Option<bool>,
}

impl TargetCheck {
    pub fn new(target: impl Into<String>, measured: impl Into<String>, met: Option<bool>) -> Self {
        Self {
            target: target.into(),
            measured: measured.into(),
            met,
        }
    }
}

/// The CPU used during one measured interval of a phase.
#[derive(Debug, Serialize)]
pub struct CpuDuring {
    /// Which interval: "whole phase", "accept route", ...
    pub during: String,
    #[serde(flatten)]
    pub usage: CpuUsage,
}

impl CpuDuring {
    pub fn new(during: impl Into<String>, usage: CpuUsage) -> Self {
        Self {
            during: during.into(),
            usage,
        }
    }
}

/// What one phase (overhead, accept, fanout) measured.
#[derive(Debug, Serialize)]
pub struct PhaseReport {
    pub phase: &'static str,
    pub parameters: Value,
    pub server: ServerInfo,
    pub results: Value,
    /// CPU use during the measured interval(s), by who used it.
    pub cpu: Vec<CpuDuring>,
    pub targets: Vec<TargetCheck>,
    /// Why the run is not a valid measurement (lost commands, failed subscribers...).
    /// Any problem makes the bench exit non-zero.
    pub problems: Vec<String>,
    /// Label and value rows of the human table.
    #[serde(skip)]
    pub rows: Vec<(String, String)>,
}

impl PhaseReport {
    /// Writes the phase's human table.
    ///
    /// # Errors
    /// When `out` cannot be written.
    pub fn print_table(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "\n== {} ==", self.phase)?;
        let mut rows = self.rows.clone();
        for CpuDuring { during, usage } in &self.cpu {
            rows.push((format!("cpu ({during})"), usage.brief()));
        }
        for check in &self.targets {
            let verdict = match check.met {
                Some(true) => "MET",
                Some(false) => "NOT MET",
                None => "n/a (other parameters)",
            };
            rows.push((
                format!("target: {}", check.target),
                format!("{verdict}: {}", check.measured),
            ));
        }
        for problem in &self.problems {
            rows.push(("PROBLEM".to_owned(), problem.clone()));
        }
        let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
        for (label, value) in rows {
            writeln!(out, "  {label:<width$}  {value}")?;
        }
        Ok(())
    }
}

/// Versions of what was measured: of the bench as built (`build.rs`); the server's
/// are in its own row (`settle --version`, which names its commit the same way).
#[derive(Debug, Serialize)]
pub struct Versions {
    pub settle_bench: &'static str,
    /// The compiler that built the bench.
    pub rustc: String,
    /// The commit the bench was built from, `-dirty` if that tree had uncommitted
    /// changes; `None` when built outside a git tree.
    pub git: Option<String>,
    pub bench_profile: &'static str,
}

impl Versions {
    pub fn collect() -> Self {
        Self {
            settle_bench: env!("CARGO_PKG_VERSION"),
            rustc: format!("rustc {}", settle::build_info::RUSTC),
            git: settle::build_info::commit(),
            bench_profile: if cfg!(debug_assertions) {
                "debug (figures are not representative: use --release)"
            } else {
                "release"
            },
        }
    }
}

/// The whole run, as written with `--json`.
#[derive(Debug, Serialize)]
pub struct Document {
    pub tool: &'static str,
    pub command: String,
    pub date: String,
    pub machine: Machine,
    pub versions: Versions,
    pub phases: Vec<PhaseReport>,
    /// Phases that could not run to the end, with why.
    pub errors: Vec<String>,
    /// Every phase ran, and without problems.
    pub ok: bool,
}

impl Document {
    /// Writes what was measured, where and with what, above the tables.
    ///
    /// # Errors
    /// When `out` cannot be written.
    pub fn print_header(&self, out: &mut dyn Write) -> io::Result<()> {
        let us = |figure: Option<f64>| figure.map_or("?".to_owned(), |us| format!("{us:.1} µs"));
        let m = &self.machine;
        let v = &self.versions;
        writeln!(out, "settle-bench {} ({})", v.settle_bench, v.bench_profile)?;
        writeln!(out, "  command  {}", self.command)?;
        writeln!(out, "  date     {}", self.date)?;
        writeln!(
            out,
            "  machine  {} cores, {}, {}, {} MiB, open files {}/{}",
            m.cores,
            m.cpu_model,
            m.kernel,
            m.memory_mib.map_or("?".to_owned(), |v| v.to_string()),
            sys::show_limit(m.nofile_soft),
            sys::show_limit(m.nofile_hard),
        )?;
        writeln!(
            out,
            "  host     wake-up round trip between two threads (median): {} across CPUs, {} on one; TCP congestion control {}",
            us(m.wake_round_trip.across_cpus_us),
            us(m.wake_round_trip.same_cpu_us),
            m.tcp_congestion_control.as_deref().unwrap_or("?"),
        )?;
        writeln!(
            out,
            "  cpu      {}",
            match &m.cpu_vulnerabilities {
                None => "vulnerabilities not readable".to_owned(),
                Some(entries) if entries.is_empty() =>
                    "not affected by any listed vulnerability".to_owned(),
                Some(entries) => entries.join(" | "),
            }
        )?;
        writeln!(
            out,
            "  versions {}, git {}",
            v.rustc,
            v.git.as_deref().unwrap_or("?")
        )
    }
}

/// `server <addr> (pid, version, fd limits, delay)` for the human table.
pub fn server_row(info: &ServerInfo) -> (String, String) {
    let origin = if info.started_by_bench {
        "started by the bench"
    } else {
        "--target"
    };
    (
        "server".to_owned(),
        format!(
            "{} ({origin}, pid {}, {}, open files {}/{}, delay {} ms, jitter {} ms{})",
            info.addr,
            info.pid.map_or("?".to_owned(), |pid| pid.to_string()),
            info.version.as_deref().unwrap_or("version ?"),
            sys::show_limit(info.nofile_soft),
            sys::show_limit(info.nofile_hard),
            info.delay_ms,
            info.jitter_ms,
            info.data_dir
                .as_deref()
                .map_or(String::new(), |dir| format!(", data in {dir}")),
        ),
    )
}
