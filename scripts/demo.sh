#!/usr/bin/env bash
# The newcomer's demo: a fleet of 3 real hosts on this machine (systemd-nspawn containers running
# systemd, each in its own network namespace, each running ferry-agent from its systemd unit),
# the demo app deployed v1 then v2 with `ferry deploy`, left running to play with.
#   ./scripts/demo.sh         boot the fleet and deploy (uses the installed ferry and ferry-agent)
#   ./scripts/demo.sh down    remove the fleet
# Needs root (namespaces, cgroups, systemd-nspawn); run ./scripts/install.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (it creates network namespaces and containers)" >&2; exit 2; }
./scripts/deps.sh
export FERRY_BIN=${FERRY_BIN:-$(command -v ferry || true)}
export FERRY_AGENT_BIN=${FERRY_AGENT_BIN:-$(command -v ferry-agent || true)}
if [ -z "$FERRY_BIN" ] || [ -z "$FERRY_AGENT_BIN" ]; then
  echo "demo: ferry and ferry-agent are not installed: run ./scripts/install.sh first" >&2
  exit 2
fi
# The fleet harness itself (built once; the products are the installed binaries).
cargo build --release --locked -q -p ferry-tests --bin ferry-fleet
exec target/release/ferry-fleet demo "${1:-up}"
