//! An apply step: deciding each due command's outcome from memory, and the sled
//! writes that record it later.
//!
//! A step ([`Store::step`]) decides against the projection's rows, the applies not yet
//! written to sled (`unwritten`) and, for a key the finished keys' hashes say may be
//! finished, sled; it writes nothing. [`Store::log_applied`] makes its applies durable
//! against a crash and visible to reads; a checkpoint writes them to sled
//! ([`Inner::write_unwritten`], with [`ApplyTrees::write`]), as does the replay of the
//! apply log on start.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLockReadGuard};

use sled::transaction::{ConflictableTransactionResult, TransactionalTree};
use sled::Transactional;
use time::OffsetDateTime;
use uuid::Uuid;

use super::chunks;
use super::event_ids::EventIds;
use super::finished::{pointer, unindex_id};
use super::projection::Projection;
use super::unwritten::WRITE_CHUNK;
use super::{
    abort, flatten, read_u64, Applied, ApplyLog, Decision, Inner, RowChange, Store, StoreError,
    TaskRow, LAST_EVENT_ID,
};
use crate::hub::EventFrame;
use crate::model::{
    unix_ms, CommandBody, CommandError, CommandRecord, CommandStatus, FailedEvent, FailureReason,
    SettledEvent, Task, EVENT_FAILED, EVENT_SETTLED,
};

/// One apply step's decisions, in order. Event ids follow the last one logged; a step
/// that is never logged spends none. Drop it before [`Store::project`]ing its applies.
pub struct Step<'a> {
    store: &'a Store,
    /// Held for the step: its rows are what the step decides against. Taken when the
    /// step begins, outside any guard against a panic, so a poisoned projection stops
    /// the consumer instead of failing each command as a transient fault.
    projection: RwLockReadGuard<'a, Projection>,
    now: OffsetDateTime,
    /// The last event id this step gave out.
    last_event_id: u64,
    /// How far it may give them out.
    event_ids: EventIds,
    /// The commands this step applied: one twice in a step (one pending command per
    /// key) applies once.
    applied: HashSet<Uuid>,
    /// The rows this step changed (`None`: removed), which its later commands see.
    rows: HashMap<Uuid, Option<TaskRow>>,
}

impl Store {
    /// Begins an apply step at `now`. Call with pending records, the oldest unapplied
    /// one of each task (the consumer's per-task order); after [`Store::log_applied`],
    /// [`Store::finish`] each command applied.
    pub fn step(&self, now: OffsetDateTime) -> Step<'_> {
        // The projection's lock first, as before any look at the table.
        let projection = self
            .inner
            .projection
            .read()
            .expect("projection lock poisoned");
        let (last_event_id, event_ids) = {
            let unwritten = self.inner.unwritten();
            (unwritten.last_event_id, unwritten.event_ids)
        };
        Step {
            store: self,
            projection,
            now,
            last_event_id,
            event_ids,
            applied: HashSet::new(),
            rows: HashMap::new(),
        }
    }

    /// A whole batch as one step ([`Store::step`]): one answer per command, in order.
    ///
    /// # Errors
    /// As [`Step::apply`], at the first command that fails.
    pub fn apply_batch(
        &self,
        batch: &[(&CommandRecord, &Decision)],
        now: OffsetDateTime,
    ) -> Result<Vec<Option<Applied>>, StoreError> {
        let mut step = self.step(now);
        batch
            .iter()
            .map(|(record, decision)| step.apply(record, decision))
            .collect()
    }

    /// Whether `key` has a finished record, looked up only when the finished keys'
    /// hashes say it may (as the intake writer does): every key logged is counted
    /// before the next step ([`Store::finish`]).
    fn has_finished(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.pending_table().may_be_finished(key.as_bytes())
            && self.finished_command(key)?.is_some())
    }
}

