//! The durable store: the intake log of accepted commands, sled for everything
//! applied, and the in-memory projection that serves reads.
//!
//! A command's life in the store:
//! 1. Accepted: appended to the intake log (`intake`) and held in the pending table,
//!    durable (one fdatasync per batch) before its 202.
//! 2. Applied: one sled transaction per batch of due commands writes, for each, the
//!    finished command record, the row change and the event; after
//!    [`Store::log_applied`] (one `write(2)` of the batch to the apply log: durable
//!    against a crash of the process) the command leaves the pending table
//!    ([`Store::finish`]) and the projection moves. sled is flushed and synced at a
//!    checkpoint, every few thousand commands (`apply_log`).
//!
//! sled trees, all values JSON unless said otherwise:
//! - `commands`: idempotency key -> [`CommandRecord`] of a finished command; with the
//!   pending table, the idempotency table.
//! - `command_ids`: command id (16 bytes) -> idempotency key.
//! - `tasks`: task id (16 bytes) -> [`TaskRow`].
//! - `events`: event id (u64 big-endian) -> the finished SSE frame.
//! - `dead_letters`: seq (u64 big-endian) -> idempotency key.
//! - `expiries`: settled time (unix ms, u64 big-endian) and seq (u64 big-endian) ->
//!   idempotency key: the finished records in the order they expire, so compaction
//!   reads only what it removes. Applies append at its end.
//! - `meta`: `last_event_id` -> u64 big-endian, so ids are never reused;
//!   `seq_reserved` -> u64 big-endian, the end of the block of seqs handed out from
//!   memory ([`Store::next_seq`]); `expiries_indexed`, present once every finished
//!   record is in `expiries` (data directories from before that tree are indexed once,
//!   on open; like the seq allocator this is one way: records an older build writes
//!   afterwards have no entry and would never expire).
//!
//! Two costs dominate a durable write in sled 0.34, and both are paid per call, not per
//! byte: every transaction takes the process-wide write lock and seals the log buffer
//! (a synchronous `sync_file_range`) before and after its batch, and every `flush` waits
//! for its writes to leave the page cache (another `sync_file_range`; what that does
//! not cover is in [`Inner::sync_sled_files`]). So neither is paid per command: accepts
//! do not write to sled (but once per block of seqs, below), and the consumer applies
//! each step's batch in one transaction, made durable against a crash by the apply log
//! rather than a flush (`apply_log`).
//!
//! That write lock has a second cost: once any transaction has run, every other sled
//! call (a `get`, an iterator step, `generate_id`) takes its read side, and so waits
//! for whatever transaction is running, a whole apply batch. So the accept path makes
//! such a call only where it cannot be avoided: seqs come from memory
//! ([`Store::next_seq`]; one sled write and sync per 65536 of them), and the intake
//! writer asks sled for a key's finished record only when an in-memory count of the
//! finished keys' hashes says it may be there, that is for the retry of a finished
//! command (and a hash collision, about n in 2^32 for n finished keys). Handlers read
//! sled on the blocking pool ([`Store::blocking`]).
//!
//! Layout: `intake` (the accept log, its writer thread and the pending table),
//! `apply_log` (what each apply step wrote, until sled's checkpoint), `frames` (the
//! two logs' record format), `projection` (the read side), `retention` (compaction and
//! the `expiries` index).

mod apply_log;
mod checkpoint;
mod frames;
mod intake;
mod projection;
mod retention;
mod sync_failure;

pub use intake::{
    Intake, IntakeError, IntakeThread, OnDurable, PendingBound, INTAKE_BATCH_MAX, INTAKE_CAPACITY,
    SEGMENT_BYTES,
};

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};
use sled::Transactional;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::apply_log::ApplyLog;
pub use self::checkpoint::Checkpoint;
use self::intake::PendingTable;
use self::projection::Projection;
use self::retention::{expiry_key_for, FinishedTrees};

use crate::hub::EventFrame;
use crate::model::{
    unix_ms, CommandBody, CommandError, CommandRecord, CommandStatus, FailedEvent, FailureReason,
    SettledEvent, Task, EVENT_FAILED, EVENT_SETTLED,
};

const LAST_EVENT_ID: &[u8] = b"last_event_id";
const SEQ_RESERVED: &[u8] = b"seq_reserved";
/// Seqs reserved (and persisted) at a time; the reservation is one sled write and sync
/// ([`Inner::sync_sled`]).
const SEQ_BLOCK: u64 = 1 << 16;
/// The intake log's directory, inside the data directory.
const INTAKE_DIR: &str = "intake";
/// sled 0.34's data file in its directory (`Config::db_path`).
const SLED_FILE: &str = "db";
/// sled 0.34's directory of items too large for its log.
const SLED_BLOBS: &str = "blobs";
/// Pause between attempts to open a locked directory ([`Store::open_waiting`]).
const LOCK_RETRY: Duration = Duration::from_millis(10);

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
/// list (creation order, whatever ids clients chose).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskRow {
    pub seq: u64,
    pub task: Task,
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

/// The result of applying one command, committed but not yet necessarily durable.
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
    expiries: sled::Tree,
    meta: sled::Tree,
    // A std lock: held only to copy rows in or out, never across an await.
    projection: RwLock<Projection>,
    // A std lock, for the same reason: every critical section is a map operation.
    pending: Mutex<PendingTable>,
    /// Appended to by the consumer's steps; moved on and let go of by checkpoints.
    apply_log: Mutex<ApplyLog>,
    /// Set while a checkpoint runs (`checkpoint`): one at a time.
    checkpointing: AtomicBool,
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
}

impl Inner {
    /// Makes every sled write so far durable against a power loss, not only against a
    /// crash of the process: `flush`, then [`Inner::sync_sled_files`].
    fn sync_sled(&self) -> Result<(), StoreError> {
        self.flush_sled()?;
        self.sync_sled_files()?;
        Ok(())
    }

    /// sled's `flush`. A failed one counts as a failed sync (see
    /// [`Inner::sync_sled_files`]): retrying it would be the mistake PostgreSQL made
    /// until 2018, as the pages it could not write may now look clean.
    ///
    /// Also fails when a sync failed elsewhere (the accept path) while this flush ran:
    /// what it wrote may be published only if nothing has failed.
    fn flush_sled(&self) -> Result<(), StoreError> {
        self.check_sled_synced()?;
        if let Err(err) = self.db.flush() {
            self.mark_sync_failed(&err);
            return Err(err.into());
        }
        Ok(self.check_synced()?)
    }

    /// Records that sled's files could not be made durable: every later sync fails,
    /// [`Store::sync_failed`] completes (the server stops), and a marker keeps a start
    /// in this boot from trusting the page cache (`sync_failure`).
    fn mark_sync_failed(&self, cause: &dyn std::fmt::Display) {
        let first = !self.sled_sync_failed.swap(true, Ordering::AcqRel);
        self.sync_failure.cancel();
        if first {
            tracing::error!(error = %cause, "sled's files cannot be made durable; the server stops");
            sync_failure::record(&self.intake_dir, cause);
        }
    }

