#!/usr/bin/env bash
# ferry vs rsync, side by side in one run, over the same loopback link.
#
# Both peers run inside a fresh network namespace and talk over its loopback only, so the
# namespace's `lo` byte counter is exactly what crossed the link (protocol overhead included:
# TLS + gRPC + manifest for ferry, the rsync protocol for rsync). ferry: `ferry deploy` to a
# `ferry-agent`; rsync: `rsync -a` (and `-az`) to an rsync daemon (rsync://, no ssh).
#
# Scenarios (shared/DESIGN.md, issue "release engine"):
#   a  first deploy of a ~200 MB tree of mixed files (text-like and random; many small files)
#   b  redeploy with 1 % of the files changed (a 4 KiB region rewritten in each), twice:
#      in place (the build directory deployed before is edited: ferry's scan cache applies) and
#      in a fresh copy of the tree (new inodes: ferry reads and hashes every file again)
#   c  a 100 MB file with 1 MB changed in the middle
#   r  rollback swap with 10 MB and 1 GB releases (`ferry rollback`, wall time)
#   m  the agent's memory (resident, peak) after (a) and over 100 small deploys after it
#
# Usage: benches/transfer.sh [--quick]   (root; needs rsync, python3; builds release binaries)
# --quick shrinks every size 10x (a smoke run, not the recorded figures).
set -euo pipefail
cd "$(dirname "$0")/.."
scale=1
[ "${1:-}" = --quick ] && scale=10
[ "$(id -u)" -eq 0 ] || { echo "bench: needs root (network namespace)" >&2; exit 2; }
scripts/deps.sh --bench
command -v rsync >/dev/null || { echo "bench: install rsync" >&2; exit 2; }

cargo build --release --locked -p ferry-agent -p ferry-coordinator >&2
ferry=$PWD/target/release/ferry
agent=$PWD/target/release/ferry-agent

work=$(mktemp -d /tmp/ferry-bench.XXXXXX)
ns=fbench$$
cleanup() {
  [ -n "${agent_pid:-}" ] && kill "$agent_pid" 2>/dev/null || true
  [ -n "${rsyncd_pid:-}" ] && kill "$rsyncd_pid" 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
in_ns() { ip netns exec "$ns" "$@"; }
wire() { in_ns cat /sys/class/net/lo/statistics/rx_bytes; }
now() { date +%s.%N; }

# --- data ---------------------------------------------------------------------------------------
python3 - "$work" "$scale" <<'PY'
import os, random, sys
work, scale = sys.argv[1], int(sys.argv[2])
rnd = random.Random(1)
words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9))) for _ in range(5000)]
def text(n):
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + (b"\n" if rnd.random() < 0.1 else b" ")
    return bytes(out[:n])
