//! Finished commands in sled: their records in chunks, in event order, and the indexes
//! that point into them.
//!
//! - `records`: event id (u64 big-endian) -> the JSON records of the commands whose
//!   events are consecutive from that one on, in a chunk (`chunks`).
//! - `commands`: idempotency key -> a pointer to its record: [`POINTER_TAG`], then the
//!   record's event id (u64 big-endian). With the pending table, the idempotency table.
//! - `command_ids`: command id (16 bytes) -> the same pointer.
//! - `dead_letters`: seq (u64 big-endian) -> idempotency key.
//!
//! Why: a checkpoint's sled inserts are most of what an apply costs (BENCHMARKS.md,
//! section 4), and an insert under a random key is the dearest kind: sled 0.34 copies
//! the leaf it lands in, and every tenth change to a leaf logs the whole leaf, so a
//! leaf of 450-byte records under idempotency keys was logged again and again. Records
//! now go where inserts append, a chunk of them at a time (event ids only grow), and
//! the two indexes under random keys hold 9 bytes each.
//!
//! The order also serves retention: records settle in event order (a step's time, read
//! from the wall clock), so expiry walks `records` from its start and stops at the
//! first record it keeps: it reads only what it removes, and one chunk more. A record
//! stamped later than now (the clock was ahead) is kept and walked past
//! (`Store::compact`); after the clock is set back, the records settled behind one
//! stamped later wait until it expires.
//!
//! A data directory from before held each record in `commands` as JSON, the key in
//! `command_ids`, and an `expiries` index; opening it moves the records into chunks,
//! once ([`Inner::chunk_records`]). Values of that layout are still read where one is
//! left (a record without an event id, which no build since the first writes, or one an
//! older build wrote after the move); they are never expired. One way, as the seq
//! allocator is: an older build would not read a pointer.

use std::ops::Bound;

use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionalTree,
};
use sled::{IVec, Transactional};
use uuid::Uuid;

use super::{chunks, flatten, read_u64, Inner, StoreError};
use crate::model::CommandRecord;

/// The first byte of a pointer: no JSON record begins with it, and no idempotency key
/// (visible ASCII) holds it.
const POINTER_TAG: u8 = 0;
/// `meta` key, present once every finished record is in `records`.
pub(super) const RECORDS_CHUNKED: &[u8] = b"records_chunked";
/// `meta` key of the layout before: present once every record had its `expiries` entry.
const EXPIRIES_INDEXED: &[u8] = b"expiries_indexed";
/// The tree of the layout before, indexing records by expiry.
const EXPIRIES: &[u8] = b"expiries";
/// Records moved into chunks in one transaction when an older data directory is opened.
const MOVE_BATCH: usize = 1024;

/// The value of an index entry for the record of event `event_id`.
pub(super) fn pointer(event_id: u64) -> [u8; 9] {
    let mut pointer = [POINTER_TAG; 9];
    pointer[1..].copy_from_slice(&event_id.to_be_bytes());
    pointer
}

/// The event id an index entry points at; `None` for a value of the layout before.
pub(super) fn pointed(value: &[u8]) -> Option<u64> {
    match value.split_first() {
        Some((&POINTER_TAG, id)) if id.len() == 8 => Some(read_u64(id)),
        _ => None,
    }
}

/// Inside a transaction: removes `record`'s command-id entry if it still holds one of
/// `held` (what pointed at the record; a newer command's entry stays), and the record's
/// dead letter (a seq is one command's alone).
pub(super) fn unindex_id(
    ids: &TransactionalTree,
    dead_letters: &TransactionalTree,
    record: &CommandRecord,
    held: &[&[u8]],
) -> ConflictableTransactionResult<(), StoreError> {
    let id = record.command_id.as_bytes();
    if ids.get(id)?.is_some_and(|entry| held.contains(&&entry[..])) {
        ids.remove(id)?;
    }
    dead_letters.remove(&record.seq.to_be_bytes())?;
    Ok(())
}

/// The trees that hold a finished command.
pub(super) struct FinishedTrees<'a> {
    pub commands: &'a sled::Tree,
    pub command_ids: &'a sled::Tree,
    pub dead_letters: &'a sled::Tree,
    pub records: &'a sled::Tree,
}

