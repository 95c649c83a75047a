//! Where known content lives on this host, and how it is read back without trusting the path.
//!
//! Later releases reuse the files of kept releases: hard links for unchanged files, reads for
//! unchanged chunks and delta bases. A local user who can write into a kept release's directory
//! (a release staged before world-writable entries were refused, say) can put a FIFO, a symlink or
//! a file of their own at such a path. So a kept file is opened beneath the store without
//! following any symlink on the way (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`),
//! without blocking (`O_NONBLOCK`: a FIFO opens at once and is then refused), and is used only if
//! it is still what the agent wrote: a regular file owned by the agent's user, with the mode and
//! size its manifest records (nobody else can make such a file: the agent writes as root, and
//! Linux's protected hard links keep users from linking root's files in). A hard link is made
//! from the descriptor that was checked, never from the path again.
//!
//! Building the index skips files that no longer look like that (`lstat`, once per distinct
//! content), so the next Prepare asks the coordinator for their content instead; the check at
//! open catches a swap made after that.
use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_proto::manifest::HASH_LEN;
use ferry_proto::v1::{self, EntryKind};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};

use super::{R, StoreError, key, stored_mode};

/// A file of a kept release, as its manifest describes it.
#[derive(Debug)]
pub(super) struct Kept {
    /// Relative to the store directory: `releases/<id>/<path>`.
    pub rel: PathBuf,
    pub mode: u32,
    pub size: u64,
}

type Hash = [u8; HASH_LEN];

/// The content of every kept release, by hash.
#[derive(Default)]
pub(super) struct Index {
    store: PathBuf,
    /// The store directory, opened once; None when nothing is kept.
    dir: Option<OwnedFd>,
    /// whole-file hash → the first acceptable file with that content
    pub files: HashMap<Hash, Arc<Kept>>,
    /// chunk hash → (file, offset, length)
    pub chunks: HashMap<Hash, (Arc<Kept>, u64, u64)>,
    /// Kept files left out because they changed on disk: "path: why".
    pub skipped: Vec<String>,
}

impl Index {
    /// Indexes `releases` (id and manifest), skipping files that are no longer what the agent wrote.
    pub fn build(store: &Path, releases: Vec<(String, v1::Manifest)>) -> R<Index> {
        let mut idx = Index { store: store.to_owned(), ..Index::default() };
        if releases.is_empty() {
            return Ok(idx);
        }
        idx.dir = Some(File::open(store).map_err(StoreError::io("open", store))?.into());
        let uid = nix::unistd::geteuid().as_raw();
        for (id, m) in releases {
            for e in m.entries.iter().filter(|e| e.kind == EntryKind::File as i32) {
                let file_hash = key(&e.hash);
                let new_file = file_hash.is_some_and(|h| !idx.files.contains_key(&h));
                let new_chunks = e.chunks.iter().any(|c| key(&c.hash).is_some_and(|h| !idx.chunks.contains_key(&h)));
                if !new_file && !new_chunks {
                    continue;
                }
                let kept = Kept {
                    rel: Path::new("releases").join(&id).join(&e.path),
                    mode: stored_mode(EntryKind::File, e.mode),
                    size: e.size,
                };
                let path = store.join(&kept.rel);
                let Ok(meta) = fs::symlink_metadata(&path) else { continue };
                if let Err(why) = unchanged(&meta, &kept, uid) {
                    tracing::warn!(file = %path.display(), "not reusing a kept file: {why}");
                    idx.skipped.push(format!("{}: {why}", path.display()));
                    continue;
                }
                let kept = Arc::new(kept);
                if let Some(h) = file_hash {
                    idx.files.entry(h).or_insert_with(|| kept.clone());
                }
                let mut offset = 0;
                for c in &e.chunks {
                    if let Some(h) = key(&c.hash) {
                        idx.chunks.entry(h).or_insert_with(|| (kept.clone(), offset, c.length));
                    }
                    offset += c.length;
                }
            }
        }
        Ok(idx)
    }

