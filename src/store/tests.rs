//! The store's tests across its parts: accepts, applies, checkpoints, reopens, the
//! finished records and their expiry, and the event log's chunks.

use std::time::Duration;

use super::finished::{pointer, RECORDS_CHUNKED};
use super::open::INTAKE_DIR;
use super::retention::COMPACT_CHUNK;
use super::*;
use crate::model::{CommandBody, CommandStatus};
use time::OffsetDateTime;

fn create(key: &str, fingerprint: &str, store: &Store) -> CommandRecord {
    let body = CommandBody::Create {
        title: key.to_owned(),
        notes: String::new(),
    };
    CommandRecord {
        seq: store.next_seq().expect("an id"),
        ..CommandRecord::accepted(
            Uuid::now_v7(),
            key.to_owned(),
            fingerprint.to_owned(),
            body,
            OffsetDateTime::now_utc(),
            0,
        )
    }
}

/// Accepts every record through the intake writer, sending them all before the
/// writer answers any, so they can share a batch. Returns the answers in order and
/// the commands the writer handed on as durable.
async fn accept_all(store: &Store, records: &[CommandRecord]) -> (Vec<Accepted>, Vec<Uuid>) {
    let durable = Arc::new(Mutex::new(Vec::new()));
    let handed_on = durable.clone();
    let (intake, thread) = Intake::start(
        store.clone(),
        PendingBound::none(),
        Box::new(move |records| {
            let ids = records.iter().map(|record| record.command_id);
            handed_on.lock().unwrap().extend(ids);
        }),
        CancellationToken::new(),
    )
    .expect("an intake writer");
    let answers =
        futures::future::join_all(records.iter().map(|record| intake.accept(record.clone())))
            .await
            .into_iter()
            .map(|answer| answer.expect("accepted"))
            .collect();
    intake.stop(thread).await;
    let durable = durable.lock().unwrap().clone();
    (answers, durable)
}

/// An intake writer with no bound, whose durable batches go nowhere.
fn idle_writer(store: &Store) -> (Intake, IntakeThread) {
    Intake::start(
        store.clone(),
        PendingBound::none(),
        Box::new(|_| {}),
        CancellationToken::new(),
    )
    .expect("a writer")
}

/// Opens the store in `dir` again, once sled's threads have let go of it.
impl Store {
    /// Compacts as if every intake segment on disk had been rotated out and released
    /// by a checkpoint: for the tests of expiry itself. How the log holds records
    /// back is `a_record_whose_command_is_still_in_the_intake_log_does_not_expire`.
    fn compact_released(
        &self,
        keep_events: u64,
        commands_before: OffsetDateTime,
    ) -> Result<(usize, usize), StoreError> {
        self.pending_table().release_all_logged();
        self.compact(keep_events, commands_before)
    }
}

fn reopen(dir: &std::path::Path) -> Store {
    Store::open_waiting(dir, Duration::from_secs(10), &CancellationToken::new())
        .expect("the store reopens")
}

/// Accepts a new command under `key` and applies it, as the consumer would: it is
/// finished, its record durable in sled.
async fn accept_and_apply(store: &Store, key: &str, fingerprint: &str) -> CommandRecord {
    let record = create(key, fingerprint, store);
    let mut applied = accept_and_apply_all(
        store,
        &[(record, Decision::Apply)],
        OffsetDateTime::now_utc(),
    )
    .await;
    applied.remove(0).1
}

/// Accepts each command, every one a new key: answers them as accepted.
async fn accept_new(store: &Store, records: &[CommandRecord]) -> Vec<CommandRecord> {
    let (answers, _) = accept_all(store, records).await;
    answers
        .into_iter()
        .map(|answer| match answer {
            Accepted::New(record) => record,
            other => panic!("a new key is a new command, not {other:?}"),
        })
        .collect()
}

/// Accepts each new command and applies them, each as decided, as one batch at
/// `now`, as the consumer would. Answers each record as accepted and as finished.
async fn accept_and_apply_all(
    store: &Store,
    commands: &[(CommandRecord, Decision)],
    now: OffsetDateTime,
) -> Vec<(CommandRecord, CommandRecord)> {
    let records: Vec<_> = commands.iter().map(|(record, _)| record.clone()).collect();
    let accepted = accept_new(store, &records).await;
    let batch: Vec<_> = accepted
        .iter()
        .zip(commands)
        .map(|(record, (_, decision))| (record, decision))
        .collect();
    let applied = store.apply_batch(&batch, now).expect("applied");
    store.log_applied(applied.iter().flatten()).expect("logged");
    accepted
        .into_iter()
        .zip(applied)
        .map(|(record, applied)| {
            store.finish(&record.idempotency_key, record.command_id);
            (record, applied.expect("pending, so applied").record)
        })
        .collect()
}

#[tokio::test]
async fn a_key_twice_in_one_intake_batch_is_one_command() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let first = create("k", "same", &store);
    let replay = create("k", "same", &store);
    let other = create("k", "different", &store);
    let (answers, durable) = accept_all(&store, &[first.clone(), replay, other]).await;
    assert!(matches!(&answers[0], Accepted::New(r) if r.command_id == first.command_id));
    assert!(matches!(&answers[1], Accepted::Replay(r) if r.command_id == first.command_id));
    assert!(matches!(&answers[2], Accepted::KeyReused(r) if r.command_id == first.command_id));
    assert_eq!(durable, [first.command_id], "one command handed on");
    assert_eq!(store.unapplied().len(), 1);
}

#[tokio::test]
async fn accepted_commands_survive_a_reopen_until_they_finish() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let records = {
        let store = Store::open(dir.path()).expect("a store");
        let records: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|key| create(key, key, &store))
            .collect();
        accept_all(&store, &records).await;
        records
    };

    // Reopened: all three pending, in acceptance order, findable by id.
    let store = reopen(dir.path());
    let unapplied: Vec<_> = store.unapplied().iter().map(|r| r.command_id).collect();
    let ids: Vec<_> = records.iter().map(|r| r.command_id).collect();
    assert_eq!(unapplied, ids);
    assert_eq!(
        store.command_by_id(ids[1]).await.unwrap().map(|r| r.status),
        Some(CommandStatus::Pending)
    );
    // A replay of a recovered command is a replay, not a second command.
    let (answers, durable) = accept_all(&store, &records[..1]).await;
    assert!(matches!(&answers[0], Accepted::Replay(r) if r.command_id == ids[0]));
    assert!(durable.is_empty());

    // Two of them apply; the third stays pending across the next reopen.
    let now = OffsetDateTime::now_utc();
    let batch = [
        (&records[0], &Decision::Apply),
        (&records[1], &Decision::Apply),
    ];
    let applied = store.apply_batch(&batch, now).expect("applied");
    store.log_applied(applied.iter().flatten()).expect("logged");
    for record in &records[..2] {
        store.finish(&record.idempotency_key, record.command_id);
    }
    drop(store);
    let store = reopen(dir.path());
    let unapplied: Vec<_> = store.unapplied().iter().map(|r| r.command_id).collect();
    assert_eq!(unapplied, [ids[2]]);
    assert_eq!(
        store.command_by_id(ids[0]).await.unwrap().map(|r| r.status),
        Some(CommandStatus::Settled)
    );
}

