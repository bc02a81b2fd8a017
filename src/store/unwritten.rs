//! The applies that are logged but not yet written to sled: the read side's view of the
//! last steps, and what a checkpoint writes.
//!
//! Why: a sled 0.34 transaction takes the process-wide write lock and seals sled's log
//! buffer (waking its I/O pool) before and after its batch; on the consumer's thread
//! that was the largest part of what a step adds to the window at the 99th percentile
//! (BENCHMARKS.md, section 1d). A step only needs its applies to survive a crash of the
//! process, which the apply log gives with one `write(2)`, and to be visible to reads
//! before its events go out. So a step decides from memory (the projection's rows,
//! this table and the finished keys' hashes; `apply`), logs, and puts its applies here;
//! a checkpoint writes them to sled in a few large transactions on a thread of its own
//! ([`Inner::write_unwritten`]) and only then removes them from here.
//!
//! Every read of a finished command or an event looks here first, then in sled. An
//! apply leaves this table only after the sled transaction that holds it committed, so
//! one of the two looks finds whatever was logged before the first: looking in the
//! other order could miss an apply written to sled and removed from here in between.
//! The table holds a contiguous run of event ids (applies are written and removed
//! oldest first): what is older is in sled.
//!
//! Bounds: a checkpoint is due once [`UNWRITTEN_DUE`] applies wait here, or the oldest
//! has waited [`UNWRITTEN_AGE`], and the consumer waits before a step while
//! [`Unwritten::is_full`] (a checkpoint that cannot
//! keep up holds the consumer back rather than memory growing without end).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::event_ids::EventIds;
use super::{Applied, Inner, StoreError};
use crate::hub::EventFrame;
use crate::model::CommandRecord;

/// Applies waiting here that make a checkpoint due, whatever else it would release.
pub(super) const UNWRITTEN_DUE: usize = 4096;
/// How long the oldest apply waits here before a checkpoint is due, however few wait:
/// until a checkpoint has synced it, a published apply is in the page cache only (the
/// apply log is never synced), and a power loss would take it (its command applies
/// again from the intake log, perhaps otherwise, under a new event id: `event_ids`). sled's own
/// flusher left that window at about half a second; so does this.
const UNWRITTEN_AGE: Duration = Duration::from_millis(500);
/// Applies waiting here beyond which the consumer waits for a checkpoint to write them.
const UNWRITTEN_MAX: usize = 16 * UNWRITTEN_DUE;
/// Bytes (as logged) waiting here beyond which the consumer waits, for applies with
/// long notes: a few hundred of those are megabytes.
const UNWRITTEN_MAX_BYTES: usize = 64 << 20;
/// Most applies written to sled in one transaction, and most bytes of them (as logged):
/// each transaction holds sled's write lock, which every other sled call waits for (a
/// handler's read, the intake writer's look-up of a finished key), so a few
/// milliseconds at most. A chunk holds one apply at least, whatever its size.
pub(super) const WRITE_CHUNK: usize = 256;
const WRITE_CHUNK_BYTES: usize = 1 << 20;

#[derive(Default)]
pub(super) struct Unwritten {
    /// The last event id logged: the next step's first event follows it. Starts at
    /// sled's last event id once the apply log is replayed.
    pub(super) last_event_id: u64,
    /// How far the next steps may give out ids (`event_ids`).
    pub(super) event_ids: EventIds,
    /// Event id -> the apply that published it.
    applies: BTreeMap<u64, Entry>,
    /// Idempotency key -> event id.
    by_key: HashMap<String, u64>,
    /// Command id -> event id.
    by_id: HashMap<Uuid, u64>,
    bytes: usize,
}

struct Entry {
    /// Shared with a checkpoint's chunk while it is written to sled.
    applied: Arc<Applied>,
    /// Its share of its step's bytes in the apply log.
    bytes: usize,
    logged_at: Instant,
}

