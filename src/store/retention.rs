//! Retention: the janitor's compaction of the event log and of finished commands.
//!
//! Both are kept in sled in chunks in event order (`chunks`, `finished`), so each is
//! trimmed from its start: events beyond a number kept, records settled before a
//! cutoff. Either reads only what it removes (and the chunk where it stops, and any
//! record it walks past: see `Store::compact`), where a scan of every record would cost
//! a long-running node time in proportion to its whole retention, every minute
//! (BENCHMARKS.md, section 4).

use std::ops::Bound;
use std::sync::PoisonError;

use time::OffsetDateTime;

use super::finished::RecordsCut;
use super::{chunks, read_u64, Store, StoreError};
use crate::model::CommandRecord;

/// Most expired commands removed in one transaction (whole chunks of them, so a few
/// more). Each transaction holds sled's global lock, so a checkpoint's writes (and any
/// sled read) wait for it: small transactions keep that wait to a few milliseconds.
pub(super) const COMPACT_CHUNK: usize = 64;

impl Store {
    /// Drops events beyond the newest `keep_events`, and finished command records
    /// settled before `commands_before` (pending ones are never dropped). Returns how
    /// many of each went.
    ///
    /// Both read only what they remove: the chunks before the first event kept, and
    /// the records in event order up to the first settled at or after
    /// `commands_before` (the one that holds it is written again from it on; past
    /// records stamped later than now, see `expire_commands`). Records
    /// go in transactions of about [`COMPACT_CHUNK`]. One at a time (a second call
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

    /// Keeps the last `keep_events` events up to `head`: removes the chunks wholly
    /// before the first of them, and writes the one that holds it again from it on,
    /// under its id, in one batch. Answers how many events went.
    fn trim_events(&self, head: u64, keep_events: u64) -> Result<usize, StoreError> {
        let first_kept = self.first_of_last_events(head, keep_events);
        if first_kept <= 1 {
            return Ok(0);
        }
        let events = &self.inner.events;
        let mut removed = 0;
        for entry in events.range(..first_kept.to_be_bytes()) {
            let (key, value) = entry?;
            let frames: Vec<_> = chunks::entries(read_u64(&key), &value).collect();
            let gone = frames.iter().filter(|(id, _)| *id < first_kept).count();
            if gone == frames.len() {
                // A plain remove: a batch would take sled's process-wide lock.
                events.remove(key)?;
            } else {
                // The one that holds the first kept event: cut, atomically.
                let mut batch = sled::Batch::default();
                batch.remove(key);
                for (first, chunk) in chunks::chunks(frames[gone..].iter().copied()) {
                    batch.insert(&first.to_be_bytes(), chunk);
                }
                events.apply_batch(batch)?;
            }
            removed += gone;
        }
        Ok(removed)
    }

    /// Removes the finished records settled before `before`, from the first on, in
    /// transactions of whole chunks of about [`COMPACT_CHUNK`] records, and stops at
    /// the first record settled since (the chunk it is in is cut there). Answers how
    /// many records went that were their key's (see
    /// [`super::finished::FinishedTrees::remove`]).
    ///
    /// Two kinds of record are kept and walked past: one stamped later than now (the
    /// wall clock was ahead when it settled; stopping there would keep everything
    /// after it until then), which goes once its time has come, and one that does not
    /// parse (sled checksums what it stores, so it should never be), which stays. The
    /// chunk around either is written again without the records that went.
    fn expire_commands(&self, before: OffsetDateTime) -> Result<usize, StoreError> {
        let trees = self.inner.finished_trees();
        let mut removed = 0;
        let mut walk = RecordWalk {
            before,
            now: OffsetDateTime::now_utc(),
            // Read once: segments are only released meanwhile, which would let more go.
            logged_from: self.pending_table().first_logged_seq(),
            ahead: None,
            unreadable: None,
        };
        // Each pass starts after the last chunk the one before it read.
        let mut after = Bound::Unbounded;
        loop {
            let mut expired: Vec<(u64, CommandRecord)> = Vec::new();
            let mut cut = RecordsCut::default();
            // Set when this pass stopped full: the last chunk it read.
            let mut next_after = None;
            for entry in trees.records.range((after.clone(), Bound::Unbounded)) {
                let (key, value) = entry?;
                let entries: Vec<_> = chunks::entries(read_u64(&key), &value).collect();
                let expired_before = expired.len();
                let (kept, reached_kept) = walk.sort(&entries, &mut expired);
                if expired.len() > expired_before {
                    cut.removed.push(key.clone());
                    cut.written.extend(chunks::chunks(kept));
                }
                if reached_kept {
                    break;
                }
                if expired.len() >= COMPACT_CHUNK {
                    next_after = Some(key);
                    break;
                }
            }
            if !cut.removed.is_empty() {
                let deleted = trees.remove(&expired, &cut)?;
                let mut pending = self.pending_table();
                for ((_, record), deleted) in expired.iter().zip(deleted) {
                    if deleted {
                        pending.forget_finished(record.idempotency_key.as_bytes());
                        removed += 1;
                    }
                }
            }
            match next_after {
                Some(key) => after = Bound::Excluded(key),
                None => break,
            }
        }
        if let Some(event_id) = walk.ahead {
            tracing::warn!(first = event_id, "finished commands stamped later than now (the clock was ahead when they settled) are kept until then, and read at every compaction");
        }
        if let Some(event_id) = walk.unreadable {
            tracing::error!(
                first = event_id,
                "finished command records that do not parse are kept, and read at every compaction"
            );
        }
        if removed > 0 {
            // A key is free for a new command once its record is gone; the sooner that
            // is durable, the less recovery has to repair (`recover_intake`).
            self.inner.flush_sled()?;
        }
        Ok(removed)
    }
}

/// A compaction's walk of the finished records ([`Store::compact`]): its cutoff, its
/// time, and the first of each kind of record it walked past.
struct RecordWalk {
    before: OffsetDateTime,
    now: OffsetDateTime,
    /// The first seq still in the intake log: a record of it or a later one stops the
    /// walk, as one settled since the cutoff does. Expired, its command would be taken
    /// back as pending by a restart, which reads the log again, and applied twice.
    logged_from: Option<u64>,
    ahead: Option<u64>,
    unreadable: Option<u64>,
}

impl RecordWalk {
    /// Sorts a chunk's entries: the expired go to `expired`. Answers those kept (any
    /// walked past, and every one from the first settled since the cutoff on) and
    /// whether it reached that one, where the walk stops.
    fn sort<'a>(
        &mut self,
        entries: &[(u64, &'a [u8])],
        expired: &mut Vec<(u64, CommandRecord)>,
    ) -> (Vec<(u64, &'a [u8])>, bool) {
        let mut kept = Vec::new();
        for (at, &(event_id, json)) in entries.iter().enumerate() {
            let record = match serde_json::from_slice::<CommandRecord>(json) {
                Ok(record) => record,
                Err(err) => {
                    tracing::debug!(event_id, error = %err, "a finished command record does not parse");
                    self.unreadable.get_or_insert(event_id);
                    kept.push((event_id, json));
                    continue;
                }
            };
            if self.logged_from.is_some_and(|first| record.seq >= first) {
                kept.extend_from_slice(&entries[at..]);
                return (kept, true);
            }
            match record.settled_at {
                Some(settled) if settled > self.now => {
                    self.ahead.get_or_insert(event_id);
                    kept.push((event_id, json));
                }
                Some(settled) if settled >= self.before => {
                    kept.extend_from_slice(&entries[at..]);
                    return (kept, true);
                }
                _ => expired.push((event_id, record)),
            }
        }
        (kept, false)
    }
}
