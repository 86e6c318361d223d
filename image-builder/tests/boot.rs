#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Boots keel-image output with the Debian cloud kernel under QEMU TCG (a test-only
//! stand-in for keel-vmm on machines without VT-x, see MACHINE.md): keel-init loads
//! the modules, configures the network, mounts the root disk and runs the app, which
//! checks the disk and pings the gateway; the VM powers off with the app's status.

mod common;

use std::path::Path;
use std::process::Command;

use common::{assert_has, build_image, writable_disk};

/// Boots `image` with `disk` as virtio-blk and a QEMU user-net virtio-net NIC; returns
/// the serial console output once the VM powers off.
fn boot(image: &Path, disk: &Path, extra_cmdline: &str) -> String {
    let net = [
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
    ];
    common::boot_qemu(image, disk, extra_cmdline, &net.map(String::from))
}

#[test]
fn ext4_root_and_network_from_cmdline() {
    let tmp = tempfile::tempdir().unwrap();
    let image = build_image("boot/ext4.toml", tmp.path());
    let disk = writable_disk(&image, tmp.path());
    let out = boot(
        &image,
        &disk,
        "keel.ip=10.0.2.15/24 keel.gw=10.0.2.2 keel.mtu=1500",
    );
    assert_has(&out, "keel-init: app started after ");
    assert_has(&out, "app: args=rw greeting=hello");
    assert_has(&out, "app: disk ok");
    assert_has(&out, "app: net ok");
    assert_has(&out, "app: all checks passed");
    assert_has(&out, "keel-init: app exited with status 7");
    assert_has(&out, "keel-init: powering off with status 7");

    // The guest's write reached the disk image.
    let cat = Command::new("debugfs")
        .arg("-R")
        .arg("cat /data/new.txt")
        .arg(&disk)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout).trim(),
        "written by the guest"
    );
}

#[test]
fn erofs_read_only_root_and_network_from_spec() {
    let tmp = tempfile::tempdir().unwrap();
    let image = build_image("boot/erofs.toml", tmp.path());
    let disk = writable_disk(&image, tmp.path());
    let out = boot(&image, &disk, "");
    assert_has(&out, "app: args=ro greeting=hello");
    assert_has(&out, "app: disk ok");
    assert_has(&out, "app: net ok");
    assert_has(&out, "keel-init: app exited with status 7");
}

#[test]
fn init_error_is_one_line_and_powers_off_nonzero() {
    let tmp = tempfile::tempdir().unwrap();
    let image = build_image("boot/ext4.toml", tmp.path());
    let disk = writable_disk(&image, tmp.path());
    let out = boot(&image, &disk, "keel.rootfstype=keelfs");
    assert_has(
        &out,
        "keel-init: error: mount keelfs /dev/vda on /rootfs: No such device",
    );
    assert_has(&out, "keel-init: powering off with status 1");
    assert!(!out.contains("app started"), "the app must not run");

    let out = boot(&image, &disk, "keel.bogus=1");
    assert_has(
        &out,
        "keel-init: error: kernel command line: unknown key \"bogus\"",
    );
    assert_has(&out, "keel-init: powering off with status 1");
}

#[test]
fn cmdline_app_overrides_the_spec() {
    let tmp = tempfile::tempdir().unwrap();
    let image = build_image("boot/ext4.toml", tmp.path());
    let disk = writable_disk(&image, tmp.path());
    // The app's "ro" check fails on the writable ext4 root: exit status 5.
    let out = boot(
        &image,
        &disk,
        "keel.app=\"/bin/busybox sh /app/app.sh ro\" keel.env=GREETING=override",
    );
    assert_has(&out, "app: args=ro greeting=override");
    assert_has(&out, "app: read-only rootfs was writable");
    assert_has(&out, "keel-init: app exited with status 5");
}
