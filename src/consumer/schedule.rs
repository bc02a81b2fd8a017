//! The consumer's scheduling state: each command's timer (set [`TIMER_LEAD`] early,
//! then armed until its deadline), its task's order (only the oldest unapplied command
//! of a task may apply) and the due set, and the messages that change them.

use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio_util::time::delay_queue;

use super::inbox::{Delivery, Message};
use super::{Consumer, TIMER_LEAD};

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

pub(super) struct Scheduled {
    pub(super) delivery: Delivery,
    /// Apply attempts that hit a transient fault so far.
    pub(super) failed_attempts: u32,
    /// Set after a lost delivery: the pending timer is a redelivery, which a client
    /// retry may bring forward.
    lost: bool,
    /// Set when the attempts are exhausted: the next step records the dead letter.
    pub(super) gave_up: Option<String>,
    timer: Timer,
    /// While in the due set: since when (its timer's deadline, or when a client's
    /// retry or the last attempt put it there), for the [`Lag`](crate::lag::Lag); never before its
    /// task's previous command was due ([`Consumer::forget`]).
    pub(super) due_since: Option<Instant>,
    /// How long past its due time the command reached the consumer (a restart, a slow
    /// hand-off): its first timer, set for now, counts from that much earlier.
    overdue: Duration,
}

impl Consumer {
    pub(super) fn handle(&mut self, message: Message) {
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

    pub(super) fn schedule(&mut self, delivery: Delivery) {
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
    pub(super) fn expired(&mut self, seq: u64) {
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
    pub(super) fn sleep_until_armed(&mut self) -> bool {
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

    pub(super) fn retry_later(&mut self, seq: u64, after: Duration, lost: bool) {
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
    pub(super) fn forget(&mut self, seq: u64) {
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
    pub(super) fn applicable(&self) -> Vec<u64> {
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
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use uuid::Uuid;

    use super::*;
    use crate::consumer::tests::consumer_of;
    use crate::hub::Hub;
    use crate::lag::Lag;
    use crate::metrics::Metrics;
    use crate::model::unix_ms_ceil;
    use crate::store::Store;

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
