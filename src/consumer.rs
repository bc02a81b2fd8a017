//! The consumer: applies each accepted command when it falls due, or fails it.
//!
//! One thread owns all scheduling state, so no lock guards it:
//! - a due-time queue (`DelayQueue`), one timer per command: a burst of thousands of
//!   commands fires together one delay later instead of queueing behind each other;
//! - per task, the seqs of its unapplied commands: only the oldest may apply, so a
//!   command whose jitter made it due early waits for its predecessors;
//! - the due set: commands whose timer fired and that wait for their turn.
//!
//! Each step (`Consumer::process_once`) takes every applicable command, draws its
//! faults, decides the batch from memory (`store::apply`), makes it durable against a
//! crash with one write to the apply log (`store::apply_log`; a checkpoint writes it
//! to sled later, on a thread of its own), then lets the commands leave the intake
//! log's pending table, updates the projection and publishes the events in id order. Publishing after durability is what lets a client trust
//! `projection:settled`.
//!
//! The consumer runs on a thread of its own with a single-threaded runtime
//! ([`Consumer::start`]), and applies each step inline there. Its timers then fire on a
//! runtime that no HTTP connection keeps busy, and a step crosses no thread between
//! its timer and its publish (BENCHMARKS.md, section 1a).
//!
//! Faults, as a broker would show them: a lost delivery leaves the command pending
//! with a redelivery timer (`--redeliver-after-ms`); a transient fault (a failed
//! read of the store, a panic while applying, or the simulated `transient_rate`) is retried
//! with backoff and dead-lettered after [`MAX_ATTEMPTS`]. Whatever is redelivered
//! applies at most once: the store refuses a command that is no longer pending. A
//! failed write to the apply log, or a failed sync, is no transient fault: nothing
//! applies after it, and the server stops (see [`Consumer::process_once`]).
//!
//! Layout: this file owns the consumer's thread (its state, start, loop and shutdown
//! checkpoint); `inbox` what reaches it (deliveries and the handle that sends them);
//! `schedule` the timers, the per-task order and the due set; `step` one apply step
//! and the checkpoints it hands off to a thread of their own.

mod inbox;
mod schedule;
mod step;

pub use self::inbox::{ConsumerHandle, Delivery};

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use uuid::Uuid;

use self::inbox::Message;
use self::schedule::Scheduled;
use crate::faults::Faults;
use crate::hub::Hub;
use crate::lag::Lag;
use crate::metrics::Metrics;
use crate::store::Store;

/// How many scheduling messages (an intake batch or a redelivery each) may wait for the
/// consumer. When it is full, the intake writer waits for room, and so accepting
/// handlers wait too (backpressure); the commands are already durable.
pub const INBOX_CAPACITY: usize = 16_384;
/// Attempts before a command with transient faults is dead-lettered.
pub const MAX_ATTEMPTS: u32 = 5;
/// Backoff before the second attempt; it doubles for each further one.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Most commands applied in one step, so no step's write to the apply log is unbounded.
pub const MAX_BATCH: usize = 2_048;
/// How often a step waiting for room ([`Consumer::wait_for_room`]) looks again.
const ROOM_RECHECK: Duration = Duration::from_millis(1);
/// How often the consumer, idle, tries again to begin a due checkpoint (while one runs
/// or backs off after a failure), whatever else wakes it.
const CHECKPOINT_RECHECK: Duration = Duration::from_millis(50);
/// How much earlier than its deadline a timer is set; the thread sleeps the rest of the
/// way ([`Consumer::sleep_until_armed`]). The queue's timers tick in whole milliseconds
/// and its runtime parks in a millisecond `epoll_wait`, so on their own they fire up to
/// 2 ms late: at 1000 commands/s that was most of the time from a command's due time to
/// its step (BENCHMARKS.md, section 1b).
const TIMER_LEAD: Duration = Duration::from_millis(2);

