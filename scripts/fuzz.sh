#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer through libfuzzer-sys, on the stable toolchain) of what ferry
# decodes from peers and users: the manifest and manifest-delta decoders, the piece-delta applier,
# the tar scanner and both config parsers (fuzz/fuzz_targets/).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   each target for SECONDS (default 20), from the seed
#                                           corpus in fuzz/corpus/TARGET (committed); new inputs
#                                           go to a scratch copy, crashes to fuzz/artifacts/TARGET/
#   scripts/fuzz.sh --seeds                 rewrite fuzz/corpus from real encodings
#
# Exits non-zero if any target crashes; the crashing input is kept and printed. Every crash found
# becomes a regression test next to the code it broke.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--seeds" ]; then
  cargo build --locked -p ferry-tests --bin ferry-fuzz-seeds
  exec target/debug/ferry-fuzz-seeds .
fi
seconds="${1:-20}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(manifest manifest_delta piece_delta tar_scan agent_config fleet_config)
triple="$(rustc -vV | sed -n 's/^host: //p')"
# Instrumentation for libFuzzer (what cargo-fuzz passes, without a sanitizer: stable rustc). Given
# with --target so that build scripts are not instrumented.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/fuzz/target}"
cargo build --locked --release --manifest-path fuzz/Cargo.toml --target "$triple" --bins
bin="$CARGO_TARGET_DIR/$triple/release"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
  cp -r "fuzz/corpus/$t/." "$scratch/$t/"
  echo "== fuzz $t for ${seconds}s"
  if ! "$bin/$t" -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 "$scratch/$t" 2>"$scratch/$t.log"; then
    tail -n 40 "$scratch/$t.log"
    failed+=("$t")
  else
    grep -E "^(stat::number_of_executed_units|stat::new_units_added)" "$scratch/$t.log" | tr '\n' ' '
    echo
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, no crash"
