#!/usr/bin/env bash
# Installs the Debian packages ferry builds and tests with, if any is missing:
#   pkg-config, libsystemd-dev  build the `systemd` crate (libsystemd: sd_notify, journal)
#   systemd-container, iproute2, nftables, python3
#                               the real-host test fleet (systemd-nspawn, namespaces, packet loss,
#                               the demo app)
#   dpkg-dev, help2man, binutils
#                               packaging/build-deb.sh (dpkg-shlibdeps, man pages, strip)
#   lintian, debootstrap        the package tests (lintian; a Debian host of its own to dpkg -i on)
#   python3-yaml                the monitoring test reads the Prometheus alert rules
# With --test (scripts/test.sh), also Debian's prometheus package unpacked (not installed) into
# /var/cache/ferry-test/prometheus: promtool (the monitoring test checks and unit-tests the alert
# rules with it) and the prometheus server the metric gate tests start themselves, in their own
# fleet's namespace, and stop; no Prometheus service is installed or started on the machine.
# With --test, also postgresql: the registry's tests on PostgreSQL make a throwaway cluster of
# their own (initdb in a temp dir, pg_ctl on a loopback port) and remove it; the package's own
# cluster is not used.
# With --bench (benches/*.sh), also rsync: the peer ferry's transfers are measured against.
set -euo pipefail
pkgs=(pkg-config libsystemd-dev systemd-container iproute2 nftables python3 dpkg-dev help2man binutils lintian
  debootstrap python3-yaml)
[ "${1:-}" != "--bench" ] || pkgs+=(rsync)
[ "${1:-}" != "--test" ] || pkgs+=(postgresql)
promtool_dir=/var/cache/ferry-test/prometheus
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
updated=
fetch_promtool() {
  command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 && return 0
  [ -x "$promtool_dir/usr/bin/promtool" ] && [ -x "$promtool_dir/usr/bin/prometheus" ] && return 0
  echo "deps: fetching promtool (Debian's prometheus package, unpacked into $promtool_dir)" >&2
  [ -n "$updated" ] || "${sudo[@]}" apt-get update -qq
  local tmp
  tmp=$(mktemp -d)
  chmod 0755 "$tmp"
  (cd "$tmp" && "${sudo[@]}" apt-get download -qq prometheus >/dev/null 2>&1)
  "${sudo[@]}" mkdir -p "$promtool_dir"
  "${sudo[@]}" dpkg-deb -x "$tmp"/prometheus_*.deb "$promtool_dir"
  "${sudo[@]}" rm -rf "$tmp"
}
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}" >&2
  "${sudo[@]}" apt-get update -qq
  updated=1
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ "${1:-}" != "--test" ] || fetch_promtool
