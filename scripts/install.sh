#!/usr/bin/env bash
# Builds ferry and ferry-agent (release) and installs them to ${PREFIX:-/usr/local}/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
# Only the two products: the test crate would switch on the agent's test-only failpoints.
cargo build --release --locked -p ferry-agent -p ferry-coordinator
prefix=${PREFIX:-/usr/local}
sudo=()
[ -w "$prefix/bin" ] || sudo=(sudo)
"${sudo[@]}" install -m 0755 target/release/ferry target/release/ferry-agent "$prefix/bin/"
echo "installed: $prefix/bin/ferry, $prefix/bin/ferry-agent ($("$prefix/bin/ferry" --version))"
