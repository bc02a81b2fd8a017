//! What reaches the consumer: a [`Delivery`] per accepted command, in the messages its
//! [`ConsumerHandle`] sends (an intake batch, or a client's call for a redelivery).

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::model::CommandRecord;

/// What the consumer needs to know about a command to schedule it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub seq: u64,
    pub key: String,
    pub task_id: Uuid,
    pub command_id: Uuid,
    /// [`CommandRecord::due_at_ns`].
    pub due_at_ns: i128,
}

impl From<&CommandRecord> for Delivery {
    fn from(record: &CommandRecord) -> Self {
        Self {
            seq: record.seq,
            key: record.idempotency_key.clone(),
            task_id: record.task_id,
            command_id: record.command_id,
            due_at_ns: record.due_at_ns(),
        }
    }
}

#[derive(Debug)]
pub(super) enum Message {
    /// Newly accepted commands: one intake batch.
    Schedule(Vec<Delivery>),
    /// A client retried a command that is still pending past the redelivery timeout.
    Redeliver(Delivery),
}

/// Cheap `Clone` sender side, held by the API.
#[derive(Clone)]
pub struct ConsumerHandle {
    pub(super) sender: mpsc::Sender<Message>,
}

impl ConsumerHandle {
    /// Hands durable commands to the consumer, from a thread outside the runtime (the
    /// intake writer); waits for room when the inbox is full. If the consumer is gone
    /// (shutdown), the commands stay in the intake log and resume on the next start.
    pub fn schedule_blocking(&self, records: &[CommandRecord]) {
        let deliveries = records.iter().map(Delivery::from).collect();
        if self
            .sender
            .blocking_send(Message::Schedule(deliveries))
            .is_err()
        {
            tracing::debug!(
                count = records.len(),
                "consumer stopped; commands resume on restart"
            );
        }
    }

    /// Asks for an immediate redelivery of a command whose delivery was lost.
    pub async fn redeliver(&self, record: &CommandRecord) {
        if self
            .sender
            .send(Message::Redeliver(record.into()))
            .await
            .is_err()
        {
            tracing::debug!(command_id = %record.command_id, "consumer stopped; command resumes on restart");
        }
    }
}
