//! Counters and the consistency-window distribution, served as JSON at `/api/metrics`
//! and in OpenMetrics text at `/metrics`. The window is measured per settled command
//! from accept to readable (the projection updated, just before the event goes out).
//! The consumer's apply steps are timed too, the "transaction" (deciding the batch, in
//! memory; it was a sled transaction until the checkpoints wrote sled) and the "flush"
//! (the write to the apply log that makes the step durable against a crash) apart:
//! they are most of what the server adds to the configured delay. The checkpoint's
//! sync (sled's flush and an fdatasync of its files) is timed too: it runs on a thread
//! of its own and delays no step.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram as HdrHistogram;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::lag::Lag;

/// Window buckets in seconds: fine around the 700 ms default, coarse beyond.
const WINDOW_BUCKETS_SECONDS: [f64; 16] = [
    0.005, 0.05, 0.1, 0.25, 0.5, 0.6, 0.7, 0.72, 0.75, 0.8, 1.0, 1.5, 2.5, 5.0, 10.0, 60.0,
];
/// Largest window the percentile histogram records exactly; longer ones are clamped.
const WINDOW_MAX_MS: u64 = 3_600_000;
/// The recent window (`window_recent_ms`) covers the commands settled in the last one or
/// two of these spans: long enough for a steady percentile, short enough that a change
/// of the delay shows within a minute.
const RECENT_SPAN: Duration = Duration::from_secs(30);
/// Apply step buckets in seconds (transaction, flush, release sync): sub-millisecond on a fast disk,
/// tens of milliseconds when a flush waits on a busy one.
const STEP_BUCKETS_SECONDS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Largest step time the percentile histograms record, in microseconds.
const STEP_MAX_US: u64 = 60_000_000;
/// Largest step size the percentile histogram records: a step holds at most the
/// consumer's batch.
const STEP_MAX_COMMANDS: u64 = crate::consumer::MAX_BATCH as u64;

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
    refused: Counter,
    dead_lettered: Counter,
    pending: Gauge,
    subscribers: Gauge,
    /// The consumer keeps it; the gauge is set from it at each scrape.
    lag: Lag,
    lag_seconds: Gauge<f64, AtomicU64>,
    window_seconds: Histogram,
    // A std lock: one record or one percentile read at a time, never across an await.
    window_ms: Mutex<WindowHistograms>,
    transaction_seconds: Histogram,
    flush_seconds: Histogram,
    release_sync_seconds: Histogram,
    // One lock for the step histograms: the consumer records a step at a time.
    steps: Mutex<StepHistograms>,
}

/// Per apply step: commands in it, transaction and flush time in microseconds; and the
/// consumer's syncs before it releases intake segments.
struct StepHistograms {
    commands: HdrHistogram<u64>,
    transaction_us: HdrHistogram<u64>,
    flush_us: HdrHistogram<u64>,
    release_sync_us: HdrHistogram<u64>,
}

/// `GET /api/metrics`.
#[derive(Clone, Debug, Serialize)]
pub struct MetricsReport {
    pub accepted: u64,
    pub settled: u64,
    pub failed: u64,
    pub deduplicated: u64,
    /// New commands answered 503 because the commands waiting to be applied were at
    /// `--max-pending` or `--max-pending-bytes`, or the consumer's lag beyond
    /// `--max-lag-ms`.
    pub refused: u64,
    pub dead_lettered: u64,
    pub pending: i64,
    pub subscribers: i64,
    /// How far behind their due times the consumer applies now: how long the oldest
    /// command that may apply has been due (0 when none waits).
    pub lag_ms: u64,
    /// Since the server started.
    pub window_ms: Distribution,
    /// Of the commands settled in the last 30 to 60 s (`RECENT_SPAN`): what a live chart
    /// plots, where the figures since start barely move after a change of the delay.
    pub window_recent_ms: Distribution,
    pub apply_steps: StepsReport,
}

/// The consistency window since start, and of the last one or two [`RECENT_SPAN`]s.
struct WindowHistograms {
    since_start: HdrHistogram<u64>,
    /// The span being filled, since `current_from`, and the one before it.
    current: HdrHistogram<u64>,
    previous: HdrHistogram<u64>,
    current_from: Instant,
}

impl WindowHistograms {
    fn new(empty: HdrHistogram<u64>, now: Instant) -> Self {
        Self {
            since_start: empty.clone(),
            current: empty.clone(),
            previous: empty,
            current_from: now,
        }
    }

    fn record(&mut self, window_ms: u64, now: Instant) {
        self.roll(now);
        let value = window_ms.clamp(1, WINDOW_MAX_MS);
        self.since_start.saturating_record(value);
        self.current.saturating_record(value);
    }

