//! The release manifest: what both sides agree a release is, and the rules every manifest obeys.
//!
//! A manifest lists every entry of a release (path, kind, mode, size, blake3 hash, the file's
//! content-defined chunks). Its canonical hash identifies the release; the release id is
//! `<version>-<first 8 hex digits of that hash>`.
//!
//! [`validate`] is the single gate for untrusted manifests: the agent runs it on every manifest
//! it receives, the coordinator on every artifact it scans. It refuses absolute paths, `..`,
//! empty or `.` components, duplicate or unsorted entries, entries under a symlink or a file,
//! symlinks that point outside the release (also through the release's own symlinks, followed as
//! the kernel would), unknown kinds (device files cannot be expressed), mode bits beyond 0o7777,
//! setuid or setgid files, world-writable files and directories, file sizes that do not match
//! their chunks, entries inside a shared path, and user or group names that are not names.
//!
//! Shared paths (`EntryKind::SharedDir`, `SharedFile`) are the app's state: not content of the
//! release, kept once per host and linked into every release (see [`shared_link_target`]).
use std::fmt;

use crate::v1::{self, EntryKind};

/// FastCDC parameters. Both sides must use the same ones for chunks to be shared between
/// releases built by different coordinators.
pub const CHUNK_MIN: u32 = 16 * 1024;
pub const CHUNK_AVG: u32 = 64 * 1024;
pub const CHUNK_MAX: u32 = 256 * 1024;
/// Limits that keep a hostile manifest from exhausting the agent.
pub const MAX_ENTRIES: usize = 1_000_000;
pub const MAX_PATH_LEN: usize = 4096;
pub const MAX_COMPONENT_LEN: usize = 255;
pub const MAX_FILE_SIZE: u64 = 1 << 40;
/// The longest symlink target (Linux's PATH_MAX less its NUL).
pub const MAX_LINK_TARGET_LEN: usize = 4095;
/// Symlinks followed while resolving one link's target (the kernel's own limit is 40).
pub const MAX_LINK_HOPS: usize = 40;
/// Rendered files of one manifest.
pub const MAX_RENDERED: usize = 1024;
/// Path components walked while resolving every link of one manifest.
const MAX_LINK_STEPS: usize = 1 << 24;

/// Length of a blake3 hash.
pub const HASH_LEN: usize = 32;

/// One manifest problem, naming the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("manifest entry {path:?}: {reason}")]
pub struct ManifestError {
    pub path: String,
    pub reason: String,
}

fn err(path: &str, reason: impl Into<String>) -> ManifestError {
    ManifestError { path: path.to_string(), reason: reason.into() }
}

