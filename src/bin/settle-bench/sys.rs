//! What the bench reads from the operating system: the file-descriptor limit, process
//! memory and CPU time from /proc, the machine's description, wall-clock nanoseconds.
//!
//! Linux only, like the targets it checks: every reader says what it could not read
//! instead of guessing.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::stats::Summary;

/// Raises this process's soft RLIMIT_NOFILE to its hard limit and returns both.
///
/// # Errors
/// When the limits cannot be read or set.
pub fn raise_nofile_limit() -> anyhow::Result<(u64, u64)> {
    // The server raises its own limit the same way (`settle::net`).
    rlimit::increase_nofile_limit(u64::MAX).context("raising RLIMIT_NOFILE")?;
    rlimit::getrlimit(rlimit::Resource::NOFILE).context("reading RLIMIT_NOFILE")
}

/// This process's soft RLIMIT_NOFILE now, which the processes it starts inherit; `None`
/// when it cannot be read.
pub fn nofile_soft() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Nanoseconds since the Unix epoch on the wall clock. Used where two processes (the
/// server's `settled_at`, the fan-out workers' arrivals) must share one time line; they
/// run on one machine, so they read one clock.
pub fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
}

fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// Resident set size (`VmRSS`) of a process (`None`: this one), in KiB.
///
/// # Errors
/// When /proc/PID/status cannot be read or has no VmRSS line.
pub fn rss_kib(pid: Option<u32>) -> anyhow::Result<u64> {
    let path = proc_path(pid, "status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// User plus system CPU time of a process (`None`: this one), in clock ticks.
///
/// # Errors
/// When /proc/PID/stat cannot be read or parsed.
pub fn cpu_ticks(pid: Option<u32>) -> anyhow::Result<u64> {
    let path = proc_path(pid, "stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may contain spaces: fields are counted after its ')'.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("malformed {path}"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let field = |index: usize| -> anyhow::Result<u64> {
        fields
            .get(index)
            .and_then(|text| text.parse().ok())
            .with_context(|| format!("malformed {path}"))
    };
    Ok(field(11)? + field(12)?)
}

/// Whether process `pid` is on its way out (the kernel's `PF_EXITING`, set before it
/// closes its files): its sockets may be seen closed before it can be waited for.
pub fn is_exiting(pid: u32) -> bool {
    /// `PF_EXITING` in include/linux/sched.h.
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // After the name: state is field 3, so flags (9) are at 6.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_EXITING != 0)
}

/// CPU time of the whole machine (all cores), in ticks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SystemTicks {
    /// Run on this machine's CPUs (idle, iowait and steal excluded).
    pub busy: u64,
    /// Stolen: a virtual CPU wanted to run while the host ran something else.
    pub steal: u64,
}

/// The machine's CPU time so far, from the `cpu` line of /proc/stat.
///
/// # Errors
/// When /proc/stat cannot be read or parsed.
pub fn system_ticks() -> anyhow::Result<SystemTicks> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|line| line.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    parse_cpu_line(line).context("malformed cpu line in /proc/stat")
}

impl SystemTicks {
    /// The ticks from `before` to `self`.
    pub fn since(self, before: Self) -> Self {
        Self {
            busy: self.busy.saturating_sub(before.busy),
            steal: self.steal.saturating_sub(before.steal),
        }
    }
}

/// `None` unless the line has the eight columns up to steal, all numbers.
fn parse_cpu_line(line: &str) -> Option<SystemTicks> {
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|value| value.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal; guest and guest_nice, if there,
    // are already inside user and nice.
    let [user, nice, system, _idle, _iowait, irq, softirq, steal, ..] = values[..] else {
        return None;
    };
    Some(SystemTicks {
        busy: user + nice + system + irq + softirq,
        steal,
    })
}