#[tokio::test]
async fn a_command_is_found_by_its_key_pending_applied_and_checkpointed() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let records: Vec<_> = ["a/b+c?d", "e"]
        .iter()
        .map(|key| create(key, key, &store))
        .collect();
    accept_all(&store, &records).await;
    let by_key = |key: &str| {
        let store = store.clone();
        let key = key.to_owned();
        async move {
            let record = store.command_by_key(key).await.expect("read");
            record.map(|r| (r.command_id, r.status))
        }
    };
    let pending = (records[0].command_id, CommandStatus::Pending);
    assert_eq!(
        by_key("a/b+c?d").await,
        Some(pending),
        "from the pending table"
    );
    assert_eq!(by_key("nobody").await, None);

    let batch = [(&records[0], &Decision::Apply)];
    let applied = store.apply_batch(&batch, OffsetDateTime::now_utc());
    let applied = applied.expect("applied");
    store.log_applied(applied.iter().flatten()).expect("logged");
    store.finish(&records[0].idempotency_key, records[0].command_id);
    let settled = (records[0].command_id, CommandStatus::Settled);
    assert_eq!(by_key("a/b+c?d").await, Some(settled), "not yet in sled");
    store.checkpoint().expect("in sled");
    assert_eq!(store.inner.unwritten().by_key("a/b+c?d").map(|_| ()), None);
    assert_eq!(by_key("a/b+c?d").await, Some(settled), "from sled");
    let other = (records[1].command_id, CommandStatus::Pending);
    assert_eq!(by_key("e").await, Some(other), "still pending");
}

#[tokio::test]
async fn a_segment_is_recycled_once_all_its_commands_finished() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let record = create("only", "only", &store);
    accept_all(&store, std::slice::from_ref(&record)).await;
    drop(store);
    let files = |suffix: &str| {
        let mut names: Vec<_> = std::fs::read_dir(dir.path().join(INTAKE_DIR))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.ends_with(suffix))
            .collect();
        names.sort();
        names
    };
    // The reopen starts a new active segment beside the old one, which still holds
    // an unfinished command.
    let store = reopen(dir.path());
    let (intake, thread) = idle_writer(&store);
    assert_eq!(files(".log").len(), 2);
    let applied = store
        .apply_batch(&[(&record, &Decision::Apply)], OffsetDateTime::now_utc())
        .expect("applied");
    store.log_applied(applied.iter().flatten()).expect("logged");
    store.finish(&record.idempotency_key, record.command_id);
    assert_eq!(
        files(".log").len(),
        2,
        "released after the step, not at once"
    );
    let begun = store
        .begin_checkpoint()
        .expect("no failure")
        .expect("due: a finished segment waits");
    // Due again (another segment waits), yet not begun while the first runs.
    store.pending_table().releasable.push(u64::MAX);
    assert!(
        store.begin_checkpoint().expect("no failure").is_none(),
        "one checkpoint at a time"
    );
    assert_eq!(store.pending_table().releasable.pop(), Some(u64::MAX));
    // Dropped unrun (its thread could not start): the segment waits for the next,
    // which backs off as after a failure.
    drop(begun);
    assert!(
        store
            .release_finished_segments()
            .expect("no failure")
            .is_none(),
        "not tried again at once"
    );
    store.checkpoint().expect("checkpointed");
    assert_eq!(files(".log").len(), 1, "only the active segment is left");
    assert_eq!(
        files(".spare").len(),
        1,
        "the finished one is kept for reuse"
    );
    intake.stop(thread).await;
    drop((intake, store));

    // Next start: the last run's (empty) active segment is released too, then a
    // spare becomes the new active segment; the old record in it (of another
    // segment number) is not read as a pending command.
    let store = reopen(dir.path());
    assert!(store.unapplied().is_empty());
    assert_eq!((files(".log").len(), files(".spare").len()), (0, 2));
    let (intake, thread) = idle_writer(&store);
    assert_eq!((files(".log").len(), files(".spare").len()), (1, 1));
    intake.stop(thread).await;
    drop((intake, store));
    let store = reopen(dir.path());
    assert!(store.unapplied().is_empty());
}

#[tokio::test]
async fn a_finished_key_answers_its_retries_also_after_a_reopen_until_compacted() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let accepted = &accept_and_apply(&store, "k", "f").await;
    assert!(store.unapplied().is_empty(), "no longer pending");

    // The retry finds the finished command, not a free key.
    let retries = [create("k", "f", &store), create("k", "other", &store)];
    let (answers, durable) = accept_all(&store, &retries).await;
    assert!(matches!(&answers[0], Accepted::Replay(r)
        if r.command_id == accepted.command_id && r.status == CommandStatus::Settled));
    assert!(matches!(&answers[1], Accepted::KeyReused(r) if r.command_id == accepted.command_id));
    assert!(durable.is_empty());
    drop(store);

    // So does a retry after a restart; a new key is still new.
    let store = reopen(dir.path());
    let (answers, _) = accept_all(
        &store,
        &[create("k", "f", &store), create("j", "f", &store)],
    )
    .await;
    assert!(matches!(&answers[0], Accepted::Replay(r) if r.command_id == accepted.command_id));
    assert!(matches!(&answers[1], Accepted::New(_)));

    // Past its retention the key is free again.
    let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
    assert_eq!(
        store
            .compact_released(u64::MAX, later)
            .expect("compacted")
            .1,
        1
    );
    let (answers, _) = accept_all(&store, &[create("k", "f", &store)]).await;
    assert!(matches!(&answers[0], Accepted::New(r) if r.command_id != accepted.command_id));
}

/// A finished record is the only sign that a command in the intake log finished: a
/// restart reads the log's segments again. While its segment is on disk the record
/// does not expire, however old; expired, the command would apply a second time.
#[tokio::test]
async fn a_record_whose_command_is_still_in_the_intake_log_does_not_expire() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let accepted = accept_and_apply(&store, "k", "f").await;
    let later = OffsetDateTime::now_utc() + time::Duration::hours(25);
    assert_eq!(
        store.compact(u64::MAX, later).expect("compacted").1,
        0,
        "its segment, the active one, is on disk"
    );
    drop(store);

    let store = reopen(dir.path());
    assert!(store.unapplied().is_empty(), "not taken back as pending");
    let (answers, durable) = accept_all(&store, &[create("k", "f", &store)]).await;
    assert!(matches!(&answers[0], Accepted::Replay(r) if r.command_id == accepted.command_id));
    assert!(durable.is_empty());
    // Its segment released, it goes.
    assert_eq!(
        store
            .compact_released(u64::MAX, later)
            .expect("compacted")
            .1,
        1
    );
}

/// Compaction, an hour on, removes every finished record; a new command takes the
/// freed key `k`.
async fn retake_after_compaction(store: &Store) -> CommandRecord {
    let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
    store.compact_released(u64::MAX, later).expect("compacted");
    let (answers, _) = accept_all(store, &[create("k", "f", store)]).await;
    match answers.into_iter().next() {
        Some(Accepted::New(new)) => new,
        other => panic!("the freed key is a new command, not {other:?}"),
    }
}

/// What sled holds of the finished command under `key`: its key's pointer and
/// the chunk of records that holds its record.
fn finished_in_sled(store: &Store, key: &str) -> (sled::IVec, (sled::IVec, sled::IVec)) {
    let inner = &store.inner;
    let pointer = inner.commands.get(key).unwrap().expect("finished in sled");
    let event_id = finished::pointed(&pointer).expect("a pointer");
    let chunk = inner.records.range(..=event_id.to_be_bytes()).next_back();
    (pointer, chunk.expect("a chunk").unwrap())
}

