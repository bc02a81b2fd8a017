//! Event ids that are never given twice, a power loss included.
//!
//! An event goes out once its apply is in the apply log, which is never synced
//! (`apply_log`): a power loss can undo the last applies, and the intake log then
//! applies their commands again. Were their ids taken on from sled's last event id,
//! they would go out under ids that subscribers already saw for events now lost, and
//! a subscriber resuming from one of those would skip them without being told.
//!
//! So ids are reserved ahead, durably, as seqs are ([`Store::next_seq`]): `meta` holds
//! a bound that no id given out passes (`event_ids_reserved`), moved on by a start and
//! by checkpoints, in the sync they make anyway; a step gives no id past the bound
//! made durable ([`EventIds`]). What happens at a start depends on whether the page
//! cache may have been lost since the bound was written (`event_ids_boot`, the boot
//! the last start ran in):
//! - In the same boot (after a kill -9, or a restart), the apply log is whole: ids go
//!   on from the last one it holds, with no hole. (This takes the boot id as the
//!   lifetime of the page cache, which holds unless the disk is detached and attached
//!   again within one boot.)
//! - After a clean stop, the bound was given back ([`Store::give_back_event_ids`]):
//!   ids go on with no hole either, whatever the boot.
//! - Otherwise (a reboot after a crash, or no boot id here), the ids from sled's last
//!   event id to the bound may have been given out and lost. They become a hole,
//!   recorded in `meta` (`event_id_holes`), that no event will ever hold, and the ids
//!   go on after it.
//!
//! A subscriber resuming from inside a hole may have seen events that are gone, so its
//! stream resets (`history_lost`); one resuming from before it reads on across it
//! ([`Store::is_hole`]). The watermark (the snapshot's, the stream's head) is the last
//! event there is, never the end of a hole, and a retention counts events, not ids
//! ([`Store::first_of_last_events`]).

use super::{read_u64, Inner, Store, StoreError, LAST_EVENT_ID};

/// `meta`: no event id given out is past this (u64 big-endian), durably.
const RESERVED: &[u8] = b"event_ids_reserved";
/// `meta`: the boot id of the machine when the last start reserved (UTF-8).
const BOOT: &[u8] = b"event_ids_boot";
/// `meta`: the holes, each its first and last id (u64 big-endian each).
const HOLES: &[u8] = b"event_id_holes";
/// How far past the last id it writes a checkpoint reserves. It writes the bound
/// again only once less than half of this is left, so about once per 65536 events;
/// a hole is at most about this long.
const BLOCK: u64 = 1 << 17;
/// The room under the bound below which the consumer waits for a checkpoint before a
/// step: more than any step applies (the consumer's batch is at most 2048).
const STEP_ROOM: u64 = 1 << 13;

/// A run of event ids, first to last, that no event holds or ever will.
pub type Hole = (u64, u64);

/// The reservation as the consumer's steps see it: in the table of applies not yet
/// written (`unwritten`), under its lock.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct EventIds {
    /// No id past this may be given out: it is durable in `meta`.
    pub(super) reserved: u64,
}

impl EventIds {
    /// Whether a step that follows `last` should wait for a checkpoint to reserve
    /// more. With the checkpoints' [`BLOCK`], never while they keep up: the table of
    /// applies not yet written fills long before.
    pub(super) fn is_short(self, last: u64) -> bool {
        last.saturating_add(STEP_ROOM) > self.reserved
    }

    /// `id`, if it may be given out.
    ///
    /// # Errors
    /// [`StoreError::EventIdUnreserved`] past the bound: the step fails the command as a
    /// transient fault, and the consumer waits for a checkpoint before the next one.
    pub(super) fn check(self, id: u64) -> Result<u64, StoreError> {
        if id > self.reserved {
            return Err(StoreError::EventIdUnreserved(self.reserved));
        }
        Ok(id)
    }
}