def tree(root, total):
    made = 0; i = 0
    while made < total:
        i += 1
        kind = rnd.random()
        if kind < 0.80:   size = rnd.randint(1_000, 64_000)        # many small files
        elif kind < 0.98: size = rnd.randint(200_000, 2_000_000)   # some medium
        else:             size = rnd.randint(5_000_000, 12_000_000)  # a few large
        size = max(1, size // scale)
        d = os.path.join(root, f"d{i % 40:02d}", f"s{i % 7}")
        os.makedirs(d, exist_ok=True)
        data = text(size) if rnd.random() < 0.6 else os.urandom(size)
        with open(os.path.join(d, f"f{i:05d}.dat"), "wb") as f:
            f.write(data)
        made += size
tree(os.path.join(work, "a"), 200_000_000 // scale)
big = os.urandom(100_000_000 // scale)
os.makedirs(os.path.join(work, "c1"))
with open(os.path.join(work, "c1", "big.bin"), "wb") as f: f.write(big)
mid = len(big) // 2
changed = big[:mid] + os.urandom(1_000_000 // scale) + big[mid + 1_000_000 // scale:]
os.makedirs(os.path.join(work, "c2"))
with open(os.path.join(work, "c2", "big.bin"), "wb") as f: f.write(changed)
PY
# rsync's quick check skips files of equal size and mtime: the changed copy must look changed.
touch -d '+1 minute' "$work/c2/big.bin"
# b: 1 % of the files of a tree get a 4 KiB region rewritten in the middle (and a later mtime).
change_one_percent() { # dir seed
  python3 - "$1" "$2" <<'PY'
import os, random, sys
rnd = random.Random(int(sys.argv[2]))
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(sys.argv[1]) for f in fs)
for p in rnd.sample(files, max(1, len(files) // 100)):
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(min(4096, max(1, size - size // 2))))
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 60_000_000_000))
PY
}
files_a=$(find "$work/a" -type f | wc -l)
size_a=$(du -sb "$work/a" | cut -f1)

# --- ferry agent --------------------------------------------------------------------------------
"$ferry" ca init --out "$work/pki" >/dev/null
"$ferry" cert issue --ca "$work/pki" --name bench --role agent --san 127.0.0.1 --out "$work/pki" >/dev/null
"$ferry" cert issue --ca "$work/pki" --name ctl --role coordinator --out "$work/pki" >/dev/null
cat > "$work/agent.toml" <<EOF
listen = "127.0.0.1:17443"
data_dir = "$work/agent-data"
[tls]
ca = "$work/pki/ca.pem"
cert = "$work/pki/bench.pem"
key = "$work/pki/bench.key"
[apps.web]
root = "$work/agent-root"
EOF
cat > "$work/fleet.toml" <<EOF
request_timeout = "600s"
cache_dir = "cache"
[app]
name = "web"
[tls]
ca = "pki/ca.pem"
cert = "pki/ctl.pem"
key = "pki/ctl.key"
[environments.bench]
hosts = { bench = "127.0.0.1:17443" }
EOF
# Started with `ip netns exec` directly (it execs), so $! is the agent itself.
ip netns exec "$ns" "$agent" --config "$work/agent.toml" --log info >/dev/null 2>"$work/agent.log" &
agent_pid=$!

# --- rsync daemon -------------------------------------------------------------------------------
mkdir -p "$work/rsync-z" "$work/rsync-plain"
cat > "$work/rsyncd.conf" <<EOF
use chroot = no
[plain]
path = $work/rsync-plain
read only = no
uid = root
gid = root
[z]
path = $work/rsync-z
read only = no
uid = root
gid = root
EOF
ip netns exec "$ns" rsync --daemon --no-detach --port 18730 --config "$work/rsyncd.conf" >/dev/null 2>&1 &
rsyncd_pid=$!
sleep 0.5

results=()
measure() { # name tool "shell command"
  local name=$1 tool=$2 cmd=$3
  local w0 t0 t1 w1
  sync; w0=$(wire); t0=$(now)
  in_ns bash -c "cd '$work' && $cmd" >"$work/last.out" 2>&1 || { echo "bench: $tool failed:"; cat "$work/last.out"; exit 1; }
  t1=$(now); w1=$(wire)
  results+=("$(printf '%-34s %-10s %14d %9.3f' "$name" "$tool" $((w1 - w0)) "$(echo "$t1 - $t0" | bc)")")
}
ferry_deploy() { echo "'$ferry' deploy --config fleet.toml --env bench --artifact '$1' --version '$2' --output json"; }
rs() { echo "rsync -a --delete $*"; }

rss() { awk '/VmRSS/ {r=$2} /VmHWM/ {h=$2} END {printf "%6.1f MB resident, peak %6.1f MB", r/1024, h/1024}' "/proc/$agent_pid/status"; }
memory=("$(printf '%-34s %s' "m agent at start" "$(rss)")")
measure "a first deploy (${size_a} B, ${files_a} files)" ferry "$(ferry_deploy "$work/a" a)"
memory+=("$(printf '%-34s %s' "m agent after (a), 200 MB" "$(rss)")")
measure "a first deploy" "rsync -a" "$(rs "$work/a/" rsync://127.0.0.1:18730/plain/)"
measure "a first deploy" "rsync -az" "$(rs -z "$work/a/" rsync://127.0.0.1:18730/z/)"
change_one_percent "$work/a" 2
measure "b 1% changed, in place" ferry "$(ferry_deploy "$work/a" b)"
measure "b 1% changed, in place" "rsync -a" "$(rs "$work/a/" rsync://127.0.0.1:18730/plain/)"
measure "b 1% changed, in place" "rsync -az" "$(rs -z "$work/a/" rsync://127.0.0.1:18730/z/)"
cp -a "$work/a" "$work/b"
change_one_percent "$work/b" 3
measure "b 1% changed, fresh copy" ferry "$(ferry_deploy "$work/b" b2)"
measure "b 1% changed, fresh copy" "rsync -a" "$(rs "$work/b/" rsync://127.0.0.1:18730/plain/)"
measure "b 1% changed, fresh copy" "rsync -az" "$(rs -z "$work/b/" rsync://127.0.0.1:18730/z/)"
measure "c 100 MB file: first copy" ferry "$(ferry_deploy "$work/c1" c1)"
measure "c 100 MB file: first copy" "rsync -a" "$(rs "$work/c1/" rsync://127.0.0.1:18730/plain/)"
measure "c 100 MB file, 1 MB changed" ferry "$(ferry_deploy "$work/c2" c2)"
measure "c 100 MB file, 1 MB changed" "rsync -a" "$(rs "$work/c2/" rsync://127.0.0.1:18730/plain/)"
rm -rf "$work/rsync-z"/*

# --- rollback swap: 10 MB and 1 GB releases -----------------------------------------------------
rollback_ms() { # release dir of the given size in MB
  local mb=$1 d="$work/r$1"
  mkdir -p "$d/v1"
  head -c $((mb * 1024 * 1024)) /dev/urandom > "$d/v1/payload"
  cp -al "$d/v1" "$d/v2"; echo 2 > "$d/v2/VERSION"; echo 1 > "$d/v1/VERSION"
  in_ns bash -c "cd '$work' && '$ferry' deploy --config fleet.toml --env bench --artifact '$d/v1' --version r$mb-1 >/dev/null"
  in_ns bash -c "cd '$work' && '$ferry' deploy --config fleet.toml --env bench --artifact '$d/v2' --version r$mb-2 >/dev/null"
  local t0 t1
  t0=$(now)
  in_ns bash -c "cd '$work' && '$ferry' rollback --config fleet.toml --env bench --output json" > "$work/rb.json"
  t1=$(now)
  # The swap itself, as the agent measured it (its log line for the last swap).
  local swap_us
  swap_us=$(grep -o 'swap_us=[0-9]*' "$work/agent.log" | tail -1 | cut -d= -f2)
  results+=("$(printf '%-34s %-10s %14s %9.3f   (host: %s ms incl. connect; the swap itself: %s us)' "r rollback, ${mb} MB release" ferry - "$(echo "$t1 - $t0" | bc)" "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["hosts"][0]["duration_ms"])' "$work/rb.json")" "$swap_us")")
  rm -rf "$d"
}
rollback_ms $((10 / scale > 0 ? 10 / scale : 1))
rollback_ms $((1024 / scale))

# m: the agent's memory: resident set and its peak at the start, after (a) (above), and after 1
# to 100 more deploys of a small release (200 kB of new content each).
for i in $(seq 1 100); do
  mkdir -p "$work/m$i"; echo "$i" > "$work/m$i/VERSION"; head -c 200000 /dev/urandom > "$work/m$i/blob"
  in_ns bash -c "cd '$work' && $(ferry_deploy "$work/m$i" "m$i")" > /dev/null 2>&1 || { echo "bench: small deploy $i failed"; exit 1; }
  rm -rf "$work/m$i"
  case $i in 1|10|25|50|100) memory+=("$(printf '%-34s %s' "m agent after $i small deploys" "$(rss)")");; esac
done

echo
echo "ferry $("$ferry" --version | cut -d' ' -f2) vs $(rsync --version | head -1 | cut -c1-20); $(nproc) cores; scale 1/$scale"
printf '%-34s %-10s %14s %9s\n' scenario tool wire_bytes wall_s
for r in "${results[@]}"; do echo "$r"; done
echo
for m in "${memory[@]}"; do echo "$m"; done
