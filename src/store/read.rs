//! The read API: finished commands (from the applies not yet in sled, then sled), a
//! command by id or key wherever it is, the dead letters, and the event log's frames.

use uuid::Uuid;

use super::{chunks, read_u64, Store, StoreError};
use crate::hub::EventFrame;
use crate::model::CommandRecord;

impl Store {
    /// The finished (applied or failed) command under `key`: logged and not yet in
    /// sled (`unwritten`), or in sled.
    ///
    /// # Errors
    /// On storage failure or a corrupt record.
    pub fn finished_command(&self, key: &str) -> Result<Option<CommandRecord>, StoreError> {
        // Not yet in sled first, then sled: see `unwritten` for why in this order.
        if let Some(record) = self.inner.unwritten().by_key(key) {
            return Ok(Some(record.clone()));
        }
        self.inner.finished_trees().record(key.as_bytes())
    }

    /// The command with this id, pending or finished. Pending first: a command leaves
    /// the pending table only once its apply is logged and readable (`unwritten`), so
    /// one of the looks finds it. Most lookups are of pending commands (clients poll
    /// those) or of the last steps' applies, answered from memory; only the rest goes
    /// to sled, on the blocking pool.
    ///
    /// # Errors
    /// On storage failure or a corrupt record.
    pub async fn command_by_id(
        &self,
        command_id: Uuid,
    ) -> Result<Option<CommandRecord>, StoreError> {
        if let Some(record) = self.pending_by_id(command_id) {
            return Ok(Some(record));
        }
        if let Some(record) = self.inner.unwritten().by_id(command_id) {
            return Ok(Some(record.clone()));
        }
        self.blocking(move |store| store.finished_by_id(command_id))
            .await
    }

    /// The command under this idempotency key, pending or finished, in the order and
    /// on the threads [`Store::command_by_id`] uses: the pending table, then the applies
    /// not yet in sled, then sled on the blocking pool.
    ///
    /// # Errors
    /// On storage failure or a corrupt record.
    pub async fn command_by_key(&self, key: String) -> Result<Option<CommandRecord>, StoreError> {
        if let Some(record) = self.pending_command(&key) {
            return Ok(Some(record));
        }
        if let Some(record) = self.inner.unwritten().by_key(&key) {
            return Ok(Some(record.clone()));
        }
        self.blocking(move |store| store.inner.finished_trees().record(key.as_bytes()))
            .await
    }

    /// The finished command with this id, from sled: [`Store::command_by_id`] after its
    /// looks in the pending table and the table of applies not yet in sled.
    ///
    /// # Errors
    /// On storage failure or a corrupt record.
    fn finished_by_id(&self, command_id: Uuid) -> Result<Option<CommandRecord>, StoreError> {
        // Not in the table when `command_by_id` looked, so in sled if finished.
        self.inner.finished_trees().by_id(command_id)
    }

    /// Dead-lettered commands, oldest first.
    ///
    /// # Errors
    /// On storage failure or a corrupt record.
    pub fn dead_letters(&self) -> Result<Vec<CommandRecord>, StoreError> {
        let unwritten = self.inner.unwritten().dead_letters();
        let mut records = std::collections::BTreeMap::new();
        for entry in self.inner.dead_letters.iter() {
            let (_, key) = entry?;
            if let Some(record) = self.inner.finished_trees().record(&key)? {
                records.insert(record.seq, record);
            }
        }
        // Written to sled since they were read here: the same record twice.
        records.extend(unwritten.into_iter().map(|record| (record.seq, record)));
        Ok(records.into_values().collect())
    }

    /// Up to `limit` events after `after`, in id order, but none past `up_to`, and no
    /// more than fit in `max_bytes` (one at least, whatever its size): what a
    /// subscriber catching up holds in memory while it writes them out, however large
    /// the events are.
    ///
    /// # Errors
    /// On storage failure.
    pub fn events_after(
        &self,
        after: u64,
        up_to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<EventFrame>, StoreError> {
        if after >= up_to {
            return Ok(Vec::new());
        }
        // Not yet in sled first, then sled (see `unwritten`): those that left the table
        // between the two looks are in sled by the second.
        let (unwritten, first_unwritten) = {
            let table = self.inner.unwritten();
            (table.events(after, up_to, limit), table.first_event_id())
        };
        let in_sled_up_to = first_unwritten.map_or(up_to, |first| up_to.min(first - 1));
        let mut frames: Vec<EventFrame> = Vec::new();
        let mut bytes = 0;
        let first = after + 1;
        if first <= in_sled_up_to {
            let events = &self.inner.events;
            // The value holding `first`: a chunk may begin before it.
            let start = match events.range(..=first.to_be_bytes()).next_back() {
                Some(entry) => entry?.0,
                None => sled::IVec::from(&first.to_be_bytes()),
            };
            let end = sled::IVec::from(&in_sled_up_to.to_be_bytes());
            'read: for entry in events.range(start..=end) {
                let (key, value) = entry?;
                for (id, frame) in chunks::entries(read_u64(&key), &value) {
                    if id > in_sled_up_to || frames.len() == limit || bytes >= max_bytes {
                        break 'read;
                    }
                    if id >= first {
                        bytes += frame.len();
                        frames.push(EventFrame::from_log(id, frame));
                    }
                }
            }
        }
        frames.extend(unwritten);
        frames.truncate(limit);
        let mut bytes = 0;
        if let Some(over) = frames.iter().position(|frame| {
            bytes += frame.bytes.len();
            bytes > max_bytes
        }) {
            frames.truncate(over.max(1));
        }
        // Only a contiguous run: compaction may remove events under the sled read, and
        // a reader must see a gap where it starts (at its next read's first event). A
        // read that crossed a compaction's cut of a chunk may also meet the cut's ids
        // again: a repeat ends the run too, and the next read goes on after it.
        if let Some(gap) = frames
            .windows(2)
            .position(|pair| pair[1].id != pair[0].id + 1)
        {
            frames.truncate(gap + 1);
        }
        Ok(frames)
    }
}