impl Step<'_> {
    /// Decides one command as the next event: the finished record, the row change and
    /// the event's frame. `None` when its key has a finished record already (applied
    /// before: at most once).
    ///
    /// # Errors
    /// When sled cannot be read for the key, or the event cannot be encoded (a bug in
    /// its type). The step goes on without it: its event id is not spent.
    pub fn apply(
        &mut self,
        pending: &CommandRecord,
        decision: &Decision,
    ) -> Result<Option<Applied>, StoreError> {
        if self.applied.contains(&pending.command_id)
            || self.store.has_finished(&pending.idempotency_key)?
        {
            return Ok(None);
        }
        let current = match self.rows.get(&pending.task_id) {
            Some(row) => row.as_ref(),
            None => self.projection.rows.get(&pending.task_id),
        };
        let event_id = self.event_ids.check(self.last_event_id + 1)?;
        let applied = decided(pending, decision, current, self.now, event_id)?;
        self.last_event_id = event_id;
        self.applied.insert(pending.command_id);
        match &applied.change {
            RowChange::Upsert(row) => {
                self.rows.insert(row.task.id, Some(row.clone()));
            }
            RowChange::Remove(id) => {
                self.rows.insert(*id, None);
            }
            RowChange::None => {}
        }
        Ok(Some(applied))
    }
}

/// What applying `pending` against `current` as event `event_id` comes to.
fn decided(
    pending: &CommandRecord,
    decision: &Decision,
    current: Option<&TaskRow>,
    now: OffsetDateTime,
    event_id: u64,
) -> Result<Applied, StoreError> {
    let mut record = pending.clone();
    let outcome = match decision {
        Decision::Apply => decide(&record, current, now),
        Decision::Fail(reason, message) => Outcome::Failed(*reason, message.clone()),
    };
    let (frame, change) = match outcome {
        Outcome::Failed(reason, message) => {
            record.status = CommandStatus::Failed;
            record.error = Some(CommandError {
                reason,
                message: message.clone(),
            });
            let event = FailedEvent {
                command_id: record.command_id,
                idempotency_key: record.idempotency_key.clone(),
                task_id: record.task_id,
                kind: record.kind(),
                reason,
                message,
                current: current.map(|row| Arc::clone(&row.task)),
            };
            let frame = EventFrame::encode(event_id, EVENT_FAILED, &event)?;
            (frame, RowChange::None)
        }
        Outcome::Changed(change) => {
            record.status = CommandStatus::Settled;
            let (version, task) = match &change {
                RowChange::Upsert(row) => (row.task.version, Some(Arc::clone(&row.task))),
                RowChange::Remove(_) => (current.map_or(0, |row| row.task.version) + 1, None),
                RowChange::None => (current.map_or(0, |row| row.task.version), None),
            };
            let event = SettledEvent {
                command_id: record.command_id,
                idempotency_key: record.idempotency_key.clone(),
                task_id: record.task_id,
                kind: record.kind(),
                version,
                task,
                accepted_at: record.accepted_at,
                settled_at: now,
                window_ms: unix_ms(now).saturating_sub(unix_ms(record.accepted_at)),
            };
            let frame = EventFrame::encode(event_id, EVENT_SETTLED, &event)?;
            (frame, change)
        }
    };
    record.settled_at = Some(now);
    record.event_id = Some(event_id);
    Ok(Applied {
        record,
        frame,
        change,
    })
}

impl Inner {
    /// Runs `apply` in one sled transaction over the trees an apply writes (and
    /// `meta`, for the last event id).
    pub(super) fn apply_transaction<R>(
        &self,
        apply: impl Fn(
            &ApplyTrees<'_>,
            &TransactionalTree,
        ) -> ConflictableTransactionResult<R, StoreError>,
    ) -> Result<R, StoreError> {
        (
            &self.commands,
            &self.command_ids,
            &self.tasks,
            &self.events,
            &self.meta,
            &self.dead_letters,
            &self.records,
        )
            .transaction(
                |(commands, command_ids, tasks, events, meta, dead_letters, records)| {
                    let trees = ApplyTrees {
                        commands,
                        command_ids,
                        tasks,
                        events,
                        dead_letters,
                        records,
                    };
                    apply(&trees, meta)
                },
            )
            .map_err(flatten)
    }

