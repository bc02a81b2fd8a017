//! The intake log's tests: batches, segments and their recycling, recovery, and a
//! failed sync.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::segments::{segment_path, spare_path, SEGMENT_SUFFIX};
use super::*;
use crate::lag::Lag;
use crate::store::frames::{decode_frames, list_files};
use crate::store::Overload;

pub(super) fn record(key: &str) -> CommandRecord {
    CommandRecord {
        seq: 1,
        ..CommandRecord::accepted(
            Uuid::now_v7(),
            key.to_owned(),
            key.to_owned(),
            crate::model::CommandBody::Like { delta: 1 },
            time::OffsetDateTime::now_utc(),
            0,
        )
    }
}

#[test]
fn frames_round_trip_and_a_torn_or_damaged_tail_ends_the_segment() {
    let mut bytes = Vec::new();
    for key in ["a", "b", "c"] {
        encode_frame(&mut bytes, 7, &record(key)).expect("encodable");
    }
    let whole = bytes.len();
    let (payloads, intact) = decode_frames(&bytes, 7);
    assert_eq!(payloads.len(), 3);
    assert_eq!(intact, whole);

    // A crash in the middle of the third record's write.
    let (payloads, intact) = decode_frames(&bytes[..whole - 5], 7);
    assert_eq!(payloads.len(), 2);
    assert!(intact < whole - 5);

    // A flipped bit in the second record: nothing from there on is trusted.
    let second = intact - payloads[1].len() - 2;
    bytes[second] ^= 0x20;
    let (payloads, _) = decode_frames(&bytes, 7);
    assert_eq!(payloads.len(), 1);
}

#[test]
fn a_recycled_file_shows_none_of_its_earlier_records() {
    let mut old_life = Vec::new();
    for key in ["a", "b", "c"] {
        encode_frame(&mut old_life, 3, &record(key)).expect("encodable");
    }
    // Reused as segment 9: one new record overwrites the start.
    let mut file = Vec::new();
    encode_frame(&mut file, 9, &record("new")).expect("encodable");
    let new_length = file.len();
    file.extend_from_slice(&old_life[new_length.min(old_life.len())..]);
    file.extend_from_slice(&old_life);
    let (payloads, intact) = decode_frames(&file, 9);
    assert_eq!(payloads.len(), 1);
    assert_eq!(intact, new_length);
    assert!(decode_frames(&old_life, 9).0.is_empty());
    assert!(
        decode_frames(&[0; 64], 9).0.is_empty(),
        "zeros end a segment"
    );
}

#[test]
fn a_batch_whose_write_fails_is_refused_with_its_replays_and_leaves_nothing_pending() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let earlier = record("earlier");
    store.pending_table().insert(earlier.clone(), 1, 100);
    let durable = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&durable);
    // A write to a pipe at an offset fails (ESPIPE): a stand-in for a failed write.
    let (_reader, pipe) = io::pipe().expect("a pipe");
    let (_sender, inbox) = mpsc::channel(1);
    let mut writer = IntakeWriter {
        store: store.clone(),
        inbox,
        on_durable: Box::new(move |records: &[CommandRecord]| {
            seen.lock()
                .unwrap()
                .extend(records.iter().map(|r| r.command_id));
        }),
        file: File::from(std::os::fd::OwnedFd::from(pipe)),
        segment: 1,
        written: 0,
        buffer: Vec::new(),
        last_accepted_at: time::OffsetDateTime::UNIX_EPOCH,
        bound: PendingBound::none(),
        refusing: Arc::default(),
        refusal_log: RefusalLog::default(),
    };
    let mut reused = record("new");
    reused.fingerprint = "another request".to_owned();
    let requests = [record("new"), record("new"), reused, earlier.clone()];
    let (batch, answers): (Vec<_>, Vec<_>) = requests
        .into_iter()
        .map(|record| {
            let (reply, answer) = oneshot::channel();
            ((record, reply), answer)
        })
        .unzip();

    writer.write_batch(batch);

    let answers: Vec<_> = answers
        .into_iter()
        .map(|answer| answer.blocking_recv().expect("an answer"))
        .collect();
    assert!(
        answers[..3].iter().all(Result::is_err),
        "the new command, its replay and its key's reuse are refused: {answers:?}"
    );
    assert!(
        matches!(&answers[3], Ok(Accepted::Replay(r)) if r.command_id == earlier.command_id),
        "a replay of a command from an earlier batch is still answered: {:?}",
        answers[3]
    );
    assert!(
        store.pending_command("new").is_none(),
        "nothing refused stays pending"
    );
    assert!(store.pending_command("earlier").is_some());
    assert!(
        durable.lock().unwrap().is_empty(),
        "nothing refused is scheduled"
    );
    assert_eq!(writer.written, 0);
    assert_eq!(
        store.pending_table().bytes,
        100,
        "the refused command's size is taken off again"
    );
}

