#!/usr/bin/env bash
# How long after a failing batch its rollback starts: on a real test fleet of 3 systemd-nspawn
# hosts with a real Prometheus (Debian's, unpacked by scripts/deps.sh --test) scraping the demo
# app, releases with 10 % errors against an error-rate metric gate, per measurement interval.
# See tests/src/bin/ferry-bench.rs (bench_gates) for what is measured and how.
#
# Usage: benches/gates.sh   (root; release binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
exec target/release/ferry-bench gates "$@"
