//! The durable store (sled) and the in-memory projection that serves reads.
//!
//! Trees, all values JSON unless said otherwise:
//! - `commands`: idempotency key -> [`CommandRecord`]; the idempotency table.
//! - `command_ids`: command id (16 bytes) -> idempotency key.
//! - `queue`: seq (u64 big-endian) -> idempotency key, one entry per unapplied command;
//!   the consumer rebuilds its timers from it on start.
//! - `tasks`: task id (16 bytes) -> [`TaskRow`].
//! - `events`: event id (u64 big-endian) -> the finished SSE frame.
//! - `dead_letters`: seq (u64 big-endian) -> idempotency key.
//! - `meta`: `last_event_id` -> u64 big-endian, so ids are never reused.
//!
//! Accepting writes the command, its id index and its queue entry in one transaction;
//! applying writes the row, the command's status, the event and the queue removal in
//! another. Both take whole batches (see `commit`), and neither returns to the caller as
//! "done" before [`Store::wait_durable`]: one fsync is shared by every write that
//! happened before it started (group commit).
//!
//! Layout: `commit` (group commit: the intake batcher and the fsync flusher),
//! `projection` (the read side).

mod commit;
mod projection;

pub use commit::{Intake, IntakeError, IntakeWriter};

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};
use sled::Transactional;
use time::OffsetDateTime;
use uuid::Uuid;

use self::commit::GroupCommit;
use self::projection::Projection;

use crate::hub::EventFrame;
use crate::model::{
    unix_ms, CommandBody, CommandError, CommandRecord, CommandStatus, FailedEvent, FailureReason,
    SettledEvent, Task, EVENT_FAILED, EVENT_SETTLED,
};

const LAST_EVENT_ID: &[u8] = b"last_event_id";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// A task row as stored: the task plus the seq of the create command, which orders the
/// list (creation order, whatever ids clients chose).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskRow {
    pub seq: u64,
    pub task: Task,
}

/// What [`Store::accept`] found under the idempotency key.
#[derive(Debug)]
pub enum Accepted {
    /// The key was new: this record is now durable.
    New(CommandRecord),
    /// The same request was accepted before: answer with the stored record.
    Replay(CommandRecord),
    /// The key was used for a different request.
    KeyReused(CommandRecord),
}

/// How the consumer decided a due command should end.
#[derive(Clone, Debug)]
pub enum Decision {
    /// Apply it against the current row (it may still fail: `not_found`, `conflict`).
    Apply,
    /// Fail it without touching the row.
    Fail(FailureReason, String),
}

/// The result of applying one command, committed but not yet necessarily durable.
#[derive(Clone, Debug)]
pub struct Applied {
    pub record: CommandRecord,
    pub frame: EventFrame,
    pub change: RowChange,
}

#[derive(Clone, Debug)]
pub enum RowChange {
    None,
    Upsert(TaskRow),
    Remove(Uuid),
}

/// Cheap `Clone` handle to the store; cloning is shallow (an `Arc`).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    commands: sled::Tree,
    command_ids: sled::Tree,
    queue: sled::Tree,
    tasks: sled::Tree,
    events: sled::Tree,
    dead_letters: sled::Tree,
    meta: sled::Tree,
    // A std lock: held only to copy rows in or out, never across an await.
    projection: RwLock<Projection>,
    commit: GroupCommit,
}

fn abort(err: impl Into<StoreError>) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(err.into())
}

fn flatten(err: TransactionError<StoreError>) -> StoreError {
    match err {
        TransactionError::Abort(err) => err,
        TransactionError::Storage(err) => StoreError::Sled(err),
    }
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let len = bytes.len().min(8);
    buf[8 - len..].copy_from_slice(&bytes[bytes.len() - len..]);
    u64::from_be_bytes(buf)
}

impl Store {
    /// Opens (or creates) the store in `dir` and loads the projection.
    ///
    /// # Errors
    /// When sled cannot open the directory or a stored row does not parse.
    pub fn open(dir: &std::path::Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let tree = |name: &str| db.open_tree(name);
        let inner = Inner {
            commands: tree("commands")?,
            command_ids: tree("command_ids")?,
            queue: tree("queue")?,
            tasks: tree("tasks")?,
            events: tree("events")?,
            dead_letters: tree("dead_letters")?,
            meta: tree("meta")?,
            projection: RwLock::new(Projection::default()),
            commit: GroupCommit::new(),
            db,
        };
        let mut projection = Projection::default();
        projection.watermark = inner.meta.get(LAST_EVENT_ID)?.map_or(0, |v| read_u64(&v));
        for entry in inner.tasks.iter() {
            let (_, value) = entry?;
            projection.insert(serde_json::from_slice(&value)?);
        }
        *inner.projection.write().expect("projection lock poisoned") = projection;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// A new sequence number: unique and increasing, also across restarts.
    ///
    /// # Errors
    /// When sled cannot persist its id counter.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(self.inner.db.generate_id()?)
    }

