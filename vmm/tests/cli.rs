//! `keel-vmm check` and `run` on broken configurations: one clear error line, a
//! non-zero exit, never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::SandboxDir;

fn keel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel-vmm"))
        .args(args)
        .output()
        .expect("run keel-vmm")
}

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs/bad");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("corpus dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "corpus too small: {}", files.len());
    files
}

/// Files the corpus configs refer to, next to them.
fn boot_files(dir: &SandboxDir) {
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    std::fs::write(dir.path("vmlinux"), &elf).unwrap();
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(dir.path("bzImage"), &bz).unwrap();
    std::fs::write(dir.path("initrd.img"), b"initrd").unwrap();
    std::fs::write(dir.path("not-a-kernel.img"), b"just some bytes").unwrap();
}

fn assert_one_clean_error(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: exit {:?}\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{what} panicked:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one error line, got:\n{stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{what}: {stderr}");
    stderr
}

#[test]
fn check_rejects_every_bad_config_with_one_line() {
    for file in corpus() {
        let text = std::fs::read_to_string(&file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no '# expect:' line", file.display()))
            .trim()
            .to_owned();
        let dir = SandboxDir::new();
        boot_files(&dir);
        let config = dir.path("bad.toml");
        std::fs::write(&config, &text).unwrap();
        let out = keel(&["check", config.to_str().unwrap()]);
        let stderr = assert_one_clean_error(&out, &file.display().to_string());
        assert!(
            stderr.contains("bad.toml"),
            "{}: no file name: {stderr}",
            file.display()
        );
        // Host-dependent wording (the list of online CPUs) differs from the fake host
        // the unit tests use; compare up to it.
        let expect = expect.split(" (").next().unwrap_or(&expect);
        assert!(
            stderr.contains(expect),
            "{}: expected {expect:?} in:\n{stderr}",
            file.display()
        );
        // `run` refuses the same file the same way, before touching KVM.
        let out = keel(&["run", "--config", config.to_str().unwrap()]);
        assert_one_clean_error(&out, &format!("run {}", file.display()));
    }
}

#[test]
fn missing_config_file_is_one_clear_error() {
    let dir = SandboxDir::new();
    let missing = dir.path("nope.toml");
    let out = keel(&["check", missing.to_str().unwrap()]);
    let stderr = assert_one_clean_error(&out, "missing file");
    assert!(stderr.contains("nope.toml"), "{stderr}");
}

#[test]
fn check_accepts_the_demo_and_reports_ok() {
    common::probe_elf();
    let status = Command::new(common::workspace_root().join("scripts/build-probe.sh"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let demo = common::workspace_root().join("examples/demo/demo.toml");
    let out = keel(&["check", demo.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: ok\n", demo.display())
    );
}

#[test]
fn check_reports_an_empty_hugepage_pool_with_numbers() {
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    // More than the whole pool (other tests may use part of it concurrently).
    let mib = (free + 4096) * 2;
    let dir = SandboxDir::new();
    boot_files(&dir);
    let config = dir.config(&format!(
        "name = \"huge\"\n[memory]\nsize = \"{mib}MiB\"\nhugepages = \"2M\"\n[boot]\nkernel = \"vmlinux\"\n"
    ));
    let out = keel(&["check", config.to_str().unwrap()]);
    let stderr = assert_one_clean_error(&out, "hugepages");
    assert!(stderr.contains(&format!("need {}", mib / 2)), "{stderr}");
    let free_now = stderr
        .split("free ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(free_now.is_some_and(|f| f <= free), "{stderr}");
}

#[test]
fn bad_command_lines_are_usage_errors() {
    for args in [
        &["run"][..],
        &["frobnicate"],
        &["check"],
        &["run", "--config"],
    ] {
        let out = keel(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
}
