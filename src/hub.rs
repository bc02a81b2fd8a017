//! The broadcast hub: settled and failed events fan out from the consumer to every
//! open stream. Each event is serialized once, as a finished SSE frame in shared
//! `Bytes`, and every subscriber writes the same buffer.
//!
//! The hub is deliberately narrow (`publish`, `subscribe`) so that a multi-node setup
//! can put a message-bus subject behind the same two calls.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::broadcast;

/// How many events the in-memory broadcast holds for slow subscribers. A subscriber
/// that falls further behind gets `Lagged` and catches up from the durable event log
/// (see `sse`), so a full buffer costs a log read, never a lost event.
pub const HUB_CAPACITY: usize = 4096;

/// One event of the durable log, ready to write to any SSE stream.
#[derive(Clone, Debug)]
pub struct EventFrame {
    /// The event's position in the durable log: its SSE `id:`.
    pub id: u64,
    /// `id: ..\nevent: ..\ndata: ..\n\n`
    pub bytes: Bytes,
}

impl EventFrame {
    /// Encodes an event as one SSE frame. The JSON is compact, so the data is one line.
    ///
    /// # Errors
    /// Only if `data` cannot be serialized, which would be a bug in its type.
    pub fn encode<T: Serialize>(id: u64, name: &str, data: &T) -> serde_json::Result<Self> {
        let json = serde_json::to_string(data)?;
        let text = format!("id: {id}\nevent: {name}\ndata: {json}\n\n");
        Ok(Self {
            id,
            bytes: Bytes::from(text),
        })
    }

    /// A frame read back from the log.
    pub fn from_log(id: u64, bytes: &[u8]) -> Self {
        Self {
            id,
            bytes: Bytes::copy_from_slice(bytes),
        }
    }
}

/// Cheap `Clone` handle to the broadcast channel.
#[derive(Clone, Debug)]
pub struct Hub {
    sender: broadcast::Sender<Arc<EventFrame>>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        Self::with_capacity(HUB_CAPACITY)
    }

    /// A hub whose broadcast holds `capacity` events (tests use a tiny one to force lag).
    pub fn with_capacity(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity);
        Self { sender }
    }

    /// Publishes an event that is already committed to the durable log. Having no
    /// subscriber is not an error: the log still holds the event for later readers.
    pub fn publish(&self, frame: EventFrame) {
        let _ = self.sender.send(Arc::new(frame));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventFrame>> {
        self.sender.subscribe()
    }
}