    fn path(&self, k: &Kept) -> PathBuf {
        self.store.join(&k.rel)
    }

    /// Opens a kept file for reading, refusing anything but the file the agent wrote.
    pub fn open(&self, k: &Kept) -> R<File> {
        let path = self.path(k);
        let dir =
            self.dir.as_ref().ok_or_else(|| StoreError::Tampered(format!("{} is not indexed", path.display())))?;
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
        let how = OpenHow::new().flags(flags).resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let fd = match nix::fcntl::openat2(dir.as_fd(), &k.rel, how) {
            // Kernels before 5.6, or a seccomp filter without openat2: the last component is
            // still not followed, and the checks below still apply.
            Err(Errno::ENOSYS | Errno::EPERM) => nix::fcntl::openat(dir.as_fd(), &k.rel, flags, nix::sys::stat::Mode::empty()),
            other => other,
        }
        .map_err(|e| match e {
            Errno::ELOOP | Errno::EXDEV => StoreError::Tampered(format!(
                "{}: a symlink is in the way; a kept release was changed on disk, so its content is not reused (deploy again: the content is then sent instead)",
                path.display()
            )),
            e => StoreError::io("open kept file", &path)(io::Error::from(e)),
        })?;
        let f = File::from(fd);
        let meta = f.metadata().map_err(StoreError::io("inspect kept file", &path))?;
        unchanged(&meta, k, nix::unistd::geteuid().as_raw()).map_err(|why| {
            StoreError::Tampered(format!(
                "{} is not the file ferry-agent wrote: {why}; a kept release was changed on disk, so its content is not reused (deploy again: the content is then sent instead)",
                path.display()
            ))
        })?;
        Ok(f)
    }

    /// Reads `buf.len()` bytes at `offset` of a kept file.
    pub fn read_at(&self, k: &Kept, offset: u64, buf: &mut [u8]) -> R<()> {
        let path = self.path(k);
        let mut f = self.open(k)?;
        f.seek(SeekFrom::Start(offset)).map_err(StoreError::io("read", &path))?;
        f.read_exact(buf).map_err(StoreError::io("read", &path))
    }

    /// Hard-links the checked kept file at `dst` (from its descriptor: a swap of the path after the
    /// check cannot change what is linked).
    pub fn link(&self, k: &Kept, dst: &Path) -> R<()> {
        let f = self.open(k)?;
        let linked = nix::unistd::linkat(f.as_fd(), "", nix::fcntl::AT_FDCWD, dst, AtFlags::AT_EMPTY_PATH)
            // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; without it, the descriptor's /proc link
            // names the same inode.
            .or_else(|e| match e {
                Errno::ENOENT | Errno::EPERM => {
                    use std::os::fd::AsRawFd;
                    let proc = format!("/proc/self/fd/{}", f.as_raw_fd());
                    nix::unistd::linkat(
                        nix::fcntl::AT_FDCWD,
                        proc.as_str(),
                        nix::fcntl::AT_FDCWD,
                        dst,
                        AtFlags::AT_SYMLINK_FOLLOW,
                    )
                }
                e => Err(e),
            });
        linked.map_err(|e| StoreError::io("hard-link", dst)(io::Error::from(e)))
    }
}

/// Why `meta` is not the kept file the agent wrote, if it is not.
fn unchanged(meta: &Metadata, k: &Kept, uid: u32) -> Result<(), String> {
    let ft = meta.file_type();
    let what = if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_symlink() {
        "a symlink"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        ""
    };
    if !what.is_empty() {
        return Err(format!("it is {what}, not a regular file"));
    }
    if meta.uid() != uid {
        return Err(format!("it is owned by uid {} (ferry-agent writes releases as uid {uid})", meta.uid()));
    }
    if meta.mode() & 0o7777 != k.mode {
        return Err(format!("its mode is {:o}, the release recorded {:o}", meta.mode() & 0o7777, k.mode));
    }
    if meta.len() != k.size {
        return Err(format!("it is {} bytes, the release recorded {}", meta.len(), k.size));
    }
    Ok(())
}
