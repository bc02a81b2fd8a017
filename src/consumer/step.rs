//! One apply step ([`Consumer::process_once`]): the applicable commands' faults drawn,
//! the batch decided and logged durably, then finished, projected and published; and
//! the checkpoints a step hands off to a thread of their own.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use time::OffsetDateTime;

use super::{Consumer, FIRST_BACKOFF, MAX_ATTEMPTS, MAX_BATCH, ROOM_RECHECK, TIMER_LEAD};
use crate::model::{unix_ms, CommandRecord, FailureReason};
use crate::store::{Applied, Checkpoint, Decision, Store, StoreError};

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
    pub(super) fn process_once(&mut self) -> usize {
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
    pub(super) fn begin_checkpoint(&mut self) {
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
                tracing::warn!("the applies not yet written to sled are at their bound, or the event ids reserved run short; the consumer waits for a checkpoint");
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