/// A store whose segments 1 and 2 hold one pending command each ("a", "b"), with 3
/// active, and the path of its intake directory.
fn two_closed_segments(dir: &Path) -> (Store, PathBuf, [CommandRecord; 2]) {
    let store = Store::open(dir).expect("a store");
    let intake_dir = store.inner.intake_dir.clone();
    let (a, b) = (record("a"), record("b"));
    {
        let mut table = store.pending_table();
        table.active = 3;
        table.insert(a.clone(), 1, 0);
        table.insert(b.clone(), 2, 0);
    }
    for segment in [1, 2] {
        fs::write(segment_path(&intake_dir, segment), b"").expect("a segment");
    }
    (store, intake_dir, [a, b])
}

#[test]
fn a_finished_segment_is_released_once_sled_s_file_is_synced() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (store, intake_dir, [a, _]) = two_closed_segments(dir.path());
    store.finish("a", a.command_id);
    assert!(
        segment_path(&intake_dir, 1).exists(),
        "not before the release"
    );
    assert!(
        store
            .release_finished_segments()
            .expect("released")
            .is_some(),
        "a sync, timed"
    );
    assert!(!segment_path(&intake_dir, 1).exists());
    assert!(spare_path(&intake_dir, 1).exists(), "kept as a spare");
    assert!(
        segment_path(&intake_dir, 2).exists(),
        "b is still unfinished"
    );
    assert!(
        store
            .release_finished_segments()
            .expect("nothing to release")
            .is_none(),
        "no sync when nothing is releasable"
    );
}

#[test]
fn after_a_failed_sync_of_sled_s_file_no_segment_is_released_until_a_reboot() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (mut store, intake_dir, [a, b]) = two_closed_segments(dir.path());
    // fdatasync fails on a pipe (EINVAL): a stand-in for a sync that failed.
    let (pipe, _writer) = io::pipe().expect("a pipe");
    let unsyncable = File::from(std::os::fd::OwnedFd::from(pipe));
    let inner = Arc::get_mut(&mut store.inner).expect("the only handle");
    let sled_file = std::mem::replace(&mut inner.sled_file, unsyncable);

    store.finish("a", a.command_id);
    assert!(
        store.release_finished_segments().is_err(),
        "the sync failed"
    );
    assert!(segment_path(&intake_dir, 1).exists());

    // The file syncs again, but the pages of the failed writeback may be lost.
    Arc::get_mut(&mut store.inner)
        .expect("the only handle")
        .sled_file = sled_file;
    store.finish("b", b.command_id);
    assert!(store.release_finished_segments().is_err());
    assert!(segment_path(&intake_dir, 2).exists());
    // Seqs of the block reserved before go on; the next block is not reserved, so
    // accepts stop rather than hand out seqs a power loss could give out again.
    let block = super::super::SEQ_BLOCK;
    let handed_out = (0..=block).take_while(|_| store.next_seq().is_ok()).count();
    assert_eq!(
        handed_out as u64, block,
        "the block reserved at open, no more"
    );

    drop(store);
    let reopen = || {
        Store::open_waiting(
            dir.path(),
            std::time::Duration::from_secs(10),
            &tokio_util::sync::CancellationToken::new(),
        )
    };
    // In the same boot the page cache may hold what the disk lost.
    let marker = intake_dir.join("sync-failed");
    assert!(matches!(reopen(), Err(StoreError::SyncFailedThisBoot(path)) if path == marker));
    for segment in [1, 2] {
        assert!(
            segment_path(&intake_dir, segment).exists(),
            "kept: {segment}"
        );
    }

    // After a reboot (the marker names another boot) the start trusts the disk.
    let text = fs::read_to_string(&marker).expect("the marker");
    let cause = text.split_once('\n').map_or("", |(_, cause)| cause);
    fs::write(&marker, format!("an earlier boot\n{cause}")).expect("rewritten");
    drop(reopen().expect("the store reopens after a reboot"));
    assert!(!marker.exists(), "the start removes the marker");
    for segment in [1, 2] {
        assert!(
            !segment_path(&intake_dir, segment).exists(),
            "a new boot releases what it finds finished: {segment}"
        );
    }
}

