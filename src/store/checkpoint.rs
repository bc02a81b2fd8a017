//! Checkpoints: where the applies the apply log holds are written to sled and become
//! durable there against a power loss too (sled's flush and an `fdatasync` of its
//! files), and what waited for that is let go: the apply log's earlier files, and the
//! closed intake segments whose commands have all finished.
//!
//! A checkpoint begins on the consumer's thread, between steps
//! ([`Store::begin_checkpoint`]): it takes the releasable segments, moves the apply log
//! on to a new file and notes the last event id logged. Everything the earlier files
//! hold, and every apply of a taken segment's commands, is at or before that id. The
//! rest ([`Checkpoint::run`]) writes the applies up to that id to sled (those not
//! written yet: `unwritten`), then syncs; it waits on sled and the disk, milliseconds
//! to tens of them, and runs on a thread of its own while the consumer steps on. One
//! runs at a time; one that does not finish hands its segments back to the next.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::apply_log::ApplyLog;
use super::unwritten::Unwritten;

use super::apply_log;
use super::intake::release_segment;
use super::unwritten::UNWRITTEN_DUE;
use super::{Store, StoreError};

/// A checkpoint begun ([`Store::begin_checkpoint`]), to [`Checkpoint::run`] on any thread.
/// Dropped before it finishes, it hands its segments back.
#[must_use = "a checkpoint does nothing until it runs"]
pub struct Checkpoint {
    store: Store,
    /// Closed intake segments whose commands had all finished when it began.
    segments: Vec<u64>,
    /// The apply log's files before the one it moved on to.
    retired: Vec<u64>,
    /// The last event id logged when it began: it writes the applies up to it to sled.
    logged: u64,
    /// Begun and not finished: dropped so (its thread could not start), it backs off
    /// as a failed one does.
    unfinished: bool,
}

/// When a checkpoint is due ([`Store::begin_checkpoint`] says for what): now, or when
/// the oldest apply waiting to be written has waited long enough, and not before a
/// failed one's backoff has passed. `None` when nothing waits for one.
fn due_at(log: &ApplyLog, unwritten: &Unwritten, segments_wait: bool) -> Option<Instant> {
    // `is_full`: the consumer waits for one, also for event ids when none wait to be
    // written (`event_ids`).
    let at_once = segments_wait
        || log.is_full()
        || log.has_retired()
        || unwritten.len() >= UNWRITTEN_DUE
        || unwritten.is_full();
    let due = if at_once {
        Instant::now()
    } else {
        unwritten.due_at()?
    };
    Some(log.backoff_until().map_or(due, |until| due.max(until)))
}

