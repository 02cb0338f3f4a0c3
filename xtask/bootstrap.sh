#!/usr/bin/env bash
# Fresh-machine entry point: makes `cargo` available, then runs `cargo xtask <task>`.
# `cargo xtask setup` (run by `test` and `demo`) installs everything else it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  elif command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
      echo "bootstrap: cargo is missing and installing it needs root; run this as root" >&2
      exit 1
    fi
    echo "bootstrap: installing Debian's Rust toolchain (rustc-web, cargo-web, rust-web-src)" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      rustc-web cargo-web rust-web-src gcc libc6-dev ca-certificates
  else
    echo "bootstrap: no cargo and no apt-get: install Rust (rustup) and run again" >&2
    exit 1
  fi
fi

exec cargo xtask "$@"
