//! The apps' secrets on this host: `<secrets_dir>/<app>/<release>/<name>`, one file per secret.
//!
//! The coordinator sends the values with each activation (`ActivateRequest.secrets`, over mTLS);
//! they are written here before anything else of the activation happens and are never logged or
//! audited. Each release has its own directory, which its rendered files name
//! (`{{ secrets.NAME }}`), so a rollback brings back the values the old release had. The app's
//! directory belongs to root and the app's group (0750), each release's too; each file to the
//! app's user, 0640 (root, 0600, for an app without a user). Nobody but root can write in these
//! directories, so paths are safe to use. `secrets_dir` should be a tmpfs (`/run/ferry`): after a
//! reboot the values are gone until the next deployment, and an activation that needs them says
//! so instead of starting the app without them.
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ferry_proto::v1;

use crate::owner::Owner;

/// Makes `dir` (a release's secrets directory) hold exactly `values`, which must be the secrets
/// `names` (the release's manifest) lists. Whether a value changed, was added or removed.
pub fn write(dir: &Path, names: &[String], values: &[v1::Var], owner: Option<&Owner>) -> Result<bool, String> {
    let mut sent: Vec<&str> = values.iter().map(|v| v.name.as_str()).collect();
    sent.sort_unstable();
    if sent != names.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(format!(
            "the coordinator sent the secrets [{}], the release reads [{}]",
            sent.join(", "),
            names.join(", ")
        ));
    }
    let app_dir = dir.parent().ok_or_else(|| format!("{} has no parent", dir.display()))?;
    for d in [app_dir, dir] {
        make_dir(d, owner)?;
    }
    // Each file is read once: the values that differ are kept aside, then written.
    let differing: Vec<&v1::Var> =
        values.iter().filter(|v| fs::read(dir.join(&v.name)).map_or(true, |old| old != v.value.as_bytes())).collect();
    if !differing.is_empty() {
        keep_previous(dir)?;
    }
    let mut changed = !differing.is_empty();
    for v in differing {
        ferry_proto::render::check_secret_name(&v.name)?;
        let path = dir.join(&v.name);
        let tmp = dir.join(format!(".{}.tmp", v.name));
        let _ = fs::remove_file(&tmp);
        let mode = if owner.is_some() { 0o640 } else { 0o600 };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| format!("write {}: {e}", tmp.display()))?;
        f.write_all(v.value.as_bytes()).map_err(|e| format!("write {}: {e}", tmp.display()))?;
        if let Some(o) = owner {
            std::os::unix::fs::fchown(&f, Some(o.uid.as_raw()), Some(o.gid.as_raw()))
                .map_err(|e| format!("give {} to the app's user: {e}", tmp.display()))?;
        }
        drop(f);
        fs::rename(&tmp, &path).map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    // Secrets the release no longer reads.
    for entry in fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !names.contains(&name) {
            changed = true;
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(changed)
}

/// The values a release had before [`write`] changed them, until its activation succeeds.
fn previous_dir(dir: &Path) -> std::path::PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.with_file_name(format!(".{name}.previous"))
}

/// Copies the release's current values aside (none yet: nothing to keep).
fn keep_previous(dir: &Path) -> Result<(), String> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(()) };
    let keep = previous_dir(dir);
    let _ = fs::remove_dir_all(&keep);
    fs::create_dir(&keep).map_err(|e| format!("create {}: {e}", keep.display()))?;
    fs::set_permissions(&keep, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod {}: {e}", keep.display()))?;
    for entry in entries.flatten() {
        let to = keep.join(entry.file_name());
        fs::copy(entry.path(), &to).map_err(|e| format!("keep {}: {e}", entry.path().display()))?;
        let meta = fs::metadata(entry.path()).map_err(|e| format!("{}: {e}", entry.path().display()))?;
        use std::os::unix::fs::MetadataExt;
        std::os::unix::fs::chown(&to, Some(meta.uid()), Some(meta.gid()))
            .map_err(|e| format!("chown {}: {e}", to.display()))?;
        fs::set_permissions(&to, meta.permissions()).map_err(|e| format!("chmod {}: {e}", to.display()))?;
    }
    Ok(())
}

