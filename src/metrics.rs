//! Counters and the consistency-window distribution, served as JSON at `/api/metrics`
//! and in OpenMetrics text at `/metrics`. The window is measured per settled command
//! from accept to readable (the projection updated, just before the event goes out).

use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram as HdrHistogram;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Window buckets in seconds: fine around the 700 ms default, coarse beyond.
const WINDOW_BUCKETS_SECONDS: [f64; 16] = [
    0.005, 0.05, 0.1, 0.25, 0.5, 0.6, 0.7, 0.72, 0.75, 0.8, 1.0, 1.5, 2.5, 5.0, 10.0, 60.0,
];
/// Largest window the percentile histogram records exactly; longer ones are clamped.
const WINDOW_MAX_MS: u64 = 3_600_000;

/// Cheap `Clone` handle to every metric; cloning is shallow.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    accepted: Counter,
    settled: Counter,
    failed: Counter,
    deduplicated: Counter,
    dead_lettered: Counter,
    pending: Gauge,
    subscribers: Gauge,
    window_seconds: Histogram,
    // A std lock: one record or one percentile read at a time, never across an await.
    window_ms: Mutex<HdrHistogram<u64>>,
}

/// `GET /api/metrics`.
#[derive(Clone, Debug, Serialize)]
pub struct MetricsReport {
    pub accepted: u64,
    pub settled: u64,
    pub failed: u64,
    pub deduplicated: u64,
    pub dead_lettered: u64,
    pub pending: i64,
    pub subscribers: i64,
    pub window_ms: WindowReport,
}

#[derive(Clone, Debug, Serialize)]
pub struct WindowReport {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("settle");
        let accepted = Counter::default();
        let settled = Counter::default();
        let failed = Counter::default();
        let deduplicated = Counter::default();
        let dead_lettered = Counter::default();
        let pending = Gauge::default();
        let subscribers = Gauge::default();
        let window_seconds = Histogram::new(WINDOW_BUCKETS_SECONDS);
        registry.register(
            "commands_accepted",
            "Commands accepted (202, new key)",
            accepted.clone(),
        );
        registry.register(
            "commands_settled",
            "Commands applied and settled",
            settled.clone(),
        );
        registry.register(
            "commands_failed",
            "Commands failed at apply time (any reason)",
            failed.clone(),
        );
        registry.register(
            "commands_deduplicated",
            "Requests answered from the idempotency table",
            deduplicated.clone(),
        );
        registry.register(
            "commands_dead_lettered",
            "Commands that exhausted their attempts",
            dead_lettered.clone(),
        );
        registry.register(
            "commands_pending",
            "Accepted commands not applied yet",
            pending.clone(),
        );
        registry.register("sse_subscribers", "Open event streams", subscribers.clone());
        registry.register(
            "window_seconds",
            "Consistency window per settled command, accept to readable",
            window_seconds.clone(),
        );
        let window_ms = HdrHistogram::new_with_bounds(1, WINDOW_MAX_MS, 3)
            .expect("static histogram bounds are valid");
        Self {
            inner: Arc::new(Inner {
                registry,
                accepted,
                settled,
                failed,
                deduplicated,
                dead_lettered,
                pending,
                subscribers,
                window_seconds,
                window_ms: Mutex::new(window_ms),
            }),
        }
    }

    /// New commands, durable and handed to the consumer.
    pub fn commands_accepted(&self, count: usize) {
        let count = u64::try_from(count).unwrap_or(u64::MAX);
        self.inner.accepted.inc_by(count);
        self.inner
            .pending
            .inc_by(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn command_deduplicated(&self) {
        self.inner.deduplicated.inc();
    }

    /// Commands found unapplied at start: they are pending without a new accept.
    pub fn commands_resumed(&self, count: usize) {
        self.inner
            .pending
            .inc_by(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn command_settled(&self, window_ms: u64) {
        self.inner.settled.inc();
        self.inner.pending.dec();
        self.inner.window_seconds.observe(window_ms as f64 / 1000.0);
        let mut window = self
            .inner
            .window_ms
            .lock()
            .expect("window histogram lock poisoned");
        window.saturating_record(window_ms.clamp(1, WINDOW_MAX_MS));
    }

    pub fn command_failed(&self, dead_lettered: bool) {
        self.inner.failed.inc();
        self.inner.pending.dec();
        if dead_lettered {
            self.inner.dead_lettered.inc();
        }
    }

    /// Counts an open stream until the returned guard drops.
    pub fn subscriber(&self) -> SubscriberGuard {
        self.inner.subscribers.inc();
        SubscriberGuard {
            metrics: self.clone(),
        }
    }

    pub fn report(&self) -> MetricsReport {
        let inner = &self.inner;
        let window = inner
            .window_ms
            .lock()
            .expect("window histogram lock poisoned");
        let (p50, p90, p99, max) = if window.is_empty() {
            (0, 0, 0, 0)
        } else {
            (
                window.value_at_quantile(0.50),
                window.value_at_quantile(0.90),
                window.value_at_quantile(0.99),
                window.max(),
            )
        };
        MetricsReport {
            accepted: inner.accepted.get(),
            settled: inner.settled.get(),
            failed: inner.failed.get(),
            deduplicated: inner.deduplicated.get(),
            dead_lettered: inner.dead_lettered.get(),
            pending: inner.pending.get(),
            subscribers: inner.subscribers.get(),
            window_ms: WindowReport {
                count: window.len(),
                p50,
                p90,
                p99,
                max,
            },
        }
    }

    /// The OpenMetrics text exposition.
    pub fn openmetrics(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.inner.registry);
        text
    }

    /// The same figures in the classic Prometheus text format (0.0.4), for scrapers and
    /// people that do not ask for OpenMetrics. The two differ in two details only: a
    /// counter family is named after its `_total` sample, and there is no `# EOF`.
    pub fn prometheus_text(&self) -> String {
        let openmetrics = self.openmetrics();
        let counters: Vec<&str> = openmetrics
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.strip_suffix(" counter"))
            .collect();
        let mut text = String::with_capacity(openmetrics.len());
        for line in openmetrics.lines() {
            if line == "# EOF" || line.starts_with("# UNIT ") {
                continue;
            }
            let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
                let rest = line.strip_prefix(prefix)?;
                let (name, tail) = rest.split_once(' ')?;
                counters
                    .contains(&name)
                    .then(|| format!("{prefix}{name}_total {tail}"))
            });
            text.push_str(renamed.as_deref().unwrap_or(line));
            text.push('\n');
        }
        text
    }
}

/// Decrements the subscriber gauge when a stream ends, however it ends.
pub struct SubscriberGuard {
    metrics: Metrics,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.metrics.inner.subscribers.dec();
    }
}
