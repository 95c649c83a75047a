#!/usr/bin/env bash
# Peer fetch on a real fleet: 5 systemd-nspawn hosts, every link shaped (default 50 Mbit/s), a
# release of new random content (default 50 MiB) deployed all-at-once with peer_fetch off and on:
# the wall time and the bytes the coordinator's link carried, in copies of the release.
# See tests/src/bin/ferry-bench/fanout.rs for what is measured and how.
#
# Usage: benches/fanout.sh [--mb 50] [--mbit 50]   (root; release binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
exec target/release/ferry-bench fanout "$@"
