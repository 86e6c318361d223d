//! A real Linux virtio-blk driver against keel-vhost-blk: QEMU under TCG (a test-only
//! stand-in for a VMM that boots Linux here) with `vhost-user-blk-pci`, Debian's cloud
//! kernel, and a busybox initramfs built by this test. The guest mounts an ext4 image
//! made on the host, writes files, syncs, drops its caches and checksums them through
//! the device; the host then checks the file system with `fsck.ext4 -n` and compares
//! the checksums of the files it reads out of the image with `debugfs`.
//!
//! Needs `qemu-system-x86`, `busybox-static`, `e2fsprogs` and `apt-get download`
//! access to the Debian archive (the kernel is cached under the target directory).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Backend;

/// Modules needed for virtio-blk over PCI, in load order.
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko || echo "KEEL-FAIL insmod $m"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || echo "KEEL-FAIL no /dev/vda"
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt || echo "KEEL-FAIL mount"
mkdir -p /mnt/data
for n in 1 2 3 4 5 6 7 8; do
    dd if=/dev/urandom of=/mnt/data/f$n bs=64k count=$((n*8)) 2>/dev/null || echo "KEEL-FAIL dd f$n"
done
cp /bin/busybox /mnt/data/busybox
sync
echo 3 > /proc/sys/vm/drop_caches
echo KEEL-SUMS-BEGIN
cd /mnt/data && sha256sum f1 f2 f3 f4 f5 f6 f7 f8 busybox
echo KEEL-SUMS-END
cd /
umount /mnt || echo "KEEL-FAIL umount"
echo KEEL-DONE
poweroff -f
"#;

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Debian's cloud kernel, downloaded once and unpacked under the target directory:
/// returns (vmlinuz, directory of the kernel's modules).
fn kernel() -> (PathBuf, PathBuf) {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("keel-vhost-blk-linux");
    let find = |root: &Path| -> Option<(PathBuf, PathBuf)> {
        let boot = root.join("boot");
        let vmlinuz = fs::read_dir(&boot)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with("vmlinuz-"))
            })?;
        let version = vmlinuz.file_name()?.to_str()?.strip_prefix("vmlinuz-")?;
        let modules = root.join("lib/modules").join(version).join("kernel");
        modules.is_dir().then_some((vmlinuz, modules))
    };
    if let Some(found) = find(&cache) {
        return found;
    }
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    run(
        Command::new("apt-get")
            .args(["download", "linux-image-cloud-amd64"])
            .current_dir(work.path()),
        "apt-get download linux-image-cloud-amd64",
    );
    let meta = fs::read_dir(work.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("no .deb downloaded");
    let depends = run(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&meta)
            .arg("Depends"),
        "dpkg-deb -f",
    );
    let real = depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|d| d.starts_with("linux-image-") && d != &"linux-image-cloud-amd64")
        .unwrap_or_else(|| panic!("no kernel package in Depends: {depends}"))
        .to_owned();
    run(
        Command::new("apt-get")
            .args(["download", &real])
            .current_dir(work.path()),
        &format!("apt-get download {real}"),
    );
    let deb = fs::read_dir(work.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&real))
        .expect("kernel .deb not downloaded");
    let root = work.path().join("root");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        "dpkg-deb -x",
    );
    // Another test run may have filled the cache meanwhile; either copy is fine.
    if fs::rename(&root, &cache).is_err() {
        assert!(find(&cache).is_some(), "cannot cache the kernel");
    }
    find(&cache).expect("no vmlinuz in the kernel package")
}

/// Finds `NAME.ko` under the module tree.
fn module(tree: &Path, name: &str) -> PathBuf {
    let file = format!("{name}.ko");
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|f| f == file.as_str()) {
                return p;
            }
        }
    }
    panic!("module {file} not found under {}", tree.display());
}

/// A newc ("070701") cpio archive, as the kernel unpacks an initramfs.
struct Cpio(Vec<u8>, u32);

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.1 += 1;
        let fields = [
            self.1,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.0.extend_from_slice(b"070701");
        for f in fields {
            write!(self.0, "{f:08x}").unwrap();
        }
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(0);
        self.pad();
        self.0.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
    }
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.0
    }
}

fn initramfs(path: &Path, modules: &Path) {
    let mut c = Cpio(Vec::new(), 0);
    for dir in ["bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules"] {
        c.entry(dir, 0o040755, &[]);
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox (busybox-static) is not installed");
    c.entry("bin/busybox", 0o100755, &fs::read(busybox).unwrap());
    for m in MODULES {
        let data = fs::read(module(modules, m)).unwrap();
        c.entry(&format!("lib/modules/{m}.ko"), 0o100644, &data);
    }
    c.entry("init", 0o100755, INIT.as_bytes());
    fs::write(path, c.finish()).unwrap();
}

fn sums(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let sum = it.next()?;
            let name = it.next()?;
            (sum.len() == 64).then(|| (name.to_owned(), sum.to_owned()))
        })
        .collect()
}

#[test]
fn linux_guest_ext4_through_qemu_vhost_user_blk() {
    let (vmlinuz, modules) = kernel();
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.cpio");
    initramfs(&initrd, &modules);
    let image = dir.path().join("disk.img");
    fs::File::create(&image)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    run(
        Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image),
        "mkfs.ext4",
    );
    let backend = Backend::start(dir.path(), &image, &["--serial", "keel-linux"]);
    let console = dir.path().join("console.log");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "512",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa",
            "node,memdev=mem",
        ])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", backend.socket.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=c0", "-nic", "none"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&console).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64 (qemu-system-x86) is not installed");
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = qemu.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            let _ = qemu.wait();
            panic!(
                "guest did not finish in time:\n{}",
                fs::read_to_string(&console).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = fs::read_to_string(&console).unwrap();
    assert!(status.success(), "qemu: {status}\n{out}");
    assert!(
        !out.contains("KEEL-FAIL"),
        "guest reported a failure:\n{out}"
    );
    assert!(out.contains("KEEL-DONE"), "guest did not finish:\n{out}");
    let begin = out.find("KEEL-SUMS-BEGIN").unwrap();
    let end = out.find("KEEL-SUMS-END").unwrap();
    let guest = sums(&out[begin..end]);
    assert_eq!(guest.len(), 9, "checksums from the guest:\n{out}");
    drop(backend);
    // QEMU uses the backend's inflight tracking (GET/SET_INFLIGHT_FD) too.
    let log = fs::read_to_string(dir.path().join("backend.log")).unwrap();
    assert!(
        log.contains("SET_INFLIGHT_FD"),
        "no inflight area from QEMU:\n{log}"
    );

    run(
        Command::new("fsck.ext4").args(["-n", "-f"]).arg(&image),
        "fsck.ext4 -n -f",
    );
    let dump = dir.path().join("dump");
    fs::create_dir(&dump).unwrap();
    run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump /data {}", dump.display()))
            .arg(&image),
        "debugfs rdump",
    );
    let host = run(
        Command::new("sha256sum")
            .args(guest.keys())
            .current_dir(dump.join("data")),
        "sha256sum",
    );
    assert_eq!(sums(&host), guest, "host and guest checksums differ");
    assert_eq!(
        guest.get("busybox"),
        sums(&run(
            Command::new("sha256sum").arg(
                ["/bin/busybox", "/usr/bin/busybox"]
                    .into_iter()
                    .find(|p| Path::new(p).exists())
                    .unwrap()
            ),
            "sha256sum busybox"
        ))
        .values()
        .next()
    );
}
