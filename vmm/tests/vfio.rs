//! `[[vfio]]` on a host without VFIO (this machine: no CONFIG_VFIO, no /dev/vfio):
//! `keel-vmm run` must fail at once, before guest RAM is allocated, with the
//! pre-flight error naming the device and the missing /dev/vfio.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{SandboxDir, Vmm};

#[test]
fn vfio_device_without_host_vfio_fails_early_with_the_fix() {
    if Path::new("/dev/vfio").exists() {
        eprintln!("skipped: this host has /dev/vfio; see docs/vfio.md for the real-host procedure");
        return;
    }
    let dir = SandboxDir::new();
    // 8 GiB of guest RAM: the check must come before memory is allocated.
    let config = dir.probe_config(
        "hello",
        1,
        "[memory]\nsize = \"8GiB\"\n[[vfio]]\nid = \"nic0\"\naddress = \"0000:01:00.0\"\n",
    );
    let started = Instant::now();
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(Duration::from_secs(30));
    let err = vmm.stderr.text();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("vfio nic0 (0000:01:00.0): /dev/vfio does not exist"),
        "{err}"
    );
    assert!(err.contains("modprobe vfio-pci"), "{err}");
    assert!(
        !err.contains("guest memory:"),
        "failed before allocating RAM: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "fails early");
}

#[test]
fn check_runs_the_same_host_checks() {
    if Path::new("/dev/vfio").exists() {
        eprintln!("skipped: this host has /dev/vfio");
        return;
    }
    let dir = SandboxDir::new();
    let config = dir.probe_config(
        "hello",
        1,
        "[[vfio]]\nid = \"nic0\"\naddress = \"0000:01:00.0\"\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel-vmm"))
        .arg("check")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/dev/vfio does not exist"), "{err}");
}
