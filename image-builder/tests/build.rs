#![allow(clippy::unwrap_used, clippy::expect_used)]
//! keel-image builds: reproducibility (same spec twice → identical files) and the
//! bad-spec corpus (clear error, no output left behind).

mod common;

use std::path::Path;

fn read_dir_sorted(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn assert_reproducible(spec: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    common::build_ok(spec, &a);
    common::build_ok(spec, &b);
    let (fa, fb) = (read_dir_sorted(&a), read_dir_sorted(&b));
    let names: Vec<_> = fa.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"manifest.json") && names.contains(&"rootfs.img"),
        "{names:?}"
    );
    assert_eq!(fa.len(), fb.len());
    for ((na, da), (nb, db)) in fa.iter().zip(&fb) {
        assert_eq!(na, nb);
        assert!(
            da == db,
            "{na} differs between two builds of {}",
            spec.display()
        );
    }
    // Only the output directories are left next to them.
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");

    // The manifest matches the files.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("manifest.json")).unwrap()).unwrap();
    for f in m["files"].as_array().unwrap() {
        let data = std::fs::read(a.join(f["name"].as_str().unwrap())).unwrap();
        assert_eq!(f["size"].as_u64().unwrap(), data.len() as u64);
    }

    // SOURCE_DATE_EPOCH is what goes into the archive.
    let c = tmp.path().join("c");
    let o = common::build(spec, &c, Some("1700000000"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(
        std::fs::read(a.join("initramfs.cpio.gz")).unwrap(),
        std::fs::read(c.join("initramfs.cpio.gz")).unwrap()
    );
}

#[test]
fn same_spec_twice_gives_identical_files_ext4() {
    assert_reproducible(&common::data("boot/ext4.toml"));
}

#[test]
fn same_spec_twice_gives_identical_files_erofs() {
    assert_reproducible(&common::data("boot/erofs.toml"));
}

#[test]
fn rebuild_replaces_output_and_refuses_foreign_dirs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("img");
    common::build_ok(&common::data("boot/erofs.toml"), &out);
    common::build_ok(&common::data("boot/erofs.toml"), &out);
    assert!(out.join("manifest.json").is_file());

    let foreign = tmp.path().join("precious");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("data"), "keep me").unwrap();
    let o = common::build(&common::data("boot/erofs.toml"), &foreign, None);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to replace"));
    assert_eq!(
        std::fs::read_to_string(foreign.join("data")).unwrap(),
        "keep me"
    );
}

/// (file name, spec text, expected piece of the error message)
const BAD_SPECS: &[(&str, &str, &str)] = &[
    (
        "unknown-key.toml",
        "[app]\npath = \"app.sh\"\nbogus = 1\n",
        "unknown-key.toml:3:1: unknown field `bogus`",
    ),
    (
        "unknown-section.toml",
        "[app]\npath = \"app.sh\"\n[kernal]\npackage = \"x\"\n",
        "unknown-section.toml:3:2: unknown field `kernal`",
    ),
    (
        "bad-rootfs-type.toml",
        "[app]\npath = \"app.sh\"\n[rootfs]\ntype = \"btrfs\"\ndir = \"root\"\n",
        "bad-rootfs-type.toml:4:8: unknown variant `btrfs`, expected one of `none`, `ext4`, `erofs`",
    ),
    ("no-app.toml", "name = \"x\"\n", "missing field `app`"),
    (
        "app-missing.toml",
        "[app]\npath = \"no-such-app\"\n",
        "application",
    ),
    (
        "kernel-package-missing.toml",
        "[kernel]\npackage = \"linux-image-keel-does-not-exist\"\n[app]\npath = \"app.sh\"\n",
        "kernel package linux-image-keel-does-not-exist not found",
    ),
    (
        "kernel-path-missing.toml",
        "[kernel]\npath = \"no-such-bzImage\"\n[app]\npath = \"app.sh\"\n",
        "kernel ",
    ),
    (
        "module-missing.toml",
        "[kernel]\nmodules = [\"virtio_net\", \"keel_no_such_module\"]\n[app]\npath = \"app.sh\"\n",
        "kernel module keel_no_such_module not found",
    ),
    (
        "both-kernels.toml",
        "[kernel]\npath = \"a\"\npackage = \"b\"\n[app]\npath = \"app.sh\"\n",
        "kernel: set either `path` or `package`, not both",
    ),
    (
        "bad-ip.toml",
        "[app]\npath = \"app.sh\"\n[network]\nip = \"10.0.0.300/24\"\n",
        "network.ip: \"10.0.0.300/24\": expected A.B.C.D/PREFIX",
    ),
    (
        "relative-dest.toml",
        "[app]\npath = \"app.sh\"\n[[files]]\nsrc = \"app.sh\"\ndest = \"etc/x\"\n",
        "files[0].dest",
    ),
    (
        "ext4-too-big.toml",
        "[app]\npath = \"app.sh\"\n[rootfs]\ntype = \"ext4\"\ndir = \"big\"\nsize = \"1MiB\"\n",
        "more than its size limit of 1048576 bytes",
    ),
    (
        "erofs-too-big.toml",
        "[app]\npath = \"app.sh\"\n[rootfs]\ntype = \"erofs\"\ndir = \"big\"\nsize = \"1MiB\"\n",
        "more than its size limit of 1048576 bytes",
    ),
    (
        "duplicate-dest.toml",
        "[app]\npath = \"app.sh\"\n[[files]]\nsrc = \"app.sh\"\ndest = \"/app/app.sh\"\n",
        "initramfs path /app/app.sh: added twice",
    ),
];

