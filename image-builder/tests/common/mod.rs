//! Shared helpers for keel-image integration tests: build keel-init once (static),
//! run the keel-image binary, and find the shared download cache.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

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
