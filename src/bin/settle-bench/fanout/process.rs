//! The bench's end of a fan-out worker process: spawning it, and its JSON lines over
//! stdin and stdout.

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::worker::{WorkerCommand, WorkerMessage};
use super::FanoutArgs;
use crate::sys;

/// One worker process and its pipes.
pub(super) struct WorkerProcess {
    child: Child,
    pub(super) pid: u32,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl WorkerProcess {
    pub(super) fn spawn(
        exe: &std::path::Path,
        target: SocketAddr,
        count: usize,
        source_ip: IpAddr,
        args: &FanoutArgs,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(exe);
        sys::stop_with_bench(&mut command);
        let mut child = command
            .arg("fanout-worker")
            .args(["--target", &target.to_string()])
            .args(["--count", &count.to_string()])
            .args(["--source-ip", &source_ip.to_string()])
            .args([
                "--connect-concurrency",
                &args.connect_concurrency.to_string(),
            ])
            .args(["--connect-seconds", &args.connect_seconds.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting a fan-out worker ({})", exe.display()))?;
        let pid = child.id().context("the worker exited at once")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
        Ok(Self {
            child,
            pid,
            stdin,
            stdout,
        })
    }

    pub(super) async fn send(&mut self, command: &WorkerCommand) -> anyhow::Result<()> {
        let line = serde_json::to_string(command).context("encoding a worker command")?;
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .context("writing to a worker")?;
        self.stdin.flush().await.context("writing to a worker")
    }

    pub(super) async fn receive(&mut self, timeout: Duration) -> anyhow::Result<WorkerMessage> {
        let line = tokio::time::timeout(timeout, self.stdout.next_line())
            .await
            .with_context(|| format!("worker {} silent for {timeout:?}", self.pid))?
            .context("reading from a worker")?
            .with_context(|| format!("worker {} exited", self.pid))?;
        serde_json::from_str(&line).with_context(|| format!("parsing the worker line {line:?}"))
    }

    /// Asks the worker to exit, and kills it if it does not.
    pub(super) async fn stop(mut self) {
        let _ = self.send(&WorkerCommand::Exit).await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
