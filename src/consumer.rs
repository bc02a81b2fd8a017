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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{delay_queue, DelayQueue};
use uuid::Uuid;

use crate::faults::Faults;
use crate::hub::Hub;
use crate::lag::Lag;
use crate::metrics::Metrics;
use crate::model::{unix_ms, CommandRecord, FailureReason};
use crate::store::{Applied, Checkpoint, Decision, Store, StoreError};

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

/// What the consumer needs to know about a command to schedule it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub seq: u64,
    pub key: String,
    pub task_id: Uuid,
    pub command_id: Uuid,
    /// [`CommandRecord::due_at_ns`].
    pub due_at_ns: i128,
}

impl From<&CommandRecord> for Delivery {
    fn from(record: &CommandRecord) -> Self {
        Self {
            seq: record.seq,
            key: record.idempotency_key.clone(),
            task_id: record.task_id,
            command_id: record.command_id,
            due_at_ns: record.due_at_ns(),
        }
    }
}

#[derive(Debug)]
enum Message {
    /// Newly accepted commands: one intake batch.
    Schedule(Vec<Delivery>),
    /// A client retried a command that is still pending past the redelivery timeout.
    Redeliver(Delivery),
}

/// Cheap `Clone` sender side, held by the API.
#[derive(Clone)]
pub struct ConsumerHandle {
    sender: mpsc::Sender<Message>,
}

impl ConsumerHandle {
    /// Hands durable commands to the consumer, from a thread outside the runtime (the
    /// intake writer); waits for room when the inbox is full. If the consumer is gone
    /// (shutdown), the commands stay in the intake log and resume on the next start.
    pub fn schedule_blocking(&self, records: &[CommandRecord]) {
        let deliveries = records.iter().map(Delivery::from).collect();
        if self
            .sender
            .blocking_send(Message::Schedule(deliveries))
            .is_err()
        {
            tracing::debug!(
                count = records.len(),
                "consumer stopped; commands resume on restart"
            );
        }
    }

    /// Asks for an immediate redelivery of a command whose delivery was lost.
    pub async fn redeliver(&self, record: &CommandRecord) {
        if self
            .sender
            .send(Message::Redeliver(record.into()))
            .await
            .is_err()
        {
            tracing::debug!(command_id = %record.command_id, "consumer stopped; command resumes on restart");
        }
    }
}

/// A command's pending timer, and its deadline.
#[derive(Clone, Copy, Debug, Default)]
enum Timer {
    /// None: the command is due, or applying.
    #[default]
    None,
    /// In the queue, set [`TIMER_LEAD`] before its deadline.
    Set(delay_queue::Key, Instant),
    /// Expired early, in the armed set until its deadline
    /// ([`Consumer::sleep_until_armed`]).
    Armed(Instant),
}

struct Scheduled {
    delivery: Delivery,
    /// Apply attempts that hit a transient fault so far.
    failed_attempts: u32,
    /// Set after a lost delivery: the pending timer is a redelivery, which a client
    /// retry may bring forward.
    lost: bool,
    /// Set when the attempts are exhausted: the next step records the dead letter.
    gave_up: Option<String>,
    timer: Timer,
    /// While in the due set: since when (its timer's deadline, or when a client's
    /// retry or the last attempt put it there), for the [`Lag`]; never before its
    /// task's previous command was due ([`Consumer::forget`]).
    due_since: Option<Instant>,
    /// How long past its due time the command reached the consumer (a restart, a slow
    /// hand-off): its first timer, set for now, counts from that much earlier.
    overdue: Duration,
}

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

/// One command's fate in a batch, decided before the apply.
struct Attempt {
    seq: u64,
    record: CommandRecord,
    decision: Decision,
}

