//! How many subscribers the fan-out asks for, and how many one worker takes: a count
//! or `--subscribers max`, checked against the files the server may still open, and
//! `--per-worker` within the file limit the workers inherit.

use anyhow::{bail, Context};

use crate::sys;

/// Files a fan-out worker keeps besides its subscribers' sockets: its pipes, its
/// runtime's, the standard streams, with room to spare.
const WORKER_OWN_FILES: u64 = 32;

/// The most `--subscribers max` asks for, whatever the server's limit: issue 4's aim
/// per node. Each costs the machine ~25 KiB (server, kernel, worker), so a limit of a
/// million (a container's) would otherwise ask for tens of GiB. A count goes beyond.
const MAX_SUBSCRIBERS_FOR_MAX: usize = 50_000;

/// `--subscribers`: a count, or as many as the server can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subscribers {
    Count(usize),
    Max,
}

impl std::str::FromStr for Subscribers {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "max" {
            return Ok(Self::Max);
        }
        match text.parse() {
            Ok(0) | Err(_) => Err(format!(
                "a number of subscribers (at least 1) or `max`, got {text:?}"
            )),
            Ok(count) => Ok(Self::Count(count)),
        }
    }
}

/// The server's PID and numeric soft open-file limit, which `--subscribers max` needs.
pub(super) fn server_fd_limit(server: &crate::server::Server) -> anyhow::Result<(u32, usize)> {
    let pid = server
        .info
        .pid
        .context("--subscribers max needs the server's PID (give --server-pid)")?;
    let soft = server
        .info
        .nofile_soft
        .context("--subscribers max needs the server's open-file limit")?;
    // Unlimited, or beyond this machine's word: the cap decides.
    Ok((pid, usize::try_from(soft).unwrap_or(usize::MAX)))
}

/// How many subscribers `--subscribers max` asks for: the files the server may still
/// open (its soft limit less what it has open), at most [`MAX_SUBSCRIBERS_FOR_MAX`].
pub(super) fn max_subscribers(limit: (u32, usize)) -> anyhow::Result<usize> {
    let (room, open, soft) = server_room(limit).context("--subscribers max")?;
    if room == 0 {
        bail!("--subscribers max: the server has {open} files open, at its limit of {soft}: no room for a subscriber");
    }
    if room > MAX_SUBSCRIBERS_FOR_MAX {
        eprintln!("settle-bench: the server could open {room} more files; --subscribers max stops at {MAX_SUBSCRIBERS_FOR_MAX} (give a count for more)");
    }
    Ok(room.min(MAX_SUBSCRIBERS_FOR_MAX))
}

/// `count`, or a refusal when the server has no files for that many, before any connects:
/// the ones past its limit would wait in its listen queue until `--connect-seconds`
/// ran out. Nothing to check without the server's PID.
pub(super) fn check_room(count: usize, limit: Option<(u32, usize)>) -> anyhow::Result<usize> {
    let Some((room, open, soft)) = limit.and_then(|limit| server_room(limit).ok()) else {
        return Ok(count);
    };
    if count > room {
        bail!("the server can open {room} more files (its limit {soft}, {open} open), too few for {count} subscribers: ask for at most {room}, or --subscribers max");
    }
    Ok(count)
}

/// The files the server may still open, those it has open, and its soft limit.
fn server_room((pid, soft): (u32, usize)) -> anyhow::Result<(usize, usize, usize)> {
    let open = sys::open_fds(pid).context("counting the server's open files")?;
    Ok((soft.saturating_sub(open), open, soft))
}

/// Subscribers one worker takes: `--per-worker`, within the file limit the workers
/// inherit from the bench (each subscriber is a socket; a worker keeps a few more
/// files of its own).
pub(super) fn per_worker_within_limit(per_worker: usize) -> usize {
    let Some(soft) = sys::nofile_soft() else {
        return per_worker;
    };
    let fits = usize::try_from(soft.saturating_sub(WORKER_OWN_FILES))
        .unwrap_or(usize::MAX)
        .max(1);
    if per_worker > fits {
        eprintln!("settle-bench: a worker may open {soft} files: {fits} subscribers per worker, not {per_worker}");
    }
    per_worker.min(fits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_are_a_count_or_max() {
        assert_eq!("15000".parse(), Ok(Subscribers::Count(15000)));
        assert_eq!("max".parse(), Ok(Subscribers::Max));
        for bad in ["", "0", "-1", "all", "MAX", "1e4"] {
            assert!(bad.parse::<Subscribers>().is_err(), "{bad:?}");
        }
    }
}
