//! Named crash points for crash-safety tests.
//!
//! Compiled in only with the `failpoints` feature (test builds: the workspace's test crate turns
//! it on; `scripts/install.sh` builds without it). When the environment variable
//! `FERRY_FAILPOINTS` lists a point's name (comma-separated), reaching it kills the agent with
//! SIGKILL on the spot: no destructors, no flushing, exactly like `kill -9`. The file named by
//! `FERRY_FAILPOINTS_FILE`, if it exists, arms the points it lists the same way, once: the agent
//! removes the file as it dies (the soak arms a running agent's points with it, and the restarted
//! agent runs clean).
//!
//! Points: `after-upload` (commit begins), `mid-materialize` (half the files written),
//! `before-promote` (tree complete, not yet in releases/), `before-swap-rename` (new symlink
//! made, not yet renamed over `current`), `after-swap` (`current` switched, units not yet
//! restarted), `after-restart` (units restarted, health not yet probed), `peer-serve` (serving
//! a peer's GetChunks).
//!
//! Faults that do not kill ([`armed`]): `peer-corrupt` (every chunk served to a peer has a byte
//! flipped), `peer-drop` (a peer's GetChunks breaks off halfway), armed the same two ways, and
//! left armed while listed.

/// Whether the named fault is armed (by `FERRY_FAILPOINTS` or the file, which is left as it is).
pub fn armed(name: &str) -> bool {
    #[cfg(feature = "failpoints")]
    {
        let listed = |v: &str| v.split([',', '\n']).any(|n| n.trim() == name);
        let by_file = std::env::var_os("FERRY_FAILPOINTS_FILE")
            .is_some_and(|f| std::fs::read_to_string(f).is_ok_and(|v| listed(&v)));
        std::env::var("FERRY_FAILPOINTS").is_ok_and(|v| listed(&v)) || by_file
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        false
    }
}

/// Dies here if the named failpoint is armed.
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    {
        let listed = |v: &str| v.split([',', '\n']).any(|n| n.trim() == name);
        let by_env = std::env::var("FERRY_FAILPOINTS").is_ok_and(|v| listed(&v));
        let file = std::env::var_os("FERRY_FAILPOINTS_FILE").map(std::path::PathBuf::from);
        let by_file = file.as_ref().is_some_and(|f| std::fs::read_to_string(f).is_ok_and(|v| listed(&v)));
        if by_file && let Some(f) = &file {
            let _ = std::fs::remove_file(f);
        }
        if by_env || by_file {
            eprintln!("ferry-agent: failpoint {name}: SIGKILL");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