/// A change to the `records` tree: chunks to remove, and chunks to write (a cut one
/// again, from its first kept id on).
#[derive(Default)]
pub(super) struct RecordsCut {
    pub removed: Vec<IVec>,
    pub written: Vec<(u64, Vec<u8>)>,
}

impl FinishedTrees<'_> {
    /// The finished record under `key`, if any.
    ///
    /// # Errors
    /// On storage failure, or [`StoreError::Corrupt`] when it does not parse.
    pub(super) fn record(&self, key: &[u8]) -> Result<Option<CommandRecord>, StoreError> {
        Ok(self.entry(key)?.map(|(_, record)| record))
    }

    /// The finished record under `key`, with the index entry that found it.
    ///
    /// # Errors
    /// As [`FinishedTrees::record`].
    pub(super) fn entry(&self, key: &[u8]) -> Result<Option<(IVec, CommandRecord)>, StoreError> {
        let Some(entry) = self.commands.get(key)? else {
            return Ok(None);
        };
        let record = match pointed(&entry) {
            Some(event_id) => self.record_at(event_id)?,
            // The layout before: the record itself.
            None => Some(serde_json::from_slice(&entry)?),
        };
        Ok(record.map(|record| (entry, record)))
    }

    /// The finished record of command `command_id`, if any.
    ///
    /// # Errors
    /// As [`FinishedTrees::record`].
    pub(super) fn by_id(&self, command_id: Uuid) -> Result<Option<CommandRecord>, StoreError> {
        let Some(entry) = self.command_ids.get(command_id.as_bytes())? else {
            return Ok(None);
        };
        match pointed(&entry) {
            Some(event_id) => self.record_at(event_id),
            // The layout before: the key, which a newer command may hold by now.
            None => Ok(self
                .record(&entry)?
                .filter(|record| record.command_id == command_id)),
        }
    }

    /// The record of the command whose event is `event_id`. `None` once compaction has
    /// removed it (after its pointer was read).
    ///
    /// # Errors
    /// On storage failure, or [`StoreError::Corrupt`] when it does not parse.
    pub(super) fn record_at(&self, event_id: u64) -> Result<Option<CommandRecord>, StoreError> {
        // The chunk holding it: one may begin before it.
        let Some(entry) = self.records.range(..=event_id.to_be_bytes()).next_back() else {
            return Ok(None);
        };
        let (first, chunk) = entry?;
        match chunks::entries(read_u64(&first), &chunk).find(|(id, _)| *id == event_id) {
            Some((_, json)) => Ok(Some(serde_json::from_slice(json)?)),
            None => Ok(None),
        }
    }

    /// In one transaction: removes each record of `expired` (with its event id) from
    /// the indexes that still point at it, with its dead letter, and makes `cut` to
    /// the records tree. Answers, per record, whether its key pointed at it: whether
    /// it was the key's finished record until now.
    ///
    /// A pointer is compared before its removal: a record whose key a newer command
    /// took (after a removal sled lost in a crash, see `recover_intake`) leaves the
    /// newer command's entries as they are.
    pub(super) fn remove(
        &self,
        expired: &[(u64, CommandRecord)],
        cut: &RecordsCut,
    ) -> Result<Vec<bool>, StoreError> {
        (
            self.commands,
            self.command_ids,
            self.dead_letters,
            self.records,
        )
            .transaction(|(commands, ids, dead_letters, records)| {
                let mut deleted = Vec::with_capacity(expired.len());
                for (event_id, record) in expired {
                    let pointer = pointer(*event_id);
                    let key = record.idempotency_key.as_bytes();
                    let current = commands.get(key)?.is_some_and(|entry| entry == pointer);
                    if current {
                        commands.remove(key)?;
                    }
                    unindex_id(ids, dead_letters, record, &[&pointer])?;
                    deleted.push(current);
                }
                // Removes first: a chunk written again may be under the id it had.
                for chunk in &cut.removed {
                    records.remove(chunk)?;
                }
                for (first, chunk) in &cut.written {
                    records.insert(&first.to_be_bytes(), chunk.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(deleted)
            })
            .map_err(flatten)
    }

    /// Removes `record`, found under `key` through `entry` ([`FinishedTrees::entry`]),
    /// from the indexes that still hold it, and its dead letter, in one transaction.
    /// Its chunk keeps it until it expires, with nothing pointing at it.
    pub(super) fn unindex(
        &self,
        key: &[u8],
        entry: &IVec,
        record: &CommandRecord,
    ) -> Result<(), StoreError> {
        (self.commands, self.command_ids, self.dead_letters)
            .transaction(|(commands, ids, dead_letters)| {
                if commands.get(key)?.as_ref() == Some(entry) {
                    commands.remove(key)?;
                }
                // A pointer, or in the layout before, the key.
                unindex_id(ids, dead_letters, record, &[entry, key])
            })
            .map_err(flatten)
    }
}

impl Inner {
    /// Moves the finished records of a data directory from before `records` into
    /// chunks, once: each pointed at from its key and its id. Then drops the `expiries`
    /// index and the entries of `command_ids` that point at no record, and marks the
    /// move done in `meta`.
    ///
    /// One pass over `commands`, in batches of [`MOVE_BATCH`] records, each sorted by
    /// event id into chunks of the consecutive ones (keyed in random order, a batch's
    /// records mostly make chunks of one; they are packed as new ones are once they
    /// expire). Interrupted, it goes on from what it had not moved: a moved key holds a
    /// pointer. A record without an event id (only a pending one, in a directory from
    /// before the first release) stays as it is, and is read as it is.
    pub(super) fn chunk_records(&self) -> Result<(), StoreError> {
        if self.meta.contains_key(RECORDS_CHUNKED)? {
            return Ok(());
        }
        let (mut moved, mut left) = (0, 0);
        let mut after = Bound::Unbounded;
        loop {
            let mut batch = Vec::with_capacity(MOVE_BATCH);
            let mut last = None;
            for entry in self.commands.range((after.clone(), Bound::Unbounded)) {
                let (key, value) = entry?;
                last = Some(key.clone());
                if pointed(&value).is_some() {
                    continue;
                }
                let record: CommandRecord = serde_json::from_slice(&value)?;
                match record.event_id {
                    Some(event_id) => batch.push((event_id, key, value, record.command_id)),
                    None => left += 1,
                }
                if batch.len() == MOVE_BATCH {
                    break;
                }
            }
            batch.sort_unstable_by_key(|(event_id, ..)| *event_id);
            self.move_records(&batch)?;
            moved += batch.len();
            match last {
                Some(last) if batch.len() == MOVE_BATCH => after = Bound::Excluded(last),
                _ => break,
            }
        }
        let mut dangling = sled::Batch::default();
        for entry in self.command_ids.iter() {
            let (id, value) = entry?;
            // The layout before: the key, whose record is another command's by now.
            let pointless = pointed(&value).is_none()
                && self
                    .finished_trees()
                    .record(&value)?
                    .is_none_or(|record| record.command_id.as_bytes()[..] != id[..]);
            if pointless {
                dangling.remove(id);
            }
        }
        self.command_ids.apply_batch(dangling)?;
        self.db.drop_tree(EXPIRIES)?;
        self.meta.remove(EXPIRIES_INDEXED)?;
        self.flush_sled()?;
        self.meta.insert(RECORDS_CHUNKED, &[])?;
        self.flush_sled()?;
        if moved + left > 0 {
            tracing::info!(
                moved,
                left_without_event_id = left,
                "moved the finished records into chunks"
            );
        }
        Ok(())
    }

    /// Moves the records `batch` holds (event id, key, JSON, command id; in event-id
    /// order) into chunks, in one transaction.
    fn move_records(&self, batch: &[(u64, IVec, IVec, Uuid)]) -> Result<(), StoreError> {
        let chunks = chunks::chunks(batch.iter().map(|(id, _, json, _)| (*id, json.as_ref())));
        (&self.commands, &self.command_ids, &self.records)
            .transaction(|(commands, ids, records)| {
                for (first, chunk) in &chunks {
                    records.insert(&first.to_be_bytes(), chunk.as_slice())?;
                }
                for (event_id, key, _, command_id) in batch {
                    let pointer = pointer(*event_id);
                    commands.insert(key, &pointer)?;
                    ids.insert(command_id.as_bytes(), &pointer)?;
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(flatten)
    }
}