    /// Stores each new command under its idempotency key, or finds the one already
    /// there, all in one transaction. One answer per record, in order. Not durable yet:
    /// await [`Store::wait_durable`] before promising anything. Request handlers go
    /// through [`Intake`], which gathers concurrent accepts into one call.
    ///
    /// # Errors
    /// On storage failure or a corrupt record; nothing is written then.
    pub fn accept_batch(&self, records: &[CommandRecord]) -> Result<Vec<Accepted>, StoreError> {
        let inner = &*self.inner;
        let values = records
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<Vec<_>, _>>()?;
        let found = (&inner.commands, &inner.command_ids, &inner.queue)
            .transaction(|(commands, ids, queue)| {
                let mut found = Vec::with_capacity(records.len());
                for (record, value) in records.iter().zip(&values) {
                    let key = record.idempotency_key.as_bytes();
                    // Reads this transaction's own writes too: a key twice in one batch
                    // is one command.
                    if let Some(existing) = commands.get(key)? {
                        found.push(Some(existing));
                        continue;
                    }
                    commands.insert(key, value.as_slice())?;
                    ids.insert(record.command_id.as_bytes(), key)?;
                    queue.insert(&record.seq.to_be_bytes(), key)?;
                    found.push(None);
                }
                Ok(found)
            })
            .map_err(flatten)?;
        records
            .iter()
            .zip(found)
            .map(|(record, existing)| {
                let Some(existing) = existing else {
                    return Ok(Accepted::New(record.clone()));
                };
                let existing: CommandRecord = serde_json::from_slice(&existing)?;
                Ok(if existing.fingerprint == record.fingerprint {
                    Accepted::Replay(existing)
                } else {
                    Accepted::KeyReused(existing)
                })
            })
            .collect()
    }