    /// Starts a new span if the current one is over; the one before it is dropped, and
    /// both once two spans have passed since the current one began.
    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.current_from);
        if elapsed < RECENT_SPAN {
            return;
        }
        if elapsed < 2 * RECENT_SPAN {
            // The spans keep their cadence, so the figures never reach back past two.
            std::mem::swap(&mut self.previous, &mut self.current);
            self.current_from += RECENT_SPAN;
        } else {
            self.previous.reset();
            self.current_from = now;
        }
        self.current.reset();
    }

    fn recent(&mut self, now: Instant) -> Distribution {
        self.roll(now);
        let mut recent = self.previous.clone();
        // Same bounds: adding cannot fail.
        let _ = recent.add(&self.current);
        Distribution::of(&recent)
    }
}

/// The consumer's apply steps since start: each one decision of its batch
/// (`transaction`: it was a sled transaction before the apply log's table) and one
/// write to the apply log (`flush`: it was a sled flush before the apply log); and, counted per
/// release rather than per step, the checkpoints before intake segments are released. (Deserialize: `settle-bench` reads it back.)
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepsReport {
    /// Commands per step.
    pub commands: Distribution,
    /// The step's decisions, in memory (the name is from when it was a sled
    /// transaction).
    pub transaction_us: Distribution,
    /// The write to the apply log. Steps with nothing to make durable (every attempt
    /// a transient fault, or already done) have none.
    pub flush_us: Distribution,
    /// The checkpoint's sync (sled's flush and an fdatasync of its files, after it
    /// wrote the logged applies to sled) before finished intake segments are released,
    /// begun after a step's events went out: once per release of one or more 4 MiB
    /// segments of commands, per 16 MiB of apply log or per 4096 applies, on a thread
    /// of its own. (Default: read from a server from before this field, as
    /// none.)
    #[serde(default)]
    pub release_sync_us: Distribution,
}

