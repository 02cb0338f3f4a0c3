#!/usr/bin/env bash
# Fresh-machine entry point: makes a recent enough `cargo` available, then runs
# `cargo xtask <task>`. `cargo xtask setup` (run by `test` and `demo`) installs everything else.
# The kernel object is committed (lb-ebpf/prebuilt/), so no eBPF toolchain is needed here.
set -euo pipefail
cd "$(dirname "$0")/.."

# The workspace's rust-version (Cargo.toml); older compilers refuse its dependencies.
MIN_RUST_MINOR=87

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  # rustup installs here; a non-login shell may not have it on PATH yet.
  export PATH="$HOME/.cargo/bin:$PATH"
fi

if ! command -v cargo >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: no cargo and no apt-get: install Rust 1.$MIN_RUST_MINOR or newer (rustup) and run again" >&2
    exit 1
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: cargo is missing and installing it needs root; run this as root" >&2
    exit 1
  fi
  echo "bootstrap: no cargo: installing Debian's Rust (cargo-web, rustc-web)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    rustc-web cargo-web gcc libc6-dev ca-certificates >/dev/null
fi

minor=$(cargo --version | sed -n 's/^cargo 1\.\([0-9]*\)\..*/\1/p')
if [ -z "$minor" ] || [ "$minor" -lt "$MIN_RUST_MINOR" ]; then
  echo "bootstrap: $(cargo --version) is too old: this workspace needs Rust 1.$MIN_RUST_MINOR or newer." >&2
  echo "bootstrap: install a newer one (rustup: \`rustup toolchain install stable\`) and run again." >&2
  exit 1
fi

# A newcomer builds once: incremental state would only add gigabytes to the target folder.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

exec cargo xtask "$@"