    /// # Errors
    /// On storage failure or a corrupt record.
    pub fn command_by_key(&self, key: &str) -> Result<Option<CommandRecord>, StoreError> {
        match self.inner.commands.get(key.as_bytes())? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    /// # Errors
    /// On storage failure or a corrupt record.
    pub fn command_by_id(&self, command_id: Uuid) -> Result<Option<CommandRecord>, StoreError> {
        match self.inner.command_ids.get(command_id.as_bytes())? {
            Some(key) => match self.inner.commands.get(key)? {
                Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// Every accepted command not yet applied, in acceptance order.
    ///
    /// # Errors
    /// On storage failure or a corrupt record.
    pub fn unapplied(&self) -> Result<Vec<CommandRecord>, StoreError> {
        let mut records = Vec::new();
        for entry in self.inner.queue.iter() {
            let (_, key) = entry?;
            if let Some(bytes) = self.inner.commands.get(key)? {
                let record: CommandRecord = serde_json::from_slice(&bytes)?;
                if record.status == CommandStatus::Pending {
                    records.push(record);
                }
            }
        }
        Ok(records)
    }

    /// Dead-lettered commands, oldest first.
    ///
    /// # Errors
    /// On storage failure or a corrupt record.
    pub fn dead_letters(&self) -> Result<Vec<CommandRecord>, StoreError> {
        let mut records = Vec::new();
        for entry in self.inner.dead_letters.iter() {
            let (_, key) = entry?;
            if let Some(record) = self.command_by_key(&String::from_utf8_lossy(&key))? {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// Applies a batch of due commands in one transaction: for each, the row change,
    /// the command's new status, the event appended to the log under the next id, the
    /// queue entry removed. One answer per command, in order: `None` when it is no
    /// longer pending (applied before: at most once). Call with at most one command per
    /// task, the oldest unapplied one (the consumer's per-task order).
    ///
    /// # Errors
    /// On storage failure or a corrupt record; nothing of the batch is written then.
    pub fn apply_batch(
        &self,
        batch: &[(&str, &Decision)],
        now: OffsetDateTime,
    ) -> Result<Vec<Option<Applied>>, StoreError> {
        let inner = &*self.inner;
        (
            &inner.commands,
            &inner.queue,
            &inner.tasks,
            &inner.events,
            &inner.meta,
            &inner.dead_letters,
        )
            .transaction(|(commands, queue, tasks, events, meta, dead_letters)| {
                let trees = ApplyTrees {
                    commands,
                    queue,
                    tasks,
                    events,
                    dead_letters,
                };
                let mut last_event_id = meta.get(LAST_EVENT_ID)?.map_or(0, |v| read_u64(&v));
                let mut applied = Vec::with_capacity(batch.len());
                for (key, decision) in batch {
                    let outcome = trees.apply(key, decision, now, last_event_id + 1)?;
                    if outcome.is_some() {
                        last_event_id += 1;
                    }
                    applied.push(outcome);
                }
                meta.insert(LAST_EVENT_ID, &last_event_id.to_be_bytes())?;
                Ok(applied)
            })
            .map_err(flatten)
    }

    /// The id of the oldest event still in the log, if any.
    ///
    /// # Errors
    /// On storage failure.
    pub fn oldest_event_id(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.inner.events.first()?.map(|(id, _)| read_u64(&id)))
    }

    /// Up to `limit` events after `after`, in id order, but none past `up_to`.
    ///
    /// # Errors
    /// On storage failure.
    pub fn events_after(
        &self,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> Result<Vec<EventFrame>, StoreError> {
        if after >= up_to {
            return Ok(Vec::new());
        }
        let start = (after + 1).to_be_bytes();
        let end = up_to.to_be_bytes();
        let mut frames = Vec::new();
        for entry in self.inner.events.range(start..=end).take(limit) {
            let (id, bytes) = entry?;
            frames.push(EventFrame::from_log(read_u64(&id), &bytes));
        }
        Ok(frames)
    }

    /// Drops events beyond the newest `keep_events`, and finished command records
    /// settled before `commands_before` (pending ones are never dropped). Returns how
    /// many of each went.
    ///
    /// # Errors
    /// On storage failure or a corrupt record.
    pub fn compact(
        &self,
        keep_events: u64,
        commands_before: OffsetDateTime,
    ) -> Result<(usize, usize), StoreError> {
        let inner = &*self.inner;
        let mut events_removed = 0;
        let head = self.watermark();
        if head > keep_events {
            let cut = (head - keep_events + 1).to_be_bytes();
            for entry in inner.events.range(..cut) {
                let (id, _) = entry?;
                inner.events.remove(id)?;
                events_removed += 1;
            }
        }
        let mut commands_removed = 0;
        for entry in inner.commands.iter() {
            let (key, bytes) = entry?;
            let record: CommandRecord = serde_json::from_slice(&bytes)?;
            let expired = record.status != CommandStatus::Pending
                && record.settled_at.is_some_and(|at| at < commands_before);
            if expired {
                (&inner.commands, &inner.command_ids, &inner.dead_letters)
                    .transaction(|(commands, ids, dead_letters)| {
                        commands.remove(&key)?;
                        ids.remove(record.command_id.as_bytes())?;
                        dead_letters.remove(&record.seq.to_be_bytes())?;
                        Ok::<_, ConflictableTransactionError<StoreError>>(())
                    })
                    .map_err(flatten)?;
                commands_removed += 1;
            }
        }
        Ok((events_removed, commands_removed))
    }
}

/// The trees one apply writes, inside its transaction.
struct ApplyTrees<'a> {
    commands: &'a TransactionalTree,
    queue: &'a TransactionalTree,
    tasks: &'a TransactionalTree,
    events: &'a TransactionalTree,
    dead_letters: &'a TransactionalTree,
}

impl ApplyTrees<'_> {
    /// Applies one command as event `event_id`, or answers `None` when it is no longer
    /// pending.
    fn apply(
        &self,
        key: &str,
        decision: &Decision,
        now: OffsetDateTime,
        event_id: u64,
    ) -> ConflictableTransactionResult<Option<Applied>, StoreError> {
        let Some(bytes) = self.commands.get(key.as_bytes())? else {
            return Ok(None);
        };
        let mut record: CommandRecord = serde_json::from_slice(&bytes).map_err(abort)?;
        if record.status != CommandStatus::Pending {
            return Ok(None);
        }
        let current = match self.tasks.get(record.task_id.as_bytes())? {
            Some(bytes) => Some(serde_json::from_slice::<TaskRow>(&bytes).map_err(abort)?),
            None => None,
        };
        let outcome = match decision {
            Decision::Apply => decide(&record, current.as_ref(), now),
            Decision::Fail(reason, message) => Outcome::Failed(*reason, message.clone()),
        };
        let (frame, change) = match outcome {
            Outcome::Failed(reason, message) => {
                record.status = CommandStatus::Failed;
                record.error = Some(CommandError {
                    reason,
                    message: message.clone(),
                });
                if reason == FailureReason::DeadLettered {
                    self.dead_letters
                        .insert(&record.seq.to_be_bytes(), key.as_bytes())?;
                }
                let event = FailedEvent {
                    command_id: record.command_id,
                    idempotency_key: record.idempotency_key.clone(),
                    task_id: record.task_id,
                    kind: record.kind(),
                    reason,
                    message,
                    current: current.map(|row| row.task),
                };
                let frame = EventFrame::encode(event_id, EVENT_FAILED, &event).map_err(abort)?;
                (frame, RowChange::None)
            }
            Outcome::Changed(change) => {
                record.status = CommandStatus::Settled;
                let (version, task) = match &change {
                    RowChange::Upsert(row) => {
                        self.tasks.insert(
                            row.task.id.as_bytes(),
                            serde_json::to_vec(row).map_err(abort)?,
                        )?;
                        (row.task.version, Some(row.task.clone()))
                    }
                    RowChange::Remove(id) => {
                        self.tasks.remove(id.as_bytes())?;
                        (current.as_ref().map_or(0, |row| row.task.version) + 1, None)
                    }
                    RowChange::None => (current.as_ref().map_or(0, |row| row.task.version), None),
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
                let frame = EventFrame::encode(event_id, EVENT_SETTLED, &event).map_err(abort)?;
                (frame, change)
            }
        };
        record.settled_at = Some(now);
        record.event_id = Some(event_id);
        self.commands
            .insert(key.as_bytes(), serde_json::to_vec(&record).map_err(abort)?)?;
        self.queue.remove(&record.seq.to_be_bytes())?;
        self.events
            .insert(&event_id.to_be_bytes(), frame.bytes.as_ref())?;
        Ok(Some(Applied {
            record,
            frame,
            change,
        }))
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
                task: Task {
                    id: record.task_id,
                    title: title.clone(),
                    notes: notes.clone(),
                    done: false,
                    likes: 0,
                    version: 1,
                    updated_at: now,
                },
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
            if let Some(title) = title {
                row.task.title = title.clone();
            }
            if let Some(notes) = notes {
                row.task.notes = notes.clone();
            }
            if let Some(done) = done {
                row.task.done = *done;
            }
            row.task.version += 1;
            row.task.updated_at = now;
            Outcome::Changed(RowChange::Upsert(row))
        }),
        (CommandBody::Delete { base_version }, Some(row)) => {
            stale(base_version, row).unwrap_or(Outcome::Changed(RowChange::Remove(row.task.id)))
        }
        (CommandBody::Like { delta }, Some(row)) => {
            let mut row = row.clone();
            row.task.likes += delta;
            row.task.version += 1;
            row.task.updated_at = now;
            Outcome::Changed(RowChange::Upsert(row))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CommandBody;

    fn create(key: &str, fingerprint: &str, store: &Store) -> CommandRecord {
        CommandRecord {
            command_id: Uuid::now_v7(),
            task_id: Uuid::now_v7(),
            idempotency_key: key.to_owned(),
            seq: store.next_seq().expect("an id"),
            fingerprint: fingerprint.to_owned(),
            body: CommandBody::Create {
                title: key.to_owned(),
                notes: String::new(),
            },
            status: CommandStatus::Pending,
            accepted_at: OffsetDateTime::now_utc(),
            due_at_ms: 0,
            settled_at: None,
            event_id: None,
            error: None,
        }
    }

    #[test]
    fn a_key_twice_in_one_accept_batch_is_one_command() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let first = create("k", "same", &store);
        let replay = create("k", "same", &store);
        let other = create("k", "different", &store);
        let answers = store
            .accept_batch(&[first.clone(), replay, other])
            .expect("accepted");
        assert!(matches!(&answers[0], Accepted::New(r) if r.command_id == first.command_id));
        assert!(matches!(&answers[1], Accepted::Replay(r) if r.command_id == first.command_id));
        assert!(matches!(&answers[2], Accepted::KeyReused(r) if r.command_id == first.command_id));
        assert_eq!(store.unapplied().expect("readable").len(), 1);
    }

    #[test]
    fn a_batch_apply_numbers_its_events_densely_and_applies_each_command_once() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let records: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|key| create(key, key, &store))
            .collect();
        store.accept_batch(&records).expect("accepted");
        let fail = Decision::Fail(FailureReason::Injected, "no".to_owned());
        let batch = [
            ("a", &Decision::Apply),
            ("b", &fail),
            ("c", &Decision::Apply),
        ];
        let now = OffsetDateTime::now_utc();
        let applied = store.apply_batch(&batch, now).expect("applied");
        let ids: Vec<_> = applied
            .iter()
            .map(|applied| applied.as_ref().map(|a| a.frame.id))
            .collect();
        assert_eq!(ids, [Some(1), Some(2), Some(3)]);
        assert_eq!(
            applied[1].as_ref().map(|a| a.record.status),
            Some(CommandStatus::Failed)
        );
        // Redelivered: nothing applies twice, and no event id is spent on it.
        let again = store.apply_batch(&batch, now).expect("applied");
        assert!(again.iter().all(Option::is_none));
        let more = create("d", "d", &store);
        store.accept_batch(&[more]).expect("accepted");
        let next = store
            .apply_batch(&[("d", &Decision::Apply)], now)
            .expect("applied");
        assert_eq!(next[0].as_ref().map(|a| a.frame.id), Some(4));
        assert!(store.unapplied().expect("readable").is_empty());
    }
}
