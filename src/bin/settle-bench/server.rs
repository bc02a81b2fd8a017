//! The server under test: a `settle` process the bench starts on a loopback port with
//! a fresh data directory (and stops again), or one already running (`--target`).

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use crate::client;
use crate::sys;

/// How long a started server may take to log its address.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped server may take to drain before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Server log lines kept to explain a failure.
const LOG_TAIL_LINES: usize = 40;

/// What the bench knows about the server it measures.
#[derive(Clone, Debug, Serialize)]
pub struct ServerInfo {
    pub addr: SocketAddr,
    /// `None` for a `--target` without `--server-pid`: no memory or CPU figures then.
    pub pid: Option<u32>,
    pub started_by_bench: bool,
    pub binary: Option<String>,
    pub version: Option<String>,
    /// The server's own `Max open files` (soft, hard), from /proc/PID/limits; as in
    /// the machine's, "unlimited" is RLIM_INFINITY (2^64 - 1).
    pub nofile_soft: Option<u64>,
    pub nofile_hard: Option<u64>,
    /// The consumer's live settings, from `GET /api/faults`.
    pub delay_ms: u64,
    pub jitter_ms: u64,
    /// The data directory of a server the bench started.
    pub data_dir: Option<String>,
}

/// `GET /api/faults`.
#[derive(Debug, Deserialize)]
struct FaultSettings {
    delay_ms: u64,
    jitter_ms: u64,
    failure_rate: f64,
    drop_rate: f64,
    #[serde(default)]
    transient_rate: f64,
}

/// A server under test. A started one is stopped by [`Server::stop`], or killed when
/// dropped (a phase that failed, or the bench interrupted: see `main`), so the bench
/// leaves neither the process nor its data directory. The drop blocks (up to 2 s, for
/// the process to die): drop a `Server` where the bench's main task runs it, not in a
/// spawned task.
pub struct Server {
    pub info: ServerInfo,
    started: Option<Started>,
    /// A `--target` server's process, if one was found.
    process: Option<ServerProcess>,
    log: Log,
}

/// Where a started server that is dropped having exited by itself says so: the phase
/// that held it failed, and the error it failed with (a connection closed) would not
/// tell why. `main` takes it into that phase's error.
pub type DeathNote = Arc<Mutex<Option<Death>>>;

/// How a started server ended by itself: its exit status and its last log lines.
#[derive(Debug)]
pub struct Death {
    pub status: std::process::ExitStatus,
    pub last_lines: String,
}

/// How long a dropped server that is on its way out is given to end: a phase sees its
/// connections close as the dying process closes its files, which for 20000 sockets
/// takes a quarter of a second or more before the process can be waited for.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long the server's output is read on once it has exited, for its last lines (a
/// panic's message may still be in the pipe).
const LAST_LINES_WAIT: Duration = Duration::from_millis(500);

/// A started server's process and fresh data directory.
struct Started {
    /// `None` once the process has been waited for.
    child: Option<Child>,
    pid: u32,
    _data_dir: tempfile::TempDir,
    log: Log,
    death_note: DeathNote,
    /// Set once the bench asked it to stop: an exit after that is not a death.
    stopping: bool,
}

/// The last lines of the server's output, and how many of its two streams were read to
/// their end.
#[derive(Clone, Default)]
struct Log {
    tail: Arc<Mutex<VecDeque<String>>>,
    streams_ended: Arc<std::sync::atomic::AtomicUsize>,
}

