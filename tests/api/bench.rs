//! settle-bench stops by itself (issue 4): when the server it measures dies under it,
//! and, killed with SIGKILL, it takes the server it started with it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{BinaryServer, Logs};

/// Longest a test waits for the bench or a process to end: generous, the assertion is
/// that it ends at all.
const ENDS_WITHIN: Duration = Duration::from_secs(60);

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_settle-bench"))
}

/// Polls `done` every 50 ms until it holds or [`ENDS_WITHIN`] has passed.
fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + ENDS_WITHIN;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A process's state letter from /proc (`Z` for a zombie), `None` once it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses, which may itself contain spaces.
    stat.rsplit_once(") ")?.1.chars().next()
}

/// The children of `parent` that run `name`, from /proc.
fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let (Some((head, tail)), true) = (stat.rsplit_once(") "), stat.contains('(')) else {
                return false;
            };
            let comm = head.split_once('(').map_or("", |(_, comm)| comm);
            let ppid = tail.split_whitespace().nth(1).and_then(|p| p.parse().ok());
            comm == name && ppid == Some(parent)
        })
        .collect()
}

#[test]
fn the_bench_ends_a_phase_whose_server_dies_under_it() {
    let data_dir = tempfile::tempdir().expect("a temp dir");
    let server = BinaryServer::start(data_dir.path(), 100, "info", Logs::Drained);
    let mut run = bench()
        .args(["overhead", "--target", &server.base])
        .args([
            "--duration",
            "5",
            "--rate",
            "100",
            "--tasks",
            "5",
            "--json",
            "-",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("settle-bench starts");
    // Into the paced part of the phase (its tasks are created first), then gone.
    std::thread::sleep(Duration::from_millis(1500));
    server.kill_9();

    let mut status = None;
    let ended = eventually(|| {
        status = run.try_wait().expect("the bench can be waited for");
        status.is_some()
    });
    if !ended {
        let _ = run.kill();
    }
    let output = run.wait_with_output().expect("the bench's output");
    assert!(
        ended,
        "the bench still ran {ENDS_WITHIN:?} after its server died"
    );
    // 1: the phase lost commands; 2, on a slow machine: the server died before the
    // phase could begin (while its tasks were created).
    let code = status.and_then(|status| status.code());
    assert!(matches!(code, Some(1 | 2)), "exit status {code:?}");
    let document: Value = serde_json::from_slice(&output.stdout).expect("the JSON document");
    assert_eq!(document["ok"], false);
    let lost = document["phases"][0]["problems"]
        .as_array()
        .is_some_and(|problems| !problems.is_empty())
        || document["errors"]
            .as_array()
            .is_some_and(|errors| !errors.is_empty());
    assert!(lost, "the report says what was lost: {document}");
}

#[test]
fn a_bench_killed_with_sigkill_takes_its_server_with_it() {
    let mut run = bench()
        .args(["accept", "--duration", "30", "--json", "-"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("settle-bench starts");
    let mut servers = Vec::new();
    assert!(
        eventually(|| {
            servers = children_named(run.id(), "settle");
            !servers.is_empty()
        }),
        "the bench started its server"
    );
    let server = servers[0];
    let data_dir = std::fs::read(format!("/proc/{server}/cmdline"))
        .ok()
        .and_then(|cmdline| {
            let args: Vec<String> = cmdline
                .split(|&byte| byte == 0)
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect();
            let at = args.iter().position(|arg| arg == "--data-dir")?;
            args.get(at + 1).cloned()
        });

    run.kill().expect("SIGKILL delivered");
    run.wait().expect("the bench is reaped");
    // Gone, or a zombie its new parent has not reaped yet: either way it has exited.
    let ended = eventually(|| process_state(server).is_none_or(|state| state == 'Z'));
    if !ended {
        // SAFETY: kill(2) on a pid this test read from /proc; no memory is involved.
        unsafe { libc::kill(i32::try_from(server).unwrap_or(0), libc::SIGKILL) };
    }
    // SIGKILL leaves the bench no chance to remove the server's data directory.
    if let Some(dir) = data_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    assert!(
        ended,
        "the server {server} outlived its bench by {ENDS_WITHIN:?}"
    );
}