/// Percentiles of one histogram; all 0 while it is empty.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Distribution {
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
        let refused = Counter::default();
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
            "commands_refused",
            "New commands answered 503 because the commands waiting to be applied were at --max-pending or --max-pending-bytes, or the consumer's lag beyond --max-lag-ms",
            refused.clone(),
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
        let lag_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "consumer_lag_seconds",
            "How long the oldest command the consumer may apply now has been due (0 when none waits)",
            lag_seconds.clone(),
        );
        registry.register(
            "window_seconds",
            "Consistency window per settled command, accept to readable",
            window_seconds.clone(),
        );
        let transaction_seconds = Histogram::new(STEP_BUCKETS_SECONDS);
        registry.register(
            "apply_transaction_seconds",
            "The consumer's apply per step (deciding a batch of due commands, in memory; the name is from when it was a sled transaction)",
            transaction_seconds.clone(),
        );
        let flush_seconds = Histogram::new(STEP_BUCKETS_SECONDS);
        registry.register(
            "apply_flush_seconds",
            "The write to the apply log that makes an apply step durable against a crash, before its events go out",
            flush_seconds.clone(),
        );
        let release_sync_seconds = Histogram::new(STEP_BUCKETS_SECONDS);
        registry.register(
            "release_sync_seconds",
            "The checkpoint's sync (sled's flush and an fdatasync of its files) before finished intake segments are released, on a thread of its own",
            release_sync_seconds.clone(),
        );
        let histogram = |max, digits| {
            HdrHistogram::new_with_bounds(1, max, digits)
                .expect("static histogram bounds are valid")
        };
        let window_ms = WindowHistograms::new(histogram(WINDOW_MAX_MS, 3), Instant::now());
        // Two significant digits are plenty for step times, and a tenth of the memory.
        let steps = StepHistograms {
            commands: histogram(STEP_MAX_COMMANDS, 2),
            transaction_us: histogram(STEP_MAX_US, 2),
            flush_us: histogram(STEP_MAX_US, 2),
            release_sync_us: histogram(STEP_MAX_US, 2),
        };
        Self {
            inner: Arc::new(Inner {
                registry,
                accepted,
                settled,
                failed,
                deduplicated,
                refused,
                dead_lettered,
                pending,
                subscribers,
                lag: Lag::new(),
                lag_seconds,
                window_seconds,
                window_ms: Mutex::new(window_ms),
                transaction_seconds,
                flush_seconds,
                release_sync_seconds,
                steps: Mutex::new(steps),
            }),
        }
    }

    /// The consumer's lag, for the consumer to keep and the intake's bound to read.
    pub fn lag(&self) -> Lag {
        self.inner.lag.clone()
    }

    /// New commands, durable and handed to the consumer.
    pub fn commands_accepted(&self, count: usize) {
        self.inner
            .accepted
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// The commands accepted and not finished, as the store's pending table holds
    /// them: set before each report, so the gauge cannot drift from it.
    pub fn set_pending(&self, count: usize) {
        self.inner
            .pending
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn command_deduplicated(&self) {
        self.inner.deduplicated.inc();
    }

    /// A new command not stored: the server held as many unapplied ones as it may.
    pub fn command_refused(&self) {
        self.inner.refused.inc();
    }

    pub fn command_settled(&self, window_ms: u64) {
        self.inner.settled.inc();
        self.inner.window_seconds.observe(window_ms as f64 / 1000.0);
        let mut window = self
            .inner
            .window_ms
            .lock()
            .expect("window histogram lock poisoned");
        window.record(window_ms, Instant::now());
    }

    pub fn command_failed(&self, dead_lettered: bool) {
        self.inner.failed.inc();
        if dead_lettered {
            self.inner.dead_lettered.inc();
        }
    }

    /// One apply step of `commands` commands: its transaction, and its flush if it had
    /// anything to make durable.
    pub fn apply_step(&self, commands: usize, transaction: Duration, flush: Option<Duration>) {
        let inner = &self.inner;
        inner.transaction_seconds.observe(transaction.as_secs_f64());
        if let Some(flush) = flush {
            inner.flush_seconds.observe(flush.as_secs_f64());
        }
        let mut steps = inner.steps.lock().expect("step histograms lock poisoned");
        steps
            .commands
            .saturating_record(u64::try_from(commands).unwrap_or(u64::MAX));
        steps.transaction_us.saturating_record(micros(transaction));
        if let Some(flush) = flush {
            steps.flush_us.saturating_record(micros(flush));
        }
    }

    /// One sync of sled's files before finished intake segments were released.
    pub fn release_sync(&self, sync: Duration) {
        self.inner.release_sync_seconds.observe(sync.as_secs_f64());
        let mut steps = self
            .inner
            .steps
            .lock()
            .expect("step histograms lock poisoned");
        steps.release_sync_us.saturating_record(micros(sync));
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
        let (window_ms, window_recent_ms) = {
            let mut window = inner
                .window_ms
                .lock()
                .expect("window histogram lock poisoned");
            let recent = window.recent(Instant::now());
            (Distribution::of(&window.since_start), recent)
        };
        let apply_steps = {
            let steps = inner.steps.lock().expect("step histograms lock poisoned");
            StepsReport {
                commands: Distribution::of(&steps.commands),
                transaction_us: Distribution::of(&steps.transaction_us),
                flush_us: Distribution::of(&steps.flush_us),
                release_sync_us: Distribution::of(&steps.release_sync_us),
            }
        };
        MetricsReport {
            accepted: inner.accepted.get(),
            settled: inner.settled.get(),
            failed: inner.failed.get(),
            deduplicated: inner.deduplicated.get(),
            refused: inner.refused.get(),
            dead_lettered: inner.dead_lettered.get(),
            pending: inner.pending.get(),
            subscribers: inner.subscribers.get(),
            lag_ms: u64::try_from(inner.lag.current().as_millis()).unwrap_or(u64::MAX),
            window_ms,
            window_recent_ms,
            apply_steps,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn openmetrics(&self) -> String {
        self.inner
            .lag_seconds
            .set(self.inner.lag.current().as_secs_f64());
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

impl Distribution {
    fn of(histogram: &HdrHistogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            count: histogram.len(),
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            max: histogram.max(),
        }
    }
}

/// Whole microseconds, at least 1 (the histograms' lowest value).
fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, STEP_MAX_US)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn windows(now: Instant) -> WindowHistograms {
        let empty = HdrHistogram::new_with_bounds(1, WINDOW_MAX_MS, 3).expect("valid bounds");
        WindowHistograms::new(empty, now)
    }

    #[test]
    fn the_recent_window_follows_a_change_of_the_delay_within_two_spans_and_the_total_keeps_all() {
        let start = Instant::now();
        let mut window = windows(start);
        for _ in 0..300 {
            window.record(700, start);
        }
        assert_eq!(window.recent(start).p50, 700);

        // The delay becomes 3 s: a span later both are in the recent figures...
        let later = start + RECENT_SPAN;
        for _ in 0..100 {
            window.record(3000, later);
        }
        let recent = window.recent(later);
        // (3000 ms is recorded to three significant digits: its bucket reads 3001.)
        assert_eq!((recent.count, recent.max), (400, 3001));
        // ...two spans later only the new ones, while the total holds every command.
        let latest = later + RECENT_SPAN;
        window.record(3000, latest);
        let recent = window.recent(latest);
        assert_eq!((recent.count, recent.p50), (101, 3001));
        assert_eq!(Distribution::of(&window.since_start).count, 401);
        assert_eq!(Distribution::of(&window.since_start).p50, 700);
    }

    #[test]
    fn the_recent_window_never_reaches_back_past_two_spans() {
        let start = Instant::now();
        let mut window = windows(start);
        window.record(700, start);
        let almost_two_spans = start + 2 * RECENT_SPAN - Duration::from_secs(1);
        assert_eq!(window.recent(almost_two_spans).count, 1);
        let past_two_spans = start + 2 * RECENT_SPAN + Duration::from_secs(1);
        assert_eq!(window.recent(past_two_spans).count, 0);
    }

    #[test]
    fn nothing_settled_for_two_spans_leaves_the_recent_window_empty() {
        let start = Instant::now();
        let mut window = windows(start);
        window.record(700, start);
        assert_eq!(window.recent(start + RECENT_SPAN).count, 1);
        assert_eq!(window.recent(start + 3 * RECENT_SPAN).count, 0);
        assert_eq!(Distribution::of(&window.since_start).count, 1);
    }
}
