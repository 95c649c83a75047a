#!/usr/bin/env bash
# Every check CI runs, on a fresh Debian machine: installs what the tests need, then formatting,
# lints, the build, and the whole test suite (unit, loopback mTLS, agent process tests).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The integration tests run the built `ferry` and `ferry-agent` binaries.
cargo build --workspace --bins --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
