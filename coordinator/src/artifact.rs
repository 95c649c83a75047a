//! Artifacts: a build output (a directory, or a `.tar`, `.tar.gz` or `.tar.zst` archive) scanned
//! into a manifest, and the source of the content chunks that hosts lack.
//!
//! Archives are extracted into a private temporary directory first, entry by entry, refusing
//! anything the manifest rules would refuse (absolute paths, `..`, paths through symlinks,
//! devices, hard links, duplicates) before a byte lands on disk; a truncated archive is an error
//! naming the file. Every file is cut into content-defined chunks (FastCDC, parameters in
//! `ferry_proto::manifest`) so a small change in a large file costs only the changed chunks.
//!
//! Files are hashed on every core. A directory artifact's files whose stat is unchanged since the
//! last scan are not read again (see [`crate::cache`]).
//!
//! The app's [`Layout`] (`[app]` shared paths, user and group) is part of the release: it is
//! applied to the scanned manifest, so it counts in the manifest hash and the release id, and a
//! rollback goes back to the layout the old release had.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ferry_proto::manifest::{self, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, HASH_LEN};
use ferry_proto::v1::{self, EntryKind};

use crate::cache::{Cache, ScanRecord};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("artifact {artifact}: {entry:?}: {reason}")]
    Refused { artifact: PathBuf, entry: String, reason: String },
    /// The build does not fit the app's layout (`[app] shared`, `shared_files`).
    #[error("artifact {artifact}: {reason}")]
    Layout { artifact: PathBuf, reason: String },
    #[error("artifact {artifact}: {source}")]
    Manifest {
        artifact: PathBuf,
        #[source]
        source: manifest::ManifestError,
    },
    #[error("artifact {0} is empty: nothing to deploy")]
    Empty(PathBuf),
    /// Scanned again for a recorded release, it no longer hashes to it.
    #[error(
        "artifact {artifact} changed since it was recorded as release {release} (its manifest no longer hashes to it: the build changed, or [app] shared, shared_files, user or group did); deploy it as a new version"
    )]
    Changed { artifact: PathBuf, release: String },
    #[error("artifact {artifact}: the scan stopped: {reason}")]
    Aborted { artifact: PathBuf, reason: String },
    #[error(
        "artifact {artifact} extracts to more than max_artifact_bytes ({limit} bytes), at {entry:?}: refused (a decompression bomb, or raise max_artifact_bytes in fleet.toml)"
    )]
    TooLarge { artifact: PathBuf, entry: String, limit: u64 },
}

/// How a build becomes a release of the app (`[app]` in fleet.toml): its shared paths and its
/// owner. The default changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Shared paths, each with whether it is a directory.
    pub shared: Vec<(String, bool)>,
    pub user: String,
    pub group: String,
    /// Files rendered on each host at staging.
    pub rendered: Vec<v1::Rendered>,
    /// The environment's values, sorted by name; `None` outside an environment (a version
    /// registered with `ferry serve`, checked for everything but its values).
    pub vars: Option<Vec<v1::Var>>,
    /// Names of the environment's secrets (sorted); their values never enter the manifest.
    pub secrets: Vec<String>,
    /// The environment's hosts (each must have every label a template uses).
    pub hosts: Vec<String>,
}

/// Modes of what a layout adds.
const SHARED_DIR_MODE: u32 = 0o750;
const SHARED_FILE_MODE: u32 = 0o640;
const PARENT_DIR_MODE: u32 = 0o755;

impl Layout {
    /// What is the same in every environment: shared paths, owner, templates (no values).
    pub fn of(app: &crate::config::AppConfig) -> Layout {
        let rendered = app
            .templates
            .iter()
            .map(|t| v1::Rendered {
                path: t.path.clone(),
                template: t.template.clone(),
                text: String::new(),
                mode: t.mode,
                env_file: false,
            })
            .collect();
        Layout {
            shared: app.shared_paths().map(|(p, dir)| (p.to_string(), dir)).collect(),
            user: app.user.clone().unwrap_or_default(),
            group: app.group.clone().unwrap_or_default(),
            rendered,
            vars: None,
            secrets: Vec::new(),
            hosts: Vec::new(),
        }
    }

    /// The whole layout of a release for environment `env`: with its vars and environment file.
    pub fn for_env(config: &crate::config::FleetConfig, env: &str) -> Layout {
        let mut layout = Layout::of(&config.app);
        let Some(e) = config.environments.get(env) else { return layout };
        let mut vars = vec![v1::Var { name: "env".into(), value: env.to_string() }];
        vars.extend(e.vars.iter().map(|(k, v)| v1::Var { name: format!("vars.{k}"), value: v.clone() }));
        for (host, labels) in &e.labels {
            vars.extend(
                labels.iter().map(|(k, v)| v1::Var { name: ferry_proto::render::label_var(host, k), value: v.clone() }),
            );
        }
        layout.hosts = e.hosts.keys().cloned().collect();
        vars.sort_by(|a, b| a.name.cmp(&b.name));
        layout.secrets = e.secrets.keys().filter(|n| config.app.reads_secret(n)).cloned().collect();
        if let Some(path) = &config.app.env_file {
            let escape = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
            let text: String = e.env.iter().map(|(k, v)| format!("{k}=\"{}\"\n", escape(v))).collect();
            layout.rendered.push(v1::Rendered {
                path: path.clone(),
                template: String::new(),
                text,
                mode: 0o640,
                env_file: true,
            });
        }
        // Values count only where something is rendered with them: an app without templates keeps
        // the release id of its build.
        layout.vars = Some(if layout.rendered.is_empty() { Vec::new() } else { vars });
        layout
    }

