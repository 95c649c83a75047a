#!/usr/bin/env bash
# The shared registry's figures (issue 20): SQLite and PostgreSQL side by side (write latency, a
# deployment's registry time, deployments and reads through `ferry serve` on 3 systemd-nspawn
# hosts), then the failover time of two `ferry serve` on one PostgreSQL with the default lease.
# See tests/src/bin/ferry-bench/registry.rs for what is measured and how.
#
# Usage: benches/registry.sh   (root; release binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
exec target/release/ferry-bench registry "$@"
