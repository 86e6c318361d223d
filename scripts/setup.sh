#!/usr/bin/env bash
# Installs what keel needs to build, test and run its demo on Debian 12.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail

# qemu-system-common: qemu-storage-daemon (vhost-user-blk peer in tests);
# dpdk, dpdk-dev: testpmd (vhost-user-net peer); qemu-system-x86: reference VMM in bench/
# and TCG boot tests of keel-image; e2fsprogs, erofs-utils: rootfs images; busybox-static: test guest.
APT_PACKAGES=(build-essential pkg-config curl ca-certificates qemu-system-common qemu-system-x86 dpdk dpdk-dev e2fsprogs erofs-utils busybox-static)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v rustup >/dev/null 2>&1; then
    echo "setup: installing the Rust toolchain with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
fi
# The probe guest is a bare-metal x86_64 binary; keel-init (guest PID 1) is static musl.
for target in x86_64-unknown-none x86_64-unknown-linux-musl; do
    rustup target list --installed | grep -qx "$target" || rustup target add "$target"
done
for component in rustfmt clippy; do
    rustup component list --installed | grep -q "^$component" || rustup component add "$component"
done

# DPDK's testpmd (a test peer) needs 2 MiB hugepages and a hugetlbfs mount.
if [ "$(id -u)" -eq 0 ]; then
    pages=/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
    if [ -w "$pages" ] && [ "$(cat "$pages")" -lt 512 ]; then
        echo 512 > "$pages" || true
    fi
    if ! mount | grep -q " /dev/hugepages type hugetlbfs"; then
        mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages || true
    fi
fi

if [ ! -e /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is missing; keel-vmm needs KVM (load kvm_intel or kvm_amd)" >&2
fi
