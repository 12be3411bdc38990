#!/usr/bin/env bash
# Installs everything Ferry needs on a Debian 12 machine, as root. Idempotent: a second run only
# checks. Prints each step; fails with a clear message when something cannot be had.
set -euo pipefail

CRIU_MIN="4.2"
# Ferry's patches to CRIU (scripts/criu/*.patch); the built binary carries this string. A CRIU
# without them works too, with longer freezes for large containers, and cannot dump containers
# of non-root users on hosts that withhold CAP_SYS_RESOURCE.
CRIU_PATCHES="$(cd "$(dirname "$0")" && pwd)/criu"
CRIU_PATCH_MARK="ferry-criu-patch-3"
CRIU_UNPATCHABLE=/var/cache/ferry/criu-patch-does-not-apply
here="$(cd "$(dirname "$0")/.." && pwd)"

say()  { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (Ferry drives CRIU, runc and network namespaces): try sudo $0"
[ -r /etc/os-release ] && . /etc/os-release
[ "${ID:-}" = "debian" ] || say "warning: tested on Debian 12, this is ${PRETTY_NAME:-unknown}"

export DEBIAN_FRONTEND=noninteractive

# --- runtime and lab tools ----------------------------------------------------------------------
RUNTIME_PKGS=(runc attr iptables iproute2 iputils-arping busybox-static procps kmod ca-certificates xz-utils curl
  netcat-openbsd etcd-server etcd-client protobuf-compiler)
CRIU_BUILD_PKGS=(build-essential pkg-config libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler
  protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev uuid-dev dpkg-dev patch)

missing=()
for p in "${RUNTIME_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing packages: ${missing[*]}"
  apt-get update -qq || die "apt-get update failed: check the Debian mirrors in /etc/apt/sources.list*"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "could not install ${missing[*]}"
else
  say "runtime packages present"
fi

# --- CRIU >= 4.2 ----------------------------------------------------------------------------------
criu_ok() {
  command -v criu >/dev/null 2>&1 || return 1
  local v; v="$(criu --version 2>/dev/null | awk '/^Version:/ {print $2}')"
  [ -n "$v" ] || return 1
  dpkg --compare-versions "$v" ge "$CRIU_MIN" || return 1
  criu check >/dev/null 2>&1 || return 1
}

criu_patched() {
  grep -qa "$CRIU_PATCH_MARK" "$(command -v criu)" 2>/dev/null
}

if criu_ok && { criu_patched || [ -f "$CRIU_UNPATCHABLE" ]; }; then
  say "CRIU $(criu --version | awk '/^Version:/ {print $2}') present and 'criu check' passes$(criu_patched && echo ', with Ferry'"'"'s patches')"
else
  if criu_ok; then
    say "CRIU present but without Ferry's current patches: building a patched one from Debian's sid source"
  else
    say "CRIU >= $CRIU_MIN missing or failing 'criu check': building it from Debian's sid source"
  fi
  missing=()
  for p in "${CRIU_BUILD_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing CRIU build dependencies: ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
      || die "could not install CRIU build dependencies ${missing[*]}"
  fi
  src_list=/etc/apt/sources.list.d/ferry-sid-src.sources
  if [ ! -f "$src_list" ]; then
    say "adding a deb-src entry for sid (source only: no binary package changes)"
    cat > "$src_list" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  apt-get update -qq || die "apt-get update failed after adding the sid deb-src entry"
  work=/var/cache/ferry/criu-src
  rm -rf "$work"; mkdir -p "$work"; cd "$work"
  # The packaging tarball may answer 404 while the .orig tarball arrives: check for the file.
  apt-get source --download-only criu >/dev/null 2>&1 || true
  orig="$(ls -1 criu_*.orig.tar.* 2>/dev/null | sort -V | tail -n 1 || true)"
  [ -n "$orig" ] || die "could not download CRIU's source from Debian sid (apt-get source --download-only criu)"
  ver="$(echo "$orig" | sed -E 's/^criu_([0-9.]+)\.orig.*/\1/')"
  dpkg --compare-versions "$ver" ge "$CRIU_MIN" || die "sid serves CRIU $ver, older than $CRIU_MIN"
  say "building CRIU $ver (about a minute on 2 cores)"
  tar xf "$orig"
  cd "criu-$ver"
  applied=yes
  for p in "$CRIU_PATCHES"/*.patch; do
    patch -p1 --forward -s < "$p" >patch.log 2>&1 || { applied="$(basename "$p")"; break; }
  done
  if [ "$applied" = yes ]; then
    say "applied Ferry's patches ($(cd "$CRIU_PATCHES" && echo *.patch))"
    rm -f "$CRIU_UNPATCHABLE"
  else
    say "warning: Ferry's patch $applied does not apply to CRIU $ver ($(tail -n 1 patch.log)): building it unpatched; lazy dumps then take about 70 ms longer per GiB of memory, and containers of non-root users cannot be dumped on hosts without CAP_SYS_RESOURCE"
    mkdir -p "$(dirname "$CRIU_UNPATCHABLE")"; echo "$ver" > "$CRIU_UNPATCHABLE"
    cd "$work" && rm -rf "criu-$ver" && tar xf "$orig" && cd "criu-$ver"
  fi
  # Built without GnuTLS and nftables: Ferry encrypts with QUIC/TLS itself and replaces CRIU's
  # network lock; each shared library CRIU loads costs start-up time, and CRIU starts twice on
  # each side of a migration, inside the freeze.
  printf '#!/bin/sh\ncase "$*" in *nftables*) exit 1;; esac\nexec pkg-config "$@"\n' > "$work/pkg-config-no-nft"
  chmod +x "$work/pkg-config-no-nft"
  make -j"$(nproc)" NO_GNUTLS=1 PKG_CONFIG="$work/pkg-config-no-nft" criu >build.log 2>&1 \
    || { tail -n 30 build.log >&2; die "CRIU $ver failed to build (log: $PWD/build.log)"; }
  install -m 0755 criu/criu /usr/local/sbin/criu
  hash -r
  criu_ok || die "CRIU $ver built but 'criu check' fails: $(criu check 2>&1 | tail -n 3)"
  say "installed CRIU $(criu --version | awk '/^Version:/ {print $2}') to /usr/local/sbin/criu"
fi

# --- host tuning ----------------------------------------------------------------------------------
# CRIU walks the whole conntrack hash table at every dump, inside the freeze: with the kernel's
# default of 262144 buckets on a large machine that alone costs about 25 ms of downtime.
buckets_file=/proc/sys/net/netfilter/nf_conntrack_buckets
if [ -w "$buckets_file" ] && [ "$(cat "$buckets_file")" -gt 16384 ]; then
  say "setting net.netfilter.nf_conntrack_buckets=16384 (was $(cat "$buckets_file"); see docs/design.md)"
  echo 16384 > "$buckets_file"
  mkdir -p /etc/sysctl.d
  echo "net.netfilter.nf_conntrack_buckets = 16384" > /etc/sysctl.d/90-ferry.conf
fi

# --- Rust -----------------------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install a stable Rust toolchain (rustup) first"
say "building Ferry (cargo build --release --locked)"
cd "$here"
cargo build --release --locked -q -p ferry -p ferry-workload -p criu-driver || die "cargo build failed"
say "built target/release/ferry, ferry-workload and ferry-criu"
