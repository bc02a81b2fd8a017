//! The pending table: the accepted commands not yet applied (by key, by id and by
//! segment, with their records' bytes), the closed segments they no longer hold up, and
//! the count of the finished keys' hashes that spares the writer most reads of sled.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};

use uuid::Uuid;

use crate::model::CommandRecord;
use crate::store::Store;

/// Accepted commands not yet applied: the part of the idempotency table that lives in
/// the intake log instead of sled.
#[derive(Default)]
pub(in crate::store) struct PendingTable {
    pub(super) by_key: HashMap<String, Pending>,
    key_by_id: HashMap<Uuid, String>,
    /// The encoded size of every pending command's record, summed.
    pub(super) bytes: usize,
    /// Unfinished commands per segment; a closed segment at zero moves to
    /// `releasable`.
    pub(super) unfinished: BTreeMap<u64, usize>,
    /// Closed segments whose commands have all finished, to be released (kept as a
    /// spare or deleted) by a checkpoint (`checkpoint`).
    pub(in crate::store) releasable: Vec<u64>,
    /// The segment the writer appends to; never released while it is active.
    pub(super) active: u64,
    /// Spare files, by the segment number they last had (and their records carry).
    pub(super) spares: Vec<u64>,
    /// The first seq of each segment on disk (not released): a restart reads their
    /// records again, and takes one back as pending unless its finished record says it
    /// finished, so no finished record at or past the first of them may expire yet
    /// (`Store::compact`).
    first_seqs: BTreeMap<u64, u64>,
    /// How many finished records (logged, or in sled) each idempotency key's 32-bit
    /// hash stands for. One per finished command in the retention, so it is kept small: 9 bytes a
    /// bucket, 10–21 bytes a key by the table's fill (against 17 a bucket for a 64-bit
    /// hash and count). A 32-bit hash makes a new key look possibly finished, one sled
    /// read, with a chance of (finished keys / 2^32): 2% at a day of 1000 commands/s.
    finished: HashMap<u32, u16>,
    /// Seeded per process, so no client can choose keys that collide.
    key_hasher: RandomState,
}

pub(super) struct Pending {
    pub(super) record: CommandRecord,
    segment: u64,
    /// The record's encoded size in the log.
    bytes: usize,
}

impl PendingTable {
    /// Enters a command whose record takes `bytes` in `segment`.
    pub(super) fn insert(&mut self, record: CommandRecord, segment: u64, bytes: usize) {
        self.hold(segment, record.seq);
        *self.unfinished.entry(segment).or_default() += 1;
        self.bytes += bytes;
        self.key_by_id
            .insert(record.command_id, record.idempotency_key.clone());
        self.by_key.insert(
            record.idempotency_key.clone(),
            Pending {
                record,
                segment,
                bytes,
            },
        );
    }

    /// Notes that `segment`, on disk, holds the record of command `seq`.
    pub(super) fn hold(&mut self, segment: u64, seq: u64) {
        let first = self.first_seqs.entry(segment).or_insert(seq);
        *first = (*first).min(seq);
    }

    /// `segment` is released: a restart no longer reads it.
    pub(super) fn released(&mut self, segment: u64) {
        self.first_seqs.remove(&segment);
    }

    /// The lowest seq whose record a restart would read again from the intake log, if
    /// any: finished records from it on must stay until their segments are released.
    pub(in crate::store) fn first_logged_seq(&self) -> Option<u64> {
        self.first_seqs.values().min().copied()
    }

    /// As if every segment on disk had been released (`Store::compact_released`).
    #[cfg(test)]
    pub(in crate::store) fn release_all_logged(&mut self) {
        self.first_seqs.clear();
    }

    /// Removes a command that will not finish (its batch was refused).
    pub(super) fn remove(&mut self, key: &str, command_id: Uuid) {
        self.take(key, command_id);
    }

    /// Removes a command whose finished record is now logged (`unwritten`) and counts its
    /// key as finished.
    fn finish(&mut self, key: &str, command_id: Uuid) {
        if self.take(key, command_id) {
            self.count_finished(key.as_bytes());
        }
    }

    /// Removes the command if it is pending under this id (false if not); its segment
    /// becomes releasable if it was the last unfinished one of a closed segment.
    fn take(&mut self, key: &str, command_id: Uuid) -> bool {
        match self.by_key.get(key) {
            Some(pending) if pending.record.command_id == command_id => {}
            _ => return false,
        }
        let pending = self.by_key.remove(key).expect("looked up above");
        self.key_by_id.remove(&command_id);
        self.bytes -= pending.bytes;
        if let Some(left) = self.unfinished.get_mut(&pending.segment) {
            *left -= 1;
            if *left == 0 && pending.segment != self.active {
                self.unfinished.remove(&pending.segment);
                self.releasable.push(pending.segment);
            }
        }
        true
    }

    /// Commands accepted and not finished.
    pub(in crate::store) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// What waits to be applied: commands, and bytes of their records.
    pub(super) fn waiting(&self) -> Waiting {
        Waiting {
            commands: self.by_key.len(),
            bytes: self.bytes,
        }
    }

    fn finished_hash(&self, key: &[u8]) -> u32 {
        // The low half of SipHash's output: as evenly spread as the whole.
        self.key_hasher.hash_one(key) as u32
    }

