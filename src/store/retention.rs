//! Retention: the janitor's compaction of the event log and of finished commands, and
//! the `expiries` index it reads.
//!
//! The sled write of a finished command (a checkpoint's) also writes its `expiries` entry,
//! (settled time in unix ms, seq) -> idempotency key, so the entries are in the order
//! the records expire and applies append at the end. Expiry is a range scan below the
//! cutoff: it reads only what it removes, where a scan of every record would cost a
//! long-running node time in proportion to its whole retention, every minute
//! (BENCHMARKS.md, section 4).

use std::ops::Bound;
use std::sync::PoisonError;

use sled::transaction::ConflictableTransactionError;
use sled::{IVec, Transactional};
use time::OffsetDateTime;

use super::event_chunks;
use super::{flatten, read_u64, Inner, Store, StoreError};
use crate::model::{unix_ms, CommandRecord};

/// `meta` key, present once every finished record has its `expiries` entry.
pub(super) const EXPIRIES_INDEXED: &[u8] = b"expiries_indexed";
/// Most expired commands removed in one transaction. Each transaction holds sled's
/// global lock, so a checkpoint's writes (and any sled read) wait for it: small chunks keep that wait to a few
/// milliseconds, and cost no more per record than large ones (chunks of 1024 took
/// slightly longer per record when tried).
pub(super) const COMPACT_CHUNK: usize = 64;
/// Entries written per batch when an older data directory is indexed.
const INDEX_BATCH: usize = 4096;

/// The `expiries` key of the record of command `seq`, settled at `settled_at`.
pub(super) fn expiry_key_for(settled_at: OffsetDateTime, seq: u64) -> [u8; 16] {
    let mut entry = [0; 16];
    entry[..8].copy_from_slice(&unix_ms(settled_at).to_be_bytes());
    entry[8..].copy_from_slice(&seq.to_be_bytes());
    entry
}

/// The trees that hold a finished command.
pub(super) struct FinishedTrees<'a> {
    pub commands: &'a sled::Tree,
    pub command_ids: &'a sled::Tree,
    pub dead_letters: &'a sled::Tree,
    pub expiries: &'a sled::Tree,
}