    /// Checks the placeholders of every template (read from the scanned tree at `root`): well
    /// formed, and each with a value in this environment (outside one, only the form).
    fn check_templates(&self, root: &Path) -> Result<(), String> {
        for r in &self.rendered {
            let (text, source) = if r.template.is_empty() {
                (r.text.clone(), format!("the environment file {}", r.path))
            } else {
                let text = ferry_proto::render::read_template(&root.join(&r.template), &r.template)
                    .map_err(|e| format!("{e} ([app.templates] in fleet.toml)"))?;
                (text, format!("template {:?}", r.template))
            };
            let names = ferry_proto::render::names(&text).map_err(|e| format!("{source}, {e}"))?;
            let Some(vars) = &self.vars else { continue };
            let env = vars.iter().find(|v| v.name == "env").map_or("", |v| v.value.as_str());
            for (name, line) in names {
                if let Some(label) = name.strip_prefix("labels.") {
                    let lacking: Vec<&str> = self
                        .hosts
                        .iter()
                        .filter(|h| !vars.iter().any(|v| v.name == ferry_proto::render::label_var(h, label)))
                        .map(String::as_str)
                        .collect();
                    if !lacking.is_empty() {
                        return Err(format!(
                            "{source}, line {line}: {{{{ {name} }}}}: host(s) {} of environment {env} have no label {label:?} (set [environments.{env}.labels])",
                            lacking.join(", ")
                        ));
                    }
                    continue;
                }
                let secret = name.strip_prefix("secrets.").is_some_and(|s| self.secrets.iter().any(|n| n == s));
                if !ferry_proto::render::AGENT_VALUES.contains(&name) && !vars.iter().any(|v| v.name == name) && !secret
                {
                    let secrets: Vec<String> = self.secrets.iter().map(|n| format!("secrets.{n}")).collect();
                    let known: Vec<&str> = ferry_proto::render::AGENT_VALUES
                        .iter()
                        .copied()
                        .chain(vars.iter().map(|v| v.name.as_str()))
                        .chain(secrets.iter().map(String::as_str))
                        .collect();
                    return Err(format!(
                        "{source}, line {line}: {{{{ {name} }}}} has no value in environment {env} (set [environments.{env}.vars]; known: {})",
                        known.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }

    /// Adds the shared paths (and the directories leading to them) and the owner to a scanned
    /// manifest. Refuses a build that ships anything at or under a shared path, or has a file or
    /// symlink where a shared path's directory must be.
    fn apply(&self, m: &mut v1::Manifest) -> Result<(), String> {
        if *self == Layout::default() {
            return Ok(());
        }
        let mut by_path: BTreeMap<String, v1::Entry> = m.entries.drain(..).map(|e| (e.path.clone(), e)).collect();
        for (path, dir) in &self.shared {
            let key = if *dir { "shared" } else { "shared_files" };
            let under = format!("{path}/");
            // Named by what it holds, if anything: that is what to leave out.
            let shipped = by_path
                .range(under.clone()..)
                .next()
                .filter(|(p, _)| p.starts_with(&under))
                .or_else(|| by_path.get_key_value(path.as_str()));
            if let Some((shipped, _)) = shipped {
                return Err(format!(
                    "it ships {shipped:?}, {} the shared path {path:?} ([app] {key} in fleet.toml): shared paths live on each host, outside the releases, and survive deploys and rollbacks; leave {shipped:?} out of the build",
                    if shipped == path { "which is" } else { "inside" }
                ));
            }
            let mut parent = String::new();
            for part in path.split('/').collect::<Vec<_>>().iter().rev().skip(1).rev() {
                parent = if parent.is_empty() { part.to_string() } else { format!("{parent}/{part}") };
                match by_path.get(&parent) {
                    Some(e) if e.kind == EntryKind::Dir as i32 => {}
                    Some(_) => {
                        return Err(format!(
                            "{parent:?} is not a directory in the build, so the shared path {path:?} cannot lie under it"
                        ));
                    }
                    None => {
                        let e = v1::Entry {
                            path: parent.clone(),
                            kind: EntryKind::Dir as i32,
                            mode: PARENT_DIR_MODE,
                            ..Default::default()
                        };
                        by_path.insert(parent.clone(), e);
                    }
                }
            }
            let (kind, mode) =
                if *dir { (EntryKind::SharedDir, SHARED_DIR_MODE) } else { (EntryKind::SharedFile, SHARED_FILE_MODE) };
            by_path
                .insert(path.clone(), v1::Entry { path: path.clone(), kind: kind as i32, mode, ..Default::default() });
        }
        m.entries = by_path.into_values().collect();
        m.user = self.user.clone();
        m.group = self.group.clone();
        m.rendered = self.rendered.clone();
        m.vars = self.vars.clone().unwrap_or_default();
        m.secrets = self.secrets.clone();
        Ok(())
    }
}

/// Scans `path` off the async threads (hashing is CPU and disk work) as a release of `layout`;
/// an archive may extract to at most `max_bytes`.
pub async fn scan(
    path: &Path,
    cache: Option<&Cache>,
    layout: &Layout,
    max_bytes: u64,
) -> Result<Artifact, ArtifactError> {
    let (owned, cache, layout) = (path.to_owned(), cache.cloned(), layout.clone());
    tokio::task::spawn_blocking(move || Artifact::scan_for(&owned, cache.as_ref(), &layout, max_bytes))
        .await
        .map_err(|e| ArtifactError::Aborted { artifact: path.to_owned(), reason: e.to_string() })?
}

/// What a recorded hash is the hash of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The build alone (a version registered with `ferry serve`).
    Build,
    /// The release: the build with the app's layout (a deployment).
    Release,
}

/// Scans again an artifact recorded as `release` with hash `hash` (hex, of `what`): it must
/// still be exactly that content.
pub async fn rescan(
    path: &Path,
    cache: Option<&Cache>,
    layout: &Layout,
    max_bytes: u64,
    release: &str,
    (what, hash): (Recorded, &str),
) -> Result<Artifact, ArtifactError> {
    let artifact = scan(path, cache, layout, max_bytes).await?;
    let found = if what == Recorded::Build { artifact.build_hash } else { artifact.manifest_hash };
    if hex::encode(found) != hash {
        return Err(ArtifactError::Changed { artifact: path.to_owned(), release: release.to_string() });
    }
    Ok(artifact)
}

/// Where a chunk's bytes are: a file of the artifact tree, an offset and a length.
#[derive(Debug, Clone)]
struct ChunkLoc {
    file: PathBuf,
    offset: u64,
    length: u64,
}

/// A scanned artifact.
pub struct Artifact {
    pub source: PathBuf,
    /// The hash of the build alone (before the app's layout): what a registered version is.
    pub build_hash: [u8; HASH_LEN],
    /// The environment's secrets, fetched for this deployment ([`Artifact::with_secrets`]); they
    /// travel with the release to each host's activation, never in its manifest.
    pub secrets: std::sync::Arc<crate::secrets::Secrets>,
    pub manifest: v1::Manifest,
    pub manifest_hash: [u8; HASH_LEN],
    pub total_bytes: u64,
    chunks: HashMap<[u8; HASH_LEN], ChunkLoc>,
    /// Holds the extracted tree of an archive alive for as long as chunks are read from it.
    _extracted: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Artifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifact")
            .field("source", &self.source)
            .field("entries", &self.manifest.entries.len())
            .field("total_bytes", &self.total_bytes)
            .finish_non_exhaustive()
    }
}

impl Artifact {
    /// Scans a directory or archive. Blocking (reads and hashes every byte that the cache does
    /// not vouch for): call it from `spawn_blocking` in async code.
    pub fn scan(path: &Path, cache: Option<&Cache>) -> Result<Artifact, ArtifactError> {
        Self::scan_within(path, cache, u64::MAX)
    }

    /// [`Artifact::scan`], refusing an archive that extracts to more than `max_bytes`.
    pub fn scan_within(path: &Path, cache: Option<&Cache>, max_bytes: u64) -> Result<Artifact, ArtifactError> {
        Self::scan_for(path, cache, &Layout::default(), max_bytes)
    }

    /// [`Artifact::scan_within`], as a release of the app's `layout`.
    pub fn scan_for(
        path: &Path,
        cache: Option<&Cache>,
        layout: &Layout,
        max_bytes: u64,
    ) -> Result<Artifact, ArtifactError> {
        let started = std::time::SystemTime::now();
        let io = |source| ArtifactError::Io { path: path.to_owned(), source };
        let meta = std::fs::metadata(path).map_err(io)?;
        // An archive's tree: kept in the cache while the archive is unchanged (see `cache`), else
        // extracted to a temporary directory.
        let (root, extracted) = if meta.is_dir() {
            (path.to_owned(), None)
        } else {
            let kept = match cache {
                Some(c) => c.archive_tree(path, &meta, |dir| extract(path, dir, max_bytes))?,
                None => None,
            };
            match kept {
                Some(tree) => tree,
                None => {
                    let dir = tempfile::Builder::new().prefix("ferry-artifact-").tempdir().map_err(io)?;
                    extract(path, dir.path(), max_bytes)?;
                    (dir.path().to_owned(), Some(dir))
                }
            }
        };
        let mut entries = Vec::new();
        walk(path, &root, "", &mut entries)?;
        if entries.is_empty() {
            return Err(ArtifactError::Empty(path.to_owned()));
        }
        entries.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        // A temporary extraction is new on every run: nothing vouches for its content. A tree kept in
        // the cache is ferry's own extraction, hashed as soon as it was written: its files are
        // remembered however recently they were written.
        let cache = cache.filter(|_| extracted.is_none());
        let cached_tree = !meta.is_dir() && cache.is_some();
        let known = cache.map(|c| c.scan_records(path)).unwrap_or_default();
        let mut todo = Vec::new();
        for (i, (entry, file)) in entries.iter_mut().enumerate() {
            let Some(file) = file else { continue };
            match known.get(&entry.path).filter(|r| file.stat.vouches_for(r)) {
                Some(r) => {
                    entry.hash = r.hash.clone();
                    entry.chunks = r.chunks.clone();
                }
                None => todo.push(i),
            }
        }
        let hashed = hash_files(path, &entries, &todo)?;
        for (i, (hash, chunks, size)) in todo.into_iter().zip(hashed) {
            let entry = &mut entries[i].0;
            // The size is what was read, not what stat said before (the file may be growing).
            (entry.hash, entry.chunks, entry.size) = (hash, chunks, size);
        }
        let mut chunks = HashMap::new();
        let mut manifest = v1::Manifest::default();
        let mut records = Vec::new();
        // Timestamps this close to the scan could still hide a write in the same clock tick.
        let settled = started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64) - 1_000_000_000;
        for (entry, file) in entries {
            if let Some(file) = file {
                let mut offset = 0;
                for c in &entry.chunks {
                    if let Ok(h) = <[u8; HASH_LEN]>::try_from(c.hash.as_slice()) {
                        chunks.entry(h).or_insert_with(|| ChunkLoc {
                            file: file.path.clone(),
                            offset,
                            length: c.length,
                        });
                    }
                    offset += c.length;
                }
                let remember = cached_tree || (file.stat.mtime_ns < settled && file.stat.ctime_ns < settled);
                if remember && file.stat.size == entry.size {
                    records.push(file.stat.record(&entry));
                }
            }
            manifest.entries.push(entry);
        }
        if let Some(cache) = cache {
            cache.save_scan(path, records);
        }
        // A tree extracted earlier, under another max_artifact_bytes, still keeps to this one.
        if !meta.is_dir() && manifest::total_bytes(&manifest) > max_bytes {
            return Err(ArtifactError::TooLarge {
                artifact: path.to_owned(),
                entry: "(all of it)".into(),
                limit: max_bytes,
            });
        }
        let build_hash = manifest::hash(&manifest);
        layout
            .apply(&mut manifest)
            .and_then(|()| layout.check_templates(&root))
            .map_err(|reason| ArtifactError::Layout { artifact: path.to_owned(), reason })?;
        manifest::validate(&manifest)
            .map_err(|source| ArtifactError::Manifest { artifact: path.to_owned(), source })?;
        Ok(Artifact {
            source: path.to_owned(),
            build_hash,
            secrets: Default::default(),
            manifest_hash: manifest::hash(&manifest),
            total_bytes: manifest::total_bytes(&manifest),
            manifest,
            chunks,
            _extracted: extracted,
        })
    }

    /// This release with the environment's secrets, fetched for a deployment.
    pub fn with_secrets(mut self, secrets: crate::secrets::Secrets) -> Artifact {
        self.secrets = std::sync::Arc::new(secrets);
        self
    }

    /// The release id this artifact becomes for `version`.
    pub fn release_id(&self, version: &str) -> String {
        manifest::release_id(version, &self.manifest_hash)
    }

    /// Reads one chunk's bytes and checks them against the hash (the tree may have changed since
    /// the scan).
    pub fn read_chunk(&self, hash: &[u8]) -> Result<Vec<u8>, ArtifactError> {
        let key: [u8; HASH_LEN] = hash.try_into().map_err(|_| ArtifactError::Refused {
            artifact: self.source.clone(),
            entry: String::new(),
            reason: "a host asked for a chunk hash of the wrong length".into(),
        })?;
        let loc = self.chunks.get(&key).ok_or_else(|| ArtifactError::Refused {
            artifact: self.source.clone(),
            entry: String::new(),
            reason: format!("a host asked for chunk {} which is not in this artifact", manifest::Hex(hash)),
        })?;
        let io = |source| ArtifactError::Io { path: loc.file.clone(), source };
        let mut f = File::open(&loc.file).map_err(io)?;
        f.seek(SeekFrom::Start(loc.offset)).map_err(io)?;
        let mut buf = vec![0u8; usize::try_from(loc.length).unwrap_or(0)];
        f.read_exact(&mut buf).map_err(io)?;
        if blake3::hash(&buf).as_bytes() != hash {
            return Err(ArtifactError::Refused {
                artifact: self.source.clone(),
                entry: loc.file.display().to_string(),
                reason: "the file changed since the artifact was scanned".into(),
            });
        }
        Ok(buf)
    }
}

/// Collects entries below `dir` (relative path prefix `rel`), with the file path of each file.
fn walk(
    artifact: &Path,
    dir: &Path,
    rel: &str,
    out: &mut Vec<(v1::Entry, Option<FileRef>)>,
) -> Result<(), ArtifactError> {
    let io = |source| ArtifactError::Io { path: dir.to_owned(), source };
    for item in std::fs::read_dir(dir).map_err(io)? {
        let item = item.map_err(io)?;
        let name = item.file_name().into_string().map_err(|n| ArtifactError::Refused {
            artifact: artifact.to_owned(),
            entry: format!("{rel}{}", n.to_string_lossy()),
            reason: "file name is not valid UTF-8".into(),
        })?;
        let path = item.path();
        let relpath = format!("{rel}{name}");
        let meta =
            std::fs::symlink_metadata(&path).map_err(|source| ArtifactError::Io { path: path.clone(), source })?;
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_dir() {
            out.push((
                v1::Entry { path: relpath.clone(), kind: EntryKind::Dir as i32, mode, ..Default::default() },
                None,
            ));
            walk(artifact, &path, &format!("{relpath}/"), out)?;
        } else if ft.is_symlink() {
            let target =
                std::fs::read_link(&path).map_err(|source| ArtifactError::Io { path: path.clone(), source })?;
            let target = target.into_os_string().into_string().map_err(|_| ArtifactError::Refused {
                artifact: artifact.to_owned(),
                entry: relpath.clone(),
                reason: "symlink target is not valid UTF-8".into(),
            })?;
            out.push((
                v1::Entry {
                    path: relpath,
                    kind: EntryKind::Symlink as i32,
                    mode: 0o777,
                    link_target: target,
                    ..Default::default()
                },
                None,
            ));
        } else if ft.is_file() {
            let entry = v1::Entry {
                path: relpath,
                kind: EntryKind::File as i32,
                mode,
                size: meta.size(),
                ..Default::default()
            };
            out.push((entry, Some(FileRef { path, stat: Stat::of(&meta) })));
        } else {
            return Err(ArtifactError::Refused {
                artifact: artifact.to_owned(),
                entry: relpath,
                reason: "not a regular file, directory or symlink (devices, sockets and FIFOs cannot be deployed)"
                    .into(),
            });
        }
    }
    Ok(())
}

/// A file of the artifact tree and its stat at the walk.
struct FileRef {
    path: PathBuf,
    stat: Stat,
}

/// What identifies a file's content without reading it (see [`crate::cache`]).
#[derive(Debug, Clone, Copy)]
struct Stat {
    dev: u64,
    ino: u64,
    size: u64,
    mode: u32,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stat {
    fn of(meta: &std::fs::Metadata) -> Stat {
        Stat {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mode: meta.mode(),
            mtime_ns: meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()),
            ctime_ns: meta.ctime().saturating_mul(1_000_000_000).saturating_add(meta.ctime_nsec()),
        }
    }

    fn vouches_for(&self, r: &ScanRecord) -> bool {
        (self.dev, self.ino, self.size, self.mode, self.mtime_ns, self.ctime_ns)
            == (r.dev, r.ino, r.size, r.mode, r.mtime_ns, r.ctime_ns)
            && r.hash.len() == HASH_LEN
            && r.chunks.iter().map(|c| c.length).sum::<u64>() == r.size
    }

    fn record(&self, entry: &v1::Entry) -> ScanRecord {
        ScanRecord {
            path: entry.path.clone(),
            dev: self.dev,
            ino: self.ino,
            size: self.size,
            mode: self.mode,
            mtime_ns: self.mtime_ns,
            ctime_ns: self.ctime_ns,
            hash: entry.hash.clone(),
            chunks: entry.chunks.clone(),
        }
    }
}

type Hashed = (Vec<u8>, Vec<v1::Chunk>, u64);

/// Hashes the files `todo` (indexes into `entries`) on every core, in the order given.
fn hash_files(
    artifact: &Path,
    entries: &[(v1::Entry, Option<FileRef>)],
    todo: &[usize],
) -> Result<Vec<Hashed>, ArtifactError> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8).min(todo.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<Result<Hashed, ArtifactError>>> = (0..todo.len()).map(|_| None).collect();
    let slots = std::sync::Mutex::new(&mut results);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&i) = todo.get(k) else { break };
                    let (entry, file) = &entries[i];
                    let result = match file {
                        Some(file) => chunk_file(artifact, &file.path, &entry.path),
                        None => Ok((Vec::new(), Vec::new(), 0)),
                    };
                    if let Ok(mut slots) = slots.lock() {
                        slots[k] = Some(result);
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(ArtifactError::Refused {
                    artifact: artifact.to_owned(),
                    entry: String::new(),
                    reason: "a hashing thread failed".into(),
                })
            })
        })
        .collect()
}

