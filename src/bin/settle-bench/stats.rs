//! Percentile summaries and CPU accounting for one measured interval.

use std::time::Instant;

use serde::Serialize;

use crate::sys;

/// Percentiles of a set of samples, in milliseconds.
///
/// Computed exactly from the sorted samples (nearest rank) rather than with a
/// histogram: some samples are signed (an overhead can be slightly negative, see
/// `overhead`), and every run holds at most a few hundred thousand of them.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Summary {
    pub count: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// `None` when there is no sample.
    pub fn of(samples: &mut [f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let rank = |quantile: f64| {
            // Nearest rank: the smallest sample with at least `quantile` of them at or below it.
            let position = (quantile * samples.len() as f64).ceil() as usize;
            round3(samples[position.clamp(1, samples.len()) - 1])
        };
        Some(Self {
            count: samples.len(),
            min: round3(samples[0]),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: round3(samples[samples.len() - 1]),
            mean: round3(samples.iter().sum::<f64>() / samples.len() as f64),
        })
    }

    /// `p50 / p99 / max` for the human table.
    pub fn brief(summary: Option<&Self>) -> String {
        match summary {
            Some(s) => format!("{:.2} / {:.2} / {:.2} ms", s.p50, s.p99, s.max),
            None => "no samples".to_owned(),
        }
    }
}

/// `later - earlier` in ms, for ns timestamps on one clock; negative when `later` is
/// earlier.
pub fn ms_between(later_ns: u64, earlier_ns: u64) -> f64 {
    (i128::from(later_ns) - i128::from(earlier_ns)) as f64 / 1e6
}

/// Milliseconds with microsecond precision are enough for every figure here.
pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// CPU used over one interval, in cores (1.0 = one core busy the whole time), split
/// into the server, this bench (with its worker processes) and everything else, and
/// the time the host took from this machine's virtual CPUs. "other" and "steal" are
/// how noisy the machine was.
#[derive(Clone, Debug, Serialize)]
pub struct CpuUsage {
    pub wall_s: f64,
    /// `None` when the server's PID is unknown (`--target` without `--server-pid`).
    pub server_cores: Option<f64>,
    pub bench_cores: f64,
    pub other_cores: Option<f64>,
    /// Stolen by the host (0 on bare metal); `None` if /proc/stat could not be read.
    pub steal_cores: Option<f64>,
    pub loadavg_before: String,
}

/// Starts a CPU measurement; `finish` closes it.
pub struct CpuMeter {
    started: Instant,
    server_pid: Option<u32>,
    worker_pids: Vec<u32>,
    server: Option<u64>,
    own: u64,
    workers: u64,
    system: Option<sys::SystemTicks>,
    loadavg: String,
}

impl CpuMeter {
    pub fn start(server_pid: Option<u32>, worker_pids: &[u32]) -> Self {
        Self {
            started: Instant::now(),
            server_pid,
            worker_pids: worker_pids.to_vec(),
            server: server_pid.and_then(|pid| sys::cpu_ticks(Some(pid)).ok()),
            own: sys::cpu_ticks(None).unwrap_or(0),
            workers: worker_ticks(worker_pids),
            system: sys::system_ticks().ok(),
            loadavg: sys::loadavg(),
        }
    }

    pub fn finish(&self) -> CpuUsage {
        let wall_s = self.started.elapsed().as_secs_f64();
        let per_second = sys::clock_ticks_per_second();
        let cores = |ticks: u64| round3(ticks as f64 / per_second / wall_s.max(1e-9));
        let server = match (self.server_pid, self.server) {
            (Some(pid), Some(before)) => sys::cpu_ticks(Some(pid))
                .ok()
                .map(|after| after.saturating_sub(before)),
            _ => None,
        };
        let own = sys::cpu_ticks(None)
            .unwrap_or(self.own)
            .saturating_sub(self.own);
        let workers = worker_ticks(&self.worker_pids).saturating_sub(self.workers);
        let system = self
            .system
            .and_then(|before| sys::system_ticks().ok().map(|after| after.since(before)));
        let other = match (system, server) {
            (Some(system), Some(server)) => {
                Some(cores(system.busy.saturating_sub(server + own + workers)))
            }
            _ => None,
        };
        CpuUsage {
            wall_s: round3(wall_s),
            server_cores: server.map(cores),
            bench_cores: cores(own + workers),
            other_cores: other,
            steal_cores: system.map(|system| cores(system.steal)),
            loadavg_before: self.loadavg.clone(),
        }
    }
}

fn worker_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|&pid| sys::cpu_ticks(Some(pid)).ok())
        .sum()
}

/// CPU time per request over one interval, in µs: what `CpuUsage` spent, divided among
/// the requests answered in it. Machine-independent where rates are not: a host that is
/// slower (or busier) answers fewer requests in the same CPU.
#[derive(Clone, Debug, Serialize)]
pub struct CpuPerRequest {
    /// `None` when the server's PID is unknown.
    pub server_us: Option<f64>,
    pub bench_us: f64,
}

impl CpuPerRequest {
    /// `server / bench µs` for a report row; `?` for what was not measured.
    pub fn brief(cpu: Option<&Self>) -> String {
        cpu.map_or("?".to_owned(), |cpu| {
            let server = cpu
                .server_us
                .map_or("?".to_owned(), |us| format!("{us:.1}"));
            format!("{server} / {:.1} µs", cpu.bench_us)
        })
    }
}

impl CpuUsage {
    /// The CPU per request of `requests` answered over this interval; `None` for none.
    pub fn per_request(&self, requests: u64) -> Option<CpuPerRequest> {
        if requests == 0 {
            return None;
        }
        let us = |cores: f64| round3(cores * self.wall_s * 1e6 / requests as f64);
        Some(CpuPerRequest {
            server_us: self.server_cores.map(us),
            bench_us: us(self.bench_cores),
        })
    }

    pub fn brief(&self) -> String {
        let show = |value: Option<f64>| value.map_or("?".to_owned(), |v| format!("{v:.2}"));
        format!(
            "server {} / bench {:.2} / other {} cores, {} stolen by the host, over {:.1} s (loadavg before: {})",
            show(self.server_cores),
            self.bench_cores,
            show(self.other_cores),
            show(self.steal_cores),
            self.wall_s,
            self.loadavg_before
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_of_one_to_a_hundred() {
        let mut samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let summary = Summary::of(&mut samples).expect("samples");
        assert_eq!(summary.p50, 50.0);
        assert_eq!(summary.p99, 99.0);
        assert_eq!(summary.max, 100.0);
        assert_eq!(summary.min, 1.0);
    }

    #[test]
    fn cpu_per_request_divides_the_cpu_seconds_among_the_requests() {
        let usage = CpuUsage {
            wall_s: 10.0,
            server_cores: Some(1.5),
            bench_cores: 0.25,
            other_cores: None,
            steal_cores: None,
            loadavg_before: String::new(),
        };
        let per = usage.per_request(300_000).expect("requests");
        assert_eq!(per.server_us, Some(50.0), "15 s of server CPU over 300000");
        assert_eq!(per.bench_us, 8.333);
        assert!(usage.per_request(0).is_none(), "nothing to divide among");
        let unknown = CpuUsage {
            server_cores: None,
            ..usage
        };
        assert_eq!(unknown.per_request(1).expect("one").server_us, None);
    }

    #[test]
    fn a_single_sample_is_every_percentile() {
        let mut samples = vec![-1.5];
        let summary = Summary::of(&mut samples).expect("samples");
        assert_eq!(summary.p50, -1.5);
        assert_eq!(summary.p99, -1.5);
    }
}
