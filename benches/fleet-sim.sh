#!/usr/bin/env bash
# The coordinator at fleet scale: the release `ferry` against simulated agents (real mTLS and
# gRPC, one address and certificate each, releases in memory) in a network namespace of the
# bench's own. `ferry status`, then a release of new random content (default 10 MiB) deployed
# all-at-once and rolling 10 % with peer fetch on and off: wall time, the coordinator's peak RSS,
# its egress in copies of the release. See tests/src/bin/ferry-bench/fleetsim.rs.
#
# Usage: benches/fleet-sim.sh [--agents 1000,10000] [--mb 10]   (root)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
exec target/release/ferry-bench fleet-sim "$@"