#[test]
fn a_rotation_makes_the_closed_segment_releasable_once_if_all_of_it_finished() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let active = store.pending_table().active;
    let (_sender, inbox) = mpsc::channel(1);
    let mut writer = IntakeWriter {
        store: store.clone(),
        inbox,
        on_durable: Box::new(|_: &[CommandRecord]| {}),
        file: open_segment(&store, active).expect("a segment"),
        segment: active,
        written: 0,
        buffer: Vec::new(),
        last_accepted_at: time::OffsetDateTime::UNIX_EPOCH,
        bound: PendingBound::none(),
        refusing: Arc::default(),
        refusal_log: RefusalLog::default(),
    };
    let (a, b) = (record("a"), record("b"));
    store.pending_table().insert(a.clone(), active, 0);
    store.finish("a", a.command_id);
    assert!(
        store.pending_table().releasable.is_empty(),
        "the active segment is never releasable"
    );

    writer.rotate().expect("rotated");
    assert_eq!(store.pending_table().releasable, [active]);
    store.pending_table().insert(b.clone(), active + 1, 0);
    writer.rotate().expect("rotated");
    assert_eq!(
        store.pending_table().releasable,
        [active],
        "b is unfinished in the closed segment"
    );
    store.finish("b", b.command_id);
    assert_eq!(store.pending_table().releasable, [active, active + 1]);
}

/// A fresh store and a writer bounded at `bound`, with the keys it hands on as
/// durable. Bind `dir` (as `_dir`) where it is not used: left out of a pattern, the
/// directory would be removed at once.
struct Bounded {
    dir: tempfile::TempDir,
    store: Store,
    intake: Intake,
    thread: IntakeThread,
    durable: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Bounded {
    fn new(bound: PendingBound) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path()).expect("a store");
        let durable = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&durable);
        let (intake, thread) = Intake::start(
            store.clone(),
            bound,
            Box::new(move |records: &[CommandRecord]| {
                seen.lock()
                    .unwrap()
                    .extend(records.iter().map(|r| r.idempotency_key.clone()));
            }),
            CancellationToken::new(),
        )
        .expect("a writer");
        Self {
            dir,
            store,
            intake,
            thread,
            durable,
        }
    }

    /// At most `commands` pending commands, bytes unbounded.
    fn at_count(commands: usize) -> Self {
        Self::new(PendingBound {
            commands,
            ..PendingBound::none()
        })
    }
}

