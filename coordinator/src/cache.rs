//! What `ferry` remembers between runs, in its cache directory (`cache_dir` in fleet.toml). Every
//! file here is an optimisation: delete any of it at any time and the next run is only slower.
//!
//! - `manifests/<release id>.manifest`: the manifests ferry sent. When a host runs one of them,
//!   the next deploy sends only the changes (a `ManifestDelta`); the agent rebuilds the manifest
//!   from its own copy and checks it against the full manifest hash.
//! - `scan/<hash of the artifact path>.scan`: for each file of a directory artifact, its identity
//!   and change times (device, inode, size, mtime, ctime) with its hash and chunks, so a rescan
//!   reads only the files that changed, as git's index does. Any write to a file sets its ctime to
//!   the current time and no user can set a ctime, so an unchanged stat means unchanged content.
//!   A file changed less than a second before it was scanned is not remembered (its timestamps
//!   could still be equal after a later write in the same clock tick).
//! - `extracted/<hash of the archive's path and stat>/`: the tree of a `.tar`/`.tar.gz`/`.tar.zst`
//!   artifact as ferry extracted it, while the archive's stat (device, inode, size, mtime, ctime)
//!   is unchanged: a redeploy of the same archive neither extracts nor hashes it again (the tree's
//!   files are vouched for by their own scan records, like a directory's). An archive changed less
//!   than a second before it is scanned is extracted to a temporary directory instead. The newest
//!   [`KEEP_TREES`] trees are kept.
//!
//! Writes go to a temporary file renamed into place, so a reader never sees half a file; a file
//! that does not decode is ignored. Each directory keeps its newest [`KEEP`] files.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ferry_proto::manifest;
use ferry_proto::v1;
use prost::Message;

/// Files kept per cache directory.
const KEEP: usize = 64;
/// Extracted archives kept.
pub const KEEP_TREES: usize = 4;

/// The cached stat and content of one file of a directory artifact.
#[derive(Clone, PartialEq, Message)]
pub struct ScanRecord {
    #[prost(string, tag = "1")]
    pub path: String,
    #[prost(uint64, tag = "2")]
    pub dev: u64,
    #[prost(uint64, tag = "3")]
    pub ino: u64,
    #[prost(uint64, tag = "4")]
    pub size: u64,
    #[prost(int64, tag = "5")]
    pub mtime_ns: i64,
    #[prost(int64, tag = "6")]
    pub ctime_ns: i64,
    #[prost(uint32, tag = "7")]
    pub mode: u32,
    #[prost(bytes = "vec", tag = "8")]
    pub hash: Vec<u8>,
    #[prost(message, repeated, tag = "9")]
    pub chunks: Vec<v1::Chunk>,
}

#[derive(Clone, PartialEq, Message)]
struct ScanFile {
    #[prost(message, repeated, tag = "1")]
    records: Vec<ScanRecord>,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn new(dir: PathBuf) -> Cache {
        Cache { dir }
    }

    fn manifest_path(&self, release_id: &str) -> Option<PathBuf> {
        manifest::check_release_id(release_id).ok()?;
        Some(self.dir.join("manifests").join(format!("{release_id}.manifest")))
    }

    /// The manifest of a release ferry sent earlier, if it is cached and still hashes to the id.
    pub fn manifest(&self, release_id: &str) -> Option<v1::Manifest> {
        let bytes = std::fs::read(self.manifest_path(release_id)?).ok()?;
        let m = v1::Manifest::decode(bytes.as_slice()).ok()?;
        let (version, _) = release_id.rsplit_once('-')?;
        (manifest::release_id(version, &manifest::hash(&m)) == release_id).then_some(m)
    }

    /// Remembers a manifest ferry is about to send.
    pub fn save_manifest(&self, release_id: &str, m: &v1::Manifest) {
        if let Some(path) = self.manifest_path(release_id)
            && !path.exists()
        {
            self.write(&path, &m.encode_to_vec());
        }
    }

    fn scan_path(&self, artifact: &Path) -> PathBuf {
        let abs = std::fs::canonicalize(artifact).unwrap_or_else(|_| artifact.to_owned());
        let key = blake3::hash(abs.as_os_str().as_encoded_bytes()).to_hex();
        self.dir.join("scan").join(format!("{}.scan", &key[..16]))
    }

    /// What the last scan of this directory learnt, by relative path.
    pub fn scan_records(&self, artifact: &Path) -> HashMap<String, ScanRecord> {
        let Ok(bytes) = std::fs::read(self.scan_path(artifact)) else { return HashMap::new() };
        ScanFile::decode(bytes.as_slice())
            .map(|f| f.records.into_iter().map(|r| (r.path.clone(), r)).collect())
            .unwrap_or_default()
    }

    pub fn save_scan(&self, artifact: &Path, records: Vec<ScanRecord>) {
        self.write(&self.scan_path(artifact), &ScanFile { records }.encode_to_vec());
    }

    fn trees_dir(&self) -> PathBuf {
        self.dir.join("extracted")
    }

