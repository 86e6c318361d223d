#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs the demo sandbox: keel-vhost-blk serves
# a scratch disk, and keel-vmm boots the probe guest described by
# examples/demo/demo.toml, which drives the disk and powers off.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
./scripts/build-probe.sh
cargo build --release --quiet -p keel-vmm -p keel-vhost-blk

mkdir -p target/demo
rm -f target/demo/disk0.sock
truncate -s 64M target/demo/disk.img
./target/release/keel-vhost-blk --socket target/demo/disk0.sock --image target/demo/disk.img \
    --serial keel-demo &
backend=$!
trap 'kill "$backend" 2>/dev/null; wait "$backend" 2>/dev/null || true' EXIT
./target/release/keel-vmm run --config examples/demo/demo.toml
