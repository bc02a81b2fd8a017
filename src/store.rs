//! The durable store: the intake log of accepted commands, sled for everything
//! applied, and the in-memory projection that serves reads.
//!
//! A command's life in the store:
//! 1. Accepted: appended to the intake log (`intake`) and held in the pending table,
//!    durable (one fdatasync per batch) before its 202.
//! 2. Applied: a step decides each due command's finished record, row change and
//!    event from memory ([`Store::step`], `apply`); [`Store::log_applied`] makes the
//!    batch durable against a crash of the process (one `write(2)` to the apply log)
//!    and readable (the table of applies not yet in sled, `unwritten`); then the
//!    command leaves the pending table ([`Store::finish`]) and the projection moves.
//! 3. Checkpointed: every few thousand applies, a checkpoint writes them to sled in a
//!    few transactions, then flushes and syncs sled (`checkpoint`, `apply_log`).
//!
//! sled trees, all values JSON unless said otherwise:
//! - `records`, `commands`, `command_ids`, `dead_letters`: the finished commands, their
//!   records in chunks in event order and the indexes that point into them with 9-byte
//!   binary pointers (by idempotency key: with the pending table, the idempotency
//!   table); see `finished`.
//! - `tasks`: task id (16 bytes) -> [`TaskRow`].
//! - `events`: event id (u64 big-endian) -> the SSE frames of consecutive events from
//!   that one on, in a chunk of at most 6 KiB (`chunks`; a data directory from before
//!   chunks also holds values of one frame each, which are read as they are).
//! - `meta`: `last_event_id` -> u64 big-endian, so ids are never reused;
//!   `seq_reserved` -> u64 big-endian, the end of the block of seqs handed out from
//!   memory ([`Store::next_seq`]); `event_ids_reserved`, `event_ids_boot` and
//!   `event_id_holes`, the event ids reserved ahead and the ones a start skipped
//!   (`event_ids`); `records_chunked`, present once every finished
//!   record is in `records` (those of a data directory from before are moved on open).
//!   Like the seq allocator, both kinds of chunks are one way: an older build would
//!   send a chunk of events as one frame, and read no record through a pointer.
//!
//! Two costs dominate a durable write in sled 0.34, and both are paid per call, not per
//! byte: every transaction takes the process-wide write lock and seals the log buffer
//! (a synchronous `sync_file_range`) before and after its batch, and every `flush` waits
//! for its writes to leave the page cache (another `sync_file_range`; what that does
//! not cover is in [`Inner::sync_sled_files`]). So neither is paid per command, nor on
//! the consumer's thread: accepts do not write to sled (but once per block of seqs,
//! below), and a checkpoint's thread writes the consumer's applies in transactions of
//! hundreds (`unwritten`).
//!
//! That write lock has a second cost: once any transaction has run, every other sled
//! call (a `get`, an iterator step, `generate_id`) takes its read side, and so waits
//! for whatever transaction is running, a whole chunk of applies. So the accept path
//! and the consumer make such a call only where it cannot be avoided: seqs come from
//! memory ([`Store::next_seq`]; one sled write and sync per 65536 of them), and the
//! intake writer and a step ask sled for a key's finished record only when an
//! in-memory count of the finished keys' hashes says it may be there, that is for the
//! retry of a finished command (and a hash collision, about n in 2^32 for n finished
//! keys). Handlers read sled on the blocking pool ([`Store::blocking`]).
//!
//! Layout: `intake` (the accept log and its writer thread; in it `intake::pending` the
//! pending table, `intake::segments` the log's files, `intake::bound` the pending
//! bound and its refusals), `apply` (a step's decisions, and the sled writes that
//! record them), `apply_log` (what each step applied, until sled's checkpoint),
//! `unwritten` (the applies logged and not yet in sled), `checkpoint`, `chunks` (values
//! of consecutive ids as one sled value), `finished` (the finished commands in sled),
//! `frames` (the two logs' record format), `projection` (the read side), `retention`
//! (compaction), `event_ids` (ids reserved ahead, and the holes a power loss
//! leaves), `open` (opening and recovery), `durability` (sled's syncs, and the
//! state a failed one leaves), `sync_failure` (the marker of a failed sync that
//! outlives the process), `read` (the read API: finished commands, commands by id or
//! key, dead letters, the event log).

