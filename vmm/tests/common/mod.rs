//! Shared helpers for keel-vmm integration tests: the probe guest, sandboxes in temp
//! dirs, and a running `keel-vmm` process whose output can be waited on.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf()
}

/// Builds the probe guest (with `features`, into `target_dir` under the probe's
/// target directory) and returns the ELF path.
fn build_probe(features: &[&str], target_dir: &str) -> PathBuf {
    let root = workspace_root();
    let probe = root.join("image-builder/probe-guest");
    let target = probe.join(target_dir);
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--release",
        "--quiet",
        "--target",
        "x86_64-unknown-none",
    ])
    .arg("--manifest-path")
    .arg(probe.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(&target);
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    let status = cmd
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .expect("cannot run cargo to build the probe guest");
    assert!(
        status.success(),
        "building the probe guest failed (is the x86_64-unknown-none target installed? \
         run scripts/setup.sh)"
    );
    target.join("x86_64-unknown-none/release/keel-probe")
}

/// The probe guest with a PVH entry note (built once per test binary).
pub fn probe_elf_pvh() -> PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE
        .get_or_init(|| build_probe(&["pvh"], "target/pvh"))
        .clone()
}

/// Builds (once per test binary) and returns the probe guest ELF.
pub fn probe_elf() -> PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE.get_or_init(|| build_probe(&[], "target")).clone()
}

/// A temp dir holding one sandbox's files.
pub struct SandboxDir {
    pub dir: tempfile::TempDir,
}

impl SandboxDir {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("keel-test-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `sandbox.toml` with `body` and returns its path.
    pub fn config(&self, body: &str) -> PathBuf {
        let path = self.path("sandbox.toml");
        std::fs::write(&path, body).expect("write config");
        path
    }

    /// A config booting the probe guest in `mode`, plus `extra` TOML appended.
    pub fn probe_config(&self, mode: &str, vcpus: u8, extra: &str) -> PathBuf {
        self.probe_config_with(&probe_elf(), mode, vcpus, extra)
    }

    /// Like [`Self::probe_config`] with a given guest ELF.
    pub fn probe_config_with(&self, elf: &Path, mode: &str, vcpus: u8, extra: &str) -> PathBuf {
        // `extra` may bring its own [memory] table.
        let memory = if extra.contains("[memory]") {
            ""
        } else {
            "[memory]\nsize = \"64MiB\"\n"
        };
        let body = format!(
            "name = \"test\"\n\
             [vcpus]\ncount = {vcpus}\n\
             {memory}\
             [boot]\nkernel = \"{}\"\ncmdline = \"console=ttyS0 reboot=k probe.mode={mode}\"\n\
             {extra}\n",
            elf.display()
        );
        self.config(&body)
    }
}

#[derive(Default)]
struct Output {
    text: String,
    closed: bool,
}

/// Captured output of one stream, waitable.
#[derive(Clone, Default)]
pub struct Captured(Arc<(Mutex<Output>, Condvar)>);

impl Captured {
    fn spawn_reader(stream: impl Read + Send + 'static) -> Self {
        let captured = Captured::default();
        let c = captured.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let (m, cv) = &*c.0;
                        m.lock()
                            .unwrap()
                            .text
                            .push_str(&String::from_utf8_lossy(&line));
                        cv.notify_all();
                    }
                }
            }
            let (m, cv) = &*c.0;
            m.lock().unwrap().closed = true;
            cv.notify_all();
        });
        captured
    }

    /// Everything so far.
    pub fn text(&self) -> String {
        self.0 .0.lock().unwrap().text.clone()
    }

    /// Waits until the output contains `needle`; panics with the output on timeout.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut out = m.lock().unwrap();
        loop {
            if out.text.contains(needle) {
                return out.text.clone();
            }
            let now = Instant::now();
            if now >= deadline || out.closed {
                panic!(
                    "did not see {needle:?} within {timeout:?}{}; output so far:\n{}",
                    if out.closed { " (stream closed)" } else { "" },
                    out.text
                );
            }
            out = cv.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    /// Number of occurrences of `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}

/// A running keel-vmm, killed (by its PID) if the test drops it still running.
pub struct Vmm {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: Captured,
    pub stderr: Captured,
}

impl Vmm {
    /// Starts `keel-vmm run --config CONFIG`.
    pub fn start(config: &Path) -> Self {
        Self::start_args(&["run", "--config", config.to_str().expect("utf-8 path")])
    }

    pub fn start_args(args: &[&str]) -> Self {
        Self::start_args_with_env(args, &[])
    }

    /// Starts `keel-vmm run --config CONFIG` with extra environment variables.
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_args_with_env(
            &["run", "--config", config.to_str().expect("utf-8 path")],
            env,
        )
    }

    /// Starts `keel-vmm ARGS` with extra environment variables.
    pub fn start_args_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keel-vmm"))
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keel-vmm");
        let stdout = Captured::spawn_reader(child.stdout.take().expect("stdout"));
        let stderr = Captured::spawn_reader(child.stderr.take().expect("stderr"));
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the process to exit; panics (after killing it) on timeout.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the readers drain the pipes.
                let _ = self.stdout.wait_closed(Duration::from_secs(5));
                let _ = self.stderr.wait_closed(Duration::from_secs(5));
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "keel-vmm did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout.text(),
                    self.stderr.text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to the VMM.
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain syscall on the PID of a child this test started and has not
        // reaped yet.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill failed");
    }
}

impl Captured {
    /// Waits until the stream is closed.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut out = m.lock().unwrap();
        while !out.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            out = cv.wait_timeout(out, deadline - now).unwrap().0;
        }
        true
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Generous bound for a probe-guest boot on an emulating KVM under a loaded 2-core box.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
