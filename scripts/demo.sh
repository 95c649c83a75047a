#!/usr/bin/env bash
# A local ferry fleet on this machine: a fleet CA, two agents on loopback, a fleet.toml, and
# `ferry status` against them. Everything lives in ./demo; the agents keep running.
#   ./scripts/demo.sh         set up (or restart) the demo and show the fleet
#   ./scripts/demo.sh down    stop the agents and remove ./demo
set -euo pipefail
cd "$(dirname "$0")/.."
demo=$PWD/demo
ferry=$(command -v ferry || echo target/release/ferry)
agent=$(command -v ferry-agent || echo target/release/ferry-agent)

stop() {
  for pid in "$demo"/*/agent.pid; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
}

if [ "${1:-up}" = down ]; then
  stop
  rm -rf "$demo"
  echo "demo: stopped the agents and removed $demo"
  exit 0
fi
[ -x "$ferry" ] && [ -x "$agent" ] || { echo "demo: build first: ./scripts/install.sh" >&2; exit 2; }

stop
mkdir -p "$demo"
[ -f "$demo/pki/ca.key" ] || "$ferry" ca init --out "$demo/pki" >/dev/null
[ -f "$demo/pki/coordinator.key" ] || "$ferry" cert issue --ca "$demo/pki" --name coordinator --role coordinator --out "$demo/pki" >/dev/null

hosts=()
port=17443
for name in web-1 web-2; do
  dir=$demo/$name
  mkdir -p "$dir/data"
  [ -f "$dir/$name.key" ] || "$ferry" cert issue --ca "$demo/pki" --name "$name" --role agent --san 127.0.0.1 --out "$dir" >/dev/null
  cat > "$dir/agent.toml" <<TOML
listen = "127.0.0.1:$port"
data_dir = "$dir/data"
[tls]
ca = "$dir/ca.pem"
cert = "$dir/$name.pem"
key = "$dir/$name.key"
[apps.web]
root = "$dir/web"
units = ["web.service"]
TOML
  "$agent" --config "$dir/agent.toml" >"$dir/agent.log" 2>&1 &
  echo $! > "$dir/agent.pid"
  hosts+=("$name = \"127.0.0.1:$port\"")
  port=$((port + 1))
done

cat > "$demo/fleet.toml" <<TOML
[app]
name = "web"
units = ["web.service"]

[tls]
ca = "pki/ca.pem"
cert = "pki/coordinator.pem"
key = "pki/coordinator.key"

[environments.demo]
hosts = { $(IFS=,; echo "${hosts[*]}" | sed 's/,/, /g') }
TOML

# Wait (bounded) for both agents to listen.
for _ in $(seq 50); do
  "$ferry" status --config "$demo/fleet.toml" --env demo >/dev/null 2>&1 && break
  sleep 0.1
done
"$ferry" status --config "$demo/fleet.toml" --env demo || true
cat <<MSG

The demo fleet is up (agents' logs: $demo/web-*/agent.log). Try:
  ferry status --config $demo/fleet.toml --env demo --output json
  kill \$(cat $demo/web-2/agent.pid); ferry status --config $demo/fleet.toml --env demo   # exit code 3
  ferry cert show $demo/web-1/web-1.pem
  ./scripts/demo.sh down
MSG
