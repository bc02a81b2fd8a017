//! The intake log: where an accepted command becomes durable before its 202.
//!
//! Why not a sled transaction per accept batch (the first design): measured under load
//! (BENCHMARKS.md), it cost about a third of the server's CPU per command: B-tree
//! inserts into three trees, a log buffer sealed per transaction and written by sled's
//! I/O threads. A command that has only been accepted needs none of that. It needs to be
//! on disk, findable by its idempotency key, and resumable after a crash. So:
//!
//! - One thread ([`IntakeWriter`]) owns the log. It takes every request waiting (up to
//!   [`INTAKE_BATCH_MAX`]), looks each key up (the pending table, then the finished
//!   commands), gives each new command its seq, appends the new commands, and makes
//!   the batch durable with one write and one `fdatasync` (group commit). Its cycle is
//!   the pipeline's latency, so finished segments are recycled (renamed and
//!   overwritten, as PostgreSQL recycles WAL files): overwriting allocated blocks leaves
//!   `fdatasync` no file size or extent to journal, which measured about 40% faster
//!   here with a much shorter tail. Only then does it answer every request of the
//!   batch and hand the new commands on (to the consumer, through a hook). Because
//!   one thread stores every key, a key twice in a batch, or a duplicate that races
//!   the original, is one command.
//! - Accepted but unapplied commands are held in memory, in the pending table, for
//!   lookups by key and id and for the consumer. The consumer decides the finished
//!   command record with the row change and the event; once they are durable against
//!   a crash (the apply log, `apply_log`) and readable (`unwritten`, until a
//!   checkpoint writes them to sled) it calls [`Store::finish`]. A closed segment
//!   whose commands have all finished becomes a spare (or is deleted when there are
//!   enough spares) by a checkpoint (`checkpoint`), which the consumer begins after a
//!   step, once it has written the applies to sled and sled's flush and an
//!   `fdatasync` of its files have made them
//!   durable against a power loss too, which neither the apply log nor sled's own
//!   flush does (`Inner::sync_sled_files`).
//! - The finished commands are in sled, but the writer must not read sled for every new
//!   key: a sled read waits for a checkpoint's running transaction (see the
//!   store's module docs), and with it every accept of the batch. So the pending table
//!   also counts the finished keys by hash (filled on start by a scan of sled's
//!   finished records, so a start takes time in proportion to them; counted up by
//!   [`Store::finish`], down by compaction): a key whose hash is not there has no
//!   finished record, and only a key whose hash is there (a retry, or a collision:
//!   about n in 2^32 for n finished keys) is looked up in sled. It costs 10–21 bytes
//!   of memory per finished command within its retention.
//! - The pending table is bounded ([`PendingBound`]): while it holds as many commands,
//!   or as many bytes of their records, as the bound allows, or (with a `max_lag`) the
//!   consumer applies further behind due times than that, a new key is answered
//!   [`Accepted::Overloaded`] and nothing of it is stored (a known key is answered as
//!   always). The writer decides the first refusal; until it takes a new key again,
//!   the handlers refuse the keys the table shows to be new themselves, without the
//!   hand-offs to its thread ([`Intake::accept`]). Recovery is not bounded: every
//!   logged command is pending again, also beyond a bound lowered since, and new keys
//!   wait until the backlog is below it.
//! - On start, every segment is read back: a command that has no finished record in
//!   sled is pending again, in acceptance order (and one whose key has another
//!   command's record wins over it: see [`Store::recover_intake`]).
//!
//! Format: `intake/{segment:020}.log` in the data directory (spares:
//! `{old segment:020}.spare`), a sequence of records `[payload length: u32 LE]
//! [CRC-32 of the segment number (u64 LE) and the payload: u32 LE][payload:
//! CommandRecord JSON]`. Keying the checksum by the segment number makes the stale
//! records of a recycled file invalid in its new life. A batch is acknowledged only
//! after its fsync, so a torn record (a crash mid-write) can only be at the end of the
//! written part and was never acknowledged: recovery stops reading a segment at the
//! first record that is short, empty or fails its checksum.
//!
//! Layout: this file owns the handle handlers accept through ([`Intake`]) and the
//! writer thread; `pending` the pending table, `segments` the segment files (their
//! names, recovery on start, release), `bound` the pending bound and the log of its
//! refusals.

mod bound;
mod pending;
mod segments;

pub use self::bound::PendingBound;
pub(super) use self::pending::PendingTable;
pub(super) use self::segments::release_segment;

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::bound::RefusalLog;
use self::segments::open_segment;
use super::frames::encode_frame;
use super::{Accepted, Refusal, Store, StoreError};
use crate::model::{unix_ms_ceil, CommandRecord};

