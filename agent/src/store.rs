//! The release store of each app: `<data_dir>/apps/<app>/{releases/, current, staging/, journal}`.
//!
//! This version reads the store (what `current` points at, which releases are kept); staging,
//! promotion and the atomic swap arrive with the release engine. Invariant relied on by readers:
//! `current` is a symlink `releases/<release-id>`, replaced only by `rename(2)`, so it is always
//! either absent or a complete release.
use std::path::{Path, PathBuf};

use ferry_proto::v1;

/// A release id is `<version>-<short manifest hash>`; the version is everything before the last '-'.
pub fn version_of(release_id: &str) -> &str {
    release_id.rsplit_once('-').map_or(release_id, |(v, _)| v)
}

/// One app's store on disk.
pub struct AppStore {
    dir: PathBuf,
}

impl AppStore {
    pub fn new(dir: PathBuf) -> Self {
        AppStore { dir }
    }

    fn releases_dir(&self) -> PathBuf {
        self.dir.join("releases")
    }

    /// The release id `current` points at, if any.
    pub fn current(&self) -> std::io::Result<Option<String>> {
        link_target_name(&self.dir.join("current"))
    }

    /// Release ids kept on disk, newest first (by directory mtime, then id).
    pub fn releases(&self) -> std::io::Result<Vec<v1::Release>> {
        let current = self.current()?;
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(self.releases_dir()) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let meta = entry.metadata()?;
            if !meta.is_dir() {
                continue;
            }
            let id = entry.file_name().to_string_lossy().into_owned();
            let created = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs() as i64);
            out.push(v1::Release {
                version: version_of(&id).to_string(),
                current: current.as_deref() == Some(id.as_str()),
                id,
                created_unix: created,
                ..Default::default()
            });
        }
        out.sort_by(|a, b| b.created_unix.cmp(&a.created_unix).then_with(|| b.id.cmp(&a.id)));
        Ok(out)
    }
}

fn link_target_name(link: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_link(link) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_id_without_hash() {
        assert_eq!(version_of("1.4.0-3f2a9c1d"), "1.4.0");
        assert_eq!(version_of("1.4.0-rc1-3f2a9c1d"), "1.4.0-rc1");
        assert_eq!(version_of("plain"), "plain");
    }

    #[test]
    fn reads_current_and_releases() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = AppStore::new(tmp.path().to_owned());
        assert_eq!(store.current().expect("read"), None);
        assert!(store.releases().expect("read").is_empty());
        std::fs::create_dir_all(tmp.path().join("releases/1.0-aaaa")).expect("mkdir");
        std::fs::create_dir_all(tmp.path().join("releases/2.0-bbbb")).expect("mkdir");
        std::os::unix::fs::symlink("releases/2.0-bbbb", tmp.path().join("current")).expect("symlink");
        assert_eq!(store.current().expect("read").as_deref(), Some("2.0-bbbb"));
        let rels = store.releases().expect("read");
        assert_eq!(rels.len(), 2);
        assert!(rels.iter().any(|r| r.id == "2.0-bbbb" && r.current && r.version == "2.0"));
        assert!(rels.iter().any(|r| r.id == "1.0-aaaa" && !r.current));
    }
}
