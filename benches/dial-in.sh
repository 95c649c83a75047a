#!/usr/bin/env bash
# Agents that dial in against agents that are dialed, with the simulated agents (real mTLS and
# gRPC, one certificate each) and the release `ferry`, in a network namespace of the bench's own:
# `ferry status` dialing every agent, then the same agents dialing a `ferry serve`: how long until
# all are connected, the server's memory per connected agent, `ferry --server status` through
# their connections, and the reconnect storm after a server restart.
# See tests/src/bin/ferry-bench/dialin.rs.
#
# Usage: benches/dial-in.sh [--agents 1000,10000]   (root)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
exec target/release/ferry-bench dial-in "$@"
