//! The app's user and group, as a release names them (`Manifest.user` / `group`).
//!
//! A release with an owner belongs to its group (root stays the owner: the app reads what the
//! modes let a group read and writes none of it); its shared paths belong to the user; its hooks
//! and exec probes run as the user (with its supplementary groups, `HOME`, `USER` and `LOGNAME`)
//! unless fleet.toml asks for root by name. The names are looked up on this host every time they
//! are used, so a missing user refuses a deployment at Prepare, before anything changes.
use std::ffi::CString;
use std::path::PathBuf;

use ferry_proto::v1;
use nix::unistd::{Gid, Group, Uid, User};

/// A user and group that exist on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub user: String,
    pub uid: Uid,
    pub gid: Gid,
    /// The user's supplementary groups (and the app group).
    pub groups: Vec<Gid>,
    pub home: PathBuf,
}

impl Owner {
    /// The owner `m` names; `None` for a release without one. Errors name the user or group.
    pub fn of(m: &v1::Manifest) -> Result<Option<Owner>, String> {
        if m.user.is_empty() {
            return Ok(None);
        }
        let user = User::from_name(&m.user)
            .map_err(|e| format!("cannot look up the app's user {:?}: {e}", m.user))?
            .ok_or_else(|| {
                format!(
                    "the app's user {:?} does not exist on this host (create it first, e.g. `adduser --system --group {}`)",
                    m.user, m.user
                )
            })?;
        let gid = if m.group.is_empty() {
            user.gid
        } else {
            Group::from_name(&m.group)
                .map_err(|e| format!("cannot look up the app's group {:?}: {e}", m.group))?
                .ok_or_else(|| format!("the app's group {:?} does not exist on this host", m.group))?
                .gid
        };
        let name = CString::new(m.user.as_str()).map_err(|_| format!("user name {:?} holds a NUL", m.user))?;
        let mut groups = nix::unistd::getgrouplist(&name, gid)
            .map_err(|e| format!("cannot list the groups of the app's user {:?}: {e}", m.user))?;
        if !groups.contains(&gid) {
            groups.push(gid);
        }
        Ok(Some(Owner { user: m.user.clone(), uid: user.uid, gid, groups, home: user.dir }))
    }

    /// Makes `cmd` run as this user: its uid, the app group as primary group, its supplementary
    /// groups; `HOME`, `USER` and `LOGNAME` set to the user's.
    pub fn apply(&self, cmd: &mut std::process::Command) {
        cmd.env("HOME", &self.home).env("USER", &self.user).env("LOGNAME", &self.user);
        drop_privileges(cmd, self.uid, self.gid, self.groups.clone());
    }
}

/// The one place the agent needs `unsafe`: std's `Command::uid` clears the supplementary groups
/// and has no stable way to set them, so the child sets groups, gid and uid itself, in that
/// order, between fork and exec.
#[allow(unsafe_code)]
fn drop_privileges(cmd: &mut std::process::Command, uid: Uid, gid: Gid, groups: Vec<Gid>) {
    use std::os::unix::process::CommandExt;
    let set = move || -> std::io::Result<()> {
        nix::unistd::setgroups(&groups)?;
        nix::unistd::setgid(gid)?;
        nix::unistd::setuid(uid)?;
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec; it only makes the setgroups,
    // setgid and setuid system calls (async-signal-safe) on data prepared before the fork, and
    // allocates nothing.
    unsafe {
        cmd.pre_exec(set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(user: &str, group: &str) -> v1::Manifest {
        v1::Manifest { user: user.into(), group: group.into(), ..Default::default() }
    }

    #[test]
    fn a_release_without_a_user_has_no_owner_and_unknown_names_are_refused_by_name() {
        assert_eq!(Owner::of(&named("", "")), Ok(None));
        let e = Owner::of(&named("ferry-no-such-user", "")).expect_err("refused");
        assert!(e.contains("the app's user \"ferry-no-such-user\" does not exist on this host"), "{e}");
        let e = Owner::of(&named("root", "ferry-no-such-group")).expect_err("refused");
        assert!(e.contains("the app's group \"ferry-no-such-group\" does not exist"), "{e}");
        let root = Owner::of(&named("root", "")).expect("root exists").expect("an owner");
        assert_eq!((root.uid, root.gid), (Uid::from_raw(0), Gid::from_raw(0)));
        assert!(root.groups.contains(&Gid::from_raw(0)));
    }

    #[test]
    fn a_command_runs_as_the_owner_with_its_groups() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: dropping privileges needs root");
            return;
        }
        let nobody = Owner::of(&named("nobody", "")).expect("lookup").expect("nobody exists");
        let mut cmd = std::process::Command::new("id");
        nobody.apply(&mut cmd);
        let out = cmd.output().expect("run id");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.starts_with(&format!("uid={}(nobody) gid={}", nobody.uid, nobody.gid)), "{text}");
        assert!(!text.contains("groups=0(root)") && !text.contains(",0(root)"), "root's groups were dropped: {text}");
    }
}
