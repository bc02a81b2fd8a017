//! The domain: tasks, the commands that change them, and the events that settle those
//! commands. Pure data with serde shapes that are the public JSON contract; no I/O.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// Longest task title, in characters, after trimming.
pub const TITLE_MAX_CHARS: usize = 200;
/// Longest notes field, in characters.
pub const NOTES_MAX_CHARS: usize = 10_000;

/// A task as clients see it: the projection's row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: Uuid,
    pub title: String,
    pub notes: String,
    pub done: bool,
    /// A commutative counter: likes never conflict, they add up.
    pub likes: i64,
    /// 1 on create, +1 per applied change (likes included).
    pub version: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// What a command does, as named in command records and events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandKind {
    Create,
    Update,
    Delete,
    Like,
}

/// The validated intent of a command, stored with it and applied by the consumer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CommandBody {
    Create {
        title: String,
        notes: String,
    },
    Update {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        notes: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        done: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base_version: Option<u64>,
    },
    Delete {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base_version: Option<u64>,
    },
    Like {
        delta: i64,
    },
}

impl CommandBody {
    pub fn kind(&self) -> CommandKind {
        match self {
            CommandBody::Create { .. } => CommandKind::Create,
            CommandBody::Update { .. } => CommandKind::Update,
            CommandBody::Delete { .. } => CommandKind::Delete,
            CommandBody::Like { .. } => CommandKind::Like,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    Pending,
    Settled,
    Failed,
}

/// Why a command failed. Serialized as the `reason` of `command:failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The task does not exist (any more) when the command applies.
    NotFound,
    /// `base_version` is not the current version, or a create reuses an existing id.
    Conflict,
    /// The fault injector rejected it (`failure_rate`).
    Injected,
    /// Transient faults exhausted every attempt.
    DeadLettered,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandError {
    pub reason: FailureReason,
    pub message: String,
}

/// A command as stored under its idempotency key: everything needed to answer a
/// retry with the stored response, to apply it, and to report its status.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommandRecord {
    pub command_id: Uuid,
    pub task_id: Uuid,
    pub idempotency_key: String,
    /// Global acceptance order (the intake log's order, also across restarts); commands
    /// for one task apply in this order.
    pub seq: u64,
    /// Hash of method, path and body: the same key with another request is refused.
    pub fingerprint: String,
    pub body: CommandBody,
    pub status: CommandStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub accepted_at: OffsetDateTime,
    /// When the consumer should apply it: accepted_at + delay + jitter, in Unix ms,
    /// counted from accepted_at rounded up to the millisecond. The consumer applies it
    /// at [`CommandRecord::due_at_ns`], of which this is the rounding up: up to a
    /// millisecond before `due_at_ms`.
    pub due_at_ms: u64,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub settled_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub event_id: Option<u64>,
    #[serde(default)]
    pub error: Option<CommandError>,
}

impl CommandRecord {
    /// A command as a handler accepts it: a new command id, pending, due at
    /// `due_at_ms`. Its `seq` is 0 until the intake writer gives it one, in the order
    /// it logs new commands ([`crate::store::Intake::accept`] answers the numbered
    /// record).
    pub fn accepted(
        task_id: Uuid,
        idempotency_key: String,
        fingerprint: String,
        body: CommandBody,
        accepted_at: OffsetDateTime,
        due_at_ms: u64,
    ) -> Self {
        Self {
            command_id: Uuid::now_v7(),
            task_id,
            idempotency_key,
            seq: 0,
            fingerprint,
            body,
            status: CommandStatus::Pending,
            accepted_at,
            due_at_ms,
            settled_at: None,
            event_id: None,
            error: None,
        }
    }

    /// When the consumer applies it, to the nanosecond: the accept time plus the delay
    /// (and jitter) that `due_at_ms` was counted with. `due_at_ms` counts it from the
    /// accept time rounded up to the millisecond, so that a whole millisecond is never
    /// early; from the accept time itself it is not early either, and up to a
    /// millisecond sooner. A record due before its accept time's millisecond (not one a
    /// handler makes) is due at `due_at_ms`.
    pub fn due_at_ns(&self) -> i128 {
        let due_ns = i128::from(self.due_at_ms) * 1_000_000;
        match self.due_at_ms.checked_sub(unix_ms_ceil(self.accepted_at)) {
            Some(delay_ms) => {
                self.accepted_at.unix_timestamp_nanos() + i128::from(delay_ms) * 1_000_000
            }
            None => due_ns,
        }
    }

    pub fn kind(&self) -> CommandKind {
        self.body.kind()
    }

