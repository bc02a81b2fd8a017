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

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Cheap `Clone` handle on the consumer's lag.
#[derive(Clone, Default)]
pub struct Lag(Arc<Mutex<Option<Instant>>>);

impl Lag {
    /// Nothing waiting.
    pub fn new() -> Self {
        Self::default()
    }

    /// The consumer's note: the oldest applicable command has been due since `since`
    /// (`None`: nothing may apply now).
    pub fn waiting_since(&self, since: Option<Instant>) {
        // A poisoned lock held nothing half-written: an `Option` is set whole.
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = since;
    }

    /// How long the oldest applicable command has been due; zero when none is.
    pub fn current(&self) -> Duration {
        let since = *self.0.lock().unwrap_or_else(PoisonError::into_inner);
        since.map_or(Duration::ZERO, |since| {
            Instant::now().saturating_duration_since(since)
        })
    }
}

impl fmt::Debug for Lag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lag({:?})", self.current())
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
        assert!(
            format!("{lag:?}").starts_with("Lag(3."),
            "shown as it stands: {lag:?}"
        );

        // Due in the future: a timer polled early reads as no lag.
        lag.waiting_since(Some(now + Duration::from_secs(60)));
        assert_eq!(lag.current(), Duration::ZERO);

        lag.waiting_since(None);
        assert_eq!(lag.current(), Duration::ZERO, "caught up");
    }
}
