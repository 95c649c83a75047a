#!/usr/bin/env bash
# Builds ferry and ferry-agent (release) and installs them to ${PREFIX:-/usr/local}/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo build --release --locked --bins
prefix=${PREFIX:-/usr/local}
sudo=()
[ -w "$prefix/bin" ] || sudo=(sudo)
"${sudo[@]}" install -m 0755 target/release/ferry target/release/ferry-agent "$prefix/bin/"
echo "installed: $prefix/bin/ferry, $prefix/bin/ferry-agent ($("$prefix/bin/ferry" --version))"