/// Checks one path: relative, '/'-separated, only normal components, bounded length.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!("path longer than {MAX_PATH_LEN} bytes"));
    }
    if path.starts_with('/') {
        return Err("absolute path".into());
    }
    if path.contains('\0') {
        return Err("NUL byte in path".into());
    }
    for c in path.split('/') {
        match c {
            "" => return Err("empty path component (// or trailing /)".into()),
            "." => return Err("'.' path component".into()),
            ".." => return Err("'..' path component".into()),
            c if c.len() > MAX_COMPONENT_LEN => {
                return Err(format!("path component longer than {MAX_COMPONENT_LEN} bytes"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether a symlink at `path` with `target` resolves (lexically) inside the release.
pub fn symlink_stays_inside(path: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return false;
    }
    // Depth of the directory holding the link.
    let mut depth = path.split('/').count() as i64 - 1;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

/// Where a symlink's target leads once the release's own symlinks (`links`: path → target) on
/// the way are followed, as the kernel resolves it: `Ok(true)` inside the release, `Ok(false)`
/// outside it, `Err` past [`MAX_LINK_HOPS`] links (a loop) or `budget` path components.
pub fn symlink_resolves_inside(
    links: &std::collections::HashMap<&str, &str>,
    path: &str,
    target: &str,
    budget: &mut usize,
) -> Result<bool, String> {
    // The directory the walk is in, from the release's root, as one string and the lengths it
    // had before each component (so a step costs its own length, not the whole path's); the
    // components still to walk, next one last.
    let mut dir = String::new();
    let mut lens: Vec<usize> = Vec::new();
    let enter = |dir: &mut String, lens: &mut Vec<usize>, name: &str| {
        lens.push(dir.len());
        if !dir.is_empty() {
            dir.push('/');
        }
        dir.push_str(name);
    };
    if let Some((parent, _)) = path.rsplit_once('/') {
        for c in parent.split('/') {
            enter(&mut dir, &mut lens, c);
        }
    }
    let mut todo: Vec<&str> = target.split('/').rev().collect();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        *budget = budget.checked_sub(1).ok_or("too many symlink components to resolve in one manifest")?;
        match c {
            "" | "." => {}
            ".." => match lens.pop() {
                Some(len) => dir.truncate(len),
                None => return Ok(false),
            },
            name => {
                enter(&mut dir, &mut lens, name);
                if let Some(next) = links.get(dir.as_str()) {
                    hops += 1;
                    if hops > MAX_LINK_HOPS {
                        return Err(format!("more than {MAX_LINK_HOPS} symlinks on the way (a loop?)"));
                    }
                    if next.is_empty() || next.starts_with('/') {
                        return Ok(false);
                    }
                    // The link's own target, relative to the directory holding the link.
                    if let Some(len) = lens.pop() {
                        dir.truncate(len);
                    }
                    todo.extend(next.split('/').rev());
                }
            }
        }
    }
    Ok(true)
}

/// The single gate for manifests from outside.
pub fn validate(m: &v1::Manifest) -> Result<(), ManifestError> {
    if m.entries.len() > MAX_ENTRIES {
        return Err(err("", format!("{} entries (at most {MAX_ENTRIES})", m.entries.len())));
    }
    let links: std::collections::HashMap<&str, &str> = m
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Symlink as i32)
        .map(|e| (e.path.as_str(), e.link_target.as_str()))
        .collect();
    let mut budget = MAX_LINK_STEPS;
    // Kinds of the entries seen so far, by path; parents must be directories of the manifest.
    let mut kinds: std::collections::HashMap<&str, EntryKind> =
        std::collections::HashMap::with_capacity(m.entries.len());
    let mut prev: Option<&str> = None;
    for e in &m.entries {
        let p = e.path.as_str();
        check_path(p).map_err(|r| err(p, r))?;
        if let Some(prev) = prev {
            match prev.cmp(p) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => return Err(err(p, "duplicate entry")),
                std::cmp::Ordering::Greater => return Err(err(p, "entries are not sorted by path")),
            }
        }
        prev = Some(p);
        if let Some((parent, _)) = p.rsplit_once('/') {
            match kinds.get(parent) {
                Some(EntryKind::Dir) => {}
                Some(EntryKind::Symlink) => return Err(err(p, format!("lies under the symlink {parent:?}"))),
                Some(EntryKind::SharedDir | EntryKind::SharedFile) => {
                    return Err(err(
                        p,
                        format!(
                            "lies under the shared path {parent:?}: a release cannot ship files into a shared path"
                        ),
                    ));
                }
                Some(_) => return Err(err(p, format!("lies under {parent:?}, which is not a directory"))),
                None => return Err(err(p, format!("its directory {parent:?} is not in the manifest"))),
            }
        }
        if e.mode & !0o7777 != 0 {
            return Err(err(p, format!("mode {:o} has bits beyond 0o7777", e.mode)));
        }
        let kind = EntryKind::try_from(e.kind).unwrap_or(EntryKind::Unspecified);
        // A symlink's own mode means nothing (it is always 0777).
        if kind != EntryKind::Symlink {
            // setgid on a directory only sets the group of files made in it (a release is never
            // written to): allowed. On a file, set-id bits make a program run as its owner.
            if (kind == EntryKind::File && e.mode & 0o6000 != 0) || e.mode & 0o4000 != 0 {
                return Err(err(
                    p,
                    format!(
                        "mode {:04o} is setuid or setgid: ferry does not deploy set-id programs (clear the bit in the build: chmod ug-s)",
                        e.mode
                    ),
                ));
            }
            if e.mode & 0o002 != 0 {
                return Err(err(
                    p,
                    format!(
                        "mode {:04o} is world-writable: any local user could change the release (chmod o-w in the build; keep data in shared paths)",
                        e.mode
                    ),
                ));
            }
        }
        match kind {
            EntryKind::Unspecified => {
                return Err(err(
                    p,
                    "unknown entry kind (only files, directories, symlinks and shared paths are allowed)",
                ));
            }
            EntryKind::Dir | EntryKind::Symlink | EntryKind::SharedDir | EntryKind::SharedFile => {
                if e.size != 0 || !e.hash.is_empty() || !e.chunks.is_empty() {
                    return Err(err(p, "a directory, symlink or shared path carries no content"));
                }
                if matches!(kind, EntryKind::SharedDir | EntryKind::SharedFile) && !e.link_target.is_empty() {
                    return Err(err(p, "a shared path has no link target (the agent links it)"));
                }
                if kind == EntryKind::Symlink && e.link_target.len() > MAX_LINK_TARGET_LEN {
                    return Err(err(p, format!("symlink target longer than {MAX_LINK_TARGET_LEN} bytes")));
                }
                if kind == EntryKind::Symlink {
                    let inside = symlink_stays_inside(p, &e.link_target)
                        && symlink_resolves_inside(&links, p, &e.link_target, &mut budget).map_err(|r| err(p, r))?;
                    if !inside {
                        return Err(err(p, format!("symlink target {:?} points outside the release", e.link_target)));
                    }
                }
                if kind == EntryKind::Dir && !e.link_target.is_empty() {
                    return Err(err(p, "a directory has no link target"));
                }
            }
            EntryKind::File => {
                if !e.link_target.is_empty() {
                    return Err(err(p, "a file has no link target"));
                }
                if e.hash.len() != HASH_LEN {
                    return Err(err(p, format!("content hash is {} bytes, not {HASH_LEN}", e.hash.len())));
                }
                if e.size > MAX_FILE_SIZE {
                    return Err(err(p, format!("size {} exceeds {MAX_FILE_SIZE}", e.size)));
                }
                let mut total: u64 = 0;
                for c in &e.chunks {
                    if c.hash.len() != HASH_LEN {
                        return Err(err(p, "a chunk hash is not 32 bytes"));
                    }
                    if c.length == 0 || c.length > u64::from(CHUNK_MAX) {
                        return Err(err(p, format!("chunk length {} outside 1..={CHUNK_MAX}", c.length)));
                    }
                    total = total.saturating_add(c.length);
                }
                if total != e.size {
                    return Err(err(p, format!("chunks add up to {total} bytes, the size says {}", e.size)));
                }
                if e.size == 0 && !e.chunks.is_empty() {
                    return Err(err(p, "an empty file has no chunks"));
                }
            }
        }
        kinds.insert(p, kind);
    }
    for (key, name) in [("user", &m.user), ("group", &m.group)] {
        if !name.is_empty() {
            check_account_name(name).map_err(|r| err("", format!("{key} {name:?}: {r}")))?;
        }
    }
    if m.user.is_empty() && !m.group.is_empty() {
        return Err(err("", format!("group {:?} without a user (name the app's user too)", m.group)));
    }
    validate_rendered(m, &kinds)
}

/// Rendered files: each at a new path of a directory of the release (not in a shared path), from
/// a file of the release or an inline text; vars named once, in order.
fn validate_rendered(
    m: &v1::Manifest,
    kinds: &std::collections::HashMap<&str, EntryKind>,
) -> Result<(), ManifestError> {
    if m.rendered.len() > MAX_RENDERED {
        return Err(err("", format!("{} rendered files (at most {MAX_RENDERED})", m.rendered.len())));
    }
    let mut paths = std::collections::HashSet::new();
    for r in &m.rendered {
        let p = r.path.as_str();
        check_path(p).map_err(|why| err(p, format!("rendered file: {why}")))?;
        if kinds.contains_key(p) || !paths.insert(p) {
            return Err(err(
                p,
                "a rendered file's path is already an entry of the release (leave it out of the build)",
            ));
        }
        if let Some((parent, _)) = p.rsplit_once('/')
            && kinds.get(parent) != Some(&EntryKind::Dir)
        {
            return Err(err(
                p,
                format!("a rendered file must lie in a directory of the release; {parent:?} is not one"),
            ));
        }
        match (r.template.is_empty(), r.text.is_empty()) {
            (false, true) => {
                if kinds.get(r.template.as_str()) != Some(&EntryKind::File) {
                    return Err(err(p, format!("its template {:?} is not a file of the release", r.template)));
                }
            }
            (true, _) if r.text.len() <= crate::render::MAX_TEXT_BYTES => {}
            (true, _) => return Err(err(p, format!("inline template over {} bytes", crate::render::MAX_TEXT_BYTES))),
            (false, false) => return Err(err(p, "a rendered file has a template file or a text, not both")),
        }
        if r.mode & !0o777 != 0 || r.mode & 0o002 != 0 {
            return Err(err(
                p,
                format!("mode {:04o} of a rendered file must be permission bits, not world-writable", r.mode),
            ));
        }
    }
    let mut prev: Option<&str> = None;
    for name in &m.secrets {
        crate::render::check_secret_name(name).map_err(|why| err("", why))?;
        if prev.is_some_and(|p| p >= name.as_str()) {
            return Err(err("", format!("secret {name:?}: secrets must be sorted by name, each once")));
        }
        prev = Some(name);
    }
    if m.secrets.len() > MAX_RENDERED {
        return Err(err("", format!("{} secrets (at most {MAX_RENDERED})", m.secrets.len())));
    }
    let mut prev: Option<&str> = None;
    for v in &m.vars {
        crate::render::check_var_name(&v.name).map_err(|why| err("", why))?;
        if prev.is_some_and(|p| p >= v.name.as_str()) {
            return Err(err("", format!("var {:?}: vars must be sorted by name, each once", v.name)));
        }
        if v.value.len() > crate::render::MAX_TEXT_BYTES {
            return Err(err("", format!("var {:?}: value over {} bytes", v.name, crate::render::MAX_TEXT_BYTES)));
        }
        prev = Some(&v.name);
    }
    Ok(())
}

/// Checks a user or group name as Debian's `adduser` accepts them: 1–32 characters of
/// `[a-z0-9_-]` (and `.`), starting with a letter or `_`.
pub fn check_account_name(name: &str) -> Result<(), String> {
    let ok_first = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_');
    let ok_rest = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'));
    if name.is_empty() || name.len() > 32 || !ok_first || !ok_rest {
        return Err("not a user or group name (1-32 of a-z, 0-9, '_', '-', '.', starting with a letter or '_')".into());
    }
    Ok(())
}

/// Whether an entry is a shared path (linked to the app's shared state, not part of the release).
pub fn is_shared(e: &v1::Entry) -> bool {
    e.kind == EntryKind::SharedDir as i32 || e.kind == EntryKind::SharedFile as i32
}

/// The relative symlink target a release holds at shared path `path`: from
/// `<app dir>/releases/<id>/<path>` to `<app dir>/shared/<path>`.
pub fn shared_link_target(path: &str) -> String {
    let up = path.split('/').count() + 1;
    format!("{}shared/{path}", "../".repeat(up))
}

/// The canonical hash of a manifest: blake3 over a fixed encoding of every field, in order.
pub fn hash(m: &v1::Manifest) -> [u8; HASH_LEN] {
    // Variable-length fields go in with their length first, so no two manifests encode alike.
    fn put(h: &mut blake3::Hasher, bytes: &[u8]) {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let mut h = blake3::Hasher::new();
    h.update(b"ferry-manifest-v1\0");
    h.update(&(m.entries.len() as u64).to_le_bytes());
    for e in &m.entries {
        put(&mut h, e.path.as_bytes());
        h.update(&e.kind.to_le_bytes());
        h.update(&e.mode.to_le_bytes());
        h.update(&e.size.to_le_bytes());
        put(&mut h, &e.hash);
        put(&mut h, e.link_target.as_bytes());
        h.update(&(e.chunks.len() as u64).to_le_bytes());
        for c in &e.chunks {
            h.update(&c.hash);
            h.update(&c.length.to_le_bytes());
        }
    }
    // After every entry, and only when set: manifests without them keep the hashes they had.
    if !m.user.is_empty() || !m.group.is_empty() {
        h.update(b"owner\0");
        put(&mut h, m.user.as_bytes());
        put(&mut h, m.group.as_bytes());
    }
    if !m.rendered.is_empty() || !m.vars.is_empty() {
        h.update(b"rendered\0");
        h.update(&(m.rendered.len() as u64).to_le_bytes());
        for r in &m.rendered {
            put(&mut h, r.path.as_bytes());
            put(&mut h, r.template.as_bytes());
            put(&mut h, r.text.as_bytes());
            h.update(&r.mode.to_le_bytes());
            h.update(&[u8::from(r.env_file)]);
        }
        h.update(&(m.vars.len() as u64).to_le_bytes());
        for v in &m.vars {
            put(&mut h, v.name.as_bytes());
            put(&mut h, v.value.as_bytes());
        }
    }
    if !m.secrets.is_empty() {
        h.update(b"secrets\0");
        h.update(&(m.secrets.len() as u64).to_le_bytes());
        for name in &m.secrets {
            put(&mut h, name.as_bytes());
        }
    }
    *h.finalize().as_bytes()
}

/// Checks a release version: 1–64 characters of `[A-Za-z0-9._+-]`, not starting with '.' or '-'.
pub fn check_version(v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && !v.starts_with(['.', '-'])
        && v.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("version {v:?} must be 1-64 characters of A-Z a-z 0-9 . _ + - (not starting with . or -)"))
    }
}

/// `<version>-<8 hex digits of the manifest hash>`.
pub fn release_id(version: &str, manifest_hash: &[u8]) -> String {
    let short: String = manifest_hash.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("{version}-{short}")
}

/// Checks a release id as it appears in a request (it becomes a directory name).
pub fn check_release_id(id: &str) -> Result<(), String> {
    let (version, short) = id.rsplit_once('-').ok_or_else(|| format!("release id {id:?} has no hash suffix"))?;
    check_version(version)?;
    if short.len() != 8 || !short.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("release id {id:?} does not end in 8 hex digits"));
    }
    Ok(())
}

