//! Group commit: many concurrent writers share one sled transaction and one fsync.
//!
//! Two costs dominate a durable write in sled 0.34, and both are paid per call, not per
//! byte: every transaction takes the process-wide write lock and seals the log buffer
//! (a synchronous `sync_file_range`) before and after its batch, and every `flush` is an
//! fsync. Paid per command, they cap the server at a few thousand accepts per second on
//! a small machine. So neither is paid per command:
//! - [`Intake`] gathers the accepts that arrive while the previous transaction runs and
//!   writes them in one transaction (the consumer batches its applies the same way);
//! - [`Store::wait_durable`] takes a ticket, and one flusher task runs one fsync for every
//!   ticket taken before it started ([`Store::run_flusher`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::{Accepted, Store, StoreError};
use crate::model::CommandRecord;

/// Most accepts written in one transaction. Larger batches amortize more, but every
/// request in a batch waits for the whole batch.
pub const INTAKE_BATCH_MAX: usize = 512;
/// How many accepts may wait for the intake writer. When it is full, handlers wait for
/// room (backpressure); nothing is dropped.
pub const INTAKE_CAPACITY: usize = 8_192;

/// The tickets of the group commit. A writer takes a ticket after its write; the
/// flusher records the highest ticket before it flushes and publishes it after, so
/// every writer whose ticket is covered knows its write is on disk.
pub(super) struct GroupCommit {
    tickets: AtomicU64,
    wake: Notify,
    durable: watch::Sender<u64>,
}

impl GroupCommit {
    pub(super) fn new() -> Self {
        Self {
            tickets: AtomicU64::new(0),
            wake: Notify::new(),
            durable: watch::Sender::new(0),
        }
    }
}

impl Store {
    /// Waits until every write made before this call is on disk.
    pub async fn wait_durable(&self) {
        let commit = &self.inner.commit;
        let ticket = commit.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        let mut durable = commit.durable.subscribe();
        commit.wake.notify_one();
        // The sender lives as long as `self`, so this only ends when the ticket is covered.
        let _ = durable.wait_for(|flushed| *flushed >= ticket).await;
    }

    /// The group-commit loop: one fsync per wake-up, however many writers wait on it.
    /// Runs until `shutdown`, then flushes once more.
    pub async fn run_flusher(self, shutdown: CancellationToken) {
        let commit = &self.inner.commit;
        loop {
            tokio::select! {
                _ = commit.wake.notified() => {}
                _ = shutdown.cancelled() => break,
            }
            let covered = commit.tickets.load(Ordering::SeqCst);
            let mut backoff = Duration::from_millis(10);
            loop {
                let db = self.inner.db.clone();
                match tokio::task::spawn_blocking(move || db.flush()).await {
                    Ok(Ok(_)) => break,
                    Ok(Err(err)) => tracing::error!(error = %err, "flush failed; retrying"),
                    Err(err) => tracing::error!(error = %err, "flush task failed; retrying"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            commit
                .durable
                .send_modify(|flushed| *flushed = (*flushed).max(covered));
        }
        if let Err(err) = self.inner.db.flush() {
            tracing::error!(error = %err, "final flush failed");
        }
        commit
            .durable
            .send_modify(|flushed| *flushed = commit.tickets.load(Ordering::SeqCst));
    }
}

/// Why an accept did not reach the store.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer has stopped (the server is shutting down) or dropped the request.
    #[error("the intake writer did not take the command")]
    Stopped,
}

type Reply = oneshot::Sender<Result<Accepted, StoreError>>;

/// Cheap `Clone` handle through which request handlers accept commands.
#[derive(Clone)]
pub struct Intake {
    sender: mpsc::Sender<(CommandRecord, Reply)>,
}

/// The task behind [`Intake`]; run it with [`IntakeWriter::run`].
pub struct IntakeWriter {
    store: Store,
    inbox: mpsc::Receiver<(CommandRecord, Reply)>,
}

impl Intake {
    pub fn new(store: Store) -> (Self, IntakeWriter) {
        let (sender, inbox) = mpsc::channel(INTAKE_CAPACITY);
        (Self { sender }, IntakeWriter { store, inbox })
    }

    /// Stores a new command under its idempotency key, or finds the one already there
    /// ([`Store::accept_batch`]). Not durable yet: await [`Store::wait_durable`] before
    /// promising anything.
    ///
    /// # Errors
    /// On storage failure, or when the writer has stopped.
    pub async fn accept(&self, record: CommandRecord) -> Result<Accepted, IntakeError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send((record, reply))
            .await
            .map_err(|_| IntakeError::Stopped)?;
        Ok(answer.await.map_err(|_| IntakeError::Stopped)??)
    }
}

impl IntakeWriter {
    /// Writes what waits, one transaction per batch, until `stop` is cancelled. Cancel
    /// it only once no handler can call [`Intake::accept`] any more (after the HTTP
    /// server has drained), so no accepted request is left without an answer.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut batch = Vec::with_capacity(INTAKE_BATCH_MAX);
        loop {
            tokio::select! {
                biased;
                received = self.inbox.recv_many(&mut batch, INTAKE_BATCH_MAX) => {
                    if received == 0 {
                        break;
                    }
                }
                _ = stop.cancelled() => break,
            }
            let (records, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
            let store = self.store.clone();
            let results =
                match tokio::task::spawn_blocking(move || store.accept_each(&records)).await {
                    Ok(results) => results,
                    Err(err) => {
                        // A bug: the handlers see their reply dropped and answer 503 (retry).
                        tracing::error!(error = %err, "accept batch panicked");
                        continue;
                    }
                };
            for (reply, result) in replies.into_iter().zip(results) {
                // The handler may have gone (client disconnected): the command is stored
                // all the same and answers its key's retry.
                let _ = reply.send(result);
            }
        }
    }
}

impl Store {
    /// Accepts a batch in one transaction; if that fails, each record alone, so that one
    /// bad record cannot fail the others. One result per record, in order.
    fn accept_each(&self, records: &[CommandRecord]) -> Vec<Result<Accepted, StoreError>> {
        match self.accept_batch(records) {
            Ok(accepted) => accepted.into_iter().map(Ok).collect(),
            Err(err) if records.len() > 1 => {
                tracing::warn!(error = %err, count = records.len(), "batch accept failed; accepting one by one");
                records
                    .iter()
                    .map(|record| {
                        self.accept_batch(std::slice::from_ref(record))
                            .map(|mut accepted| accepted.remove(0))
                    })
                    .collect()
            }
            Err(err) => vec![Err(err)],
        }
    }
}