/// The background applier. Build it with [`Consumer::new`], then [`Consumer::start`]
/// it.
pub struct Consumer {
    store: Store,
    hub: Hub,
    faults: Faults,
    metrics: Metrics,
    redeliver_after: Duration,
    inbox: mpsc::Receiver<Message>,
    timers: DelayQueue<u64>,
    /// No timer in `timers` is due before this: the earliest deadline (plus
    /// [`TIMER_LEAD`]) the last look found, or an earlier target set since (a timer
    /// removed since may leave it early, which costs a look, never a miss). The queue's
    /// `peek` walks a slot's whole list, thousands of timers under load, so
    /// [`Consumer::process_once`] looks only once this has passed.
    next_due: Option<Instant>,
    /// Timers that expired before their deadline, by it: the thread sleeps until the
    /// first.
    armed: BTreeSet<(Instant, u64)>,
    scheduled: HashMap<u64, Scheduled>,
    per_task: HashMap<Uuid, BTreeSet<u64>>,
    due: HashSet<u64>,
    lag: Lag,
    /// The thread finishing the last checkpoint begun ([`Consumer::checkpoint_elsewhere`]),
    /// joined before the one at shutdown.
    checkpointing: Option<std::thread::JoinHandle<()>>,
    /// When [`Consumer::run`] last tried to begin a due checkpoint outside a step.
    checkpoint_tried: Option<Instant>,
    /// The shutdown token [`Consumer::start`] was given (a token never cancelled
    /// before): [`Consumer::run`] ends when it is cancelled, and so does a step's wait
    /// for room ([`Consumer::wait_for_room`]).
    stopping: CancellationToken,
}

/// The consumer's thread ([`Consumer::start`]).
pub struct ConsumerThread(std::thread::JoinHandle<()>);

impl ConsumerThread {
    /// Waits, off the runtime, for the consumer to finish its step and stop; call after
    /// its `shutdown` token is cancelled. `false` when it panicked.
    pub async fn join(self) -> bool {
        crate::join_thread(self.0, "consumer").await
    }
}

impl Consumer {
    /// Creates the consumer and the handle the API sends new commands through; the
    /// consumer keeps the metrics' [`Lag`] up to date.
    pub fn new(
        store: Store,
        hub: Hub,
        faults: Faults,
        metrics: Metrics,
        redeliver_after: Duration,
    ) -> (Self, ConsumerHandle) {
        let (sender, inbox) = mpsc::channel(INBOX_CAPACITY);
        let consumer = Self {
            store,
            hub,
            faults,
            lag: metrics.lag(),
            metrics,
            redeliver_after,
            inbox,
            timers: DelayQueue::new(),
            next_due: None,
            armed: BTreeSet::new(),
            scheduled: HashMap::new(),
            per_task: HashMap::new(),
            due: HashSet::new(),
            checkpointing: None,
            checkpoint_tried: None,
            stopping: CancellationToken::new(),
        };
        (consumer, ConsumerHandle { sender })
    }

    /// Schedules every accepted but unapplied command found in the store, at its due
    /// time or now if that has passed.
    fn resume(&mut self) {
        let unapplied = self.store.unapplied();
        let count = unapplied.len();
        for record in &unapplied {
            self.schedule(Delivery::from(record));
        }
        if count > 0 {
            tracing::info!(count, "resumed unapplied commands");
        }
    }