/// A 32-byte hash in hex, for names and messages.
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Total bytes of the manifest's files.
pub fn total_bytes(m: &v1::Manifest) -> u64 {
    m.entries.iter().map(|e| e.size).sum()
}

/// The changes from `base` to `new` (both sorted by path, as [`validate`] demands): the entries
/// added or changed, whole, and the paths removed.
pub fn diff(base: &v1::Manifest, new: &v1::Manifest) -> v1::ManifestDelta {
    let old: std::collections::HashMap<&str, &v1::Entry> = base.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    let now: std::collections::HashSet<&str> = new.entries.iter().map(|e| e.path.as_str()).collect();
    v1::ManifestDelta {
        upserts: new.entries.iter().filter(|e| old.get(e.path.as_str()) != Some(e)).cloned().collect(),
        removed: base.entries.iter().filter(|e| !now.contains(e.path.as_str())).map(|e| e.path.clone()).collect(),
        user: new.user.clone(),
        group: new.group.clone(),
        rendered: new.rendered.clone(),
        vars: new.vars.clone(),
        secrets: new.secrets.clone(),
    }
}

/// Applies a delta to `base`: the manifest it describes, sorted by path. Refuses a delta that
/// removes a path the base lacks or names a path twice; the result still has to pass
/// [`validate`] and match the claimed hash.
pub fn apply_delta(base: &v1::Manifest, delta: &v1::ManifestDelta) -> Result<v1::Manifest, ManifestError> {
    let mut entries: std::collections::BTreeMap<String, v1::Entry> =
        base.entries.iter().map(|e| (e.path.clone(), e.clone())).collect();
    let mut named = std::collections::HashSet::new();
    for path in &delta.removed {
        if !named.insert(path.as_str()) {
            return Err(err(path, "named twice in the delta"));
        }
        if entries.remove(path).is_none() {
            return Err(err(path, "the delta removes it, but the base release has no such entry"));
        }
    }
    for e in &delta.upserts {
        if !named.insert(e.path.as_str()) {
            return Err(err(&e.path, "named twice in the delta"));
        }
        entries.insert(e.path.clone(), e.clone());
    }
    Ok(v1::Manifest {
        entries: entries.into_values().collect(),
        user: delta.user.clone(),
        group: delta.group.clone(),
        rendered: delta.rendered.clone(),
        vars: delta.vars.clone(),
        secrets: delta.secrets.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Chunk, Entry, Manifest};

    fn dir(p: &str) -> Entry {
        Entry { path: p.into(), kind: EntryKind::Dir as i32, mode: 0o755, ..Default::default() }
    }
    fn file(p: &str, data: &[u8]) -> Entry {
        let h = blake3::hash(data).as_bytes().to_vec();
        let chunks = if data.is_empty() { vec![] } else { vec![Chunk { hash: h.clone(), length: data.len() as u64 }] };
        Entry {
            path: p.into(),
            kind: EntryKind::File as i32,
            mode: 0o644,
            size: data.len() as u64,
            hash: h,
            chunks,
            ..Default::default()
        }
    }
    fn link(p: &str, t: &str) -> Entry {
        Entry {
            path: p.into(),
            kind: EntryKind::Symlink as i32,
            mode: 0o777,
            link_target: t.into(),
            ..Default::default()
        }
    }
    fn reason(entries: Vec<Entry>) -> String {
        validate(&Manifest { entries, ..Default::default() }).expect_err("must be refused").to_string()
    }

    #[test]
    fn a_good_manifest_passes() {
        let m = Manifest {
            entries: vec![
                dir("bin"),
                file("bin/app", b"x"),
                link("current-bin", "bin/app"),
                file("empty", b""),
                dir("etc"),
                link("etc/up", "../bin"),
            ],
            ..Default::default()
        };
        validate(&m).expect("valid");
        assert_eq!(hash(&m), hash(&m.clone()));
    }

    #[test]
    fn hostile_entries_are_refused_with_their_path() {
        assert!(reason(vec![file("/etc/passwd", b"x")]).contains("\"/etc/passwd\": absolute path"));
        assert!(reason(vec![dir("a"), file("a/../../x", b"x")]).contains("'..' path component"));
        assert!(reason(vec![file("a//b", b"x")]).contains("empty path component"));
        assert!(reason(vec![file("./a", b"x")]).contains("'.' path component"));
        assert!(reason(vec![file("a", b"x"), file("a", b"y")]).contains("duplicate entry"));
        assert!(reason(vec![file("b", b"x"), file("a", b"y")]).contains("not sorted"));
        assert!(reason(vec![link("l", "/etc"), file("l/x", b"x")]).contains("outside the release"));
        assert!(reason(vec![link("l", "."), file("l/x", b"x")]).contains("lies under the symlink"));
        assert!(reason(vec![file("f", b"x"), file("f/x", b"x")]).contains("not a directory"));
        assert!(reason(vec![file("d/x", b"x")]).contains("its directory \"d\" is not in the manifest"));
        assert!(reason(vec![dir("d"), link("d/l", "../../x")]).contains("points outside the release"));
        assert!(reason(vec![link("l", "")]).contains("outside the release"));
        let mut dev = file("dev", b"");
        dev.kind = 7;
        assert!(reason(vec![dev]).contains("unknown entry kind"));
        let mut m = file("m", b"x");
        m.mode = 0o100644;
        assert!(reason(vec![m]).contains("bits beyond 0o7777"));
        let mut lie = file("lie", b"abc");
        lie.size = 10;
        assert!(reason(vec![lie]).contains("chunks add up to 3 bytes, the size says 10"));
        let mut short = file("short", b"abc");
        short.hash.truncate(5);
        assert!(reason(vec![short]).contains("content hash is 5 bytes"));
    }

    #[test]
    fn set_id_and_world_writable_entries_are_refused() {
        let mut setuid = file("id", b"x");
        setuid.mode = 0o4755;
        assert!(reason(vec![setuid]).contains("setuid or setgid"));
        let mut setgid = file("sh", b"x");
        setgid.mode = 0o2755;
        assert!(reason(vec![setgid]).contains("mode 2755 is setuid or setgid"));
        let mut shared_group = dir("group");
        shared_group.mode = 0o2755;
        assert!(
            validate(&Manifest { entries: vec![shared_group], ..Default::default() }).is_ok(),
            "a setgid directory is fine"
        );
        let mut open = dir("uploads");
        open.mode = 0o1777;
        assert!(reason(vec![open]).contains("world-writable"));
        let mut writable = file("config.yml", b"x");
        writable.mode = 0o666;
        let e = validate(&Manifest { entries: vec![writable], ..Default::default() }).expect_err("refused");
        assert_eq!(e.path, "config.yml", "{e}");
        // A symlink's mode is not its own.
        assert!(validate(&Manifest { entries: vec![file("a", b"x"), link("b", "a")], ..Default::default() }).is_ok());
    }

    /// Regression: containment was checked on the target's text only, so a target walking
    /// through the release's own symlinks (`d/u -> ..`) reached /etc/shadow.
    #[test]
    fn a_target_through_other_symlinks_cannot_leave_the_release() {
        let climb = vec![dir("d"), link("d/u", ".."), link("x", "d/u/d/u/../../etc/shadow")];
        assert!(reason(climb).contains("points outside the release"));
        // Through links that stay inside, a target resolves fine.
        let ok = vec![dir("d"), dir("d/e"), link("d/up", ".."), file("f", b"x"), link("y", "d/up/f")];
        assert!(validate(&Manifest { entries: ok, ..Default::default() }).is_ok());
        // A target longer than the kernel takes is refused before any walk.
        let long = vec![link("l", &"a/".repeat(3000))];
        assert!(reason(long).contains("longer than 4095 bytes"));
        // A loop is refused, not followed forever.
        let looped = vec![link("a", "b/x"), link("b", "a")];
        assert!(reason(looped).contains("more than 40 symlinks"), "a loop");
    }

    #[test]
    fn symlink_containment() {
        assert!(symlink_stays_inside("a", "b"));
        assert!(symlink_stays_inside("a/b/c", "../../x"));
        assert!(!symlink_stays_inside("a/b/c", "../../../x"));
        assert!(!symlink_stays_inside("a", "../a"));
        assert!(!symlink_stays_inside("a", "/a"));
        assert!(symlink_stays_inside("a", "./b/../c"));
    }

    #[test]
    fn versions_and_ids() {
        for good in ["1", "1.4.0", "2024-01-01_rc+3"] {
            check_version(good).expect(good);
        }
        for bad in ["", ".x", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
        let id = release_id("1.4.0", &[0xab, 0xcd, 0xef, 0x01, 0x99]);
        assert_eq!(id, "1.4.0-abcdef01");
        check_release_id(&id).expect("valid id");
        for bad in ["1.4.0", "../x-abcdef01", "1-abc", "1-abcdefgz"] {
            assert!(check_release_id(bad).is_err(), "{bad}");
        }
    }

    fn shared(p: &str, kind: EntryKind) -> Entry {
        Entry { path: p.into(), kind: kind as i32, mode: 0o750, ..Default::default() }
    }

    #[test]
    fn shared_paths_hold_nothing_and_nothing_lies_under_them() {
        let ok = Manifest {
            entries: vec![
                dir("config"),
                shared("config/local.yml", EntryKind::SharedFile),
                shared("log", EntryKind::SharedDir),
                dir("public"),
                shared("public/uploads", EntryKind::SharedDir),
            ],
            user: "web".into(),
            group: "www-data".into(),
            ..Default::default()
        };
        validate(&ok).expect("valid");
        assert!(
            reason(vec![shared("log", EntryKind::SharedDir), file("log/app.log", b"x")])
                .contains("lies under the shared path \"log\": a release cannot ship files into a shared path")
        );
        let mut with_content = shared("log", EntryKind::SharedFile);
        with_content.size = 1;
        assert!(reason(vec![with_content]).contains("carries no content"));
        let mut with_target = shared("log", EntryKind::SharedDir);
        with_target.link_target = "/etc".into();
        assert!(reason(vec![with_target]).contains("has no link target"));
        assert!(
            reason(vec![shared("a/log", EntryKind::SharedDir)]).contains("its directory \"a\" is not in the manifest")
        );
        let mut writable = shared("log", EntryKind::SharedDir);
        writable.mode = 0o777;
        assert!(reason(vec![writable]).contains("world-writable"));
        assert_eq!(shared_link_target("log"), "../../shared/log");
        assert_eq!(shared_link_target("public/uploads"), "../../../shared/public/uploads");
    }

    #[test]
    fn rendered_files_land_on_new_paths_of_the_release() {
        use crate::v1::{Rendered, Var};
        let with = |rendered: Vec<Rendered>, vars: Vec<Var>| Manifest {
            entries: vec![
                dir("config"),
                file("config/app.yml.tmpl", b"db: {{ vars.db }}"),
                shared("log", EntryKind::SharedDir),
            ],
            rendered,
            vars,
            ..Default::default()
        };
        let r = |path: &str, template: &str, text: &str| Rendered {
            path: path.into(),
            template: template.into(),
            text: text.into(),
            mode: 0o640,
            env_file: false,
        };
        let var = |n: &str| Var { name: n.into(), value: "x".into() };
        let ok = with(
            vec![r("config/app.yml", "config/app.yml.tmpl", ""), r("config/app.env", "", "A=1\n")],
            vec![var("env"), var("vars.db")],
        );
        validate(&ok).expect("valid");
        for (m, needle) in [
            (
                with(vec![r("config/app.yml.tmpl", "config/app.yml.tmpl", "")], vec![]),
                "already an entry of the release",
            ),
            (with(vec![r("etc/app.yml", "config/app.yml.tmpl", "")], vec![]), "\"etc\" is not one"),
            (with(vec![r("log/x", "config/app.yml.tmpl", "")], vec![]), "\"log\" is not one"),
            (with(vec![r("config/a", "config", "")], vec![]), "its template \"config\" is not a file"),
            (with(vec![r("config/a", "config/app.yml.tmpl", "x")], vec![]), "not both"),
            (with(vec![r("../a", "", "x")], vec![]), "rendered file"),
            (with(vec![], vec![var("vars.db"), var("env")]), "sorted by name"),
            (with(vec![], vec![var("host")]), "is not a var name"),
        ] {
            let e = validate(&m).expect_err(needle).to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let h = hash(&ok);
        let mut changed = ok.clone();
        changed.vars[1].value = "y".into();
        assert_ne!(hash(&changed), h, "a changed value is a new release");
        let mut changed = ok.clone();
        changed.rendered[1].env_file = true;
        assert_ne!(hash(&changed), h);
    }

    #[test]
    fn owners_are_names_and_a_group_needs_a_user() {
        let with = |user: &str, group: &str| Manifest {
            entries: vec![dir("a")],
            user: user.into(),
            group: group.into(),
            ..Default::default()
        };
        for good in [("web", ""), ("_app", "www-data"), ("svc.api-1", "svc")] {
            validate(&with(good.0, good.1)).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        for (user, group, needle) in [
            ("root;id", "", "user \"root;id\": not a user or group name"),
            ("Web", "", "not a user or group name"),
            ("web", "../etc", "group \"../etc\""),
            ("", "web", "without a user"),
            (&"a".repeat(33), "", "not a user or group name"),
        ] {
            let e = validate(&with(user, group)).expect_err("refused").to_string();
            assert!(e.contains(needle), "{user:?} {group:?}: {e}");
        }
    }

    #[test]
    fn hash_changes_with_every_field() {
        let base = Manifest { entries: vec![file("a", b"x")], ..Default::default() };
        let h = hash(&base);
        let mut m = base.clone();
        m.entries[0].mode = 0o600;
        assert_ne!(hash(&m), h);
        let mut m = base.clone();
        m.entries[0].path = "b".into();
        assert_ne!(hash(&m), h);
        let mut m = base.clone();
        m.entries[0].hash[0] ^= 1;
        assert_ne!(hash(&m), h);
        // The owner counts; user and group are not interchangeable.
        let owned =
            |user: &str, group: &str| hash(&Manifest { user: user.into(), group: group.into(), ..base.clone() });
        assert_ne!(owned("web", ""), h);
        assert_ne!(owned("web", "web"), owned("web", ""));
        assert_ne!(owned("ab", ""), owned("a", "b"));
        assert_eq!(owned("", ""), h, "a manifest without an owner keeps its hash");
        let mut m = base;
        m.entries[0].kind = EntryKind::SharedFile as i32;
        assert_ne!(hash(&m), h);
    }

    /// Arbitrary byte soup decoded as a manifest never panics the validator (a cheap fuzz run;
    /// deterministic, so a failure reproduces).
    #[test]
    fn random_manifests_never_panic() {
        use prost::Message;
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let good = Manifest { entries: vec![dir("a"), file("a/b", b"hello"), link("c", "a/b")], ..Default::default() }
            .encode_to_vec();
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            let flips = (next() % 8) as usize + 1;
            for _ in 0..flips {
                let i = (next() % bytes.len() as u64) as usize;
                bytes[i] = next() as u8;
            }
            if let Ok(m) = Manifest::decode(bytes.as_slice()) {
                let _ = validate(&m);
                let _ = hash(&m);
            }
        }
    }
}

/// Property tests: the validator never panics, and whatever it accepts is actually safe.
#[cfg(test)]
mod props {
    use super::*;
    use crate::v1::{Chunk, Entry, Manifest};
    use proptest::prelude::*;

    fn component() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => "[a-z]{1,3}",
            1 => Just("..".to_string()),
            1 => Just(".".to_string()),
            1 => Just(String::new()),
        ]
    }

    fn path() -> impl Strategy<Value = String> {
        (any::<bool>(), prop::collection::vec(component(), 1..4))
            .prop_map(|(abs, parts)| format!("{}{}", if abs { "/" } else { "" }, parts.join("/")))
    }

    fn entry() -> impl Strategy<Value = Entry> {
        (
            path(),
            // Every kind (shared paths included) and one that does not exist.
            0i32..7,
            prop_oneof![Just(0o644u32), Just(0o755), Just(0o100644), any::<u32>()],
            prop_oneof![Just(0usize), Just(5), Just(HASH_LEN)],
            path(),
            prop::collection::vec((prop_oneof![Just(HASH_LEN), Just(3usize)], 0u64..300_000), 0..3),
        )
            .prop_map(|(path, kind, mode, hash_len, target, chunks)| {
                let chunks: Vec<Chunk> =
                    chunks.into_iter().map(|(l, length)| Chunk { hash: vec![7; l], length }).collect();
                Entry {
                    path,
                    kind,
                    mode,
                    size: chunks.iter().map(|c| c.length).sum(),
                    hash: vec![1; hash_len],
                    link_target: if kind == EntryKind::Symlink as i32 { target } else { String::new() },
                    chunks,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn accepted_manifests_are_safe(mut entries in prop::collection::vec(entry(), 0..12), sort in any::<bool>()) {
            if sort {
                entries.sort_by(|a, b| a.path.cmp(&b.path));
            }
            let m = Manifest { entries, ..Default::default() };
            let verdict = validate(&m);
            let _ = hash(&m);
            if verdict.is_ok() {
                let kinds: std::collections::HashMap<&str, i32> = m.entries.iter().map(|e| (e.path.as_str(), e.kind)).collect();
                for (i, e) in m.entries.iter().enumerate() {
                    prop_assert!(!e.path.starts_with('/'), "absolute {:?}", e.path);
                    prop_assert!(e.path.split('/').all(|c| !c.is_empty() && c != "." && c != ".."), "{:?}", e.path);
                    prop_assert!((1..=5).contains(&e.kind), "kind {}", e.kind);
                    prop_assert!(e.mode <= 0o7777);
                    if i > 0 {
                        prop_assert!(m.entries[i - 1].path < e.path, "sorted and unique");
                    }
                    if let Some((parent, _)) = e.path.rsplit_once('/') {
                        prop_assert_eq!(kinds.get(parent).copied(), Some(EntryKind::Dir as i32), "{:?} under a non-directory", e.path);
                    }
                    if e.kind == EntryKind::Symlink as i32 {
                        prop_assert!(symlink_stays_inside(&e.path, &e.link_target));
                        prop_assert!(!e.link_target.starts_with('/'));
                    }
                    if e.kind == EntryKind::File as i32 {
                        prop_assert_eq!(e.chunks.iter().map(|c| c.length).sum::<u64>(), e.size);
                    }
                    if is_shared(e) {
                        prop_assert!(e.size == 0 && e.hash.is_empty() && e.chunks.is_empty() && e.link_target.is_empty());
                    }
                }
            }
        }

        /// A delta applied to its base gives back exactly the new manifest.
        #[test]
        fn diff_then_apply_gives_the_new_manifest(
            a in prop::collection::vec(entry(), 0..12),
            b in prop::collection::vec(entry(), 0..12),
            keep in prop::collection::vec(any::<bool>(), 12),
        ) {
            let sorted = |mut v: Vec<Entry>| {
                v.sort_by(|x, y| x.path.cmp(&y.path));
                v.dedup_by(|x, y| x.path == y.path);
                Manifest { entries: v, ..Default::default() }
            };
            let base = sorted(a.clone());
            // The new manifest shares some entries with the base, changes or adds others.
            let mixed: Vec<Entry> = a.into_iter().zip(&keep).filter(|(_, k)| **k).map(|(e, _)| e).chain(b).collect();
            let new = sorted(mixed);
            let delta = diff(&base, &new);
            prop_assert!(delta.upserts.len() <= new.entries.len());
            prop_assert_eq!(apply_delta(&base, &delta), Ok(new));
        }

        /// Lexical containment agrees with a direct walk of the target from the link's directory.
        #[test]
        fn symlink_containment_matches_a_walk(link in "[a-z]{1,2}(/[a-z]{1,2}){0,3}", target in "(\\.\\.|[a-z]|\\.)(/(\\.\\.|[a-z]|\\.)){0,5}") {
            let mut stack: Vec<&str> = link.split('/').collect();
            stack.pop();
            let mut escaped = false;
            for c in target.split('/') {
                match c {
                    "." | "" => {}
                    ".." => if stack.pop().is_none() { escaped = true; break },
                    other => stack.push(other),
                }
            }
            prop_assert_eq!(symlink_stays_inside(&link, &target), !escaped);
        }
    }
}

#[cfg(test)]
mod pinned {
    use super::*;
    use crate::v1::{Chunk, Entry, Manifest, Rendered, Var};

    /// The encoding behind release ids never changes by accident: releases on the hosts are named
    /// by it.
    #[test]
    fn the_hash_of_a_known_manifest_is_pinned() {
        let file = Entry {
            path: "bin/app".into(),
            kind: EntryKind::File as i32,
            mode: 0o755,
            size: 3,
            hash: vec![9; HASH_LEN],
            chunks: vec![Chunk { hash: vec![8; HASH_LEN], length: 3 }],
            ..Default::default()
        };
        let dir = Entry { path: "bin".into(), kind: EntryKind::Dir as i32, mode: 0o755, ..Default::default() };
        let link = Entry {
            path: "run".into(),
            kind: EntryKind::Symlink as i32,
            link_target: "bin/app".into(),
            ..Default::default()
        };
        let plain = Manifest { entries: vec![dir, file, link], ..Default::default() };
        let full = Manifest {
            user: "web".into(),
            group: "www".into(),
            rendered: vec![Rendered {
                path: "a.conf".into(),
                template: "a.tmpl".into(),
                text: String::new(),
                mode: 0o640,
                env_file: false,
            }],
            vars: vec![Var { name: "env".into(), value: "prod".into() }],
            secrets: vec!["db".into()],
            ..plain.clone()
        };
        assert_eq!(Hex(&hash(&plain)).to_string(), "cb64c6894c7ed4313e0dc6a936755f31c9f5d22d904baeeb5c988dab9844d57f");
        assert_eq!(Hex(&hash(&full)).to_string(), "5fad9fbc05eabd50a166dbfa87cbe916456fcc574ed23b544dd25f7ebabd1e93");
    }
}
