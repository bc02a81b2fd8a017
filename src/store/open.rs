//! Opening the store: sled's directory (waiting for its lock), the replay of the apply
//! log, the first seq block, the intake log's recovery and the projection, loaded from
//! sled; and the refusal of a start in a boot where a sync of sled's files failed.

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::apply_log::{self, ApplyLog};
use super::intake::PendingTable;
use super::projection::Projection;
use super::unwritten::Unwritten;
use super::{read_u64, sync_failure, Inner, Seqs, Store, StoreError, SEQ_BLOCK, SEQ_RESERVED};

/// The intake log's directory, inside the data directory.
pub(super) const INTAKE_DIR: &str = "intake";
/// sled 0.34's data file in its directory (`Config::db_path`).
const SLED_FILE: &str = "db";
/// sled 0.34's directory of items too large for its log.
const SLED_BLOBS: &str = "blobs";
/// Pause between attempts to open a locked directory ([`Store::open_waiting`]).
const LOCK_RETRY: Duration = Duration::from_millis(10);
/// How long a start waits for a locked directory before it says that it waits.
const LOCK_SAY_AFTER: Duration = Duration::from_millis(250);

/// Whether sled could not open a directory because its lock is held. sled 0.34 says
/// so only in the message.
fn is_locked(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::Other && err.to_string().contains("could not acquire lock")
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
        let started = std::time::Instant::now();
        let mut said = false;
        loop {
            match Self::open(dir) {
                Err(StoreError::Sled(sled::Error::Io(err))) if is_locked(&err) => {
                    if stop.is_cancelled() {
                        return Err(StoreError::Stopped(dir.to_owned()));
                    }
                    let waited = started.elapsed();
                    if waited >= wait {
                        return Err(StoreError::Locked(dir.to_owned()));
                    }
                    // Not at once: a store reopened in the same process waits a moment.
                    if !said && waited >= LOCK_SAY_AFTER {
                        tracing::warn!(
                            dir = %dir.display(),
                            "the data directory is locked (another settle running on it?): waiting up to {wait:?} for it"
                        );
                        said = true;
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
        Self::open_in_boot(dir, sync_failure::boot_id().as_deref(), || {})
    }

    /// [`Store::open`], as if the machine's boot id were `boot` (`None`: it cannot be
    /// told), for what the event ids go on from (`event_ids`); running `first_checked`
    /// between its two checks for the marker of a failed sync: where the process that
    /// held the directory could leave one.
    pub(crate) fn open_in_boot(
        dir: &std::path::Path,
        boot: Option<&str>,
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
            records: tree("records")?,
            meta: tree("meta")?,
            projection: RwLock::new(Projection::default()),
            pending: Mutex::new(PendingTable::default()),
            apply_log: Mutex::new(apply_log),
            unwritten: RwLock::new(Unwritten::default()),
            writer: Mutex::new(()),
            checkpointing: AtomicBool::new(false),
            compacting: Mutex::new(()),
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
            event_id_holes: Vec::new(),
            db,
        };
        // First: the replay's look-ups read records as they are now kept.
        inner.chunk_records()?;
        inner.replay(logged)?;
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
        // In the same sync: the first event ids, and any hole before them.
        let event_ids = inner.reserve_event_ids_at_open(boot)?;
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
        projection.watermark = event_ids.watermark;
        let unwritten = inner
            .unwritten
            .get_mut()
            .expect("unwritten table lock poisoned");
        unwritten.last_event_id = event_ids.last;
        unwritten.event_ids = event_ids.ids;
        inner.event_id_holes = event_ids.holes;
        for entry in inner.tasks.iter() {
            let (_, value) = entry?;
            projection.insert(serde_json::from_slice(&value)?);
        }
        *inner.projection.write().expect("projection lock poisoned") = projection;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }
}