#[test]
fn bad_specs_fail_clearly_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("specs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("app.sh"), "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::create_dir(dir.join("big")).unwrap();
    // Incompressible, so EROFS cannot squeeze it under the limit either.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let big: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(dir.join("big/blob"), big).unwrap();
    let outs = tmp.path().join("outs");
    std::fs::create_dir(&outs).unwrap();
    let mut failures = Vec::new();
    for (name, text, expected) in BAD_SPECS {
        let spec = dir.join(name);
        std::fs::write(&spec, text).unwrap();
        let out = outs.join(name.trim_end_matches(".toml"));
        let o = common::build(&spec, &out, None);
        let stderr = String::from_utf8_lossy(&o.stderr);
        let line = stderr
            .lines()
            .find(|l| l.starts_with("keel-image: error:"))
            .unwrap_or("")
            .to_string();
        if o.status.success() || !line.contains(expected) {
            failures.push(format!("{name}: expected {expected:?}, got: {stderr}"));
        }
        let left: Vec<_> = std::fs::read_dir(&outs).unwrap().collect();
        if !left.is_empty() {
            failures.push(format!("{name}: left output behind: {left:?}"));
        }
        eprintln!("{name}: {line}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rootfs_from_dir_tarball_and_debian_package_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("tree/etc")).unwrap();
    std::fs::write(src.join("tree/etc/motd"), "from the tarball\n").unwrap();
    let st = std::process::Command::new("tar")
        .arg("-czf")
        .arg(src.join("layer.tar.gz"))
        .arg("-C")
        .arg(src.join("tree"))
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::copy(common::data("boot/app.sh"), src.join("app.sh")).unwrap();
    let spec = src.join("layers.toml");
    std::fs::write(
        &spec,
        format!(
            "[app]\npath = \"app.sh\"\n[rootfs]\ntype = \"ext4\"\ndir = \"{}\"\ntar = \"layer.tar.gz\"\npackages = [\"busybox-static\"]\n",
            common::data("boot/rootfs").display()
        ),
    )
    .unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    common::build_ok(&spec, &a);
    common::build_ok(&spec, &b);
    assert_eq!(read_dir_sorted(&a), read_dir_sorted(&b));

    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("manifest.json")).unwrap()).unwrap();
    assert!(m["rootfs_packages"][0]
        .as_str()
        .unwrap()
        .starts_with("busybox-static="));
    let img = a.join("rootfs.img");
    let debugfs = |cmd: &str| {
        let o = std::process::Command::new("debugfs")
            .arg("-R")
            .arg(cmd)
            .arg(&img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(debugfs("cat /etc/motd"), "from the tarball\n");
    assert_eq!(debugfs("cat /data/hello.txt"), "hello from the rootfs\n");
    let stat = debugfs("stat /bin/busybox");
    assert!(stat.contains("User:     0   Group:     0"), "{stat}");
}
