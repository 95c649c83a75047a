//! A minimal Debian root of its own, for test hosts that install packages (the shared-root hosts
//! of [`crate::fleet`] see the machine's `/usr` read-only, and must never get it writable).
//!
//! Built once with `debootstrap` (minbase + systemd, dbus, python3 for the demo app, man-db so
//! `systemd-analyze verify` can resolve the unit's `Documentation=man:`), then reused by every
//! run from `/var/cache/ferry-test/<name>/`. Building happens under an exclusive `flock`, so tests
//! running in parallel processes (nextest) wait for one build instead of racing; a root is used
//! only once its completion marker exists, so an interrupted build is redone, never half-used.
//! Hosts boot it with `--volatile=overlay`: the cached root is never written.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::fleet::Unsupported;

/// Where cached roots live (outside `/tmp`: they outlive test runs on purpose).
pub const CACHE_DIR: &str = "/var/cache/ferry-test";
/// The root's name: bump the suffix when [`PACKAGES`] or the customisation change.
const NAME: &str = "debian-bookworm-v1";
const SUITE: &str = "bookworm";
/// Beyond debootstrap's minbase: what a booted host needs for the package tests.
const PACKAGES: &str = "systemd,systemd-sysv,dbus,python3,man-db";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const COMPLETE: &str = ".ferry-debroot-complete";

/// Checks that a root can be built or is already cached.
pub fn check_supported() -> Result<(), Unsupported> {
    let cached = Path::new(CACHE_DIR).join(NAME).join(COMPLETE).exists();
    if !cached && !Path::new("/usr/sbin/debootstrap").is_file() {
        return Err(Unsupported(
            "debootstrap is not installed and no Debian root is cached (scripts/deps.sh installs it)".into(),
        ));
    }
    Ok(())
}

/// The cached Debian root, built first if needed (a few minutes and ~50 MB of downloads the
/// first time; `FERRY_TEST_DEBIAN_MIRROR` picks another mirror).
pub fn cached_root() -> Result<PathBuf, String> {
    let cache = Path::new(CACHE_DIR);
    std::fs::create_dir_all(cache).map_err(|e| format!("mkdir {}: {e}", cache.display()))?;
    let lock_path = cache.join(format!("{NAME}.lock"));
    let lock_file = File::create(&lock_path).map_err(|e| format!("create {}: {e}", lock_path.display()))?;
    // Held until this function returns: another process building the root makes us wait here.
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("lock {}: {e}", lock_path.display()))?;
    let root = cache.join(NAME);
    if root.join(COMPLETE).exists() {
        return Ok(root);
    }
    let partial = cache.join(format!("{NAME}.partial"));
    for stale in [&root, &partial] {
        if stale.exists() {
            std::fs::remove_dir_all(stale).map_err(|e| format!("remove {}: {e}", stale.display()))?;
        }
    }
    let mirror = std::env::var("FERRY_TEST_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.to_string());
    eprintln!("debroot: building {} with debootstrap from {mirror} (once; cached afterwards)", root.display());
    let started = Instant::now();
    let out = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
        .arg(&partial)
        .arg(&mirror)
        .output()
        .map_err(|e| format!("run debootstrap: {e}"))?;
    if !out.status.success() {
        let log = std::fs::read_to_string(partial.join("debootstrap/debootstrap.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(format!(
            "debootstrap {SUITE} into {} failed ({}): {}\n{}",
            partial.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            tail.join("\n")
        ));
    }
    // The downloaded .debs are not needed any more; hostnames come from nspawn's -M.
    let archives = partial.join("var/cache/apt/archives");
    if let Ok(entries) = std::fs::read_dir(&archives) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    std::fs::write(partial.join(COMPLETE), format!("{SUITE} {PACKAGES}\n"))
        .map_err(|e| format!("write the completion marker in {}: {e}", partial.display()))?;
    std::fs::rename(&partial, &root).map_err(|e| format!("rename {} to {}: {e}", partial.display(), root.display()))?;
    eprintln!("debroot: {} built in {:.0?} ({} MB)", root.display(), started.elapsed(), du_mb(&root));
    Ok(root)
}

fn du_mb(dir: &Path) -> String {
    Command::new("du")
        .arg("-sm")
        .arg(dir)
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}