mod apply;
mod apply_log;
mod checkpoint;
mod chunks;
mod durability;
mod event_ids;
mod finished;
mod frames;
mod intake;
mod open;
mod projection;
mod read;
mod retention;
mod sync_failure;
mod unwritten;

pub use intake::{
    Intake, IntakeError, IntakeThread, OnDurable, PendingBound, INTAKE_BATCH_MAX, INTAKE_CAPACITY,
    SEGMENT_BYTES,
};

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use self::apply::Step;
use self::apply_log::ApplyLog;
pub use self::checkpoint::Checkpoint;
#[cfg(test)]
pub(crate) use self::event_ids::testing as event_ids_testing;
pub use self::event_ids::Hole;
use self::finished::FinishedTrees;
use self::intake::PendingTable;
use self::projection::Projection;
use self::unwritten::Unwritten;

use crate::hub::EventFrame;
use crate::model::{CommandRecord, FailureReason, Task};

const LAST_EVENT_ID: &[u8] = b"last_event_id";
const SEQ_RESERVED: &[u8] = b"seq_reserved";
/// Seqs reserved (and persisted) at a time; the reservation is one sled write and sync
/// ([`Inner::sync_sled`]).
const SEQ_BLOCK: u64 = 1 << 16;

/// What a store call can fail with: sled's errors, a record that does not parse, the
/// logs' file errors, and the states a start or a step can meet.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("store file: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A step reached the event ids reserved durably (`event_ids`): its command fails
    /// as a transient fault until a checkpoint reserves more.
    #[error("no event id past {0} is reserved yet")]
    EventIdUnreserved(u64),
    #[error("{0} is in use: another process holds its lock (is another settle running on it?)")]
    Locked(PathBuf),
    /// Shutdown began while a start waited for the directory's lock.
    #[error("stopped while waiting for the lock of {0}")]
    Stopped(PathBuf),
    /// A sync of sled's files failed earlier in this boot of the machine: see
    /// `sync_failure`.
    #[error("a sync of sled's files failed in this boot of the machine ({0} says what): the page cache may hold applies the disk lost, which a start would take as durable. Reboot, then start: the intake log applies again what the disk lacks. (Where the boot cannot be told, or to start anyway, delete that file.)")]
    SyncFailedThisBoot(PathBuf),
}

/// A task row as stored: the task plus the seq of the create command, which orders the
/// list (creation order, whatever ids clients chose). The task is shared: a snapshot
/// of every row takes a reference to each under the projection's lock, not a copy of
/// its notes (up to ~40 KiB), and a change makes a new one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskRow {
    pub seq: u64,
    pub task: Arc<Task>,
}

/// What [`Intake::accept`] found under the idempotency key.
#[derive(Debug)]
pub enum Accepted {
    /// The key was new: this record is now durable.
    New(CommandRecord),
    /// The same request was accepted before: answer with the stored record.
    Replay(CommandRecord),
    /// The key was used for a different request.
    KeyReused(CommandRecord),
    /// The key was new, but a bound of the intake is reached: nothing was stored, the
    /// client should try again later.
    Overloaded(Refusal),
}

/// Why a new key was refused ([`Accepted::Overloaded`]): the commands waiting to be
/// applied (`pending` of them, `bytes` of records), the consumer's lag behind their
/// due times, and the bound they met.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub pending: usize,
    pub bytes: usize,
    pub lag_ms: u64,
    pub bound: Overload,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            pending,
            bytes,
            lag_ms,
            bound,
        } = self;
        write!(f, "{pending} accepted commands ({bytes} bytes of records) wait to be applied, {lag_ms} ms behind their due times: beyond this server's bound on {bound}")
    }
}

