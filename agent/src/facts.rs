//! Host facts for `GetStatus`: who and what this host is, and how much room it has.
//!
//! Gathering reads /proc and calls statvfs: blocking work, so callers run it in
//! `spawn_blocking`. Nothing here fails the request; a fact that cannot be read is reported as 0
//! or empty and logged.
use std::path::Path;

use ferry_proto::v1;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use crate::config::AgentConfig;
use crate::store::{AppStore, version_of};

/// Gathers host facts and the state of every configured app.
pub fn gather(config: &AgentConfig, agent_name: &str) -> v1::HostStatus {
    let sys = System::new_with_specifics(
        RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()).with_cpu(CpuRefreshKind::nothing()),
    )
    .inspect_err(|e| tracing::warn!(error = %e, "cannot read CPU and memory facts"))
    .ok();
    let (free, total) = disk_space(&config.data_dir);
    let apps = config
        .apps
        .iter()
        .map(|(name, app)| {
            let store = AppStore::new(config.app_dir(name));
            let current = store.current().unwrap_or_else(|e| {
                tracing::warn!(app = name, error = %e, "cannot read the app's current release");
                None
            });
            let kept = store.releases().map(|r| r.len()).unwrap_or(0);
            let activation_unfinished = current.is_some() && store.activated() != current;
            v1::AppStatus {
                name: name.clone(),
                root: app.root.display().to_string(),
                current_version: current.as_deref().map(version_of).unwrap_or_default().to_string(),
                current_release: current.unwrap_or_default(),
                releases_kept: u32::try_from(kept).unwrap_or(u32::MAX),
                units: app.units.clone(),
                activation_unfinished,
            }
        })
        .collect();
    v1::HostStatus {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        agent_name: agent_name.to_string(),
        hostname: System::host_name().unwrap_or_default(),
        os: System::long_os_version().unwrap_or_default(),
        kernel: System::kernel_version().unwrap_or_default(),
        uptime_secs: System::uptime().unwrap_or(0),
        cpu_count: sys.as_ref().map_or(0, |s| u32::try_from(s.cpus().len()).unwrap_or(u32::MAX)),
        memory_total_bytes: sys.as_ref().map_or(0, System::total_memory),
        memory_available_bytes: sys.as_ref().map_or(0, System::available_memory),
        data_dir: config.data_dir.display().to_string(),
        data_dir_free_bytes: free,
        data_dir_total_bytes: total,
        apps,
    }
}

/// Free (for unprivileged writers) and total bytes of the filesystem holding `path`, or of its
/// nearest existing ancestor (the data dir may not exist before the first deployment).
pub fn disk_space(path: &Path) -> (u64, u64) {
    let mut probe = path;
    loop {
        match nix::sys::statvfs::statvfs(probe) {
            // fsblkcnt_t and friends are not u64 on every target.
            #[allow(clippy::unnecessary_cast)]
            Ok(st) => {
                let frag = st.fragment_size() as u64;
                return (st.blocks_available() as u64 * frag, st.blocks() as u64 * frag);
            }
            Err(nix::errno::Errno::ENOENT) => match probe.parent() {
                Some(parent) => probe = parent,
                None => return (0, 0),
            },
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "statvfs failed");
                return (0, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_space_of_missing_dir_uses_ancestor() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (free, total) = disk_space(&tmp.path().join("not/yet/created"));
        assert!(total > 0 && free <= total, "free {free} total {total}");
    }
}
