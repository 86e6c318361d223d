//! Shared helpers for keel-image integration tests: build keel-init once (static),
//! run the keel-image binary, find the shared download cache, and boot an image
//! under QEMU TCG.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Fixture directory.
pub fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

/// Debian kernel download cache, kept in target/ across test runs.
pub fn cache_dir() -> PathBuf {
    workspace_root().join("target/keel-image-cache")
}

/// Builds keel-init as a static, stripped binary (musl; static glibc when the musl
/// target is not installed) in its own target dir, once per test process.
pub fn keel_init() -> PathBuf {
    static INIT: OnceLock<PathBuf> = OnceLock::new();
    INIT.get_or_init(|| {
        let root = workspace_root();
        let target_dir = root.join("target/keel-init");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let build = |target: &str, rustflags: Option<&str>| {
            let mut cmd = Command::new(&cargo);
            cmd.current_dir(&root)
                .args([
                    "build",
                    "--release",
                    "--quiet",
                    "-p",
                    "keel-init",
                    "--target",
                    target,
                ])
                .arg("--target-dir")
                .arg(&target_dir)
                .env("CARGO_PROFILE_RELEASE_STRIP", "true");
            if let Some(f) = rustflags {
                cmd.env("RUSTFLAGS", f);
            }
            cmd.status().map(|s| s.success()).unwrap_or(false)
        };
        let musl = "x86_64-unknown-linux-musl";
        let gnu = "x86_64-unknown-linux-gnu";
        let target = if build(musl, None) {
            musl
        } else {
            assert!(
                build(gnu, Some("-C target-feature=+crt-static")),
                "building keel-init failed for both {musl} and static {gnu}"
            );
            gnu
        };
        target_dir.join(target).join("release/keel-init")
    })
    .clone()
}

/// Runs `keel-image build SPEC --out OUT` with the test cache and init.
pub fn build(spec: &Path, out: &Path, epoch: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel-image"));
    cmd.arg("build")
        .arg(spec)
        .arg("--out")
        .arg(out)
        .arg("--cache")
        .arg(cache_dir())
        .arg("--init")
        .arg(keel_init())
        .env("RUST_LOG", "warn");
    match epoch {
        Some(e) => cmd.env("SOURCE_DATE_EPOCH", e),
        None => cmd.env_remove("SOURCE_DATE_EPOCH"),
    };
    cmd.output().unwrap()
}

/// Builds and asserts success.
pub fn build_ok(spec: &Path, out: &Path) {
    let o = build(spec, out, None);
    assert!(
        o.status.success(),
        "keel-image build {} failed:\n{}",
        spec.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// One TCG guest at a time: each one keeps a host core busy.
static QEMU: Mutex<()> = Mutex::new(());

/// How long a guest may take from QEMU's start to power-off.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Boots `image` under QEMU TCG (512 MiB, 1 vCPU) with `disk` as virtio-blk and
/// `net_args` (QEMU arguments describing the NIC and anything it needs); returns the
/// serial console output once the VM powers off. Panics if QEMU fails or the guest
/// does not power off within [`BOOT_TIMEOUT`] (QEMU is killed then).
pub fn boot_qemu(image: &Path, disk: &Path, extra_cmdline: &str, net_args: &[String]) -> String {
    boot_qemu_smp(image, disk, extra_cmdline, net_args, 1)
}

/// [`boot_qemu`] with `cpus` vCPUs.
pub fn boot_qemu_smp(
    image: &Path,
    disk: &Path,
    extra_cmdline: &str,
    net_args: &[String],
    cpus: u32,
) -> String {
    let _one = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "512", "-nographic", "-no-reboot"])
        .arg("-smp")
        .arg(cpus.to_string())
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initramfs.cpio.gz"))
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {extra_cmdline}"))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", disk.display()))
        .args(net_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64 (package qemu-system-x86) is needed for this test");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("guest did not power off within {BOOT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap();
    eprintln!("--- guest console ({:?}) ---\n{out}", start.elapsed());
    assert!(status.success(), "qemu exited with {status}");
    out
}

/// Builds the image of fixture spec `spec` into `dir/image`.
pub fn build_image(spec: &str, dir: &Path) -> PathBuf {
    let out = dir.join("image");
    build_ok(&data(spec), &out);
    out
}

/// A writable copy of the image's root disk in `dir`.
pub fn writable_disk(image: &Path, dir: &Path) -> PathBuf {
    let disk = dir.join("disk.img");
    std::fs::copy(image.join("rootfs.img"), &disk).unwrap();
    disk
}

/// Asserts that the console output contains `needle`.
pub fn assert_has(out: &str, needle: &str) {
    assert!(out.contains(needle), "console lacks {needle:?}");
}
