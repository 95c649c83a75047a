# Sourced by the fleet benches: root, the test dependencies, release binaries, and where the
# bench binary finds them.
[ "$(id -u)" -eq 0 ] || { echo "bench: needs root (containers, network namespaces)" >&2; exit 2; }
./scripts/deps.sh --test
cargo build --release --locked -p ferry-agent -p ferry-coordinator -p ferry-tests --bins >&2
export FERRY_BIN=$PWD/target/release/ferry FERRY_AGENT_BIN=$PWD/target/release/ferry-agent
