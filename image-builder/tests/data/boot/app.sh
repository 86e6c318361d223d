#!/bin/sh
# Guest-side checks for image-builder/tests/boot.rs (runs under busybox sh).
# $1 = rw: write and read back a file on the root disk; ro: writing must fail.
# CHECK_NET=1: ping PING_ADDR (default 10.0.2.2, where QEMU user networking answers;
# boot_vhost_net.rs sets it to the TAP address in its namespace).
mode=$1
echo "app: args=$* greeting=$GREETING"
[ "$(cat /rootfs/data/hello.txt)" = "hello from the rootfs" ] || { echo "app: rootfs read failed"; exit 3; }
if [ "$mode" = rw ]; then
    echo "written by the guest" > /rootfs/data/new.txt && sync
    [ "$(cat /rootfs/data/new.txt)" = "written by the guest" ] || { echo "app: rootfs write failed"; exit 4; }
elif echo x 2>/dev/null > /rootfs/data/new.txt; then
    echo "app: read-only rootfs was writable"; exit 5
fi
echo "app: disk ok"
if [ -n "$CHECK_NET" ]; then
    addr=${PING_ADDR:-10.0.2.2}
    ping -c 1 -W 5 "$addr" > /dev/null || { echo "app: ping $addr failed"; exit 6; }
    echo "app: net ok ($addr)"
fi
echo "app: all checks passed"
exit 7