/// Puts back what sled held of `old` under `k` ([`finished_in_sled`]), with its id
/// index, as a crash that lost compaction's removal of them would.
fn bring_back(store: &Store, old: &CommandRecord, held: (sled::IVec, (sled::IVec, sled::IVec))) {
    let inner = &store.inner;
    let (pointer, (first, chunk)) = held;
    inner.commands.insert("k", &pointer).unwrap();
    inner
        .command_ids
        .insert(old.command_id.as_bytes(), &pointer)
        .unwrap();
    inner.records.insert(first, chunk).unwrap();
}

/// The event ids of the records in sled, in order.
fn record_ids(store: &Store) -> Vec<u64> {
    let entries = record_entries(store);
    entries.into_iter().map(|(id, _)| id).collect()
}

#[tokio::test]
async fn a_logged_command_wins_over_an_expired_record_whose_removal_was_lost() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let old = &accept_and_apply(&store, "k", "f").await;
    store.inner.write_unwritten(u64::MAX).expect("written");
    let held = finished_in_sled(&store, "k");

    // Compaction frees the key, a new command takes it; then the removal is lost
    // (as in a crash before sled flushed it): the old record is back.
    let new = &retake_after_compaction(&store).await;
    assert!(record_ids(&store).is_empty(), "its chunk went too");
    bring_back(&store, old, held);
    store.checkpoint().expect("synced");
    drop(store);

    let store = reopen(dir.path());
    let unapplied: Vec<_> = store.unapplied().iter().map(|r| r.command_id).collect();
    assert_eq!(
        unapplied,
        [new.command_id],
        "the 202'd command is pending again"
    );
    assert!(store.command_by_id(old.command_id).await.unwrap().is_none());
    assert!(store.inner.commands.get("k").unwrap().is_none());
    let (answers, _) = accept_all(&store, &[create("k", "f", &store)]).await;
    assert!(matches!(&answers[0], Accepted::Replay(r) if r.command_id == new.command_id));
    // Once the new command applies, the old chunk goes when it expires, and leaves
    // the new command's entries.
    let applied = store
        .apply_batch(&[(new, &Decision::Apply)], OffsetDateTime::now_utc())
        .expect("applied");
    store.log_applied(applied.iter().flatten()).expect("logged");
    store.finish(&new.idempotency_key, new.command_id);
    store.checkpoint().expect("checkpointed");
    assert_eq!(
        store
            .compact_released(u64::MAX, new.accepted_at)
            .expect("compacted"),
        (0, 0),
        "the old record was no longer the key's"
    );
    assert_eq!(record_ids(&store), [2]);
    let finished = store.finished_command("k").unwrap().expect("finished");
    assert_eq!(finished.command_id, new.command_id);
    assert!(store.command_by_id(new.command_id).await.unwrap().is_some());
}

#[tokio::test]
async fn compaction_removes_exactly_the_records_settled_before_the_cutoff() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let now = OffsetDateTime::now_utc();
    let cutoff = now - time::Duration::hours(1);
    let ms = time::Duration::milliseconds(1);
    let dead_lettered = || Decision::Fail(FailureReason::DeadLettered, "gave up".to_owned());
    let commands = |prefix: &str, count: usize, dead: bool| -> Vec<_> {
        (0..count)
            .map(|i| {
                let record = create(&format!("{prefix}-{i}"), "f", &store);
                let decision = if dead && i == 0 {
                    dead_lettered()
                } else {
                    Decision::Apply
                };
                (record, decision)
            })
            .collect()
    };
    // More than two removal chunks, one of them dead-lettered; then one just before
    // the cutoff; these go. One at the cutoff, one after it, and two now stay.
    let mut gone = accept_and_apply_all(
        &store,
        &commands("old", 2 * COMPACT_CHUNK + 5, true),
        now - time::Duration::hours(2),
    )
    .await;
    gone.extend(accept_and_apply_all(&store, &commands("before", 1, false), cutoff - ms).await);
    let mut kept = accept_and_apply_all(&store, &commands("at", 1, false), cutoff).await;
    kept.extend(accept_and_apply_all(&store, &commands("after", 1, false), cutoff + ms).await);
    kept.extend(accept_and_apply_all(&store, &commands("new", 2, true), now).await);
    assert_eq!(store.dead_letters().expect("listed").len(), 2);

    assert_eq!(
        store.compact_released(u64::MAX, cutoff).expect("compacted"),
        (0, gone.len())
    );
    assert_eq!(
        store.compact_released(u64::MAX, cutoff).expect("compacted"),
        (0, 0)
    );

    // Gone under every index, and from the count of finished keys; the rest stay.
    let inner = &store.inner;
    let trees = [&inner.commands, &inner.command_ids, &inner.dead_letters];
    assert_eq!(trees.map(|tree| tree.len()), [4, 4, 1]);
    let kept_ids: Vec<_> = kept.iter().map(|(_, r)| r.event_id.unwrap()).collect();
    assert_eq!(
        record_ids(&store),
        kept_ids,
        "the chunk they start in is cut"
    );
    for (accepted, finished) in &gone {
        assert!(store
            .command_by_id(finished.command_id)
            .await
            .unwrap()
            .is_none());
        assert!(!store
            .pending_table()
            .may_be_finished(accepted.idempotency_key.as_bytes()));
    }
    for (_, finished) in &kept {
        assert!(store
            .command_by_id(finished.command_id)
            .await
            .unwrap()
            .is_some());
    }
    let dead: Vec<_> = store
        .dead_letters()
        .expect("listed")
        .iter()
        .map(|r| r.command_id)
        .collect();
    assert_eq!(dead, [kept[2].1.command_id]);
    // A removed key is free for a new command; a kept one still answers its retry.
    let retries = [&gone[0], &gone[gone.len() - 1], &kept[0]]
        .map(|(accepted, _)| create(&accepted.idempotency_key, "f", &store));
    let (answers, _) = accept_all(&store, &retries).await;
    assert!(matches!(&answers[0], Accepted::New(_)));
    assert!(matches!(&answers[1], Accepted::New(_)));
    assert!(matches!(&answers[2], Accepted::Replay(r) if r.command_id == kept[0].0.command_id));
}

#[tokio::test]
async fn a_removal_leaves_the_entries_of_a_newer_command_under_the_key() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let current = accept_and_apply(&store, "k", "f").await;
    store.checkpoint().expect("in sled");
    let expired = [(current.event_id.expect("applied"), current.clone())];
    let trees = store.inner.finished_trees();
    let nothing = finished::RecordsCut::default();
    assert_eq!(trees.remove(&expired, &nothing).expect("removed"), [true]);
    assert!(store.finished_command("k").unwrap().is_none());

    // Removed again (as after a removal sled lost) once a newer command took the
    // key: nothing of the newer one goes.
    let newer = accept_and_apply(&store, "k", "f").await;
    store.checkpoint().expect("in sled");
    assert_eq!(trees.remove(&expired, &nothing).expect("removed"), [false]);
    assert!(store
        .command_by_id(newer.command_id)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        store.finished_command("k").unwrap().map(|r| r.command_id),
        Some(newer.command_id)
    );
}

/// Accepts a create under each key and applies it as a step of its own, settled at
/// the time beside it.
async fn settle_each(store: &Store, steps: &[(&str, OffsetDateTime)]) {
    for &(key, settled) in steps {
        let command = [(create(key, "f", store), Decision::Apply)];
        accept_and_apply_all(store, &command, settled).await;
    }
}

