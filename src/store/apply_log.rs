//! The apply log: what makes an apply step survive a crash of the process (kill -9)
//! before its events go out, with one `write(2)` instead of a sled transaction and
//! flush.
//!
//! Why: sled 0.34's `flush` hands its log buffer to its I/O pool and waits for the
//! write to leave the page cache (`sync_file_range`), and its transactions take its
//! process-wide lock and seal that buffer; measured, those were most of what the
//! server added to the window at the 99th percentile (BENCHMARKS.md, sections 1c and
//! 1d). Surviving kill -9 needs only the page cache: what a process has written with
//! `write(2)` is the kernel's, whatever becomes of the process. So each step appends
//! its applies here before its events are published
//! ([`Store::log_applied`](super::Store::log_applied)), and sled is written and
//! flushed later, at a checkpoint:
//!
//! - A record is one step: for each command it applied, the finished record, the row
//!   change and the event, in event-id order ([`LoggedApply`]).
//! - Checkpoint (`checkpoint`): the log moves on to a new file, the applies the earlier
//!   files hold are written to sled (`unwritten`), sled is synced (its flush, then an
//!   `fdatasync` of its files), and the files before the new one are deleted. The
//!   consumer begins one where finished intake segments wait to be released (which
//!   need their applies durable against a power loss, so the sync was paid there
//!   already), once the log holds [`APPLY_LOG_BYTES`] and once enough applies wait to
//!   be written; it runs on a thread of its own.
//! - On start, before anything reads sled, the log is replayed (`Inner::replay`):
//!   sled recovers a prefix of its writes, an atomic batch entirely or not at all, and
//!   a checkpoint writes the applies in event-id order, each batch with the last
//!   event id it holds, so the commands whose event id is at most sled's
//!   `last_event_id` are there already. The others are written again, in order; their
//!   writes are absolute (the record, the row; the events in chunks keyed from
//!   `last_event_id` + 1 on, so no chunk overlaps one sled has), so the result is the state
//!   the last run published; a gap in the ids (a record lost to a power loss) ends the
//!   replay there. Skipping the ones sled has matters: what a compaction removed after
//!   a checkpoint wrote them (an expired record, a trimmed event) must not come back.
//! - A power loss: the log is never synced. What it alone holds is also still in the
//!   intake log, which releases a segment only after a checkpoint; this is the promise
//!   sled's flush made before (`sync_file_range` does not survive a power loss either).
//!
//! Format: `applies/{number:020}.log` in the data directory, framed as the intake log
//! is (`frames`), one JSON array of [`LoggedApply`] per record. A write cut short by a
//! crash was never published; replay stops at it.

use std::borrow::Cow;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::frames::{decode_frames, encode_frame, list_files};
use super::{Applied, RowChange, StoreError, SEGMENT_BYTES};
use crate::hub::EventFrame;
use crate::model::CommandRecord;

/// The apply log's directory, inside the data directory.
pub(super) const APPLY_LOG_DIR: &str = "applies";
const SUFFIX: &str = ".log";
/// A checkpoint is due once the log's current file holds this much, whether or not an
/// intake segment can be released: so a start never replays more than about this.
const APPLY_LOG_BYTES: u64 = 4 * SEGMENT_BYTES;
/// After a checkpoint failed short of a sync failure (the log could not move on to a
/// new file, sled's blob files could not be listed), how long until the next may begin.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

/// One applied command as logged: what its apply wrote to sled.
#[derive(Serialize, Deserialize)]
pub(super) struct LoggedApply<'a> {
    record: Cow<'a, CommandRecord>,
    change: Cow<'a, RowChange>,
    event_id: u64,
    /// The event's SSE frame: JSON text, so UTF-8.
    frame: Cow<'a, str>,
}

impl<'a> LoggedApply<'a> {
    fn of(applied: &'a Applied) -> io::Result<Self> {
        let frame = std::str::from_utf8(&applied.frame.bytes)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?;
        Ok(Self {
            record: Cow::Borrowed(&applied.record),
            change: Cow::Borrowed(&applied.change),
            event_id: applied.frame.id,
            frame: Cow::Borrowed(frame),
        })
    }

    fn into_applied(self) -> Applied {
        Applied {
            record: self.record.into_owned(),
            frame: EventFrame::from_log(self.event_id, self.frame.as_bytes()),
            change: self.change.into_owned(),
        }
    }
}

/// The log's files: the one steps are appended to, and the earlier ones still needed.
pub(super) struct ApplyLog {
    dir: PathBuf,
    number: u64,
    file: File,
    /// Bytes appended to `file`.
    bytes: u64,
    /// Earlier files, until a sync of sled covers what they hold.
    retired: Vec<u64>,
    /// When the last checkpoint failed short of a sync failure, if it did.
    checkpoint_failed: Option<Instant>,
    buffer: Vec<u8>,
}

