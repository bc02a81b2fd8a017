//! The commands the bench sends and how it recognises their events.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use hyper::StatusCode;
use serde::Deserialize;
use tokio::time::Instant;
use uuid::Uuid;

use settle::model::{EVENT_FAILED, EVENT_SETTLED};

use crate::client::Conn;
use crate::sse::{Observed, Observer};

/// A prefix for this run's idempotency keys: a `--target` server keeps keys for a
/// day, so a rerun must never replay an earlier run's commands.
pub fn run_id() -> String {
    Uuid::now_v7().simple().to_string()
}

/// The part of a 202 the bench needs.
#[derive(Deserialize)]
struct AcceptedBody {
    command_id: String,
}

/// Reads the command id out of a 202 body.
///
/// # Errors
/// When the body is not the documented `{"command_id", ...}`.
pub fn accepted_command_id(body: &[u8]) -> anyhow::Result<String> {
    let accepted: AcceptedBody = serde_json::from_slice(body).context("parsing the 202 body")?;
    Ok(accepted.command_id)
}

/// The part of a `projection:settled` / `command:failed` event the bench needs.
#[derive(Deserialize)]
pub struct EventData {
    pub command_id: String,
    /// When the server accepted the command (settled events only), RFC 3339.
    #[serde(default)]
    pub accepted_at: Option<String>,
    /// When the consumer applied the command (settled events only), RFC 3339.
    #[serde(default)]
    pub settled_at: Option<String>,
    /// Why it failed (failed events only).
    #[serde(default)]
    pub reason: Option<String>,
}

impl EventData {
    /// `accepted_at` in ns since the Unix epoch, if present and readable.
    pub fn accepted_at_ns(&self) -> Option<u64> {
        self.accepted_at.as_deref().and_then(unix_ns)
    }

    /// `settled_at` in ns since the Unix epoch, if present and readable.
    pub fn settled_at_ns(&self) -> Option<u64> {
        self.settled_at.as_deref().and_then(unix_ns)
    }
}

fn unix_ns(rfc3339: &str) -> Option<u64> {
    let at = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()?;
    u64::try_from(at.unix_timestamp_nanos()).ok()
}

/// An event of one of the bench's commands, as the observer received it.
pub struct CommandEvent {
    pub observed: Observed,
    pub data: EventData,
    pub settled: bool,
}

/// Collects the events of `pending` commands from the observer until each has one or
/// `deadline` passes. Events of other commands are skipped.
pub async fn wait_for_events(
    observer: &mut Observer,
    mut pending: HashSet<String>,
    deadline: Instant,
) -> HashMap<String, CommandEvent> {
    let mut found = HashMap::with_capacity(pending.len());
    while !pending.is_empty() {
        let next = tokio::time::timeout_at(deadline, observer.events.recv()).await;
        let Ok(Some(observed)) = next else {
            break; // Deadline, or the stream ended.
        };
        let settled = observed.event.name == EVENT_SETTLED;
        if !settled && observed.event.name != EVENT_FAILED {
            continue;
        }
        let Ok(data) = serde_json::from_str::<EventData>(&observed.event.data) else {
            continue;
        };
        if pending.remove(&data.command_id) {
            found.insert(
                data.command_id.clone(),
                CommandEvent {
                    observed,
                    data,
                    settled,
                },
            );
        }
    }
    found
}

/// Creates `count` tasks over `conn` and waits until all are settled, so later
/// commands on them cannot fail with `not_found`. Returns their ids.
///
/// # Errors
/// When a create is refused or does not settle in time.
pub async fn create_tasks(
    conn: &mut Conn,
    observer: &mut Observer,
    count: usize,
    run: &str,
    settle_timeout: Duration,
) -> anyhow::Result<Vec<Uuid>> {
    let mut ids = Vec::with_capacity(count);
    let mut commands = HashSet::with_capacity(count);
    for index in 0..count {
        let id = Uuid::now_v7();
        let body = serde_json::json!({ "id": id, "title": format!("bench task {index}") });
        let (status, response) = conn
            .command(
                "/api/tasks",
                &format!("{run}-setup-{index}"),
                Bytes::from(body.to_string()),
            )
            .await
            .context("creating a task")?;
        if status != StatusCode::ACCEPTED {
            bail!(
                "creating a task answered {status}: {}",
                String::from_utf8_lossy(&response)
            );
        }
        commands.insert(accepted_command_id(&response)?);
        ids.push(id);
    }
    let expected = commands.len();
    let events = wait_for_events(observer, commands, Instant::now() + settle_timeout).await;
    let settled = events.values().filter(|event| event.settled).count();
    if settled != expected {
        bail!("only {settled} of {expected} setup tasks settled within {settle_timeout:?}");
    }
    Ok(ids)
}

/// The like command on a task: `POST /api/tasks/{id}/likes` with `{"delta":1}`.
pub fn like_path(task: Uuid) -> String {
    format!("/api/tasks/{task}/likes")
}

pub const LIKE_BODY: &[u8] = br#"{"delta":1}"#;
