//! The intake log's segment files: their names, opening one to write (a spare
//! renamed, or a new file), reading them back on start (the recovery of the pending
//! table), and releasing one whose commands have all finished (kept as a spare, or
//! deleted).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use super::PendingTable;
use crate::model::CommandRecord;
use crate::store::frames::{decode_frames, list_files, FRAME_HEADER};
use crate::store::{Inner, Store, StoreError};

/// Finished segments kept for reuse; more are deleted.
pub const SPARE_SEGMENTS: usize = 4;

pub(super) const SEGMENT_SUFFIX: &str = ".log";

const SPARE_SUFFIX: &str = ".spare";

pub(super) fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}{SEGMENT_SUFFIX}"))
}

pub(super) fn spare_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}{SPARE_SUFFIX}"))
}

/// Makes a new or removed directory entry durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    /// Reads the intake log back: every command without a finished record in sled is
    /// pending again. Deletes the segments that hold nothing unfinished, and makes the
    /// next segment number the active one.
    ///
    /// A logged command whose key has another command's finished record in sled wins
    /// over it, and that record is unindexed (its chunk keeps it until it expires,
    /// pointed at by nothing): the writer admits a key only when it has no record, so
    /// the record must be one whose removal by compaction (not flushed before a crash)
    /// came back.
    ///
    /// Call once sled is synced ([`Inner::sync_sled`], as `open` does when it reserves
    /// the first seq block): a released segment no longer brings its commands back.
    pub(in crate::store) fn recover_intake(inner: &Inner) -> Result<PendingTable, StoreError> {
        let trees = inner.finished_trees();
        let dir = inner.intake_dir.as_path();
        let commands = trees.commands;
        fs::create_dir_all(dir)?;
        let mut table = PendingTable::default();
        let mut stale_removed = false;
        let segments = list_files(dir, SEGMENT_SUFFIX)?;
        let spares = list_files(dir, SPARE_SUFFIX)?;
        for &segment in &segments {
            let path = segment_path(dir, segment);
            let bytes = fs::read(&path)?;
            // What follows the intact part is a torn record (never acknowledged) or a
            // recycled file's stale records.
            let (payloads, _) = decode_frames(&bytes, segment);
            for payload in payloads {
                let size = FRAME_HEADER + payload.len();
                let record: CommandRecord = serde_json::from_slice(payload)?;
                table.hold(segment, record.seq);
                let key = record.idempotency_key.as_bytes();
                let finished = match trees.entry(key)? {
                    Some((entry, stored)) => {
                        if stored.command_id == record.command_id {
                            true
                        } else {
                            tracing::warn!(command_id = %record.command_id, stale = %stored.command_id,
                                "an expired command's record came back under a logged command's key; it no longer answers for the key or its id");
                            trees.unindex(key, &entry, &stored)?;
                            stale_removed = true;
                            false
                        }
                    }
                    None => false,
                };
                if !finished && !table.by_key.contains_key(&record.idempotency_key) {
                    table.insert(record, segment, size);
                }
            }
        }
        if stale_removed {
            inner.flush_sled()?;
        }
        for key in commands.iter().keys() {
            table.count_finished(&key?);
        }
        // Numbers are never reused, spares' included: a spare's records carry its
        // last number, so its next one must differ.
        let newest = segments.iter().chain(&spares).max().copied().unwrap_or(0);
        table.active = newest + 1;
        for spare in spares {
            if table.spares.len() < SPARE_SEGMENTS {
                table.spares.push(spare);
            } else {
                fs::remove_file(spare_path(dir, spare))?;
            }
        }
        // What the records were found finished in is on the disk: `open` synced sled
        // before this.
        for &segment in &segments {
            if !table.unfinished.contains_key(&segment) {
                release_segment(dir, &mut table, segment)?;
            }
        }
        sync_dir(dir)?;
        Ok(table)
    }
}

/// Turns a closed segment whose commands have all finished into a spare, or deletes it
/// when there are enough spares.
pub(in crate::store) fn release_segment(
    dir: &Path,
    table: &mut PendingTable,
    segment: u64,
) -> io::Result<()> {
    if table.spares.len() < SPARE_SEGMENTS {
        fs::rename(segment_path(dir, segment), spare_path(dir, segment))?;
        table.spares.push(segment);
    } else {
        fs::remove_file(segment_path(dir, segment))?;
    }
    table.released(segment);
    Ok(())
}

/// Opens segment `segment` for writing from its start: a spare renamed, or a new file.
pub(super) fn open_segment(store: &Store, segment: u64) -> Result<File, StoreError> {
    let dir = &store.inner.intake_dir;
    let path = segment_path(dir, segment);
    let spare = store.pending_table().spares.pop();
    if let Some(spare) = spare {
        if let Err(err) = fs::rename(spare_path(dir, spare), &path) {
            tracing::warn!(error = %err, spare, "cannot reuse a spare intake segment");
        }
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    sync_dir(dir)?;
    Ok(file)
}