impl Log {
    /// The last lines so far.
    fn tail_text(&self) -> String {
        self.tail
            .lock()
            .map(|tail| tail.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    fn streams_ended(&self) -> bool {
        self.streams_ended
            .load(std::sync::atomic::Ordering::Acquire)
            == 2
    }

    /// The last lines of a server that has exited, once both streams have ended or
    /// [`LAST_LINES_WAIT`] has passed (blocking: the draining tasks run on the runtime's
    /// worker threads).
    fn last_lines(&self) -> String {
        let deadline = std::time::Instant::now() + LAST_LINES_WAIT;
        while !self.streams_ended() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.tail_text()
    }

    /// [`Log::last_lines`], waiting without blocking.
    async fn last_lines_async(&self) -> String {
        let deadline = tokio::time::Instant::now() + LAST_LINES_WAIT;
        while !self.streams_ended() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.tail_text()
    }
}

impl Drop for Started {
    /// Kills the process unless it was waited for, and waits (briefly, blocking) for it
    /// to die, so that the data directory, removed next, is no longer being written.
    /// One that had exited by itself (or was on its way out) is written in the death
    /// note.
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let mut exited = child.try_wait().ok().flatten();
        if exited.is_none() && !self.stopping && sys::is_exiting(self.pid) {
            let deadline = std::time::Instant::now() + EXIT_GRACE;
            while exited.is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                exited = child.try_wait().ok().flatten();
            }
        }
        if let Some(status) = exited.filter(|_| !self.stopping) {
            let last_lines = self.log.last_lines();
            if let Ok(mut slot) = self.death_note.lock() {
                *slot = Some(Death { status, last_lines });
            }
            return;
        }
        if child.start_kill().is_err() {
            return; // Exited already.
        }
        for _ in 0..200 {
            if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "settle-bench: the server it started (pid {}) did not die within 2 s of SIGKILL",
            self.pid
        );
    }
}

/// Where the bench finds `settle`: beside its own executable (both are in
/// target/release after `cargo build --release --bins`).
///
/// Started by `cargo run` (which sets `CARGO`), the bench first has cargo build `settle`
/// in the bench's own profile: `cargo run --bin settle-bench` builds the bench alone,
/// and would otherwise leave a fresh clone without a server, or measure a stale one.
///
/// # Errors
/// When the bench's own path is unknown, building fails, or no `settle` is there.
pub fn default_server_binary() -> anyhow::Result<PathBuf> {
    let bench = std::env::current_exe().context("locating the settle-bench executable")?;
    let dir = bench
        .parent()
        .context("the settle-bench executable has no directory")?;
    if let Some(cargo) = std::env::var_os("CARGO") {
        build_server(&cargo, dir)?;
    }
    let candidate = dir.join(format!("settle{}", std::env::consts::EXE_SUFFIX));
    if !candidate.is_file() {
        bail!(
            "no server binary at {} (build it with `cargo build --release --bins`, or pass --server-bin)",
            candidate.display()
        );
    }
    Ok(candidate)
}

/// `cargo build --bin settle` in the profile whose output directory is `dir`
/// (`target/debug` is the `dev` profile; any other directory is named after its
/// profile). Cargo's progress goes to stderr, so that stdout stays the bench's.
fn build_server(cargo: &OsStr, dir: &Path) -> anyhow::Result<()> {
    let profile = match dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") | None => "dev",
        Some(name) => name,
    };
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    eprintln!("settle-bench: cargo build --profile {profile} --bin settle (the server under test)");
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--profile",
            profile,
            "--bin",
            "settle",
            "--manifest-path",
            manifest,
        ])
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .context("running cargo to build the server")?;
    if !status.success() {
        bail!("building the server failed (cargo {status})");
    }
    Ok(())
}

