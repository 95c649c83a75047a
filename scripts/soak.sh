#!/usr/bin/env bash
# The soak on the real fleet (tests/tests/soak.rs): ROUNDS deployments and rollbacks (default
# 200) on 3 systemd-nspawn hosts, each with a random fault (agent kill -9 at a failpoint or at a
# random moment, a link cut, a coordinator kill -9), checking crash safety and, once healed, that
# the registry and every host agree. Prints each round and the summary RELIABILITY.md records.
# Needs root (the fleet) and the binaries built (cargo build --workspace --bins).
#
#   scripts/soak.sh [ROUNDS] [SEED]     SEED replays a run (default: a new one, printed)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-200}"
seed="${2:-$(date +%s%N)}"
cargo build --workspace --bins --locked
trap 'target/debug/ferry-fleet clean || true' EXIT
FERRY_SOAK_ROUNDS="$rounds" FERRY_SOAK_SEED="$seed" cargo nextest run --locked -p ferry-tests --test soak \
  --no-capture -E 'test(deployments_and_rollbacks_survive_random_faults_and_converge)' 2>&1 \
  | grep -E '^(soak|thread|round)|panicked|FAIL|PASS'