/// Clock ticks per second, the unit of [`cpu_ticks`] and [`system_ticks`].
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg shows them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Kernel slab memory machine-wide (`Slab:` in /proc/meminfo), in KiB. A TCP
/// connection's kernel structures (socket, inode, file, epoll item, at both ends)
/// live there, outside any process's RSS; their buffers are empty while idle.
pub fn kernel_slab_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("Slab:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The process whose TCP socket listens on `addr` (or on its port at the unspecified
/// address), found as the socket's inode among every process's open files.
///
/// # Errors
/// When /proc cannot be read, nothing listens there, or more than one process holds
/// the socket (a fork): which one serves is not known then.
pub fn listening_pid(addr: SocketAddr) -> anyhow::Result<u32> {
    let inodes = listening_inodes(addr)?;
    let mut holders = Vec::new();
    for process in procfs::process::all_processes().context("listing /proc")? {
        // Processes that end meanwhile, or whose files this user may not read.
        let Ok(process) = process else { continue };
        if holds_any(&process, &inodes) {
            holders.push(process.pid);
        }
    }
    match holders[..] {
        [pid] => u32::try_from(pid).context("a negative pid"),
        [] => bail!("no process readable here holds the socket listening on {addr}"),
        _ => bail!("processes {holders:?} each hold a socket listening on {addr}"),
    }
}

/// Whether process `pid` holds a socket listening on `addr` (false when it is gone,
/// a zombie, or its files cannot be read): [`listening_pid`] for one known process.
///
/// # Errors
/// When /proc/net cannot be read, or nothing listens there.
pub fn holds_listener(pid: u32, addr: SocketAddr) -> anyhow::Result<bool> {
    let inodes = listening_inodes(addr)?;
    let pid = i32::try_from(pid).context("a pid beyond i32")?;
    Ok(procfs::process::Process::new(pid).is_ok_and(|process| holds_any(&process, &inodes)))
}

fn holds_any(process: &procfs::process::Process, inodes: &[u64]) -> bool {
    use procfs::process::FDTarget;
    process.fd().is_ok_and(|files| {
        files
            .flatten()
            .any(|file| matches!(file.target, FDTarget::Socket(inode) if inodes.contains(&inode)))
    })
}

/// The inodes of the TCP sockets listening on `addr` (or on its port at the
/// unspecified address).
fn listening_inodes(addr: SocketAddr) -> anyhow::Result<Vec<u64>> {
    use procfs::net::TcpState;

    // An IPv4 address is also served by a dual-stack socket on [::] (or on its mapped
    // IPv6 form), which only /proc/net/tcp6 shows.
    let mut sockets = procfs::net::tcp6().context("reading /proc/net/tcp6")?;
    if addr.is_ipv4() {
        sockets.extend(procfs::net::tcp().context("reading /proc/net/tcp")?);
    }
    let serves = |local: SocketAddr| {
        let ip = match local.ip() {
            IpAddr::V6(v6) if addr.is_ipv4() => v6.to_ipv4_mapped().map_or(local.ip(), IpAddr::V4),
            ip => ip,
        };
        local.port() == addr.port() && (ip == addr.ip() || local.ip().is_unspecified())
    };
    let inodes: Vec<u64> = sockets
        .into_iter()
        .filter(|socket| socket.state == TcpState::Listen && serves(socket.local_address))
        .map(|socket| socket.inode)
        .collect();
    if inodes.is_empty() {
        bail!("no socket listens on {addr}");
    }
    Ok(inodes)
}

/// The soft and hard "Max open files" of a process, from /proc/PID/limits, as
/// `getrlimit` gives them: "unlimited" is [`rlimit::INFINITY`].
pub fn nofile_limits(pid: u32) -> Option<(u64, u64)> {
    nofile_in(&std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?)
}

/// The "Max open files" limits in the text of a /proc/PID/limits.
fn nofile_in(limits: &str) -> Option<(u64, u64)> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    let mut values = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .map(|value| match value {
            "unlimited" => Some(rlimit::INFINITY),
            value => value.parse().ok(),
        });
    Some((values.next()??, values.next()??))
}

/// An open-file limit for the table: "unlimited", a number, or "?" when unknown.
pub fn show_limit(limit: Option<u64>) -> String {
    match limit {
        Some(rlimit::INFINITY) => "unlimited".to_owned(),
        Some(limit) => limit.to_string(),
        None => "?".to_owned(),
    }
}

