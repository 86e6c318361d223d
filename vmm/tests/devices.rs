//! virtio devices backed by real vhost-user backends: qemu-storage-daemon for blk,
//! DPDK testpmd's vhost PMD for net; and what happens when a backend is missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{SandboxDir, Vmm, BOOT_TIMEOUT};

/// A backend process this test started; killed by PID on drop.
struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// qemu-storage-daemon exporting `image` as vhost-user-blk on `socket`.
fn qemu_storage_daemon(image: &Path, socket: &Path, writable: bool) -> Option<Backend> {
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=d0,file=f0", "--export"])
        .arg(format!(
            "type=vhost-user-blk,id=e0,addr.type=unix,addr.path={},node-name=d0,writable={}",
            socket.display(),
            if writable { "on" } else { "off" }
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(c) => {
            let backend = Backend(c);
            wait_for_socket(socket);
            Some(backend)
        }
        Err(e) => {
            eprintln!("skipping: qemu-storage-daemon is not available ({e}); run scripts/setup.sh");
            None
        }
    }
}

fn disk_config(dir: &SandboxDir, mode: &str, socket: &Path, extra: &str) -> std::path::PathBuf {
    dir.probe_config(
        mode,
        1,
        &format!(
            "[devices]\nconnect_timeout = \"10s\"\n[[disk]]\nid = \"disk0\"\nsocket = \"{}\"\n{extra}",
            socket.display()
        ),
    )
}

#[test]
fn missing_backend_fails_after_the_timeout_naming_device_and_socket() {
    let dir = SandboxDir::new();
    let socket = dir.path("absent.sock");
    let config = dir.probe_config(
        "hello",
        1,
        &format!(
            "[devices]\nconnect_timeout = \"500ms\"\n[[disk]]\nid = \"disk0\"\nsocket = \"{}\"\n",
            socket.display()
        ),
    );
    let started = Instant::now();
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(Duration::from_secs(30));
    let err = vmm.stderr.text();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(err.contains("device disk0"), "{err}");
    assert!(err.contains(&socket.display().to_string()), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_backend_that_appears_late_is_waited_for() {
    let dir = SandboxDir::new();
    let image = dir.path("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.path("blk.sock");
    let config = disk_config(&dir, "hello", &socket, "");
    let mut vmm = Vmm::start(&config);
    thread::sleep(Duration::from_millis(700));
    let Some(_qsd) = qemu_storage_daemon(&image, &socket, true) else {
        return;
    };
    let status = vmm.wait(BOOT_TIMEOUT);
    let err = vmm.stderr.text();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("device disk0: virtio-blk, 2048 sectors"),
        "{err}"
    );
}
