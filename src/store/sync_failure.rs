//! What a failed sync of sled's files leaves behind for the next start.
//!
//! When a writeback fails, Linux marks the pages clean and keeps them in the page
//! cache, and reports the error once, to the handle that syncs. A server that stops
//! and starts again in the same boot reads those pages back from the cache: sled sees
//! its applies as written, recovery finds their commands finished and releases their
//! intake segments, and the next sync, on a fresh handle, succeeds. The disk may still
//! lack them, and a power loss would then lose them with no intake record left.
//!
//! So a failed sync writes a marker, `intake/sync-failed`, naming the boot it happened
//! in, and a start refuses while the machine has not rebooted since: only a reboot
//! empties the page cache. After one, sled reads what the disk holds, and the intake
//! log applies again whatever the failure lost; the start removes the marker then.
//! Where the boot cannot be told (no boot id), a start refuses until the marker is
//! gone. Deleting it by hand starts anyway (the operator's call: say, the failure was
//! on a disk since replaced).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::StoreError;

/// The marker's name, in the intake directory.
const MARKER: &str = "sync-failed";
/// This boot's id, a random UUID the kernel makes at boot.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

pub(super) fn boot_id() -> Option<String> {
    fs::read_to_string(BOOT_ID)
        .ok()
        .map(|id| id.trim().to_owned())
}

/// Leaves the marker in `intake_dir`: the first line this boot's id, then what failed.
/// Not synced: it only has to outlast this boot, as the page cache does, and a reboot
/// that loses it has emptied the cache too. Best effort: a failed write is logged.
pub(super) fn record(intake_dir: &Path, cause: &dyn std::fmt::Display) {
    let write = || -> io::Result<()> {
        fs::create_dir_all(intake_dir)?;
        let mut file = fs::File::create(intake_dir.join(MARKER))?;
        writeln!(file, "{}", boot_id().unwrap_or_default())?;
        writeln!(file, "{cause}")
    };
    if let Err(err) = write() {
        tracing::error!(error = %err, "cannot leave the marker of a failed sync of sled's files");
    }
}

/// Checks `intake_dir` for a marker: an error if it is from this boot, or if the boot
/// cannot be told (no boot id here, or none in the marker: a write cut short), else
/// the path of a marker from an earlier boot, to remove once recovery is done.
///
/// # Errors
/// [`StoreError::SyncFailedThisBoot`], or when the marker cannot be read.
pub(super) fn check(intake_dir: &Path) -> Result<Option<PathBuf>, StoreError> {
    check_against(intake_dir, boot_id().as_deref())
}

fn check_against(intake_dir: &Path, boot: Option<&str>) -> Result<Option<PathBuf>, StoreError> {
    let marker = intake_dir.join(MARKER);
    let text = match fs::read_to_string(&marker) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        text => text?,
    };
    let marked = text.lines().next().unwrap_or_default();
    match boot {
        Some(boot) if !boot.is_empty() && !marked.is_empty() && boot != marked => Ok(Some(marker)),
        _ => Err(StoreError::SyncFailedThisBoot(marker)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_of_this_boot_refuses_a_start_and_one_of_an_earlier_boot_does_not() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let intake = dir.path().join("intake");
        assert!(
            check_against(&intake, Some("b1"))
                .expect("no marker")
                .is_none(),
            "no marker, no intake directory yet"
        );

        record(&intake, &"EIO");
        let this_boot = boot_id();
        let text = fs::read_to_string(intake.join(MARKER)).expect("the marker");
        assert_eq!(
            text,
            format!("{}\nEIO\n", this_boot.clone().unwrap_or_default())
        );
        assert!(matches!(
            check(&intake),
            Err(StoreError::SyncFailedThisBoot(path)) if path == intake.join(MARKER)
        ));
        assert!(
            matches!(
                check_against(&intake, None),
                Err(StoreError::SyncFailedThisBoot(_))
            ),
            "a boot that cannot be told is taken for the same one"
        );
        assert_eq!(
            check_against(&intake, Some("another boot")).expect("rebooted"),
            Some(intake.join(MARKER))
        );

        for cut_short in ["", "\nEIO\n"] {
            fs::write(intake.join(MARKER), cut_short).expect("a marker");
            assert!(
                matches!(
                    check_against(&intake, Some("another boot")),
                    Err(StoreError::SyncFailedThisBoot(_))
                ),
                "a marker without its boot refuses: {cut_short:?}"
            );
        }
    }
}