/// Reads a file once: its blake3 hash, its content-defined chunks and the bytes read.
fn chunk_file(artifact: &Path, file: &Path, rel: &str) -> Result<Hashed, ArtifactError> {
    let io = |source| ArtifactError::Io { path: file.to_owned(), source };
    let f = File::open(file).map_err(io)?;
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::new();
    let mut size = 0u64;
    for piece in fastcdc::v2020::StreamCDC::new(f, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
        let piece = piece.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(source) => io(source),
            other => ArtifactError::Refused {
                artifact: artifact.to_owned(),
                entry: rel.to_string(),
                reason: format!("chunking failed: {other:?}"),
            },
        })?;
        whole.update(&piece.data);
        let length = piece.length as u64;
        chunks.push(v1::Chunk { hash: blake3::hash(&piece.data).as_bytes().to_vec(), length });
        size += length;
    }
    Ok((whole.finalize().as_bytes().to_vec(), chunks, size))
}

/// Extracts a tar archive (plain, gzip or zstd, by magic number) into `dest`, at most `max_bytes`
/// of file content in all.
fn extract(archive: &Path, dest: &Path, max_bytes: u64) -> Result<(), ArtifactError> {
    let io = |source| ArtifactError::Io { path: archive.to_owned(), source };
    let mut f = File::open(archive).map_err(io)?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(io)?;
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    let reader: Box<dyn Read> = match &magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(f)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(zstd::stream::read::Decoder::new(f).map_err(io)?),
        _ => Box::new(f),
    };
    let refuse = |entry: &str, reason: &str| ArtifactError::Refused {
        artifact: archive.to_owned(),
        entry: entry.to_string(),
        reason: reason.to_string(),
    };
    let mut tar = tar::Archive::new(reader);
    // Kinds created so far: a later entry may only go below a directory this archive made.
    let mut kinds: BTreeMap<String, EntryKind> = BTreeMap::new();
    let mut count = 0usize;
    let mut left = max_bytes;
    for item in tar.entries().map_err(io)? {
        let mut item = item.map_err(|e| truncated(archive, e))?;
        count += 1;
        if count > manifest::MAX_ENTRIES {
            return Err(refuse("", "too many entries"));
        }
        let raw = item.path().map_err(io)?.to_string_lossy().into_owned();
        let name = raw.trim_start_matches("./").trim_end_matches('/').to_string();
        if name.is_empty() || name == "." {
            continue; // the archive's root directory
        }
        manifest::check_path(&name).map_err(|r| refuse(&raw, &r))?;
        let kind = match item.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Link => {
                return Err(refuse(&raw, "hard links in archives are not supported (store a copy)"));
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                return Err(refuse(&raw, "device files and FIFOs cannot be deployed"));
            }
            // PAX/GNU metadata records are consumed by the tar reader; anything else is unknown.
            other => return Err(refuse(&raw, &format!("unsupported entry type {other:?}"))),
        };
        // Parents: must be directories of this archive; missing ones are created as 0755.
        let mut parent = String::new();
        for comp in name.split('/').collect::<Vec<_>>().split_last().map(|(_, p)| p.to_vec()).unwrap_or_default() {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            match kinds.get(&parent) {
                Some(EntryKind::Dir) => {}
                Some(EntryKind::Symlink) => {
                    return Err(refuse(&raw, &format!("path goes through the symlink {parent:?}")));
                }
                Some(_) => return Err(refuse(&raw, &format!("path goes through the file {parent:?}"))),
                None => {
                    let d = dest.join(&parent);
                    std::fs::create_dir(&d).map_err(|source| ArtifactError::Io { path: d.clone(), source })?;
                    kinds.insert(parent.clone(), EntryKind::Dir);
                }
            }
        }
        if kinds.contains_key(&name) {
            return Err(refuse(&raw, "duplicate entry"));
        }
        let target = dest.join(&name);
        let mode = item.header().mode().map_err(io)? & 0o7777;
        // Refused before it is written anywhere (the manifest gate would refuse it after).
        let set_id = if kind == EntryKind::File { 0o6000 } else { 0o4000 };
        if kind != EntryKind::Symlink && mode & (set_id | 0o002) != 0 {
            let what = if mode & set_id != 0 {
                "is setuid or setgid (clear it in the build: chmod ug-s)"
            } else {
                "is world-writable (clear it in the build: chmod o-w)"
            };
            return Err(refuse(&raw, &format!("mode {mode:04o} {what}")));
        }
        let at = |source| ArtifactError::Io { path: target.clone(), source };
        match kind {
            EntryKind::Dir => {
                std::fs::create_dir(&target).map_err(at)?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode | 0o700)).map_err(at)?;
            }
            EntryKind::Symlink => {
                let link = item.link_name().map_err(io)?.ok_or_else(|| refuse(&raw, "symlink without a target"))?;
                let link = link.to_string_lossy().into_owned();
                if !manifest::symlink_stays_inside(&name, &link) {
                    return Err(refuse(&raw, &format!("symlink target {link:?} points outside the release")));
                }
                std::os::unix::fs::symlink(&link, &target).map_err(at)?;
            }
            _ => {
                let too_large =
                    || ArtifactError::TooLarge { artifact: archive.to_owned(), entry: raw.clone(), limit: max_bytes };
                // The header's size first (nothing written), then what the stream really gives.
                if item.header().size().map_err(io)? > left {
                    return Err(too_large());
                }
                let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(&target).map_err(at)?;
                let copied = std::io::copy(&mut (&mut item).take(left.saturating_add(1)), &mut out)
                    .map_err(|e| truncated(archive, e))?;
                left = left.checked_sub(copied).ok_or_else(too_large)?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).map_err(at)?;
            }
        }
        kinds.insert(name, kind);
    }
    Ok(())
}