/// The path of the binary process `pid` runs (`... (deleted)` if it was replaced).
fn running_binary(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Whether `binary` (as /proc shows it) is a `settle`.
fn is_settle(binary: &Path) -> bool {
    binary
        .file_name()
        .is_some_and(|name| name == "settle" || name == "settle (deleted)")
}

/// The process measured as a `--target` server: its binary as /proc shows it, and
/// (for a `settle`) the version it answers, asked once.
#[derive(Clone, Debug)]
pub struct ServerProcess {
    pid: u32,
    binary: Option<PathBuf>,
    version: Option<String>,
}

impl ServerProcess {
    /// Process `pid`, its binary and, if that is a `settle`, its version: the running
    /// build's (its file may have been replaced since). Nothing else is run.
    fn read(pid: u32) -> Self {
        let binary = running_binary(pid);
        let version = binary
            .as_deref()
            .filter(|binary| is_settle(binary))
            .and_then(|_| sys::command_line_output(&format!("/proc/{pid}/exe"), &["--version"]));
        Self {
            pid,
            binary,
            version,
        }
    }

    /// This process again, if it still runs a `settle` and holds the socket listening
    /// on `addr`: its binary as /proc shows it now (a file rebuilt since shows as
    /// deleted), its version as asked before (the same process runs the same build).
    /// Blocking: it reads the process's open files.
    fn still_serving(self, addr: SocketAddr) -> Option<Self> {
        let binary = running_binary(self.pid).filter(|binary| is_settle(binary))?;
        sys::holds_listener(self.pid, addr)
            .unwrap_or(false)
            .then_some(Self {
                binary: Some(binary),
                ..self
            })
    }
}

/// The process of the server at `addr`: `pid` if given, else the process listening
/// there if it runs a `settle`; `None` (said on stderr) when there is none to measure.
/// Blocking: it may read every process's open files in /proc.
fn server_process(addr: SocketAddr, pid: Option<u32>) -> anyhow::Result<Option<ServerProcess>> {
    if let Some(pid) = pid {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("--server-pid {pid}: no such process");
        }
        let process = ServerProcess::read(pid);
        match &process.binary {
            None => eprintln!("settle-bench: warning: cannot read which binary --server-pid {pid} runs; its memory and CPU are reported as the server's"),
            Some(binary) if !is_settle(binary) => eprintln!("settle-bench: warning: --server-pid {pid} runs {}, not a settle; its memory and CPU are reported as the server's", binary.display()),
            Some(_) => {}
        }
        return Ok(Some(process));
    }
    match sys::listening_pid(addr) {
        Ok(pid) => {
            let process = ServerProcess::read(pid);
            if process.binary.as_deref().is_some_and(is_settle) {
                eprintln!("settle-bench: measuring the memory and CPU of process {pid}, the settle listening on {addr} (--server-pid names another)");
                Ok(Some(process))
            } else {
                eprintln!("settle-bench: process {pid} listens on {addr} but does not run a settle: the server's memory and CPU go unreported (--server-pid names the server's process)");
                Ok(None)
            }
        }
        Err(err) => {
            eprintln!("settle-bench: the server's memory and CPU go unreported: {err:#} (--server-pid names the server's process)");
            Ok(None)
        }
    }
}

/// Parses a `--target` URL. Only `http://` with a loopback IP literal, or `localhost`
/// for 127.0.0.1 (where the server listens by default; no name is looked up): the
/// bench never sends load off this machine.
///
/// # Errors
/// For anything else.
pub fn parse_target(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--target must start with http://, got {url:?}"))?;
    let authority = rest.trim_end_matches('/');
    let authority = match authority.rsplit_once(':') {
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => {
            format!("127.0.0.1:{port}")
        }
        _ => authority.to_owned(),
    };
    let addr: SocketAddr = authority.parse().with_context(|| {
        format!("--target must be http://IP:PORT with a loopback IP (or localhost), got {url:?}")
    })?;
    if !addr.ip().is_loopback() {
        bail!("--target must be a loopback address (the bench binds loopback only), got {addr}");
    }
    Ok(addr)
}