    /// Writes again, in transactions of [`WRITE_CHUNK`], the applies the apply log holds
    /// beyond sled's last event: those a crash of the last run kept from sled (see
    /// `apply_log`).
    ///
    /// Only those that run on from sled's last event without a gap. A gap means a
    /// record before it was lost (a power loss took the unsynced tail of a file the
    /// next one outlived) or an assumption of the replay broke; writing past it could
    /// apply a command twice. Every command after the gap is still in the intake log
    /// (no segment is released before a checkpoint covers it), so it applies again.
    ///
    /// # Errors
    /// On storage failure.
    pub(super) fn replay(&self, logged: Vec<Applied>) -> Result<(), StoreError> {
        let last = self.meta.get(LAST_EVENT_ID)?.map_or(0, |v| read_u64(&v));
        let mut missing: Vec<Applied> = logged
            .into_iter()
            .filter(|applied| applied.frame.id > last)
            .collect();
        if let Some(gap) = (last + 1..)
            .zip(&missing)
            .position(|(expected, applied)| applied.frame.id != expected)
        {
            tracing::warn!(
                expected = last + 1 + gap as u64,
                found = missing[gap].frame.id,
                "the apply log has a gap; its applies after it are not written again, and their commands apply again from the intake log"
            );
            missing.truncate(gap);
        }
        let Some(newest) = missing.last().map(|applied| applied.frame.id) else {
            return Ok(());
        };
        // In chunks, as a checkpoint writes (`unwritten`): a crash meanwhile leaves a
        // prefix, which the next start completes.
        for chunk in missing.chunks(WRITE_CHUNK) {
            self.write_applies(chunk, true)?;
        }
        tracing::info!(
            commands = missing.len(),
            last_event_id = newest,
            "wrote again the applies the last run logged but sled lost"
        );
        Ok(())
    }