#[tokio::test]
async fn records_expire_in_event_order_and_wait_behind_one_settled_later() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let now = OffsetDateTime::now_utc();
    let hours = |h| now - time::Duration::hours(h);
    // Each a step of its own; the wall clock set back before each third one.
    settle_each(&store, &[("a", hours(5)), ("b", hours(3)), ("c", hours(4))]).await;
    assert_eq!(
        store
            .compact_released(u64::MAX, hours(2))
            .expect("compacted"),
        (0, 3),
        "all three settled before the cutoff"
    );
    settle_each(&store, &[("d", hours(5)), ("e", hours(1)), ("f", hours(4))]).await;
    assert_eq!(
        store
            .compact_released(u64::MAX, hours(2))
            .expect("compacted"),
        (0, 1),
        "f waits behind e"
    );
    assert_eq!(record_ids(&store), [5, 6]);
    assert!(store.finished_command("f").unwrap().is_some());
    assert_eq!(
        store.compact_released(u64::MAX, now).expect("compacted"),
        (0, 2)
    );
    assert!(record_ids(&store).is_empty());
}

/// Writes the records tree again from `entries` (event id, JSON), in chunks.
fn write_records(store: &Store, entries: &[(u64, Vec<u8>)]) {
    let records = &store.inner.records;
    records.clear().unwrap();
    let entries = entries.iter().map(|(id, json)| (*id, json.as_slice()));
    for (first, chunk) in chunks::chunks(entries) {
        records.insert(first.to_be_bytes(), chunk).unwrap();
    }
}

/// The records in sled: event id and JSON, in order.
fn record_entries(store: &Store) -> Vec<(u64, Vec<u8>)> {
    let chunks = store.inner.records.iter().map(Result::unwrap);
    let entries = chunks.flat_map(|(first, value)| {
        let entries: Vec<_> = chunks::entries(read_u64(&first), &value)
            .map(|(id, json)| (id, json.to_vec()))
            .collect();
        entries
    });
    entries.collect()
}

#[tokio::test]
async fn records_stamped_ahead_of_now_or_unreadable_are_kept_and_walked_past() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let now = OffsetDateTime::now_utc();
    let hours = |h| now - time::Duration::hours(h);
    let ahead = now + time::Duration::days(1);
    // b first: the chunk is written again under its own id, without a, c and e.
    let steps = [
        ("b", ahead),
        ("a", hours(5)),
        ("c", hours(4)),
        ("d", hours(4)),
    ];
    settle_each(&store, &steps).await;
    settle_each(&store, &[("e", hours(3)), ("f", hours(1))]).await;
    store.checkpoint().expect("in sled");
    // d's record (event 4) no longer parses.
    let mut entries = record_entries(&store);
    entries[3].1 = b"{not a record".to_vec();
    write_records(&store, &entries);

    assert_eq!(
        store
            .compact_released(u64::MAX, hours(2))
            .expect("compacted"),
        (0, 3),
        "a, c and e; not f, settled since the cutoff"
    );
    assert_eq!(record_ids(&store), [1, 4, 6]);
    assert!(store.finished_command("b").unwrap().is_some());
    assert!(store.finished_command("c").unwrap().is_none());
    // b's time has not come even for a later cutoff: it stays until then.
    let later = ahead + time::Duration::hours(1);
    assert_eq!(
        store.compact_released(u64::MAX, later).expect("compacted"),
        (0, 1)
    );
    assert_eq!(record_ids(&store), [1, 4]);
}

#[tokio::test]
async fn a_read_that_took_a_pointer_before_its_record_expired_finds_nothing() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let now = OffsetDateTime::now_utc();
    // A record kept before it (stamped ahead), so the look-up finds a chunk.
    let ahead = now + time::Duration::days(1);
    let two_hours_ago = now - time::Duration::hours(2);
    settle_each(&store, &[("b", ahead), ("k", two_hours_ago)]).await;
    store.checkpoint().expect("in sled");
    let entry = store.inner.commands.get("k").unwrap().expect("in sled");
    let event_id = finished::pointed(&entry).expect("a pointer");
    let cutoff = now - time::Duration::hours(1);
    assert_eq!(
        store.compact_released(u64::MAX, cutoff).expect("compacted"),
        (0, 1)
    );
    assert_eq!(record_ids(&store), [1]);
    let trees = store.inner.finished_trees();
    assert!(trees.record_at(event_id).unwrap().is_none());
}

#[tokio::test]
async fn an_interrupted_move_into_chunks_goes_on_and_leaves_records_without_event_ids_readable() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let settled = OffsetDateTime::now_utc() - time::Duration::hours(2);
    // Every third one moved already (its pointer and its chunk in place), the rest
    // in the layout before: more than one batch of the move (1024), with gaps in
    // the ids left to move.
    let commands: Vec<_> = (0..2200)
        .map(|i| (create(&format!("k{i}"), "f", &store), Decision::Apply))
        .collect();
    let finished = accept_and_apply_all(&store, &commands, settled).await;
    store.checkpoint().expect("in sled");
    let inner = &store.inner;
    let mut moved = Vec::new();
    for (i, (_, record)) in finished.iter().enumerate() {
        let json = serde_json::to_vec(record).unwrap();
        if i % 3 == 0 {
            moved.push((record.event_id.unwrap(), json));
            continue;
        }
        let key = record.idempotency_key.as_bytes();
        inner.commands.insert(key, json).unwrap();
        let id = record.command_id.as_bytes();
        inner.command_ids.insert(id, key).unwrap();
    }
    write_records(&store, &moved);
    // A pending record without an event id, as the first builds kept them.
    let ancient = create("ancient", "f", &store);
    let json = serde_json::to_vec(&ancient).unwrap();
    inner.commands.insert("ancient", json).unwrap();
    let id = ancient.command_id.as_bytes();
    inner.command_ids.insert(id, "ancient").unwrap();
    inner.meta.remove(RECORDS_CHUNKED).unwrap();
    store.checkpoint().expect("synced");
    drop(store);

    let store = reopen(dir.path());
    let all: Vec<_> = finished.iter().map(|(_, r)| r.event_id.unwrap()).collect();
    assert_eq!(record_ids(&store), all);
    for (accepted, record) in [&finished[0], &finished[1], &finished[2199]] {
        let by_key = store.finished_command(&accepted.idempotency_key).unwrap();
        assert_eq!(by_key.expect("finished").event_id, record.event_id);
        let by_id = store.command_by_id(accepted.command_id).await.unwrap();
        assert_eq!(by_id.expect("finished").event_id, record.event_id);
    }
    let read = store.finished_command("ancient").unwrap().expect("read");
    assert_eq!(read.command_id, ancient.command_id);
    let by_id = store.command_by_id(ancient.command_id).await.unwrap();
    assert_eq!(by_id.expect("read").command_id, ancient.command_id);
    let removed = store.compact(u64::MAX, settled + time::Duration::hours(1));
    assert_eq!(removed.expect("compacted"), (0, 2200));
    assert!(record_ids(&store).is_empty());
    assert!(
        store.finished_command("ancient").unwrap().is_some(),
        "never expires"
    );
}

