#!/usr/bin/env bash
# Installs everything the project needs, idempotently: Debian packages for the tests and demo,
# the pinned Rust toolchains (rust-toolchain.toml for user space, a dated nightly with rust-src
# for the eBPF crate) and a bpf-linker built against that nightly's own LLVM.
# A re-run with everything present takes about a second.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
EBPF_NIGHTLY=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$ROOT/lb-ebpf/rust-toolchain.toml")
BPF_LINKER_VERSION=0.13.0
# bpf-linker keeps an rpath to its LLVM folder, so both live in one stable place.
TOOLS=${LB_TOOLS_DIR:-/opt/lb-tools}
APT_PACKAGES=(iproute2 ethtool curl netcat-openbsd iputils-ping iperf3 wrk tcpdump procps
  nftables haproxy nginx libnginx-mod-stream python3)

log() { printf 'bootstrap: %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # nginx and haproxy are benchmark contenders started in namespaces, never host services:
  # keep their packages from starting them (policy-rc.d 101 = "do not start").
  policy=/usr/sbin/policy-rc.d
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v rustup >/dev/null; then
  log "rustup is required (https://rustup.rs); it is not on PATH"
  exit 1
fi
# A plain `rustup toolchain install` installs what rust-toolchain.toml names.
(cd "$ROOT" && rustup toolchain install >/dev/null 2>&1) || (cd "$ROOT" && rustup toolchain install)
rustup toolchain install "$EBPF_NIGHTLY" --profile minimal --component rust-src --component clippy >/dev/null 2>&1 \
  || rustup toolchain install "$EBPF_NIGHTLY" --profile minimal --component rust-src --component clippy

if [[ ! -x "$TOOLS/bin/bpf-linker" ]] || ! "$TOOLS/bin/bpf-linker" --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against $EBPF_NIGHTLY's LLVM (about a minute)"
  sysroot=$(rustc "+$EBPF_NIGHTLY" --print sysroot)
  # The glob skips libLLVM-*-rust-*.so, a 44-byte linker script.
  lib=$(ls "$sysroot"/lib/libLLVM.so.* | head -n1)
  mkdir -p "$TOOLS/lib"
  ln -sf "$lib" "$TOOLS/lib/libLLVM.so"
  ln -sf "$lib" "$TOOLS/lib/$(basename "$lib")"
  (cd / && LLVM_PREFIX="$TOOLS" cargo "+$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$ROOT/rust-toolchain.toml")" \
    install bpf-linker --version "$BPF_LINKER_VERSION" --locked --root "$TOOLS" --quiet)
fi
log "ready: $(cd "$ROOT" && rustc --version), $EBPF_NIGHTLY, bpf-linker $("$TOOLS/bin/bpf-linker" --version | awk '{print $2}')"