/// The machine a result was measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_mib: Option<u64>,
    /// This process's open-file limits after raising the soft one.
    pub nofile_soft: Option<u64>,
    pub nofile_hard: Option<u64>,
    /// The kernel's default TCP congestion control, which every loopback connection
    /// of the bench and the server uses.
    pub tcp_congestion_control: Option<String>,
    /// The kernel's CPU vulnerability entries other than "Not affected", each with its
    /// state (a mitigation in force, or "Vulnerable"); `None` when they cannot be read.
    pub cpu_vulnerabilities: Option<Vec<String>>,
    /// How long a thread takes to wake another and be woken back, before any phase.
    pub wake_round_trip: WakeRoundTrip,
}

/// Median round trips of a message between two threads, each asleep until the other's
/// message arrives, in µs: with the threads pinned to two CPUs, and to the same one. In
/// a VM the first is mostly the price of waking an idle virtual CPU, which a hand-off
/// between the server's threads pays when the other CPU has nothing to do; the second is
/// a context switch. `None` where there are not enough CPUs or the probe failed.
#[derive(Clone, Debug, Serialize)]
pub struct WakeRoundTrip {
    pub across_cpus_us: Option<f64>,
    pub same_cpu_us: Option<f64>,
}

impl Machine {
    pub fn describe(nofile: Option<(u64, u64)>) -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("model name"))
                    .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|text| format!("Linux {}", text.trim()))
            .unwrap_or_else(|_| std::env::consts::OS.to_owned());
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("MemTotal:"))
                    .and_then(|rest| {
                        rest.trim()
                            .trim_end_matches("kB")
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
                    .map(|kib| kib / 1024)
            });
        Self {
            cores: std::thread::available_parallelism().map_or(1, |cores| cores.get()),
            cpu_model,
            kernel,
            memory_mib,
            nofile_soft: nofile.map(|(soft, _)| soft),
            nofile_hard: nofile.map(|(_, hard)| hard),
            tcp_congestion_control: std::fs::read_to_string(
                "/proc/sys/net/ipv4/tcp_congestion_control",
            )
            .ok()
            .map(|text| text.trim().to_owned()),
            cpu_vulnerabilities: cpu_vulnerabilities(Path::new(VULNERABILITIES_DIR)),
            wake_round_trip: WakeRoundTrip::measure(),
        }
    }
}

const VULNERABILITIES_DIR: &str = "/sys/devices/system/cpu/vulnerabilities";
/// Round trips per wake-up probe: about 0.1 s on a VM that takes 80 µs each.
const WAKE_ROUND_TRIPS: usize = 1000;

/// `name: state` for every entry of `dir` (the kernel's vulnerabilities directory)
/// that is not "Not affected", sorted by name; `None` when `dir` cannot be read.
fn cpu_vulnerabilities(dir: &Path) -> Option<Vec<String>> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let state = std::fs::read_to_string(entry.path()).ok()?;
            let state = state.trim();
            (state != "Not affected")
                .then(|| format!("{}: {state}", entry.file_name().to_string_lossy()))
        })
        .collect();
    found.sort();
    Some(found)
}

impl WakeRoundTrip {
    fn measure() -> Self {
        let cpus = allowed_cpus();
        let across_cpus_us = match cpus.as_slice() {
            [first, second, ..] => wake_round_trip_us(*first, *second, WAKE_ROUND_TRIPS),
            _ => None,
        };
        let same_cpu_us = cpus
            .first()
            .and_then(|&cpu| wake_round_trip_us(cpu, cpu, WAKE_ROUND_TRIPS));
        Self {
            across_cpus_us,
            same_cpu_us,
        }
    }
}

/// The CPUs this process may run on, in order; empty if they cannot be read.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, and sched_getaffinity writes at
    // most the size it is given.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let read = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if read != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's capacity.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Pins the calling thread to `cpu`, and checks that it runs there.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: as in `allowed_cpus`; CPU_SET is given a CPU below CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The kernel moves the thread before sched_setaffinity returns.
    // SAFETY: no arguments, no memory.
    let running_on = unsafe { libc::sched_getcpu() };
    if usize::try_from(running_on).ok() == Some(cpu) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "pinned to CPU {cpu}, running on {running_on}"
        )))
    }
}