/// Which bound a refused command met ([`Refusal`]); the first of them, if more than
/// one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overload {
    /// `--max-pending`.
    Commands,
    /// `--max-pending-bytes`.
    Bytes,
    /// `--max-lag-ms`.
    Lag,
}

impl std::fmt::Display for Overload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Commands => "waiting commands (--max-pending)",
            Self::Bytes => "their records' bytes (--max-pending-bytes)",
            Self::Lag => "the lag behind due times (--max-lag-ms)",
        })
    }
}

/// How the consumer decided a due command should end.
#[derive(Clone, Debug)]
pub enum Decision {
    /// Apply it against the current row (it may still fail: `not_found`, `conflict`).
    Apply,
    /// Fail it without touching the row.
    Fail(FailureReason, String),
}

/// The result of applying one command: decided ([`Step::apply`]), durable and readable
/// once [`Store::log_applied`].
#[derive(Clone, Debug)]
pub struct Applied {
    pub record: CommandRecord,
    pub frame: EventFrame,
    pub change: RowChange,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RowChange {
    None,
    Upsert(TaskRow),
    Remove(Uuid),
}

/// Cheap `Clone` handle to the store; cloning is shallow (an `Arc`).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    commands: sled::Tree,
    command_ids: sled::Tree,
    tasks: sled::Tree,
    events: sled::Tree,
    dead_letters: sled::Tree,
    records: sled::Tree,
    meta: sled::Tree,
    // A std lock: held only to copy rows in or out, never across an await.
    projection: RwLock<Projection>,
    // A std lock, for the same reason: every critical section is a map operation.
    pending: Mutex<PendingTable>,
    /// Appended to by the consumer's steps; moved on and let go of by checkpoints.
    /// Taken before `unwritten` where both are.
    apply_log: Mutex<ApplyLog>,
    /// The applies logged and not yet written to sled (`unwritten`).
    unwritten: RwLock<Unwritten>,
    /// Held by whoever writes `unwritten` to sled ([`Inner::write_unwritten`]).
    writer: Mutex<()>,
    /// Set while a checkpoint runs (`checkpoint`): one at a time.
    checkpointing: AtomicBool,
    /// Held by a compaction ([`Store::compact`]): one at a time, so that two never
    /// write the same chunk of events again from different ids.
    compacting: Mutex<()>,
    seqs: Mutex<Seqs>,
    intake_dir: PathBuf,
    /// sled's data file, opened read-only for [`Inner::sync_sled_files`] alone.
    sled_file: File,
    /// Where sled writes each item too large for its log, one file each.
    sled_blobs_dir: PathBuf,
    /// Set when an fdatasync of sled's files failed: see [`Inner::sync_sled_files`] and
    /// [`Store::sync_failed`].
    sled_sync_failed: AtomicBool,
    /// Set when a step's write to the apply log failed ([`Inner::mark_apply_log_failed`]):
    /// the server stops as for `sled_sync_failed`, but a start in the same boot is safe.
    apply_log_failed: AtomicBool,
    /// Held across [`Inner::sync_sled_files`]: the intake writer (a seq block) and a
    /// checkpoint's thread sync the same file, and the kernel reports a failed
    /// writeback to one `fdatasync` only; the other must see the failure marked.
    sync_lock: Mutex<()>,
    /// Cancelled with either flag set, for whoever waits ([`Store::sync_failed`]); the
    /// flags are what the hot paths read.
    sync_failure: CancellationToken,
    /// The runs of event ids no event holds (`event_ids`): set on open, then read only.
    event_id_holes: Vec<Hole>,
}

impl Inner {
    fn finished_trees(&self) -> FinishedTrees<'_> {
        FinishedTrees {
            commands: &self.commands,
            command_ids: &self.command_ids,
            dead_letters: &self.dead_letters,
            records: &self.records,
        }
    }
}

/// The seq allocator: `next` up to `reserved` may be handed out; `reserved` is durable
/// in `meta`, so after a restart every new seq is above every one ever handed out.
struct Seqs {
    next: u64,
    reserved: u64,
}

fn abort(err: impl Into<StoreError>) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(err.into())
}

