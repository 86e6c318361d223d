//! Shared helpers for the integration tests: a running keel-vhost-net, DPDK testpmd
//! frontends, and a control-socket client. Every process is killed by its PID when
//! its handle is dropped; testpmd's hugepage files are removed with it.

#![allow(dead_code)]

pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use keel_sd_notify::NotifyListener;
use keel_vhost_net::control_client::ControlClient;
use serde_json::Value;

/// Held while a test runs testpmd: this process's other tests wait on the mutex,
/// other test processes (vmm/tests/devices.rs too) on an exclusive `flock` of
/// [`DPDK_LOCK_FILE`]; huge pages and CPUs are too scarce for two at once.
pub struct TestpmdLock {
    _file: Option<std::fs::File>,
    _guard: MutexGuard<'static, ()>,
}

/// The lock file every keel test that starts testpmd takes.
pub const DPDK_LOCK_FILE: &str = "/tmp/keel-dpdk-tests.lock";

/// Serializes the tests that start testpmd, across test processes.
pub fn testpmd_lock() -> TestpmdLock {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(DPDK_LOCK_FILE)
        .ok();
    if let Some(f) = &file {
        // SAFETY: flock(2) on an open file descriptor; blocks until it is ours.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(f), libc::LOCK_EX) };
    }
    TestpmdLock {
        _file: file,
        _guard: guard,
    }
}

/// Whether testpmd can run here: the binary exists and 2 MiB pages are free.
pub fn testpmd_available() -> bool {
    let has_bin = Command::new("dpdk-testpmd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    let mounted = std::fs::read_to_string("/proc/mounts")
        .map(|m| m.contains("/dev/hugepages"))
        .unwrap_or(false);
    if !has_bin || free < 256 || !mounted {
        eprintln!(
            "skipping: dpdk-testpmd {}, {free} free 2 MiB pages, /dev/hugepages {}",
            if has_bin { "found" } else { "missing" },
            if mounted { "mounted" } else { "not mounted" }
        );
        return false;
    }
    true
}

/// A keel-vhost-net process started by a test.
pub struct Backend {
    child: Child,
    /// Its control socket.
    pub control: PathBuf,
    /// Its log file.
    pub log: PathBuf,
}

impl Backend {
    /// Starts the switch with `ports` (`name=..,socket=..[,mac=..]` specs) and waits
    /// for its READY=1 notification.
    pub fn start(dir: &Path, ports: &[String], extra: &[&str]) -> Backend {
        Backend::start_in(&[], dir, ports, extra)
    }

    /// Like [`Backend::start`], run under a wrapper command (e.g. `ip netns exec NS`)
    /// that execs the backend in its own process.
    pub fn start_in(wrapper: &[&str], dir: &Path, ports: &[String], extra: &[&str]) -> Backend {
        let control = dir.join("control.sock");
        let notify = NotifyListener::bind(dir.join("notify.sock").to_str().unwrap()).unwrap();
        let log = dir.join("backend.log");
        let bin = env!("CARGO_BIN_EXE_keel-vhost-net");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        for p in ports {
            cmd.arg("--port").arg(p);
        }
        let child = cmd
            .arg("--control")
            .arg(&control)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", notify.address())
            .stdin(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        let backend = Backend {
            child,
            control,
            log,
        };
        notify
            .recv_line("READY=1", Duration::from_secs(30))
            .expect("no READY=1 from keel-vhost-net");
        backend
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends one control request and returns the reply.
    pub fn request(&self, req: &str) -> Value {
        self.client().request(req).unwrap()
    }

    /// A client of its control socket.
    pub fn client(&self) -> ControlClient {
        ControlClient::new(&self.control).with_timeout(Duration::from_secs(30))
    }

    /// The counters of port `name`.
    pub fn port(&self, name: &str) -> Value {
        self.client().port(name).unwrap()
    }

    /// Counter `key` of port `name`.
    pub fn counter(&self, name: &str, key: &str) -> u64 {
        self.port(name)[key].as_u64().unwrap()
    }

    /// Waits until `cond` holds, polling every 100 ms, up to `secs` seconds.
    pub fn wait_for(&self, secs: u64, what: &str, mut cond: impl FnMut(&Backend) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DPDK testpmd with one `net_virtio_user` port: a vhost-user frontend, no VM.
pub struct Testpmd {
    child: Option<Child>,
    prefix: String,
    /// Its output.
    pub log: PathBuf,
}

impl Testpmd {
    /// Starts testpmd on `socket` with `mac`, forwarding mode `mode`, on host `cpu`,
    /// with extra testpmd (application) arguments.
    pub fn start(
        dir: &Path,
        tag: &str,
        socket: &Path,
        mac: &str,
        mode: &str,
        cpu: usize,
        extra: &[&str],
    ) -> Testpmd {
        Testpmd::start_queues(dir, tag, socket, mac, mode, cpu, "queues=1", extra)
    }

    /// Like [`Testpmd::start`] with other virtio-user queue options (e.g.
    /// `queues=2,cq=1`).
    #[allow(clippy::too_many_arguments)]
    pub fn start_queues(
        dir: &Path,
        tag: &str,
        socket: &Path,
        mac: &str,
        mode: &str,
        cpu: usize,
        queues: &str,
        extra: &[&str],
    ) -> Testpmd {
        let prefix = format!("keelnet-{}-{tag}", std::process::id());
        let log = dir.join(format!("testpmd-{tag}.log"));
        let child = Command::new("dpdk-testpmd")
            .arg(format!("--lcores=0@{cpu},1@{cpu}"))
            .args(["-n", "1", "--no-pci", "--single-file-segments", "-m", "256"])
            .arg(format!("--file-prefix={prefix}"))
            .arg("--vdev")
            .arg(format!(
                "net_virtio_user0,path={},{queues},mac={mac}",
                socket.display()
            ))
            .arg("--")
            .arg(format!("--forward-mode={mode}"))
            .args(["--stats-period=1", "--no-mlockall"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Testpmd {
            child: Some(child),
            prefix,
            log,
        }
    }

    /// Asks testpmd to quit (SIGINT: it prints its final statistics) and waits.
    pub fn stop(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the PID of a child we spawned and have not reaped yet.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.wait();
        }
        self.cleanup();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills testpmd at once (SIGKILL), like a crashing frontend.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.cleanup();
    }

    fn cleanup(&self) {
        if let Ok(entries) = std::fs::read_dir("/dev/hugepages") {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&self.prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `RX-packets:` (or `TX-packets:`) number in testpmd's output.
pub fn last_count(log: &str, key: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        let at = l.find(key)?;
        l[at + key.len()..].split_whitespace().next()?.parse().ok()
    })
}