/// The median time, in µs, of `round_trips` messages sent by a thread pinned to
/// `probe_cpu` to one pinned to `echo_cpu` and answered, each side blocking in between.
/// Two threads of their own, so this process's threads keep their affinity. `None`
/// unless every round trip was made.
fn wake_round_trip_us(probe_cpu: usize, echo_cpu: usize, round_trips: usize) -> Option<f64> {
    use std::sync::mpsc;
    use std::time::Instant;

    let (to_echo, echo_inbox) = mpsc::channel::<Instant>();
    let (to_probe, probe_inbox) = mpsc::channel::<Instant>();
    let echo = std::thread::Builder::new()
        .name("wake-echo".to_owned())
        .spawn(move || {
            if pin_to(echo_cpu).is_err() {
                return;
            }
            while let Ok(sent) = echo_inbox.recv() {
                if to_probe.send(sent).is_err() {
                    break;
                }
            }
        })
        .ok()?;
    let probe = std::thread::Builder::new()
        .name("wake-probe".to_owned())
        .spawn(move || {
            let mut times = Vec::with_capacity(round_trips);
            if pin_to(probe_cpu).is_err() {
                return times;
            }
            for _ in 0..round_trips {
                if to_echo.send(Instant::now()).is_err() {
                    break;
                }
                let Ok(sent) = probe_inbox.recv() else { break };
                times.push(sent.elapsed().as_secs_f64() * 1e6);
            }
            times
        })
        .ok()?;
    // The probe's end of the channel goes with it, which ends the echo.
    let mut times = probe.join().ok()?;
    let _ = echo.join();
    if times.len() != round_trips {
        return None;
    }
    Summary::of(&mut times).map(|summary| summary.p50)
}

/// Runs a command and returns its first output line, or `None` if it cannot run.
pub fn command_line_output(program: &str, args: &[&str]) -> Option<String> {
    let mut command = std::process::Command::new(program);
    command.args(args);
    let output = command.output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Some(text.lines().next().unwrap_or("").trim().to_owned())
}

/// Sends SIGTERM to a process.
///
/// # Errors
/// When the signal cannot be sent (the process is gone, or not ours).
pub fn terminate(pid: u32) -> anyhow::Result<()> {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        bail!("pid {pid} out of range");
    };
    // SAFETY: kill has no memory effects; the pid is one of our own children.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sending SIGTERM");
    }
    Ok(())
}

/// How many file descriptors a process has open (entries of /proc/PID/fd).
pub fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|entries| entries.count())
}

