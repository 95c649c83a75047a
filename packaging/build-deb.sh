#!/usr/bin/env bash
# Builds the Debian packages ferry-agent and ferry with dpkg-deb (no cargo-deb to compile).
#
#   packaging/build-deb.sh                   release build (cargo build --release --locked), then
#                                            target/debian/ferry-agent_<v>_<arch>.deb and ferry_<v>_<arch>.deb
#   packaging/build-deb.sh --bin-dir DIR     package the ferry and ferry-agent already built in DIR
#                                            (no cargo build; the tests package target/debug)
#   --out DIR        where the .deb files go (default target/debian)
#   --revision N     Debian revision: version <workspace version>-N (default 1)
#   --fast           gzip -1 instead of xz -6 (the tests: same contents, less CPU)
#
# Needs dpkg-dev (dpkg-shlibdeps), help2man and binutils (strip); scripts/deps.sh installs them.
# Prints the paths of the two packages, one a line, on stdout.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
bin_dir=""
out="$top/target/debian"
revision=1
compress=(-Zxz -z6)
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$(cd "$2" && pwd); shift 2 ;;
    --out) mkdir -p "$2"; out=$(cd "$2" && pwd); shift 2 ;;
    --revision) revision=$2; shift 2 ;;
    --fast) compress=(-Zgzip -z1); shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "build-deb: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

for tool in dpkg-deb dpkg-shlibdeps help2man strip; do
  command -v "$tool" >/dev/null || { echo "build-deb: $tool is missing (run scripts/deps.sh)" >&2; exit 2; }
done

if [ -z "$bin_dir" ]; then
  (cd "$top" && cargo build --release --locked -p ferry-agent -p ferry-coordinator >&2)
  bin_dir="$top/target/release"
fi
for b in ferry ferry-agent; do
  [ -x "$bin_dir/$b" ] || { echo "build-deb: $bin_dir/$b is not built" >&2; exit 2; }
done

upstream=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$top/Cargo.toml")
[ -n "$upstream" ] || { echo "build-deb: no [workspace.package] version in $top/Cargo.toml" >&2; exit 2; }
version="$upstream-$revision"
arch=$(dpkg --print-architecture)
maintainer="ferry maintainers <ferry@example.invalid>"
# Reproducible dates: the last commit's, else now.
epoch=$(git -C "$top" log -1 --format=%ct 2>/dev/null || date +%s)
export SOURCE_DATE_EPOCH=$epoch

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out" "$work/debian"
# dpkg-shlibdeps wants a debian/control to read; it needs nothing from it for -O.
printf 'Source: ferry\n\nPackage: ferry-agent\nArchitecture: any\n\nPackage: ferry\nArchitecture: any\n' \
  >"$work/debian/control"

# stage PACKAGE: the common skeleton (docs, changelog, copyright) of one package's tree.
stage() {
  local pkg=$1 root="$work/$1"
  install -d -m0755 "$root/DEBIAN" "$root/usr/share/doc/$pkg"
  install -m0644 "$top/packaging/debian/copyright" "$root/usr/share/doc/$pkg/copyright"
  printf '%s (%s) unstable; urgency=medium\n\n  * Built from the ferry workspace by packaging/build-deb.sh.\n\n -- %s  %s\n' \
    ferry "$version" "$maintainer" "$(date -u -R -d "@$epoch")" |
    gzip -9n >"$root/usr/share/doc/$pkg/changelog.Debian.gz"
  chmod 0644 "$root/usr/share/doc/$pkg/changelog.Debian.gz"
}

# binary PACKAGE NAME: the stripped binary at /usr/bin/NAME.
binary() {
  install -D -m0755 "$bin_dir/$2" "$work/$1/usr/bin/$2"
  strip --strip-unneeded --remove-section=.comment --remove-section=.note "$work/$1/usr/bin/$2"
}

# manpage PACKAGE NAME SECTION DESCRIPTION [INCLUDE]: from --help and --version (help2man).
manpage() {
  local dir="$work/$1/usr/share/man/man$3"
  install -d -m0755 "$dir"
  help2man --no-info --section="$3" --name="$4" --version-string="$upstream" ${5:+--include="$5"} \
    "$work/$1/usr/bin/$2" | gzip -9n >"$dir/$2.$3.gz"
  chmod 0644 "$dir/$2.$3.gz"
}