/// What a start decided about event ids ([`Inner::reserve_event_ids_at_open`]).
pub(super) struct Opened {
    /// The last event id given out or skipped: the next step's follows it.
    pub(super) last: u64,
    /// The last event there is: `last`, unless that ends a hole.
    pub(super) watermark: u64,
    pub(super) ids: EventIds,
    pub(super) holes: Vec<Hole>,
}

fn encode_holes(holes: &[Hole]) -> Vec<u8> {
    holes
        .iter()
        .flat_map(|&(first, last)| [first.to_be_bytes(), last.to_be_bytes()])
        .flatten()
        .collect()
}

fn decode_holes(bytes: &[u8]) -> Vec<Hole> {
    bytes
        .chunks_exact(16)
        .map(|pair| (read_u64(&pair[..8]), read_u64(&pair[8..])))
        .collect()
}

impl Inner {
    /// On open, once the apply log is replayed and before anything is applied: where
    /// ids go on (see the module docs), and the first reservation. Written to `meta`;
    /// the caller syncs sled before the first step. `boot` is this boot's id, `None`
    /// where it cannot be told.
    pub(super) fn reserve_event_ids_at_open(
        &self,
        boot: Option<&str>,
    ) -> Result<Opened, StoreError> {
        let logged = self.meta.get(LAST_EVENT_ID)?.map_or(0, |v| read_u64(&v));
        let reserved = self.meta.get(RESERVED)?.map(|v| read_u64(&v));
        let same_boot = match (boot, self.meta.get(BOOT)?) {
            (Some(boot), Some(stored)) => !boot.is_empty() && boot.as_bytes() == &*stored,
            _ => false,
        };
        let mut holes = self
            .meta
            .get(HOLES)?
            .map_or_else(Vec::new, |v| decode_holes(&v));
        // Holes before the oldest event the log keeps tell a resume nothing more: it
        // resets there anyway (`history_compacted`).
        if let Some(first_kept) = self.first_event_key()? {
            holes.retain(|&(_, last)| last >= first_kept);
        }
        let mut last = logged;
        match reserved {
            Some(reserved) if reserved > logged && !same_boot => {
                let hole = (logged + 1, reserved);
                match holes.last_mut() {
                    // Two starts in a row with no event between: one hole.
                    Some(previous) if previous.1 + 1 == hole.0 => previous.1 = hole.1,
                    _ => holes.push(hole),
                }
                tracing::warn!(
                    first = hole.0,
                    last = hole.1,
                    "the last run did not stop cleanly and the machine has rebooted since: event ids it may have given out are skipped, and a subscriber resuming from one resets"
                );
                last = reserved;
            }
            _ => {}
        }
        let ids = EventIds {
            reserved: last + BLOCK,
        };
        // One batch: a hole is never durable without its record, nor its record
        // without the bound past it.
        let mut batch = sled::Batch::default();
        batch.insert(LAST_EVENT_ID, &last.to_be_bytes());
        batch.insert(HOLES, encode_holes(&holes));
        batch.insert(RESERVED, &ids.reserved.to_be_bytes());
        match boot {
            Some(boot) => batch.insert(BOOT, boot.as_bytes()),
            None => batch.remove(BOOT),
        }
        self.meta.apply_batch(batch)?;
        // The snapshot and the streams start from a real event, never from inside a
        // hole, where a resume resets.
        let watermark = match holes.last() {
            Some(&(first, end)) if end == last => first - 1,
            _ => last,
        };
        Ok(Opened {
            last,
            watermark,
            ids,
            holes,
        })
    }

    /// The first id the event log holds, from the key of its first chunk.
    fn first_event_key(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.events.first()?.map(|(key, _)| read_u64(&key)))
    }

    /// For a checkpoint that writes the applies up to `logged`, before its sync: a new
    /// bound, written to `meta`, when less than half a [`BLOCK`] is left. Once the sync
    /// has made it durable, [`Inner::event_ids_reserved`] lets the steps use it.
    pub(super) fn reserve_event_ids(&self, logged: u64) -> Result<Option<u64>, StoreError> {
        let reserved = self.unwritten().event_ids.reserved;
        if reserved.saturating_sub(logged) >= BLOCK / 2 {
            return Ok(None);
        }
        let reserved = logged + BLOCK;
        self.meta.insert(RESERVED, &reserved.to_be_bytes())?;
        Ok(Some(reserved))
    }

    /// `reserved` is durable: the steps may give out ids up to it.
    pub(super) fn event_ids_reserved(&self, reserved: u64) {
        let mut unwritten = self.unwritten_mut();
        unwritten.event_ids.reserved = unwritten.event_ids.reserved.max(reserved);
    }
}