/// At its bound the intake refuses a new key and stores nothing of it, answers a
/// known key as always, and takes new keys again once a pending command finishes.
#[tokio::test]
async fn at_max_pending_a_new_key_is_refused_and_stores_nothing() {
    let Bounded {
        dir,
        store,
        intake,
        thread,
        durable,
    } = Bounded::at_count(2);
    let accept = |key: &str| intake.accept(record(key));

    let a = match accept("a").await.expect("answered") {
        Accepted::New(a) => a,
        other => panic!("a is new: {other:?}"),
    };
    assert!(matches!(accept("b").await, Ok(Accepted::New(_))));
    let refused = accept("c").await;
    assert!(
        matches!(refused, Ok(Accepted::Overloaded(Refusal { pending: 2, bytes, bound: Overload::Commands, .. })) if bytes > 0),
        "{refused:?}"
    );
    assert!(store.pending_command("c").is_none(), "c is not pending");
    assert!(
        matches!(accept("a").await, Ok(Accepted::Replay(r)) if r.command_id == a.command_id),
        "a known key is answered as always"
    );

    store.finish("a", a.command_id);
    assert!(
        matches!(accept("c").await, Ok(Accepted::New(_))),
        "room again once a command finished"
    );
    assert!(intake.stop(thread).await);
    assert_eq!(*durable.lock().unwrap(), ["a", "b", "c"]);

    // The log holds three records: the refusal and the replay wrote nothing.
    let intake_dir = store.inner.intake_dir.clone();
    let mut logged = Vec::new();
    for segment in list_files(&intake_dir, SEGMENT_SUFFIX).expect("listed") {
        let bytes = fs::read(segment_path(&intake_dir, segment)).expect("readable");
        for payload in decode_frames(&bytes, segment).0 {
            let record: CommandRecord = serde_json::from_slice(payload).expect("a record");
            logged.push(record.idempotency_key);
        }
    }
    assert_eq!(logged, ["a", "b", "c"]);

    // After a restart all three are pending (a was finished in memory only, never
    // applied), counted at their records' sizes as the writer counted them.
    drop((intake, store));
    let store = Store::open(dir.path()).expect("reopened");
    let unapplied = store.unapplied();
    let sizes: usize = unapplied
        .iter()
        .map(|record| encode_frame(&mut Vec::new(), 1, record).expect("encodable"))
        .sum();
    assert_eq!(unapplied.len(), 3);
    assert_eq!(store.pending_table().bytes, sizes);
}

/// Beyond `--max-lag-ms` (the oldest command the consumer may apply has been due
/// longer) a new key is refused, by the writer and then by the handlers, with the
/// lag in the answer; a known key is answered as always; once the consumer has
/// caught up, new keys are taken again.
#[tokio::test]
async fn beyond_max_lag_a_new_key_is_refused_until_the_consumer_catches_up() {
    let lag = Lag::new();
    let Bounded {
        dir: _dir,
        store,
        intake,
        thread,
        durable,
    } = Bounded::new(PendingBound {
        max_lag: Some(Duration::from_secs(1)),
        lag: lag.clone(),
        ..PendingBound::none()
    });
    let accept = |key: &str| intake.accept(record(key));
    let a = match accept("a").await.expect("answered") {
        Accepted::New(a) => a,
        other => panic!("a is new: {other:?}"),
    };

    let behind = || lag.waiting_since(Some(Instant::now() - Duration::from_millis(1500)));
    behind();
    let refused = accept("b").await;
    assert!(
        matches!(refused, Ok(Accepted::Overloaded(Refusal { pending: 1, lag_ms, bound: Overload::Lag, .. })) if lag_ms >= 1500),
        "refused: {refused:?}"
    );
    assert!(store.pending_command("b").is_none(), "b is not pending");
    assert!(
        matches!(accept("a").await, Ok(Accepted::Replay(r)) if r.command_id == a.command_id),
        "a known key is answered as always"
    );

    lag.waiting_since(Some(Instant::now()));
    assert!(
        matches!(accept("b").await, Ok(Accepted::New(_))),
        "taken again within the bound"
    );

    // Once the writer has refused, the handlers refuse by the lag too: with the
    // writer gone (which would answer `Stopped`), a new key is still `Overloaded`.
    behind();
    assert!(matches!(accept("c").await, Ok(Accepted::Overloaded(_))));
    assert!(intake.stop(thread).await);
    let refused = accept("d").await;
    assert!(
        matches!(refused, Ok(Accepted::Overloaded(Refusal { pending: 2, lag_ms, bound: Overload::Lag, .. })) if lag_ms >= 1500),
        "refused by a handler: {refused:?}"
    );
    assert_eq!(*durable.lock().unwrap(), ["a", "b"]);
}