    /// Whether it failed as dead-lettered (its dead letter is listed).
    pub fn is_dead_lettered(&self) -> bool {
        self.error
            .as_ref()
            .is_some_and(|error| error.reason == FailureReason::DeadLettered)
    }

    /// The body of the 202 answer, identical for the first request and every replay.
    pub fn accepted_response(&self) -> AcceptedResponse {
        AcceptedResponse {
            command_id: self.command_id,
            task_id: self.task_id,
            status: CommandStatus::Pending,
            accepted_at: self.accepted_at,
        }
    }

    /// The public view served at `GET /api/commands/{command_id}`.
    pub fn view(&self) -> CommandView {
        CommandView {
            command_id: self.command_id,
            task_id: self.task_id,
            idempotency_key: self.idempotency_key.clone(),
            kind: self.kind(),
            status: self.status,
            accepted_at: self.accepted_at,
            settled_at: self.settled_at,
            event_id: self.event_id,
            error: self.error.clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AcceptedResponse {
    pub command_id: Uuid,
    pub task_id: Uuid,
    pub status: CommandStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub accepted_at: OffsetDateTime,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommandView {
    pub command_id: Uuid,
    pub task_id: Uuid,
    pub idempotency_key: String,
    pub kind: CommandKind,
    pub status: CommandStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub accepted_at: OffsetDateTime,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub settled_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CommandError>,
}

/// SSE event name of a settled command.
pub const EVENT_SETTLED: &str = "projection:settled";
/// SSE event name of a failed command.
pub const EVENT_FAILED: &str = "command:failed";
/// SSE event name telling a client its history is gone and it must refetch.
pub const EVENT_RESET: &str = "reset";

/// Data of `projection:settled`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SettledEvent {
    pub command_id: Uuid,
    pub idempotency_key: String,
    pub task_id: Uuid,
    pub kind: CommandKind,
    pub version: u64,
    /// The row after the change; `null` after a delete. Shared with the projection's
    /// row: serialized once into the event's frame, never copied.
    pub task: Option<Arc<Task>>,
    #[serde(with = "time::serde::rfc3339")]
    pub accepted_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub settled_at: OffsetDateTime,
    pub window_ms: u64,
}

/// Data of `command:failed`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailedEvent {
    pub command_id: Uuid,
    pub idempotency_key: String,
    pub task_id: Uuid,
    pub kind: CommandKind,
    pub reason: FailureReason,
    pub message: String,
    /// The row as it is now, so a client can snap to ground truth without a fetch.
    pub current: Option<Arc<Task>>,
}

/// Unix time in milliseconds.
pub fn unix_ms(at: OffsetDateTime) -> u64 {
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// Unix time in milliseconds, rounded up: a due time counted from it is never early.
pub fn unix_ms_ceil(at: OffsetDateTime) -> u64 {
    u64::try_from((at.unix_timestamp_nanos() + 999_999) / 1_000_000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_time_rounds_the_accept_up_to_the_millisecond() {
        let exact = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_000_000)
            .expect("a valid time");
        assert_eq!(unix_ms(exact), 1_700_000_000_123);
        assert_eq!(unix_ms_ceil(exact), 1_700_000_000_123);
        let later = exact + time::Duration::nanoseconds(1);
        assert_eq!(unix_ms(later), 1_700_000_000_123);
        assert_eq!(unix_ms_ceil(later), 1_700_000_000_124);
        let almost = exact + time::Duration::nanoseconds(999_999);
        assert_eq!(unix_ms_ceil(almost), 1_700_000_000_124);
    }

    #[test]
    fn a_command_is_due_its_delay_after_its_exact_accept_time() {
        let accepted_at = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_000_001)
            .expect("a valid time");
        let record = |due_at_ms| {
            CommandRecord::accepted(
                Uuid::nil(),
                "key".to_owned(),
                String::new(),
                CommandBody::Like { delta: 1 },
                accepted_at,
                due_at_ms,
            )
        };
        // Accepted 1 ns into ...123 ms: with a delay of 700 ms, due_at_ms is ...824.
        let delayed = record(unix_ms_ceil(accepted_at) + 700);
        assert_eq!(delayed.due_at_ms, 1_700_000_000_824);
        assert_eq!(delayed.due_at_ns(), 1_700_000_000_823_000_001);
        assert_eq!(
            record(unix_ms_ceil(accepted_at)).due_at_ns(),
            1_700_000_000_123_000_001
        );
        // Due before its accept time's millisecond: at due_at_ms.
        assert_eq!(
            record(1_700_000_000_000).due_at_ns(),
            1_700_000_000_000_000_000
        );
    }
}
