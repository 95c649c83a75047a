//! The release store of one app: `<data_dir>/apps/<app>/`.
//!
//! ```text
//! releases/<id>/          complete releases, never modified (files read-only)
//! manifests/<id>.manifest the manifest of each release: the index of what content the host has
//! current -> releases/<id> replaced only by rename(2) of a fresh symlink; directory fsync'd
//! staging/<id>/            manifest, the bases offered for deltas, `files/<n>` (entry n of the
//!                          manifest, written in place as its chunks arrive), `received` (the
//!                          chunks written so far), the tree being built; removed at start-up
//! journal                  one JSON line per activation (append-only, fsync'd)
//! activated                the release whose activation last ran to its end (units restarted,
//!                          healthy): `current` alone does not say so
//! shared/<path>            the app's shared paths (state outliving releases; see [`shared`]),
//!                          linked from every release that lists them
//! ```
//!
//! Invariants:
//! - A release is visible in `releases/` only once complete: the tree is built and fsync'd in
//!   staging, its manifest written durably, then the tree is renamed into `releases/`.
//! - `current` always names a complete release (or does not exist yet). A kill at any point leaves
//!   the old or the new target, never a dangling or partial one.
//! - Pruning never removes `current` or the release before it, and deletes a release's manifest
//!   (the index entry) before its files, so content is never borrowed from a half-deleted release.
//! - Unchanged files are hard links to the same inode in an earlier release; files are read-only so
//!   no release can change another's content.
//! - Content is reused from kept releases only if it is still what the agent wrote there (see
//!   [`kept`]): a FIFO, symlink or foreign file put in a kept release is refused, never followed
//!   or waited on.
//! - After `current` is renamed, a failure to fsync the directory or write the journal puts the
//!   old target back, and the error says what `current` is ([`StoreError::Unrecorded`]).
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ferry_proto::durable::{self, Existing};
use ferry_proto::manifest::{self, CHUNK_MAX, HASH_LEN, Hex};
use ferry_proto::v1::{self, EntryKind};
use prost::Message;

use tokio_util::sync::CancellationToken;

use crate::failpoint;
use crate::owner::Owner;

mod kept;
mod shared;

use kept::Index;

/// A release id is `<version>-<short manifest hash>`; the version is everything before the last '-'.
pub fn version_of(release_id: &str) -> &str {
    release_id.rsplit_once('-').map_or(release_id, |(v, _)| v)
}

/// Extra room a release needs beyond its new content: 0.1 % of the filesystem, at least 2 MiB and
/// at most 64 MiB (for the manifest, the directories, and what other writers add meanwhile).
pub fn margin(fs_bytes: u64) -> u64 {
    (fs_bytes / 1000).clamp(2 << 20, 64 << 20)
}

/// The free and total bytes of the data dir's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    pub free: u64,
    pub total: u64,
}

impl DiskSpace {
    /// Room for anything (tests).
    pub const UNLIMITED: DiskSpace = DiskSpace { free: u64::MAX, total: u64::MAX };
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "not enough disk space in {dir}: {free} bytes free, staging needs {need} ({new} bytes of new content plus a margin of {margin}: 0.1% of the filesystem, 2 to 64 MiB); free space or lower keep_releases"
    )]
    NoSpace { dir: PathBuf, free: u64, need: u64, new: u64, margin: u64 },
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}; the current release is untouched")]
    DiskFull(String),
    #[error("ferry-agent is stopping; {0} was abandoned (retry once it is back)")]
    Stopping(&'static str),
    #[error("release {0} is not on this host")]
    NoSuchRelease(String),
    #[error("nothing prepared under staging id {0:?} (call Prepare first; staging is cleared when the agent restarts)")]
    NotPrepared(String),
    #[error("{0} chunk(s) of the release were never uploaded")]
    Incomplete(usize),
    #[error("content check failed: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Conflict(String),
    /// `current` switched but the switch could not be made durable or recorded; says what
    /// `current` is now.
    #[error("{0}")]
    Unrecorded(String),
    /// A kept release's file is no longer the one the agent wrote.
    #[error("{0}")]
    Tampered(String),
    /// A manifest delta this host cannot apply (the coordinator then sends the whole manifest).
    #[error("{0}")]
    Base(String),
}

impl StoreError {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
        move |source| {
            if source.raw_os_error() == Some(nix::libc::ENOSPC) {
                StoreError::DiskFull(format!(
                    "the disk holding {} is full (ENOSPC) while trying to {what}",
                    path.display()
                ))
            } else {
                StoreError::Io { what, path: path.to_owned(), source }
            }
        }
    }
}

type R<T> = Result<T, StoreError>;

fn key(h: &[u8]) -> Option<[u8; HASH_LEN]> {
    h.try_into().ok()
}

/// What a Prepare found.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub release_id: String,
    pub already_present: bool,
    pub missing: Vec<Vec<u8>>,
    pub missing_bytes: u64,
    /// Old content offered for rebuilding missing chunks (see `ferry_proto::delta`).
    pub bases: Vec<v1::Basis>,
}

/// The manifest a Prepare names: whole, or as changes from a release this host keeps.
pub enum ManifestSource {
    Whole(v1::Manifest),
    Delta { base: String, delta: v1::ManifestDelta },
}

/// Old content offered as bases in one Prepare is bounded (reading and fingerprinting it costs
/// the host a read of every byte).
const BASES_MAX_BYTES: u64 = 256 << 20;
const BASIS_ID_LEN: usize = 16;

/// What a host is told about itself at Commit, for its rendered files.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// Its name in the coordinator's inventory.
    pub host: String,
    /// The address the coordinator reaches it at.
    pub address: String,
    /// Where the app's secrets are written (`<secrets_dir>/<app>`): `{{ secrets.NAME }}` is
    /// `<this>/<release>/<NAME>`.
    pub secrets_dir: PathBuf,
}

/// An activation or rollback that happened (or did not need to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    pub from: Option<String>,
    pub to: String,
    pub changed: bool,
}

/// One app's store on disk.
#[derive(Clone)]
pub struct AppStore {
    dir: PathBuf,
    /// The app's public path, kept a symlink to `<dir>/current`.
    root: Option<PathBuf>,
    /// Cancelled when the agent stops: long operations (building a release, reading delta
    /// bases) end early instead of holding up the agent's exit.
    stop: Option<CancellationToken>,
}

impl AppStore {
    pub fn new(dir: PathBuf) -> Self {
        AppStore { dir, root: None, stop: None }
    }

    pub fn with_root(dir: PathBuf, root: PathBuf) -> Self {
        AppStore { dir, root: Some(root), stop: None }
    }

    /// Ends long operations early once `stop` is cancelled.
    pub fn stop_on(mut self, stop: CancellationToken) -> Self {
        self.stop = Some(stop);
        self
    }

