//! What the janitor's compaction costs, at the store level: fills a fresh store with
//! finished commands settled two hours ago (each step a millisecond after the one
//! before, logged and checkpointed into sled as the consumer's steps would be; the
//! fill's time is also split between the steps and the checkpoints), times a restart
//! on that store, then times `Store::compact` with nothing expired (what every minute
//! of a long-running node costs) and with all of them expired (what removing a
//! minute's worth costs, per record).
//!
//! ```sh
//! cargo run --release --example compaction -- --records 300000
//! ```
//!
//! Not a test: BENCHMARKS.md records its figures with the command that made them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use settle::model::{CommandBody, CommandRecord};
use settle::store::{Decision, Store, StoreError};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Times the janitor's compaction over a store of finished commands.
#[derive(Parser)]
struct Args {
    /// Finished commands in the store.
    #[arg(long, default_value_t = 100_000)]
    records: usize,
    /// Where the store's fresh directory is made [default: the system's temp dir].
    #[arg(long)]
    data_parent: Option<PathBuf>,
    /// Commands per apply step while filling (the consumer's largest batch).
    #[arg(long, default_value_t = settle::consumer::MAX_BATCH)]
    batch: usize,
}

/// The server's allocator (`src/main.rs`), so that a checkpoint here costs what it costs
/// in the server.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = match &args.data_parent {
        Some(parent) => tempfile::tempdir_in(parent),
        None => tempfile::tempdir(),
    }
    .context("making the store's directory")?;
    let store = Store::open(dir.path()).context("opening the store")?;
    println!(
        "compaction of {} finished commands, store in {}",
        args.records,
        dir.path().display()
    );

    let settled = OffsetDateTime::now_utc() - time::Duration::hours(2);
    let started = Instant::now();
    let mut filled = 0;
    let mut step = 0;
    // The fill's two halves: what the consumer's thread pays (the step and its log
    // record) and what the checkpoint's thread pays (sled's writes of those applies).
    let (mut stepping, mut checkpointing) = (Duration::ZERO, Duration::ZERO);
    // And the CPU the checkpoints take, sled's own threads' included: their wall time
    // also waits for the disk.
    let mut checkpoint_cpu = Duration::ZERO;
    while filled < args.records {
        let records = (0..args.batch.min(args.records - filled))
            .map(|_| finished_command(&store, settled))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let batch: Vec<_> = records
            .iter()
            .map(|record| (record, &Decision::Apply))
            .collect();
        let at = settled + time::Duration::milliseconds(step);
        let timer = Instant::now();
        let applied = store.apply_batch(&batch, at).context("applying")?;
        store
            .log_applied(applied.iter().flatten())
            .context("logging")?;
        stepping += timer.elapsed();
        // As the consumer does: the applies go to sled at a checkpoint.
        let (timer, cpu) = (Instant::now(), cpu_time());
        if let Some(checkpoint) = store.begin_checkpoint().context("checkpointing")? {
            checkpoint.run().context("checkpointing")?;
        }
        checkpointing += timer.elapsed();
        checkpoint_cpu += cpu_time().saturating_sub(cpu);
        filled += records.len();
        step += 1;
    }
    let (timer, cpu) = (Instant::now(), cpu_time());
    store.checkpoint().context("syncing")?;
    checkpointing += timer.elapsed();
    checkpoint_cpu += cpu_time().saturating_sub(cpu);
    let fill = started.elapsed();
    println!(
        "  fill             {filled} applied in steps of {}: {} s ({} µs per command)",
        args.batch,
        seconds(fill),
        per_record_us(fill, filled)
    );
    println!(
        "    steps, logged  {} µs per command (the consumer's thread)",
        per_record_us(stepping, filled)
    );
    println!(
        "    checkpoints    {} µs per command (sled's writes and syncs), {} µs of it CPU",
        per_record_us(checkpointing, filled),
        per_record_us(checkpoint_cpu, filled)
    );

    // A restart's price: sled's recovery, the start-up's read of every finished key
    // (the intake's count of their hashes) and of every task (the projection). sled lets
    // go of the directory's lock a moment after the last handle drops: only the attempt
    // that opens is timed.
    drop(store);
    let (store, reopen) = reopen(dir.path())?;
    println!(
        "  reopen           {} s ({} µs per finished command)",
        seconds(reopen),
        per_record_us(reopen, filled)
    );

    let not_yet = settled - time::Duration::hours(1);
    let mut idle = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let (_, removed) = store.compact(u64::MAX, not_yet).context("compacting")?;
        anyhow::ensure!(removed == 0, "nothing had expired, yet {removed} went");
        idle.push(format!(
            "{:.3} ms",
            started.elapsed().as_secs_f64() * 1000.0
        ));
    }
    println!("  nothing expired  {} (3 runs)", idle.join(" / "));

    let started = Instant::now();
    let (_, removed) = store
        .compact(u64::MAX, settled + time::Duration::hours(1))
        .context("compacting")?;
    let removal = started.elapsed();
    anyhow::ensure!(removed == filled, "{filled} had expired, {removed} went");
    println!(
        "  all expired      {removed} removed: {} s ({} µs per command)",
        seconds(removal),
        per_record_us(removal, removed)
    );
    Ok(())
}

/// A new create command, as the intake would have accepted it.
fn finished_command(store: &Store, accepted_at: OffsetDateTime) -> anyhow::Result<CommandRecord> {
    let task_id = Uuid::now_v7();
    let body = CommandBody::Create {
        title: format!("task {task_id}"),
        notes: String::new(),
    };
    let key = Uuid::new_v4().to_string();
    Ok(CommandRecord {
        seq: store.next_seq().context("a seq")?,
        ..CommandRecord::accepted(task_id, key, "0".repeat(64), body, accepted_at, 0)
    })
}

/// Opens the store at `dir` once its lock is free (bounded: 5 s), and times the open
/// that succeeded.
fn reopen(dir: &std::path::Path) -> anyhow::Result<(Store, Duration)> {
    let never = CancellationToken::new();
    for _ in 0..500 {
        let started = Instant::now();
        match Store::open_waiting(dir, Duration::ZERO, &never) {
            Ok(store) => return Ok((store, started.elapsed())),
            Err(StoreError::Locked(_)) => std::thread::sleep(Duration::from_millis(10)),
            Err(err) => return Err(err).context("reopening the store"),
        }
    }
    anyhow::bail!("the store's directory stayed locked for 5 s")
}

/// The CPU time this process has used so far, user and system, all its threads.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `getrusage` fills the struct it is given, which is valid for writes;
    // with `RUSAGE_SELF` it cannot fail.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| {
        let micros = u64::try_from(t.tv_usec).unwrap_or(0);
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0)) + Duration::from_micros(micros)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn seconds(elapsed: Duration) -> String {
    format!("{:.2}", elapsed.as_secs_f64())
}

fn per_record_us(elapsed: Duration, records: usize) -> String {
    format!("{:.1}", elapsed.as_secs_f64() * 1e6 / records.max(1) as f64)
}