    /// Starts the consumer on a thread of its own, `settle-consumer`, with a
    /// single-threaded runtime for its timers and inbox. Answers once every accepted but
    /// unapplied command found in the store is scheduled again; then the consumer runs
    /// until `shutdown`. Should it panic, it cancels `shutdown`, so that the server stops
    /// rather than accept commands that nothing would apply, and
    /// [`ConsumerThread::join`] reports it.
    ///
    /// # Errors
    /// When the thread or its runtime cannot be created, or resuming panics.
    pub async fn start(mut self, shutdown: CancellationToken) -> std::io::Result<ConsumerThread> {
        self.stopping = shutdown.clone();
        let (resumed, started) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("settle-consumer".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = resumed.send(Err(err));
                        return;
                    }
                };
                let stop = shutdown.clone();
                let consume = async move {
                    // On this runtime: its timers belong to it.
                    self.resume();
                    let _ = resumed.send(Ok(()));
                    self.run().await;
                };
                crate::stopping_on_panic("consumer", &stop, || runtime.block_on(consume));
            })?;
        match started.await {
            Ok(Ok(())) => Ok(ConsumerThread(thread)),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(std::io::Error::other(
                "the consumer panicked while resuming",
            )),
        }
    }

    /// Runs until its shutdown token ([`Consumer::stopping`]) is cancelled: wait for a
    /// message or a timer, then apply what is due. Each step's apply blocks the
    /// runtime's thread (nothing else of the consumer could run meanwhile anyway):
    /// hence a runtime of its own.
    async fn run(mut self) {
        let shutdown = self.stopping.clone();
        loop {
            // Step by step through what is due, but not past a shutdown: a backlog of
            // minutes would hold the drain that long, and it resumes on the next start.
            while !shutdown.is_cancelled() && self.process_once() > 0 {}
            if !shutdown.is_cancelled() && self.sleep_until_armed() {
                // A turn of the runtime: its timer driver takes in the timers that
                // expired during the sleep (the queue sees none before that), and the
                // cooperative budget, which the queue's polls use up, starts again.
                tokio::task::yield_now().await;
                self.drain_ready();
                continue;
            }
            // Applies logged and not yet in sled are written once the oldest is
            // `UNWRITTEN_AGE` old, also when no step follows (`store::unwritten`), and a
            // checkpoint that failed is tried again; at most every `CHECKPOINT_RECHECK`
            // (one may be running, or backing off), whatever else wakes the loop.
            let now = Instant::now();
            let checkpoint_due = self.store.checkpoint_due_at().map(|due| {
                due.max(
                    self.checkpoint_tried
                        .map_or(now, |tried| tried + CHECKPOINT_RECHECK),
                )
            });
            if checkpoint_due.is_some_and(|due| due <= now) {
                self.checkpoint_tried = Some(now);
                self.begin_checkpoint();
                continue;
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                message = self.inbox.recv() => match message {
                    Some(message) => self.handle(message),
                    None => break,
                },
                Some(expired) = self.timers.next(), if !self.timers.is_empty() => {
                    self.expired(expired.into_inner());
                }
                // Begun at the loop's top, where it is due now.
                () = sleep_until_std(checkpoint_due), if checkpoint_due.is_some() => {}
            }
            self.drain_ready();
        }
        // What the steps applied, synced into sled, so the next start has no apply log
        // to replay. Not after a failure: nothing more can be made durable. After a
        // failed write to the apply log, sled's files are synced all the same, so that
        // a writeback error on them leaves its marker.
        if let Some(thread) = self.checkpointing.take() {
            if thread.join().is_err() {
                tracing::error!("the last checkpoint's thread panicked");
            }
        }
        if !self.store.sync_has_failed() {
            match self.store.checkpoint() {
                Ok(()) => {
                    if let Err(err) = self.store.give_back_event_ids() {
                        tracing::warn!(error = %err, "cannot give back the event ids reserved at shutdown; a start after a reboot skips them");
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot checkpoint the applies at shutdown; the next start replays the apply log");
                }
            }
        } else if !self.store.sled_sync_has_failed() {
            self.store.sync_after_apply_log_failure();
        }
        tracing::info!(pending = self.scheduled.len(), "consumer stopped");
    }

    /// Takes in every message and timer that is ready now, without waiting. tokio's
    /// cooperative budget ends a poll's run of expired timers after 128, so a burst that
    /// falls due at once is applied in steps of about that many (not [`MAX_BATCH`]), with
    /// the inbox served between them; the intake writer's hand-off never waits long.
    fn drain_ready(&mut self) {
        while let Ok(message) = self.inbox.try_recv() {
            self.handle(message);
        }
        while !self.timers.is_empty() {
            match self.timers.next().now_or_never() {
                Some(Some(expired)) => self.expired(expired.into_inner()),
                _ => break,
            }
        }
    }
}

