//! The harness of ferry's integration and end-to-end tests.
//!
//! # Layout
//! - [`pki`]: a throwaway fleet CA in a temp dir, issuing real certificates (valid, expired, of
//!   another CA) through the coordinator's own PKI code.
//! - [`agents`]: real agents (the library the `ferry-agent` binary runs) served on loopback
//!   ports, and fleet configs pointing at them.
//! - [`fleet`]: real hosts (systemd-nspawn, systemd as PID 1, own network namespace) running the
//!   built agent from the real unit file; fault injection; teardown and stale-run reaping.
//! - [`engine`]: the coordinator's engine run in-process against real agents (deploy, rollback).
//! - [`debroot`]: a cached minimal Debian root (debootstrap) for hosts that install packages.
//! - [`demo_app`]: the app the fleet runs, whose `/health` tells versions apart.
//! - [`postgres`]: a real PostgreSQL in the coordinator's namespace (a shared registry).
//! - [`serve`]: `ferry serve` on the fleet (its fleet.toml, its role) for failover tests.
//! - [`signals`]: a real Prometheus and a webhook receiver in the coordinator's namespace.
//! - [`bin`]: paths of the built `ferry` and `ferry-agent` binaries for CLI-level tests.
//! - [`wait_for`]: polling for an asynchronous effect with a bounded number of tries (never a
//!   timing assertion).
#![forbid(unsafe_code)]

pub mod agents;
pub mod debroot;
pub mod demo_app;
pub mod engine;
pub mod fleet;
pub mod pki;
pub mod postgres;
pub mod serve;
pub mod signals;
pub mod sim;

use std::path::PathBuf;

/// Path of a binary of this workspace, built next to the test executable's directory.
///
/// `scripts/test.sh` builds the binaries before running the tests; running a test binary alone
/// needs `cargo build --workspace --bins` first.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // A test runs from target/<profile>/deps/, a binary of this crate from target/<profile>/.
    let here = exe.parent().map(PathBuf::from).unwrap_or_default();
    let path = [here.join(name), here.parent().map(|p| p.join(name)).unwrap_or_default()]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| here.join(name));
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// `len` bytes of repeatable noise (xorshift from `seed`): content that compresses and chunks
/// like a real binary.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

/// Polls `check` up to `tries` times, 50 ms apart, until it returns `Some`.
pub async fn wait_for<T>(tries: u32, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    for _ in 0..tries {
        if let Some(v) = check() {
            return Some(v);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    None
}
