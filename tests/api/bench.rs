//! settle-bench stops by itself (issue 4): when the server it measures dies under it,
//! and, killed with SIGKILL, it takes the server it started with it. It refuses, by name,
//! a flag it cannot honour.

use std::process::{Child, Command, Stdio};
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

/// A process's state letter (`Z` for a zombie), `None` once it is gone.
fn process_state(pid: u32) -> Option<char> {
    let pid = i32::try_from(pid).ok()?;
    Some(procfs::process::Process::new(pid).ok()?.stat().ok()?.state)
}

/// The children of `parent` that run `name`.
fn children_named(parent: u32, name: &str) -> Vec<procfs::process::Process> {
    let Ok(processes) = procfs::process::all_processes() else {
        return Vec::new();
    };
    processes
        .filter_map(Result::ok)
        .filter(|process| {
            process.stat().is_ok_and(|stat| {
                stat.comm == name && u32::try_from(stat.ppid).is_ok_and(|ppid| ppid == parent)
            })
        })
        .collect()
}

/// The server's count of accepted commands (`GET /api/metrics`), over a plain socket:
/// these tests wait on processes, not on a runtime.
fn accepted(base: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(base.trim_start_matches("http://")).ok()?;
    stream
        .write_all(b"GET /api/metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (_, body) = answer.split_once("\r\n\r\n")?;
    serde_json::from_str::<Value>(body).ok()?["accepted"].as_u64()
}

/// The bench running `args` on a server it starts itself (the `settle` built with it).
fn bench_on_its_own_server(args: &[&str], stdout: Stdio) -> Child {
    bench()
        .args(args)
        .args(["--server-bin", env!("CARGO_BIN_EXE_settle")])
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .expect("settle-bench starts")
}

/// The server `run` started, once it runs (and, with `workers`, once the fan-out's
/// worker processes do too).
fn its_server(run: &Child, workers: bool) -> procfs::process::Process {
    let mut servers = Vec::new();
    assert!(
        eventually(|| {
            servers = children_named(run.id(), "settle");
            !servers.is_empty()
                && (!workers || !children_named(run.id(), "settle-bench").is_empty())
        }),
        "the bench started its server"
    );
    servers.remove(0)
}

/// Waits for a bench whose server was just killed to end by itself (killing it if it
/// does not within [`ENDS_WITHIN`], and failing), and gives its exit code and output.
fn ends_after_its_server(mut run: Child) -> (Option<i32>, std::process::Output) {
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
    (status.and_then(|status| status.code()), output)
}

#[test]
fn the_bench_ends_a_phase_whose_server_dies_under_it() {
    let data_dir = tempfile::tempdir().expect("a temp dir");
    let server = BinaryServer::start(data_dir.path(), 100, "info", Logs::Drained);
    let run = bench()
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
    // Into the paced part of the phase (past the creates of its 5 tasks), then gone.
    assert!(
        eventually(|| accepted(&server.base).is_some_and(|accepted| accepted > 20)),
        "the bench sends its likes"
    );
    server.kill_9();

    let (code, output) = ends_after_its_server(run);
    assert_eq!(code, Some(1), "a phase that lost commands exits 1");
    let document: Value = serde_json::from_slice(&output.stdout).expect("the JSON document");
    let problems = document["phases"][0]["problems"].to_string();
    assert!(
        problems.contains("not answered 202"),
        "the report says what was lost: {problems}"
    );
}

#[test]
fn a_phase_whose_own_server_dies_exits_1_and_says_why() {
    let run = bench_on_its_own_server(
        &["fanout", "--smoke", "--subscribers", "200", "--json", "-"],
        Stdio::piped(),
    );
    // Its server up and its subscribers' workers started: the phase is measuring.
    let server = its_server(&run, true).pid;
    // SAFETY: kill(2) on a pid this test read from /proc; no memory is involved.
    assert_eq!(
        unsafe { libc::kill(server, libc::SIGKILL) },
        0,
        "the server is killed"
    );

    let (code, output) = ends_after_its_server(run);
    // A run with problems, not one that could not run (2).
    assert_eq!(code, Some(1));
    let document: Value = serde_json::from_slice(&output.stdout).expect("the JSON document");
    let errors = document["errors"].to_string();
    assert!(
        errors.contains("the server exited during the run") && errors.contains("SIGKILL"),
        "the report says the server died, and how: {errors}"
    );
}

#[test]
fn a_bench_killed_with_sigkill_takes_its_server_with_it() {
    let mut run = bench_on_its_own_server(
        &["accept", "--duration", "30", "--json", "-"],
        Stdio::null(),
    );
    let started = its_server(&run, false);
    let server = u32::try_from(started.pid).expect("a pid");
    let data_dir = started.cmdline().ok().and_then(|args| {
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

/// A flag the phase does not use, or a negative count, is refused by name before any
/// server starts: exit 2, and the message says which flag and why.
#[test]
fn the_bench_refuses_flags_it_cannot_honour() {
    let cases: [(&[&str], &str); 3] = [
        (&["fanout", "--duration", "1"], "fanout is not timed"),
        (
            &["overhead", "--rate", "-5"],
            "invalid value '-5' for '--rate",
        ),
        (
            &["fanout", "--subscribers", "-3"],
            "invalid value '-3' for '--subscribers",
        ),
    ];
    for (args, says) in cases {
        let output = bench().args(args).output().expect("settle-bench runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// A server that refuses its start (here a `--delay-ms` the server takes but no server
/// accepts: the bench passes it on) is reported as such, its last lines once: not as a
/// server that was too slow to listen.
#[test]
fn a_server_that_exits_at_start_is_reported_once_as_such() {
    let output = bench()
        .args(["overhead", "--delay-ms", "70000", "--duration", "1"])
        .output()
        .expect("settle-bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the server exited before it was listening (exit status: 2)"),
        "{stderr}"
    );
    assert!(!stderr.contains("within 30s"), "{stderr}");
    assert_eq!(
        stderr.matches("--delay-ms").count(),
        1,
        "the server's refusal, once: {stderr}"
    );
}
