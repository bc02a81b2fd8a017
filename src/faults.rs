//! The fault injector: the knobs that make the backend misbehave on purpose (delay,
//! jitter, failure, lost deliveries, transient apply errors), settable at start and live
//! over `PUT /api/faults`. One seeded RNG makes a run reproducible.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::config::{Config, MAX_DELAY_MS};

/// The live fault settings, as served by `GET /api/faults`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultSettings {
    pub delay_ms: u64,
    pub jitter_ms: u64,
    pub failure_rate: f64,
    pub drop_rate: f64,
    /// Probability that one apply attempt hits a simulated transient fault.
    pub transient_rate: f64,
}

impl FaultSettings {
    /// The same settings, a rate given as -0.0 held (and shown) as 0.
    fn normalized(self) -> Self {
        Self {
            failure_rate: self.failure_rate + 0.0,
            drop_rate: self.drop_rate + 0.0,
            transient_rate: self.transient_rate + 0.0,
            ..self
        }
    }
}

/// A partial update, as sent to `PUT /api/faults`: absent fields keep their value.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultUpdate {
    pub delay_ms: Option<u64>,
    pub jitter_ms: Option<u64>,
    pub failure_rate: Option<f64>,
    pub drop_rate: Option<f64>,
    pub transient_rate: Option<f64>,
}

impl FaultUpdate {
    /// Checks every field and lists every problem at once.
    ///
    /// # Errors
    /// A message naming each field out of range.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for (name, value) in [("delay_ms", self.delay_ms), ("jitter_ms", self.jitter_ms)] {
            if let Some(value) = value.filter(|v| *v > MAX_DELAY_MS) {
                problems.push(format!(
                    "{name} must be at most {MAX_DELAY_MS}, got {value}"
                ));
            }
        }
        for (name, value) in [
            ("failure_rate", self.failure_rate),
            ("drop_rate", self.drop_rate),
            ("transient_rate", self.transient_rate),
        ] {
            if let Some(value) = value.filter(|v| !(v.is_finite() && (0.0..=1.0).contains(v))) {
                problems.push(format!("{name} must be in [0, 1], got {value}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Cheap `Clone` handle to the fault settings and their RNG.
#[derive(Clone)]
pub struct Faults {
    // std locks: held for a read or one RNG draw, never across an await.
    settings: Arc<RwLock<FaultSettings>>,
    rng: Arc<Mutex<StdRng>>,
}

impl Faults {
    pub fn new(settings: FaultSettings, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            settings: Arc::new(RwLock::new(settings.normalized())),
            rng: Arc::new(Mutex::new(rng)),
        }
    }

    pub fn from_config(config: &Config) -> Self {
        Self::new(
            FaultSettings {
                delay_ms: config.delay_ms,
                jitter_ms: config.jitter_ms,
                failure_rate: config.failure_rate,
                drop_rate: config.drop_rate,
                transient_rate: config.transient_rate,
            },
            config.seed,
        )
    }

    pub fn settings(&self) -> FaultSettings {
        *self.settings.read().expect("fault settings lock poisoned")
    }

    /// Applies a validated update and returns the new settings.
    pub fn update(&self, update: FaultUpdate) -> FaultSettings {
        let mut settings = self.settings.write().expect("fault settings lock poisoned");
        settings.delay_ms = update.delay_ms.unwrap_or(settings.delay_ms);
        settings.jitter_ms = update.jitter_ms.unwrap_or(settings.jitter_ms);
        settings.failure_rate = update.failure_rate.unwrap_or(settings.failure_rate);
        settings.drop_rate = update.drop_rate.unwrap_or(settings.drop_rate);
        settings.transient_rate = update.transient_rate.unwrap_or(settings.transient_rate);
        *settings = settings.normalized();
        *settings
    }

    /// Accept-to-apply delay for a new command: the delay plus uniform 0..=jitter.
    pub fn command_delay(&self) -> Duration {
        let settings = self.settings();
        let jitter = if settings.jitter_ms == 0 {
            0
        } else {
            self.rng().random_range(0..=settings.jitter_ms)
        };
        Duration::from_millis(settings.delay_ms + jitter)
    }

    /// Is this delivery lost?
    pub fn drop_delivery(&self) -> bool {
        self.roll(self.settings().drop_rate)
    }

    /// Does the consumer reject this command?
    pub fn inject_failure(&self) -> bool {
        self.roll(self.settings().failure_rate)
    }

    /// Does this apply attempt hit a transient fault?
    pub fn transient_fault(&self) -> bool {
        self.roll(self.settings().transient_rate)
    }

    fn roll(&self, rate: f64) -> bool {
        rate > 0.0 && (rate >= 1.0 || self.rng().random_bool(rate))
    }

    fn rng(&self) -> std::sync::MutexGuard<'_, StdRng> {
        self.rng.lock().expect("fault rng lock poisoned")
    }
}