#[tokio::test]
async fn a_data_directory_from_before_record_chunks_is_moved_into_them_on_open() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let settled = OffsetDateTime::now_utc() - time::Duration::hours(2);
    let dead = Decision::Fail(FailureReason::DeadLettered, "gave up".to_owned());
    let commands = [
        (create("a", "f", &store), Decision::Apply),
        (create("b", "f", &store), dead),
        (create("c", "f", &store), Decision::Apply),
    ];
    let old = accept_and_apply_all(&store, &commands, settled).await;
    store.checkpoint().expect("in sled");
    // As an older build left it: each record as JSON under its key, the key under
    // the command id, an expiry index; one id index entry whose record is gone.
    let inner = &store.inner;
    let expiries = inner.db.open_tree("expiries").unwrap();
    for (_, record) in &old {
        let key = record.idempotency_key.as_bytes();
        inner
            .commands
            .insert(key, serde_json::to_vec(record).unwrap())
            .unwrap();
        inner
            .command_ids
            .insert(record.command_id.as_bytes(), key)
            .unwrap();
        expiries.insert(record.seq.to_be_bytes(), key).unwrap();
    }
    let gone = Uuid::now_v7();
    inner.command_ids.insert(gone.as_bytes(), "gone").unwrap();
    inner.records.clear().unwrap();
    inner.meta.remove(RECORDS_CHUNKED).unwrap();
    inner.meta.insert(b"expiries_indexed", &[]).unwrap();
    drop(expiries);
    store.checkpoint().expect("synced");
    drop(store);

    let store = reopen(dir.path());
    assert_eq!(record_ids(&store), [1, 2, 3]);
    assert_eq!(store.inner.records.len(), 1, "one chunk");
    for (accepted, record) in &old {
        let key = &accepted.idempotency_key;
        let pointer = pointer(record.event_id.unwrap());
        assert_eq!(store.inner.commands.get(key).unwrap().unwrap(), pointer);
        let by_key = store.finished_command(key).unwrap().expect("finished");
        let by_id = store.command_by_id(accepted.command_id).await.unwrap();
        assert_eq!(by_key.event_id, record.event_id);
        assert_eq!(by_id.expect("finished").event_id, record.event_id);
    }
    assert!(store.command_by_id(gone).await.unwrap().is_none());
    assert_eq!(store.inner.command_ids.len(), 3, "the dangling entry went");
    assert_eq!(store.dead_letters().unwrap()[0].idempotency_key, "b");
    let names = store.inner.db.tree_names();
    assert!(!names.iter().any(|name| name == b"expiries".as_slice()));
    assert!(!store.inner.meta.contains_key(b"expiries_indexed").unwrap());

    // Applies go on after them, and they expire as any record does.
    accept_and_apply(&store, "d", "f").await;
    store.checkpoint().expect("in sled");
    assert_eq!(record_ids(&store), [1, 2, 3, 4]);
    let removed = store.compact(u64::MAX, settled + time::Duration::hours(1));
    assert_eq!(removed.expect("compacted"), (0, 3));
    assert!(store.dead_letters().unwrap().is_empty());
    let (answers, _) = accept_all(&store, &[create("b", "f", &store)]).await;
    assert!(matches!(&answers[0], Accepted::New(_)));
}

#[tokio::test]
async fn the_intake_writer_numbers_new_commands_above_every_earlier_seq() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let last = {
        let store = Store::open(dir.path()).expect("a store");
        // Across a reserved block's end: still dense.
        let seqs: Vec<_> = (0..=SEQ_BLOCK)
            .map(|_| store.next_seq().expect("a seq"))
            .collect();
        assert!(seqs.windows(2).all(|pair| pair[1] == pair[0] + 1));
        seqs[seqs.len() - 1]
    };
    let store = reopen(dir.path());
    // As the handlers send them: the writer gives the seq.
    let unnumbered = |key| CommandRecord {
        seq: 0,
        ..create(key, key, &store)
    };
    let records = [unnumbered("a"), unnumbered("b")];
    let (answers, _) = accept_all(&store, &records).await;
    let seqs: Vec<_> = answers
        .iter()
        .map(|answer| match answer {
            Accepted::New(record) => record.seq,
            _ => panic!("new keys"),
        })
        .collect();
    assert!(seqs[0] > last && seqs[1] > seqs[0], "{seqs:?} after {last}");
}

#[test]
fn a_sync_failure_marked_while_sled_was_opening_refuses_the_start() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let intake_dir = dir.path().join(INTAKE_DIR);
    // As a process that held the directory until now would leave it, after the
    // first check passed and before sled let this open have the lock.
    let opened = Store::open_in_boot(dir.path(), sync_failure::boot_id().as_deref(), || {
        sync_failure::record(&intake_dir, &"EIO");
    });
    assert!(
        matches!(&opened, Err(StoreError::SyncFailedThisBoot(path)) if *path == intake_dir.join("sync-failed")),
        "refused once sled is open: {:?}",
        opened.as_ref().err()
    );
    assert!(intake_dir.join("sync-failed").exists(), "the marker stays");
}

#[test]
fn a_locked_directory_is_waited_for_and_then_reported() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let held = Store::open(dir.path()).expect("a store");
    let never = CancellationToken::new();
    let locked = Store::open_waiting(dir.path(), Duration::from_millis(50), &never);
    assert!(
        matches!(&locked, Err(StoreError::Locked(path)) if path == dir.path()),
        "still held after the wait"
    );

    // A shutdown ends the wait long before it would time out.
    let stop = CancellationToken::new();
    let cancel = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            stop.cancel();
        })
    };
    let started = std::time::Instant::now();
    let stopped = Store::open_waiting(dir.path(), Duration::from_secs(120), &stop);
    assert!(
        matches!(&stopped, Err(StoreError::Stopped(path)) if path == dir.path()),
        "{:?}",
        stopped.err()
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    cancel.join().expect("cancelled");

    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        drop(held);
    });
    Store::open_waiting(dir.path(), Duration::from_secs(10), &never).expect("opens once let go");
    release.join().expect("released");
}

#[tokio::test]
async fn a_batch_apply_numbers_its_events_densely_and_applies_each_command_once() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let created: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|key| create(key, key, &store))
        .collect();
    let records = accept_new(&store, &created).await;
    let fail = Decision::Fail(FailureReason::Injected, "no".to_owned());
    let batch = [
        (&records[0], &Decision::Apply),
        (&records[1], &fail),
        (&records[2], &Decision::Apply),
    ];
    let now = OffsetDateTime::now_utc();
    let applied = store.apply_batch(&batch, now).expect("applied");
    store.log_applied(applied.iter().flatten()).expect("logged");
    for (record, _) in batch {
        store.finish(&record.idempotency_key, record.command_id);
    }
    let ids: Vec<_> = applied
        .iter()
        .map(|applied| applied.as_ref().map(|a| a.frame.id))
        .collect();
    assert_eq!(ids, [Some(1), Some(2), Some(3)]);
    assert_eq!(
        applied[1].as_ref().map(|a| a.record.status),
        Some(CommandStatus::Failed)
    );
    // Redelivered: nothing applies twice, and no event id is spent on it; nor on
    // a step that was not logged.
    let again = store.apply_batch(&batch, now).expect("applied");
    assert!(again.iter().all(Option::is_none));
    let more = &records[3];
    for _ in 0..2 {
        let next = store
            .apply_batch(&[(more, &Decision::Apply)], now)
            .expect("applied");
        assert_eq!(next[0].as_ref().map(|a| a.frame.id), Some(4));
    }
    // Once written to sled, a redelivery is refused from there.
    store.inner.write_unwritten(u64::MAX).expect("written");
    assert_eq!(store.inner.unwritten().len(), 0);
    let again = store.apply_batch(&batch, now).expect("applied");
    assert!(again.iter().all(Option::is_none));
    // A key twice in one step applies once.
    let twice = store
        .apply_batch(&[(more, &Decision::Apply), (more, &Decision::Apply)], now)
        .expect("applied");
    assert!(twice[0].is_some() && twice[1].is_none());
}