impl Server {
    /// Starts `binary --addr 127.0.0.1:0 --data-dir <fresh temp dir> --delay-ms D` and
    /// waits for its `listening on http://ADDR` line. The temp dir is made in
    /// `data_parent`, else in the system's temporary directory.
    ///
    /// # Errors
    /// When it cannot start, exits, or does not log its address in time. Should it exit
    /// by itself later, dropping it writes why in `death_note`.
    pub async fn start(
        binary: &Path,
        delay_ms: u64,
        data_parent: Option<&Path>,
        death_note: DeathNote,
    ) -> anyhow::Result<Self> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("settle-bench-");
        let data_dir = match data_parent {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .context("creating a temporary data directory")?;
        let mut command = Command::new(binary);
        sys::stop_with_bench(&mut command);
        // The parameters the report prints are the server's: none from `SETTLE_*`.
        for name in settle::config::Config::env_names() {
            command.env_remove(name);
        }
        let mut child = command
            .arg("--addr")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir.path())
            .arg("--delay-ms")
            .arg(delay_ms.to_string())
            // Info level logs the address and little else: no log line per request.
            .env("RUST_LOG", "settle=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id().context("the server exited at once")?;
        let log = Log::default();
        let stdout = child.stdout.take().context("server stdout")?;
        let stderr = child.stderr.take().context("server stderr")?;
        tokio::spawn(drain(stderr, log.clone(), None));
        let (addr_sender, addr_receiver) = tokio::sync::oneshot::channel();
        tokio::spawn(drain(stdout, log.clone(), Some(addr_sender)));
        let data_dir_path = data_dir.path().display().to_string();
        // From here on a failure, or an interrupt, kills it and removes its directory.
        let mut started = Started {
            child: Some(child),
            pid,
            _data_dir: data_dir,
            log: log.clone(),
            death_note,
            stopping: false,
        };
        let addr = match tokio::time::timeout(START_TIMEOUT, addr_receiver).await {
            Ok(Ok(addr)) => addr,
            Ok(Err(_)) => {
                // Its output ended without the line: it is on its way out (a flag refused,
                // the data directory held by another process). Waited for here, so its
                // drop has no death to tell of a second time.
                let exited = match started.child.as_mut() {
                    Some(child) => tokio::time::timeout(EXIT_GRACE, child.wait())
                        .await
                        .ok()
                        .and_then(Result::ok),
                    None => None,
                };
                let status = match exited {
                    Some(status) => {
                        started.child = None;
                        status.to_string()
                    }
                    None => "its output closed, the process still running".to_owned(),
                };
                bail!(
                    "the server exited before it was listening ({status}); its last lines:\n{}",
                    log.last_lines_async().await
                );
            }
            Err(_) => bail!(
                "the server did not log `listening on http://ADDR` within {START_TIMEOUT:?}; its last lines:\n{}",
                log.tail_text()
            ),
        };
        let version = sys::command_line_output(&binary.to_string_lossy(), &["--version"]);
        let mut server = Self {
            info: ServerInfo {
                addr,
                pid: Some(pid),
                started_by_bench: true,
                binary: Some(binary.display().to_string()),
                version,
                nofile_soft: None,
                nofile_hard: None,
                delay_ms,
                jitter_ms: 0,
                data_dir: Some(data_dir_path),
            },
            started: Some(started),
            process: None,
            log,
        };
        server.describe().await?;
        server.read_limits();
        Ok(server)
    }

    /// A server that is already running; the bench neither starts nor stops it. Without
    /// `pid`, the process listening on `addr` is looked up in /proc and taken if it runs
    /// a `settle` binary (a proxy or a tunnel may hold the port instead); otherwise the
    /// server's memory and CPU go unreported. A `pid` that does not run a `settle` is
    /// warned about (a supervisor's may be meant).
    ///
    /// `found` is what an earlier phase's lookup found ([`Server::process`]): taken
    /// again while that process still runs a `settle` and holds the listening socket,
    /// so that a run of several phases looks through /proc and reports it once; a
    /// server restarted on the port (or its PID reused) is looked up again.
    ///
    /// # Errors
    /// When nothing answers at `addr`, it does not answer `GET /api/faults`, or `pid`
    /// names no process.
    pub async fn attach(
        addr: SocketAddr,
        pid: Option<u32>,
        found: Option<ServerProcess>,
    ) -> anyhow::Result<Self> {
        let mut server = Self {
            info: ServerInfo {
                addr,
                pid: None,
                started_by_bench: false,
                binary: None,
                version: None,
                nofile_soft: None,
                nofile_hard: None,
                delay_ms: 0,
                jitter_ms: 0,
                data_dir: None,
            },
            started: None,
            process: None,
            log: Log::default(),
        };
        // Whether it answers, first: the process is looked for only then.
        server.describe().await?;
        let process = tokio::task::spawn_blocking(move || {
            let again = found
                .filter(|found| pid.is_none_or(|pid| pid == found.pid))
                .and_then(|found| found.still_serving(addr));
            match again {
                Some(again) => Ok(Some(again)),
                None => server_process(addr, pid),
            }
        })
        .await
        .context("looking for the server's process")??;
        if let Some(process) = &process {
            server.info.pid = Some(process.pid);
            server.info.version.clone_from(&process.version);
            server.info.binary = process
                .binary
                .as_ref()
                .map(|binary| binary.display().to_string());
        }
        server.process = process;
        server.read_limits();
        Ok(server)
    }

    /// The process measured as this `--target` server, for the next phase's
    /// [`Server::attach`]; `None` if there was none (it is looked for again then).
    pub fn process(&self) -> Option<ServerProcess> {
        self.process.clone()
    }