    /// Writes `applies` (in event-id order) to sled in one transaction, with
    /// sled's last event id moved to the last of them; `displace` for a replay (see
    /// [`Inner::displaced`]).
    ///
    /// # Errors
    /// On storage failure; nothing of them is written then.
    pub(super) fn write_applies(
        &self,
        applies: &[impl Borrow<Applied>],
        displace: bool,
    ) -> Result<(), StoreError> {
        let Some(last) = applies.last().map(|applied| applied.borrow().frame.id) else {
            return Ok(());
        };
        let displaced = if displace {
            self.displaced(applies)?
        } else {
            Vec::new()
        };
        // The events and the records in chunks (`chunks`), built once, outside the
        // transaction (which sled may run again).
        let events = chunks::chunks(applies.iter().map(|applied| {
            let frame = &applied.borrow().frame;
            (frame.id, frame.bytes.as_ref())
        }));
        let records = applies
            .iter()
            .map(|applied| {
                let applied = applied.borrow();
                Ok((applied.frame.id, serde_json::to_vec(&applied.record)?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let records = chunks::chunks(records.iter().map(|(id, json)| (*id, json.as_slice())));
        self.apply_transaction(|trees, meta| {
            for applied in applies {
                trees.write(applied.borrow())?;
            }
            // After the writes: one displaced may be an earlier apply of these.
            for stale in &displaced {
                trees.displace(stale)?;
            }
            for (first, chunk) in &events {
                trees
                    .events
                    .insert(&first.to_be_bytes(), chunk.as_slice())?;
            }
            for (first, chunk) in &records {
                trees
                    .records
                    .insert(&first.to_be_bytes(), chunk.as_slice())?;
            }
            meta.insert(LAST_EVENT_ID, &last.to_be_bytes())?;
            Ok(())
        })
    }

    /// Before replayed applies are written: the records of other commands under their
    /// keys. Each is an expired record whose removal by compaction
    /// sled lost with the apply (the key was free, so the logged command took it); its
    /// id must no longer find the key's new record (`recover_intake` repairs the same
    /// for a command that is still pending). Read before the transaction, which cannot
    /// look a record up by its event id; a replay runs alone, on open.
    fn displaced(
        &self,
        applies: &[impl Borrow<Applied>],
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let trees = self.finished_trees();
        // An earlier apply of the batch under the same key is what the later displaces.
        let mut earlier: HashMap<&str, &CommandRecord> = HashMap::new();
        let mut displaced = Vec::new();
        for applied in applies {
            let record = &applied.borrow().record;
            let key = record.idempotency_key.as_str();
            let stale = match earlier.insert(key, record) {
                Some(earlier) => Some(earlier.clone()),
                None => trees.record(key.as_bytes())?,
            };
            if let Some(stale) = stale.filter(|stale| stale.command_id != record.command_id) {
                tracing::warn!(command_id = %record.command_id, stale = %stale.command_id,
                    "an expired command's record came back under a replayed command's key; it no longer answers for the key or its id");
                displaced.push(stale);
            }
        }
        Ok(displaced)
    }

    pub(super) fn apply_log(&self) -> std::sync::MutexGuard<'_, ApplyLog> {
        self.apply_log.lock().expect("apply log lock poisoned")
    }
}

/// The trees one apply writes, inside its transaction.
pub(super) struct ApplyTrees<'a> {
    commands: &'a TransactionalTree,
    command_ids: &'a TransactionalTree,
    tasks: &'a TransactionalTree,
    events: &'a TransactionalTree,
    dead_letters: &'a TransactionalTree,
    records: &'a TransactionalTree,
}

impl ApplyTrees<'_> {
    /// Removes the id index and the dead letter of `stale`, a record displaced from
    /// its key ([`Inner::displaced`]); the key's new pointer is written over its own,
    /// and its chunk keeps it until it expires.
    fn displace(&self, stale: &CommandRecord) -> ConflictableTransactionResult<(), StoreError> {
        // A pointer, or in the layout before, the key.
        let pointer = stale.event_id.map(pointer);
        let key = stale.idempotency_key.as_bytes();
        let held: Vec<&[u8]> = pointer.iter().map(|p| p.as_slice()).chain([key]).collect();
        unindex_id(self.command_ids, self.dead_letters, stale, &held)
    }

    /// Writes what an apply decided: the row change, and the pointers from its key and
    /// its id to its record (and its dead letter); its record and its event go in
    /// chunks ([`Inner::write_applies`]). Every write is absolute, so writing an apply
    /// again (a replay of the apply log) is harmless.
    pub(super) fn write(&self, applied: &Applied) -> ConflictableTransactionResult<(), StoreError> {
        let Applied {
            record,
            change,
            frame,
        } = applied;
        let key = record.idempotency_key.as_bytes();
        match change {
            RowChange::Upsert(row) => {
                self.tasks.insert(
                    row.task.id.as_bytes(),
                    serde_json::to_vec(row).map_err(abort)?,
                )?;
            }
            RowChange::Remove(id) => {
                self.tasks.remove(id.as_bytes())?;
            }
            RowChange::None => {}
        }
        if record.is_dead_lettered() {
            self.dead_letters.insert(&record.seq.to_be_bytes(), key)?;
        }
        let pointer = pointer(frame.id);
        self.commands.insert(key, &pointer)?;
        self.command_ids
            .insert(record.command_id.as_bytes(), &pointer)?;
        Ok(())
    }
}

enum Outcome {
    Changed(RowChange),
    Failed(FailureReason, String),
}

/// The state-dependent half of validation, at apply time.
fn decide(record: &CommandRecord, current: Option<&TaskRow>, now: OffsetDateTime) -> Outcome {
    let stale = |base: &Option<u64>, row: &TaskRow| match base {
        Some(base) if *base != row.task.version => Some(Outcome::Failed(
            FailureReason::Conflict,
            format!(
                "base_version {base} is not the current version {}",
                row.task.version
            ),
        )),
        _ => None,
    };
    let missing = || {
        Outcome::Failed(
            FailureReason::NotFound,
            format!("task {} does not exist", record.task_id),
        )
    };
    match (&record.body, current) {
        (CommandBody::Create { .. }, Some(_)) => Outcome::Failed(
            FailureReason::Conflict,
            format!("task {} already exists", record.task_id),
        ),
        (CommandBody::Create { title, notes }, None) => {
            Outcome::Changed(RowChange::Upsert(TaskRow {
                seq: record.seq,
                task: Arc::new(Task {
                    id: record.task_id,
                    title: title.clone(),
                    notes: notes.clone(),
                    done: false,
                    likes: 0,
                    version: 1,
                    updated_at: now,
                }),
            }))
        }
        (_, None) => missing(),
        (
            CommandBody::Update {
                title,
                notes,
                done,
                base_version,
            },
            Some(row),
        ) => stale(base_version, row).unwrap_or_else(|| {
            let mut row = row.clone();
            let task = Arc::make_mut(&mut row.task);
            if let Some(title) = title {
                task.title = title.clone();
            }
            if let Some(notes) = notes {
                task.notes = notes.clone();
            }
            if let Some(done) = done {
                task.done = *done;
            }
            task.version += 1;
            task.updated_at = now;
            Outcome::Changed(RowChange::Upsert(row))
        }),
        (CommandBody::Delete { base_version }, Some(row)) => {
            stale(base_version, row).unwrap_or(Outcome::Changed(RowChange::Remove(row.task.id)))
        }
        (CommandBody::Like { delta }, Some(row)) => {
            let mut row = row.clone();
            let task = Arc::make_mut(&mut row.task);
            task.likes += delta;
            task.version += 1;
            task.updated_at = now;
            Outcome::Changed(RowChange::Upsert(row))
        }
    }
}
