//! The `settle` binary: parse the config, set up logs, bind, run until ctrl-c/SIGTERM.

use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use settle::config::Config;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// jemalloc, not glibc's malloc: sled's inserts, the apply log's frames and the HTTP
/// exchange allocate and free buffers of every size on several threads, where glibc
/// spends much of its time sorting and merging freed chunks. On the accept phase it
/// took 12-15% less CPU per command, with the same or slightly less memory per
/// subscriber (BENCHMARKS.md, section 2b).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::stdout().is_terminal())
        // A log line that cannot be written (stdout a pipe whose reader is gone) is
        // dropped. By default the subscriber reports that on stderr, which panics if
        // stderr is gone too: the thread that logged (a signal handler, the consumer)
        // would die with it, and the server stop answering SIGTERM.
        .log_internal_errors(false)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("settle=info")),
        )
        .init();
    let config = Config::parse();
    match settle::net::raise_open_file_limit() {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(err) => tracing::warn!(error = %err, "cannot raise the open file limit"),
    }
    let listener =
        settle::net::bind(config.addr).with_context(|| format!("binding {}", config.addr))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    settle::serve(listener, config, shutdown).await
}

/// One shutdown source for the whole process: SIGINT (ctrl-c) or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let signal = settle::signal::stop_requested().await;
    // Cancel first: nothing, not even a log line, may stand between a signal and the
    // shutdown.
    shutdown.cancel();
    tracing::info!(signal = signal.name, "shutdown requested");
}