/// Puts back the values a failed activation replaced: the release runs on them again.
pub fn restore(dir: &Path) -> Result<(), String> {
    let keep = previous_dir(dir);
    if !keep.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?.flatten() {
        let _ = fs::remove_file(entry.path());
    }
    for entry in fs::read_dir(&keep).map_err(|e| format!("read {}: {e}", keep.display()))?.flatten() {
        fs::rename(entry.path(), dir.join(entry.file_name()))
            .map_err(|e| format!("restore {}: {e}", entry.path().display()))?;
    }
    fs::remove_dir(&keep).map_err(|e| format!("remove {}: {e}", keep.display()))
}

/// Drops the values kept aside once the new ones proved healthy.
pub fn forget_previous(dir: &Path) {
    let _ = fs::remove_dir_all(previous_dir(dir));
}

/// Checks that a release's secrets are on this host (an activation or rollback that brings none).
pub fn present(dir: &Path, names: &[String]) -> Result<(), String> {
    let missing: Vec<&str> = names.iter().filter(|n| !dir.join(n).is_file()).map(String::as_str).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the secrets [{}] of this release are not on this host (in {}; gone after a reboot, as the directory is a tmpfs): deploy the release again, which brings them",
        missing.join(", "),
        dir.display()
    ))
}

/// Removes a pruned release's secrets (and any values kept aside for it).
pub fn remove(dir: &Path) {
    for d in [dir.to_path_buf(), previous_dir(dir)] {
        if let Err(e) = fs::remove_dir_all(&d)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %d.display(), "cannot remove secrets: {e}");
        }
    }
}

/// A directory only root writes in, readable by the app's group.
fn make_dir(d: &Path, owner: Option<&Owner>) -> Result<(), String> {
    match fs::create_dir(d) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
        }
        Err(e) => return Err(format!("create {}: {e}", d.display())),
    }
    let meta = fs::symlink_metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", d.display()));
    }
    let gid = owner.map_or(0, |o| o.gid.as_raw());
    std::os::unix::fs::lchown(d, Some(0), Some(gid)).map_err(|e| format!("chown {}: {e}", d.display()))?;
    fs::set_permissions(d, fs::Permissions::from_mode(if owner.is_some() { 0o750 } else { 0o700 }))
        .map_err(|e| format!("chmod {}: {e}", d.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(n: &str, v: &str) -> v1::Var {
        v1::Var { name: n.into(), value: v.into() }
    }

    #[test]
    fn a_release_holds_exactly_its_secrets_and_says_when_they_changed() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("web/1-abc");
        let names = vec!["api".to_string(), "db".to_string()];
        assert!(
            present(&dir, &names)
                .expect_err("none yet")
                .contains("the secrets [api, db] of this release are not on this host")
        );
        assert!(write(&dir, &names, &[var("db", "a"), var("api", "k")], None).expect("written"));
        assert_eq!(fs::read_to_string(dir.join("db")).expect("read"), "a");
        present(&dir, &names).expect("present");
        assert!(!write(&dir, &names, &[var("db", "a"), var("api", "k")], None).expect("same"), "nothing changed");
        assert!(write(&dir, &names, &[var("db", "b"), var("api", "k")], None).expect("changed"));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(dir.join("db")).expect("stat").mode() & 0o777, 0o600);
        let e = write(&dir, &names, &[var("db", "b")], None).expect_err("api missing");
        assert!(e.contains("the coordinator sent the secrets [db], the release reads [api, db]"), "{e}");
        // The values before the last change are kept until told otherwise, and can come back.
        restore(&dir).expect("restore");
        assert_eq!(fs::read_to_string(dir.join("db")).expect("read"), "a", "the values before the change are back");
        assert!(!previous_dir(&dir).exists());
        assert!(write(&dir, &names, &[var("db", "b"), var("api", "k")], None).expect("changed"));
        forget_previous(&dir);
        restore(&dir).expect("nothing kept: nothing to do");
        assert_eq!(fs::read_to_string(dir.join("db")).expect("read"), "b");
        assert!(write(&dir, &["db".to_string()], &[var("db", "b")], None).expect("fewer"), "api was removed");
        assert!(!dir.join("api").exists());
        remove(&dir);
        assert!(!dir.exists());
    }
}
