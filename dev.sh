#!/usr/bin/env bash
# One entry point for a fresh machine: installs what the project needs (idempotent, about a
# minute the first time), then runs `cargo xtask TASK`.
#   ./dev.sh demo    the self-contained demo (root)
#   ./dev.sh test    every test: unit, packet fixtures, end-to-end (root)
#   ./dev.sh build   the XDP program and the lb binary
#   ./dev.sh install the lb binary, its systemd unit and an example config (root)
#   ./dev.sh package a Debian package of all that, in target/debian
set -euo pipefail
cd "$(dirname "$0")"
./scripts/bootstrap.sh
exec cargo xtask "$@"