/// What a reader sees of the finished commands and events: the same whether an
/// apply is only logged (`unwritten`) or written to sled by a checkpoint, and
/// contiguous across the two.
#[tokio::test]
async fn reads_find_logged_applies_before_and_after_a_checkpoint_writes_them_to_sled() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let now = OffsetDateTime::now_utc();
    let dead = || Decision::Fail(FailureReason::DeadLettered, "gave up".to_owned());
    let mut finished =
        accept_and_apply_all(&store, &[(create("a", "f", &store), dead())], now).await;
    store.checkpoint().expect("checkpointed");
    assert_eq!(store.inner.unwritten().len(), 0);
    let commands = [
        (create("b", "f", &store), dead()),
        (create("c", "f", &store), Decision::Apply),
    ];
    finished.extend(accept_and_apply_all(&store, &commands, now).await);
    assert!(
        store.inner.commands.get("c").expect("read").is_none(),
        "only logged, not yet in sled"
    );
    for in_sled in [false, true] {
        for (accepted, record) in &finished {
            let by_key = store.finished_command(&accepted.idempotency_key);
            let by_key = by_key.expect("read").expect("finished");
            assert_eq!(by_key.event_id, record.event_id);
            let by_id = store.command_by_id(accepted.command_id).await;
            assert_eq!(
                by_id.expect("read").expect("found").event_id,
                record.event_id
            );
        }
        let ids = |after, up_to, limit| event_ids(&store, after, up_to, limit);
        assert_eq!(ids(0, u64::MAX, 10), [1, 2, 3], "in sled: {in_sled}");
        assert_eq!(ids(0, u64::MAX, 2), [1, 2]);
        assert_eq!(ids(1, 2, 10), [2]);
        assert_eq!(ids(2, u64::MAX, 10), [3]);
        let dead_letters: Vec<_> = store
            .dead_letters()
            .expect("read")
            .into_iter()
            .map(|record| record.idempotency_key)
            .collect();
        assert_eq!(dead_letters, ["a", "b"]);
        store.checkpoint().expect("checkpointed");
        assert_eq!(store.inner.unwritten().len(), 0);
        assert!(store.inner.commands.get("c").expect("read").is_some());
    }
}

/// Applies a create under each key in one step, logs and publishes it (the
/// watermark moves), then checkpoints: one chunk of the event log in sled.
fn settle_in_one_chunk(store: &Store, keys: &[&str]) {
    let records: Vec<_> = keys.iter().map(|key| create(key, "f", store)).collect();
    let batch: Vec<_> = records
        .iter()
        .map(|record| (record, &Decision::Apply))
        .collect();
    let applied = store
        .apply_batch(&batch, OffsetDateTime::now_utc())
        .expect("applied");
    store.log_applied(applied.iter().flatten()).expect("logged");
    for applied in applied.iter().flatten() {
        store.project(applied);
    }
    store.checkpoint().expect("checkpointed");
}

fn event_ids(store: &Store, after: u64, up_to: u64, limit: usize) -> Vec<u64> {
    let frames = store
        .events_after(after, up_to, limit, usize::MAX)
        .expect("read");
    frames.iter().map(|frame| frame.id).collect()
}

/// Asserts that event `id`, read alone, is its own frame (its bytes begin with its
/// `id:` line).
fn assert_frame_of(store: &Store, id: u64) {
    let frames = store.events_after(id - 1, id, 1, usize::MAX).expect("read");
    let expected = format!("id: {id}\n");
    assert!(
        frames[0].bytes.starts_with(expected.as_bytes()),
        "event {id}'s frame"
    );
}

/// The first event id of each value of the event log in sled.
fn event_log_keys(store: &Store) -> Vec<u64> {
    let keys = store.inner.events.iter().keys();
    keys.map(|key| read_u64(&key.expect("a key"))).collect()
}

#[test]
fn the_event_log_is_written_in_chunks_and_read_from_inside_one() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    settle_in_one_chunk(&store, &["a", "b", "c", "d", "e"]);
    settle_in_one_chunk(&store, &["f", "g"]);
    assert_eq!(event_log_keys(&store), [1, 6], "one value per checkpoint");
    assert_eq!(event_ids(&store, 2, u64::MAX, 10), [3, 4, 5, 6, 7]);
    assert_eq!(
        event_ids(&store, 0, 3, 10),
        [1, 2, 3],
        "up to, inside a chunk"
    );
    assert_eq!(
        event_ids(&store, 3, u64::MAX, 3),
        [4, 5, 6],
        "a limit, across two"
    );
    assert_eq!(event_ids(&store, 7, u64::MAX, 10), Vec::<u64>::new());
    assert_frame_of(&store, 5);
}

/// A read bounded by bytes answers as many events as fit, one at least, in sled and
/// in the table of applies not yet written alike.
#[test]
fn a_read_of_the_event_log_stops_at_its_bytes_and_answers_one_at_least() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    settle_in_one_chunk(&store, &["a", "b", "c"]);
    let records: Vec<_> = ["d", "e"]
        .iter()
        .map(|key| create(key, "f", &store))
        .collect();
    let batch: Vec<_> = records.iter().map(|r| (r, &Decision::Apply)).collect();
    let applied = store
        .apply_batch(&batch, OffsetDateTime::now_utc())
        .expect("applied");
    store.log_applied(applied.iter().flatten()).expect("logged");
    assert_eq!(store.inner.unwritten().len(), 2, "d and e not yet in sled");
    let sizes: Vec<usize> = store
        .events_after(0, u64::MAX, 10, usize::MAX)
        .expect("read")
        .iter()
        .map(|frame| frame.bytes.len())
        .collect();
    assert_eq!(sizes.len(), 5);
    let within = |max_bytes| -> Vec<u64> {
        let frames = store
            .events_after(0, u64::MAX, 10, max_bytes)
            .expect("read");
        frames.iter().map(|frame| frame.id).collect()
    };
    assert_eq!(within(1), [1], "one at least");
    assert_eq!(within(sizes[0] + sizes[1]), [1, 2]);
    assert_eq!(
        within(sizes[..4].iter().sum()),
        [1, 2, 3, 4],
        "into the table"
    );
    assert_eq!(within(usize::MAX), [1, 2, 3, 4, 5]);
    let from_the_table = store.events_after(3, u64::MAX, 10, 1).expect("read");
    let ids: Vec<u64> = from_the_table.iter().map(|frame| frame.id).collect();
    assert_eq!(ids, [4]);
}

/// Retention keeps a number of events exactly: the chunks wholly before the first
/// kept one go, and the one that holds it is written again from it on.
#[test]
fn compaction_drops_the_chunks_before_the_kept_events_and_cuts_the_one_they_start_in() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    settle_in_one_chunk(&store, &["a", "b", "c", "d", "e"]);
    settle_in_one_chunk(&store, &["f", "g", "h"]);
    let later = OffsetDateTime::now_utc() - time::Duration::hours(1);

    assert_eq!(store.compact(4, later).expect("compacted"), (4, 0));
    assert_frame_of(&store, 5);
    assert_eq!(
        event_log_keys(&store),
        [5, 6],
        "event 5 alone, under its id"
    );
    assert_eq!(event_ids(&store, 0, u64::MAX, 10), [5, 6, 7, 8]);
    assert_eq!(
        event_ids(&store, 2, u64::MAX, 10),
        [5, 6, 7, 8],
        "a gap: a reset"
    );

    assert_eq!(store.compact(3, later).expect("compacted"), (1, 0));
    assert_eq!(event_log_keys(&store), [6]);
    assert_eq!(store.compact(3, later).expect("compacted"), (0, 0));

    assert_eq!(store.compact(2, later).expect("compacted"), (1, 0));
    store.inner.flush_sled().expect("flushed");
    drop(store);
    let store = reopen(dir.path());
    assert_eq!(event_log_keys(&store), [7]);
    assert_eq!(event_ids(&store, 0, u64::MAX, 10), [7, 8]);
    assert_frame_of(&store, 7);
}