    /// Where the tree of `archive` (whose metadata is `meta`) is kept; None while the archive is
    /// changing (changed less than a second ago).
    fn tree_path(&self, archive: &Path, meta: &std::fs::Metadata) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        let (mtime, ctime) = (ns(meta.mtime(), meta.mtime_nsec()), ns(meta.ctime(), meta.ctime_nsec()));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos() as i64;
        if mtime.max(ctime) > now - 1_000_000_000 {
            return None;
        }
        let abs = std::fs::canonicalize(archive).unwrap_or_else(|_| archive.to_owned());
        let mut h = blake3::Hasher::new();
        h.update(abs.as_os_str().as_encoded_bytes());
        for n in [meta.dev() as i64, meta.ino() as i64, meta.size() as i64, mtime, ctime] {
            h.update(&n.to_le_bytes());
        }
        Some(self.trees_dir().join(&h.finalize().to_hex()[..32]))
    }

    /// The tree of `archive` (whose metadata is `meta`) kept in the cache: the one ferry extracted
    /// earlier while the archive is unchanged, else a new one `extract` fills. With it, a
    /// temporary directory to keep alive for as long as the tree is read when it could not be
    /// kept. None while the archive is changing (changed less than a second ago) or when the
    /// cache has no room for a tree: the caller extracts elsewhere.
    pub fn archive_tree<E>(
        &self,
        archive: &Path,
        meta: &std::fs::Metadata,
        extract: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<Option<(PathBuf, Option<tempfile::TempDir>)>, E> {
        let Some(tree) = self.tree_path(archive, meta) else { return Ok(None) };
        if let Ok(dir) = std::fs::File::open(&tree)
            && dir.metadata().is_ok_and(|m| m.is_dir())
        {
            // Its mtime says how recently it was used (the oldest go first).
            let _ = dir.set_modified(std::time::SystemTime::now());
            return Ok(Some((tree, None)));
        }
        // Extracted beside it, on the cache's filesystem, then renamed into place.
        let trees = self.trees_dir();
        let Some(tmp) = std::fs::create_dir_all(&trees)
            .ok()
            .and_then(|()| tempfile::Builder::new().prefix(".tmp-").tempdir_in(&trees).ok())
        else {
            return Ok(None);
        };
        extract(tmp.path())?;
        match std::fs::rename(tmp.path(), &tree) {
            Ok(()) => {
                // Renamed away: nothing is left for the TempDir to remove.
                let _ = tmp.keep();
                prune_trees(&trees, KEEP_TREES);
                Ok(Some((tree, None)))
            }
            // Another run kept the same tree meanwhile.
            Err(_) if tree.is_dir() => Ok(Some((tree, None))),
            Err(e) => {
                tracing::warn!(path = %tree.display(), error = %e, "cannot keep the extracted archive in the cache");
                Ok(Some((tmp.path().to_owned(), Some(tmp))))
            }
        }
    }

    /// Writes a cache file; a failure only costs the next run some time, so it is logged.
    fn write(&self, path: &Path, bytes: &[u8]) {
        let Some(dir) = path.parent() else { return };
        let tmp = dir.join(format!(".tmp-{}", std::process::id()));
        let result = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(path = %path.display(), error = %e, "cannot write to the cache; the next run will be slower");
            return;
        }
        prune(dir, KEEP);
    }
}

/// Keeps the `keep` most recently used trees of `dir`, and removes extractions a killed run left
/// (`.tmp-*` older than a day).
fn prune_trees(dir: &Path, keep: usize) {
    let Ok(read) = std::fs::read_dir(dir) else { return };
    let day_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
    let mut trees = Vec::new();
    for e in read.filter_map(|e| e.ok()) {
        let Some(modified) = e.metadata().ok().and_then(|m| m.modified().ok()) else { continue };
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            if modified < day_ago {
                let _ = std::fs::remove_dir_all(e.path());
            }
        } else {
            trees.push((modified, e.path()));
        }
    }
    trees.sort_by_key(|t| std::cmp::Reverse(t.0));
    for (_, p) in trees.into_iter().skip(keep) {
        let _ = std::fs::remove_dir_all(p);
    }
}

/// Keeps the `keep` newest files of `dir`.
fn prune(dir: &Path, keep: usize) {
    let Ok(read) = std::fs::read_dir(dir) else { return };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> =
        read.filter_map(|e| e.ok()).filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path()))).collect();
    if files.len() <= keep {
        return;
    }
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (_, p) in files.into_iter().skip(keep) {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_manifest_must_still_hash_to_its_id() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new(tmp.path().to_owned());
        let m = v1::Manifest {
            entries: vec![v1::Entry {
                path: "a".into(),
                kind: v1::EntryKind::Dir as i32,
                mode: 0o755,
                ..Default::default()
            }],
            ..Default::default()
        };
        let id = manifest::release_id("1", &manifest::hash(&m));
        assert_eq!(cache.manifest(&id), None, "nothing cached yet");
        cache.save_manifest(&id, &m);
        assert_eq!(cache.manifest(&id), Some(m.clone()));
        // Another release's manifest stored under this id is not believed.
        let mut other = m.clone();
        other.entries[0].mode = 0o700;
        let path = tmp.path().join("manifests").join(format!("{id}.manifest"));
        std::fs::write(&path, other.encode_to_vec()).expect("write");
        assert_eq!(cache.manifest(&id), None);
        std::fs::write(&path, b"garbage").expect("write");
        assert_eq!(cache.manifest(&id), None);
        assert_eq!(cache.manifest("../etc/passwd"), None);
    }

    #[test]
    fn prune_keeps_the_newest() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for i in 0..5 {
            let p = tmp.path().join(format!("f{i}"));
            std::fs::write(&p, b"x").expect("write");
            let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + i);
            std::fs::File::options().write(true).open(&p).and_then(|f| f.set_modified(t)).expect("mtime");
        }
        prune(tmp.path(), 2);
        let mut left: Vec<_> =
            std::fs::read_dir(tmp.path()).expect("list").map(|e| e.expect("entry").file_name()).collect();
        left.sort();
        assert_eq!(left, ["f3", "f4"]);
    }
}