impl Store {
    /// Begins a checkpoint if one is due: finished intake segments wait to be released,
    /// the apply log has grown to its bound, earlier files of it wait (a checkpoint
    /// failed), [`UNWRITTEN_DUE`] applies wait to be written to sled, or the oldest of
    /// them has waited `UNWRITTEN_AGE`; but not within a second of a failed one. `None` when none is due, one is running,
    /// or the apply log cannot move on to a new file (logged; tried again a second
    /// later).
    ///
    /// # Errors
    /// When a sync of sled's files (or a write to the apply log) has failed in this
    /// process: nothing more can be released, and the server stops.
    pub fn begin_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.begin(false)
    }

    /// Makes every sled write so far durable, against a power loss too, and lets go of
    /// what waited for that (see the module docs), on the calling thread; waits for a
    /// checkpoint running elsewhere first. The consumer runs one when it stops; a
    /// program that writes the store without a consumer (the compaction example) calls
    /// it itself.
    ///
    /// # Errors
    /// When the apply log cannot move on to a new file, or the sync fails (a failed
    /// sync stops the server).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        loop {
            match self.begin(true)? {
                Some(checkpoint) => return checkpoint.finish().map(drop),
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// When a checkpoint is due, whether or not a step follows to begin it (see
    /// [`Store::begin_checkpoint`]); `None` when nothing waits for one. The consumer
    /// begins one then.
    pub fn checkpoint_due_at(&self) -> Option<Instant> {
        // While one runs: it may fail and hand back what it took, which nothing else
        // would then begin again on an idle server.
        if self.inner.checkpointing.load(Ordering::Acquire) {
            return Some(Instant::now());
        }
        let segments_wait = !self.pending_table().releasable.is_empty();
        let log = self.inner.apply_log();
        due_at(&log, &self.inner.unwritten(), segments_wait)
    }

    /// A checkpoint, if one is due (or `always`) and none is running.
    fn begin(&self, always: bool) -> Result<Option<Checkpoint>, StoreError> {
        self.inner.check_synced()?;
        if self.inner.checkpointing.swap(true, Ordering::AcqRel) {
            return Ok(None);
        }
        // From here on the checkpoint's drop clears the flag and hands the segments
        // back, whichever way this returns.
        let mut checkpoint = Checkpoint {
            store: self.clone(),
            segments: std::mem::take(&mut self.pending_table().releasable),
            retired: Vec::new(),
            logged: 0,
            unfinished: false,
        };
        let mut log = self.inner.apply_log();
        // Under the log's lock, which each step holds while it logs and enters its
        // applies in the table: every apply in the files retired below is at or before
        // this id.
        let unwritten = self.inner.unwritten();
        checkpoint.logged = unwritten.last_event_id;
        let due = due_at(&log, &unwritten, !checkpoint.segments.is_empty())
            .is_some_and(|due| due <= Instant::now());
        drop(unwritten);
        if !(always || due) {
            return Ok(None);
        }
        match log.rotate() {
            Ok(retired) => {
                checkpoint.retired = retired;
                checkpoint.unfinished = true;
                drop(log);
                Ok(Some(checkpoint))
            }
            Err(err) if always => Err(err.into()),
            Err(err) => {
                tracing::warn!(error = %err, "the apply log cannot move on to a new file; the checkpoint waits");
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
impl Store {
    /// How many applies are logged and not yet written to sled.
    pub(crate) fn unwritten_len(&self) -> usize {
        self.inner.unwritten().len()
    }

    /// [`Store::begin_checkpoint`] and [`Checkpoint::run`] on the calling thread, for
    /// tests that release finished segments without a consumer: `None` when none was
    /// due or one runs elsewhere.
    ///
    /// # Errors
    /// As [`Checkpoint::run`].
    pub(crate) fn release_finished_segments(&self) -> Result<Option<Duration>, StoreError> {
        match self.begin_checkpoint()? {
            Some(checkpoint) => checkpoint.run(),
            None => Ok(None),
        }
    }
}

impl Checkpoint {
    /// Finishes the checkpoint: answers how long its sync took, or `None` when it
    /// failed short of a sync failure (sled could not be written, or its blob files
    /// could not be listed or opened: logged, and its applies, files and segments wait
    /// for the next one). A segment that cannot
    /// be renamed or deleted stays on disk, and the next start releases it.
    ///
    /// # Errors
    /// When a sync of sled's files has failed, now or before, in this process: nothing
    /// more can be released, and the server stops (see `Inner::sync_sled_files`).
    pub fn run(self) -> Result<Option<Duration>, StoreError> {
        let store = self.store.clone();
        match self.finish() {
            Ok(sync) => Ok(Some(sync)),
            // This failure, or an earlier one: the error says which.
            Err(err) if store.inner.sync_has_failed() => Err(err),
            Err(err) => {
                tracing::warn!(error = %err, "cannot write the applies to sled or sync its files; the apply log and the finished intake segments stay for a checkpoint a second from now");
                Ok(None)
            }
        }
    }

    /// [`Checkpoint::run`], with every failure an error.
    /// On failure its drop backs off, before it lets another begin: the next waits a
    /// second.
    fn finish(mut self) -> Result<Duration, StoreError> {
        self.store.inner.write_unwritten(self.logged)?;
        let reserved = self.store.inner.reserve_event_ids(self.logged)?;
        self.store.inner.check_synced()?;
        let started = Instant::now();
        self.store.inner.sync_sled()?;
        let sync = started.elapsed();
        if let Some(reserved) = reserved {
            self.store.inner.event_ids_reserved(reserved);
        }
        let released = self.store.inner.apply_log().release(&self.retired);
        apply_log::delete(&released);
        for segment in std::mem::take(&mut self.segments) {
            // Under the lock, so the writer cannot take this spare before it exists:
            // one rename or unlink, no fsync (after a crash the file is found finished
            // again).
            let released = release_segment(
                &self.store.inner.intake_dir,
                &mut self.store.pending_table(),
                segment,
            );
            if let Err(err) = released {
                tracing::warn!(error = %err, segment, "cannot release a finished intake segment");
            }
        }
        self.unfinished = false;
        Ok(sync)
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        if self.unfinished {
            self.store.inner.apply_log().checkpoint_failed();
        }
        if !self.segments.is_empty() {
            self.store
                .pending_table()
                .releasable
                .append(&mut self.segments);
        }
        self.store
            .inner
            .checkpointing
            .store(false, Ordering::Release);
    }
}
