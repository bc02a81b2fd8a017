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

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::bound::RefusalLog;
use self::segments::open_segment;
use super::frames::encode_frame;
use super::{Accepted, Refusal, Store, StoreError};
use crate::model::CommandRecord;

/// Most accepts written in one batch. Larger batches amortize the fsync further, but
/// every request in a batch waits for the whole batch.
pub const INTAKE_BATCH_MAX: usize = 512;
/// How many accepts may wait for the writer. When it is full, handlers wait for room
/// (backpressure); nothing is dropped.
pub const INTAKE_CAPACITY: usize = 8_192;
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
        let bytes = encode_frame(&mut self.buffer, self.segment, &record)?;
        self.store
            .pending_table()
            .insert(record.clone(), self.segment, bytes);
        Ok(Accepted::New(record))
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
mod tests {
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use uuid::Uuid;

    use super::segments::{segment_path, spare_path, SEGMENT_SUFFIX};
    use super::*;
    use crate::lag::Lag;
    use crate::store::frames::{decode_frames, list_files};
    use crate::store::Overload;

    pub(super) fn record(key: &str) -> CommandRecord {
        CommandRecord {
            seq: 1,
            ..CommandRecord::accepted(
                Uuid::now_v7(),
                key.to_owned(),
                key.to_owned(),
                crate::model::CommandBody::Like { delta: 1 },
                time::OffsetDateTime::now_utc(),
                0,
            )
        }
    }

    #[test]
    fn frames_round_trip_and_a_torn_or_damaged_tail_ends_the_segment() {
        let mut bytes = Vec::new();
        for key in ["a", "b", "c"] {
            encode_frame(&mut bytes, 7, &record(key)).expect("encodable");
        }
        let whole = bytes.len();
        let (payloads, intact) = decode_frames(&bytes, 7);
        assert_eq!(payloads.len(), 3);
        assert_eq!(intact, whole);

        // A crash in the middle of the third record's write.
        let (payloads, intact) = decode_frames(&bytes[..whole - 5], 7);
        assert_eq!(payloads.len(), 2);
        assert!(intact < whole - 5);

        // A flipped bit in the second record: nothing from there on is trusted.
        let second = intact - payloads[1].len() - 2;
        bytes[second] ^= 0x20;
        let (payloads, _) = decode_frames(&bytes, 7);
        assert_eq!(payloads.len(), 1);
    }

    #[test]
    fn a_recycled_file_shows_none_of_its_earlier_records() {
        let mut old_life = Vec::new();
        for key in ["a", "b", "c"] {
            encode_frame(&mut old_life, 3, &record(key)).expect("encodable");
        }
        // Reused as segment 9: one new record overwrites the start.
        let mut file = Vec::new();
        encode_frame(&mut file, 9, &record("new")).expect("encodable");
        let new_length = file.len();
        file.extend_from_slice(&old_life[new_length.min(old_life.len())..]);
        file.extend_from_slice(&old_life);
        let (payloads, intact) = decode_frames(&file, 9);
        assert_eq!(payloads.len(), 1);
        assert_eq!(intact, new_length);
        assert!(decode_frames(&old_life, 9).0.is_empty());
        assert!(
            decode_frames(&[0; 64], 9).0.is_empty(),
            "zeros end a segment"
        );
    }

