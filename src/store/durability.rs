//! Whether what the store wrote is durable: the syncs of sled's files (its `flush`,
//! then an `fdatasync` of its data and blob files), and the sticky failure state a
//! failed sync, or a failed write to the apply log, leaves for the rest of the process
//! (the server stops on it; the marker that outlives the process is `sync_failure`).

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;

use super::{sync_failure, Inner, Store, StoreError};

impl Inner {
    /// Makes every sled write so far durable against a power loss, not only against a
    /// crash of the process: `flush`, then [`Inner::sync_sled_files`].
    pub(super) fn sync_sled(&self) -> Result<(), StoreError> {
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
    pub(super) fn flush_sled(&self) -> Result<(), StoreError> {
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
    pub(super) fn mark_sync_failed(&self, cause: &dyn std::fmt::Display) {
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
    pub(super) fn sync_sled_files(&self) -> io::Result<()> {
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
    /// every later sync fails and the server stops, since the log may hold part of the
    /// step, where a replay would stop; but no marker is left, as no page of sled's
    /// files was lost (a torn record at the log's end is never replayed, and was never
    /// published).
    pub(super) fn mark_apply_log_failed(&self, cause: &dyn std::fmt::Display) {
        let first = !self.apply_log_failed.swap(true, Ordering::AcqRel);
        self.sync_failure.cancel();
        if first {
            tracing::error!(error = %cause, "the apply log cannot be written; the server stops");
        }
    }

    /// Whether a sync of sled's files, or a write to the apply log, has failed in this
    /// process.
    pub(super) fn sync_has_failed(&self) -> bool {
        self.sled_sync_has_failed() || self.apply_log_has_failed()
    }

    /// Whether a sync of sled's files has failed in this process.
    pub(super) fn sled_sync_has_failed(&self) -> bool {
        self.sled_sync_failed.load(Ordering::Acquire)
    }

    /// Whether a step's write to the apply log has failed in this process.
    pub(super) fn apply_log_has_failed(&self) -> bool {
        self.apply_log_failed.load(Ordering::Acquire)
    }

    /// An error if a sync of sled's files, or a write to the apply log, has failed in
    /// this process (the sync first: it is what the operator must act on).
    pub(super) fn check_synced(&self) -> io::Result<()> {
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
    pub(super) fn check_sled_synced(&self) -> io::Result<()> {
        if self.sled_sync_has_failed() {
            Err(io::Error::other(
                "an fdatasync of sled's files failed; the server stops (see intake/sync-failed in the data directory)",
            ))
        } else {
            Ok(())
        }
    }
}

impl Store {
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
}

#[cfg(test)]
impl Store {
    /// As if an fdatasync of sled's files had failed (see [`Inner::sync_sled_files`]).
    pub(crate) fn fail_sled_sync(&self) {
        self.inner
            .mark_sync_failed(&"a sync failure a test injected");
    }
}