/// A data directory from before chunks holds one frame per value: read as one
/// event each, beside the chunks written since, and trimmed the same way.
#[test]
fn values_of_one_frame_from_before_chunks_are_read_and_trimmed() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    settle_in_one_chunk(&store, &["a", "b"]);
    // Event 1 and 2 as the earlier layout wrote them.
    let frames = store.events_after(0, 2, 10, usize::MAX).expect("read");
    let events = &store.inner.events;
    events.remove(1_u64.to_be_bytes()).expect("removed");
    for frame in &frames {
        events
            .insert(frame.id.to_be_bytes(), frame.bytes.as_ref())
            .expect("inserted");
    }
    settle_in_one_chunk(&store, &["c", "d"]);
    assert_eq!(event_log_keys(&store), [1, 2, 3]);
    let read = store
        .events_after(0, u64::MAX, 10, usize::MAX)
        .expect("read");
    assert_eq!(
        read.iter().map(|frame| frame.id).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(read[1].bytes, frames[1].bytes);

    let later = OffsetDateTime::now_utc() - time::Duration::hours(1);
    assert_eq!(store.compact(3, later).expect("compacted"), (1, 0));
    assert_eq!(event_log_keys(&store), [2, 3]);
    assert_eq!(event_ids(&store, 0, u64::MAX, 10), [2, 3, 4]);
}

/// A read of the event log answers a contiguous run only: a chunk removed under it
/// (by a compaction) shows as a gap at the next read's start, where a subscriber's
/// stream resets, never inside a run it sends on. Here the gap is made in the middle,
/// by hand: a read answers the run before it, and the next read starts after it.
#[test]
fn a_read_of_the_event_log_stops_at_a_gap() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    settle_in_one_chunk(&store, &["a", "b"]);
    settle_in_one_chunk(&store, &["c"]);
    settle_in_one_chunk(&store, &["d"]);
    assert_eq!(event_log_keys(&store), [1, 3, 4]);
    let events = &store.inner.events;
    events.remove(3_u64.to_be_bytes()).expect("removed");
    assert_eq!(event_ids(&store, 0, u64::MAX, 10), [1, 2]);
    assert_eq!(event_ids(&store, 2, u64::MAX, 10), [4]);
    // A repeat, as a read across a compaction's cut may meet: event 2 again, in a
    // chunk of its own beside the one that holds events 1 and 2.
    let second = store
        .events_after(1, 2, 1, usize::MAX)
        .expect("read")
        .remove(0);
    let [(id, chunk)] = &chunks::chunks([(2, second.bytes.as_ref())])[..] else {
        panic!("one chunk");
    };
    events
        .insert(id.to_be_bytes(), chunk.as_slice())
        .expect("inserted");
    assert_eq!(event_log_keys(&store), [1, 2, 4]);
    assert_eq!(event_ids(&store, 0, u64::MAX, 10), [1, 2], "not 1, 2, 2");
    assert_eq!(event_ids(&store, 2, u64::MAX, 10), [4]);
}

/// A like of `task`, as the intake writer would have accepted it.
fn like(key: &str, task: Uuid, store: &Store) -> CommandRecord {
    CommandRecord {
        seq: store.next_seq().expect("an id"),
        ..CommandRecord::accepted(
            task,
            key.to_owned(),
            "f".to_owned(),
            CommandBody::Like { delta: 1 },
            OffsetDateTime::now_utc(),
            0,
        )
    }
}

/// The records applied in one batch on a fresh store of their own: what a step
/// would log, for a store whose sled never saw it.
fn applied_elsewhere(records: &[&CommandRecord]) -> Vec<Option<Applied>> {
    let elsewhere = tempfile::tempdir().expect("a temp dir");
    let other = Store::open(elsewhere.path()).expect("a store");
    let batch: Vec<_> = records
        .iter()
        .map(|record| (*record, &Decision::Apply))
        .collect();
    other
        .apply_batch(&batch, OffsetDateTime::now_utc())
        .expect("applied")
}

fn apply_log_files(dir: &std::path::Path) -> Vec<u64> {
    frames::list_files(&dir.join(apply_log::APPLY_LOG_DIR), ".log").expect("listed")
}

#[test]
fn applies_only_the_apply_log_holds_are_written_to_sled_again_on_open() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    // Applied on another store, logged on this one: as if this store's sled had
    // lost a step the apply log kept (a kill -9 before sled wrote it).
    let record = create("k", "f", &store);
    let applied = applied_elsewhere(&[&record]);
    store.log_applied(applied.iter().flatten()).expect("logged");
    assert!(
        store.inner.commands.get("k").expect("read").is_none(),
        "not in sled: a checkpoint writes it there"
    );
    // And the start of a second step's record, cut short by the crash.
    let file = *apply_log_files(dir.path()).last().expect("a file");
    let path = dir
        .path()
        .join(apply_log::APPLY_LOG_DIR)
        .join(format!("{file:020}.log"));
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("the log");
    std::io::Write::write_all(&mut log, &[0x40, 0, 0, 0, 1, 2]).expect("written");
    drop(store);

    let store = reopen(dir.path());
    let finished = store
        .finished_command("k")
        .expect("read")
        .expect("finished after the replay");
    assert_eq!(finished.command_id, record.command_id);
    assert_eq!(finished.event_id, Some(1));
    let task = store.task(record.task_id).expect("the row is back");
    assert_eq!(task.version, 1);
    let events = store
        .events_after(0, u64::MAX, 10, usize::MAX)
        .expect("read");
    assert_eq!(events.len(), 1);
    let logged = applied[0].as_ref().expect("applied");
    assert_eq!(events[0].bytes, logged.frame.bytes);
    assert_eq!(store.watermark(), 1, "the next event id is 2");
    assert_eq!(
        apply_log_files(dir.path()).len(),
        1,
        "the replayed file is gone once sled is synced; a new one is open"
    );
}

#[test]
fn applies_sled_has_are_not_written_again_by_the_replay() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let now = OffsetDateTime::now_utc();
    let record = create("create", "f", &store);
    let liked = like("like", record.task_id, &store);
    for command in [&record, &liked] {
        let applied = store
            .apply_batch(&[(command, &Decision::Apply)], now)
            .expect("applied");
        store.log_applied(applied.iter().flatten()).expect("logged");
        store.project(applied[0].as_ref().expect("applied"));
    }
    // Written to sled, one chunk each, and the first event trimmed there after;
    // then the process dies before a checkpoint lets go of the apply log.
    let trimmed = store.compact(1, now - time::Duration::hours(1));
    assert_eq!(trimmed.expect("compacted"), (1, 0));
    assert_eq!(event_log_keys(&store), [2], "cut from event 2 on");
    store.inner.flush_sled().expect("flushed");
    drop(store);

    let store = reopen(dir.path());
    assert_eq!(
        event_log_keys(&store),
        [2],
        "the trimmed event is not written back"
    );
    assert_eq!(event_ids(&store, 0, u64::MAX, 10), [2]);
    let task = store.task(record.task_id).expect("the row");
    assert_eq!((task.version, task.likes), (2, 1));
    assert_eq!(store.watermark(), 2);
}

