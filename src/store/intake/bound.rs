//! The pending table's bound: when a new key is refused ([`Accepted::Overloaded`],
//! with the [`Refusal`] that says why), and the log of refusals starting and ending.
//!
//! [`Accepted::Overloaded`]: crate::store::Accepted::Overloaded

use std::time::{Duration, Instant};

use super::pending::Waiting;
use crate::lag::Lag;
use crate::store::{Overload, Refusal};

/// How much the pending table may hold before the writer refuses new keys
/// ([`Accepted::Overloaded`]): commands, and bytes of their records in the log; and,
/// if `max_lag` is set, how far behind its due times the consumer may apply.
///
/// [`Accepted::Overloaded`]: crate::store::Accepted::Overloaded
#[derive(Clone, Debug)]
pub struct PendingBound {
    pub commands: usize,
    pub bytes: usize,
    pub max_lag: Option<Duration>,
    /// The consumer's lag, reported with every refusal.
    pub lag: Lag,
}

impl PendingBound {
    /// The answer to a new key while `waiting` waits: `Some` refusal when a bound is
    /// reached. Reads the consumer's lag where it is bounded or reported (outside the
    /// pending table's lock: the lag is not the table's).
    pub(super) fn refusal(&self, waiting: Waiting) -> Option<Refusal> {
        let lag = self.max_lag.map(|max| (max, self.lag.current()));
        let bound = if waiting.commands >= self.commands {
            Overload::Commands
        } else if waiting.bytes >= self.bytes {
            Overload::Bytes
        } else if lag.is_some_and(|(max, lag)| lag > max) {
            Overload::Lag
        } else {
            return None;
        };
        let lag = lag.map_or_else(|| self.lag.current(), |(_, lag)| lag);
        Some(Refusal {
            pending: waiting.commands,
            bytes: waiting.bytes,
            lag_ms: u64::try_from(lag.as_millis()).unwrap_or(u64::MAX),
            bound,
        })
    }

    /// No bound (tests that are not about it).
    pub fn none() -> Self {
        Self {
            commands: usize::MAX,
            bytes: usize::MAX,
            max_lag: None,
            lag: Lag::new(),
        }
    }
}

/// The log of refusals starting and ending: a warning and an info line, unless a
/// warning went out less than [`RefusalLog::QUIET`] ago (a bound the backlog hovers
/// at flips many times a second): then debug lines. So a warning and its info line
/// stand for the next 10 s, whose refusals `refused` in `/api/metrics` counts.
#[derive(Default)]
pub(super) struct RefusalLog {
    warned_at: Option<Instant>,
    /// Whether the refusal going on was warned of.
    warned: bool,
}

impl RefusalLog {
    const QUIET: Duration = Duration::from_secs(10);

    /// Logs that `refusal` starts a refusal; answers at which level.
    pub(super) fn started(&mut self, refusal: &Refusal) -> tracing::Level {
        let Refusal {
            pending,
            bytes,
            lag_ms,
            bound,
        } = refusal;
        self.warned = self.warned_at.is_none_or(|at| at.elapsed() >= Self::QUIET);
        let message = "new commands are answered 503 while a bound is reached (refused in /api/metrics counts them; logged again at most every 10 s)";
        if self.warned {
            self.warned_at = Some(Instant::now());
            tracing::warn!(pending, bytes, lag_ms, %bound, "{message}");
            tracing::Level::WARN
        } else {
            tracing::debug!(pending, bytes, lag_ms, %bound, "{message}");
            tracing::Level::DEBUG
        }
    }

    /// Logs that a refusal ended; answers at which level.
    pub(super) fn ended(&mut self) -> tracing::Level {
        let message = "a new command was taken: within the bounds again, for now";
        if self.warned {
            tracing::info!("{message}");
            tracing::Level::INFO
        } else {
            tracing::debug!("{message}");
            tracing::Level::DEBUG
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal that flips on and off is warned of once per quiet period, each
    /// warning with its info line; the flips between are debug lines.
    #[test]
    fn a_flipping_refusal_is_warned_of_once_per_quiet_period() {
        use tracing::Level;
        let mut log = RefusalLog::default();
        let refused = Refusal {
            pending: 1,
            bytes: 1,
            lag_ms: 0,
            bound: Overload::Commands,
        };
        assert_eq!(log.started(&refused), Level::WARN);
        assert_eq!(log.ended(), Level::INFO);
        assert_eq!(
            log.started(&refused),
            Level::DEBUG,
            "within the quiet period"
        );
        assert_eq!(log.ended(), Level::DEBUG);
        log.warned_at = log.warned_at.map(|at| at - RefusalLog::QUIET);
        assert_eq!(log.started(&refused), Level::WARN, "after it");
        assert_eq!(log.ended(), Level::INFO);
    }
}
