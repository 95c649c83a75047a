//! Named crash points for crash-safety tests.
//!
//! Compiled in only with the `failpoints` feature (test builds: the workspace's test crate turns
//! it on; `scripts/install.sh` builds without it). When the environment variable
//! `FERRY_FAILPOINTS` lists a point's name (comma-separated), reaching it kills the agent with
//! SIGKILL on the spot: no destructors, no flushing, exactly like `kill -9`.
//!
//! Points: `after-upload` (commit begins), `mid-materialize` (half the files written),
//! `before-promote` (tree complete, not yet in releases/), `before-swap-rename` (new symlink
//! made, not yet renamed over `current`).

/// Dies here if the named failpoint is armed.
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("FERRY_FAILPOINTS").is_ok_and(|v| v.split(',').any(|n| n.trim() == name)) {
        eprintln!("ferry-agent: failpoint {name}: SIGKILL");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
