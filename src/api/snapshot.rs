//! `GET /api/tasks`: the snapshot of every task, serialized once per watermark.
//!
//! Every client reads it on load and after each `reset`, and its size grows with the
//! tasks (up to ~41 KB of title and notes each). Built per request on an async worker, a few
//! concurrent reads of a large list would hold both workers for as long as each takes
//! to copy and serialize it, and every other request waits (measured by an audit:
//! 4000 tasks with long notes, 121 MB each, `/api/health` unanswered for over 10 s).
//! So the body is built on the blocking pool, one build at a time, and kept with the
//! watermark it was built at: every change to the projection comes with a new event
//! id, so a body built at a request's watermark or later answers it, and requests
//! meanwhile share it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::model::Task;
use crate::store::Store;

/// `GET /api/tasks`: the snapshot of every task.
#[derive(Debug, Deserialize, Serialize)]
pub struct TaskList {
    pub tasks: Vec<Arc<Task>>,
    /// The id of the last event whose effect the list includes: open the stream here.
    pub watermark: u64,
}

/// The last snapshot body built, with its watermark, and the right to build the next.
/// Cloning is shallow.
#[derive(Clone, Default)]
pub struct Snapshots {
    /// A std lock: held to copy a handle in or out, never across an await.
    kept: Arc<std::sync::Mutex<Option<(u64, Bytes)>>>,
    /// Held by the build running, for as long as it runs: also when the request that
    /// began it has gone, so that builds never overlap.
    building: Arc<tokio::sync::Mutex<()>>,
}

impl Snapshots {
    /// The snapshot's JSON body as of the call or later: the one kept, if it was built
    /// at the watermark of the call or after, else a new one, built on the blocking
    /// pool while other readers wait for it.
    ///
    /// # Errors
    /// When the build fails (it cannot but by a bug: a panic, or a task that does not
    /// serialize).
    pub async fn current(&self, store: &Store) -> Result<Bytes, ApiError> {
        let wanted = store.watermark();
        if let Some(body) = self.kept_since(wanted) {
            return Ok(body);
        }
        let building = self.building.clone().lock_owned().await;
        // Built while this one waited: any body built after the call is its answer.
        if let Some(body) = self.kept_since(wanted) {
            return Ok(body);
        }
        let kept = self.kept.clone();
        let body = store
            .blocking(move |store| {
                let _building = building;
                let (tasks, watermark) = store.snapshot();
                let body = Bytes::from(serde_json::to_vec(&TaskList { tasks, watermark })?);
                *lock(&kept) = Some((watermark, body.clone()));
                Ok(body)
            })
            .await?;
        Ok(body)
    }

    /// The body kept, if it was built at `watermark` or after.
    fn kept_since(&self, watermark: u64) -> Option<Bytes> {
        match &*lock(&self.kept) {
            Some((built_at, body)) if *built_at >= watermark => Some(body.clone()),
            _ => None,
        }
    }
}

fn lock(
    kept: &std::sync::Mutex<Option<(u64, Bytes)>>,
) -> std::sync::MutexGuard<'_, Option<(u64, Bytes)>> {
    kept.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The snapshot body as a JSON response.
pub fn response(body: Bytes) -> Response {
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::event_ids_testing::{open, settle};

    /// Readers between two changes share one body; a change makes the next reader
    /// build the snapshot as it is then.
    #[tokio::test]
    async fn a_snapshot_is_built_once_per_watermark() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = open(dir.path(), Some("boot"));
        settle(&store, &["a"]);
        let snapshots = Snapshots::default();
        let first = snapshots.current(&store).await.expect("built");
        let again = snapshots.current(&store).await.expect("kept");
        assert_eq!(first.as_ptr(), again.as_ptr(), "shared, not built again");
        let list: TaskList = serde_json::from_slice(&first).expect("a task list");
        assert_eq!((list.tasks.len(), list.watermark), (1, 1));

        settle(&store, &["b"]);
        let after = snapshots.current(&store).await.expect("built again");
        let list: TaskList = serde_json::from_slice(&after).expect("a task list");
        assert_eq!((list.tasks.len(), list.watermark), (2, 2));
        let titles: Vec<_> = list.tasks.iter().map(|task| task.title.as_str()).collect();
        assert_eq!(titles, ["a", "b"]);
    }
}
