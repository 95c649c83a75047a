#!/usr/bin/env bash
# The rollout engine's figures on a real test fleet (5 systemd-nspawn hosts): coordinator
# overhead per host beyond the agents' own activation time, and a 50 MB release to 5 hosts with
# and without pre-staging, on bare links and on links shaped to 200 Mbit/s. See
# tests/src/bin/ferry-bench.rs for what is measured and how.
#
# Usage: benches/rollout.sh [--mb 50] [--mbit 200]   (root; release binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench: needs root (containers, network namespaces)" >&2; exit 2; }
cargo build --release --locked -p ferry-agent -p ferry-coordinator -p ferry-tests --bins >&2
export FERRY_BIN=$PWD/target/release/ferry FERRY_AGENT_BIN=$PWD/target/release/ferry-agent
exec target/release/ferry-bench rollout "$@"