/// Once the writer refuses, a handler refuses a certainly new key itself: with the
/// writer stopped, a new key is still answered `Overloaded`, while a pending key
/// (whose replay waits for its record to be durable) still needs the writer.
#[tokio::test]
async fn while_refusing_a_new_key_is_refused_without_the_writer() {
    let Bounded {
        dir: _dir,
        intake,
        thread,
        ..
    } = Bounded::at_count(1);
    assert!(matches!(
        intake.accept(record("a")).await,
        Ok(Accepted::New(_))
    ));
    assert!(!intake.refusing.load(Ordering::Relaxed), "not refusing yet");
    assert!(matches!(
        intake.accept(record("b")).await,
        Ok(Accepted::Overloaded(Refusal { pending: 1, .. }))
    ));
    assert!(
        intake.refusing.load(Ordering::Relaxed),
        "the writer refused"
    );
    assert!(intake.stop(thread).await);

    let refused = intake.accept(record("c")).await;
    assert!(
        matches!(
            refused,
            Ok(Accepted::Overloaded(Refusal { pending: 1, .. }))
        ),
        "refused without the writer: {refused:?}"
    );
    assert!(
        matches!(intake.accept(record("a")).await, Err(IntakeError::Stopped)),
        "a pending key is the writer's to answer"
    );
}

/// While refusing, a retry of a finished key is still the writer's to answer: the
/// handlers refuse only what the table shows to be new.
#[tokio::test]
async fn while_refusing_a_finished_key_is_replayed() {
    let Bounded {
        dir: _dir,
        store,
        intake,
        thread,
        ..
    } = Bounded::at_count(1);
    let Ok(Accepted::New(a)) = intake.accept(record("a")).await else {
        panic!("a is new");
    };
    // Its like finds no task: it finishes failed, a finished record all the same.
    let applied = store
        .apply_batch(
            &[(&a, &super::super::Decision::Apply)],
            time::OffsetDateTime::now_utc(),
        )
        .expect("applied");
    store.log_applied(applied.iter().flatten()).expect("logged");
    store.finish("a", a.command_id);
    assert!(matches!(
        intake.accept(record("b")).await,
        Ok(Accepted::New(_))
    ));
    assert!(matches!(
        intake.accept(record("c")).await,
        Ok(Accepted::Overloaded(_))
    ));
    assert!(intake.refusing.load(Ordering::Relaxed), "refusing");

    let retry = intake.accept(record("a")).await;
    assert!(
        matches!(&retry, Ok(Accepted::Replay(r)) if r.command_id == a.command_id),
        "the finished command, not a refusal: {retry:?}"
    );
    assert!(matches!(
        intake.accept(record("c")).await,
        Ok(Accepted::Overloaded(_))
    ));
    assert!(intake.stop(thread).await);
}

/// The bound on bytes: records count at their size in the log, and a new key is
/// refused once they reach it, whatever their number; a finished one frees its size.
#[tokio::test]
async fn at_max_pending_bytes_a_new_key_is_refused() {
    let Bounded {
        dir: _dir,
        store,
        intake,
        thread,
        ..
    } = Bounded::new(PendingBound {
        bytes: 1,
        ..PendingBound::none()
    });
    let a = match intake.accept(record("a")).await {
        Ok(Accepted::New(a)) => a,
        other => panic!("below the bound: {other:?}"),
    };
    let size = store.pending_table().bytes;
    let mut frame = Vec::new();
    let encoded = encode_frame(&mut frame, 1, &a).expect("encodable");
    assert_eq!(size, encoded, "a record counts at its frame's size");
    let refused = intake.accept(record("b")).await;
    assert!(
        matches!(refused, Ok(Accepted::Overloaded(Refusal { pending: 1, bytes, bound: Overload::Bytes, .. })) if bytes == size),
        "{refused:?}"
    );
    store.finish("a", a.command_id);
    assert_eq!(store.pending_table().bytes, 0);
    assert!(matches!(
        intake.accept(record("b")).await,
        Ok(Accepted::New(_))
    ));
    assert!(intake.stop(thread).await);
}

