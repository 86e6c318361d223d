#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs the demo sandbox: keel-vmm boots the
# probe guest described by examples/demo/demo.toml, which reports what it sees on
# its serial console and powers off.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
./scripts/build-probe.sh
cargo build --release --quiet -p keel-vmm
exec ./target/release/keel-vmm run --config examples/demo/demo.toml