    /// Reads the consumer settings, and checks the fault knobs are off: injected
    /// failures or drops would make the figures meaningless.
    async fn describe(&mut self) -> anyhow::Result<()> {
        let mut conn = client::connect(self.info.addr).await?;
        let (status, body) = conn.get("/api/faults").await?;
        if !status.is_success() {
            bail!("GET /api/faults answered {status}");
        }
        let faults: FaultSettings =
            serde_json::from_slice(&body).context("parsing GET /api/faults")?;
        if faults.failure_rate > 0.0 || faults.drop_rate > 0.0 || faults.transient_rate > 0.0 {
            bail!(
                "the server injects faults (failure_rate {}, drop_rate {}, transient_rate {}): set them to 0 first",
                faults.failure_rate,
                faults.drop_rate,
                faults.transient_rate
            );
        }
        self.info.delay_ms = faults.delay_ms;
        self.info.jitter_ms = faults.jitter_ms;
        Ok(())
    }

    /// Reads the server's open-file limits, when its PID is known.
    fn read_limits(&mut self) {
        if let Some((soft, hard)) = self.info.pid.and_then(sys::nofile_limits) {
            self.info.nofile_soft = Some(soft);
            self.info.nofile_hard = Some(hard);
        }
    }

    /// The server's resident memory in KiB, when its PID is known.
    pub fn rss_kib(&self) -> Option<u64> {
        self.info.pid.and_then(|pid| sys::rss_kib(Some(pid)).ok())
    }

    /// The last lines the server logged (empty for a `--target`).
    pub fn log_tail(&self) -> String {
        self.log.tail_text()
    }

    /// Stops a started server with SIGTERM (graceful shutdown), killing it if it does
    /// not exit in time. Does nothing to a `--target`.
    ///
    /// # Errors
    /// When the server had already exited with a failure, or could not be stopped.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        // On every early return the `Started` still holds the child: its drop kills it.
        let Some(started) = self.started.as_mut() else {
            return Ok(());
        };
        let child = started
            .child
            .as_mut()
            .context("the server was stopped before")?;
        if let Ok(Some(status)) = child.try_wait() {
            started.child = None;
            bail!(
                "the server exited during the run ({status}); its last lines:\n{}",
                self.log.last_lines_async().await
            );
        }
        started.stopping = true;
        sys::terminate(started.pid).context("stopping the server")?;
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Err(_) => bail!("the server did not stop within {STOP_TIMEOUT:?} of SIGTERM (killed)"),
            Ok(Err(err)) => Err(err).context("waiting for the server (killed)"),
            Ok(Ok(status)) => {
                started.child = None;
                if !status.success() {
                    bail!(
                        "the server exited with {status} on SIGTERM; its last lines:\n{}",
                        self.log.last_lines_async().await
                    );
                }
                Ok(())
            }
        }
    }
}

/// Reads a server output stream to its end, keeping the last lines, and reports the
/// bound address from the `listening on http://ADDR` line. Draining matters: a full
/// pipe would block the server's logging.
async fn drain(
    stream: impl AsyncRead + Unpin,
    log: Log,
    mut addr_sender: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(sender) = addr_sender.take_if(|_| line.contains("listening on http://")) {
            let addr = line
                .rsplit("listening on http://")
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|text| text.parse().ok());
            match addr {
                Some(addr) => {
                    let _ = sender.send(addr);
                }
                None => addr_sender = Some(sender),
            }
        }
        if let Ok(mut tail) = log.tail.lock() {
            if tail.len() == LOG_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    log.streams_ended
        .fetch_add(1, std::sync::atomic::Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_must_be_loopback_http() {
        assert!(parse_target("http://127.0.0.1:3000").is_ok());
        assert!(parse_target("http://127.0.0.1:3000/").is_ok());
        assert!(parse_target("http://[::1]:3000").is_ok());
        assert!(parse_target("http://10.0.0.1:3000").is_err());
        assert!(parse_target("https://127.0.0.1:3000").is_err());
        assert_eq!(
            parse_target("http://localhost:3000/").expect("localhost"),
            SocketAddr::from(([127, 0, 0, 1], 3000))
        );
        assert!(
            parse_target("http://localhost").is_err(),
            "a port is needed"
        );
        assert!(parse_target("http://example.com:3000").is_err());
    }
}