/// A writer that panics stops the server: it cancels the shutdown, the accept that
/// met it fails instead of waiting forever, and `stop` reports it.
#[tokio::test]
async fn a_panic_of_the_writer_starts_the_shutdown_and_stop_reports_it() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(dir.path()).expect("a store");
    let shutdown = CancellationToken::new();
    let (intake, thread) = Intake::start(
        store.clone(),
        PendingBound::none(),
        Box::new(|_: &[CommandRecord]| {}),
        shutdown.clone(),
    )
    .expect("a writer");
    store.poison_pending_table();
    assert!(matches!(
        intake.accept(record("a")).await,
        Err(IntakeError::Stopped)
    ));
    tokio::time::timeout(Duration::from_secs(10), shutdown.cancelled())
        .await
        .expect("the writer starts the shutdown");
    assert!(!intake.stop(thread).await, "stop reports the panic");
}

impl Store {
    /// Poisons the pending table's lock, as a panic while holding it would: the writer
    /// panics at its next look at the table.
    fn poison_pending_table(&self) {
        let store = self.clone();
        let poisoner = std::thread::spawn(move || {
            let _held = store.inner.pending.lock();
            panic!("poisoning the pending table's lock (a test)");
        });
        assert!(poisoner.join().is_err());
    }
}

/// A command stamped before the one the writer took last gets a time a nanosecond after
/// it, and its due time moves by as much: acceptance times rise with the seqs (unless
/// the clock went back further than handlers race).
#[tokio::test]
async fn acceptance_times_rise_with_the_seqs() {
    let Bounded { intake, thread, .. } = Bounded::new(PendingBound::none());
    let stamped = |key: &str, at: time::OffsetDateTime| CommandRecord {
        accepted_at: at,
        due_at_ms: unix_ms_ceil(at) + 700,
        ..record(key)
    };
    let now = time::OffsetDateTime::now_utc();
    let ms_end = now.replace_nanosecond(999_999_999).expect("a time");
    let mut taken = Vec::new();
    // Out of order: the second and third stamped before the first, the third at the
    // last nanosecond of a millisecond, so its move crosses into the next one.
    for (key, at) in [
        ("a", ms_end),
        ("b", now),
        ("c", ms_end - time::Duration::nanoseconds(1)),
    ] {
        match intake.accept(stamped(key, at)).await.expect("answered") {
            Accepted::New(record) => taken.push(record),
            other => panic!("{key} is new: {other:?}"),
        }
    }
    let times: Vec<_> = taken.iter().map(|record| record.accepted_at).collect();
    assert_eq!(
        times,
        [
            ms_end,
            ms_end + time::Duration::nanoseconds(1),
            ms_end + time::Duration::nanoseconds(2)
        ]
    );
    let delays: Vec<_> = taken
        .iter()
        .map(|record| record.due_at_ms - unix_ms_ceil(record.accepted_at))
        .collect();
    assert_eq!(delays, [700, 700, 700], "each keeps its delay");
    assert!(taken.windows(2).all(|pair| pair[0].seq < pair[1].seq));
    // A clock set back by more than a race between handlers is taken as it is: holding
    // the command after the old time would delay it by the step.
    let set_back = ms_end - ACCEPTANCE_REORDER_MAX;
    match intake
        .accept(stamped("d", set_back))
        .await
        .expect("answered")
    {
        Accepted::New(record) => assert_eq!(
            (record.accepted_at, record.due_at_ms),
            (set_back, unix_ms_ceil(set_back) + 700)
        ),
        other => panic!("d is new: {other:?}"),
    }
    assert!(intake.stop(thread).await);
}
