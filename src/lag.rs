//! How far behind its due times the consumer applies: the part of a command's window
//! that is the server falling behind, not the configured delay.
//!
//! The consumer notes, before each apply step, since when the oldest command it may
//! apply now has been due, and that nothing is waiting once nothing is. Anyone may read
//! the lag as it stands: the time since that moment, which keeps growing while a long
//! step runs. Read by the metrics (`lag_ms`) and by the intake, which refuses new
//! commands beyond `--max-lag-ms`.
//!
//! What counts as due, in `consumer`: a command from its timer's deadline (a retry's,
//! after a transient fault or a lost delivery: the backoff is not lag), or from its
//! due time if it reached the consumer later (resumed after a restart); a command
//! held back by its task's order only once it may apply, and no earlier than its
//! predecessor counted (waiting for its turn is not lag, unless the predecessor
//! waited too: a task whose commands fell due together shows the lag of the last);
//! and a timer that expired but was not taken in yet.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Cheap `Clone` handle on the consumer's lag.
#[derive(Clone, Debug)]
pub struct Lag(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// Instants are stored as microseconds since this one, plus one; one before it
    /// counts as it.
    base: Instant,
    /// Since when the oldest applicable command has been due; 0: none is.
    waiting_since: AtomicU64,
}

impl Default for Lag {
    fn default() -> Self {
        Self::new()
    }
}

impl Lag {
    /// Nothing waiting.
    pub fn new() -> Self {
        let now = Instant::now();
        Self(Arc::new(Inner {
            // An hour back, so that an instant a little before the handle was made
            // still reads right (tests make such deadlines).
            base: now.checked_sub(Duration::from_secs(3600)).unwrap_or(now),
            waiting_since: AtomicU64::new(0),
        }))
    }

    /// The consumer's note: the oldest applicable command has been due since `since`
    /// (`None`: nothing may apply now).
    pub fn waiting_since(&self, since: Option<Instant>) {
        let stored = since.map_or(0, |since| {
            let micros = since.saturating_duration_since(self.0.base).as_micros();
            u64::try_from(micros).unwrap_or(u64::MAX - 1) + 1
        });
        self.0.waiting_since.store(stored, Ordering::Relaxed);
    }

    /// How long the oldest applicable command has been due; zero when none is.
    pub fn current(&self) -> Duration {
        match self.0.waiting_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            stored => {
                let since = self.0.base + Duration::from_micros(stored - 1);
                Instant::now().saturating_duration_since(since)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_is_the_time_since_the_oldest_applicable_command_fell_due() {
        let lag = Lag::new();
        assert_eq!(lag.current(), Duration::ZERO, "nothing waiting");

        let now = Instant::now();
        lag.waiting_since(Some(now - Duration::from_secs(3)));
        let behind = lag.current();
        assert!(
            behind >= Duration::from_secs(3) && behind < Duration::from_secs(60),
            "{behind:?}"
        );

        // Due from before the handle was made.
        lag.waiting_since(Some(now - Duration::from_secs(1800)));
        assert!(lag.current() >= Duration::from_secs(1800));

        // Due in the future: a timer polled early reads as no lag.
        lag.waiting_since(Some(now + Duration::from_secs(60)));
        assert_eq!(lag.current(), Duration::ZERO);

        lag.waiting_since(None);
        assert_eq!(lag.current(), Duration::ZERO, "caught up");
    }
}
