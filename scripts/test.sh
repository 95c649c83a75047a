#!/usr/bin/env bash
# Every check CI runs, on a fresh Debian machine: installs what the tests need, then formatting,
# lints, the build, and the whole test suite: unit, loopback mTLS, agent process, and end-to-end
# tests on a fleet of real systemd hosts (a short soak with faults among them); then a bounded
# fuzzing run.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh --test
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The integration tests run the built `ferry` and `ferry-agent` binaries; the fleet tests boot
# real systemd hosts (systemd-nspawn) and need root; the package tests package these same binaries
# (packaging/build-deb.sh --bin-dir target/debug) and install them on a Debian host of its own,
# built once with debootstrap and cached in /var/cache/ferry-test. Whatever a killed test run left
# behind is removed on exit.
cargo build --workspace --bins --locked
trap 'target/debug/ferry-fleet clean || true' EXIT
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
# Coverage-guided fuzzing, bounded: each target 10 s from its committed seed corpus (the soak's
# short run is one of the tests above; scripts/soak.sh runs a long one).
./scripts/fuzz.sh "${FERRY_FUZZ_SECONDS:-10}"
