#!/usr/bin/env bash
# The rollout engine alone: one rolling deployment (batches of 1%) through the same engine
# `ferry deploy` runs, on the scripted in-memory fleet (coordinator/src/fleet/fake.rs), for each
# fleet size: CPU time, wall time and the process's peak memory. The registry is SQLite in memory,
# and for the smallest size also on disk (synchronous=FULL, as `ferry deploy` writes it). No root,
# no hosts. See tests/src/bin/ferry-bench.rs (bench_engine).
#
# Usage: benches/engine.sh [--hosts 1000,10000]   (release build)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p ferry-tests --bin ferry-bench >&2
exec target/release/ferry-bench engine "$@"
