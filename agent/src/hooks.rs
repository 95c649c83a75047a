//! Lifecycle hooks: executables shipped in the release, run by the agent at fixed points of an
//! activation (as CodeDeploy's appspec hooks): `before_block_traffic`, `before_install`,
//! `after_install`, `validate`, `after_allow_traffic`.
//!
//! A hook runs in the release directory, in its own process group, with `FERRY_APP`,
//! `FERRY_VERSION`, `FERRY_RELEASE_DIR`, `FERRY_PREVIOUS_RELEASE_DIR`, `FERRY_DEPLOYMENT_ID` and
//! `FERRY_HOOK` set, as the release's app user (unless fleet.toml names the hook in `as_root`;
//! root for a release without a user). Its stdout and stderr are captured (bounded) into the report. A hook can
//! never hang the agent: at its timeout the whole process group is killed, and once the hook
//! itself has exited, a child it left behind holding stdout open is killed too instead of being
//! waited for.
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Output kept per stream.
const MAX_OUTPUT: usize = 16 * 1024;
/// After the hook exits, how long its output pipes may stay open.
const DRAIN: Duration = Duration::from_millis(500);

/// What a hook printed and how it ended.
#[derive(Debug, Clone)]
pub struct HookRun {
    pub output: String,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("hook {hook} ({path}) {how}{}", if output.is_empty() { String::new() } else { format!("; its output:\n{output}") })]
pub struct HookFailure {
    pub hook: String,
    pub path: String,
    pub how: String,
    pub output: String,
}

/// The deployment facts a hook is told through its environment.
pub struct HookEnv<'a> {
    pub app: &'a str,
    pub version: &'a str,
    pub release_dir: &'a Path,
    pub previous_release_dir: Option<&'a Path>,
    pub deployment_id: &'a str,
    /// The release's app user; hooks run as it.
    pub owner: Option<&'a crate::owner::Owner>,
    /// Hooks run as root all the same, by name.
    pub as_root: &'a [String],
}

