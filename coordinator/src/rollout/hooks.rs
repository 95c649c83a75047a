//! Coordinator hooks: the commands of fleet.toml that run where `ferry` runs (`before_host`,
//! `after_host`, blue-green's `switch` and `after_switch`), owned by the engine.
//!
//! Each runs as `sh -c` in a process group of its own, with [`HOOK_TIMEOUT`] to finish. A cancel
//! (the first Ctrl-C, SIGTERM) does not touch a hook in flight: a drain or undrain runs to its
//! end instead of dying half-way. Only dropping the hook's future (the process stopping at once)
//! kills its whole process group, so nothing it started outlives the coordinator.
use std::time::Duration;

/// How long a coordinator hook may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// Kills a hook's process group when dropped before the hook ended.
struct Group(Option<i32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Runs `cmd` (`sh -c`) with `vars` in its environment; a failure names the hook, the command and
/// its stderr's tail.
pub async fn run(name: &str, cmd: &str, vars: &[(&str, String)]) -> Result<(), String> {
    let child = tokio::process::Command::new("/bin/sh")
        .args(["-c", cmd])
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{name} hook {cmd:?} could not start: {e}"))?;
    let mut group = Group(child.id().and_then(|pid| i32::try_from(pid).ok()));
    let result = tokio::time::timeout(HOOK_TIMEOUT, child.wait_with_output()).await;
    if result.is_ok() {
        // Ended by itself: its group is gone (or left to whatever it started on purpose).
        group.0 = None;
    }
    match result {
        Err(_) => Err(format!("{name} hook {cmd:?} did not finish within {HOOK_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("{name} hook {cmd:?} could not start: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let tail = String::from_utf8_lossy(&out.stderr);
            let tail: String = tail.chars().rev().take(500).collect::<Vec<_>>().into_iter().rev().collect();
            Err(format!("{name} hook {cmd:?} failed ({}): {}", out.status, tail.trim()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_hook_names_itself_and_its_stderr() {
        let e = run("before_host", "echo drained >&2; exit 3", &[]).await.expect_err("fails");
        assert!(e.contains("before_host hook") && e.contains("drained") && e.contains("exit status: 3"), "{e}");
        run("after_host", "test \"$FERRY_HOST\" = web-1", &[("FERRY_HOST", "web-1".into())]).await.expect("passes");
    }

    #[tokio::test]
    async fn a_dropped_hook_takes_its_process_group_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        let cmd = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let hook = tokio::spawn(async move { run("switch", &cmd, &[]).await });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
                break pid;
            }
            assert!(std::time::Instant::now() < deadline, "the hook never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        hook.abort();
        let _ = hook.await;
        // The grandchild (`sleep`) dies with the group, not only `sh`.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z"))
        {
            assert!(std::time::Instant::now() < deadline, "sleep {pid} outlived its hook");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
