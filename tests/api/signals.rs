//! The real binary stops on SIGTERM, also when its logs have nowhere to go: a
//! supervisor or a pipe (`settle | head`) that went away must not leave a server that
//! only SIGKILL stops.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::{http_client, logged_base_url};

/// Kills the child if the test ends before it exited (a failed assertion).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn sigterm_stops_the_server_after_its_stdout_and_stderr_readers_are_gone() {
    let data_dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_settle"))
        .args(["--addr", "127.0.0.1:0", "--delay-ms", "50", "--data-dir"])
        .arg(data_dir.path())
        .env("RUST_LOG", "settle=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the settle binary starts");
    let mut guard = KillOnDrop(child);
    let child = &mut guard.0;
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let base = logged_base_url(&mut lines);
    // Both readers gone: every log line from now on fails to be written.
    drop(lines);
    drop(child.stderr.take());

    // The server goes on serving, logging (at debug) as it does.
    let response = http_client()
        .post(format!("{base}/api/tasks"))
        .header("Idempotency-Key", "logged-to-nowhere")
        .json(&serde_json::json!({ "title": "logged to nowhere" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);

    let pid = libc::pid_t::try_from(child.id()).expect("a pid");
    // SAFETY: kill(2) with the pid of our own child, which is not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitable") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running 20 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "a clean shutdown: {status}");
}