impl FinishedTrees<'_> {
    /// The finished record an `expiries` entry stands for: the one under its key with
    /// its settled time and seq. `None` for an entry without one (it is deleted alone)
    /// and for a record that does not parse (kept and logged, so that expiry goes on
    /// past it).
    fn expired_record(
        &self,
        entry: &[u8],
        key: &[u8],
    ) -> Result<Option<CommandRecord>, StoreError> {
        let record = match self.record(key) {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(None),
            Err(StoreError::Corrupt(err)) => {
                tracing::error!(key = %String::from_utf8_lossy(key), error = %err,
                    "a finished command record does not parse; it is kept, not expired");
                return Ok(None);
            }
            Err(err) => return Err(err),
        };
        let indexed = record
            .settled_at
            .is_some_and(|at| entry == expiry_key_for(at, record.seq));
        Ok(indexed.then_some(record))
    }

    /// The finished record under `key`, if any.
    ///
    /// # Errors
    /// On storage failure, or [`StoreError::Corrupt`] when it does not parse.
    pub(super) fn record(&self, key: &[u8]) -> Result<Option<CommandRecord>, StoreError> {
        match self.commands.get(key)? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Deletes, in one transaction, the `expiries` entries and each finished record
    /// that is still under its key, with its id index and dead letter. Answers, per
    /// record, whether it was deleted.
    ///
    /// The records were read before the transaction. If one was removed meanwhile (by
    /// another compaction) and its key taken by a new command, the new command's
    /// record must stay: so a record is deleted only while its own command id is still
    /// indexed, and that index entry goes with the record.
    pub(super) fn remove(
        &self,
        entries: &[IVec],
        records: &[CommandRecord],
    ) -> Result<Vec<bool>, StoreError> {
        (
            self.commands,
            self.command_ids,
            self.dead_letters,
            self.expiries,
        )
            .transaction(|(commands, ids, dead_letters, expiries)| {
                for entry in entries {
                    expiries.remove(entry)?;
                }
                let mut deleted = Vec::with_capacity(records.len());
                for record in records {
                    let current = ids.remove(record.command_id.as_bytes())?.is_some();
                    if current {
                        commands.remove(record.idempotency_key.as_bytes())?;
                        dead_letters.remove(&record.seq.to_be_bytes())?;
                    }
                    deleted.push(current);
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(deleted)
            })
            .map_err(flatten)
    }

    /// Deletes one finished record and its `expiries` entry.
    pub(super) fn remove_record(&self, record: &CommandRecord) -> Result<(), StoreError> {
        let entries: Vec<IVec> = record
            .settled_at
            .map(|at| IVec::from(&expiry_key_for(at, record.seq)))
            .into_iter()
            .collect();
        self.remove(&entries, std::slice::from_ref(record))
            .map(drop)
    }
}

impl Inner {
    /// Indexes every finished record by its expiry, once: a data directory from before
    /// the `expiries` tree has records without an entry. Marked done in `meta` after
    /// the entries are durable; interrupted, it starts over (the entries are the same).
    pub(super) fn index_expiries(&self) -> Result<(), StoreError> {
        let meta = &self.meta;
        if meta.contains_key(EXPIRIES_INDEXED)? {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        let mut indexed = 0_usize;
        for entry in self.commands.iter() {
            let (key, bytes) = entry?;
            let record: CommandRecord = serde_json::from_slice(&bytes)?;
            let Some(at) = record.settled_at else {
                continue;
            };
            batch.insert(&expiry_key_for(at, record.seq), key);
            indexed += 1;
            if indexed % INDEX_BATCH == 0 {
                self.expiries.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        self.expiries.apply_batch(batch)?;
        self.flush_sled()?;
        meta.insert(EXPIRIES_INDEXED, &[])?;
        self.flush_sled()?;
        if indexed > 0 {
            tracing::info!(indexed, "indexed the finished commands by expiry");
        }
        Ok(())
    }
}

impl Store {
    /// Drops events beyond the newest `keep_events`, and finished command records
    /// settled before `commands_before` (pending ones are never dropped). Returns how
    /// many of each went.
    ///
    /// Both read only what they remove: events by the chunks before the first kept
    /// event (and the one that holds it, written again from it on), records by their `expiries`
    /// entries, whose time is whole milliseconds (a record settled within the
    /// millisecond before `commands_before` may stay until the next compaction).
    /// Records go in transactions of [`COMPACT_CHUNK`]. One at a time (a second call
    /// waits for the first): the janitor's.
    ///
    /// First writes to sled the applies logged but not yet written (`unwritten`), so
    /// that what has expired is all in sled.
    ///
    /// # Errors
    /// On storage failure.
    pub fn compact(
        &self,
        keep_events: u64,
        commands_before: OffsetDateTime,
    ) -> Result<(usize, usize), StoreError> {
        // It guards nothing a panic could leave half-changed.
        let _one = (self.inner.compacting.lock()).unwrap_or_else(PoisonError::into_inner);
        // Nothing more is written to sled once a sync has failed.
        self.inner.check_synced()?;
        // The head first: every event up to it is then written. Up to what is logged
        // now, not what steps log meanwhile: a bounded write.
        let head = self.watermark();
        let logged = self.inner.unwritten().last_event_id;
        self.inner.write_unwritten(logged)?;
        let events = self.trim_events(head, keep_events)?;
        let commands = self.expire_commands(commands_before)?;
        Ok((events, commands))
    }

    /// Keeps the last `keep_events` events up to `head`: removes the chunks
    /// (`event_chunks`) wholly before the first of them, and writes the one that holds
    /// it again from it on, under its id, in one batch. Answers how many events went.
    fn trim_events(&self, head: u64, keep_events: u64) -> Result<usize, StoreError> {
        if head <= keep_events {
            return Ok(0);
        }
        let first_kept = head - keep_events + 1;
        let events = &self.inner.events;
        let mut removed = 0;
        for entry in events.range(..first_kept.to_be_bytes()) {
            let (key, value) = entry?;
            let frames: Vec<_> = event_chunks::frames(read_u64(&key), &value).collect();
            let gone = frames.iter().filter(|(id, _)| *id < first_kept).count();
            if gone == frames.len() {
                // A plain remove: a batch would take sled's process-wide lock.
                events.remove(key)?;
            } else {
                // The one that holds the first kept event: cut, atomically.
                let mut batch = sled::Batch::default();
                batch.remove(key);
                for (first, chunk) in event_chunks::chunks(frames[gone..].iter().copied()) {
                    batch.insert(&first.to_be_bytes(), chunk);
                }
                events.apply_batch(batch)?;
            }
            removed += gone;
        }
        Ok(removed)
    }

    fn expire_commands(&self, before: OffsetDateTime) -> Result<usize, StoreError> {
        let trees = self.inner.finished_trees();
        let cut = IVec::from(&unix_ms(before).to_be_bytes());
        let mut removed = 0;
        // Each chunk starts after the last entry of the one before: a sure end.
        let mut after = Bound::Unbounded;
        loop {
            let range = (after.clone(), Bound::Excluded(cut.clone()));
            let mut entries = Vec::with_capacity(COMPACT_CHUNK);
            let mut records = Vec::with_capacity(COMPACT_CHUNK);
            for entry in self.inner.expiries.range(range).take(COMPACT_CHUNK) {
                let (entry, key) = entry?;
                if let Some(record) = trees.expired_record(&entry, &key)? {
                    records.push(record);
                }
                entries.push(entry);
            }
            let Some(last) = entries.last() else {
                break;
            };
            after = Bound::Excluded(last.clone());
            let deleted = trees.remove(&entries, &records)?;
            let mut pending = self.pending_table();
            for (record, deleted) in records.iter().zip(deleted) {
                if deleted {
                    pending.forget_finished(record.idempotency_key.as_bytes());
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            // A key is free for a new command once its record is gone; the sooner that
            // is durable, the less recovery has to repair (`recover_intake`).
            self.inner.flush_sled()?;
        }
        Ok(removed)
    }
}