/// Reads up to `MAX_OUTPUT` bytes, then keeps draining (and discarding) so the writer never blocks.
async fn capture(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Runs hook `name` at `rel` (a path inside the release) with `timeout`.
pub async fn run(name: &str, rel: &str, env: &HookEnv<'_>, timeout: Duration) -> Result<HookRun, HookFailure> {
    let fail = |how: String, output: String| HookFailure { hook: name.to_string(), path: rel.to_string(), how, output };
    if let Err(e) = ferry_proto::manifest::check_path(rel) {
        return Err(fail(format!("is not a path inside the release: {e}"), String::new()));
    }
    let path = env.release_dir.join(rel);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(fail("is not a regular file in the release".into(), String::new())),
        Err(e) => return Err(fail(format!("cannot be run: {e}"), String::new())),
    }
    let mut cmd = tokio::process::Command::new(&path);
    cmd.current_dir(env.release_dir)
        .env("FERRY_APP", env.app)
        .env("FERRY_VERSION", env.version)
        .env("FERRY_RELEASE_DIR", env.release_dir)
        .env("FERRY_PREVIOUS_RELEASE_DIR", env.previous_release_dir.unwrap_or(Path::new("")))
        .env("FERRY_DEPLOYMENT_ID", env.deployment_id)
        .env("FERRY_HOOK", name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Its own process group, so a timeout kills everything it started.
    cmd.as_std_mut().process_group(0);
    if let Some(o) = env.owner.filter(|_| !env.as_root.iter().any(|h| h == name)) {
        o.apply(cmd.as_std_mut());
    }
    let mut child = cmd.spawn().map_err(|e| fail(format!("cannot be started: {e}"), String::new()))?;
    let pid = child.id().unwrap_or(0);
    // Both were configured as pipes just above, so take() cannot return None.
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        kill_group(pid);
        return Err(fail("has no output pipes".into(), String::new()));
    };
    let out = tokio::spawn(capture(stdout));
    let err = tokio::spawn(capture(stderr));
    let status = tokio::time::timeout(timeout, child.wait()).await;
    if status.is_err() {
        kill_group(pid);
        let _ = child.wait().await;
    }
    // The hook is gone; its output pipes may be held open by children it left behind: give them
    // a moment, then kill the group so the report is never blocked.
    let drained =
        tokio::time::timeout(DRAIN, async { (out.await.unwrap_or_default(), err.await.unwrap_or_default()) }).await;
    let (o, e) = match drained {
        Ok(v) => v,
        Err(_) => {
            kill_group(pid);
            (b"(output cut: a process the hook started kept its output open)".to_vec(), Vec::new())
        }
    };
    let mut output = String::from_utf8_lossy(&o).into_owned();
    if !e.is_empty() {
        output.push_str(&String::from_utf8_lossy(&e));
    }
    let output = output.trim_end().to_string();
    match status {
        Err(_) => Err(fail(format!("did not finish within {timeout:?}; its process group was killed"), output)),
        Ok(Err(e)) => Err(fail(format!("could not be waited for: {e}"), output)),
        Ok(Ok(s)) if s.success() => Ok(HookRun { output }),
        Ok(Ok(s)) => Err(fail(format!("failed ({s})"), output)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    fn env(dir: &Path) -> HookEnv<'_> {
        HookEnv {
            app: "web",
            version: "2",
            release_dir: dir,
            previous_release_dir: None,
            deployment_id: "d-1",
            owner: None,
            as_root: &[],
        }
    }

    #[tokio::test]
    async fn success_failure_and_environment() {
        let d = tempfile::tempdir().expect("tempdir");
        script(d.path(), "ok", "echo \"$FERRY_APP $FERRY_VERSION $FERRY_HOOK $FERRY_DEPLOYMENT_ID\"");
        let r = run("validate", "ok", &env(d.path()), Duration::from_secs(5)).await.expect("ok");
        assert_eq!(r.output, "web 2 validate d-1");

        script(d.path(), "bad", "echo checking; echo 'db unreachable' >&2; exit 1");
        let e = run("validate", "bad", &env(d.path()), Duration::from_secs(5)).await.expect_err("exit 1");
        assert!(e.to_string().contains("failed (exit status: 1)") && e.output.contains("db unreachable"), "{e}");

        let e = run("validate", "missing", &env(d.path()), Duration::from_secs(5)).await.expect_err("missing");
        assert!(e.how.contains("cannot be run"), "{e}");
        let e = run("validate", "../../bin/sh", &env(d.path()), Duration::from_secs(5)).await.expect_err("escape");
        assert!(e.how.contains("not a path inside the release"), "{e}");
    }

    #[tokio::test]
    async fn hooks_run_as_the_app_user_unless_named_for_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: running a hook as another user needs root");
            return;
        }
        let d = tempfile::tempdir().expect("tempdir");
        // The tempdir is 0700: the app user must be able to enter the release dir.
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        script(d.path(), "who", "echo \"$(id -u) $USER $HOME\"");
        let nobody =
            crate::owner::Owner::of(&ferry_proto::v1::Manifest { user: "nobody".into(), ..Default::default() })
                .expect("lookup")
                .expect("nobody exists");
        let as_root = vec!["after_install".to_string()];
        let env = HookEnv { owner: Some(&nobody), as_root: &as_root, ..env(d.path()) };
        let r = run("validate", "who", &env, Duration::from_secs(5)).await.expect("ok");
        assert_eq!(r.output, format!("{} nobody {}", nobody.uid, nobody.home.display()));
        let r = run("after_install", "who", &env, Duration::from_secs(5)).await.expect("ok");
        assert!(r.output.starts_with("0 "), "named in as_root: {}", r.output);
    }

    #[tokio::test]
    async fn a_hanging_hook_is_killed_with_its_children() {
        let d = tempfile::tempdir().expect("tempdir");
        script(d.path(), "hang", "sleep 300 & echo started; sleep 300");
        let e = run("before_install", "hang", &env(d.path()), Duration::from_millis(300)).await.expect_err("timeout");
        assert!(e.how.contains("did not finish within 300ms; its process group was killed"), "{e}");
    }

    #[tokio::test]
    async fn a_child_holding_stdout_open_does_not_block_the_report() {
        let d = tempfile::tempdir().expect("tempdir");
        script(d.path(), "leaky", "sleep 300 & echo done");
        let r = run("after_install", "leaky", &env(d.path()), Duration::from_secs(5))
            .await
            .expect("the hook itself succeeded");
        assert!(r.output.contains("done") || r.output.contains("output cut"), "{}", r.output);
    }
}