#[test]
fn a_checkpoint_syncs_sled_and_drops_the_apply_logs_earlier_files() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let first = apply_log_files(dir.path());
    assert_eq!(first.len(), 1);
    let record = create("k", "f", &store);
    let applied = store
        .apply_batch(&[(&record, &Decision::Apply)], OffsetDateTime::now_utc())
        .expect("applied");
    store.log_applied(applied.iter().flatten()).expect("logged");
    store.checkpoint().expect("checkpointed");
    let after = apply_log_files(dir.path());
    assert_eq!(after.len(), 1);
    assert!(after[0] > first[0], "a new file, the old one dropped");
    assert_eq!(
        std::fs::metadata(
            dir.path()
                .join(apply_log::APPLY_LOG_DIR)
                .join(format!("{:020}.log", after[0]))
        )
        .expect("the new file")
        .len(),
        0
    );
}

#[tokio::test]
async fn a_replayed_command_displaces_an_expired_record_whose_removal_was_lost() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let old = &accept_and_apply(&store, "k", "f").await;
    store.checkpoint().expect("written to sled and synced");
    let held = finished_in_sled(&store, "k");

    // Compaction frees the key, a new command takes it and applies, logged.
    let new = &retake_after_compaction(&store).await;
    let applied = store
        .apply_batch(&[(new, &Decision::Apply)], OffsetDateTime::now_utc())
        .expect("applied");
    store.log_applied(applied.iter().flatten()).expect("logged");
    store.finish(&new.idempotency_key, new.command_id);

    // sled loses the removal (the apply it never had: only the log holds it).
    bring_back(&store, old, held);
    let inner = &store.inner;
    assert!(inner
        .command_ids
        .get(new.command_id.as_bytes())
        .unwrap()
        .is_none());
    assert!(inner.records.get(2_u64.to_be_bytes()).unwrap().is_none());
    assert!(inner.tasks.get(new.task_id.as_bytes()).unwrap().is_none());
    let last = inner.meta.get(LAST_EVENT_ID).unwrap().expect("written");
    assert_eq!(read_u64(&last), 1);
    inner.flush_sled().expect("flushed");
    drop(store);

    let store = reopen(dir.path());
    assert!(store.unapplied().is_empty(), "the replay finished it");
    let finished = store.finished_command("k").unwrap().expect("finished");
    assert_eq!(finished.command_id, new.command_id);
    assert!(
        store.command_by_id(old.command_id).await.unwrap().is_none(),
        "the expired command's id finds nothing, not the key's new record"
    );
    assert_eq!(
        store
            .inner
            .command_ids
            .get(new.command_id.as_bytes())
            .unwrap(),
        Some(sled::IVec::from(&pointer(2)))
    );
    assert_eq!(record_ids(&store), [1, 2]);
    assert!(store.task(new.task_id).is_some());
}

#[test]
fn a_replayed_apply_displaces_an_earlier_one_of_its_batch_under_the_same_key() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    // Two commands of one key, applied as events 1 and 2 (as if the first expired
    // between them and sled lost all of it), in the apply log alone.
    let records = [create("k", "f", &store), create("k", "f", &store)];
    let applied = applied_elsewhere(&records.iter().collect::<Vec<_>>());
    let applied: Vec<_> = applied.iter().flatten().collect();
    store.inner.apply_log().append(applied).expect("appended");
    drop(store);

    let store = reopen(dir.path());
    let ids = &store.inner.command_ids;
    assert!(ids.get(records[0].command_id.as_bytes()).unwrap().is_none());
    assert_eq!(
        ids.get(records[1].command_id.as_bytes()).unwrap(),
        Some(sled::IVec::from(&pointer(2)))
    );
    let finished = store.finished_command("k").unwrap().expect("finished");
    assert_eq!(finished.command_id, records[1].command_id);
    assert_eq!(record_ids(&store), [1, 2]);
}

#[test]
fn a_gap_in_the_apply_log_ends_its_replay() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let records = ["a", "b", "c"].map(|key| create(key, "f", &store));
    let applied = applied_elsewhere(&records.iter().collect::<Vec<_>>());
    // Events 1 and 3 logged, 2 lost (written to the log directly: a step never
    // logs past a gap).
    store.log_applied(applied[0].as_ref()).expect("logged");
    store
        .inner
        .apply_log()
        .append(applied[2].as_ref())
        .expect("appended");
    drop(store);

    let store = reopen(dir.path());
    assert!(store.finished_command("a").unwrap().is_some());
    assert!(
        store.finished_command("c").unwrap().is_none(),
        "not written past the gap"
    );
    assert_eq!(store.watermark(), 1, "the next event id is 2");
}

/// A store with one step applied and its write to the apply log failed.
fn failed_apply_log_write(dir: &std::path::Path) -> Store {
    let store = Store::open(dir).expect("a store");
    let record = create("k", "f", &store);
    let applied = store
        .apply_batch(&[(&record, &Decision::Apply)], OffsetDateTime::now_utc())
        .expect("applied");
    store.inner.apply_log().fail_writes();
    assert!(store.log_applied(applied.iter().flatten()).is_err());
    assert!(store.sync_has_failed(), "the server stops");
    assert!(store.apply_log_has_failed() && !store.sled_sync_has_failed());
    assert!(store.checkpoint().is_err(), "nothing more is made durable");
    store
}

#[test]
fn a_failed_write_to_the_apply_log_stops_the_server_but_not_the_next_start() {
    let dir = tempfile::tempdir().expect("a temp dir");
    drop(failed_apply_log_write(dir.path()));
    let store = reopen(dir.path());
    assert!(!store.sync_has_failed());
}

#[test]
fn a_sync_failure_after_a_failed_write_to_the_apply_log_still_refuses_a_start_in_this_boot() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = failed_apply_log_write(dir.path());
    store.fail_sled_sync();
    assert!(store.sled_sync_has_failed());
    drop(store);
    let opened = Store::open_waiting(
        dir.path(),
        Duration::from_secs(10),
        &CancellationToken::new(),
    );
    assert!(
        matches!(opened, Err(StoreError::SyncFailedThisBoot(_))),
        "the marker was left"
    );
}

/// A snapshot shares the rows' tasks instead of copying them under the projection's
/// lock, and a later change makes a new task: a snapshot taken before it still shows
/// the task as it was.
#[test]
fn a_snapshot_shares_the_tasks_and_keeps_them_as_they_were() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    settle_in_one_chunk(&store, &["a"]);
    let (before, _) = store.snapshot();
    let (again, _) = store.snapshot();
    assert!(Arc::ptr_eq(&before[0], &again[0]), "shared, not copied");
    let liked = like("l", before[0].id, &store);
    let applied = store
        .apply_batch(&[(&liked, &Decision::Apply)], OffsetDateTime::now_utc())
        .expect("applied");
    store.log_applied(applied.iter().flatten()).expect("logged");
    for applied in applied.iter().flatten() {
        store.project(applied);
    }
    let (after, _) = store.snapshot();
    assert_eq!((before[0].likes, after[0].likes), (0, 1));
    assert!(!Arc::ptr_eq(&before[0], &after[0]));
}
