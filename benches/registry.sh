#!/usr/bin/env bash
# The shared registry's figures (issue 20): SQLite and PostgreSQL side by side (write latency, a
# deployment's registry time, deployments and reads through `ferry serve` on 3 systemd-nspawn
# hosts), then the failover time of two `ferry serve` on one PostgreSQL with the default lease.
# See tests/src/bin/ferry-bench/registry.rs for what is measured and how.
#
# Usage: benches/registry.sh   (root; release binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench: needs root (containers, network namespaces)" >&2; exit 2; }
./scripts/deps.sh --test
cargo build --release --locked -p ferry-agent -p ferry-coordinator -p ferry-tests --bins >&2
export FERRY_BIN=$PWD/target/release/ferry FERRY_AGENT_BIN=$PWD/target/release/ferry-agent
exec target/release/ferry-bench registry "$@"
