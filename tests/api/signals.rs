//! The real binary stops on SIGTERM, also when its logs have nowhere to go: a
//! supervisor or a pipe (`settle | head`) that went away must not leave a server that
//! only SIGKILL stops, nor one whose handlers fail as they log.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::helpers::{http_client, BinaryServer, Logs};

/// How long a server may take to drain and exit after SIGTERM: generous.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends SIGTERM and waits for the exit.
async fn terminate(server: &mut BinaryServer) -> ExitStatus {
    let pid = libc::pid_t::try_from(server.child.id()).expect("a pid");
    // SAFETY: kill(2) with the pid of our own child, which is not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        if let Some(status) = server.child.try_wait().expect("waitable") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "still running {EXIT_TIMEOUT:?} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigterm_stops_the_server_after_its_stdout_and_stderr_readers_are_gone() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut server = BinaryServer::start(data_dir.path(), 50, "info", Logs::Closed);
    let status = terminate(&mut server).await;
    assert!(status.success(), "a clean shutdown: {status}");
}

#[tokio::test]
async fn handlers_that_log_to_nowhere_go_on_answering() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut server = BinaryServer::start(data_dir.path(), 50, "debug", Logs::Closed);
    // An accept logs at debug, and so does its apply.
    for key in ["logged-to-nowhere-1", "logged-to-nowhere-2"] {
        let response = http_client()
            .post(format!("{}/api/tasks", server.base))
            .header("Idempotency-Key", key)
            .json(&serde_json::json!({ "title": key }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{key}");
    }
    let status = terminate(&mut server).await;
    assert!(status.success(), "a clean shutdown: {status}");
}