impl Unwritten {
    /// Panics unless `step` (in event-id order) follows the last event id logged without
    /// a gap: one consumer steps at a time, and a step spends its ids only when logged.
    pub(super) fn assert_follows(&self, step: &[&Applied]) {
        let ids = step.iter().map(|applied| applied.frame.id);
        assert!(
            ids.eq(self.last_event_id + 1..=self.last_event_id + step.len() as u64),
            "a step's event ids must follow the last one logged ({}) without a gap",
            self.last_event_id
        );
    }

    /// Takes in one logged step, `logged_bytes` long in the apply log, in event-id order
    /// ([`Unwritten::assert_follows`]).
    pub(super) fn insert(&mut self, step: Vec<Applied>, logged_bytes: usize) {
        let bytes = logged_bytes / step.len().max(1);
        let logged_at = Instant::now();
        for applied in step {
            let id = applied.frame.id;
            self.by_key
                .insert(applied.record.idempotency_key.clone(), id);
            self.by_id.insert(applied.record.command_id, id);
            self.applies.insert(
                id,
                Entry {
                    applied: Arc::new(applied),
                    bytes,
                    logged_at,
                },
            );
            self.last_event_id = id;
            self.bytes += bytes;
        }
    }

    /// When a checkpoint is due for the oldest apply waiting here ([`UNWRITTEN_AGE`]).
    pub(super) fn due_at(&self) -> Option<Instant> {
        let oldest = self.applies.values().next()?;
        Some(oldest.logged_at + UNWRITTEN_AGE)
    }

    pub(super) fn len(&self) -> usize {
        self.applies.len()
    }

    /// Whether the consumer should wait for a checkpoint before its next step: this
    /// table is at its bounds, or the event ids reserved are running out.
    pub(super) fn is_full(&self) -> bool {
        self.applies.len() >= UNWRITTEN_MAX
            || self.bytes >= UNWRITTEN_MAX_BYTES
            || self.event_ids.is_short(self.last_event_id)
    }

    /// The finished record under `key`, if its apply waits here.
    pub(super) fn by_key(&self, key: &str) -> Option<&CommandRecord> {
        let id = self.by_key.get(key)?;
        self.applies.get(id).map(|entry| &entry.applied.record)
    }

    /// The finished record of this command, if its apply waits here.
    pub(super) fn by_id(&self, command_id: Uuid) -> Option<&CommandRecord> {
        let id = self.by_id.get(&command_id)?;
        self.applies.get(id).map(|entry| &entry.applied.record)
    }

    /// The oldest event id waiting here: every older event is in sled.
    pub(super) fn first_event_id(&self) -> Option<u64> {
        self.applies.keys().next().copied()
    }

    /// Up to `limit` events after `after`, none past `up_to`, in id order.
    pub(super) fn events(&self, after: u64, up_to: u64, limit: usize) -> Vec<EventFrame> {
        self.applies
            .range(after.saturating_add(1)..=up_to)
            .take(limit)
            .map(|(_, entry)| entry.applied.frame.clone())
            .collect()
    }

    /// The dead-lettered records waiting here.
    pub(super) fn dead_letters(&self) -> Vec<CommandRecord> {
        self.applies
            .values()
            .map(|entry| &entry.applied.record)
            .filter(|record| record.is_dead_lettered())
            .cloned()
            .collect()
    }

    /// The oldest applies, none past `up_to`: a chunk of [`WRITE_CHUNK`] (and
    /// `WRITE_CHUNK_BYTES`) at most.
    fn oldest(&self, up_to: u64) -> Vec<Arc<Applied>> {
        let mut bytes = 0;
        self.applies
            .range(..=up_to)
            .take(WRITE_CHUNK)
            .take_while(|(_, entry)| {
                let fits = bytes == 0 || bytes + entry.bytes <= WRITE_CHUNK_BYTES;
                bytes += entry.bytes.max(1);
                fits
            })
            .map(|(_, entry)| entry.applied.clone())
            .collect()
    }