/// Most accepts written in one batch. Larger batches amortize the fsync further, but
/// every request in a batch waits for the whole batch.
pub const INTAKE_BATCH_MAX: usize = 512;
/// How many accepts may wait for the writer. When it is full, handlers wait for room
/// (backpressure); nothing is dropped.
pub const INTAKE_CAPACITY: usize = 8_192;
/// The furthest a command's acceptance time is moved to keep acceptance times rising
/// with the seqs (`IntakeWriter::keep_acceptance_order`): handlers racing each other
/// are microseconds apart; a clock set back further is taken as it is.
pub const ACCEPTANCE_REORDER_MAX: time::Duration = time::Duration::SECOND;
/// A segment is closed and a new one started once it holds this many bytes. Small
/// enough that segments finish (and can be recycled) soon after they close.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

/// Why an accept did not reach the log.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer has stopped (the server is shutting down) or dropped the request.
    #[error("the intake writer did not take the command")]
    Stopped,
}

type Reply = oneshot::Sender<Result<Accepted, StoreError>>;

// Every message but the last is an accept: boxing it would add an allocation per
// command to save space in a channel of accepts.
#[allow(clippy::large_enum_variant)]
enum Request {
    Accept(CommandRecord, Reply),
    /// Finish what was sent before, then exit.
    Stop,
}

/// Called by the writer with each batch's new commands once they are durable, before
/// their requests are answered: it must not block for long.
pub type OnDurable = Box<dyn FnMut(&[CommandRecord]) + Send>;

/// Cheap `Clone` handle through which request handlers accept commands.
#[derive(Clone)]
pub struct Intake {
    sender: mpsc::Sender<Request>,
    store: Store,
    bound: PendingBound,
    /// Set by the writer while it refuses new keys (its last new key was refused),
    /// cleared when it takes one again: while set, a handler refuses a new key itself
    /// ([`Intake::accept`]).
    refusing: Arc<AtomicBool>,
}

/// The writer thread; stop it with [`Intake::stop`].
pub struct IntakeThread(thread::JoinHandle<()>);

/// What the writer found under a key ([`IntakeWriter::look_up`]).
#[allow(
    clippy::large_enum_variant,
    reason = "a return value, moved once: boxing the record would cost an allocation per known key"
)]
enum Lookup {
    /// A command, pending or finished.
    Known(CommandRecord),
    /// None; `over` is the refusal if a bound (waiting commands, their bytes, the
    /// consumer's lag) is reached.
    New { over: Option<Refusal> },
}

/// The thread that owns the intake log.
struct IntakeWriter {
    store: Store,
    inbox: mpsc::Receiver<Request>,
    on_durable: OnDurable,
    file: File,
    segment: u64,
    /// Bytes of the active segment that are durable.
    written: u64,
    buffer: Vec<u8>,
    /// New keys are refused while this bound is reached.
    bound: PendingBound,
    /// The latest acceptance time given to a command ([`Self::keep_acceptance_order`]).
    last_accepted_at: OffsetDateTime,
    /// Whether the last new key the writer decided was refused, shared with the
    /// handlers ([`Intake::refusing`]); only the writer changes it. A refusal is logged
    /// when it starts and when it ends, not per request.
    refusing: Arc<AtomicBool>,
    refusal_log: RefusalLog,
}

impl Intake {
    /// Opens the active log segment and starts the writer thread. `on_durable` sees
    /// the new commands of each batch once they are durable (the consumer schedules
    /// them there, so a command whose client went away is not forgotten). While
    /// `bound` is reached, a new key is answered [`Accepted::Overloaded`] and nothing
    /// is stored; a known key is answered as always. A panic of the writer
    /// cancels `shutdown`: a server whose intake is gone can accept nothing.
    ///
    /// # Errors
    /// When the segment cannot be created.
    pub fn start(
        store: Store,
        bound: PendingBound,
        on_durable: OnDurable,
        shutdown: CancellationToken,
    ) -> Result<(Self, IntakeThread), StoreError> {
        let segment = store.pending_table().active;
        let file = open_segment(&store, segment)?;
        let (sender, inbox) = mpsc::channel(INTAKE_CAPACITY);
        let refusing = Arc::new(AtomicBool::new(false));
        let intake = Self {
            sender,
            store: store.clone(),
            bound: bound.clone(),
            refusing: Arc::clone(&refusing),
        };
        let writer = IntakeWriter {
            store,
            inbox,
            on_durable,
            file,
            segment,
            written: 0,
            buffer: Vec::with_capacity(64 * 1024),
            last_accepted_at: OffsetDateTime::UNIX_EPOCH,
            bound,
            refusing,
            refusal_log: RefusalLog::default(),
        };
        let handle = thread::Builder::new()
            .name("settle-intake".to_owned())
            .spawn(move || crate::stopping_on_panic("intake writer", &shutdown, || writer.run()))?;
        Ok((intake, IntakeThread(handle)))
    }

