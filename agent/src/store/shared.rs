//! The app's shared paths: state that outlives releases (logs, uploads, caches, a local config).
//!
//! A release lists them as `SharedDir` / `SharedFile` entries; each release holds a relative
//! symlink there (`ferry_proto::manifest::shared_link_target`) to `<app dir>/shared/<path>`,
//! which exists once per host and is never touched by a deploy, a rollback or a prune.
//!
//! The shared tree is writable by the app's user, who may be hostile to the agent (which runs
//! as root). So it is walked from a descriptor of `<app dir>/shared`, one component at a time,
//! never following a symlink (`O_NOFOLLOW`, `O_DIRECTORY`), and only what the walk opened is
//! changed (`fchown`, `fchmod` on the descriptor): a symlink planted in the tree makes the walk
//! fail with the path named, it never redirects a chown. The directories leading to a shared path
//! belong to root (0755); the path itself to the app's user. A shared file that does not exist
//! yet is created empty (so the app finds it, and it belongs to the app's user). Nothing is
//! changed recursively: what the app wrote inside stays as it is.
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use ferry_proto::v1::{self, EntryKind};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::{R, StoreError};
use crate::owner::Owner;

/// Directories leading to a shared path.
const PARENT_MODE: u32 = 0o755;
/// A shared file created empty, without a mode of its own in the manifest.
const FILE_MODE: u32 = 0o640;

/// Makes every shared path of `m` exist under `<app_dir>/shared`, owned by `owner` (root when
/// `None`). Idempotent; changes nothing that already is as it should be.
pub(super) fn ensure(app_dir: &Path, m: &v1::Manifest, owner: Option<&Owner>) -> R<()> {
    let entries: Vec<&v1::Entry> = m.entries.iter().filter(|e| ferry_proto::manifest::is_shared(e)).collect();
    if entries.is_empty() {
        return Ok(());
    }
    let root = app_dir.join("shared");
    fs::create_dir_all(&root).map_err(StoreError::io("create", &root))?;
    let top = nix::fcntl::open(&root, dir_flags(), Mode::empty()).map_err(|e| walk_error(&root, "", e))?;
    for e in entries {
        let mut dir = top.try_clone().map_err(StoreError::io("open", &root))?;
        let parts: Vec<&str> = e.path.split('/').collect();
        let Some((leaf, parents)) = parts.split_last() else { continue };
        let mut walked = String::new();
        for part in parents {
            walked = if walked.is_empty() { part.to_string() } else { format!("{walked}/{part}") };
            dir = open_dir(&dir, part, PARENT_MODE, None).map_err(|err| walk_error(&root, &walked, err))?;
        }
        let mode = e.mode & 0o777;
        let made = if e.kind == EntryKind::SharedDir as i32 {
            open_dir(&dir, leaf, if mode == 0 { 0o750 } else { mode }, owner)
        } else {
            open_file(&dir, leaf, if mode == 0 { FILE_MODE } else { mode }, owner)
        };
        made.map_err(|err| walk_error(&root, &e.path, err))?;
    }
    Ok(())
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Opens directory `name` in `dir`, creating it with `mode` if missing; `owner` (when given)
/// becomes its owner.
fn open_dir(dir: &OwnedFd, name: &str, mode: u32, owner: Option<&Owner>) -> nix::Result<OwnedFd> {
    let created = match nix::sys::stat::mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(mode)) {
        Ok(()) => true,
        Err(Errno::EEXIST) => false,
        Err(e) => return Err(e),
    };
    let fd = nix::fcntl::openat(dir.as_fd(), name, dir_flags(), Mode::empty())?;
    settle(&fd, created, mode, owner)?;
    Ok(fd)
}

/// Opens regular file `name` in `dir` (never following a symlink, never blocking on a FIFO),
/// creating it empty with `mode` if missing.
fn open_file(dir: &OwnedFd, name: &str, mode: u32, owner: Option<&Owner>) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let (fd, created) = match nix::fcntl::openat(
        dir.as_fd(),
        name,
        flags | OFlag::O_CREAT | OFlag::O_EXCL,
        Mode::from_bits_truncate(mode),
    ) {
        Ok(fd) => (fd, true),
        Err(Errno::EEXIST) => (nix::fcntl::openat(dir.as_fd(), name, flags, Mode::empty())?, false),
        Err(e) => return Err(e),
    };
    if nix::sys::stat::fstat(fd.as_fd())?.st_mode & nix::libc::S_IFMT != nix::libc::S_IFREG {
        return Err(Errno::EINVAL);
    }
    settle(&fd, created, mode, owner)?;
    Ok(fd)
}

/// A new path gets its mode (the umask does not apply); a path of an app with a user belongs to
/// that user and the app group (an app's new user takes its shared paths over; their contents
/// stay as they are).
fn settle(fd: &OwnedFd, created: bool, mode: u32, owner: Option<&Owner>) -> nix::Result<()> {
    if created {
        nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(mode))?;
    }
    if let Some(o) = owner {
        let st = nix::sys::stat::fstat(fd.as_fd())?;
        if st.st_uid != o.uid.as_raw() || st.st_gid != o.gid.as_raw() {
            nix::unistd::fchown(fd.as_fd(), Some(o.uid), Some(o.gid))?;
        }
    }
    Ok(())
}

fn walk_error(root: &Path, rel: &str, e: Errno) -> StoreError {
    let path = if rel.is_empty() { root.to_owned() } else { root.join(rel) };
    match e {
        Errno::ELOOP | Errno::ENOTDIR | Errno::EINVAL => StoreError::Tampered(format!(
            "shared path {}: it is not the {} ferry made (a symlink, FIFO or something else was put there); move it away, then deploy again",
            path.display(),
            if e == Errno::EINVAL { "regular file" } else { "directory" },
        )),
        e => StoreError::io("create shared path", &path)(io::Error::from(e)),
    }
}
