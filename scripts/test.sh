#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs keel's checks and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo clippy --release --quiet --manifest-path image-builder/probe-guest/Cargo.toml \
    --target x86_64-unknown-none -- -D warnings
./scripts/build-probe.sh
cargo test --workspace