    /// Stores a new command under its idempotency key, or finds the command already
    /// there. Answers once the answer is durable: a new command is on disk, and so is
    /// the original of a replay.
    ///
    /// While the writer is refusing, a key the pending table shows to be new is
    /// refused here, from memory, as the writer would refuse it now: shedding load
    /// costs a look at the table instead of two hand-offs between threads. Every other
    /// accept, and every refusal until the writer has made one, is the writer's to
    /// decide. Once the bound has room, the next new key goes to the writer again,
    /// which takes it and clears the flag. One difference from the writer's order: a
    /// retry whose first request is still queued for the writer (its client gave up
    /// waiting) can be refused here before the writer stores that first request; the
    /// 503 asks for another retry under the same key, which then finds the command.
    ///
    /// # Errors
    /// When the log cannot be written, or the writer has stopped.
    pub async fn accept(&self, record: CommandRecord) -> Result<Accepted, IntakeError> {
        if self.refusing.load(Ordering::Relaxed) {
            // A poisoned table (the writer panicked holding it) is left to the writer's
            // channel, which answers `Stopped`: no panic in a handler.
            let waiting = self
                .store
                .inner
                .pending
                .lock()
                .ok()
                .and_then(|table| table.waiting_if_new(&record.idempotency_key));
            if let Some(refusal) = waiting.and_then(|waiting| self.bound.refusal(waiting)) {
                return Ok(Accepted::Overloaded(refusal));
            }
        }
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Request::Accept(record, reply))
            .await
            .map_err(|_| IntakeError::Stopped)?;
        Ok(answer.await.map_err(|_| IntakeError::Stopped)??)
    }

    /// Lets the writer finish every request sent before, then waits for its thread.
    /// Call once no handler can call [`Intake::accept`] any more (after the HTTP server
    /// has drained), so that no accepted request is left without an answer. `false`
    /// when the writer panicked.
    pub async fn stop(&self, thread: IntakeThread) -> bool {
        let _ = self.sender.send(Request::Stop).await;
        crate::join_thread(thread.0, "intake writer").await
    }
}

impl IntakeWriter {
    fn run(mut self) {
        let mut requests = Vec::with_capacity(INTAKE_BATCH_MAX);
        let mut stopping = false;
        while !stopping {
            let Some(first) = self.inbox.blocking_recv() else {
                break;
            };
            requests.push(first);
            while requests.len() < INTAKE_BATCH_MAX {
                match self.inbox.try_recv() {
                    Ok(request) => requests.push(request),
                    Err(_) => break,
                }
            }
            let mut batch = Vec::with_capacity(requests.len());
            for request in requests.drain(..) {
                match request {
                    Request::Accept(record, reply) => batch.push((record, reply)),
                    Request::Stop => stopping = true,
                }
            }
            if !batch.is_empty() {
                self.write_batch(batch);
            }
        }
        tracing::debug!("intake writer stopped");
    }

    /// Decides, writes and syncs one batch, then answers it.
    fn write_batch(&mut self, batch: Vec<(CommandRecord, Reply)>) {
        self.buffer.clear();
        let mut answers: Vec<_> = batch
            .into_iter()
            .map(|(record, reply)| (reply, self.admit(record)))
            .collect();
        if !self.buffer.is_empty() {
            if let Err(err) = self.append() {
                tracing::error!(error = %err, segment = self.segment, "intake write failed; the batch is refused");
                let mut refused = HashSet::new();
                for (_, answer) in &mut answers {
                    let refuse = match answer {
                        Ok(Accepted::New(record)) => {
                            self.store
                                .pending_table()
                                .remove(&record.idempotency_key, record.command_id);
                            refused.insert(record.command_id);
                            true
                        }
                        // A replay of a refused command comes after it in the batch and
                        // is refused too: it refers to nothing durable.
                        Ok(Accepted::Replay(record) | Accepted::KeyReused(record)) => {
                            refused.contains(&record.command_id)
                        }
                        Ok(Accepted::Overloaded(_)) | Err(_) => false,
                    };
                    if refuse {
                        *answer = Err(StoreError::Io(io::Error::new(err.kind(), err.to_string())));
                    }
                }
            }
        }
        let durable: Vec<_> = answers
            .iter()
            .filter_map(|(_, answer)| match answer {
                Ok(Accepted::New(record)) => Some(record.clone()),
                _ => None,
            })
            .collect();
        if !durable.is_empty() {
            (self.on_durable)(&durable);
        }
        for (reply, answer) in answers {
            // The handler may have gone (client disconnected): the command is stored
            // all the same and answers its key's retry.
            let _ = reply.send(answer);
        }
        if self.written >= SEGMENT_BYTES {
            if let Err(err) = self.rotate() {
                tracing::error!(error = %err, "cannot start a new intake segment; appending to the old one");
            }
        }
    }