    /// `fdatasync` of sled's data file and of its blob files: what sled has written
    /// (every `flush` before this call) reaches the disk itself, with the files' sizes.
    ///
    /// sled 0.34's `flush` writes its log with `sync_file_range`, which waits for the
    /// data to leave the page cache but neither flushes the disk's write cache nor
    /// commits the file's size; its flusher thread `fsync`s the file every 500 ms. So
    /// a flushed apply survives a crash of the process (kill -9) at once, and a power
    /// loss only after that fsync. The intake log holds each command until its apply
    /// is durable in that stronger sense: a segment is released only after this call
    /// (see `intake`), and a seq block is reserved with [`Inner::sync_sled`]. sled
    /// writes an item over 128 KiB (a node of tasks with long notes) to a file of its
    /// own in `blobs/` and never syncs it, so those files, and the directory's
    /// entries, are synced here too; there are none unless such nodes exist.
    ///
    /// Once a sync fails (or a flush, [`Inner::flush_sled`]), every later call fails
    /// too: the kernel reports a failed writeback once, so a later success would not
    /// mean the earlier pages reached the disk (PostgreSQL's rule since 2018). The
    /// server stops at once (`serve` watches [`Store::sync_failed`]), and a start in
    /// the same boot refuses (`sync_failure`). Other errors (listing or opening a blob
    /// file) are not sticky.
    fn sync_sled_files(&self) -> io::Result<()> {
        let _one_at_a_time = self.sync_lock.lock().expect("sync lock poisoned");
        // Only a failed sync of sled's own files stops this one before it starts: after
        // a failed write to the apply log it still runs (its result is refused at the
        // end), so a writeback error on sled's files is seen and leaves its marker.
        self.check_sled_synced()?;
        let synced = |result: io::Result<()>| {
            result.map_err(|err| {
                let err = io::Error::new(
                    err.kind(),
                    format!("an fdatasync of sled's files failed: {err}"),
                );
                self.mark_sync_failed(&err);
                err
            })
        };
        synced(self.sled_file.sync_data())?;
        let dir = &self.sled_blobs_dir;
        let entries = match std::fs::read_dir(dir) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => return self.check_synced(),
            entries => entries?,
        };
        for entry in entries {
            match File::open(entry?.path()) {
                Ok(blob) => synced(blob.sync_data())?,
                // sled dropped it meanwhile: nothing left to sync.
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        synced(File::open(dir)?.sync_all())?;
        // A failure another sync was told of first (its mark under this lock) is one
        // this sync's success does not undo.
        self.check_synced()
    }

    /// Records that a step's write to the apply log failed: as after a failed sync,
    /// every later sync fails and the server stops, since the step is committed in
    /// sled and cannot be tried again; but no marker is left, as no page of sled's
    /// files was lost (a torn record at the log's end is never replayed, and was never
    /// published).
    fn mark_apply_log_failed(&self, cause: &dyn std::fmt::Display) {
        let first = !self.apply_log_failed.swap(true, Ordering::AcqRel);
        self.sync_failure.cancel();
        if first {
            tracing::error!(error = %cause, "the apply log cannot be written; the server stops");
        }
    }

    /// Whether a sync of sled's files, or a write to the apply log, has failed in this
    /// process.
    fn sync_has_failed(&self) -> bool {
        self.sled_sync_has_failed() || self.apply_log_has_failed()
    }

    /// Whether a sync of sled's files has failed in this process.
    fn sled_sync_has_failed(&self) -> bool {
        self.sled_sync_failed.load(Ordering::Acquire)
    }

    /// Whether a step's write to the apply log has failed in this process.
    fn apply_log_has_failed(&self) -> bool {
        self.apply_log_failed.load(Ordering::Acquire)
    }

    /// An error if a sync of sled's files, or a write to the apply log, has failed in
    /// this process (the sync first: it is what the operator must act on).
    fn check_synced(&self) -> io::Result<()> {
        self.check_sled_synced()?;
        if self.apply_log_has_failed() {
            Err(io::Error::other(
                "a write to the apply log failed; the server stops",
            ))
        } else {
            Ok(())
        }
    }

    /// An error if a sync of sled's files has failed in this process.
    fn check_sled_synced(&self) -> io::Result<()> {
        if self.sled_sync_has_failed() {
            Err(io::Error::other(
                "an fdatasync of sled's files failed; the server stops (see intake/sync-failed in the data directory)",
            ))
        } else {
            Ok(())
        }
    }

    fn finished_trees(&self) -> FinishedTrees<'_> {
        FinishedTrees {
            commands: &self.commands,
            command_ids: &self.command_ids,
            dead_letters: &self.dead_letters,
            expiries: &self.expiries,
        }
    }
}

impl Inner {
    /// Runs `apply` in one sled transaction over the trees an apply writes (and
    /// `meta`, for the last event id).
    fn apply_transaction<R>(
        &self,
        apply: impl Fn(
            &ApplyTrees<'_>,
            &TransactionalTree,
        ) -> ConflictableTransactionResult<R, StoreError>,
    ) -> Result<R, StoreError> {
        (
            &self.commands,
            &self.command_ids,
            &self.tasks,
            &self.events,
            &self.meta,
            &self.dead_letters,
            &self.expiries,
        )
            .transaction(
                |(commands, command_ids, tasks, events, meta, dead_letters, expiries)| {
                    let trees = ApplyTrees {
                        commands,
                        command_ids,
                        tasks,
                        events,
                        dead_letters,
                        expiries,
                    };
                    apply(&trees, meta)
                },
            )
            .map_err(flatten)
    }

    /// Writes again, in one transaction, the applies the apply log holds beyond sled's
    /// last event: those a crash of the last run kept from sled (see `apply_log`).
    ///
    /// Only those that run on from sled's last event without a gap. A gap means a
    /// record before it was lost (a power loss took the unsynced tail of a file the
    /// next one outlived) or an assumption of the replay broke; writing past it could
    /// apply a command twice. Every command after the gap is still in the intake log
    /// (no segment is released before a checkpoint covers it), so it applies again.
    ///
    /// # Errors
    /// On storage failure.
    fn replay(&self, logged: Vec<Applied>) -> Result<(), StoreError> {
        let last = self.meta.get(LAST_EVENT_ID)?.map_or(0, |v| read_u64(&v));
        let mut missing: Vec<Applied> = logged
            .into_iter()
            .filter(|applied| applied.frame.id > last)
            .collect();
        if let Some(gap) = (last + 1..)
            .zip(&missing)
            .position(|(expected, applied)| applied.frame.id != expected)
        {
            tracing::warn!(
                expected = last + 1 + gap as u64,
                found = missing[gap].frame.id,
                "the apply log has a gap; its applies after it are not written again, and their commands apply again from the intake log"
            );
            missing.truncate(gap);
        }
        let Some(newest) = missing.last().map(|applied| applied.frame.id) else {
            return Ok(());
        };
        self.apply_transaction(|trees, meta| {
            for applied in &missing {
                trees.displace(&applied.record)?;
                trees.write(applied)?;
            }
            meta.insert(LAST_EVENT_ID, &newest.to_be_bytes())?;
            Ok(())
        })?;
        tracing::info!(
            commands = missing.len(),
            last_event_id = newest,
            "wrote again the applies the last run logged but sled lost"
        );
        Ok(())
    }

