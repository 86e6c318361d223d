#!/bin/sh
# Guest side of boot_vhost_net.rs's two-queue-pair test (runs under busybox sh):
# pings PING_ADDR from each CPU in turn. The shell pins itself to the CPU, so ping
# (its child) sends from there, and virtio_net's XPS map picks that CPU's TX queue.
echo "app: cpus=$(nproc) queues=$(echo /sys/class/net/eth0/queues/*)"
for cpu in 0 1; do
    taskset -p -c "$cpu" $$ > /dev/null || { echo "app: taskset to cpu $cpu failed"; exit 5; }
    ping -c 3 -W 5 "$PING_ADDR" > /dev/null || { echo "app: ping from cpu $cpu failed"; exit 6; }
    echo "app: ping from cpu $cpu ok"
done
echo "app: all checks passed"
exit 7