    fn releases_dir(&self) -> PathBuf {
        self.dir.join("releases")
    }
    fn manifests_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }
    fn staging_dir(&self) -> PathBuf {
        self.dir.join("staging")
    }
    fn manifest_path(&self, id: &str) -> PathBuf {
        self.manifests_dir().join(format!("{id}.manifest"))
    }
    pub fn release_path(&self, id: &str) -> PathBuf {
        self.releases_dir().join(id)
    }

    fn ensure_dirs(&self) -> R<()> {
        for d in [self.releases_dir(), self.manifests_dir(), self.staging_dir()] {
            fs::create_dir_all(&d).map_err(StoreError::io("create", &d))?;
        }
        Ok(())
    }

    /// Start-up clean-up: staging leftovers, stray temp links, half-pruned releases, manifests
    /// whose release never got promoted.
    pub fn recover(&self) -> R<Vec<String>> {
        let mut removed = Vec::new();
        if !self.dir.exists() {
            return Ok(removed);
        }
        self.ensure_dirs()?;
        for entry in read_names(&self.staging_dir())? {
            let p = self.staging_dir().join(&entry);
            fs::remove_dir_all(&p).map_err(StoreError::io("remove staging", &p))?;
            removed.push(format!("staging/{entry}"));
        }
        for entry in read_names(&self.dir)? {
            if entry.starts_with(".current.tmp") {
                let p = self.dir.join(&entry);
                fs::remove_file(&p).map_err(StoreError::io("remove", &p))?;
                removed.push(entry);
            }
        }
        for entry in read_names(&self.releases_dir())? {
            if entry.starts_with('.') {
                let p = self.releases_dir().join(&entry);
                fs::remove_dir_all(&p).map_err(StoreError::io("remove", &p))?;
                removed.push(format!("releases/{entry}"));
            }
        }
        for entry in read_names(&self.manifests_dir())? {
            if let Some(id) = entry.strip_suffix(".manifest")
                && !self.release_path(id).is_dir()
            {
                let p = self.manifests_dir().join(&entry);
                fs::remove_file(&p).map_err(StoreError::io("remove", &p))?;
                removed.push(format!("manifests/{entry}"));
            }
        }
        durable::sync_dir(&self.dir).map_err(StoreError::io("sync", &self.dir))?;
        Ok(removed)
    }

    /// The release id `current` points at, if any.
    pub fn current(&self) -> io::Result<Option<String>> {
        match fs::read_link(self.dir.join("current")) {
            Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The release whose activation last ran to its end (units restarted, probes passed, or a
    /// rollback to it did): `current` can name a release whose activation was cut short (the
    /// agent died between the swap and the restart), which must not count as done.
    pub fn activated(&self) -> Option<String> {
        fs::read_to_string(self.dir.join("activated")).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    }

    /// Records that `release_id`'s activation ran to its end.
    pub fn mark_activated(&self, release_id: &str) -> R<()> {
        let path = self.dir.join("activated");
        durable::write(&path, format!("{release_id}\n").as_bytes(), 0o644, Existing::Replace)
            .map_err(StoreError::io("record the activation", &path))
    }

    /// Keeps `signature` with release `release_id` (checked again at each switch to it).
    pub fn keep_signature(&self, release_id: &str, signature: &[u8]) -> R<()> {
        manifest::check_release_id(release_id).map_err(StoreError::Refused)?;
        let path = self.signature_path(release_id);
        durable::write(&path, hex::encode(signature).as_bytes(), 0o644, Existing::Replace)
            .map_err(StoreError::io("keep the signature", &path))
    }

    /// The signature kept with release `release_id` (empty: none).
    pub fn signature(&self, release_id: &str) -> Vec<u8> {
        fs::read_to_string(self.signature_path(release_id))
            .ok()
            .and_then(|s| hex::decode(s.trim()).ok())
            .unwrap_or_default()
    }

    fn signature_path(&self, id: &str) -> PathBuf {
        self.manifests_dir().join(format!("{id}.sig"))
    }

    /// Complete releases (those with a manifest), newest promotion first.
    pub fn releases(&self) -> io::Result<Vec<v1::Release>> {
        let current = self.current()?;
        let previous = self.previous().ok().flatten();
        let mut out = Vec::new();
        let mut order = HashMap::new();
        let names = match fs::read_dir(self.manifests_dir()) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in names {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".manifest") else { continue };
            if !self.release_path(id).is_dir() {
                continue;
            }
            let meta = entry.metadata()?;
            let m = self.load_manifest(id).ok();
            // Promotion order at full timestamp precision (several releases can land in a second).
            let promoted =
                meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
            order.insert(id.to_string(), promoted);
            out.push(v1::Release {
                id: id.to_string(),
                version: version_of(id).to_string(),
                manifest_hash: m.as_ref().map(|m| manifest::hash(m).to_vec()).unwrap_or_default(),
                created_unix: meta.mtime(),
                size_bytes: m.as_ref().map(manifest::total_bytes).unwrap_or(0),
                current: current.as_deref() == Some(id),
                previous: previous.as_deref() == Some(id),
            });
        }
        out.sort_by(|a, b| order.get(&b.id).cmp(&order.get(&a.id)).then_with(|| b.id.cmp(&a.id)));
        Ok(out)
    }

    fn load_manifest(&self, id: &str) -> R<v1::Manifest> {
        let p = self.manifest_path(id);
        let bytes = fs::read(&p).map_err(StoreError::io("read manifest", &p))?;
        v1::Manifest::decode(bytes.as_slice())
            .map_err(|e| StoreError::Corrupt(format!("manifest {}: {e}", p.display())))
    }

    fn index(&self) -> R<Index> {
        let mut kept = Vec::new();
        for rel in self.releases().map_err(StoreError::io("list releases", &self.dir))? {
            kept.push((rel.id.clone(), self.load_manifest(&rel.id)?));
        }
        Index::build(&self.dir, kept)
    }

    fn stage_dir(&self, stage_id: &str) -> R<PathBuf> {
        manifest::check_release_id(stage_id).map_err(StoreError::Refused)?;
        Ok(self.staging_dir().join(stage_id))
    }

    /// The chunks already written into the stage's files (an upload cut short resumes from here).
    fn received(&self, stage: &Path) -> R<HashSet<[u8; HASH_LEN]>> {
        let log = stage.join("received");
        let bytes = match fs::read(&log) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashSet::new()),
            Err(e) => return Err(StoreError::io("read", &log)(e)),
        };
        // A record is appended once its chunk is in every file that holds it; a torn last record
        // (the agent was stopped mid-write) counts for nothing.
        Ok(bytes.chunks_exact(HASH_LEN).filter_map(key).collect())
    }

    /// Rebuilds the manifest of a delta from the base release's manifest.
    fn load_manifest_checked(&self, base: &str) -> R<v1::Manifest> {
        manifest::check_release_id(base).map_err(StoreError::Refused)?;
        if !self.has_release(base) {
            return Err(StoreError::Base(format!("the base release {base} of the manifest delta is not kept here")));
        }
        self.load_manifest(base)
    }

    fn apply_delta(
        &self,
        base: &str,
        old: &v1::Manifest,
        delta: &v1::ManifestDelta,
        claimed_hash: &[u8],
    ) -> R<v1::Manifest> {
        let m = manifest::apply_delta(old, delta)
            .map_err(|e| StoreError::Base(format!("the manifest delta does not apply to {base}: {e}")))?;
        if claimed_hash != manifest::hash(&m) {
            return Err(StoreError::Base(format!(
                "the manifest delta applied to {base} does not give the manifest hash {}",
                Hex(claimed_hash)
            )));
        }
        Ok(m)
    }

    /// Validates a manifest and answers which chunks the host lacks. `space` is that of the data
    /// dir's filesystem.
    pub fn prepare(&self, version: &str, source: ManifestSource, claimed_hash: &[u8], space: DiskSpace) -> R<Prepared> {
        manifest::check_version(version).map_err(StoreError::Refused)?;
        // The base release's manifest, when the delta already read it: the bases come from it.
        let (m, base) = match source {
            ManifestSource::Whole(m) => (m, None),
            ManifestSource::Delta { base, delta } => {
                let old = self.load_manifest_checked(&base)?;
                (self.apply_delta(&base, &old, &delta, claimed_hash)?, Some((base, old)))
            }
        };
        let m = &m;
        manifest::validate(m).map_err(|e| StoreError::Refused(e.to_string()))?;
        let hash = manifest::hash(m);
        if !claimed_hash.is_empty() && claimed_hash != hash {
            return Err(StoreError::Refused(format!(
                "manifest hash mismatch: the request says {}, the manifest hashes to {}",
                Hex(claimed_hash),
                Hex(&hash)
            )));
        }
        // The app's user must exist here before anything changes.
        Owner::of(m).map_err(StoreError::Refused)?;
        let release_id = manifest::release_id(version, &hash);
        if self.manifest_path(&release_id).exists() && self.release_path(&release_id).is_dir() {
            return Ok(Prepared {
                release_id,
                already_present: true,
                missing: vec![],
                missing_bytes: 0,
                bases: vec![],
            });
        }
        // Work out what is missing and whether it fits before writing anything: on a full disk
        // the answer must be "not enough space", not an ENOSPC from our own bookkeeping.
        let idx = self.index()?;
        let stage = self.staging_dir().join(&release_id);
        let have = self.received(&stage)?;

        let mut missing = Vec::new();
        let mut seen = HashSet::new();
        let (mut missing_bytes, mut new_file_bytes) = (0u64, 0u64);
        for e in &m.entries {
            if e.kind != EntryKind::File as i32 || key(&e.hash).is_some_and(|h| idx.files.contains_key(&h)) {
                continue;
            }
            new_file_bytes += e.size;
            for c in &e.chunks {
                let Some(h) = key(&c.hash) else { continue };
                if idx.chunks.contains_key(&h) || have.contains(&h) || !seen.insert(h) {
                    continue;
                }
                missing.push(c.hash.clone());
                missing_bytes += c.length;
            }
        }
        // Room for the new files: chunks are written straight into them as they arrive (unchanged
        // files are hard links, taking no room).
        let new = new_file_bytes;
        let margin = margin(space.total);
        if space.free < new.saturating_add(margin) {
            return Err(StoreError::NoSpace {
                dir: self.dir.clone(),
                free: space.free,
                need: new.saturating_add(margin),
                new,
                margin,
            });
        }
        self.ensure_dirs()?;
        fs::create_dir_all(stage.join("files")).map_err(StoreError::io("create staging", &stage))?;
        let mpath = stage.join("manifest");
        fs::write(&mpath, m.encode_to_vec()).map_err(StoreError::io("write staging manifest", &mpath))?;
        let bases = if missing.is_empty() {
            Vec::new()
        } else {
            let old = match base {
                Some((_, old)) => Some(old),
                None => match self.current().map_err(StoreError::io("read", &self.dir))? {
                    Some(current) => self.load_manifest(&current).inspect_err(|e| {
                        tracing::warn!(base = current, error = %e, "cannot read the current release's manifest; sending no delta bases");
                    }).ok(),
                    None => None,
                },
            };
            match old {
                Some(old) => self.offer_bases(&stage, &old, m, &missing, &idx)?,
                None => Vec::new(),
            }
        };
        Ok(Prepared { release_id, already_present: false, missing, missing_bytes, bases })
    }

    /// Bases for the missing chunks of files that `old` (the base or current release) has an older version of (same path): the
    /// old file's chunks that the new file no longer has, fingerprinted piece by piece. Remembered
    /// in the stage (`bases`) so the upload can rebuild chunks from them.
    fn offer_bases(
        &self,
        stage: &Path,
        old: &v1::Manifest,
        m: &v1::Manifest,
        missing: &[Vec<u8>],
        idx: &Index,
    ) -> R<Vec<v1::Basis>> {
        let old_files: HashMap<&str, &v1::Entry> =
            old.entries.iter().filter(|e| e.kind == EntryKind::File as i32).map(|e| (e.path.as_str(), e)).collect();
        let mut unassigned: HashSet<[u8; HASH_LEN]> = missing.iter().filter_map(|h| key(h)).collect();
        let mut bases = Vec::new();
        let mut stored = Vec::new();
        let mut budget = BASES_MAX_BYTES;
        for e in m.entries.iter().filter(|e| e.kind == EntryKind::File as i32) {
            check_stop(self.stop.as_ref())?;
            let wanted: Vec<&v1::Chunk> =
                e.chunks.iter().filter(|c| key(&c.hash).is_some_and(|h| unassigned.contains(&h))).collect();
            let Some(prev) = old_files.get(e.path.as_str()) else { continue };
            if wanted.is_empty() {
                continue;
            }
            let now: HashSet<&[u8]> = e.chunks.iter().map(|c| c.hash.as_slice()).collect();
            let mut seen = HashSet::new();
            let basis: Vec<([u8; HASH_LEN], u64)> = prev
                .chunks
                .iter()
                .filter(|c| !now.contains(c.hash.as_slice()))
                .filter_map(|c| key(&c.hash).map(|h| (h, c.length)))
                .filter(|(h, _)| seen.insert(*h))
                .collect();
            let basis_bytes: u64 = basis.iter().map(|(_, l)| l).sum();
            let wanted_bytes: u64 = wanted.iter().map(|c| c.length).sum();
            // An old version much larger than what changed would cost more fingerprints than it
            // could save.
            if basis.is_empty() || basis_bytes > 4 * wanted_bytes + u64::from(CHUNK_MAX) || basis_bytes > budget {
                continue;
            }
            let Some(bytes) = read_basis(&basis, idx) else { continue };
            budget -= basis_bytes;
            let (piece_hashes, piece_lengths) = ferry_proto::delta::signature(&bytes);
            let id = basis_id(basis.iter().map(|(h, _)| h));
            for c in &wanted {
                if let Some(h) = key(&c.hash) {
                    unassigned.remove(&h);
                }
            }
            stored.push((id, basis.iter().map(|(h, _)| *h).collect::<Vec<_>>()));
            bases.push(v1::Basis {
                id: id.to_vec(),
                chunks: wanted.iter().map(|c| c.hash.clone()).collect(),
                piece_hashes,
                piece_lengths,
            });
        }
        if !stored.is_empty() {
            // Bases offered by an earlier Prepare of the same stage stay valid.
            let mut all = read_bases(stage)?;
            all.extend(stored);
            let text: String = all
                .iter()
                .map(|(id, chunks)| {
                    let hashes: Vec<String> = chunks.iter().map(hex::encode).collect();
                    format!("{} {}\n", hex::encode(id), hashes.join(" "))
                })
                .collect();
            let (tmp, dst) = (stage.join(".bases.tmp"), stage.join("bases"));
            fs::write(&tmp, text).map_err(StoreError::io("write staging bases", &tmp))?;
            fs::rename(&tmp, &dst).map_err(StoreError::io("write staging bases", &dst))?;
        }
        Ok(bases)
    }

    /// The staging directory and manifest of a prepared stage.
    fn staged(&self, stage_id: &str) -> R<(PathBuf, v1::Manifest)> {
        let stage = self.stage_dir(stage_id)?;
        let mpath = stage.join("manifest");
        let bytes = match fs::read(&mpath) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotPrepared(stage_id.to_string())),
            Err(e) => return Err(StoreError::io("read staging manifest", &mpath)(e)),
        };
        let m = v1::Manifest::decode(bytes.as_slice())
            .map_err(|e| StoreError::Corrupt(format!("staging manifest: {e}")))?;
        Ok((stage, m))
    }

    /// Starts receiving chunks for a prepared stage.
    /// A reader of the chunks of every kept release (checked as [`kept`] checks them).
    pub fn chunk_reader(&self) -> R<ChunkReader> {
        Ok(ChunkReader { idx: self.index()? })
    }

    pub fn upload(&self, stage_id: &str) -> R<Upload> {
        let (stage, m) = self.staged(stage_id)?;
        let have = self.received(&stage)?;
        let bases: HashMap<[u8; BASIS_ID_LEN], Vec<[u8; HASH_LEN]>> = read_bases(&stage)?.into_iter().collect();
        let idx = if bases.is_empty() { Index::default() } else { self.index()? };
        let log_path = stage.join("received");
        let log = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(StoreError::io("open", &log_path))?;
        Ok(Upload {
            files: stage.join("files"),
            places: places(&m),
            open: None,
            log,
            have,
            bases,
            idx,
            basis: None,
            chunks_received: 0,
            bytes_received: 0,
            rebuilt: 0,
        })
    }

    /// Builds the release from staging and promotes it into `releases/`. Idempotent. On failure
    /// the half-built tree is removed; the stage's files stay (the tree only links them), so a
    /// retry resumes the upload instead of starting over, unless their content was found wrong:
    /// then the whole stage goes, and the next Prepare asks for everything again.
    pub fn commit(&self, stage_id: &str, progress: impl FnMut(u64, u64)) -> R<String> {
        self.commit_on(stage_id, &HostFacts::default(), progress)
    }

    /// [`AppStore::commit`], rendering the release's files with this host's `facts`.
    pub fn commit_on(&self, stage_id: &str, facts: &HostFacts, progress: impl FnMut(u64, u64)) -> R<String> {
        let result = self.commit_inner(stage_id, facts, progress);
        if let Err(e) = &result
            && let Ok(stage) = self.stage_dir(stage_id)
        {
            let _ = fs::remove_dir_all(stage.join("tree"));
            if matches!(e, StoreError::Corrupt(_)) {
                let _ = fs::remove_dir_all(&stage);
            }
        }
        result
    }

    fn commit_inner(&self, stage_id: &str, facts: &HostFacts, mut progress: impl FnMut(u64, u64)) -> R<String> {
        let stage = self.stage_dir(stage_id)?;
        if self.manifest_path(stage_id).exists() && self.release_path(stage_id).is_dir() {
            return Ok(stage_id.to_string());
        }
        failpoint::hit("after-upload");
        let (_, m) = self.staged(stage_id)?;
        let idx = self.index()?;
        let files_dir = stage.join("files");
        let have = self.received(&stage)?;
        let absent = m
            .entries
            .iter()
            .filter(|e| !key(&e.hash).is_some_and(|h| idx.files.contains_key(&h)))
            .flat_map(|e| e.chunks.iter())
            .filter_map(|c| key(&c.hash))
            .filter(|h| !idx.chunks.contains_key(h) && !have.contains(h))
            .collect::<HashSet<_>>()
            .len();
        if absent > 0 && !idx.skipped.is_empty() {
            return Err(StoreError::Tampered(format!(
                "{absent} chunk(s) of the release were to come from kept files that changed on disk since Prepare ({}); they are not reused (deploy again: the content is then sent instead)",
                idx.skipped.join("; ")
            )));
        }
        if absent > 0 {
            return Err(StoreError::Incomplete(absent));
        }

        let tree = stage.join("tree");
        if tree.exists() {
            fs::remove_dir_all(&tree).map_err(StoreError::io("remove", &tree))?;
        }
        fs::create_dir(&tree).map_err(StoreError::io("create", &tree))?;
        let total = manifest::total_bytes(&m);
        let mut done = 0u64;
        let files = m.entries.iter().filter(|e| e.kind == EntryKind::File as i32).count();
        let mut files_done = 0usize;
        for (n, e) in m.entries.iter().enumerate() {
            check_stop(self.stop.as_ref())?;
            let dst = tree.join(&e.path);
            match EntryKind::try_from(e.kind).unwrap_or(EntryKind::Unspecified) {
                EntryKind::Dir => {
                    fs::create_dir(&dst).map_err(StoreError::io("create directory", &dst))?;
                }
                EntryKind::Symlink => {
                    std::os::unix::fs::symlink(&e.link_target, &dst).map_err(StoreError::io("create symlink", &dst))?;
                }
                EntryKind::File => {
                    let mode = stored_mode(EntryKind::File, e.mode);
                    match key(&e.hash).and_then(|h| idx.files.get(&h)) {
                        Some(src) if src.mode == mode => idx.link(src, &dst)?,
                        _ => {
                            let staged = files_dir.join(n.to_string());
                            finish_file(&staged, e, mode, &idx, &have, self.stop.as_ref())?;
                            fs::hard_link(&staged, &dst).map_err(StoreError::io("link into the release", &dst))?;
                        }
                    }
                    done += e.size;
                    files_done += 1;
                    progress(done, total);
                    if files_done == files / 2 {
                        failpoint::hit("mid-materialize");
                    }
                }
                EntryKind::SharedDir | EntryKind::SharedFile => {
                    std::os::unix::fs::symlink(manifest::shared_link_target(&e.path), &dst)
                        .map_err(StoreError::io("link shared path", &dst))?;
                }
                EntryKind::Unspecified => return Err(StoreError::Refused(format!("{}: unknown entry kind", e.path))),
            }
        }
        self.render(&tree, &m, stage_id, facts)?;
        let owner = Owner::of(&m).map_err(StoreError::Refused)?;
        if let Some(o) = &owner {
            give_group(&tree, &m, o)?;
        }
        // The shared paths exist before any release links to them.
        shared::ensure(&self.dir, &m, owner.as_ref())?;
        // Directory modes last (a read-only directory would refuse its own entries).
        for e in m.entries.iter().filter(|e| e.kind == EntryKind::Dir as i32) {
            let p = tree.join(&e.path);
            fs::set_permissions(&p, fs::Permissions::from_mode(stored_mode(EntryKind::Dir, e.mode)))
                .map_err(StoreError::io("set mode", &p))?;
        }
        verify_tree(&tree, &m)?;
        // One flush of the whole filesystem makes every file and directory of the tree durable
        // before the rename that publishes it (the same guarantee as an fsync of each, with one
        // wait instead of thousands).
        let root = File::open(&tree).map_err(StoreError::io("open", &tree))?;
        nix::unistd::syncfs(&root).map_err(|e| StoreError::io("flush to disk", &tree)(io::Error::from(e)))?;

        failpoint::hit("before-promote");
        let mbytes = m.encode_to_vec();
        durable::write(&self.manifest_path(stage_id), &mbytes, 0o644, Existing::Replace)
            .map_err(StoreError::io("write manifest", &self.manifests_dir()))?;
        let dst = self.release_path(stage_id);
        fs::rename(&tree, &dst).map_err(StoreError::io("promote", &dst))?;
        durable::sync_dir(&self.releases_dir()).map_err(StoreError::io("sync", &self.releases_dir()))?;
        fs::remove_dir_all(&stage).map_err(StoreError::io("remove staging", &stage))?;
        Ok(stage_id.to_string())
    }

    /// Writes the release's rendered files into `tree` (read-only, like the rest of it).
    fn render(&self, tree: &Path, m: &v1::Manifest, release_id: &str, facts: &HostFacts) -> R<()> {
        if m.rendered.is_empty() {
            return Ok(());
        }
        let app = self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let version = version_of(release_id).to_string();
        let given = |v: &str| (!v.is_empty()).then(|| v.to_string());
        let var = |name: &str| m.vars.iter().find(|v| v.name == name).map(|v| v.value.clone());
        let value = |name: &str| -> Option<String> {
            match name {
                "app" => given(&app),
                "version" => given(&version),
                "host" => given(&facts.host),
                "address" => given(&facts.address),
                _ => {
                    if let Some(label) = name.strip_prefix("labels.") {
                        var(&ferry_proto::render::label_var(&facts.host, label))
                    } else if let Some(secret) = name.strip_prefix("secrets.") {
                        let declared =
                            m.secrets.iter().any(|s| s == secret) && !facts.secrets_dir.as_os_str().is_empty();
                        declared.then(|| facts.secrets_dir.join(release_id).join(secret).to_string_lossy().into_owned())
                    } else {
                        var(name)
                    }
                }
            }
        };
        for r in &m.rendered {
            let template = if r.template.is_empty() {
                r.text.clone()
            } else {
                ferry_proto::render::read_template(&tree.join(&r.template), &r.template).map_err(StoreError::Refused)?
            };
            let source = if r.template.is_empty() { "its text" } else { r.template.as_str() };
            let text = ferry_proto::render::render(&template, value, r.env_file)
                .map_err(|e| StoreError::Refused(format!("rendering {} from {source}: {e}", r.path)))?;
            let dst = tree.join(&r.path);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(r.mode & 0o555)
                .open(&dst)
                .map_err(StoreError::io("write rendered file", &dst))?;
            f.write_all(text.as_bytes()).map_err(StoreError::io("write rendered file", &dst))?;
            f.set_permissions(fs::Permissions::from_mode(r.mode & 0o555)).map_err(StoreError::io("set mode", &dst))?;
        }
        Ok(())
    }

    /// The manifest of the kept release `release_id`.
    pub fn manifest(&self, release_id: &str) -> R<v1::Manifest> {
        manifest::check_release_id(release_id).map_err(StoreError::Refused)?;
        self.load_manifest(release_id)
    }

    /// Whether a complete release of that id is kept.
    pub fn has_release(&self, release_id: &str) -> bool {
        manifest::check_release_id(release_id).is_ok()
            && self.release_path(release_id).is_dir()
            && self.manifest_path(release_id).exists()
    }

    /// Points `current` at `release_id` (and the app root at `current`). O(1): one rename.
    pub fn activate(&self, release_id: &str, deployment_id: &str) -> R<Swap> {
        self.swap_to(release_id, deployment_id, "activate")
    }

    fn swap_to(&self, release_id: &str, deployment_id: &str, action: &str) -> R<Swap> {
        manifest::check_release_id(release_id).map_err(StoreError::Refused)?;
        if !(self.release_path(release_id).is_dir() && self.manifest_path(release_id).exists()) {
            return Err(StoreError::NoSuchRelease(release_id.to_string()));
        }
        let from = self.current().map_err(StoreError::io("read", &self.dir))?;
        self.ensure_root()?;
        // Shared paths removed since the release was staged come back before it is switched in.
        let m = self.load_manifest(release_id)?;
        shared::ensure(&self.dir, &m, Owner::of(&m).map_err(StoreError::Refused)?.as_ref())?;
        if from.as_deref() == Some(release_id) {
            return Ok(Swap { from: from.clone(), to: release_id.to_string(), changed: false });
        }
        self.point_current(release_id)?;
        let swap = Swap { from, to: release_id.to_string(), changed: true };
        // Past the rename `current` has switched: a failure to make that durable or to record it
        // puts the old target back, and the error says what `current` is now.
        let recorded = durable::sync_dir(&self.dir)
            .map_err(StoreError::io("sync", &self.dir))
            .and_then(|()| self.journal(deployment_id, action, &swap));
        match recorded {
            Ok(()) => Ok(swap),
            Err(cause) => Err(self.put_back(&swap, cause)),
        }
    }

    /// Replaces `current` with a symlink to `releases/<release_id>`: one rename(2).
    fn point_current(&self, release_id: &str) -> R<()> {
        let tmp = self.dir.join(format!(".current.tmp-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new("releases").join(release_id), &tmp)
            .map_err(StoreError::io("create symlink", &tmp))?;
        failpoint::hit("before-swap-rename");
        fs::rename(&tmp, self.dir.join("current")).map_err(StoreError::io("swap current", &self.dir))
    }

    /// Undoes a switch of `current` that could not be made durable or recorded.
    fn put_back(&self, swap: &Swap, cause: StoreError) -> StoreError {
        let restored = match &swap.from {
            Some(from) => self.point_current(from),
            None => {
                let cur = self.dir.join("current");
                fs::remove_file(&cur).map_err(StoreError::io("remove", &cur))
            }
        };
        let from = swap.from.as_deref().unwrap_or("(none)");
        let to = &swap.to;
        StoreError::Unrecorded(match restored {
            Ok(()) => {
                let _ = durable::sync_dir(&self.dir);
                format!("{cause}; `current` had already switched to {to} and was put back to {from}")
            }
            Err(e) => format!(
                "{cause}; `current` switched to {to} and could not be put back to {from} ({e}): {to} is now the current release of this host"
            ),
        })
    }

    /// Swaps back to `to`, or to the release active before the current one.
    pub fn rollback(&self, to: Option<&str>, deployment_id: &str) -> R<Swap> {
        let target = match to {
            Some(t) => t.to_string(),
            None => self.previous()?.ok_or_else(|| {
                StoreError::Conflict("there is no previous release on this host to roll back to".into())
            })?,
        };
        self.swap_to(&target, deployment_id, "rollback")
    }

    /// The release that was current before the current one, from the journal.
    pub fn previous(&self) -> R<Option<String>> {
        let current = self.current().map_err(StoreError::io("read", &self.dir))?;
        let path = self.dir.join("journal");
        let text = match read_tail(&path, JOURNAL_TAIL) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("read journal", &path)(e)),
        };
        // The journal only grows: its tail (hundreds of the latest swaps) is all this needs.
        for line in text.lines().rev() {
            let Ok(rec) = serde_json::from_str::<JournalRecord>(line) else { continue };
            if Some(&rec.to) == current.as_ref() {
                return Ok(rec.from.filter(|f| self.release_path(f).is_dir()));
            }
        }
        Ok(None)
    }

    fn journal(&self, deployment_id: &str, action: &str, swap: &Swap) -> R<()> {
        let rec = JournalRecord {
            time_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            deployment_id: deployment_id.to_string(),
            action: action.to_string(),
            from: swap.from.clone(),
            to: swap.to.clone(),
        };
        let path = self.dir.join("journal");
        let mut line = serde_json::to_string(&rec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        line.push('\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(&path)
            .map_err(StoreError::io("open journal", &path))?;
        f.write_all(line.as_bytes()).map_err(StoreError::io("write journal", &path))?;
        f.sync_all().map_err(StoreError::io("sync journal", &path))
    }

    /// Keeps the newest `keep` releases, and always `current` and the one before it.
    pub fn prune(&self, keep: usize) -> R<Vec<String>> {
        let releases = self.releases().map_err(StoreError::io("list releases", &self.dir))?;
        let mut removed = Vec::new();
        let mut kept = 0usize;
        for r in releases {
            if r.current || r.previous || kept < keep {
                kept += 1;
                continue;
            }
            // Index entry first: nothing will borrow content from this release any more.
            let m = self.manifest_path(&r.id);
            fs::remove_file(&m).map_err(StoreError::io("remove manifest", &m))?;
            let _ = fs::remove_file(self.signature_path(&r.id));
            durable::sync_dir(&self.manifests_dir()).map_err(StoreError::io("sync", &self.manifests_dir()))?;
            let trash = self.releases_dir().join(format!(".trash-{}", r.id));
            let src = self.release_path(&r.id);
            fs::rename(&src, &trash).map_err(StoreError::io("remove release", &src))?;
            fs::remove_dir_all(&trash).map_err(StoreError::io("remove release", &trash))?;
            removed.push(r.id);
        }
        Ok(removed)
    }

    /// Makes the app's public path a symlink to `<dir>/current` (once; then it never changes).
    fn ensure_root(&self) -> R<()> {
        let Some(root) = &self.root else { return Ok(()) };
        let want = self.dir.join("current");
        match fs::symlink_metadata(root) {
            Ok(meta) if meta.file_type().is_symlink() => {
                if fs::read_link(root).ok().as_deref() == Some(want.as_path()) {
                    return Ok(());
                }
            }
            Ok(_) => {
                return Err(StoreError::Conflict(format!(
                    "the app root {} exists and is not a symlink; move it away so ferry can manage it",
                    root.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("inspect", root)(e)),
        }
        let parent = root.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(parent).map_err(StoreError::io("create", parent))?;
        let tmp = root.with_file_name(format!(".ferry-root.tmp-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&want, &tmp).map_err(StoreError::io("create symlink", &tmp))?;
        fs::rename(&tmp, root).map_err(StoreError::io("replace", root))?;
        durable::sync_dir(parent).map_err(StoreError::io("sync", parent))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct JournalRecord {
    time_unix: u64,
    deployment_id: String,
    action: String,
    from: Option<String>,
    to: String,
}

/// The permission bits a release stores: files lose their write bits (releases are immutable and
/// share inodes through hard links).
fn stored_mode(kind: EntryKind, mode: u32) -> u32 {
    match kind {
        EntryKind::File => mode & 0o7777 & !0o222,
        _ => mode & 0o7777,
    }
}

/// Reads the chunks of this app's committed releases, for peers ([`AppStore::chunk_reader`]).
pub struct ChunkReader {
    idx: Index,
}

impl ChunkReader {
    /// The chunk with this hash, read back and checked against it; `None` when this host does
    /// not keep it (or its copy no longer matches: then it is not served). Blocking.
    pub fn read(&self, hash: &[u8]) -> Option<Vec<u8>> {
        let h = key(hash)?;
        let (kept, offset, len) = self.idx.chunks.get(&h)?;
        let mut data = vec![0u8; usize::try_from(*len).ok()?];
        self.idx.read_at(kept, *offset, &mut data).ok()?;
        (blake3::hash(&data).as_bytes() == &h).then_some(data)
    }
}

/// Receives chunks into a stage: each is written straight into every file of the release that
/// holds it, then recorded in the stage's `received` log.
pub struct Upload {
    files: PathBuf,
    /// (entry index, offset) of every file holding each chunk of the release.
    places: HashMap<[u8; HASH_LEN], Vec<(usize, u64)>>,
    /// The file written last (consecutive chunks mostly go to the same file).
    open: Option<(usize, File)>,
    log: File,
    have: HashSet<[u8; HASH_LEN]>,
    /// The bases this stage offered, by id: the old chunks each concatenates.
    bases: HashMap<[u8; BASIS_ID_LEN], Vec<[u8; HASH_LEN]>>,
    idx: Index,
    /// The basis used last (consecutive chunks of one file share it).
    basis: Option<([u8; BASIS_ID_LEN], Vec<u8>)>,
    pub chunks_received: u64,
    pub bytes_received: u64,
    /// Chunks rebuilt from a basis.
    pub rebuilt: u64,
}

impl Upload {
    /// Whether the stage has received chunk `hash`.
    pub fn has(&self, hash: &[u8]) -> bool {
        key(hash).is_some_and(|h| self.have.contains(&h))
    }

    /// Verifies and stores one chunk. Blocking.
    pub fn put(&mut self, c: &v1::ContentChunk) -> R<()> {
        let h = key(&c.hash).ok_or_else(|| StoreError::Refused("a chunk hash is not 32 bytes".into()))?;
        if !self.places.contains_key(&h) {
            return Err(StoreError::Refused(format!("chunk {} is not part of the prepared release", Hex(&c.hash))));
        }
        if c.raw_length == 0 || c.raw_length > u64::from(CHUNK_MAX) {
            return Err(StoreError::Refused(format!("chunk length {} outside 1..={CHUNK_MAX}", c.raw_length)));
        }
        let raw_len = usize::try_from(c.raw_length).unwrap_or(0);
        let mut data = match v1::Compression::try_from(c.compression) {
            Ok(v1::Compression::None) => c.data.clone(),
            // The capacity bounds the output: a decompression bomb fails instead of growing.
            Ok(v1::Compression::Zstd) => zstd::bulk::decompress(&c.data, raw_len)
                .map_err(|e| StoreError::Corrupt(format!("chunk {}: zstd: {e}", Hex(&c.hash))))?,
            Err(_) => return Err(StoreError::Refused(format!("unknown compression {}", c.compression))),
        };
        if !c.basis.is_empty() {
            let basis = self.basis(&c.basis)?;
            data = ferry_proto::delta::apply(basis, &c.ops, &data, raw_len)
                .map_err(|e| StoreError::Refused(format!("chunk {}: {e}", Hex(&c.hash))))?;
            self.rebuilt += 1;
        }
        if data.len() != raw_len || blake3::hash(&data).as_bytes() != &h {
            return Err(StoreError::Corrupt(format!(
                "chunk {} does not match its hash (or its length {} differs from {})",
                Hex(&c.hash),
                data.len(),
                raw_len
            )));
        }
        self.bytes_received += c.data.len() as u64;
        self.chunks_received += 1;
        if self.have.contains(&h) {
            return Ok(());
        }
        use std::os::unix::fs::FileExt;
        let places = self.places.get(&h).map_or(&[][..], Vec::as_slice);
        for &(n, offset) in places {
            let path = self.files.join(n.to_string());
            let f = match self.open.take() {
                Some((open, f)) if open == n => f,
                _ => OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(&path)
                    .map_err(StoreError::io("create file", &path))?,
            };
            f.write_all_at(&data, offset).map_err(StoreError::io("write", &path))?;
            self.open = Some((n, f));
        }
        // Recorded once it is in every file; made durable, with the files, by Commit's flush.
        self.log.write_all(&h).map_err(StoreError::io("record chunk", &self.files))?;
        self.have.insert(h);
        Ok(())
    }

    /// The bytes of a basis this stage offered.
    fn basis(&mut self, id: &[u8]) -> R<&[u8]> {
        let id: [u8; BASIS_ID_LEN] =
            id.try_into().map_err(|_| StoreError::Refused(format!("basis id {} is not 16 bytes", Hex(id))))?;
        if self.basis.as_ref().is_none_or(|(cached, _)| *cached != id) {
            let chunks = self.bases.get(&id).ok_or_else(|| {
                StoreError::Refused(format!("basis {} was not offered for this stage (prepare again)", Hex(&id)))
            })?;
            let sized: Vec<_> = chunks
                .iter()
                .map(|h| self.idx.chunks.get(h).map(|(_, _, len)| (*h, *len)))
                .collect::<Option<_>>()
                .ok_or_else(|| StoreError::Refused(format!("basis {} is no longer on this host", Hex(&id))))?;
            let bytes = read_basis(&sized, &self.idx)
                .ok_or_else(|| StoreError::Refused(format!("basis {} could not be read", Hex(&id))))?;
            self.basis = Some((id, bytes));
        }
        Ok(self.basis.as_ref().map_or(&[], |(_, b)| b.as_slice()))
    }
}

/// Names a basis by the old chunks it concatenates.
fn basis_id<'a>(chunks: impl Iterator<Item = &'a [u8; HASH_LEN]>) -> [u8; BASIS_ID_LEN] {
    let mut h = blake3::Hasher::new();
    for c in chunks {
        h.update(c);
    }
    let mut id = [0u8; BASIS_ID_LEN];
    id.copy_from_slice(&h.finalize().as_bytes()[..BASIS_ID_LEN]);
    id
}

/// Reads old chunks from the releases that hold them, concatenated; None if one cannot be read
/// (a basis is an optimisation: without it the chunk is sent whole).
fn read_basis(chunks: &[([u8; HASH_LEN], u64)], idx: &Index) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(chunks.iter().map(|(_, l)| *l as usize).sum());
    for (h, _) in chunks {
        let (kept, offset, len) = idx.chunks.get(h)?;
        let start = out.len();
        out.resize(start + usize::try_from(*len).ok()?, 0);
        idx.read_at(kept, *offset, &mut out[start..]).ok()?;
    }
    Some(out)
}

/// A basis as a stage records it: its id and the old chunks it concatenates.
type StagedBasis = ([u8; BASIS_ID_LEN], Vec<[u8; HASH_LEN]>);

/// The bases recorded in a stage: `<id hex> <chunk hex>...` per line.
fn read_bases(stage: &Path) -> R<Vec<StagedBasis>> {
    let p = stage.join("bases");
    let text = match fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("read staging bases", &p)(e)),
    };
    let corrupt = || StoreError::Corrupt(format!("{}: unreadable line", p.display()));
    text.lines()
        .map(|line| {
            let mut words = line.split(' ');
            let id =
                words.next().and_then(|w| hex::decode(w).ok()).and_then(|b| b.try_into().ok()).ok_or_else(corrupt)?;
            let chunks =
                words.map(|w| hex::decode(w).ok().and_then(|b| key(&b)).ok_or_else(corrupt)).collect::<R<Vec<_>>>()?;
            Ok((id, chunks))
        })
        .collect()
}

fn check_stop(stop: Option<&CancellationToken>) -> R<()> {
    match stop {
        Some(s) if s.is_cancelled() => Err(StoreError::Stopping("building the release")),
        _ => Ok(()),
    }
}

/// Completes a new file of the release in staging: the chunks that were not uploaded (the host
/// had them) are copied in from kept releases, then the whole file is read back and must hash
/// to the manifest's hash before it gets its mode. Nothing half-written passes: a file an upload
/// cut short, or one changed on disk, fails here.
fn finish_file(
    path: &Path,
    e: &v1::Entry,
    mode: u32,
    idx: &Index,
    received: &HashSet<[u8; HASH_LEN]>,
    stop: Option<&CancellationToken>,
) -> R<()> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(StoreError::io("create file", path))?;
    let mut buf = Vec::with_capacity(CHUNK_MAX as usize);
    let mut offset = 0u64;
    for c in &e.chunks {
        check_stop(stop)?;
        let h = key(&c.hash).ok_or_else(|| StoreError::Refused(format!("{}: bad chunk hash", e.path)))?;
        if !received.contains(&h) {
            let (src, at, len) = idx.chunks.get(&h).ok_or(StoreError::Incomplete(1))?;
            buf.resize(usize::try_from(*len).unwrap_or(0), 0);
            idx.read_at(src, *at, &mut buf)?;
            if buf.len() as u64 != c.length || blake3::hash(&buf).as_bytes() != &h {
                return Err(StoreError::Corrupt(format!("{}: a kept chunk's content does not match its hash", e.path)));
            }
            f.write_all_at(&buf, offset).map_err(StoreError::io("write", path))?;
        }
        offset += c.length;
    }
    f.set_len(e.size).map_err(StoreError::io("write", path))?;
    let mut hasher = blake3::Hasher::new();
    let mut reader = io::BufReader::with_capacity(CHUNK_MAX as usize, &f);
    reader.seek(SeekFrom::Start(0)).map_err(StoreError::io("read", path))?;
    let read = io::copy(&mut reader, &mut hasher).map_err(StoreError::io("read", path))?;
    if read != e.size || hasher.finalize().as_bytes().as_slice() != e.hash.as_slice() {
        return Err(StoreError::Corrupt(format!("{}: the assembled file does not match its hash", e.path)));
    }
    // Made durable by the syncfs that precedes promotion.
    f.set_permissions(fs::Permissions::from_mode(mode)).map_err(StoreError::io("set mode", path))
}

/// Where each chunk goes: (entry index, offset) of every file that holds it.
fn places(m: &v1::Manifest) -> HashMap<[u8; HASH_LEN], Vec<(usize, u64)>> {
    let mut places: HashMap<[u8; HASH_LEN], Vec<(usize, u64)>> = HashMap::new();
    for (n, e) in m.entries.iter().enumerate().filter(|(_, e)| e.kind == EntryKind::File as i32) {
        let mut offset = 0;
        for c in &e.chunks {
            if let Some(h) = key(&c.hash) {
                places.entry(h).or_default().push((n, offset));
            }
            offset += c.length;
        }
    }
    places
}

/// Gives every entry of a freshly built tree (and the tree) to the app's group, root staying the
/// owner: the app reads what the modes let a group read, and can change nothing. Reused files
/// are hard links, so this also sets the group of the kept releases that share them (releases of
/// the same app).
fn give_group(tree: &Path, m: &v1::Manifest, o: &Owner) -> R<()> {
    let chown =
        |p: &Path| std::os::unix::fs::lchown(p, Some(0), Some(o.gid.as_raw())).map_err(StoreError::io("set group", p));
    chown(tree)?;
    for e in m.entries.iter().filter(|e| !manifest::is_shared(e)) {
        chown(&tree.join(&e.path))?;
    }
    for r in &m.rendered {
        chown(&tree.join(&r.path))?;
    }
    Ok(())
}

/// Checks every manifest entry exists in the tree with the right kind and size.
fn verify_tree(tree: &Path, m: &v1::Manifest) -> R<()> {
    for e in &m.entries {
        let p = tree.join(&e.path);
        let meta = fs::symlink_metadata(&p)
            .map_err(|_| StoreError::Corrupt(format!("{} is missing after staging", e.path)))?;
        let ok = match EntryKind::try_from(e.kind).unwrap_or(EntryKind::Unspecified) {
            EntryKind::File => meta.is_file() && meta.len() == e.size,
            EntryKind::Dir => meta.is_dir(),
            EntryKind::Symlink | EntryKind::SharedDir | EntryKind::SharedFile => meta.file_type().is_symlink(),
            EntryKind::Unspecified => false,
        };
        if !ok {
            return Err(StoreError::Corrupt(format!("{} does not match the manifest after staging", e.path)));
        }
    }
    Ok(())
}

/// How much of the journal's end `previous` reads.
const JOURNAL_TAIL: u64 = 64 * 1024;

/// The last `max` bytes of a file, starting at a line boundary.
fn read_tail(path: &Path, max: u64) -> io::Result<String> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(match (start, text.find('\n')) {
        (0, _) => text,
        (_, Some(nl)) => text[nl + 1..].to_string(),
        (_, None) => String::new(),
    })
}

fn read_names(dir: &Path) -> R<Vec<String>> {
    match fs::read_dir(dir) {
        Ok(d) => {
            let mut names = Vec::new();
            for e in d {
                let e = e.map_err(StoreError::io("list", dir))?;
                names.push(e.file_name().to_string_lossy().into_owned());
            }
            Ok(names)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StoreError::io("list", dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previous_reads_only_the_journal_tail() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = AppStore::new(tmp.path().to_owned());
        store.ensure_dirs().expect("dirs");
        for id in ["1-00000001", "2-00000002"] {
            fs::create_dir(store.release_path(id)).expect("release");
        }
        std::os::unix::fs::symlink("releases/2-00000002", tmp.path().join("current")).expect("current");
        // A long history: far more than the tail that is read.
        let mut journal = String::new();
        for i in 0..5000 {
            journal.push_str(&format!(
                "{{\"time_unix\":{i},\"deployment_id\":\"d\",\"action\":\"activate\",\"from\":\"0-0000000{}\",\"to\":\"9-00000009\"}}\n",
                i % 10
            ));
        }
        journal.push_str("{\"time_unix\":1,\"deployment_id\":\"d\",\"action\":\"activate\",\"from\":\"1-00000001\",\"to\":\"2-00000002\"}\n");
        fs::write(tmp.path().join("journal"), &journal).expect("journal");
        assert!(journal.len() as u64 > JOURNAL_TAIL);
        assert_eq!(store.previous().expect("previous").as_deref(), Some("1-00000001"));
    }

    #[test]
    fn version_is_the_id_without_its_hash() {
        assert_eq!(version_of("1.4.0-3f2a9c1d"), "1.4.0");
        assert_eq!(version_of("1.4.0-rc1-3f2a9c1d"), "1.4.0-rc1");
        assert_eq!(version_of("plain"), "plain");
    }

    #[test]
    fn tail_starts_at_a_line_boundary() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("f");
        fs::write(&p, "aaaa\nbbbb\ncccc\n").expect("write");
        assert_eq!(read_tail(&p, 7).expect("tail"), "cccc\n");
        assert_eq!(read_tail(&p, 100).expect("tail"), "aaaa\nbbbb\ncccc\n");
    }
}
