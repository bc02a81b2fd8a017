//! Command-line and environment configuration. Every flag has an env var
//! (`SETTLE_<FLAG>`), and every default is a named const.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser};

pub const DEFAULT_ADDR: &str = "127.0.0.1:3000";
pub const DEFAULT_DATA_DIR: &str = "./data";
/// The consistency window the whole project is about.
pub const DEFAULT_DELAY_MS: u64 = 700;
pub const DEFAULT_REDELIVER_AFTER_MS: u64 = 5_000;
/// How many events the durable log keeps for `Last-Event-ID` resumes.
pub const DEFAULT_EVENT_RETENTION: u64 = 100_000;
/// How long finished command records (the idempotency table) are kept, in hours.
/// The idempotency draft and Stripe keep keys for at least 24 hours.
pub const DEFAULT_COMMAND_RETENTION_HOURS: u64 = 24;
/// How many accepted, unapplied commands a node holds before it refuses new ones (503).
/// A small command (a title, no notes) takes about 1.3 KiB of memory while it waits
/// (BENCHMARKS.md): about 0.6 GiB at this bound. The accept benchmark's 10 s burst
/// leaves 49000-65000 waiting as the server runs (180091 with nothing applying).
pub const DEFAULT_MAX_PENDING: usize = 500_000;
/// How many bytes of records (as the intake log stores them) the unapplied commands may
/// take before new ones are refused: the bound on memory for large commands (notes of
/// up to 10000 characters), as [`DEFAULT_MAX_PENDING`] is for small ones. A pending
/// command takes about its record's size in memory on top of the 1.3 KiB, so both
/// bounds together hold it to about 1.1 GiB.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 512 * 1024 * 1024;
/// No bound on the consumer's lag by default: the accept benchmark's burst, applied
/// within seconds, would be refused in part (BENCHMARKS.md, section 2).
pub const DEFAULT_MAX_LAG_MS: u64 = 0;
/// Upper bound of the live fault knobs' delays.
pub const MAX_DELAY_MS: u64 = 60_000;

#[derive(Clone, Debug, Parser)]
#[command(
    name = "settle",
    version = crate::build_info::version(),
    about = "A task server whose writes are asynchronous: 202 Accepted, applied ~700 ms later, reconciled over SSE."
)]
pub struct Config {
    /// Address to listen on, an IP address and a port (127.0.0.1:3000, [::1]:3000; not a host
    /// name); port 0 picks a free port (logged as `listening on http://ADDR`).
    #[arg(long, env = "SETTLE_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: SocketAddr,

    /// Directory of the embedded sled store; one server at a time (a second start on it waits
    /// up to 5 s for its lock, then exits).
    #[arg(long, env = "SETTLE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Accept-to-apply delay of every command, in milliseconds (at most 60000).
    #[arg(long, env = "SETTLE_DELAY_MS", default_value_t = DEFAULT_DELAY_MS,
          value_parser = clap::value_parser!(u64).range(0..=MAX_DELAY_MS))]
    pub delay_ms: u64,

    /// Extra uniform random delay in 0..=jitter per command, in milliseconds (at most 60000).
    #[arg(long, env = "SETTLE_JITTER_MS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=MAX_DELAY_MS))]
    pub jitter_ms: u64,

    /// Probability in [0, 1] that the consumer rejects a command (reason `injected`).
    #[arg(long, env = "SETTLE_FAILURE_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub failure_rate: f64,

    /// Probability in [0, 1] that one delivery is silently lost (no apply, no event).
    #[arg(long, env = "SETTLE_DROP_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub drop_rate: f64,

    /// Probability in [0, 1] that one apply attempt hits a simulated transient fault
    /// (retried with backoff, dead-lettered after 5 attempts).
    #[arg(long, env = "SETTLE_TRANSIENT_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub transient_rate: f64,

    /// Redelivery timeout for lost deliveries, in milliseconds (a broker's ack timeout).
    #[arg(long, env = "SETTLE_REDELIVER_AFTER_MS", default_value_t = DEFAULT_REDELIVER_AFTER_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub redeliver_after_ms: u64,

    /// Seeds the fault RNG so runs are reproducible; random when absent.
    #[arg(long, env = "SETTLE_SEED")]
    pub seed: Option<u64>,

    /// How many of the newest events the log keeps for resuming streams.
    #[arg(long, env = "SETTLE_EVENT_RETENTION", default_value_t = DEFAULT_EVENT_RETENTION,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub event_retention: u64,

    /// How many accepted commands may wait to be applied; beyond it a new command is
    /// answered 503 with Retry-After (a retry of a known key is answered as always).
    #[arg(long, env = "SETTLE_MAX_PENDING", default_value_t = DEFAULT_MAX_PENDING,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_pending: usize,

    /// How many bytes of records the commands waiting to be applied may take; beyond
    /// it a new command is answered 503, as beyond --max-pending.
    #[arg(long, env = "SETTLE_MAX_PENDING_BYTES", default_value_t = DEFAULT_MAX_PENDING_BYTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_pending_bytes: usize,

    /// How far behind their due times the consumer may apply, in milliseconds, before
    /// a new command is answered 503, as beyond --max-pending: a bound on the window
    /// rather than on memory. 0: no bound.
    #[arg(long, env = "SETTLE_MAX_LAG_MS", default_value_t = DEFAULT_MAX_LAG_MS)]
    pub max_lag_ms: u64,

    /// How long finished command records are kept, in hours (at least 24).
    #[arg(long, env = "SETTLE_COMMAND_RETENTION_HOURS", default_value_t = DEFAULT_COMMAND_RETENTION_HOURS,
          value_parser = clap::value_parser!(u64).range(24..))]
    pub command_retention_hours: u64,
}

impl Config {
    /// The environment variables the server takes its settings from: what a program
    /// that starts a server with arguments of its own (the tests, the bench) removes
    /// from the server's environment, so that a stray one changes nothing.
    pub fn env_names() -> Vec<std::ffi::OsString> {
        Self::command()
            .get_arguments()
            .filter_map(|arg| arg.get_env().map(ToOwned::to_owned))
            .collect()
    }

    /// The defaults with another data directory and port 0: what tests start from.
    /// Not read from the environment: a stray `SETTLE_*` would change every test.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Self {
        let command = Self::command().mut_args(|arg| arg.env(None::<&str>));
        let matches = command.get_matches_from(["settle"]);
        let mut config = Self::from_arg_matches(&matches).expect("the defaults parse");
        config.addr = "127.0.0.1:0".parse().expect("a valid literal address");
        config.data_dir = data_dir.into();
        config
    }
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text.parse().map_err(|err| format!("{err}"))?;
    if rate.is_finite() && (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not a probability in [0, 1]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag has its variable, and `env_names` names them all: a program that
    /// starts a server of its own leaves none of them behind.
    #[test]
    fn every_flag_s_variable_is_named() {
        let names = Config::env_names();
        let flags: Vec<_> = Config::command()
            .get_arguments()
            .filter_map(|arg| arg.get_long().map(ToOwned::to_owned))
            .filter(|flag| flag != "help" && flag != "version")
            .collect();
        assert_eq!(names.len(), flags.len(), "{names:?} for {flags:?}");
        assert!(names.iter().any(|name| name == "SETTLE_FAILURE_RATE"));
        assert!(names
            .iter()
            .all(|name| name.to_string_lossy().starts_with("SETTLE_")));
    }
}