    #[test]
    fn a_batch_whose_write_fails_is_refused_with_its_replays_and_leaves_nothing_pending() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let earlier = record("earlier");
        store.pending_table().insert(earlier.clone(), 1, 100);
        let durable = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&durable);
        // A write to a pipe at an offset fails (ESPIPE): a stand-in for a failed write.
        let (_reader, pipe) = io::pipe().expect("a pipe");
        let (_sender, inbox) = mpsc::channel(1);
        let mut writer = IntakeWriter {
            store: store.clone(),
            inbox,
            on_durable: Box::new(move |records: &[CommandRecord]| {
                seen.lock()
                    .unwrap()
                    .extend(records.iter().map(|r| r.command_id));
            }),
            file: File::from(std::os::fd::OwnedFd::from(pipe)),
            segment: 1,
            written: 0,
            buffer: Vec::new(),
            bound: PendingBound::none(),
            refusing: Arc::default(),
            refusal_log: RefusalLog::default(),
        };
        let mut reused = record("new");
        reused.fingerprint = "another request".to_owned();
        let requests = [record("new"), record("new"), reused, earlier.clone()];
        let (batch, answers): (Vec<_>, Vec<_>) = requests
            .into_iter()
            .map(|record| {
                let (reply, answer) = oneshot::channel();
                ((record, reply), answer)
            })
            .unzip();

        writer.write_batch(batch);

        let answers: Vec<_> = answers
            .into_iter()
            .map(|answer| answer.blocking_recv().expect("an answer"))
            .collect();
        assert!(
            answers[..3].iter().all(Result::is_err),
            "the new command, its replay and its key's reuse are refused: {answers:?}"
        );
        assert!(
            matches!(&answers[3], Ok(Accepted::Replay(r)) if r.command_id == earlier.command_id),
            "a replay of a command from an earlier batch is still answered: {:?}",
            answers[3]
        );
        assert!(
            store.pending_command("new").is_none(),
            "nothing refused stays pending"
        );
        assert!(store.pending_command("earlier").is_some());
        assert!(
            durable.lock().unwrap().is_empty(),
            "nothing refused is scheduled"
        );
        assert_eq!(writer.written, 0);
        assert_eq!(
            store.pending_table().bytes,
            100,
            "the refused command's size is taken off again"
        );
    }

    /// A store whose segments 1 and 2 hold one pending command each ("a", "b"), with 3
    /// active, and the path of its intake directory.
    fn two_closed_segments(dir: &Path) -> (Store, PathBuf, [CommandRecord; 2]) {
        let store = Store::open(dir).expect("a store");
        let intake_dir = store.inner.intake_dir.clone();
        let (a, b) = (record("a"), record("b"));
        {
            let mut table = store.pending_table();
            table.active = 3;
            table.insert(a.clone(), 1, 0);
            table.insert(b.clone(), 2, 0);
        }
        for segment in [1, 2] {
            fs::write(segment_path(&intake_dir, segment), b"").expect("a segment");
        }
        (store, intake_dir, [a, b])
    }

    #[test]
    fn a_finished_segment_is_released_once_sled_s_file_is_synced() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (store, intake_dir, [a, _]) = two_closed_segments(dir.path());
        store.finish("a", a.command_id);
        assert!(
            segment_path(&intake_dir, 1).exists(),
            "not before the release"
        );
        assert!(
            store
                .release_finished_segments()
                .expect("released")
                .is_some(),
            "a sync, timed"
        );
        assert!(!segment_path(&intake_dir, 1).exists());
        assert!(spare_path(&intake_dir, 1).exists(), "kept as a spare");
        assert!(
            segment_path(&intake_dir, 2).exists(),
            "b is still unfinished"
        );
        assert!(
            store
                .release_finished_segments()
                .expect("nothing to release")
                .is_none(),
            "no sync when nothing is releasable"
        );
    }

    #[test]
    fn after_a_failed_sync_of_sled_s_file_no_segment_is_released_until_a_reboot() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (mut store, intake_dir, [a, b]) = two_closed_segments(dir.path());
        // fdatasync fails on a pipe (EINVAL): a stand-in for a sync that failed.
        let (pipe, _writer) = io::pipe().expect("a pipe");
        let unsyncable = File::from(std::os::fd::OwnedFd::from(pipe));
        let inner = Arc::get_mut(&mut store.inner).expect("the only handle");
        let sled_file = std::mem::replace(&mut inner.sled_file, unsyncable);

        store.finish("a", a.command_id);
        assert!(
            store.release_finished_segments().is_err(),
            "the sync failed"
        );
        assert!(segment_path(&intake_dir, 1).exists());

        // The file syncs again, but the pages of the failed writeback may be lost.
        Arc::get_mut(&mut store.inner)
            .expect("the only handle")
            .sled_file = sled_file;
        store.finish("b", b.command_id);
        assert!(store.release_finished_segments().is_err());
        assert!(segment_path(&intake_dir, 2).exists());
        // Seqs of the block reserved before go on; the next block is not reserved, so
        // accepts stop rather than hand out seqs a power loss could give out again.
        let block = super::super::SEQ_BLOCK;
        let handed_out = (0..=block).take_while(|_| store.next_seq().is_ok()).count();
        assert_eq!(
            handed_out as u64, block,
            "the block reserved at open, no more"
        );

        drop(store);
        let reopen = || {
            Store::open_waiting(
                dir.path(),
                std::time::Duration::from_secs(10),
                &tokio_util::sync::CancellationToken::new(),
            )
        };
        // In the same boot the page cache may hold what the disk lost.
        let marker = intake_dir.join("sync-failed");
        assert!(matches!(reopen(), Err(StoreError::SyncFailedThisBoot(path)) if path == marker));
        for segment in [1, 2] {
            assert!(
                segment_path(&intake_dir, segment).exists(),
                "kept: {segment}"
            );
        }

        // After a reboot (the marker names another boot) the start trusts the disk.
        let text = fs::read_to_string(&marker).expect("the marker");
        let cause = text.split_once('\n').map_or("", |(_, cause)| cause);
        fs::write(&marker, format!("an earlier boot\n{cause}")).expect("rewritten");
        drop(reopen().expect("the store reopens after a reboot"));
        assert!(!marker.exists(), "the start removes the marker");
        for segment in [1, 2] {
            assert!(
                !segment_path(&intake_dir, segment).exists(),
                "a new boot releases what it finds finished: {segment}"
            );
        }
    }

    #[test]
    fn a_rotation_makes_the_closed_segment_releasable_once_if_all_of_it_finished() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let active = store.pending_table().active;
        let (_sender, inbox) = mpsc::channel(1);
        let mut writer = IntakeWriter {
            store: store.clone(),
            inbox,
            on_durable: Box::new(|_: &[CommandRecord]| {}),
            file: open_segment(&store, active).expect("a segment"),
            segment: active,
            written: 0,
            buffer: Vec::new(),
            bound: PendingBound::none(),
            refusing: Arc::default(),
            refusal_log: RefusalLog::default(),
        };
        let (a, b) = (record("a"), record("b"));
        store.pending_table().insert(a.clone(), active, 0);
        store.finish("a", a.command_id);
        assert!(
            store.pending_table().releasable.is_empty(),
            "the active segment is never releasable"
        );

        writer.rotate().expect("rotated");
        assert_eq!(store.pending_table().releasable, [active]);
        store.pending_table().insert(b.clone(), active + 1, 0);
        writer.rotate().expect("rotated");
        assert_eq!(
            store.pending_table().releasable,
            [active],
            "b is unfinished in the closed segment"
        );
        store.finish("b", b.command_id);
        assert_eq!(store.pending_table().releasable, [active, active + 1]);
    }

    /// A fresh store and a writer bounded at `bound`, with the keys it hands on as
    /// durable. Bind `dir` (as `_dir`) where it is not used: left out of a pattern, the
    /// directory would be removed at once.
    struct Bounded {
        dir: tempfile::TempDir,
        store: Store,
        intake: Intake,
        thread: IntakeThread,
        durable: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Bounded {
        fn new(bound: PendingBound) -> Self {
            let dir = tempfile::tempdir().expect("a temp dir");
            let store = Store::open(dir.path()).expect("a store");
            let durable = Arc::new(std::sync::Mutex::new(Vec::new()));
            let seen = Arc::clone(&durable);
            let (intake, thread) = Intake::start(
                store.clone(),
                bound,
                Box::new(move |records: &[CommandRecord]| {
                    seen.lock()
                        .unwrap()
                        .extend(records.iter().map(|r| r.idempotency_key.clone()));
                }),
                CancellationToken::new(),
            )
            .expect("a writer");
            Self {
                dir,
                store,
                intake,
                thread,
                durable,
            }
        }

        /// At most `commands` pending commands, bytes unbounded.
        fn at_count(commands: usize) -> Self {
            Self::new(PendingBound {
                commands,
                ..PendingBound::none()
            })
        }
    }

    /// At its bound the intake refuses a new key and stores nothing of it, answers a
    /// known key as always, and takes new keys again once a pending command finishes.
    #[tokio::test]
    async fn at_max_pending_a_new_key_is_refused_and_stores_nothing() {
        let Bounded {
            dir,
            store,
            intake,
            thread,
            durable,
        } = Bounded::at_count(2);
        let accept = |key: &str| intake.accept(record(key));

        let a = match accept("a").await.expect("answered") {
            Accepted::New(a) => a,
            other => panic!("a is new: {other:?}"),
        };
        assert!(matches!(accept("b").await, Ok(Accepted::New(_))));
        let refused = accept("c").await;
        assert!(
            matches!(refused, Ok(Accepted::Overloaded(Refusal { pending: 2, bytes, bound: Overload::Commands, .. })) if bytes > 0),
            "{refused:?}"
        );
        assert!(store.pending_command("c").is_none(), "c is not pending");
        assert!(
            matches!(accept("a").await, Ok(Accepted::Replay(r)) if r.command_id == a.command_id),
            "a known key is answered as always"
        );

        store.finish("a", a.command_id);
        assert!(
            matches!(accept("c").await, Ok(Accepted::New(_))),
            "room again once a command finished"
        );
        assert!(intake.stop(thread).await);
        assert_eq!(*durable.lock().unwrap(), ["a", "b", "c"]);

        // The log holds three records: the refusal and the replay wrote nothing.
        let intake_dir = store.inner.intake_dir.clone();
        let mut logged = Vec::new();
        for segment in list_files(&intake_dir, SEGMENT_SUFFIX).expect("listed") {
            let bytes = fs::read(segment_path(&intake_dir, segment)).expect("readable");
            for payload in decode_frames(&bytes, segment).0 {
                let record: CommandRecord = serde_json::from_slice(payload).expect("a record");
                logged.push(record.idempotency_key);
            }
        }
        assert_eq!(logged, ["a", "b", "c"]);

        // After a restart all three are pending (a was finished in memory only, never
        // applied), counted at their records' sizes as the writer counted them.
        drop((intake, store));
        let store = Store::open(dir.path()).expect("reopened");
        let unapplied = store.unapplied();
        let sizes: usize = unapplied
            .iter()
            .map(|record| encode_frame(&mut Vec::new(), 1, record).expect("encodable"))
            .sum();
        assert_eq!(unapplied.len(), 3);
        assert_eq!(store.pending_table().bytes, sizes);
    }

    /// Beyond `--max-lag-ms` (the oldest command the consumer may apply has been due
    /// longer) a new key is refused, by the writer and then by the handlers, with the
    /// lag in the answer; a known key is answered as always; once the consumer has
    /// caught up, new keys are taken again.
    #[tokio::test]
    async fn beyond_max_lag_a_new_key_is_refused_until_the_consumer_catches_up() {
        let lag = Lag::new();
        let Bounded {
            dir: _dir,
            store,
            intake,
            thread,
            durable,
        } = Bounded::new(PendingBound {
            max_lag: Some(Duration::from_secs(1)),
            lag: lag.clone(),
            ..PendingBound::none()
        });
        let accept = |key: &str| intake.accept(record(key));
        let a = match accept("a").await.expect("answered") {
            Accepted::New(a) => a,
            other => panic!("a is new: {other:?}"),
        };

        let behind = || lag.waiting_since(Some(Instant::now() - Duration::from_millis(1500)));
        behind();
        let refused = accept("b").await;
        assert!(
            matches!(refused, Ok(Accepted::Overloaded(Refusal { pending: 1, lag_ms, bound: Overload::Lag, .. })) if lag_ms >= 1500),
            "refused: {refused:?}"
        );
        assert!(store.pending_command("b").is_none(), "b is not pending");
        assert!(
            matches!(accept("a").await, Ok(Accepted::Replay(r)) if r.command_id == a.command_id),
            "a known key is answered as always"
        );

        lag.waiting_since(Some(Instant::now()));
        assert!(
            matches!(accept("b").await, Ok(Accepted::New(_))),
            "taken again within the bound"
        );

        // Once the writer has refused, the handlers refuse by the lag too: with the
        // writer gone (which would answer `Stopped`), a new key is still `Overloaded`.
        behind();
        assert!(matches!(accept("c").await, Ok(Accepted::Overloaded(_))));
        assert!(intake.stop(thread).await);
        let refused = accept("d").await;
        assert!(
            matches!(refused, Ok(Accepted::Overloaded(Refusal { pending: 2, lag_ms, bound: Overload::Lag, .. })) if lag_ms >= 1500),
            "refused by a handler: {refused:?}"
        );
        assert_eq!(*durable.lock().unwrap(), ["a", "b"]);
    }

    /// Once the writer refuses, a handler refuses a certainly new key itself: with the
    /// writer stopped, a new key is still answered `Overloaded`, while a pending key
    /// (whose replay waits for its record to be durable) still needs the writer.
    #[tokio::test]
    async fn while_refusing_a_new_key_is_refused_without_the_writer() {
        let Bounded {
            dir: _dir,
            intake,
            thread,
            ..
        } = Bounded::at_count(1);
        assert!(matches!(
            intake.accept(record("a")).await,
            Ok(Accepted::New(_))
        ));
        assert!(!intake.refusing.load(Ordering::Relaxed), "not refusing yet");
        assert!(matches!(
            intake.accept(record("b")).await,
            Ok(Accepted::Overloaded(Refusal { pending: 1, .. }))
        ));
        assert!(
            intake.refusing.load(Ordering::Relaxed),
            "the writer refused"
        );
        assert!(intake.stop(thread).await);

        let refused = intake.accept(record("c")).await;
        assert!(
            matches!(
                refused,
                Ok(Accepted::Overloaded(Refusal { pending: 1, .. }))
            ),
            "refused without the writer: {refused:?}"
        );
        assert!(
            matches!(intake.accept(record("a")).await, Err(IntakeError::Stopped)),
            "a pending key is the writer's to answer"
        );
    }

    /// While refusing, a retry of a finished key is still the writer's to answer: the
    /// handlers refuse only what the table shows to be new.
    #[tokio::test]
    async fn while_refusing_a_finished_key_is_replayed() {
        let Bounded {
            dir: _dir,
            store,
            intake,
            thread,
            ..
        } = Bounded::at_count(1);
        let Ok(Accepted::New(a)) = intake.accept(record("a")).await else {
            panic!("a is new");
        };
        // Its like finds no task: it finishes failed, a finished record all the same.
        let applied = store
            .apply_batch(
                &[(&a, &super::super::Decision::Apply)],
                time::OffsetDateTime::now_utc(),
            )
            .expect("applied");
        store.log_applied(applied.iter().flatten()).expect("logged");
        store.finish("a", a.command_id);
        assert!(matches!(
            intake.accept(record("b")).await,
            Ok(Accepted::New(_))
        ));
        assert!(matches!(
            intake.accept(record("c")).await,
            Ok(Accepted::Overloaded(_))
        ));
        assert!(intake.refusing.load(Ordering::Relaxed), "refusing");

        let retry = intake.accept(record("a")).await;
        assert!(
            matches!(&retry, Ok(Accepted::Replay(r)) if r.command_id == a.command_id),
            "the finished command, not a refusal: {retry:?}"
        );
        assert!(matches!(
            intake.accept(record("c")).await,
            Ok(Accepted::Overloaded(_))
        ));
        assert!(intake.stop(thread).await);
    }

    /// The bound on bytes: records count at their size in the log, and a new key is
    /// refused once they reach it, whatever their number; a finished one frees its size.
    #[tokio::test]
    async fn at_max_pending_bytes_a_new_key_is_refused() {
        let Bounded {
            dir: _dir,
            store,
            intake,
            thread,
            ..
        } = Bounded::new(PendingBound {
            bytes: 1,
            ..PendingBound::none()
        });
        let a = match intake.accept(record("a")).await {
            Ok(Accepted::New(a)) => a,
            other => panic!("below the bound: {other:?}"),
        };
        let size = store.pending_table().bytes;
        let mut frame = Vec::new();
        let encoded = encode_frame(&mut frame, 1, &a).expect("encodable");
        assert_eq!(size, encoded, "a record counts at its frame's size");
        let refused = intake.accept(record("b")).await;
        assert!(
            matches!(refused, Ok(Accepted::Overloaded(Refusal { pending: 1, bytes, bound: Overload::Bytes, .. })) if bytes == size),
            "{refused:?}"
        );
        store.finish("a", a.command_id);
        assert_eq!(store.pending_table().bytes, 0);
        assert!(matches!(
            intake.accept(record("b")).await,
            Ok(Accepted::New(_))
        ));
        assert!(intake.stop(thread).await);
    }

    /// A writer that panics stops the server: it cancels the shutdown, the accept that
    /// met it fails instead of waiting forever, and `stop` reports it.
    #[tokio::test]
    async fn a_panic_of_the_writer_starts_the_shutdown_and_stop_reports_it() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let shutdown = CancellationToken::new();
        let (intake, thread) = Intake::start(
            store.clone(),
            PendingBound::none(),
            Box::new(|_: &[CommandRecord]| {}),
            shutdown.clone(),
        )
        .expect("a writer");
        store.poison_pending_table();
        assert!(matches!(
            intake.accept(record("a")).await,
            Err(IntakeError::Stopped)
        ));
        tokio::time::timeout(Duration::from_secs(10), shutdown.cancelled())
            .await
            .expect("the writer starts the shutdown");
        assert!(!intake.stop(thread).await, "stop reports the panic");
    }

    impl Store {
        /// Poisons the pending table's lock, as a panic while holding it would: the writer
        /// panics at its next look at the table.
        fn poison_pending_table(&self) {
            let store = self.clone();
            let poisoner = std::thread::spawn(move || {
                let _held = store.inner.pending.lock();
                panic!("poisoning the pending table's lock (a test)");
            });
            assert!(poisoner.join().is_err());
        }
    }
}
