#!/usr/bin/env bash
# Installs the Debian packages ferry builds and tests with, if any is missing:
#   pkg-config, libsystemd-dev  build the `systemd` crate (libsystemd: sd_notify, journal)
#   systemd-container, iproute2, nftables, python3
#                               the real-host test fleet (systemd-nspawn, namespaces, packet loss,
#                               the demo app)
#   dpkg-dev, help2man, binutils
#                               packaging/build-deb.sh (dpkg-shlibdeps, man pages, strip)
#   lintian, debootstrap        the package tests (lintian; a Debian host of its own to dpkg -i on)
set -euo pipefail
pkgs=(pkg-config libsystemd-dev systemd-container iproute2 nftables python3 dpkg-dev help2man binutils lintian
  debootstrap)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "deps: installing ${missing[*]}" >&2
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