    /// The answer for one record: the command already under its key, a refusal while
    /// a bound is reached, or a new command (given its seq) appended to the batch's
    /// buffer and entered in the pending table.
    fn admit(&mut self, mut record: CommandRecord) -> Result<Accepted, StoreError> {
        let over = match self.look_up(&record.idempotency_key)? {
            Lookup::Known(existing) if existing.fingerprint == record.fingerprint => {
                return Ok(Accepted::Replay(existing))
            }
            Lookup::Known(existing) => return Ok(Accepted::KeyReused(existing)),
            Lookup::New { over } => over,
        };
        // Only this thread writes the flag: a load then a store, no read-modify-write.
        let refusing = self.refusing.load(Ordering::Relaxed);
        if let Some(refusal) = over {
            if !refusing {
                self.refusing.store(true, Ordering::Relaxed);
                self.refusal_log.started(&refusal);
            }
            return Ok(Accepted::Overloaded(refusal));
        }
        if refusing {
            self.refusing.store(false, Ordering::Relaxed);
            self.refusal_log.ended();
        }
        record.seq = self.store.next_seq()?;
        self.keep_acceptance_order(&mut record);
        let bytes = encode_frame(&mut self.buffer, self.segment, &record)?;
        self.store
            .pending_table()
            .insert(record.clone(), self.segment, bytes);
        Ok(Accepted::New(record))
    }

    /// Acceptance times rise with the seqs. The task list is in the order of its creates'
    /// seqs, and a client sees none of them, only each create's `accepted_at` (its 202,
    /// its event): with the two in the same order, a client can place a task it learns
    /// of where the list has it. Two handlers may stamp their commands in the other
    /// order than they reach this thread, microseconds apart; the later seq's time then
    /// moves to a nanosecond after the one before, and its due time by as much. A clock
    /// set back further than [`ACCEPTANCE_REORDER_MAX`] is taken as it is (logged):
    /// holding every command after the old time would delay each by the step.
    fn keep_acceptance_order(&mut self, record: &mut CommandRecord) {
        let behind = self.last_accepted_at - record.accepted_at;
        if behind >= ACCEPTANCE_REORDER_MAX {
            tracing::warn!(%behind, "the clock went back; acceptance times start over from it");
        } else if behind >= time::Duration::ZERO {
            let moved = self.last_accepted_at + time::Duration::nanoseconds(1);
            record.due_at_ms += unix_ms_ceil(moved) - unix_ms_ceil(record.accepted_at);
            record.accepted_at = moved;
        }
        self.last_accepted_at = record.accepted_at;
    }

    /// The command already under `key`: pending, or finished (logged, or in sled: read
    /// only when the finished keys' hashes say it may be there). For a new key, whether a bound
    /// is reached, by what waits as the same look at the table found it.
    fn look_up(&self, key: &str) -> Result<Lookup, StoreError> {
        let (may_be_finished, waiting) = {
            let table = self.store.pending_table();
            if let Some(pending) = table.by_key.get(key) {
                return Ok(Lookup::Known(pending.record.clone()));
            }
            (table.may_be_finished(key.as_bytes()), table.waiting())
        };
        if may_be_finished {
            if let Some(finished) = self.store.finished_command(key)? {
                return Ok(Lookup::Known(finished));
            }
        }
        Ok(Lookup::New {
            over: self.bound.refusal(waiting),
        })
    }

    /// Writes the buffer and syncs it. On failure, cuts the segment back to its last
    /// durable length, so that a refused batch cannot come back after a restart.
    fn append(&mut self) -> io::Result<()> {
        let result = self
            .file
            .write_all_at(&self.buffer, self.written)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.written += self.buffer.len() as u64;
                Ok(())
            }
            Err(err) => {
                if let Err(cut) = self
                    .file
                    .set_len(self.written)
                    .and_then(|()| self.file.sync_data())
                {
                    tracing::error!(error = %cut, "cannot cut the intake segment back");
                }
                Err(err)
            }
        }
    }

    /// Closes the active segment and starts the next one. If everything in the closed
    /// one has finished already, it is releasable now (a checkpoint the consumer's next
    /// step begins releases it, off the accept path).
    fn rotate(&mut self) -> Result<(), StoreError> {
        let next = self.segment + 1;
        self.file = open_segment(&self.store, next)?;
        let closed = std::mem::replace(&mut self.segment, next);
        self.written = 0;
        let mut table = self.store.pending_table();
        table.active = next;
        if table.unfinished.get(&closed).is_none_or(|&left| left == 0) {
            table.unfinished.remove(&closed);
            table.releasable.push(closed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
