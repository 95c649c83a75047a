#!/usr/bin/env bash
# The same deployments run by the CLI's own engine and through `ferry serve` (the pipeline API,
# driven with `ferry --server`), on a real test fleet of 3 systemd-nspawn hosts: deploy wall time
# (upload, registration and the event stream included), time to the API's 202, and a small read.
# See tests/src/bin/ferry-bench.rs (bench_api) for what is measured and how.
#
# Usage: benches/api.sh [--mb 5]   (root; release binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench: needs root (containers, network namespaces)" >&2; exit 2; }
cargo build --release --locked -p ferry-agent -p ferry-coordinator -p ferry-tests --bins >&2
export FERRY_BIN=$PWD/target/release/ferry FERRY_AGENT_BIN=$PWD/target/release/ferry-agent
[ $# -gt 0 ] || set -- --mb 5
exec target/release/ferry-bench api "$@"