enum Outcome {
    Applied(Box<Applied>),
    AlreadyDone,
    Transient(String),
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
            if let Err(err) = self.store.checkpoint() {
                tracing::warn!(error = %err, "cannot checkpoint the applies at shutdown; the next start replays the apply log");
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

    fn handle(&mut self, message: Message) {
        match message {
            Message::Schedule(deliveries) => {
                for delivery in deliveries {
                    self.schedule(delivery);
                }
            }
            Message::Redeliver(delivery) => {
                let seq = delivery.seq;
                let Some(entry) = self.scheduled.get_mut(&seq) else {
                    // Not known here (it may have applied meanwhile): schedule it; the
                    // store refuses it if it is no longer pending.
                    self.schedule(delivery);
                    return;
                };
                if entry.lost {
                    let timer = std::mem::take(&mut entry.timer);
                    entry.lost = false;
                    entry.due_since = Some(Instant::now());
                    tracing::info!(command_id = %entry.delivery.command_id, "redelivering at once on client retry");
                    self.cancel(seq, timer);
                    self.due.insert(seq);
                }
            }
        }
    }

    fn schedule(&mut self, delivery: Delivery) {
        let seq = delivery.seq;
        if self.scheduled.contains_key(&seq) {
            return;
        }
        // From now to the nanosecond: a wait counted from now rounded down to the
        // millisecond would fire up to a millisecond late (the queue's own millisecond
        // ticks are slept past, `sleep_until_armed`).
        let due_ns = delivery.due_at_ns;
        let now_ns = OffsetDateTime::now_utc().unix_timestamp_nanos();
        let wait = Duration::from_nanos(u64::try_from(due_ns - now_ns).unwrap_or(0));
        let overdue = Duration::from_nanos(u64::try_from(now_ns - due_ns).unwrap_or(0));
        let target = Instant::now() + wait;
        let timer = self.set_timer(seq, target);
        self.per_task
            .entry(delivery.task_id)
            .or_default()
            .insert(seq);
        self.scheduled.insert(
            seq,
            Scheduled {
                delivery,
                failed_attempts: 0,
                lost: false,
                gave_up: None,
                timer: Timer::Set(timer, target),
                due_since: None,
                overdue,
            },
        );
    }

    /// A timer for `target`, set [`TIMER_LEAD`] early.
    fn set_timer(&mut self, seq: u64, target: Instant) -> delay_queue::Key {
        self.next_due = Some(self.next_due.map_or(target, |due| due.min(target)));
        let early = target.checked_sub(TIMER_LEAD).unwrap_or(target);
        self.timers.insert_at(seq, early.into())
    }

    /// Takes a timer of `seq`'s out of the queue or the armed set.
    fn cancel(&mut self, seq: u64, timer: Timer) {
        match timer {
            Timer::None => {}
            Timer::Set(key, _) => {
                self.timers.remove(&key);
            }
            Timer::Armed(target) => {
                self.armed.remove(&(target, seq));
            }
        }
    }

    /// `seq`'s timer expired: it fires now if its deadline has come, or is armed until
    /// then.
    fn expired(&mut self, seq: u64) {
        let Some(entry) = self.scheduled.get_mut(&seq) else {
            return;
        };
        let Timer::Set(_, target) = entry.timer else {
            return;
        };
        if target > Instant::now() {
            entry.timer = Timer::Armed(target);
            self.armed.insert((target, seq));
        } else {
            self.fire(target, seq);
        }
    }

    /// Sleeps until the first armed timer's deadline, at most [`TIMER_LEAD`] and the
    /// queue's lateness away, then fires every armed timer whose deadline has come.
    /// Blocking the thread is what it is for: the runtime's own wait would end up to a
    /// millisecond late, and nothing else of the consumer can be due sooner (whatever
    /// its inbox brings is due no earlier than now). `false` when none is armed.
    fn sleep_until_armed(&mut self) -> bool {
        let Some(&(first, _)) = self.armed.first() else {
            return false;
        };
        let wait = first.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        let now = Instant::now();
        while let Some(&(target, seq)) = self.armed.first() {
            if target > now {
                break;
            }
            self.armed.pop_first();
            self.fire(target, seq);
        }
        true
    }

    /// The timer set for `deadline` fired.
    fn fire(&mut self, deadline: Instant, seq: u64) {
        if let Some(entry) = self.scheduled.get_mut(&seq) {
            entry.timer = Timer::None;
            entry.lost = false;
            let overdue = std::mem::take(&mut entry.overdue);
            entry.due_since = Some(deadline.checked_sub(overdue).unwrap_or(deadline));
            self.due.insert(seq);
        }
    }

    fn retry_later(&mut self, seq: u64, after: Duration, lost: bool) {
        let Some(entry) = self.scheduled.get_mut(&seq) else {
            return;
        };
        // Only a due command is retried, and it has no timer; should one ever have one,
        // it is replaced, not left to fire as well.
        let old = std::mem::take(&mut entry.timer);
        entry.lost = lost;
        self.cancel(seq, old);
        let target = Instant::now() + after;
        let key = self.set_timer(seq, target);
        if let Some(entry) = self.scheduled.get_mut(&seq) {
            entry.timer = Timer::Set(key, target);
        }
    }

    /// Drops a command that is done with (or no longer pending). Its task's next
    /// command, if due already, counts as due no earlier than this one did: it waited
    /// for its turn, which is not lag, unless this one waited too.
    fn forget(&mut self, seq: u64) {
        if let Some(entry) = self.scheduled.remove(&seq) {
            self.cancel(seq, entry.timer);
            let task_id = entry.delivery.task_id;
            if let Some(seqs) = self.per_task.get_mut(&task_id) {
                seqs.remove(&seq);
                let next = seqs.first().copied();
                if seqs.is_empty() {
                    self.per_task.remove(&task_id);
                }
                let next = next.and_then(|next| self.scheduled.get_mut(&next));
                if let (Some(next), Some(floor)) = (next, entry.due_since) {
                    next.due_since = next.due_since.map(|since| since.max(floor));
                }
            }
        }
        self.due.remove(&seq);
    }

    /// Due commands that are the oldest unapplied one of their task, in seq order.
    fn applicable(&self) -> Vec<u64> {
        let mut seqs: Vec<u64> = self
            .due
            .iter()
            .copied()
            .filter(|seq| {
                self.scheduled.get(seq).is_some_and(|entry| {
                    self.per_task
                        .get(&entry.delivery.task_id)
                        .and_then(|seqs| seqs.first())
                        == Some(seq)
                })
            })
            .collect();
        seqs.sort_unstable();
        seqs
    }

    /// Applies every command that may apply now. Returns how many left the due set
    /// (applied, failed, dropped or put back for a retry); 0 means nothing was ready.
    /// Blocks the calling thread for the batch's write to the apply log (and, while the
    /// applies not yet in sled are at their bound, for a checkpoint to write some).
    ///
    /// Once a sync of sled's files has failed nothing applies any more, and a step
    /// whose write to the apply log fails publishes nothing: its applies may not be
    /// durable (the failure stops the server as a failed sync does), and the server is
    /// stopping (`serve` watches [`Store::sync_failed`]). Their commands stay in the
    /// intake log for the next start.
    fn process_once(&mut self) -> usize {
        if self.store.sync_has_failed() {
            return 0;
        }
        let mut seqs = self.applicable();
        // The timers that expired but were not taken in yet (a backlog is taken in
        // about 128 at a time, see `drain_ready`) wait too; an expired one is roughly
        // the oldest (the queue does not order what expired). It was set
        // `TIMER_LEAD` early (the queue rounds that up to its millisecond tick); an armed
        // timer whose deadline has passed waits as well.
        let now = Instant::now();
        let expired = if self.next_due.is_some_and(|due| due <= now) {
            self.next_due = self
                .timers
                .peek()
                .map(|key| self.timers.deadline(&key).into_std() + TIMER_LEAD);
            self.next_due.filter(|deadline| *deadline <= now)
        } else {
            None
        };
        let armed = self
            .armed
            .first()
            .map(|&(target, _)| target)
            .filter(|target| *target <= now);
        self.lag.waiting_since(
            seqs.iter()
                .filter_map(|seq| self.scheduled.get(seq)?.due_since)
                .chain(expired)
                .chain(armed)
                .min(),
        );
        if seqs.is_empty() {
            return 0;
        }
        self.wait_for_room();
        seqs.truncate(MAX_BATCH);
        let mut attempts = Vec::with_capacity(seqs.len());
        for seq in &seqs {
            self.due.remove(seq);
            let Some(entry) = self.scheduled.get(seq) else {
                continue;
            };
            let command_id = entry.delivery.command_id;
            let Some(record) = self.store.pending_command(&entry.delivery.key) else {
                // Finished already (a redelivery of an applied command): at most once.
                tracing::debug!(%command_id, "no longer pending; delivery ignored");
                self.forget(*seq);
                continue;
            };
            let decision = if let Some(cause) = &entry.gave_up {
                // Recording the dead letter is not subject to injected faults.
                Decision::Fail(
                    FailureReason::DeadLettered,
                    format!(
                        "gave up after {} attempts; last fault: {cause}",
                        entry.failed_attempts
                    ),
                )
            } else if self.faults.drop_delivery() {
                tracing::info!(%command_id, "delivery lost (drop_rate); redelivery scheduled");
                self.retry_later(*seq, self.redeliver_after, true);
                continue;
            } else if self.faults.transient_fault() {
                self.transient(
                    *seq,
                    "simulated transient fault (transient_rate)".to_owned(),
                );
                continue;
            } else if self.faults.inject_failure() {
                Decision::Fail(
                    FailureReason::Injected,
                    "the consumer rejected this command (injected failure)".to_owned(),
                )
            } else {
                Decision::Apply
            };
            attempts.push(Attempt {
                seq: *seq,
                record,
                decision,
            });
        }
        let processed = seqs.len();
        if attempts.is_empty() {
            return processed;
        }

        let Some(outcomes) = self.apply_step(attempts) else {
            return processed;
        };

        // Durable now (`apply_step` logged it). In event-id order: the batch applied in
        // this order.
        for (attempt, outcome) in outcomes {
            let record = &attempt.record;
            match outcome {
                Outcome::Applied(applied) => {
                    self.store
                        .finish(&record.idempotency_key, record.command_id);
                    self.store.project(&applied);
                    self.settle(&applied);
                    self.hub.publish(applied.frame.clone());
                    self.forget(attempt.seq);
                }
                Outcome::AlreadyDone => {
                    tracing::debug!(command_id = %record.command_id, "already applied; delivery ignored");
                    self.store
                        .finish(&record.idempotency_key, record.command_id);
                    self.forget(attempt.seq);
                }
                Outcome::Transient(cause) => self.transient(attempt.seq, cause),
            }
        }
        // After the step's events, so none of them waits for it; and its writes and
        // sync run on a thread of its own, so no later step waits for them either.
        self.begin_checkpoint();
        processed
    }

    /// Begins a checkpoint if one is due and none runs, and runs it on a thread of its
    /// own ([`Consumer::checkpoint_elsewhere`]).
    fn begin_checkpoint(&mut self) {
        match self.store.begin_checkpoint() {
            Ok(Some(checkpoint)) => self.checkpoint_elsewhere(checkpoint),
            Ok(None) => {}
            // A sync failure: the server stops (see `process_once`).
            Err(err) => tracing::error!(error = %err, "cannot checkpoint the applies"),
        }
    }

    /// While the applies not yet written to sled are at their bound
    /// ([`Store::unwritten_is_full`]), waits for checkpoints to write some, beginning
    /// one if none runs: a checkpoint that cannot keep up (or fails again and again)
    /// holds the consumer back, and with it, once its inbox is full, the intake; the
    /// pending bounds then refuse new commands. Not past a shutdown or a failed sync.
    fn wait_for_room(&mut self) {
        let mut waited = false;
        while self.store.unwritten_is_full()
            && !self.store.sync_has_failed()
            && !self.stopping.is_cancelled()
        {
            if !waited {
                tracing::warn!("the applies not yet written to sled are at their bound; the consumer waits for a checkpoint");
                waited = true;
            }
            self.begin_checkpoint();
            std::thread::sleep(ROOM_RECHECK);
        }
    }

    /// Runs the rest of a checkpoint (its sync, then the release of what waited for it:
    /// `store::checkpoint`) on a thread of its own. If no thread can be started, the
    /// checkpoint is dropped and its segments wait for the next one.
    fn checkpoint_elsewhere(&mut self, checkpoint: Checkpoint) {
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        let spawned = std::thread::Builder::new()
            .name("settle-checkpoint".to_owned())
            .spawn(move || {
                let mut next = Some(checkpoint);
                while let Some(checkpoint) = next.take() {
                    match checkpoint.run() {
                        Ok(Some(sync)) => metrics.release_sync(sync),
                        Ok(None) => {}
                        // A sync failure: the server stops (see `process_once`).
                        Err(err) => {
                            tracing::error!(error = %err, "cannot checkpoint the applies");
                            return;
                        }
                    }
                    // Segments that finished while this one ran: now, not at the next
                    // step, which an idle server may not take for a long time.
                    next = store.begin_checkpoint().unwrap_or_else(|err| {
                        tracing::error!(error = %err, "cannot checkpoint the applies");
                        None
                    });
                }
            });
        match spawned {
            Ok(thread) => {
                // The last one's thread has let go of its checkpoint (this one could
                // begin) and ends at once; joined, so none outlives the consumer.
                if let Some(last) = self.checkpointing.replace(thread) {
                    if last.join().is_err() {
                        tracing::error!("a checkpoint's thread panicked");
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot start a thread for a checkpoint; it waits for the next step");
            }
        }
    }

    /// Applies a batch (see [`apply_each`]) and makes it durable against a crash (the
    /// apply log; unless nothing applied: every attempt a transient fault or already
    /// done), timing both for the metrics (as `transaction` and `flush`, the names of
    /// before the apply log). `None` when that failed:
    /// then nothing of the batch may be published.
    fn apply_step(&self, attempts: Vec<Attempt>) -> Option<Vec<(Attempt, Outcome)>> {
        let commands = attempts.len();
        let started = std::time::Instant::now();
        let outcomes = apply_each(&self.store, attempts);
        let transaction = started.elapsed();
        let applied = outcomes.iter().filter_map(|(_, outcome)| match outcome {
            Outcome::Applied(applied) => Some(&**applied),
            Outcome::AlreadyDone | Outcome::Transient(_) => None,
        });
        let flush = if applied.clone().next().is_some() {
            let started = std::time::Instant::now();
            if let Err(err) = self.store.log_applied(applied) {
                tracing::error!(error = %err, commands, "an apply step's write to the apply log failed; nothing of it is published");
                return None;
            }
            Some(started.elapsed())
        } else {
            None
        };
        self.metrics.apply_step(commands, transaction, flush);
        Some(outcomes)
    }

    /// A transient fault: retry with exponential backoff, and after the last attempt
    /// schedule the command to be recorded as dead-lettered.
    fn transient(&mut self, seq: u64, cause: String) {
        let Some(entry) = self.scheduled.get_mut(&seq) else {
            return;
        };
        let command_id = entry.delivery.command_id;
        if entry.gave_up.is_some() {
            // Even recording the dead letter failed: storage trouble; keep trying.
            tracing::error!(%command_id, %cause, "could not record dead letter; retrying");
            self.retry_later(seq, FIRST_BACKOFF * 2u32.pow(MAX_ATTEMPTS), false);
            return;
        }
        entry.failed_attempts += 1;
        let failed = entry.failed_attempts;
        if failed >= MAX_ATTEMPTS {
            tracing::warn!(%command_id, attempts = failed, %cause, "dead-lettering command");
            entry.gave_up = Some(cause);
            entry.due_since = Some(Instant::now());
            self.due.insert(seq);
            return;
        }
        let backoff = FIRST_BACKOFF * 2u32.pow(failed - 1);
        tracing::info!(%command_id, attempt = failed, ?backoff, %cause, "transient fault; retrying");
        self.retry_later(seq, backoff, false);
    }

    /// Counts and logs a committed, durable outcome.
    fn settle(&self, applied: &Applied) {
        let record = &applied.record;
        let command_id = record.command_id;
        let event_id = applied.frame.id;
        match &record.error {
            None => {
                let window_ms =
                    unix_ms(OffsetDateTime::now_utc()).saturating_sub(unix_ms(record.accepted_at));
                self.metrics.command_settled(window_ms);
                tracing::debug!(%command_id, event_id, window_ms, "command settled");
            }
            Some(error) => {
                let dead_lettered = error.reason == FailureReason::DeadLettered;
                self.metrics.command_failed(dead_lettered);
                tracing::info!(%command_id, event_id, reason = ?error.reason, message = %error.message, "command failed");
            }
        }
    }
}

/// Applies a batch as one step ([`Store::step`]), each command on its own: one that
/// fails (a storage error, a panic) becomes its own transient fault and spends no event
/// id, and the rest of the batch goes on.
fn apply_each(store: &Store, attempts: Vec<Attempt>) -> Vec<(Attempt, Outcome)> {
    let mut step = store.step(OffsetDateTime::now_utc());
    attempts
        .into_iter()
        .map(|attempt| {
            let outcome = match guarded(|| step.apply(&attempt.record, &attempt.decision)) {
                Ok(applied) => outcome_of(applied),
                Err(cause) => Outcome::Transient(cause),
            };
            (attempt, outcome)
        })
        .collect()
}

fn outcome_of(applied: Option<Applied>) -> Outcome {
    match applied {
        Some(applied) => Outcome::Applied(Box::new(applied)),
        None => Outcome::AlreadyDone,
    }
}

/// Sleeps until `deadline` (a select branch guarded by `deadline.is_some()`).
async fn sleep_until_std(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Runs a store call, turning its error or its panic into a transient fault's cause.
fn guarded<T>(apply: impl FnOnce() -> Result<T, StoreError>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(apply)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(err.to_string()),
        Err(panic) => {
            let cause = panic
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(format!("panic while applying: {cause}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultSettings;
    use crate::model::{unix_ms_ceil, CommandBody};
    use crate::store::Intake;

    /// A consumer of `store` without faults, not started.
    fn consumer_of(store: Store, hub: Hub, metrics: &Metrics) -> (Consumer, ConsumerHandle) {
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
        _dir: tempfile::TempDir,
    }

    impl Running {
        async fn start() -> Self {
            let dir = tempfile::tempdir().expect("a temp dir");
            let store = Store::open(dir.path()).expect("a store");
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
        let settled = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("the consumer applies")
            .expect("an event");
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
        tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("the consumer applies")
            .expect("an event");
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

    /// The consumer alone, not started: its bookkeeping driven by hand.
    fn idle_consumer(dir: &std::path::Path) -> (Consumer, Lag) {
        let metrics = Metrics::new();
        let store = Store::open(dir).expect("a store");
        let (consumer, _) = consumer_of(store, Hub::new(), &metrics);
        (consumer, metrics.lag())
    }

    fn delivery(seq: u64, task_id: Uuid, due_at_ms: u64) -> Delivery {
        Delivery {
            seq,
            key: format!("k{seq}"),
            task_id,
            command_id: Uuid::now_v7(),
            due_at_ns: i128::from(due_at_ms) * 1_000_000,
        }
    }

    /// A command that fell due before its task's previous one (jitter, or that one's
    /// retries) waits for its turn, which is not lag; a task whose commands fell due
    /// together shows the lag of the last. (None of these commands is pending in the
    /// store, so each step just drops its command.)
    #[tokio::test]
    async fn a_command_waiting_for_its_turn_counts_as_due_from_its_predecessor() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (mut consumer, lag) = idle_consumer(dir.path());
        let later = unix_ms_ceil(OffsetDateTime::now_utc()) + 60_000;
        let secs = Duration::from_secs;
        let now = Instant::now();
        let in_range = |low: u64, high: u64| {
            let lag = lag.current();
            lag >= secs(low) && lag < secs(high)
        };

        // Two commands of a new task (seqs `first`, `first + 1`), whose timers fired
        // these many seconds ago.
        let pair = |consumer: &mut Consumer, first: u64, ago: [u64; 2]| {
            let task_id = Uuid::now_v7();
            for (seq, ago) in [first, first + 1].into_iter().zip(ago) {
                consumer.schedule(delivery(seq, task_id, later));
                consumer.fire(now - secs(ago), seq);
            }
        };

        // 1 and 2 fell due together, 20 s ago.
        pair(&mut consumer, 1, [20, 20]);
        assert_eq!(consumer.process_once(), 1, "the head, 1");
        assert!(in_range(20, 30), "1: {:?}", lag.current());
        assert_eq!(consumer.process_once(), 1, "then 2");
        assert!(
            in_range(20, 30),
            "2 waited as long as 1: {:?}",
            lag.current()
        );
        assert_eq!(consumer.process_once(), 0);
        assert_eq!(lag.current(), Duration::ZERO, "nothing waits");

        // 3 was retried: its timer fired 1 s ago; 4's at its own due time, 10 s ago.
        pair(&mut consumer, 3, [1, 10]);
        assert_eq!(consumer.process_once(), 1, "the head, 3");
        assert!(in_range(1, 10), "3: {:?}", lag.current());
        assert_eq!(consumer.process_once(), 1, "then 4");
        assert!(
            in_range(1, 10),
            "4 counts from 3, not from its own due time: {:?}",
            lag.current()
        );
    }

    /// A timer is set [`TIMER_LEAD`] before its deadline; when it expires it is armed,
    /// not due, and the thread sleeps until the deadline itself before the command may
    /// apply. A command dropped while armed leaves nothing armed.
    #[tokio::test]
    async fn a_timer_expires_early_and_fires_at_its_deadline() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (mut consumer, _) = idle_consumer(dir.path());
        let due_at_ms = unix_ms_ceil(OffsetDateTime::now_utc()) + 200;
        let task_id = Uuid::now_v7();
        consumer.schedule(delivery(1, task_id, due_at_ms));
        consumer.schedule(delivery(2, Uuid::now_v7(), due_at_ms));
        let Timer::Set(key, target) = consumer.scheduled[&1].timer else {
            panic!("a timer in the queue");
        };
        let early = consumer.timers.deadline(&key).into_std();
        // The queue rounds the early deadline up to its millisecond tick.
        assert!(
            early + TIMER_LEAD >= target && early + TIMER_LEAD < target + Duration::from_millis(1),
            "set {:?} before its deadline",
            target - early
        );

        // The queue expires both timers (here by hand, well before the deadline).
        consumer.expired(1);
        consumer.expired(2);
        assert_eq!(consumer.armed.len(), 2);
        assert_eq!(consumer.process_once(), 0, "armed, not due");
        consumer.forget(2);
        assert_eq!(consumer.armed.len(), 1, "a dropped command is disarmed");

        assert!(consumer.sleep_until_armed());
        assert!(Instant::now() >= target, "slept until the deadline");
        assert!(consumer.armed.is_empty());
        assert_eq!(consumer.scheduled[&1].due_since, Some(target));
        assert_eq!(consumer.process_once(), 1, "due at its deadline");
        assert!(!consumer.sleep_until_armed(), "nothing armed");
    }

    /// A command that reaches the consumer past its due time (resumed after a
    /// restart) counts from that time; a timer that expired but was not taken in yet
    /// counts too.
    #[tokio::test]
    async fn an_overdue_command_and_an_expired_timer_count_as_waiting() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (mut consumer, lag) = idle_consumer(dir.path());
        let now_ms = unix_ms_ceil(OffsetDateTime::now_utc());

        consumer.schedule(delivery(1, Uuid::now_v7(), now_ms - 3_000));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(consumer.process_once(), 0, "its timer not taken in yet");
        assert!(
            lag.current() >= Duration::from_millis(10),
            "the expired timer: {:?}",
            lag.current()
        );
        let expired = consumer.timers.next().await.expect("the timer");
        consumer.expired(expired.into_inner());
        assert_eq!(consumer.process_once(), 1);
        assert!(
            lag.current() >= Duration::from_secs(3),
            "due 3 s before it was scheduled: {:?}",
            lag.current()
        );
        assert_eq!(consumer.process_once(), 0);
        assert_eq!(lag.current(), Duration::ZERO);
    }
}