    pub(super) fn count_finished(&mut self, key: &[u8]) {
        let hash = self.finished_hash(key);
        let count = self.finished.entry(hash).or_default();
        *count = count.saturating_add(1);
    }

    /// A finished record under `key` was removed from sled (compaction). A count that
    /// reached its ceiling stays there: it no longer knows how many it stands for, and
    /// counting down from it could say "certainly not finished" of a finished key.
    pub(in crate::store) fn forget_finished(&mut self, key: &[u8]) {
        let hash = self.finished_hash(key);
        if let Some(count) = self.finished.get_mut(&hash) {
            if *count == u16::MAX {
                return;
            }
            *count -= 1;
            if *count == 0 {
                self.finished.remove(&hash);
            }
        }
    }

    /// False when `key` certainly has no finished record (logged, or in sled).
    pub(in crate::store) fn may_be_finished(&self, key: &[u8]) -> bool {
        self.finished.contains_key(&self.finished_hash(key))
    }

    /// What waits, if `key` is certainly new (neither pending nor possibly finished):
    /// enough for a handler to refuse it from memory ([`PendingBound::refusal`]).
    /// `None` leaves the decision to the writer.
    ///
    /// [`PendingBound::refusal`]: super::PendingBound::refusal
    pub(super) fn waiting_if_new(&self, key: &str) -> Option<Waiting> {
        let known = self.by_key.contains_key(key) || self.may_be_finished(key.as_bytes());
        (!known).then(|| self.waiting())
    }
}

/// What waits to be applied, as the pending table counts it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Waiting {
    pub(super) commands: usize,
    pub(super) bytes: usize,
}

impl Store {
    pub(in crate::store) fn pending_table(&self) -> std::sync::MutexGuard<'_, PendingTable> {
        self.inner
            .pending
            .lock()
            .expect("pending table lock poisoned")
    }

    /// The accepted, unapplied command under `key`, if any.
    pub fn pending_command(&self, key: &str) -> Option<CommandRecord> {
        self.pending_table()
            .by_key
            .get(key)
            .map(|pending| pending.record.clone())
    }

    /// The accepted, unapplied command with this id, if any: from memory, the first
    /// half of [`Store::command_by_id`].
    pub(in crate::store) fn pending_by_id(&self, command_id: Uuid) -> Option<CommandRecord> {
        let table = self.pending_table();
        let key = table.key_by_id.get(&command_id)?;
        table.by_key.get(key).map(|pending| pending.record.clone())
    }

    /// How many accepted commands are not finished yet.
    pub fn pending_count(&self) -> usize {
        self.pending_table().len()
    }

    /// Every accepted command not yet applied, in acceptance order.
    pub fn unapplied(&self) -> Vec<CommandRecord> {
        let mut records: Vec<_> = self
            .pending_table()
            .by_key
            .values()
            .map(|pending| pending.record.clone())
            .collect();
        records.sort_unstable_by_key(|record| record.seq);
        records
    }

    /// Marks a pending command finished: its apply is durable against a crash and
    /// readable (call after [`Store::log_applied`]). A closed segment with
    /// nothing else unfinished becomes releasable
    /// (by a checkpoint: `checkpoint`).
    pub fn finish(&self, key: &str, command_id: Uuid) {
        self.pending_table().finish(key, command_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::intake::tests::record;

    #[test]
    fn a_closed_segment_is_releasable_with_its_last_unfinished_command() {
        let mut table = PendingTable {
            active: 2,
            ..PendingTable::default()
        };
        let (a, b, c) = (record("a"), record("b"), record("c"));
        table.insert(a.clone(), 1, 0);
        table.insert(b.clone(), 1, 0);
        table.insert(c.clone(), 2, 0);
        table.remove("a", b.command_id);
        assert!(table.by_key.contains_key("a"), "another command's id");
        table.remove("a", a.command_id);
        assert!(table.releasable.is_empty(), "b is still unfinished");
        table.finish("b", b.command_id);
        assert_eq!(table.releasable, [1]);
        assert!(table.may_be_finished(b"b"));
        table.finish("c", c.command_id);
        assert_eq!(table.releasable, [1], "the active segment stays");
        assert!(table.by_key.is_empty() && table.key_by_id.is_empty());
    }

    /// The finished keys' count answers "possibly finished" for every counted key
    /// until each of its records is forgotten, and a count at its ceiling never comes
    /// down: it could otherwise say "certainly not" of a finished key.
    #[test]
    fn the_finished_count_never_says_certainly_not_of_a_finished_key() {
        let mut table = PendingTable::default();
        assert!(!table.may_be_finished(b"a"));
        table.count_finished(b"a");
        table.count_finished(b"a");
        table.forget_finished(b"a");
        assert!(table.may_be_finished(b"a"), "one of two forgotten");
        table.forget_finished(b"a");
        assert!(!table.may_be_finished(b"a"), "both forgotten");
        table.forget_finished(b"a");
        assert!(!table.may_be_finished(b"a"), "forgetting more is a no-op");

        for _ in 0..=u32::from(u16::MAX) {
            table.count_finished(b"b");
        }
        for _ in 0..=u32::from(u16::MAX) {
            table.forget_finished(b"b");
        }
        assert!(table.may_be_finished(b"b"), "a count at its ceiling stays");
    }
}