fn flatten(err: TransactionError<StoreError>) -> StoreError {
    match err {
        TransactionError::Abort(err) => err,
        TransactionError::Storage(err) => StoreError::Sled(err),
    }
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let len = bytes.len().min(8);
    buf[8 - len..].copy_from_slice(&bytes[bytes.len() - len..]);
    u64::from_be_bytes(buf)
}

impl Store {
    /// Makes an apply step durable against a crash of the process (kill -9) and
    /// visible to reads: its applies ([`Store::step`]), in their order, appended to the
    /// apply log with one `write(2)` (see `apply_log`), then put in the table of applies
    /// a checkpoint writes to sled (`unwritten`). Nothing of a step may be published,
    /// and none of its commands [`Store::finish`]ed, before this returns.
    ///
    /// # Errors
    /// When the write fails, or a sync has failed, before or meanwhile. A failed write
    /// stops the server as a failed sync does ([`Inner::mark_apply_log_failed`]): the
    /// log may hold part of it, where a replay would stop, so nothing after it could be
    /// logged. Nothing of the step may be published.
    pub fn log_applied<'a>(
        &self,
        applied: impl IntoIterator<Item = &'a Applied>,
    ) -> Result<(), StoreError> {
        self.inner.check_synced()?;
        let step: Vec<&Applied> = applied.into_iter().collect();
        // Copied before the locks: readers wait for the table's.
        let entries = step.iter().map(|&applied| applied.clone()).collect();
        // Outside the log's lock, which a panic would poison: one consumer logs.
        self.inner.unwritten().assert_follows(&step);
        let mut log = self.inner.apply_log();
        match log.append(step.iter().copied()) {
            // Under the log's lock: a checkpoint that moves the log on takes the last
            // logged event id as what it must write, and so finds each logged apply
            // here (`checkpoint`).
            Ok(bytes) => self.inner.unwritten_mut().insert(entries, bytes),
            Err(err) => {
                drop(log);
                let err = io::Error::new(
                    err.kind(),
                    format!("a write to the apply log failed: {err}"),
                );
                self.inner.mark_apply_log_failed(&err);
                return Err(err.into());
            }
        }
        drop(log);
        // A sync that failed elsewhere meanwhile (the accept path) keeps the step from
        // being published too.
        Ok(self.inner.check_synced()?)
    }

    /// Whether the consumer should wait before its next step: the applies not yet
    /// written to sled have reached their bound (`unwritten`), and a checkpoint must
    /// write some first.
    pub fn unwritten_is_full(&self) -> bool {
        self.inner.unwritten().is_full()
    }

    /// A new sequence number: unique and increasing, also across restarts. From
    /// memory, except once per `SEQ_BLOCK` (65536) seqs, when the next block's end is
    /// written to sled and flushed before any seq of it is handed out. (sled's
    /// `generate_id` would take sled's global lock on every call, and so wait for any
    /// running apply batch.)
    ///
    /// One way: an older build, which took seqs from sled's generator, must not open a
    /// data directory this one has written (the generator was not advanced past the
    /// blocks handed out here).
    ///
    /// # Errors
    /// When the next block cannot be reserved durably.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        let mut seqs = self.inner.seqs.lock().expect("seq lock poisoned");
        if seqs.next == seqs.reserved {
            self.inner.check_synced()?;
            let reserved = seqs.reserved + SEQ_BLOCK;
            self.inner
                .meta
                .insert(SEQ_RESERVED, &reserved.to_be_bytes())?;
            self.inner.sync_sled()?;
            seqs.reserved = reserved;
        }
        let seq = seqs.next;
        seqs.next += 1;
        Ok(seq)
    }

    /// Runs `work` (sled calls) on the blocking pool and waits for it: any sled call
    /// waits for a running transaction (see the module docs), which an async
    /// worker, serving many connections, must not.
    ///
    /// # Errors
    /// `work`'s error, or [`StoreError::Task`] if it panicked.
    pub async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || work(&store)).await?
    }
}

#[cfg(test)]
mod tests;