    fn apply_log(&self) -> std::sync::MutexGuard<'_, ApplyLog> {
        self.apply_log.lock().expect("apply log lock poisoned")
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

/// Whether sled could not open a directory because its lock is held. sled 0.34 says
/// so only in the message.
fn is_locked(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::Other && err.to_string().contains("could not acquire lock")
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let len = bytes.len().min(8);
    buf[8 - len..].copy_from_slice(&bytes[bytes.len() - len..]);
    u64::from_be_bytes(buf)
}

impl Store {
    /// [`Store::open`], but while the directory is locked it tries again for up to
    /// `wait`, or until `stop` is cancelled. sled lets go of its lock only when its
    /// last background thread drops the last handle, a moment after the owner's own
    /// handle, so a store reopened in the same process (a restart in the tests) can
    /// find it still locked. A lock that another process holds is reported once `wait`
    /// has passed.
    ///
    /// # Errors
    /// [`StoreError::Locked`] when the lock is still held after `wait`,
    /// [`StoreError::Stopped`] when `stop` was cancelled first; otherwise as
    /// [`Store::open`].
    pub fn open_waiting(
        dir: &std::path::Path,
        wait: Duration,
        stop: &CancellationToken,
    ) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match Self::open(dir) {
                Err(StoreError::Sled(sled::Error::Io(err))) if is_locked(&err) => {
                    if stop.is_cancelled() {
                        return Err(StoreError::Stopped(dir.to_owned()));
                    }
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::Locked(dir.to_owned()));
                    }
                    std::thread::sleep(LOCK_RETRY);
                }
                opened => return opened,
            }
        }
    }

    /// Opens (or creates) the store in `dir`, loads the projection and reads the
    /// intake log back (every accepted, unapplied command is pending again).
    ///
    /// # Errors
    /// When sled cannot open the directory, the intake log cannot be read, or a stored
    /// record does not parse; [`StoreError::SyncFailedThisBoot`] when a sync of sled's
    /// files failed earlier in this boot of the machine.
    pub fn open(dir: &std::path::Path) -> Result<Self, StoreError> {
        Self::open_after_first_check(dir, || {})
    }

    /// [`Store::open`], running `first_checked` between its two checks for the marker
    /// of a failed sync: where the process that held the directory could leave one.
    fn open_after_first_check(
        dir: &std::path::Path,
        first_checked: impl FnOnce(),
    ) -> Result<Self, StoreError> {
        // Before sled's recovery, which may write, and again once sled holds the
        // directory's lock: the process that held it may have failed a sync meanwhile.
        let intake_dir = dir.join(INTAKE_DIR);
        sync_failure::check(&intake_dir)?;
        first_checked();
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let earlier_failure = sync_failure::check(&intake_dir)?;
        let (apply_log, logged) = ApplyLog::open(dir)?;
        let tree = |name: &str| db.open_tree(name);
        let mut inner = Inner {
            commands: tree("commands")?,
            command_ids: tree("command_ids")?,
            tasks: tree("tasks")?,
            events: tree("events")?,
            dead_letters: tree("dead_letters")?,
            expiries: tree("expiries")?,
            meta: tree("meta")?,
            projection: RwLock::new(Projection::default()),
            pending: Mutex::new(PendingTable::default()),
            apply_log: Mutex::new(apply_log),
            checkpointing: AtomicBool::new(false),
            seqs: Mutex::new(Seqs {
                next: 0,
                reserved: 0,
            }),
            intake_dir,
            sled_file: File::open(dir.join(SLED_FILE))?,
            sled_blobs_dir: dir.join(SLED_BLOBS),
            sled_sync_failed: AtomicBool::new(false),
            apply_log_failed: AtomicBool::new(false),
            sync_lock: Mutex::new(()),
            sync_failure: CancellationToken::new(),
            db,
        };
        inner.replay(logged)?;
        inner.index_expiries()?;
        let first_seq = match inner.meta.get(SEQ_RESERVED)? {
            Some(reserved) => read_u64(&reserved),
            // A data directory from before the allocator: its seqs came from sled's
            // generator, which answers above all of them.
            None => inner.db.generate_id()?,
        };
        // The first block now, not on the first accept (which would write and flush
        // sled on the intake writer's thread, just as recovered commands apply). Its
        // sync also makes durable everything the last run applied (a kill -9 may have
        // left it in the page cache, or only in the apply log), before recovery
        // releases the segments it finds finished; then the apply log's files are
        // no longer needed.
        let reserved = first_seq + SEQ_BLOCK;
        inner.meta.insert(SEQ_RESERVED, &reserved.to_be_bytes())?;
        inner.sync_sled()?;
        let apply_log = inner.apply_log.get_mut().expect("apply log lock poisoned");
        let replayed = apply_log.retired();
        apply_log::delete(&apply_log.release(&replayed));
        *inner.seqs.get_mut().expect("seq lock poisoned") = Seqs {
            next: first_seq,
            reserved,
        };
        let pending = Self::recover_intake(&inner)?;
        if let Some(marker) = earlier_failure {
            tracing::warn!(marker = %marker.display(), "a sync of sled's files failed before the last reboot; started from what the disk holds, and the intake log applies again what it lacked");
            std::fs::remove_file(marker)?;
        }
        *inner
            .pending
            .get_mut()
            .expect("pending table lock poisoned") = pending;
        let mut projection = Projection::default();
        projection.watermark = inner.meta.get(LAST_EVENT_ID)?.map_or(0, |v| read_u64(&v));
        for entry in inner.tasks.iter() {
            let (_, value) = entry?;
            projection.insert(serde_json::from_slice(&value)?);
        }
        *inner.projection.write().expect("projection lock poisoned") = projection;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Makes an apply step durable against a crash of the process (kill -9): what
    /// [`Store::apply_batch`] wrote for these applies, in their order, appended to the
    /// apply log with one `write(2)` (see `apply_log`). Nothing of a step may be
    /// published, and none of its commands [`Store::finish`]ed, before this returns.
    ///
    /// # Errors
    /// When the write fails, or a sync has failed, before or meanwhile. A failed write
    /// stops the server as a failed sync does ([`Inner::mark_apply_log_failed`]): the
    /// step is committed in sled, so it cannot be tried again. Nothing of the step may
    /// be published.
    pub fn log_applied<'a>(
        &self,
        applied: impl IntoIterator<Item = &'a Applied>,
    ) -> Result<(), StoreError> {
        self.inner.check_synced()?;
        if let Err(err) = self.inner.apply_log().append(applied) {
            let err = io::Error::new(
                err.kind(),
                format!("a write to the apply log failed: {err}"),
            );
            self.inner.mark_apply_log_failed(&err);
            return Err(err.into());
        }
        // As after a flush: a sync that failed elsewhere meanwhile (the accept path)
        // keeps the step from being published too.
        Ok(self.inner.check_synced()?)
    }

    /// Completes once a sync of sled's files has failed in this process (at once if one
    /// has), wherever it failed: an apply step's write to the apply log, a checkpoint
    /// (before a release of finished intake segments), a seq block's reservation on the
    /// accept path. From then on nothing more applies, is released or reserved, so the
    /// server cannot keep its promise and must stop: `serve` waits on this and stops
    /// it, also when nothing is pending.
    pub fn sync_failed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.inner.sync_failure.clone().cancelled_owned()
    }

    /// Whether a sync of sled's files has failed in this process ([`Store::sync_failed`]
    /// has completed or is about to): an atomic read, for the accept path, the
    /// consumer's steps and the exit status.
    pub fn sync_has_failed(&self) -> bool {
        self.inner.sync_has_failed()
    }

    /// Whether a sync of sled's files has failed in this process: then a marker
    /// refuses a start until the machine has rebooted (`sync_failure`).
    pub fn sled_sync_has_failed(&self) -> bool {
        self.inner.sled_sync_has_failed()
    }

    /// Whether a step's write to the apply log has failed in this process (no marker:
    /// the next start is safe).
    pub fn apply_log_has_failed(&self) -> bool {
        self.inner.apply_log_has_failed()
    }

    /// After a failed write to the apply log: flushes and syncs sled's files all the
    /// same, publishing and releasing nothing, so that a writeback error the disk holds
    /// for them (a full or failing disk fails both) is seen and leaves its marker; a
    /// start in this boot would otherwise trust the page cache. The consumer runs it
    /// when it stops. What failed is marked; nothing else is answered.
    pub fn sync_after_apply_log_failure(&self) {
        // Each refuses its result for the apply log's failure, after its sync ran.
        let _ = self.inner.flush_sled();
        let _ = self.inner.sync_sled_files();
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
    /// waits for a running apply transaction (see the module docs), which an async
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

    /// The finished (applied or failed) command under `key`, from sled.
    ///
    /// # Errors
    /// On storage failure or a corrupt record.
    pub fn finished_command(&self, key: &str) -> Result<Option<CommandRecord>, StoreError> {
        self.inner.finished_trees().record(key.as_bytes())
    }

    /// The command with this id, pending or finished. Pending first: a command leaves
    /// the pending table only once its sled record is durable, so one of the two looks
    /// finds it. Most lookups are of pending commands (clients poll those), answered
    /// from memory; only a miss goes to sled, on the blocking pool.
    ///
    /// # Errors
    /// On storage failure or a corrupt record.
    pub async fn command_by_id(
        &self,
        command_id: Uuid,
    ) -> Result<Option<CommandRecord>, StoreError> {
        match self.pending_by_id(command_id) {
            Some(record) => Ok(Some(record)),
            None => {
                self.blocking(move |store| store.finished_by_id(command_id))
                    .await
            }
        }
    }

    /// The finished command with this id, from sled: [`Store::command_by_id`] after
    /// its look in the pending table.
    ///
    /// # Errors
    /// On storage failure or a corrupt record.
    fn finished_by_id(&self, command_id: Uuid) -> Result<Option<CommandRecord>, StoreError> {
        match self.inner.command_ids.get(command_id.as_bytes())? {
            Some(key) => self.inner.finished_trees().record(&key),
            None => Ok(None),
        }
    }

    /// Dead-lettered commands, oldest first.
    ///
    /// # Errors
    /// On storage failure or a corrupt record.
    pub fn dead_letters(&self) -> Result<Vec<CommandRecord>, StoreError> {
        let mut records = Vec::new();
        for entry in self.inner.dead_letters.iter() {
            let (_, key) = entry?;
            if let Some(record) = self.inner.finished_trees().record(&key)? {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// Applies a batch of due commands in one transaction: for each, the row change,
    /// the finished command record (keyed by its idempotency key) with its id index,
    /// and the event appended to the log under the next id. One answer per command, in
    /// order: `None` when its key already has a finished record (applied before: at most
    /// once). Call with pending records, at most one per task, the oldest unapplied one
    /// (the consumer's per-task order); after [`Store::log_applied`], [`Store::finish`]
    /// each of them.
    ///
    /// # Errors
    /// On storage failure or a corrupt record; nothing of the batch is written then.
    pub fn apply_batch(
        &self,
        batch: &[(&CommandRecord, &Decision)],
        now: OffsetDateTime,
    ) -> Result<Vec<Option<Applied>>, StoreError> {
        self.inner.apply_transaction(|trees, meta| {
            let mut last_event_id = meta.get(LAST_EVENT_ID)?.map_or(0, |v| read_u64(&v));
            let mut applied = Vec::with_capacity(batch.len());
            for (record, decision) in batch {
                let outcome = trees.apply(record, decision, now, last_event_id + 1)?;
                if outcome.is_some() {
                    last_event_id += 1;
                }
                applied.push(outcome);
            }
            meta.insert(LAST_EVENT_ID, &last_event_id.to_be_bytes())?;
            Ok(applied)
        })
    }

    /// Up to `limit` events after `after`, in id order, but none past `up_to`.
    ///
    /// # Errors
    /// On storage failure.
    pub fn events_after(
        &self,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> Result<Vec<EventFrame>, StoreError> {
        if after >= up_to {
            return Ok(Vec::new());
        }
        let start = (after + 1).to_be_bytes();
        let end = up_to.to_be_bytes();
        let mut frames = Vec::new();
        for entry in self.inner.events.range(start..=end).take(limit) {
            let (id, bytes) = entry?;
            frames.push(EventFrame::from_log(read_u64(&id), &bytes));
        }
        Ok(frames)
    }
}

/// The trees one apply writes, inside its transaction.
struct ApplyTrees<'a> {
    commands: &'a TransactionalTree,
    command_ids: &'a TransactionalTree,
    tasks: &'a TransactionalTree,
    events: &'a TransactionalTree,
    dead_letters: &'a TransactionalTree,
    expiries: &'a TransactionalTree,
}

impl ApplyTrees<'_> {
    /// Applies one command as event `event_id`, or answers `None` when it is no longer
    /// pending.
    fn apply(
        &self,
        pending: &CommandRecord,
        decision: &Decision,
        now: OffsetDateTime,
        event_id: u64,
    ) -> ConflictableTransactionResult<Option<Applied>, StoreError> {
        let key = pending.idempotency_key.as_str();
        // Reads this transaction's own writes too: a key twice in one batch applies once.
        if self.commands.get(key.as_bytes())?.is_some() {
            return Ok(None);
        }
        let mut record = pending.clone();
        let current = match self.tasks.get(record.task_id.as_bytes())? {
            Some(bytes) => Some(serde_json::from_slice::<TaskRow>(&bytes).map_err(abort)?),
            None => None,
        };
        let outcome = match decision {
            Decision::Apply => decide(&record, current.as_ref(), now),
            Decision::Fail(reason, message) => Outcome::Failed(*reason, message.clone()),
        };
        let (frame, change) = match outcome {
            Outcome::Failed(reason, message) => {
                record.status = CommandStatus::Failed;
                record.error = Some(CommandError {
                    reason,
                    message: message.clone(),
                });
                let event = FailedEvent {
                    command_id: record.command_id,
                    idempotency_key: record.idempotency_key.clone(),
                    task_id: record.task_id,
                    kind: record.kind(),
                    reason,
                    message,
                    current: current.map(|row| row.task),
                };
                let frame = EventFrame::encode(event_id, EVENT_FAILED, &event).map_err(abort)?;
                (frame, RowChange::None)
            }
            Outcome::Changed(change) => {
                record.status = CommandStatus::Settled;
                let (version, task) = match &change {
                    RowChange::Upsert(row) => (row.task.version, Some(row.task.clone())),
                    RowChange::Remove(_) => {
                        (current.as_ref().map_or(0, |row| row.task.version) + 1, None)
                    }
                    RowChange::None => (current.as_ref().map_or(0, |row| row.task.version), None),
                };
                let event = SettledEvent {
                    command_id: record.command_id,
                    idempotency_key: record.idempotency_key.clone(),
                    task_id: record.task_id,
                    kind: record.kind(),
                    version,
                    task,
                    accepted_at: record.accepted_at,
                    settled_at: now,
                    window_ms: unix_ms(now).saturating_sub(unix_ms(record.accepted_at)),
                };
                let frame = EventFrame::encode(event_id, EVENT_SETTLED, &event).map_err(abort)?;
                (frame, change)
            }
        };
        record.settled_at = Some(now);
        record.event_id = Some(event_id);
        let applied = Applied {
            record,
            frame,
            change,
        };
        self.write(&applied)?;
        Ok(Some(applied))
    }

    /// Before a replayed apply is written: removes the indexes of another command's
    /// record under its key. That is an expired record whose removal by compaction
    /// sled lost with the apply (the key was free, so the logged command took it); its
    /// id must no longer find the key's new record (`recover_intake` repairs the same
    /// for a command that is still pending).
    fn displace(&self, record: &CommandRecord) -> ConflictableTransactionResult<(), StoreError> {
        let key = record.idempotency_key.as_bytes();
        let Some(bytes) = self.commands.get(key)? else {
            return Ok(());
        };
        let stale: CommandRecord = serde_json::from_slice(&bytes).map_err(abort)?;
        if stale.command_id == record.command_id {
            return Ok(());
        }
        tracing::warn!(command_id = %record.command_id, stale = %stale.command_id,
            "an expired command's record came back under a replayed command's key; deleting it");
        self.command_ids.remove(stale.command_id.as_bytes())?;
        self.dead_letters.remove(&stale.seq.to_be_bytes())?;
        if let Some(settled_at) = stale.settled_at {
            self.expiries
                .remove(&expiry_key_for(settled_at, stale.seq))?;
        }
        Ok(())
    }

    /// Writes what an apply decided: the row change, the finished record with its id
    /// and expiry indexes (and its dead letter), and the event. Every write is
    /// absolute, so writing an apply again (a replay of the apply log) is harmless.
    fn write(&self, applied: &Applied) -> ConflictableTransactionResult<(), StoreError> {
        let Applied {
            record,
            frame,
            change,
        } = applied;
        let key = record.idempotency_key.as_bytes();
        match change {
            RowChange::Upsert(row) => {
                self.tasks.insert(
                    row.task.id.as_bytes(),
                    serde_json::to_vec(row).map_err(abort)?,
                )?;
            }
            RowChange::Remove(id) => {
                self.tasks.remove(id.as_bytes())?;
            }
            RowChange::None => {}
        }
        let dead_lettered = record
            .error
            .as_ref()
            .is_some_and(|error| error.reason == FailureReason::DeadLettered);
        if dead_lettered {
            self.dead_letters.insert(&record.seq.to_be_bytes(), key)?;
        }
        self.commands
            .insert(key, serde_json::to_vec(record).map_err(abort)?)?;
        if let Some(settled_at) = record.settled_at {
            self.expiries
                .insert(&expiry_key_for(settled_at, record.seq), key)?;
        }
        self.command_ids.insert(record.command_id.as_bytes(), key)?;
        self.events
            .insert(&frame.id.to_be_bytes(), frame.bytes.as_ref())?;
        Ok(())
    }
}

enum Outcome {
    Changed(RowChange),
    Failed(FailureReason, String),
}

/// The state-dependent half of validation, at apply time.
fn decide(record: &CommandRecord, current: Option<&TaskRow>, now: OffsetDateTime) -> Outcome {
    let stale = |base: &Option<u64>, row: &TaskRow| match base {
        Some(base) if *base != row.task.version => Some(Outcome::Failed(
            FailureReason::Conflict,
            format!(
                "base_version {base} is not the current version {}",
                row.task.version
            ),
        )),
        _ => None,
    };
    let missing = || {
        Outcome::Failed(
            FailureReason::NotFound,
            format!("task {} does not exist", record.task_id),
        )
    };
    match (&record.body, current) {
        (CommandBody::Create { .. }, Some(_)) => Outcome::Failed(
            FailureReason::Conflict,
            format!("task {} already exists", record.task_id),
        ),
        (CommandBody::Create { title, notes }, None) => {
            Outcome::Changed(RowChange::Upsert(TaskRow {
                seq: record.seq,
                task: Task {
                    id: record.task_id,
                    title: title.clone(),
                    notes: notes.clone(),
                    done: false,
                    likes: 0,
                    version: 1,
                    updated_at: now,
                },
            }))
        }
        (_, None) => missing(),
        (
            CommandBody::Update {
                title,
                notes,
                done,
                base_version,
            },
            Some(row),
        ) => stale(base_version, row).unwrap_or_else(|| {
            let mut row = row.clone();
            if let Some(title) = title {
                row.task.title = title.clone();
            }
            if let Some(notes) = notes {
                row.task.notes = notes.clone();
            }
            if let Some(done) = done {
                row.task.done = *done;
            }
            row.task.version += 1;
            row.task.updated_at = now;
            Outcome::Changed(RowChange::Upsert(row))
        }),
        (CommandBody::Delete { base_version }, Some(row)) => {
            stale(base_version, row).unwrap_or(Outcome::Changed(RowChange::Remove(row.task.id)))
        }
        (CommandBody::Like { delta }, Some(row)) => {
            let mut row = row.clone();
            row.task.likes += delta;
            row.task.version += 1;
            row.task.updated_at = now;
            Outcome::Changed(RowChange::Upsert(row))
        }
    }
}

#[cfg(test)]
impl Store {
    /// As if an fdatasync of sled's files had failed (see [`Inner::sync_sled_files`]).
    pub(crate) fn fail_sled_sync(&self) {
        self.inner
            .mark_sync_failed(&"a sync failure a test injected");
    }
}

#[cfg(test)]
mod tests {
    use super::retention::{COMPACT_CHUNK, EXPIRIES_INDEXED};
    use super::*;
    use crate::model::CommandBody;

    fn create(key: &str, fingerprint: &str, store: &Store) -> CommandRecord {
        let body = CommandBody::Create {
            title: key.to_owned(),
            notes: String::new(),
        };
        CommandRecord {
            seq: store.next_seq().expect("an id"),
            ..CommandRecord::accepted(
                Uuid::now_v7(),
                key.to_owned(),
                fingerprint.to_owned(),
                body,
                OffsetDateTime::now_utc(),
                0,
            )
        }
    }

    /// Accepts every record through the intake writer, sending them all before the
    /// writer answers any, so they can share a batch. Returns the answers in order and
    /// the commands the writer handed on as durable.
    async fn accept_all(store: &Store, records: &[CommandRecord]) -> (Vec<Accepted>, Vec<Uuid>) {
        let durable = Arc::new(Mutex::new(Vec::new()));
        let handed_on = durable.clone();
        let (intake, thread) = Intake::start(
            store.clone(),
            PendingBound::none(),
            Box::new(move |records| {
                let ids = records.iter().map(|record| record.command_id);
                handed_on.lock().unwrap().extend(ids);
            }),
            CancellationToken::new(),
        )
        .expect("an intake writer");
        let answers =
            futures::future::join_all(records.iter().map(|record| intake.accept(record.clone())))
                .await
                .into_iter()
                .map(|answer| answer.expect("accepted"))
                .collect();
        intake.stop(thread).await;
        let durable = durable.lock().unwrap().clone();
        (answers, durable)
    }

    /// An intake writer with no bound, whose durable batches go nowhere.
    fn idle_writer(store: &Store) -> (Intake, IntakeThread) {
        Intake::start(
            store.clone(),
            PendingBound::none(),
            Box::new(|_| {}),
            CancellationToken::new(),
        )
        .expect("a writer")
    }

    /// Opens the store in `dir` again, once sled's threads have let go of it.
    fn reopen(dir: &std::path::Path) -> Store {
        Store::open_waiting(dir, Duration::from_secs(10), &CancellationToken::new())
            .expect("the store reopens")
    }

    /// Accepts a new command under `key` and applies it, as the consumer would: it is
    /// finished, its record durable in sled.
    async fn accept_and_apply(store: &Store, key: &str, fingerprint: &str) -> CommandRecord {
        let record = create(key, fingerprint, store);
        let mut applied = accept_and_apply_all(
            store,
            &[(record, Decision::Apply)],
            OffsetDateTime::now_utc(),
        )
        .await;
        applied.remove(0).1
    }

    /// Accepts each new command and applies them, each as decided, as one batch at
    /// `now`, as the consumer would. Answers each record as accepted and as finished.
    async fn accept_and_apply_all(
        store: &Store,
        commands: &[(CommandRecord, Decision)],
        now: OffsetDateTime,
    ) -> Vec<(CommandRecord, CommandRecord)> {
        let records: Vec<_> = commands.iter().map(|(record, _)| record.clone()).collect();
        let (answers, _) = accept_all(store, &records).await;
        let accepted: Vec<_> = answers
            .into_iter()
            .map(|answer| match answer {
                Accepted::New(record) => record,
                other => panic!("a new key is a new command, not {other:?}"),
            })
            .collect();
        let batch: Vec<_> = accepted
            .iter()
            .zip(commands)
            .map(|(record, (_, decision))| (record, decision))
            .collect();
        let applied = store.apply_batch(&batch, now).expect("applied");
        store.log_applied(applied.iter().flatten()).expect("logged");
        accepted
            .into_iter()
            .zip(applied)
            .map(|(record, applied)| {
                store.finish(&record.idempotency_key, record.command_id);
                (record, applied.expect("pending, so applied").record)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_key_twice_in_one_intake_batch_is_one_command() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let first = create("k", "same", &store);
        let replay = create("k", "same", &store);
        let other = create("k", "different", &store);
        let (answers, durable) = accept_all(&store, &[first.clone(), replay, other]).await;
        assert!(matches!(&answers[0], Accepted::New(r) if r.command_id == first.command_id));
        assert!(matches!(&answers[1], Accepted::Replay(r) if r.command_id == first.command_id));
        assert!(matches!(&answers[2], Accepted::KeyReused(r) if r.command_id == first.command_id));
        assert_eq!(durable, [first.command_id], "one command handed on");
        assert_eq!(store.unapplied().len(), 1);
    }

    #[tokio::test]
    async fn accepted_commands_survive_a_reopen_until_they_finish() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let records = {
            let store = Store::open(dir.path()).expect("a store");
            let records: Vec<_> = ["a", "b", "c"]
                .iter()
                .map(|key| create(key, key, &store))
                .collect();
            accept_all(&store, &records).await;
            records
        };

        // Reopened: all three pending, in acceptance order, findable by id.
        let store = reopen(dir.path());
        let unapplied: Vec<_> = store.unapplied().iter().map(|r| r.command_id).collect();
        let ids: Vec<_> = records.iter().map(|r| r.command_id).collect();
        assert_eq!(unapplied, ids);
        assert_eq!(
            store.command_by_id(ids[1]).await.unwrap().map(|r| r.status),
            Some(CommandStatus::Pending)
        );
        // A replay of a recovered command is a replay, not a second command.
        let (answers, durable) = accept_all(&store, &records[..1]).await;
        assert!(matches!(&answers[0], Accepted::Replay(r) if r.command_id == ids[0]));
        assert!(durable.is_empty());

        // Two of them apply; the third stays pending across the next reopen.
        let now = OffsetDateTime::now_utc();
        let batch = [
            (&records[0], &Decision::Apply),
            (&records[1], &Decision::Apply),
        ];
        let applied = store.apply_batch(&batch, now).expect("applied");
        store.log_applied(applied.iter().flatten()).expect("logged");
        for record in &records[..2] {
            store.finish(&record.idempotency_key, record.command_id);
        }
        drop(store);
        let store = reopen(dir.path());
        let unapplied: Vec<_> = store.unapplied().iter().map(|r| r.command_id).collect();
        assert_eq!(unapplied, [ids[2]]);
        assert_eq!(
            store.command_by_id(ids[0]).await.unwrap().map(|r| r.status),
            Some(CommandStatus::Settled)
        );
    }

    #[tokio::test]
    async fn a_segment_is_recycled_once_all_its_commands_finished() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let record = create("only", "only", &store);
        accept_all(&store, std::slice::from_ref(&record)).await;
        drop(store);
        let files = |suffix: &str| {
            let mut names: Vec<_> = std::fs::read_dir(dir.path().join(INTAKE_DIR))
                .unwrap()
                .map(|entry| entry.unwrap().file_name().into_string().unwrap())
                .filter(|name| name.ends_with(suffix))
                .collect();
            names.sort();
            names
        };
        // The reopen starts a new active segment beside the old one, which still holds
        // an unfinished command.
        let store = reopen(dir.path());
        let (intake, thread) = idle_writer(&store);
        assert_eq!(files(".log").len(), 2);
        let applied = store
            .apply_batch(&[(&record, &Decision::Apply)], OffsetDateTime::now_utc())
            .expect("applied");
        store.log_applied(applied.iter().flatten()).expect("logged");
        store.finish(&record.idempotency_key, record.command_id);
        assert_eq!(
            files(".log").len(),
            2,
            "released after the step, not at once"
        );
        let begun = store
            .begin_checkpoint()
            .expect("no failure")
            .expect("due: a finished segment waits");
        // Due again (another segment waits), yet not begun while the first runs.
        store.pending_table().releasable.push(u64::MAX);
        assert!(
            store.begin_checkpoint().expect("no failure").is_none(),
            "one checkpoint at a time"
        );
        assert_eq!(store.pending_table().releasable.pop(), Some(u64::MAX));
        // Dropped unrun (its thread could not start): the segment waits for the next.
        drop(begun);
        store.release_finished_segments().expect("released");
        assert_eq!(files(".log").len(), 1, "only the active segment is left");
        assert_eq!(
            files(".spare").len(),
            1,
            "the finished one is kept for reuse"
        );
        intake.stop(thread).await;
        drop((intake, store));

        // Next start: the last run's (empty) active segment is released too, then a
        // spare becomes the new active segment; the old record in it (of another
        // segment number) is not read as a pending command.
        let store = reopen(dir.path());
        assert!(store.unapplied().is_empty());
        assert_eq!((files(".log").len(), files(".spare").len()), (0, 2));
        let (intake, thread) = idle_writer(&store);
        assert_eq!((files(".log").len(), files(".spare").len()), (1, 1));
        intake.stop(thread).await;
        drop((intake, store));
        let store = reopen(dir.path());
        assert!(store.unapplied().is_empty());
    }

    #[tokio::test]
    async fn a_finished_key_answers_its_retries_also_after_a_reopen_until_compacted() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let accepted = &accept_and_apply(&store, "k", "f").await;
        assert!(store.unapplied().is_empty(), "no longer pending");

        // The retry finds the finished command, not a free key.
        let retries = [create("k", "f", &store), create("k", "other", &store)];
        let (answers, durable) = accept_all(&store, &retries).await;
        assert!(matches!(&answers[0], Accepted::Replay(r)
            if r.command_id == accepted.command_id && r.status == CommandStatus::Settled));
        assert!(
            matches!(&answers[1], Accepted::KeyReused(r) if r.command_id == accepted.command_id)
        );
        assert!(durable.is_empty());
        drop(store);

        // So does a retry after a restart; a new key is still new.
        let store = reopen(dir.path());
        let (answers, _) = accept_all(
            &store,
            &[create("k", "f", &store), create("j", "f", &store)],
        )
        .await;
        assert!(matches!(&answers[0], Accepted::Replay(r) if r.command_id == accepted.command_id));
        assert!(matches!(&answers[1], Accepted::New(_)));

        // Past its retention the key is free again.
        let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
        assert_eq!(store.compact(u64::MAX, later).expect("compacted").1, 1);
        let (answers, _) = accept_all(&store, &[create("k", "f", &store)]).await;
        assert!(matches!(&answers[0], Accepted::New(r) if r.command_id != accepted.command_id));
    }

    /// Compaction, an hour on, removes every finished record; a new command takes the
    /// freed key `k`.
    async fn retake_after_compaction(store: &Store) -> CommandRecord {
        let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
        store.compact(u64::MAX, later).expect("compacted");
        let (answers, _) = accept_all(store, &[create("k", "f", store)]).await;
        match answers.into_iter().next() {
            Some(Accepted::New(new)) => new,
            other => panic!("the freed key is a new command, not {other:?}"),
        }
    }

    /// Puts `old`'s record (`bytes`), id index and expiry entry back under `k`, as a
    /// crash that lost compaction's removal of them would.
    fn bring_back(store: &Store, old: &CommandRecord, bytes: sled::IVec) {
        let inner = &store.inner;
        let entry = expiry_key_for(old.settled_at.expect("settled"), old.seq);
        inner.commands.insert("k", bytes).unwrap();
        inner
            .command_ids
            .insert(old.command_id.as_bytes(), "k")
            .unwrap();
        inner.expiries.insert(entry, "k").unwrap();
    }

    #[tokio::test]
    async fn a_logged_command_wins_over_an_expired_record_whose_removal_was_lost() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let old = &accept_and_apply(&store, "k", "f").await;
        let old_bytes = store.inner.commands.get("k").unwrap().expect("finished");

        // Compaction frees the key, a new command takes it; then the removal is lost
        // (as in a crash before sled flushed it): the old record is back.
        let new = &retake_after_compaction(&store).await;
        // The old record's expiry entry too: it went in the same transaction.
        let old_entry = expiry_key_for(old.settled_at.expect("settled"), old.seq);
        assert!(!store.inner.expiries.contains_key(old_entry).unwrap());
        bring_back(&store, old, old_bytes);
        store.checkpoint().expect("synced");
        drop(store);

        let store = reopen(dir.path());
        let unapplied: Vec<_> = store.unapplied().iter().map(|r| r.command_id).collect();
        assert_eq!(
            unapplied,
            [new.command_id],
            "the 202'd command is pending again"
        );
        assert!(store.command_by_id(old.command_id).await.unwrap().is_none());
        assert!(!store.inner.expiries.contains_key(old_entry).unwrap());
        let (answers, _) = accept_all(&store, &[create("k", "f", &store)]).await;
        assert!(matches!(&answers[0], Accepted::Replay(r) if r.command_id == new.command_id));
    }

    #[tokio::test]
    async fn compaction_removes_exactly_the_records_settled_before_the_cutoff() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let now = OffsetDateTime::now_utc();
        let cutoff = now - time::Duration::hours(1);
        let ms = time::Duration::milliseconds(1);
        let dead_lettered = || Decision::Fail(FailureReason::DeadLettered, "gave up".to_owned());
        let commands = |prefix: &str, count: usize, dead: bool| -> Vec<_> {
            (0..count)
                .map(|i| {
                    let record = create(&format!("{prefix}-{i}"), "f", &store);
                    let decision = if dead && i == 0 {
                        dead_lettered()
                    } else {
                        Decision::Apply
                    };
                    (record, decision)
                })
                .collect()
        };
        // More than two removal chunks, one of them dead-lettered; then one just before
        // the cutoff; these go. One at the cutoff, one after it, and two now stay.
        let mut gone = accept_and_apply_all(
            &store,
            &commands("old", 2 * COMPACT_CHUNK + 5, true),
            now - time::Duration::hours(2),
        )
        .await;
        gone.extend(accept_and_apply_all(&store, &commands("before", 1, false), cutoff - ms).await);
        let mut kept = accept_and_apply_all(&store, &commands("at", 1, false), cutoff).await;
        kept.extend(accept_and_apply_all(&store, &commands("after", 1, false), cutoff + ms).await);
        kept.extend(accept_and_apply_all(&store, &commands("new", 2, true), now).await);
        assert_eq!(store.dead_letters().expect("listed").len(), 2);

        assert_eq!(
            store.compact(u64::MAX, cutoff).expect("compacted"),
            (0, gone.len())
        );
        assert_eq!(store.compact(u64::MAX, cutoff).expect("compacted"), (0, 0));

        // Gone under every index, and from the count of finished keys; the rest stay.
        let inner = &store.inner;
        let trees = [
            &inner.commands,
            &inner.command_ids,
            &inner.dead_letters,
            &inner.expiries,
        ];
        assert_eq!(trees.map(|tree| tree.len()), [4, 4, 1, 4]);
        for (accepted, finished) in &gone {
            assert!(store
                .command_by_id(finished.command_id)
                .await
                .unwrap()
                .is_none());
            assert!(!store
                .pending_table()
                .may_be_finished(accepted.idempotency_key.as_bytes()));
        }
        for (_, finished) in &kept {
            assert!(store
                .command_by_id(finished.command_id)
                .await
                .unwrap()
                .is_some());
        }
        let dead: Vec<_> = store
            .dead_letters()
            .expect("listed")
            .iter()
            .map(|r| r.command_id)
            .collect();
        assert_eq!(dead, [kept[2].1.command_id]);
        // A removed key is free for a new command; a kept one still answers its retry.
        let retries = [&gone[0], &gone[gone.len() - 1], &kept[0]]
            .map(|(accepted, _)| create(&accepted.idempotency_key, "f", &store));
        let (answers, _) = accept_all(&store, &retries).await;
        assert!(matches!(&answers[0], Accepted::New(_)));
        assert!(matches!(&answers[1], Accepted::New(_)));
        assert!(matches!(&answers[2], Accepted::Replay(r) if r.command_id == kept[0].0.command_id));
    }

    #[tokio::test]
    async fn an_expiry_entry_removes_only_the_record_it_was_written_for() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let now = OffsetDateTime::now_utc();
        let current = accept_and_apply(&store, "k", "f").await;
        // An entry from long ago under the same key: not this record's (another time,
        // another seq), as an older build could have left behind.
        let stale = expiry_key_for(now - time::Duration::hours(3), current.seq + 1);
        store.inner.expiries.insert(stale, "k").unwrap();

        assert_eq!(
            store
                .compact(u64::MAX, now - time::Duration::hours(1))
                .expect("compacted"),
            (0, 0)
        );
        assert!(
            !store.inner.expiries.contains_key(stale).unwrap(),
            "the stale entry goes"
        );
        assert!(
            store
                .command_by_id(current.command_id)
                .await
                .unwrap()
                .is_some(),
            "the record stays"
        );

        // A removal that finds the record already gone (and its key taken by a new
        // command) removes nothing of the new one.
        let trees = store.inner.finished_trees();
        assert_eq!(
            trees
                .remove(&[], std::slice::from_ref(&current))
                .expect("removed"),
            [true]
        );
        let newer = accept_and_apply(&store, "k", "f").await;
        assert_eq!(
            trees
                .remove(&[], std::slice::from_ref(&current))
                .expect("removed"),
            [false]
        );
        assert!(store
            .command_by_id(newer.command_id)
            .await
            .unwrap()
            .is_some());
        assert_eq!(
            store.finished_command("k").unwrap().map(|r| r.command_id),
            Some(newer.command_id)
        );
    }

    #[tokio::test]
    async fn a_data_directory_from_before_the_expiry_index_is_indexed_on_open() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let settled = OffsetDateTime::now_utc() - time::Duration::hours(2);
        let commands = ["a", "b"].map(|key| (create(key, "f", &store), Decision::Apply));
        let old = accept_and_apply_all(&store, &commands, settled).await;
        // As an older build left it: finished records, no expiry entries, no mark.
        store.inner.expiries.clear().unwrap();
        store.inner.meta.remove(EXPIRIES_INDEXED).unwrap();
        store.checkpoint().expect("synced");
        drop(store);

        let store = reopen(dir.path());
        assert_eq!(
            store.compact(u64::MAX, settled).expect("compacted"),
            (0, 0),
            "not yet expired"
        );
        let removed = store.compact(u64::MAX, settled + time::Duration::hours(1));
        assert_eq!(removed.expect("compacted"), (0, 2));
        assert!(store
            .command_by_id(old[1].1.command_id)
            .await
            .unwrap()
            .is_none());
        let (answers, _) = accept_all(&store, &[create("b", "f", &store)]).await;
        assert!(matches!(&answers[0], Accepted::New(_)));
    }

    #[tokio::test]
    async fn the_intake_writer_numbers_new_commands_above_every_earlier_seq() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let last = {
            let store = Store::open(dir.path()).expect("a store");
            // Across a reserved block's end: still dense.
            let seqs: Vec<_> = (0..=SEQ_BLOCK)
                .map(|_| store.next_seq().expect("a seq"))
                .collect();
            assert!(seqs.windows(2).all(|pair| pair[1] == pair[0] + 1));
            seqs[seqs.len() - 1]
        };
        let store = reopen(dir.path());
        // As the handlers send them: the writer gives the seq.
        let unnumbered = |key| CommandRecord {
            seq: 0,
            ..create(key, key, &store)
        };
        let records = [unnumbered("a"), unnumbered("b")];
        let (answers, _) = accept_all(&store, &records).await;
        let seqs: Vec<_> = answers
            .iter()
            .map(|answer| match answer {
                Accepted::New(record) => record.seq,
                _ => panic!("new keys"),
            })
            .collect();
        assert!(seqs[0] > last && seqs[1] > seqs[0], "{seqs:?} after {last}");
    }

    #[test]
    fn a_sync_failure_marked_while_sled_was_opening_refuses_the_start() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let intake_dir = dir.path().join(INTAKE_DIR);
        // As a process that held the directory until now would leave it, after the
        // first check passed and before sled let this open have the lock.
        let opened =
            Store::open_after_first_check(dir.path(), || sync_failure::record(&intake_dir, &"EIO"));
        assert!(
            matches!(&opened, Err(StoreError::SyncFailedThisBoot(path)) if *path == intake_dir.join("sync-failed")),
            "refused once sled is open: {:?}",
            opened.as_ref().err()
        );
        assert!(intake_dir.join("sync-failed").exists(), "the marker stays");
    }

    #[test]
    fn a_locked_directory_is_waited_for_and_then_reported() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let held = Store::open(dir.path()).expect("a store");
        let never = CancellationToken::new();
        let locked = Store::open_waiting(dir.path(), Duration::from_millis(50), &never);
        assert!(
            matches!(&locked, Err(StoreError::Locked(path)) if path == dir.path()),
            "still held after the wait"
        );

        // A shutdown ends the wait long before it would time out.
        let stop = CancellationToken::new();
        let cancel = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                stop.cancel();
            })
        };
        let started = std::time::Instant::now();
        let stopped = Store::open_waiting(dir.path(), Duration::from_secs(120), &stop);
        assert!(
            matches!(&stopped, Err(StoreError::Stopped(path)) if path == dir.path()),
            "{:?}",
            stopped.err()
        );
        assert!(started.elapsed() < Duration::from_secs(60));
        cancel.join().expect("cancelled");

        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        Store::open_waiting(dir.path(), Duration::from_secs(10), &never)
            .expect("opens once let go");
        release.join().expect("released");
    }

    #[test]
    fn a_batch_apply_numbers_its_events_densely_and_applies_each_command_once() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let records: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|key| create(key, key, &store))
            .collect();
        let fail = Decision::Fail(FailureReason::Injected, "no".to_owned());
        let batch = [
            (&records[0], &Decision::Apply),
            (&records[1], &fail),
            (&records[2], &Decision::Apply),
        ];
        let now = OffsetDateTime::now_utc();
        let applied = store.apply_batch(&batch, now).expect("applied");
        let ids: Vec<_> = applied
            .iter()
            .map(|applied| applied.as_ref().map(|a| a.frame.id))
            .collect();
        assert_eq!(ids, [Some(1), Some(2), Some(3)]);
        assert_eq!(
            applied[1].as_ref().map(|a| a.record.status),
            Some(CommandStatus::Failed)
        );
        // Redelivered: nothing applies twice, and no event id is spent on it.
        let again = store.apply_batch(&batch, now).expect("applied");
        assert!(again.iter().all(Option::is_none));
        let more = create("d", "d", &store);
        let next = store
            .apply_batch(&[(&more, &Decision::Apply)], now)
            .expect("applied");
        assert_eq!(next[0].as_ref().map(|a| a.frame.id), Some(4));
    }

    /// A like of `task`, as the intake writer would have accepted it.
    fn like(key: &str, task: Uuid, store: &Store) -> CommandRecord {
        CommandRecord {
            seq: store.next_seq().expect("an id"),
            ..CommandRecord::accepted(
                task,
                key.to_owned(),
                "f".to_owned(),
                CommandBody::Like { delta: 1 },
                OffsetDateTime::now_utc(),
                0,
            )
        }
    }

    /// The records applied in one batch on a fresh store of their own: what a step
    /// would log, for a store whose sled never saw it.
    fn applied_elsewhere(records: &[&CommandRecord]) -> Vec<Option<Applied>> {
        let elsewhere = tempfile::tempdir().expect("a temp dir");
        let other = Store::open(elsewhere.path()).expect("a store");
        let batch: Vec<_> = records
            .iter()
            .map(|record| (*record, &Decision::Apply))
            .collect();
        other
            .apply_batch(&batch, OffsetDateTime::now_utc())
            .expect("applied")
    }

    fn apply_log_files(dir: &std::path::Path) -> Vec<u64> {
        frames::list_files(&dir.join(apply_log::APPLY_LOG_DIR), ".log").expect("listed")
    }

    #[test]
    fn applies_only_the_apply_log_holds_are_written_to_sled_again_on_open() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        // Applied on another store, logged on this one: as if this store's sled had
        // lost a step the apply log kept (a kill -9 before sled wrote it).
        let record = create("k", "f", &store);
        let applied = applied_elsewhere(&[&record]);
        store.log_applied(applied.iter().flatten()).expect("logged");
        assert!(store.finished_command("k").expect("read").is_none());
        // And the start of a second step's record, cut short by the crash.
        let file = *apply_log_files(dir.path()).last().expect("a file");
        let path = dir
            .path()
            .join(apply_log::APPLY_LOG_DIR)
            .join(format!("{file:020}.log"));
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .expect("the log");
        std::io::Write::write_all(&mut log, &[0x40, 0, 0, 0, 1, 2]).expect("written");
        drop(store);

        let store = reopen(dir.path());
        let finished = store
            .finished_command("k")
            .expect("read")
            .expect("finished after the replay");
        assert_eq!(finished.command_id, record.command_id);
        assert_eq!(finished.event_id, Some(1));
        let task = store.task(record.task_id).expect("the row is back");
        assert_eq!(task.version, 1);
        let events = store.events_after(0, u64::MAX, 10).expect("read");
        assert_eq!(events.len(), 1);
        let logged = applied[0].as_ref().expect("applied");
        assert_eq!(events[0].bytes, logged.frame.bytes);
        assert_eq!(store.watermark(), 1, "the next event id is 2");
        assert_eq!(
            apply_log_files(dir.path()).len(),
            1,
            "the replayed file is gone once sled is synced; a new one is open"
        );
    }

    #[test]
    fn a_step_sled_has_but_the_apply_log_lacks_is_not_undone_by_the_replay() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let now = OffsetDateTime::now_utc();
        let record = create("create", "f", &store);
        let applied = store
            .apply_batch(&[(&record, &Decision::Apply)], now)
            .expect("applied");
        store.log_applied(applied.iter().flatten()).expect("logged");
        // The like reaches sled, and the process dies before its write to the log.
        let liked = like("like", record.task_id, &store);
        store
            .apply_batch(&[(&liked, &Decision::Apply)], now)
            .expect("applied");
        store.inner.flush_sled().expect("flushed");
        drop(store);

        let store = reopen(dir.path());
        let task = store.task(record.task_id).expect("the row");
        assert_eq!(
            (task.version, task.likes),
            (2, 1),
            "the create's logged row is not written over the like's"
        );
        assert_eq!(store.watermark(), 2);
    }

    #[test]
    fn a_checkpoint_syncs_sled_and_drops_the_apply_logs_earlier_files() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let first = apply_log_files(dir.path());
        assert_eq!(first.len(), 1);
        let record = create("k", "f", &store);
        let applied = store
            .apply_batch(&[(&record, &Decision::Apply)], OffsetDateTime::now_utc())
            .expect("applied");
        store.log_applied(applied.iter().flatten()).expect("logged");
        store.checkpoint().expect("checkpointed");
        let after = apply_log_files(dir.path());
        assert_eq!(after.len(), 1);
        assert!(after[0] > first[0], "a new file, the old one dropped");
        assert_eq!(
            std::fs::metadata(
                dir.path()
                    .join(apply_log::APPLY_LOG_DIR)
                    .join(format!("{:020}.log", after[0]))
            )
            .expect("the new file")
            .len(),
            0
        );
    }

    #[tokio::test]
    async fn a_replayed_command_displaces_an_expired_record_whose_removal_was_lost() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let old = &accept_and_apply(&store, "k", "f").await;
        let old_bytes = store.inner.commands.get("k").unwrap().expect("finished");
        let old_entry = expiry_key_for(old.settled_at.expect("settled"), old.seq);
        store.checkpoint().expect("synced");

        // Compaction frees the key, a new command takes it and applies, logged.
        let new = &retake_after_compaction(&store).await;
        let applied = store
            .apply_batch(&[(new, &Decision::Apply)], OffsetDateTime::now_utc())
            .expect("applied");
        store.log_applied(applied.iter().flatten()).expect("logged");
        store.finish(&new.idempotency_key, new.command_id);
        let new_record = applied[0].as_ref().expect("applied").record.clone();
        let new_entry = expiry_key_for(new_record.settled_at.expect("settled"), new.seq);

        // sled loses both the removal and the apply (the log keeps the apply).
        bring_back(&store, old, old_bytes);
        let inner = &store.inner;
        inner.command_ids.remove(new.command_id.as_bytes()).unwrap();
        inner.expiries.remove(new_entry).unwrap();
        inner.events.remove(2_u64.to_be_bytes()).unwrap();
        inner.tasks.remove(new.task_id.as_bytes()).unwrap();
        inner
            .meta
            .insert(LAST_EVENT_ID, &1_u64.to_be_bytes())
            .unwrap();
        inner.flush_sled().expect("flushed");
        drop(store);

        let store = reopen(dir.path());
        assert!(store.unapplied().is_empty(), "the replay finished it");
        let finished = store.finished_command("k").unwrap().expect("finished");
        assert_eq!(finished.command_id, new.command_id);
        assert!(
            store.command_by_id(old.command_id).await.unwrap().is_none(),
            "the expired command's id finds nothing, not the key's new record"
        );
        assert!(!store.inner.expiries.contains_key(old_entry).unwrap());
        assert!(store.inner.expiries.contains_key(new_entry).unwrap());
        assert!(store.task(new.task_id).is_some());
    }

    #[test]
    fn a_gap_in_the_apply_log_ends_its_replay() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let records = ["a", "b", "c"].map(|key| create(key, "f", &store));
        let applied = applied_elsewhere(&records.iter().collect::<Vec<_>>());
        // Events 1 and 3 logged, 2 lost.
        store.log_applied(applied[0].as_ref()).expect("logged");
        store.log_applied(applied[2].as_ref()).expect("logged");
        drop(store);

        let store = reopen(dir.path());
        assert!(store.finished_command("a").unwrap().is_some());
        assert!(
            store.finished_command("c").unwrap().is_none(),
            "not written past the gap"
        );
        assert_eq!(store.watermark(), 1, "the next event id is 2");
    }

    /// A store with one step applied and its write to the apply log failed.
    fn failed_apply_log_write(dir: &std::path::Path) -> Store {
        let store = Store::open(dir).expect("a store");
        let record = create("k", "f", &store);
        let applied = store
            .apply_batch(&[(&record, &Decision::Apply)], OffsetDateTime::now_utc())
            .expect("applied");
        store.inner.apply_log().fail_writes();
        assert!(store.log_applied(applied.iter().flatten()).is_err());
        assert!(store.sync_has_failed(), "the server stops");
        assert!(store.apply_log_has_failed() && !store.sled_sync_has_failed());
        assert!(store.checkpoint().is_err(), "nothing more is made durable");
        store
    }

    #[test]
    fn a_failed_write_to_the_apply_log_stops_the_server_but_not_the_next_start() {
        let dir = tempfile::tempdir().expect("a temp dir");
        drop(failed_apply_log_write(dir.path()));
        let store = reopen(dir.path());
        assert!(!store.sync_has_failed());
    }

    #[test]
    fn a_sync_failure_after_a_failed_write_to_the_apply_log_still_refuses_a_start_in_this_boot() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = failed_apply_log_write(dir.path());
        store.fail_sled_sync();
        assert!(store.sled_sync_has_failed());
        drop(store);
        let opened = Store::open_waiting(
            dir.path(),
            Duration::from_secs(10),
            &CancellationToken::new(),
        );
        assert!(
            matches!(opened, Err(StoreError::SyncFailedThisBoot(_))),
            "the marker was left"
        );
    }
}