/// Sleeps until `deadline` (a select branch guarded by `deadline.is_some()`).
async fn sleep_until_std(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultSettings;
    use time::OffsetDateTime;

    use crate::model::{unix_ms_ceil, CommandBody, CommandRecord};
    use crate::store::Intake;

    /// A consumer of `store` without faults, not started.
    pub(super) fn consumer_of(
        store: Store,
        hub: Hub,
        metrics: &Metrics,
    ) -> (Consumer, ConsumerHandle) {
        let settings = FaultSettings {
            delay_ms: 0,
            jitter_ms: 0,
            failure_rate: 0.0,
            drop_rate: 0.0,
            transient_rate: 0.0,
        };
        Consumer::new(
            store,
            hub,
            Faults::new(settings, Some(1)),
            metrics.clone(),
            Duration::from_secs(5),
        )
    }

    /// A consumer started on a fresh store, with the intake log that feeds it.
    struct Running {
        store: Store,
        hub: Hub,
        metrics: Metrics,
        shutdown: CancellationToken,
        thread: ConsumerThread,
        intake: Intake,
        intake_thread: crate::store::IntakeThread,
        _dir: Option<tempfile::TempDir>,
    }

    impl Running {
        async fn start() -> Self {
            let dir = tempfile::tempdir().expect("a temp dir");
            let store = Store::open(dir.path()).expect("a store");
            Self::start_on(store, Some(dir)).await
        }

        /// A consumer started on `store`, whose directory `dir` (if any) it keeps.
        async fn start_on(store: Store, dir: Option<tempfile::TempDir>) -> Self {
            let hub = Hub::new();
            let metrics = Metrics::new();
            let (consumer, handle) = consumer_of(store.clone(), hub.clone(), &metrics);
            let shutdown = CancellationToken::new();
            let thread = consumer.start(shutdown.clone()).await.expect("started");
            let (intake, intake_thread) = Intake::start(
                store.clone(),
                crate::store::PendingBound::none(),
                Box::new(move |records: &[CommandRecord]| handle.schedule_blocking(records)),
                shutdown.clone(),
            )
            .expect("the intake log");
            Self {
                store,
                hub,
                metrics,
                shutdown,
                thread,
                intake,
                intake_thread,
                _dir: dir,
            }
        }

        /// Accepts a create under `key`, due at once.
        async fn accept(&self, key: &str) {
            self.accept_with_notes(key, String::new()).await;
        }

        async fn accept_with_notes(&self, key: &str, notes: String) {
            let due_at_ms = unix_ms_ceil(OffsetDateTime::now_utc());
            let body = CommandBody::Create {
                title: "t".to_owned(),
                notes,
            };
            self.accept_due(key, Uuid::now_v7(), body, due_at_ms).await;
        }

        /// Accepts `body` for `task_id` under `key`, due at `due_at_ms` (Unix ms).
        async fn accept_due(&self, key: &str, task_id: Uuid, body: CommandBody, due_at_ms: u64) {
            let accepted_at = OffsetDateTime::now_utc();
            let record = CommandRecord::accepted(
                task_id,
                key.to_owned(),
                "f".to_owned(),
                body,
                accepted_at,
                due_at_ms,
            );
            self.intake.accept(record).await.expect("accepted");
        }

        /// Stops the intake log and answers whether the consumer ran to the end.
        async fn stop(self) -> bool {
            self.shutdown.cancel();
            let ran = self.thread.join().await;
            self.intake.stop(self.intake_thread).await;
            ran
        }
    }

    /// The next event the consumer publishes, within 30 s.
    async fn published(
        events: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<crate::hub::EventFrame>>,
    ) -> std::sync::Arc<crate::hub::EventFrame> {
        tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("the consumer applies")
            .expect("an event")
    }

    /// A clean stop gives back the event ids it reserved and did not use: the next
    /// start goes on from the last event without a hole, after a reboot too, where one
    /// after a crash would skip them (`store::event_ids`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clean_stop_leaves_no_hole_in_the_event_ids_after_a_reboot() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = crate::store::event_ids_testing::open(dir.path(), Some("boot-1"));
        let running = Running::start_on(store, None).await;
        let mut events = running.hub.subscribe();
        running.accept("a").await;
        let settled = published(&mut events).await;
        assert_eq!(settled.id, 1);
        assert!(running.stop().await, "a clean stop");
        let store = crate::store::event_ids_testing::open(dir.path(), Some("boot-2"));
        assert!(
            store.event_id_holes().is_empty(),
            "{:?}",
            store.event_id_holes()
        );
        assert_eq!(store.watermark(), 1);
    }

    /// A panic outside an apply (here: a step's read of a poisoned projection, which
    /// is taken before any command is tried) must not leave a server that answers 202
    /// for commands nothing will apply.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_outside_an_apply_starts_the_shutdown_and_join_reports_it() {
        let running = Running::start().await;
        running.store.poison_projection();
        running.accept("k").await;
        tokio::time::timeout(Duration::from_secs(30), running.shutdown.cancelled())
            .await
            .expect("the consumer starts the shutdown");
        assert!(!running.stop().await, "join reports the failure");
    }

    /// Once a sync of sled's files has failed, what the consumer would apply could not
    /// be made durable: it applies and publishes nothing more (`serve` stops the server),
    /// and the command stays in the intake log for the next start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_failed_sync_nothing_applies_and_nothing_is_published() {
        let running = Running::start().await;
        let mut events = running.hub.subscribe();
        running.accept("before").await;
        let settled = published(&mut events).await;
        assert!(std::str::from_utf8(&settled.bytes)
            .expect("utf-8")
            .contains("\"before\""));

        running.store.fail_sled_sync();
        running.accept("after").await;
        // As long again as the first command took, and more: nothing may come.
        let quiet = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
        assert!(quiet.is_err(), "published after the failure: {quiet:?}");
        assert!(
            running.store.pending_command("after").is_some(),
            "the command is still pending, its intake record kept"
        );
        assert!(
            running
                .store
                .finished_command("after")
                .expect("readable")
                .is_none(),
            "and not applied"
        );
        assert!(running.stop().await, "the consumer stops without a panic");
    }

    /// An apply is written to sled and synced by a checkpoint within about half a
    /// second (`store::unwritten`), also when no step follows it to begin one (and
    /// other work keeps waking the consumer), and the
    /// checkpoint's sync is timed: `apply_steps.release_sync_us` and
    /// `settle_release_sync_seconds` count it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_consumer_checkpoints_its_last_applies_and_times_the_sync() {
        let running = Running::start().await;
        let mut events = running.hub.subscribe();
        running.accept("only").await;
        published(&mut events).await;
        let published = tokio::time::Instant::now();
        // Meanwhile commands due much later keep waking the consumer, which must not
        // put the checkpoint off each time.
        let later = unix_ms_ceil(OffsetDateTime::now_utc()) + 600_000;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut woken = 0;
        while running.store.unwritten_len() > 0
            || running.metrics.report().apply_steps.release_sync_us.count == 0
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never checkpointed: {} applies not written to sled",
                running.store.unwritten_len()
            );
            let like = CommandBody::Like { delta: 1 };
            let key = format!("later-{woken}");
            running.accept_due(&key, Uuid::now_v7(), like, later).await;
            woken += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Half a second after it, with slack for a slow machine.
        assert!(
            published.elapsed() < Duration::from_secs(5),
            "checkpointed {:?} after the event",
            published.elapsed()
        );
        let report = running.metrics.report().apply_steps.release_sync_us;
        assert_eq!(report.count, 1, "one checkpoint, one sync");
        assert!(report.max >= report.p50 && report.p50 >= 1);
        let exposition = running.metrics.openmetrics();
        assert!(
            exposition.contains("settle_release_sync_seconds_count 1\n"),
            "{exposition}"
        );
        assert!(running.stop().await);
    }

    /// At a shutdown the consumer finishes the step it is in and stops, instead of
    /// stepping through the rest of a due backlog (which resumes on the next start):
    /// the drain must not take as long as the backlog. Commands for one task apply one
    /// per step (in acceptance order), so a task's due burst is many steps.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shutdown_ends_a_due_backlog_after_the_running_step() {
        let running = Running::start().await;
        // The first step will wait where it projects its command: finished, not
        // published. Held from before the accepts, so nothing can apply more.
        let held = running.store.hold_projection();
        let backlog = 50;
        let task = Uuid::now_v7();
        let due_at_ms = unix_ms_ceil(OffsetDateTime::now_utc()) + 1000;
        for i in 0..backlog {
            let like = CommandBody::Like { delta: 1 };
            running
                .accept_due(&format!("like-{i}"), task, like, due_at_ms)
                .await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while running.store.pending_count() == backlog {
            assert!(tokio::time::Instant::now() < deadline, "no step began");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        running.shutdown.cancel();
        drop(held);
        let store = running.store.clone();
        assert!(running.stop().await);
        assert_eq!(
            store.pending_count(),
            backlog - 1,
            "the running step finished, the rest waits for the next start"
        );
    }

    /// A task's commands that fall due together apply one step each, in order: while
    /// the consumer steps through them it runs behind the later ones' due time, and the
    /// lag says so; once nothing waits, it is zero again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lag_grows_while_due_commands_wait_and_is_zero_once_none_does() {
        // Enough that the steps take milliseconds: each is a write to the apply log.
        const COMMANDS: u64 = 1000;
        let running = Running::start().await;
        let task_id = Uuid::now_v7();
        // Time to accept them all first (together: a few syncs), so that they fall
        // due together.
        let due_at_ms = unix_ms_ceil(OffsetDateTime::now_utc()) + 2_000;
        let served = &running;
        futures::future::join_all((0..COMMANDS).map(|n| async move {
            let like = CommandBody::Like { delta: 1 };
            served
                .accept_due(&format!("like-{n}"), task_id, like, due_at_ms)
                .await;
        }))
        .await;
        assert_eq!(running.metrics.report().lag_ms, 0, "nothing due yet");

        let give_up = Instant::now() + Duration::from_secs(60);
        let mut most = 0;
        loop {
            let report = running.metrics.report();
            most = most.max(report.lag_ms);
            // Each fails (no such task), which is an apply step all the same.
            if report.settled + report.failed == COMMANDS && report.lag_ms == 0 {
                break;
            }
            assert!(Instant::now() < give_up, "still waiting: {report:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(most > 0, "the lag showed while {COMMANDS} steps ran");
        assert!(running.stop().await);
    }
}