impl ApplyLog {
    /// Opens the log in `data_dir`: every intact record of its files, oldest first (to
    /// replay), and a new file to append to. The files read stay until
    /// [`ApplyLog::release`] is given them ([`ApplyLog::retired`]), once sled is synced.
    ///
    /// # Errors
    /// When the directory or a file cannot be read or created, or an intact record
    /// does not parse.
    pub(super) fn open(data_dir: &Path) -> Result<(Self, Vec<Applied>), StoreError> {
        let dir = data_dir.join(APPLY_LOG_DIR);
        fs::create_dir_all(&dir)?;
        let retired = list_files(&dir, SUFFIX)?;
        let mut logged = Vec::new();
        for &number in &retired {
            let bytes = fs::read(path(&dir, number))?;
            for payload in decode_frames(&bytes, number).0 {
                let step: Vec<LoggedApply<'_>> = serde_json::from_slice(payload)?;
                logged.extend(step.into_iter().map(LoggedApply::into_applied));
            }
        }
        let number = retired.last().map_or(1, |last| last + 1);
        let log = Self {
            file: create(&dir, number)?,
            dir,
            number,
            bytes: 0,
            retired,
            checkpoint_failed: None,
            buffer: Vec::new(),
        };
        Ok((log, logged))
    }

    /// Appends one step's applies with one `write(2)`; answers how many bytes.
    ///
    /// # Errors
    /// When the write fails (it may have written part of the record: replay stops
    /// there), or a frame is not UTF-8.
    pub(super) fn append<'a>(
        &mut self,
        applied: impl IntoIterator<Item = &'a Applied>,
    ) -> io::Result<usize> {
        let step = applied
            .into_iter()
            .map(LoggedApply::of)
            .collect::<io::Result<Vec<_>>>()?;
        self.buffer.clear();
        encode_frame(&mut self.buffer, self.number, &step)?;
        self.file.write_all(&self.buffer)?;
        self.bytes += self.buffer.len() as u64;
        Ok(self.buffer.len())
    }

    /// Whether the current file has reached [`APPLY_LOG_BYTES`]: a checkpoint is due.
    pub(super) fn is_full(&self) -> bool {
        self.bytes >= APPLY_LOG_BYTES
    }

    /// Whether earlier files wait for a checkpoint to let them go: one runs, or one
    /// failed.
    pub(super) fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// Until when no checkpoint may begin: [`CHECKPOINT_RETRY`] after a failed one, so a
    /// disk that refuses new files, or a blob directory that cannot be listed, is not
    /// asked every step.
    pub(super) fn backoff_until(&self) -> Option<Instant> {
        self.checkpoint_failed
            .map(|failed| failed + CHECKPOINT_RETRY)
    }

    /// Notes that a checkpoint failed short of a sync failure: see
    /// [`ApplyLog::backoff_until`].
    pub(super) fn checkpoint_failed(&mut self) {
        self.checkpoint_failed = Some(Instant::now());
    }

    /// Moves on to a new file, unless the current one is empty. Answers every file
    /// before it: a sync of sled from now on covers what they hold.
    ///
    /// # Errors
    /// When the new file cannot be created; the log goes on in the current one.
    pub(super) fn rotate(&mut self) -> io::Result<Vec<u64>> {
        if self.bytes == 0 {
            // A checkpoint tried again and again (a failing one, on an idle server)
            // leaves no trail of empty files.
            self.checkpoint_failed = None;
            return Ok(self.retired.clone());
        }
        let next = self.number + 1;
        match create(&self.dir, next) {
            Ok(file) => {
                self.file = file;
                self.checkpoint_failed = None;
            }
            Err(err) => {
                self.checkpoint_failed();
                return Err(err);
            }
        }
        self.retired.push(self.number);
        self.number = next;
        self.bytes = 0;
        Ok(self.retired.clone())
    }

    /// The files kept until the next sync of sled: those [`ApplyLog::open`] read.
    pub(super) fn retired(&self) -> Vec<u64> {
        self.retired.clone()
    }

    /// Lets go of these retired files, sled being synced past what they hold: answers
    /// their paths, for [`delete`] outside the log's lock (no step waits on an unlink).
    pub(super) fn release(&mut self, numbers: &[u64]) -> Vec<PathBuf> {
        self.retired.retain(|number| !numbers.contains(number));
        numbers
            .iter()
            .map(|&number| path(&self.dir, number))
            .collect()
    }
}

/// Deletes the files [`ApplyLog::release`] let go of. One that cannot be deleted is only
/// logged: a replay skips what it holds (its ids are at most sled's last), and the next
/// start deletes it.
pub(super) fn delete(paths: &[PathBuf]) {
    for path in paths {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(error = %err, path = %path.display(), "cannot delete a checkpointed apply log file");
            }
        }
    }
}

#[cfg(test)]
impl ApplyLog {
    /// Makes every later append fail, as a full or failing disk would.
    pub(super) fn fail_writes(&mut self) {
        self.file = File::open(path(&self.dir, self.number)).expect("the current file");
    }
}

fn path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}{SUFFIX}"))
}

/// A new, empty file (one left by a start that failed after creating it is emptied).
fn create(dir: &Path, number: u64) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path(dir, number))
}