# finish PACKAGE SYNOPSIS LINE...: DEBIAN/control (Depends from dpkg-shlibdeps), md5sums, dpkg-deb --build.
finish() {
  local pkg=$1 root="$work/$1" depends
  shift
  depends=$(cd "$work" && dpkg-shlibdeps -O -e"$root/usr/bin/$bin" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
  [ -n "$depends" ] || { echo "build-deb: dpkg-shlibdeps found no dependencies for $pkg" >&2; exit 1; }
  [ -z "$extra_depends" ] || depends="$depends, $extra_depends"
  {
    echo "Package: $pkg"
    echo "Source: ferry"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: $maintainer"
    echo "Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)"
    echo "Depends: $depends"
    echo "Section: admin"
    echo "Priority: optional"
    echo "Homepage: https://example.invalid/ferry"
    printf 'Description: %s\n' "$1"
    shift
    for line in "$@"; do printf ' %s\n' "$line"; done
  } >"$root/DEBIAN/control"
  (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
    >"$root/DEBIAN/md5sums"
  chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"
  local deb="$out/${pkg}_${version}_${arch}.deb"
  dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >/dev/null
  echo "$deb"
}

# --- ferry-agent ----------------------------------------------------------------------------------
pkg=ferry-agent bin=ferry-agent extra_depends="init-system-helpers (>= 1.54~)"
stage $pkg
binary $pkg $bin
{
  echo "[COMMANDS]"
  echo ".SS \"ferry-agent audit tail\""
  echo ".nf"
  "$work/$pkg/usr/bin/ferry-agent" audit tail --help | sed 's/\\/\\\\/g; s/^\./\\\&./'
  echo ".fi"
} >"$work/agent-commands.h2m"
manpage $pkg $bin 8 "ferry's host agent: receives releases over mutual TLS and activates them" "$work/agent-commands.h2m"
install -D -m0644 "$top/systemd/ferry-agent.service" "$work/$pkg/lib/systemd/system/ferry-agent.service"
install -D -m0644 "$top/packaging/agent.toml" "$work/$pkg/etc/ferry/agent.toml"
install -m0644 "$top/packaging/debian/ferry-agent.README.Debian" "$work/$pkg/usr/share/doc/$pkg/README.Debian"
echo /etc/ferry/agent.toml >"$work/$pkg/DEBIAN/conffiles"
for s in postinst prerm postrm; do
  install -m0755 "$top/packaging/debian/$pkg.$s" "$work/$pkg/DEBIAN/$s"
done
chmod 0644 "$work/$pkg/DEBIAN/conffiles"
finish $pkg "SSH-less rolling deployments: the agent on every host" \
  "ferry-agent runs on every host of a fleet as a systemd service. It takes" \
  "commands only from the fleet's ferry coordinator, over gRPC with mutually" \
  "authenticated TLS, receives only the release content it lacks, switches" \
  "releases atomically, restarts the app's units and runs its health probes," \
  "rolling itself back on failure."

# --- ferry ----------------------------------------------------------------------------------------
pkg=ferry bin=ferry extra_depends=""
stage $pkg
binary $pkg $bin
# One section with every verb's own --help.
{
  echo "[COMMANDS]"
  for verb in "ca init" "cert issue" "cert show" status deploy rollback serve "token new" pipeline completions; do
    echo ".SS \"ferry $verb\""
    echo ".nf"
    # shellcheck disable=SC2086 # $verb may be two words ("ca init") on purpose
    "$work/$pkg/usr/bin/ferry" $verb --help | sed 's/\\/\\\\/g; s/^\./\\\&./'
    echo ".fi"
  done
} >"$work/commands.h2m"
manpage $pkg $bin 1 "SSH-less rolling deployments for a fleet of Linux servers" "$work/commands.h2m"
install -d -m0755 "$work/$pkg/usr/share/bash-completion/completions" \
  "$work/$pkg/usr/share/zsh/vendor-completions" "$work/$pkg/usr/share/fish/vendor_completions.d"
"$work/$pkg/usr/bin/ferry" completions bash >"$work/$pkg/usr/share/bash-completion/completions/ferry"
"$work/$pkg/usr/bin/ferry" completions zsh >"$work/$pkg/usr/share/zsh/vendor-completions/_ferry"
"$work/$pkg/usr/bin/ferry" completions fish >"$work/$pkg/usr/share/fish/vendor_completions.d/ferry.fish"
chmod 0644 "$work/$pkg"/usr/share/*/*/ferry "$work/$pkg"/usr/share/*/*/_ferry "$work/$pkg"/usr/share/*/*/ferry.fish
# The coordinator daemon (`ferry serve`): installed, not enabled (it needs a fleet.toml first).
install -D -m0644 "$top/systemd/ferry.service" "$work/$pkg/lib/systemd/system/ferry.service"
# Monitoring examples: Prometheus alert rules (with their promtool unit tests) and a Grafana
# dashboard, for the agents' /metrics and `ferry --metrics-file`.
for f in ferry-alerts.yml ferry-alerts.test.yml ferry-dashboard.json; do
  install -D -m0644 "$top/packaging/monitoring/$f" "$work/$pkg/usr/share/doc/$pkg/examples/$f"
done
finish $pkg "SSH-less rolling deployments: the coordinator CLI" \
  "ferry issues a fleet's certificates and deploys releases to the ferry-agent" \
  "on every host, one host at a time, over gRPC with mutually authenticated" \
  "TLS: only content a host lacks is sent, each host switches atomically," \
  "checks its health and rolls itself back on failure."