/// Has the kernel send `command`'s process SIGTERM when the bench dies, however it
/// dies: a SIGKILL gives the bench no chance to stop what it started itself (`main`
/// does on SIGINT and SIGTERM). A server stopped so drains and exits; only its fresh
/// data directory is left behind. Linux's `PR_SET_PDEATHSIG`, which is tied to the
/// thread that spawns, not the process: the bench spawns its server and workers from
/// its main thread (`main` polls the phases with `block_on`), never from a pool thread
/// that may exit before them.
pub fn stop_with_bench(command: &mut tokio::process::Command) {
    let bench = libc::pid_t::try_from(std::process::id()).unwrap_or(libc::pid_t::MAX);
    // SAFETY: the closure runs in the child between fork and exec, and makes only
    // async-signal-safe calls (prctl, getppid) and no allocation.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The bench died before the prctl took effect: no signal would come.
            if libc::getppid() != bench {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_file_limits_are_read_as_getrlimit_gives_them() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 unlimited            files     \n";
        assert_eq!(nofile_in(limits), Some((1024, rlimit::INFINITY)));
        assert_eq!(show_limit(Some(rlimit::INFINITY)), "unlimited");
        assert_eq!(show_limit(Some(1024)), "1024");
        assert_eq!(show_limit(None), "?");
        assert_eq!(
            nofile_in("Max open files            many   20000   files\n"),
            None
        );
        assert_eq!(
            nofile_in("Max cpu time  unlimited  unlimited  seconds\n"),
            None
        );
        let own = nofile_limits(std::process::id()).expect("this process's limits");
        assert_eq!(
            own,
            rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit")
        );
    }

    #[test]
    fn the_process_listening_on_an_address_is_found_by_its_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let addr = listener.local_addr().expect("its address");
        assert_eq!(
            listening_pid(addr).expect("found"),
            std::process::id(),
            "this test process listens there"
        );
        assert!(holds_listener(std::process::id(), addr).expect("it listens"));
        let parent = std::os::unix::process::parent_id();
        assert!(
            !holds_listener(parent, addr).expect("it listens"),
            "not the parent"
        );
        drop(listener);
        assert!(holds_listener(std::process::id(), addr).is_err());
        let err = listening_pid(addr).expect_err("nothing listens there now");
        assert!(err.to_string().contains("no socket listens"), "{err:#}");

        // IPv6 loopback, where the machine has it.
        if let Ok(listener) = std::net::TcpListener::bind("[::1]:0") {
            let addr = listener.local_addr().expect("its address");
            assert_eq!(listening_pid(addr).expect("found"), std::process::id());
        }
    }

    #[test]
    fn the_cpu_line_splits_into_busy_and_stolen_time() {
        // user nice system idle iowait irq softirq steal guest guest_nice: powers of
        // two, so any column counted wrongly shows.
        let ticks = parse_cpu_line("cpu  1 2 4 8 16 32 64 128 256 512");
        assert_eq!(
            ticks,
            Some(SystemTicks {
                busy: 1 + 2 + 4 + 32 + 64,
                steal: 128
            })
        );
        assert_eq!(
            parse_cpu_line("cpu  1 2 4 8 16 32 64"),
            None,
            "no steal column"
        );
        assert_eq!(parse_cpu_line("cpu  1 2 x 8 16 32 64 128"), None);
    }

    #[test]
    fn vulnerabilities_list_every_entry_but_the_unaffected_in_name_order() {
        let dir = tempfile::tempdir().expect("a temp dir");
        for (name, state) in [
            ("spectre_v2", "Mitigation: Retpolines\n"),
            ("meltdown", "Not affected\n"),
            (
                "spec_rstack_overflow",
                "Vulnerable: Safe RET, no microcode\n",
            ),
        ] {
            std::fs::write(dir.path().join(name), state).expect("an entry");
        }
        assert_eq!(
            cpu_vulnerabilities(dir.path()).expect("readable"),
            [
                "spec_rstack_overflow: Vulnerable: Safe RET, no microcode",
                "spectre_v2: Mitigation: Retpolines",
            ]
        );
        assert_eq!(cpu_vulnerabilities(&dir.path().join("missing")), None);
    }

    #[test]
    fn a_thread_is_pinned_only_to_a_cpu_it_may_run_on() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty(), "this process runs somewhere");
        // In threads of their own: the test harness's thread keeps its affinity.
        let pinned = |cpu| {
            std::thread::spawn(move || pin_to(cpu))
                .join()
                .expect("joined")
        };
        for &cpu in &cpus {
            assert!(pinned(cpu).is_ok(), "CPU {cpu} is allowed");
        }
        let outside = (0..)
            .find(|cpu| !cpus.contains(cpu))
            .expect("a CPU number not allowed");
        assert!(pinned(outside).is_err(), "CPU {outside} is not allowed");
        assert!(pinned(libc::CPU_SETSIZE as usize).is_err());
    }

    #[test]
    fn the_wake_up_probe_answers_only_when_every_round_trip_was_made() {
        let cpus = allowed_cpus();
        let (first, last) = (cpus[0], cpus[cpus.len() - 1]);
        for (probe, echo) in [(first, first), (first, last)] {
            let us = wake_round_trip_us(probe, echo, 20).expect("20 round trips");
            assert!(us > 0.0 && us.is_finite(), "{probe} -> {echo}: {us}");
        }
        let outside = (0..)
            .find(|cpu| !cpus.contains(cpu))
            .expect("a CPU number not allowed");
        assert_eq!(
            wake_round_trip_us(first, outside, 20),
            None,
            "an echo that cannot be pinned makes no round trip"
        );
        assert_eq!(wake_round_trip_us(outside, first, 20), None, "nor a probe");
    }
}