    /// Drops the applies up to `through`, written to sled.
    fn remove_through(&mut self, through: u64) {
        let rest = self.applies.split_off(&(through + 1));
        let written = std::mem::replace(&mut self.applies, rest);
        for (id, Entry { applied, bytes, .. }) in written {
            // Only if it still points here: a key compacted and taken again could have
            // a newer apply waiting under it.
            if self.by_key.get(&applied.record.idempotency_key) == Some(&id) {
                self.by_key.remove(&applied.record.idempotency_key);
            }
            if self.by_id.get(&applied.record.command_id) == Some(&id) {
                self.by_id.remove(&applied.record.command_id);
            }
            self.bytes = self.bytes.saturating_sub(bytes);
        }
    }
}

impl Inner {
    /// Writes to sled every apply waiting in the table up to event `up_to`, oldest
    /// first, in transactions of [`WRITE_CHUNK`]; each also moves sled's last event id
    /// on, so a crash between two leaves sled a prefix of the log that the replay
    /// completes. An apply leaves the table once its transaction committed. One writer
    /// at a time (a checkpoint's thread, the janitor), so none is written twice and
    /// the last event id only grows.
    ///
    /// # Errors
    /// On storage failure; what was not written stays in the table for the next try.
    pub(super) fn write_unwritten(&self, up_to: u64) -> Result<(), StoreError> {
        let _one_writer = self.writer.lock().expect("writer lock poisoned");
        loop {
            let chunk = self.unwritten().oldest(up_to);
            let Some(last) = chunk.last().map(|applied| applied.frame.id) else {
                return Ok(());
            };
            self.write_applies(&chunk, false)?;
            self.unwritten_mut().remove_through(last);
        }
    }

    pub(super) fn unwritten(&self) -> std::sync::RwLockReadGuard<'_, Unwritten> {
        self.unwritten
            .read()
            .expect("unwritten table lock poisoned")
    }

    pub(super) fn unwritten_mut(&self) -> std::sync::RwLockWriteGuard<'_, Unwritten> {
        self.unwritten
            .write()
            .expect("unwritten table lock poisoned")
    }
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::*;
    use crate::model::{CommandBody, NOTES_MAX_CHARS};
    use crate::store::{Decision, Store};

    /// The bound the consumer waits on is kept by what the table holds, in count and in
    /// bytes, and a checkpoint brings both back to nothing: were its accounting to
    /// drift, the consumer would wait for ever.
    #[test]
    fn the_table_is_bounded_by_its_bytes_and_a_checkpoint_empties_it() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let notes = "n".repeat(NOTES_MAX_CHARS);
        let now = OffsetDateTime::now_utc();
        let mut logged = 0;
        while !store.unwritten_is_full() {
            let records: Vec<_> = (0..256)
                .map(|_| CommandRecord {
                    seq: store.next_seq().expect("a seq"),
                    ..CommandRecord::accepted(
                        Uuid::now_v7(),
                        Uuid::new_v4().to_string(),
                        "f".to_owned(),
                        CommandBody::Create {
                            title: "t".to_owned(),
                            notes: notes.clone(),
                        },
                        now,
                        0,
                    )
                })
                .collect();
            let batch: Vec<_> = records
                .iter()
                .map(|record| (record, &Decision::Apply))
                .collect();
            let applied = store.apply_batch(&batch, now).expect("applied");
            store.log_applied(applied.iter().flatten()).expect("logged");
            logged += records.len();
            assert!(logged <= UNWRITTEN_MAX, "never full");
        }
        {
            let table = store.inner.unwritten();
            assert!(table.len() < UNWRITTEN_MAX, "full by its bytes: long notes");
            assert!(table.bytes >= UNWRITTEN_MAX_BYTES);
        }
        store.checkpoint().expect("checkpointed");
        assert!(!store.unwritten_is_full());
        let table = store.inner.unwritten();
        assert_eq!((table.len(), table.bytes), (0, 0));
        assert!(table.by_key.is_empty() && table.by_id.is_empty());
    }
}
