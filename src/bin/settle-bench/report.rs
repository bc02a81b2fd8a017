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
    /// `None` when the run says nothing about the target: `not_judged` says why.
    pub met: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_judged: Option<&'static str>,
}

impl TargetCheck {
    pub fn new(target: impl Into<String>, measured: impl Into<String>, verdict: Verdict) -> Self {
        let (met, not_judged) = match verdict {
            Verdict::Judged(met) => (Some(met), None),
            Verdict::NotJudged(why) => (None, Some(why)),
        };
        Self {
            target: target.into(),
            measured: measured.into(),
            met,
            not_judged,
        }
    }
}

/// Whether a run meets a target, or why it says nothing about it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    Judged(bool),
    NotJudged(&'static str),
}

impl Verdict {
    /// Not judged for the first of `reasons` whose condition holds (the run's parameters
    /// are not the target's: another rate, fewer subscribers, a shorter run; or the run
    /// had problems, so its figures stand for nothing); else judged by `met`. `--smoke`
    /// changes defaults, not these rules.
    pub fn unless(reasons: &[(bool, &'static str)], met: impl FnOnce() -> bool) -> Self {
        match reasons.iter().find(|(holds, _)| *holds) {
            Some((_, why)) => Self::NotJudged(why),
            None => Self::Judged(met()),
        }
    }
}

/// Why a run with problems is not judged: its figures are not a measurement.
pub const HAD_PROBLEMS: &str = "the run had problems";

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
            let verdict = match (check.met, check.not_judged) {
                (Some(true), _) => "MET".to_owned(),
                (Some(false), _) => "NOT MET".to_owned(),
                (None, why) => format!("n/a ({})", why.unwrap_or("not judged")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_is_judged_only_when_no_reason_not_to_holds_and_the_first_reason_is_given() {
        let met = || true;
        assert_eq!(Verdict::unless(&[], met), Verdict::Judged(true));
        assert_eq!(
            Verdict::unless(&[(false, "a lower rate"), (false, HAD_PROBLEMS)], || false),
            Verdict::Judged(false)
        );
        assert_eq!(
            Verdict::unless(
                &[
                    (false, "a lower rate"),
                    (true, "shorter"),
                    (true, HAD_PROBLEMS)
                ],
                met
            ),
            Verdict::NotJudged("shorter")
        );
        let check = TargetCheck::new("t", "m", Verdict::NotJudged(HAD_PROBLEMS));
        let json = serde_json::to_value(&check).expect("serializes");
        assert_eq!(json["met"], serde_json::Value::Null);
        assert_eq!(json["not_judged"], HAD_PROBLEMS);
        let judged = serde_json::to_value(TargetCheck::new("t", "m", Verdict::Judged(true)))
            .expect("serializes");
        assert_eq!(judged["met"], true);
        assert!(judged.get("not_judged").is_none());
    }
}