impl Store {
    /// At a clean stop, once the last checkpoint has written every apply to sled and
    /// synced it, and no step follows: the bound comes back to the last event id, so
    /// that the next start, in whatever boot, goes on from it without a hole.
    ///
    /// # Errors
    /// When sled cannot be written or synced; the next start after a reboot then skips
    /// the rest of the reservation, as after a crash.
    pub fn give_back_event_ids(&self) -> Result<(), StoreError> {
        let last = self.inner.unwritten().last_event_id;
        let durable = self
            .inner
            .meta
            .get(LAST_EVENT_ID)?
            .map_or(0, |v| read_u64(&v));
        if durable != last {
            // Applies not yet in sled: a start replays them from the apply log, in
            // this boot only; keep the reservation.
            return Ok(());
        }
        self.inner.meta.insert(RESERVED, &last.to_be_bytes())?;
        self.inner.unwritten_mut().event_ids.reserved = last;
        self.inner.sync_sled()
    }

    /// Whether every id from `first` to `last` lies in one hole: ids that no event
    /// holds or ever will (see the module docs).
    pub fn is_hole(&self, first: u64, last: u64) -> bool {
        self.inner
            .event_id_holes
            .iter()
            .any(|&(start, end)| start <= first && last <= end)
    }

    /// The first of the last `keep` events up to `head`, counting only ids that are
    /// not in a hole: so a hole does not take the place of events a retention keeps.
    /// 0 when there are no more than `keep`.
    pub fn first_of_last_events(&self, head: u64, keep: u64) -> u64 {
        let mut upper = head;
        let mut left = keep;
        for &(first, last) in self.inner.event_id_holes.iter().rev() {
            if first > upper {
                continue;
            }
            // The events between this hole and `upper`.
            let run = upper - last.min(upper);
            if run >= left {
                return upper - left + 1;
            }
            left -= run;
            upper = first - 1;
        }
        if upper > left {
            upper - left + 1
        } else {
            0
        }
    }

    /// The holes in the event ids, oldest first.
    pub fn event_id_holes(&self) -> &[Hole] {
        &self.inner.event_id_holes
    }
}

/// Test helpers: settled events, as the consumer makes them, in a store opened as if in
/// a given boot.
#[cfg(test)]
pub(crate) mod testing {
    use time::OffsetDateTime;
    use uuid::Uuid;

    use crate::model::{CommandBody, CommandRecord};
    use crate::store::{Decision, Store, StoreError};

    /// Opens the store in `dir` as if the machine's boot id were `boot`, once sled's
    /// threads have let go of a store dropped just before.
    pub(crate) fn open(dir: &std::path::Path, boot: Option<&str>) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open_in_boot(dir, boot, || {}) {
                Err(StoreError::Sled(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                opened => return opened.expect("the store opens"),
            }
        }
    }

    /// A create under `key`, as the intake writer accepts it.
    pub(crate) fn create(store: &Store, key: &str) -> CommandRecord {
        CommandRecord {
            seq: store.next_seq().expect("a seq"),
            ..CommandRecord::accepted(
                Uuid::now_v7(),
                key.to_owned(),
                "f".to_owned(),
                CommandBody::Create {
                    title: key.to_owned(),
                    notes: String::new(),
                },
                OffsetDateTime::now_utc(),
                0,
            )
        }
    }