fn truncated(archive: &Path, e: std::io::Error) -> ArtifactError {
    ArtifactError::Io {
        path: archive.to_owned(),
        source: std::io::Error::new(e.kind(), format!("corrupt or truncated archive: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(d.path().join("bin")).expect("mkdir");
        std::fs::write(d.path().join("bin/app"), vec![7u8; 300_000]).expect("write");
        std::fs::write(d.path().join("README"), b"hello").expect("write");
        std::os::unix::fs::symlink("bin/app", d.path().join("app")).expect("symlink");
        d
    }

    fn tar_of(dir: &Path, out: &Path, zstd_level: Option<i32>) {
        let f = File::create(out).expect("create");
        let w: Box<dyn std::io::Write> = match zstd_level {
            Some(l) => Box::new(zstd::stream::write::Encoder::new(f, l).expect("zstd").auto_finish()),
            None => Box::new(f),
        };
        let mut b = tar::Builder::new(w);
        b.follow_symlinks(false);
        b.append_dir_all(".", dir).expect("append");
        b.into_inner().expect("finish");
    }

    #[test]
    fn the_scan_cache_vouches_only_for_files_whose_stat_is_unchanged() {
        let d = tempfile::tempdir().expect("tempdir");
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new(cache_dir.path().to_owned());
        std::fs::write(d.path().join("a"), b"alpha").expect("write");
        std::fs::write(d.path().join("b"), b"bravo").expect("write");
        let hash_of = |art: &Artifact, path: &str| {
            art.manifest.entries.iter().find(|e| e.path == path).map(|e| e.hash.clone()).expect("entry")
        };
        // Files changed within the last second are not remembered.
        Artifact::scan(d.path(), Some(&cache)).expect("scan");
        assert!(cache.scan_records(d.path()).is_empty());
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let first = Artifact::scan(d.path(), Some(&cache)).expect("scan");
        let mut records = cache.scan_records(d.path());
        assert_eq!(records.len(), 2);

        // A record whose stat matches is believed without reading the file: plant a different
        // hash for "a" and the scan reports it.
        let planted = blake3::hash(b"planted").as_bytes().to_vec();
        if let Some(r) = records.get_mut("a") {
            r.hash = planted.clone();
        }
        cache.save_scan(d.path(), records.into_values().collect());
        let second = Artifact::scan(d.path(), Some(&cache)).expect("scan");
        assert_eq!(hash_of(&second, "a"), planted);

        // Rewriting "b" in place with the same size and its old mtime still changes its ctime:
        // it is read again.
        let b = d.path().join("b");
        let mtime = std::fs::metadata(&b).and_then(|m| m.modified()).expect("mtime");
        std::fs::write(&b, b"BRAVO").expect("rewrite");
        File::options().write(true).open(&b).and_then(|f| f.set_modified(mtime)).expect("restore mtime");
        let third = Artifact::scan(d.path(), Some(&cache)).expect("scan");
        assert_ne!(hash_of(&third, "b"), hash_of(&first, "b"));
        assert_eq!(hash_of(&third, "b"), blake3::hash(b"BRAVO").as_bytes().to_vec());
        // Without a cache nothing is believed.
        assert_eq!(
            hash_of(&Artifact::scan(d.path(), None).expect("scan"), "a"),
            blake3::hash(b"alpha").as_bytes().to_vec()
        );
    }

    /// An archive unchanged since its last scan is neither extracted nor hashed again: its tree
    /// stays in the cache and the tree's scan records vouch for its files. A changed archive gets
    /// a new tree; one changed within the last second is extracted to a temporary directory.
    #[test]
    fn an_unchanged_archive_reuses_its_extracted_tree_and_hashes() {
        let d = tree();
        let out = tempfile::tempdir().expect("tempdir");
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new(cache_dir.path().to_owned());
        let archive = out.path().join("a.tar.zst");
        tar_of(d.path(), &archive, Some(3));
        let trees = || -> Vec<std::path::PathBuf> {
            let Ok(read) = std::fs::read_dir(cache_dir.path().join("extracted")) else { return Vec::new() };
            let mut v: Vec<_> = read.map(|e| e.expect("entry").path()).collect();
            v.sort();
            v
        };
        // Just written: not trusted to be finished, so not kept.
        let fresh = Artifact::scan(&archive, Some(&cache)).expect("scan");
        assert!(trees().is_empty(), "{:?}", trees());
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let first = Artifact::scan(&archive, Some(&cache)).expect("scan");
        assert_eq!(first.manifest_hash, fresh.manifest_hash);
        let kept = trees();
        assert_eq!(kept.len(), 1, "{kept:?}");
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("stat"));
        let tree_ino = ino(&kept[0]);
        assert_eq!(cache.scan_records(&archive).len(), 2, "both files of the tree are remembered at once");
        // Planted in the records, believed: the files were not read again.
        let mut records = cache.scan_records(&archive);
        let planted = blake3::hash(b"planted").as_bytes().to_vec();
        if let Some(r) = records.get_mut("README") {
            r.hash = planted.clone();
        }
        cache.save_scan(&archive, records.into_values().collect());
        let second = Artifact::scan(&archive, Some(&cache)).expect("scan");
        let readme = second.manifest.entries.iter().find(|e| e.path == "README").expect("README");
        assert_eq!(readme.hash, planted);
        assert_eq!((trees(), ino(&kept[0])), (kept.clone(), tree_ino), "the same tree, not extracted again");
        let chunk = &first.manifest.entries[3].chunks[0];
        assert_eq!(second.read_chunk(&chunk.hash).expect("read from the kept tree").len() as u64, chunk.length);
        // A limit lower than what the kept tree holds still refuses it.
        let e = Artifact::scan_within(&archive, Some(&cache), 1000).expect_err("too large");
        assert!(e.to_string().contains("max_artifact_bytes (1000 bytes)"), "{e}");
        // Another build under the same name: a tree of its own.
        std::fs::write(d.path().join("README"), b"hello again").expect("write");
        tar_of(d.path(), &archive, Some(3));
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let third = Artifact::scan(&archive, Some(&cache)).expect("scan");
        assert_ne!(third.manifest_hash, first.manifest_hash);
        assert_eq!(trees().len(), 2, "{:?}", trees());
    }

    #[test]
    fn directory_and_archives_give_the_same_manifest() {
        let d = tree();
        let a = Artifact::scan(d.path(), None).expect("scan dir");
        assert_eq!(
            a.manifest.entries.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
            ["README", "app", "bin", "bin/app"]
        );
        let app = &a.manifest.entries[3];
        assert_eq!(app.size, 300_000);
        assert!(app.chunks.len() >= 2, "a 300 kB file is cut into chunks");
        // Identical chunks are stored once but all listed.
        let first = &app.chunks[0];
        assert_eq!(a.read_chunk(&first.hash).expect("read").len() as u64, first.length);

        let out = tempfile::tempdir().expect("tempdir");
        for (name, level) in [("a.tar", None), ("a.tar.zst", Some(3))] {
            let p = out.path().join(name);
            tar_of(d.path(), &p, level);
            let t = Artifact::scan(&p, None).expect("scan archive");
            assert_eq!(t.manifest_hash, a.manifest_hash, "{name}");
        }
    }

    #[test]
    fn hostile_archives_are_refused() {
        let out = tempfile::tempdir().expect("tempdir");
        let build = |name: &str, f: &dyn Fn(&mut tar::Builder<File>)| {
            let p = out.path().join(name);
            let mut b = tar::Builder::new(File::create(&p).expect("create"));
            f(&mut b);
            b.finish().expect("finish");
            p
        };
        let file = |b: &mut tar::Builder<File>, path: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses '..'; write the raw name like a hostile archiver would.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, data).expect("append");
        };
        let link = |b: &mut tar::Builder<File>, path: &str, target: &str| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            b.append_link(&mut h, path, target).expect("append link");
        };
        let cases: Vec<(&str, PathBuf, &str)> = vec![
            ("dotdot", build("dotdot.tar", &|b| file(b, "../evil", b"x")), "'..' path component"),
            ("abs", build("abs.tar", &|b| file(b, "/etc/evil", b"x")), "absolute path"),
            ("escape", build("escape.tar", &|b| link(b, "l", "../../etc")), "points outside the release"),
            (
                "through",
                build("through.tar", &|b| {
                    link(b, "l", "sub");
                    file(b, "l/x", b"x");
                }),
                "goes through the symlink",
            ),
            (
                "dup",
                build("dup.tar", &|b| {
                    file(b, "a", b"x");
                    file(b, "a", b"y");
                }),
                "duplicate entry",
            ),
        ];
        for (what, path, needle) in cases {
            let e = Artifact::scan(&path, None).expect_err(what).to_string();
            assert!(e.contains(needle), "{what}: {e}");
            assert!(e.contains(&path.display().to_string()), "{what}: {e}");
        }
        // Nothing escaped the extraction directory.
        assert!(!out.path().parent().map(|p| p.join("evil").exists()).unwrap_or(false));
    }

    /// A build with a setuid program or a world-writable file is refused at the scan, naming the
    /// file, before anything is sent (the agent refuses it too).
    #[test]
    fn set_id_and_world_writable_builds_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        for (mode, needle) in [(0o4755, "setuid or setgid"), (0o646, "world-writable")] {
            let d = tempfile::tempdir().expect("tempdir");
            std::fs::write(d.path().join("index.html"), "ok").expect("write");
            let tool = d.path().join("tool");
            std::fs::write(&tool, "#!/bin/sh\n").expect("write");
            std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let e = Artifact::scan(d.path(), None).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("\"tool\"") && e.contains(needle), "mode {mode:o}: {e}");
        }
    }

    /// Regression: a 67 KB .tar.zst extracted 2 GiB. Past max_artifact_bytes the extraction
    /// stops, naming the entry; within it the same archive scans.
    #[test]
    fn a_decompression_bomb_is_refused_as_it_extracts() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("zeros"), vec![0u8; 4 << 20]).expect("write");
        let out = tempfile::tempdir().expect("tempdir");
        let bomb = out.path().join("bomb.tar.zst");
        tar_of(d.path(), &bomb, Some(19));
        assert!(std::fs::metadata(&bomb).expect("stat").len() < 4096, "not a bomb");
        let e = Artifact::scan_within(&bomb, None, 1 << 20).expect_err("refused").to_string();
        assert!(e.contains("extracts to more than max_artifact_bytes (1048576 bytes)") && e.contains("zeros"), "{e}");
        assert!(Artifact::scan_within(&bomb, None, 8 << 20).is_ok());
    }

    #[test]
    fn a_layout_adds_shared_paths_and_the_owner_and_refuses_builds_that_ship_them() {
        let d = tree();
        let plain = Artifact::scan(d.path(), None).expect("scan");
        let layout = |shared: &[(&str, bool)]| Layout {
            shared: shared.iter().map(|(p, dir)| (p.to_string(), *dir)).collect(),
            user: "web".into(),
            ..Layout::default()
        };
        let a = Artifact::scan_for(d.path(), None, &layout(&[("var/log", true), ("db.sqlite3", false)]), u64::MAX)
            .expect("scan");
        assert_ne!(a.manifest_hash, plain.manifest_hash, "the layout is part of the release");
        assert_eq!(a.manifest.user, "web");
        assert_eq!(a.build_hash, plain.manifest_hash, "the build's own hash is kept");
        let kinds: Vec<(&str, i32, u32)> = a
            .manifest
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.kind, e.mode))
            .filter(|e| e.1 != EntryKind::File as i32)
            .collect();
        assert!(kinds.contains(&("var", EntryKind::Dir as i32, 0o755)), "{kinds:?}");
        assert!(kinds.contains(&("var/log", EntryKind::SharedDir as i32, 0o750)), "{kinds:?}");
        assert!(kinds.contains(&("db.sqlite3", EntryKind::SharedFile as i32, 0o640)), "{kinds:?}");
        assert_eq!(a.total_bytes, plain.total_bytes, "shared paths carry no content");
        // A shared path where the build has a file, or under one, is refused by name.
        let e = Artifact::scan_for(d.path(), None, &layout(&[("README", false)]), u64::MAX).expect_err("refused");
        assert!(e.to_string().contains("it ships \"README\", which is the shared path \"README\""), "{e}");
        let e = Artifact::scan_for(d.path(), None, &layout(&[("bin", true)]), u64::MAX).expect_err("refused");
        assert!(e.to_string().contains("it ships \"bin/app\", inside the shared path \"bin\""), "{e}");
        let e = Artifact::scan_for(d.path(), None, &layout(&[("README/x", true)]), u64::MAX).expect_err("refused");
        assert!(e.to_string().contains("\"README\" is not a directory in the build"), "{e}");
    }

    #[test]
    fn truncated_archive_names_the_file() {
        let d = tree();
        let out = tempfile::tempdir().expect("tempdir");
        let p = out.path().join("t.tar");
        tar_of(d.path(), &p, None);
        let bytes = std::fs::read(&p).expect("read");
        std::fs::write(&p, &bytes[..bytes.len() / 3]).expect("truncate");
        let e = Artifact::scan(&p, None).expect_err("truncated").to_string();
        assert!(e.contains("t.tar") && e.contains("truncated"), "{e}");
    }

    #[test]
    fn random_archive_bytes_never_panic() {
        let d = tree();
        let out = tempfile::tempdir().expect("tempdir");
        let p = out.path().join("r.tar");
        tar_of(d.path(), &p, None);
        let good = std::fs::read(&p).expect("read");
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        for i in 0..300 {
            let mut bytes = good.clone();
            for _ in 0..8 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state % bytes.len() as u64) as usize;
                bytes[at] = (state >> 32) as u8;
            }
            let q = out.path().join(format!("m{i}.tar"));
            std::fs::write(&q, &bytes).expect("write");
            let _ = Artifact::scan(&q, None);
        }
    }
}

/// Property test: no byte string, whatever its compression magic, panics the archive scanner.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
        #[test]
        fn arbitrary_archives_never_panic(
            magic in prop_oneof![Just(vec![]), Just(vec![0x1f, 0x8b]), Just(vec![0x28, 0xb5, 0x2f, 0xfd])],
            body in prop::collection::vec(any::<u8>(), 0..4096),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let p = dir.path().join("a.tar");
            let mut bytes = magic;
            bytes.extend_from_slice(&body);
            std::fs::write(&p, &bytes).expect("write");
            let _ = Artifact::scan(&p, None);
        }
    }
}
