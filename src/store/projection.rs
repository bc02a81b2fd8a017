//! The in-memory projection that serves every read: a copy of the `tasks` tree in
//! creation order, plus the id of the last event whose effect it includes.
//!
//! It moves only after the apply that changed it is durable, and before that event is
//! published, which is what makes "read after `projection:settled` sees the change" hold.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use uuid::Uuid;

use super::{Applied, RowChange, Store, TaskRow};
use crate::model::Task;

#[derive(Default)]
pub(super) struct Projection {
    /// Create seq -> task id: the list's order, whatever ids clients chose.
    order: BTreeMap<u64, Uuid>,
    pub(super) rows: HashMap<Uuid, TaskRow>,
    pub(super) watermark: u64,
}

impl Projection {
    pub(super) fn insert(&mut self, row: TaskRow) {
        self.order.insert(row.seq, row.task.id);
        self.rows.insert(row.task.id, row);
    }
}

impl Store {
    /// Makes a durable apply visible to readers. Call in event-id order, after
    /// [`Store::log_applied`] and before publishing the event.
    pub fn project(&self, applied: &Applied) {
        let mut projection = self
            .inner
            .projection
            .write()
            .expect("projection lock poisoned");
        match &applied.change {
            RowChange::None => {}
            RowChange::Upsert(row) => projection.insert(row.clone()),
            RowChange::Remove(id) => {
                if let Some(row) = projection.rows.remove(id) {
                    projection.order.remove(&row.seq);
                }
            }
        }
        projection.watermark = projection.watermark.max(applied.frame.id);
    }

    /// Every task in creation order, and the id of the last event the list includes.
    /// Shared, not copied: the consumer waits for this lock to move the projection.
    pub fn snapshot(&self) -> (Vec<Arc<Task>>, u64) {
        let projection = self
            .inner
            .projection
            .read()
            .expect("projection lock poisoned");
        let tasks = projection
            .order
            .values()
            .filter_map(|id| projection.rows.get(id))
            .map(|row| Arc::clone(&row.task))
            .collect();
        (tasks, projection.watermark)
    }

    pub fn task(&self, id: Uuid) -> Option<Arc<Task>> {
        let projection = self
            .inner
            .projection
            .read()
            .expect("projection lock poisoned");
        projection.rows.get(&id).map(|row| Arc::clone(&row.task))
    }

    /// The id of the newest event that readers can see.
    pub fn watermark(&self) -> u64 {
        self.inner
            .projection
            .read()
            .expect("projection lock poisoned")
            .watermark
    }
}

#[cfg(test)]
impl Store {
    /// Holds the projection's lock for reading: a step of the consumer waits at its
    /// first [`Store::project`] until the guard drops.
    pub(crate) fn hold_projection(&self) -> impl Sized + '_ {
        self.inner
            .projection
            .read()
            .expect("projection lock poisoned")
    }

    /// Poisons the projection's lock, as a panic while holding it would: the next
    /// [`Store::step`] (or [`Store::project`]) panics. For the consumer's panic test.
    pub(crate) fn poison_projection(&self) {
        let store = self.clone();
        let poisoner = std::thread::spawn(move || {
            let _held = store.inner.projection.write();
            panic!("poisoning the projection lock (a test)");
        });
        assert!(poisoner.join().is_err());
    }
}
