#!/usr/bin/env bash
# Builds the no_std probe guest and copies it to target/guest/keel-probe.elf.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet \
    --manifest-path image-builder/probe-guest/Cargo.toml \
    --target x86_64-unknown-none
mkdir -p target/guest
cp image-builder/probe-guest/target/x86_64-unknown-none/release/keel-probe target/guest/keel-probe.elf
echo "probe guest: target/guest/keel-probe.elf"
# The PVH variant (Xen ELF note + 32-bit entry) for PVH boot tests and the bench.
cargo build --release --quiet \
    --manifest-path image-builder/probe-guest/Cargo.toml \
    --target x86_64-unknown-none --features pvh \
    --target-dir image-builder/probe-guest/target/pvh
cp image-builder/probe-guest/target/pvh/x86_64-unknown-none/release/keel-probe target/guest/keel-probe-pvh.elf
echo "probe guest (PVH): target/guest/keel-probe-pvh.elf"