    /// Applies a create per key in one step, logs it and publishes it, as the consumer
    /// does: in the apply log, not yet in sled. Answers the events' ids.
    pub(crate) fn settle(store: &Store, keys: &[&str]) -> Vec<u64> {
        let records: Vec<_> = keys.iter().map(|key| create(store, key)).collect();
        let batch: Vec<_> = records.iter().map(|r| (r, &Decision::Apply)).collect();
        let applied = store
            .apply_batch(&batch, OffsetDateTime::now_utc())
            .expect("applied");
        store.log_applied(applied.iter().flatten()).expect("logged");
        applied
            .iter()
            .flatten()
            .map(|applied| {
                store.project(applied);
                applied.frame.id
            })
            .collect()
    }

    /// A power loss: what the apply log alone held (it is never synced) is gone.
    pub(crate) fn lose_the_apply_log(dir: &std::path::Path) {
        let applies = dir.join(super::super::apply_log::APPLY_LOG_DIR);
        for file in std::fs::read_dir(&applies).expect("the apply log's directory") {
            std::fs::write(file.expect("a file").path(), b"").expect("emptied");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{create, lose_the_apply_log, open, settle};
    use super::*;
    use crate::store::Decision;

    fn event_ids(store: &Store, after: u64) -> Vec<u64> {
        let frames = store
            .events_after(after, u64::MAX, 100, usize::MAX)
            .expect("read");
        frames.iter().map(|frame| frame.id).collect()
    }

    /// The power loss this module is for: events 3 and 4 went out from the apply log
    /// alone and were lost with it. Their ids are not given again; they are a hole,
    /// read past by a resume from before it.
    #[test]
    fn a_start_after_a_reboot_skips_the_ids_the_last_run_may_have_given_out() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = open(dir.path(), Some("boot-1"));
        assert_eq!(settle(&store, &["a", "b"]), [1, 2]);
        store.checkpoint().expect("in sled, synced");
        assert_eq!(settle(&store, &["c", "d"]), [3, 4]);
        drop(store);
        lose_the_apply_log(dir.path());

        let store = open(dir.path(), Some("boot-2"));
        assert_eq!(
            store.event_id_holes(),
            [(3, BLOCK)],
            "the first start reserved up to BLOCK"
        );
        assert_eq!(
            store.watermark(),
            2,
            "the snapshot's: the last event there is"
        );
        assert!(store.is_hole(3, 3) && store.is_hole(4, BLOCK) && store.is_hole(3, BLOCK));
        assert!(!store.is_hole(2, 3) && !store.is_hole(BLOCK, BLOCK + 1));
        assert_eq!(settle(&store, &["c2"]), [BLOCK + 1]);
        assert_eq!(store.watermark(), BLOCK + 1);
        // A read stops at the hole; the next, from its start, finds what follows.
        assert_eq!(event_ids(&store, 0), [1, 2]);
        assert_eq!(event_ids(&store, 2), [BLOCK + 1]);
        drop(store);

        // A kill -9 in the same boot: the apply log is whole, the ids go on.
        let store = open(dir.path(), Some("boot-2"));
        assert_eq!(store.watermark(), BLOCK + 1);
        assert_eq!(settle(&store, &["e"]), [BLOCK + 2]);
        assert_eq!(store.event_id_holes(), [(3, BLOCK)]);
        drop(store);

        // Where the boot cannot be told, every start that did not follow a clean stop
        // skips; one with no event since the last hole widens it, and the watermark
        // stays at the last event there is.
        let store = open(dir.path(), None);
        let reserved = 2 * BLOCK + 1;
        assert_eq!(store.event_id_holes(), [(3, BLOCK), (BLOCK + 3, reserved)]);
        assert_eq!(store.watermark(), BLOCK + 2);
        drop(store);
        let store = open(dir.path(), None);
        assert_eq!(
            store.event_id_holes(),
            [(3, BLOCK), (BLOCK + 3, reserved + BLOCK)]
        );
        assert_eq!(store.watermark(), BLOCK + 2);
        assert_eq!(settle(&store, &["f"]), [reserved + BLOCK + 1]);
    }

    /// A retention keeps the last events there are, not the last ids: a hole takes the
    /// place of none of them.
    #[test]
    fn a_retention_counts_events_not_the_ids_of_a_hole() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = open(dir.path(), Some("boot-1"));
        assert_eq!(settle(&store, &["a", "b", "c"]), [1, 2, 3]);
        store.checkpoint().expect("in sled, synced");
        drop(store);
        let store = open(dir.path(), Some("boot-2"));
        assert_eq!(settle(&store, &["d", "e"]), [BLOCK + 1, BLOCK + 2]);
        assert_eq!(store.first_of_last_events(BLOCK + 2, 3), 3);
        assert_eq!(store.first_of_last_events(BLOCK + 2, 2), BLOCK + 1);
        assert_eq!(
            store.first_of_last_events(BLOCK + 2, 5),
            0,
            "no more than 5"
        );
        assert_eq!(store.first_of_last_events(2, 1), 2, "before the hole");
        let (trimmed, _) = store
            .compact(3, time::OffsetDateTime::UNIX_EPOCH)
            .expect("compacted");
        assert_eq!(trimmed, 2);
        assert_eq!(event_ids(&store, 0), [3], "read up to the hole");
        assert_eq!(event_ids(&store, 3), [BLOCK + 1, BLOCK + 2]);
    }

    /// After a clean stop nothing is skipped, in whatever boot the next start runs.
    #[test]
    fn ids_given_back_at_a_clean_stop_leave_no_hole() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = open(dir.path(), Some("boot-1"));
        assert_eq!(settle(&store, &["a", "b"]), [1, 2]);
        store.checkpoint().expect("in sled, synced");
        store.give_back_event_ids().expect("given back");
        drop(store);
        let store = open(dir.path(), Some("boot-2"));
        assert_eq!(store.watermark(), 2);
        assert!(store.event_id_holes().is_empty());
        assert_eq!(settle(&store, &["c"]), [3]);
        // Given back with an apply not in sled, the reservation stays: it is the
        // apply log's to replay, in this boot only.
        store.give_back_event_ids().expect("kept");
        drop(store);
        lose_the_apply_log(dir.path());
        let store = open(dir.path(), Some("boot-3"));
        assert_eq!(store.event_id_holes(), [(3, 2 + BLOCK)]);
    }

    /// A step gives no id past the bound made durable: the command fails as a
    /// transient fault, and the consumer waits; a checkpoint reserves more.
    #[test]
    fn a_step_gives_no_id_past_the_reservation_and_a_checkpoint_reserves_more() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = open(dir.path(), Some("boot-1"));
        assert_eq!(settle(&store, &["a"]), [1]);
        assert!(!store.unwritten_is_full());
        store.inner.unwritten_mut().event_ids.reserved = 1;
        assert!(
            store.unwritten_is_full(),
            "the consumer waits for a checkpoint"
        );
        // Also with nothing to write, a checkpoint is due for it.
        store.checkpoint().expect("checkpointed");
        store.inner.unwritten_mut().event_ids.reserved = 1;
        assert!(store
            .checkpoint_due_at()
            .is_some_and(|due| due <= std::time::Instant::now()));
        let record = create(&store, "b");
        let mut step = store.step(time::OffsetDateTime::now_utc());
        let refused = step.apply(&record, &Decision::Apply);
        assert!(
            matches!(refused, Err(StoreError::EventIdUnreserved(1))),
            "no id past the reservation: {:?}",
            refused.map(|applied| applied.map(|applied| applied.frame.id))
        );
        drop(step);
        store.checkpoint().expect("checkpointed");
        assert_eq!(store.inner.unwritten().event_ids.reserved, 1 + BLOCK);
        let written = store
            .inner
            .meta
            .get(RESERVED)
            .expect("read")
            .expect("written");
        assert_eq!(read_u64(&written), 1 + BLOCK, "in meta, for the next start");
        assert!(!store.unwritten_is_full());
        assert_eq!(settle(&store, &["b"]), [2]);
    }
}
