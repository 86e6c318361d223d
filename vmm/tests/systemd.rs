#![allow(clippy::unwrap_used, clippy::expect_used)]
//! systemd deployment: the unit files (`systemd-analyze verify` and `security`), the
//! install script, the hugepage and generator helpers, and the sd_notify protocol
//! against a real `NOTIFY_SOCKET` listener.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{workspace_root, SandboxDir, Vmm, BOOT_TIMEOUT};
use keel_sd_notify::NotifyListener;

/// Highest acceptable `systemd-analyze security` exposure ("OK" or better).
const MAX_EXPOSURE: f64 = 4.0;

const SERVICES: &[&str] = &[
    "keel-vmm@.service",
    "keel-vhost-net@.service",
    "keel-vhost-blk@.service",
    "keel-hugepages.service",
];
const UNITS: &[&str] = &[
    "keel-vmm@.service",
    "keel-vhost-net@.service",
    "keel-vhost-blk@.service",
    "keel-hugepages.service",
    "keel.slice",
];

fn systemd_dir() -> PathBuf {
    workspace_root().join("systemd")
}

/// Whether `systemd-analyze` can run here; prints why a test is skipped if not.
fn have_systemd_analyze(test: &str) -> bool {
    let ok = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED {test}: systemd-analyze is not installed (apt-get install systemd)");
    }
    ok
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Copies the units into a temp dir with their binary paths pointing at binaries that
/// exist here: keel-vmm (built), the hugepage script, and /bin/true for the backends
/// (built by other packages; `verify` only needs an executable).
fn staged_units() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("keel-units-")
        .tempdir()
        .unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let links = [
        ("keel-vmm", PathBuf::from(env!("CARGO_BIN_EXE_keel-vmm"))),
        ("keel-vhost-net", PathBuf::from("/bin/true")),
        ("keel-vhost-blk", PathBuf::from("/bin/true")),
        (
            "keel-hugepages",
            systemd_dir().join("libexec/keel-hugepages"),
        ),
    ];
    for (name, target) in links {
        std::os::unix::fs::symlink(target, bin.join(name)).unwrap();
    }
    let bin = bin.to_str().unwrap().to_owned() + "/";
    for unit in UNITS {
        let body = std::fs::read_to_string(systemd_dir().join("units").join(unit)).unwrap();
        let body = body
            .replace("/usr/local/bin/", &bin)
            .replace("/usr/local/libexec/keel/", &bin);
        std::fs::write(dir.path().join(unit), body).unwrap();
    }
    dir
}

/// Runs `systemd-analyze verify` on `units` with `unit_path` first in the unit search
/// path; panics with the output on any complaint.
fn verify(unit_path: &Path, units: &[String]) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(units)
        .env(
            "SYSTEMD_UNIT_PATH",
            format!("{}:", unit_path.to_str().unwrap()),
        )
        .current_dir(unit_path)
        .output()
        .unwrap();
    let all = text(&out);
    let complaints: Vec<&str> = all.lines().filter(|l| l.contains("keel")).collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify {units:?} failed ({}):\n{all}",
        out.status
    );
}

#[test]
fn units_verify() {
    if !have_systemd_analyze("units_verify") {
        return;
    }
    let dir = staged_units();
    let files: Vec<String> = UNITS
        .iter()
        .map(|u| dir.path().join(u).to_str().unwrap().to_owned())
        .collect();
    verify(dir.path(), &files);
    // Instances, as operators start them.
    verify(
        dir.path(),
        &[
            "keel-vmm@web.service".to_owned(),
            "keel-vhost-net@sw0.service".to_owned(),
            "keel-vhost-blk@web-root.service".to_owned(),
        ],
    );
}

/// The "Overall exposure level for UNIT: N.N ..." value.
fn exposure(unit_file: &Path) -> (f64, String) {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit_file)
        .output()
        .unwrap();
    let all = text(&out);
    let line = all
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure line for {}:\n{all}", unit_file.display()));
    let value = line
        .rsplit(':')
        .next()
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    (value, all)
}

#[test]
fn units_security_exposure_is_ok() {
    if !have_systemd_analyze("units_security_exposure_is_ok") {
        return;
    }
    let dir = staged_units();
    let mut report = Vec::new();
    for unit in SERVICES {
        let (value, all) = exposure(&dir.path().join(unit));
        eprintln!("{unit}: exposure {value}");
        assert!(
            value <= MAX_EXPOSURE,
            "{unit}: exposure {value} > {MAX_EXPOSURE}:\n{all}"
        );
        report.push((unit, value));
    }
    assert_eq!(report.len(), SERVICES.len());
}

#[test]
fn every_remaining_exposure_is_explained_in_the_unit() {
    // Each service says why what stays exposed is needed, in a comment block.
    for unit in SERVICES {
        let body = std::fs::read_to_string(systemd_dir().join("units").join(unit)).unwrap();
        assert!(
            body.contains("# Remaining exposure"),
            "{unit}: no \"# Remaining exposure\" comment"
        );
    }
}

/// Datagrams received on a notification socket, with their arrival times.
#[derive(Clone, Default)]
struct Notes(Arc<Mutex<Vec<(Instant, String)>>>);

impl Notes {
    /// Collects every notification to `address` (a path or `@name`) from a thread.
    fn listen(address: &str) -> Self {
        let listener = NotifyListener::bind(address).unwrap();
        let notes = Notes::default();
        let n = notes.clone();
        thread::spawn(move || {
            // Ends once the test dropped its Notes (or the socket fails).
            loop {
                match listener.recv(Duration::from_millis(100)) {
                    Ok(msg) => n.0.lock().unwrap().push((Instant::now(), msg)),
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        if Arc::strong_count(&n.0) == 1 {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        notes
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.0.lock().unwrap().clone()
    }

    /// Times of the datagrams that contain the line `line`.
    fn times_of(&self, line: &str) -> Vec<Instant> {
        self.all()
            .into_iter()
            .filter(|(_, m)| m.lines().any(|l| l == line))
            .map(|(t, _)| t)
            .collect()
    }

    fn wait_for(&self, line: &str, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.times_of(line).first() {
                return *t;
            }
            assert!(
                Instant::now() < deadline,
                "no {line:?} within {timeout:?}; got {:?}",
                self.all().iter().map(|(_, m)| m).collect::<Vec<_>>()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn notify_ready_watchdog_and_stopping() {
    let dir = SandboxDir::new();
    let sock = dir.path("notify.sock");
    let notes = Notes::listen(sock.to_str().unwrap());
    let config = dir.probe_config("spin", 1, "");
    let mut vmm = Vmm::start_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", sock.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );

    let ready = notes.wait_for("READY=1", BOOT_TIMEOUT);
    // READY comes first: nothing (no watchdog ping, no STOPPING) before it.
    let first = notes.all();
    assert!(
        first[0].1.lines().any(|l| l == "READY=1"),
        "first notification is not READY: {first:?}"
    );
    assert!(
        first[0].1.lines().any(|l| l.starts_with("STATUS=running")),
        "READY carries no STATUS: {first:?}"
    );
    // ...and the guest really runs after it: its ticks follow.
    vmm.stdout.wait_for("keel-probe: tick 2", BOOT_TIMEOUT);
    assert_eq!(notes.times_of("READY=1").len(), 1, "READY sent twice");

    // Watchdog: WATCHDOG_USEC=200000 means a ping every 100 ms. Count over ~1 s
    // (generous bounds: a loaded 2-core machine delays timers).
    let start = Instant::now();
    thread::sleep(Duration::from_millis(1000));
    let window = start.elapsed();
    let pings: Vec<Instant> = notes
        .times_of("WATCHDOG=1")
        .into_iter()
        .filter(|t| *t >= start && *t <= start + window)
        .collect();
    assert!(
        (4..=16).contains(&pings.len()),
        "{} watchdog pings in {window:?}, expected about 10",
        pings.len()
    );
    let all_pings = notes.times_of("WATCHDOG=1");
    assert!(all_pings.iter().all(|t| *t > ready));
    let mean = (all_pings[all_pings.len() - 1] - all_pings[0]) / (all_pings.len() as u32 - 1);
    assert!(
        mean >= Duration::from_millis(60) && mean <= Duration::from_millis(250),
        "mean watchdog period {mean:?}, expected about 100 ms"
    );

    // SIGTERM: STOPPING=1, then no more pings; exit 0.
    let term = Instant::now();
    vmm.signal(libc::SIGTERM);
    let status = vmm.wait(Duration::from_secs(30));
    assert!(status.success(), "exit {status:?}");
    let stopping = notes.wait_for("STOPPING=1", Duration::from_secs(5));
    assert!(stopping > term);
    assert!(
        notes.times_of("WATCHDOG=1").iter().all(|t| *t < stopping),
        "watchdog ping after STOPPING"
    );
}

#[test]
fn notify_abstract_socket_control_shutdown_and_foreign_watchdog_pid() {
    let dir = SandboxDir::new();
    let name = format!("keel-test-notify-{}", std::process::id());
    let notes = Notes::listen(&format!("@{name}"));
    let control = dir.path("control.sock");
    let extra = format!("[control]\nsocket = \"{}\"\n", control.display());
    let config = dir.probe_config("spin", 1, &extra);
    // The watchdog is meant for another process (PID 1): keel must not ping.
    let mut vmm = Vmm::start_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", &format!("@{name}")),
            ("WATCHDOG_USEC", "100000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    notes.wait_for("READY=1", BOOT_TIMEOUT);
    vmm.stdout.wait_for("keel-probe: tick 2", BOOT_TIMEOUT);
    let out = Command::new(env!("CARGO_BIN_EXE_keel-vmm"))
        .args(["ctl", "--socket", control.to_str().unwrap(), "shutdown"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(vmm.wait(Duration::from_secs(30)).success());
    notes.wait_for("STOPPING=1", Duration::from_secs(5));
    assert!(
        notes.times_of("WATCHDOG=1").is_empty(),
        "pinged a foreign watchdog"
    );
}

#[test]
fn notify_no_ready_when_the_vm_cannot_start() {
    let dir = SandboxDir::new();
    let sock = dir.path("notify.sock");
    let notes = Notes::listen(sock.to_str().unwrap());
    // The file is valid, but the 2 MiB hugepage pool is too small for it: the VMM
    // fails while creating guest RAM, after KVM is set up.
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    let mib = (free + 32) * 2;
    let config = dir.probe_config("spin", 1, "");
    let body = std::fs::read_to_string(&config).unwrap().replace(
        "size = \"64MiB\"",
        &format!("size = \"{mib}MiB\"\nhugepages = \"2M\""),
    );
    std::fs::write(&config, body).unwrap();
    let mut vmm = Vmm::start_with_env(&config, &[("NOTIFY_SOCKET", sock.to_str().unwrap())]);
    let status = vmm.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", vmm.stderr.text());
    thread::sleep(Duration::from_millis(200));
    assert!(
        notes.times_of("READY=1").is_empty(),
        "READY sent for a VM that did not start: {:?}",
        notes.all()
    );
}

/// A file that passes the config's kernel format check (ELF magic); never booted.
fn fake_kernel(path: &Path) {
    let mut bytes = b"\x7fELF".to_vec();
    bytes.resize(4096, 0);
    std::fs::write(path, bytes).unwrap();
}

/// Writes a sandbox following the socket convention, with huge pages and pinning.
fn convention_sandbox(dir: &SandboxDir) -> PathBuf {
    let body = "name = \"web\"\n\
        [vcpus]\ncount = 1\naffinity = [[1]]\n\
        [vmm]\naffinity = [0]\n\
        [memory]\nsize = \"64MiB\"\nnuma_node = 0\n\
        [boot]\nkernel = \"vmlinux\"\n\
        [[net]]\nid = \"net0\"\nsocket = \"/run/keel/net/sw0/web-net0.sock\"\nmac = \"52:54:00:00:00:01\"\n\
        [[disk]]\nid = \"root\"\nsocket = \"/run/keel/blk/web-root/vhost.sock\"\n\
        [[disk]]\nid = \"scratch\"\nsocket = \"/tmp/elsewhere.sock\"\n";
    let sandboxes = dir.path("sandboxes");
    std::fs::create_dir_all(&sandboxes).unwrap();
    let path = sandboxes.join("web.toml");
    std::fs::write(&path, body).unwrap();
    // Relative kernel path: next to the sandbox file.
    fake_kernel(&sandboxes.join("vmlinux"));
    path
}

#[test]
fn generator_writes_a_valid_dropin() {
    let dir = SandboxDir::new();
    convention_sandbox(&dir);
    let out_dir = dir.path("generated");
    std::fs::create_dir(&out_dir).unwrap();
    let status = Command::new(systemd_dir().join("libexec/keel-sandbox-generator"))
        .arg(&out_dir)
        .arg(dir.path("early"))
        .arg(dir.path("late"))
        .env("KEEL_SANDBOX_DIR", dir.path("sandboxes"))
        .env("KEEL_VMM", env!("CARGO_BIN_EXE_keel-vmm"))
        .status()
        .unwrap();
    assert!(status.success());
    let dropin = out_dir.join("keel-vmm@web.service.d/50-keel-sandbox.conf");
    let body = std::fs::read_to_string(&dropin).unwrap();
    for line in [
        "Wants=keel-vhost-net@sw0.service",
        "After=keel-vhost-net@sw0.service",
        "Wants=keel-vhost-blk@web-root.service",
        "After=keel-vhost-blk@web-root.service",
        "AllowedCPUs=0-1",
        "AllowedMemoryNodes=0",
        "TasksMax=17",
    ] {
        assert!(body.lines().any(|l| l == line), "no {line:?} in:\n{body}");
    }
    // 64 MiB RAM + 128 MiB + 8 MiB per vCPU + 1 MiB (RAM/64).
    assert!(body.contains(&format!("MemoryMax={}", (64 + 128 + 8 + 1) << 20)));
    assert!(body.contains("# Device scratch (/tmp/elsewhere.sock)"));
    assert!(!body.contains("Requires=") && !body.contains("BindsTo="));

    // The drop-in is valid systemd syntax for the real unit.
    if have_systemd_analyze("generator_writes_a_valid_dropin (verify part)") {
        let units = staged_units();
        let unit_dir = units.path().join("keel-vmm@web.service.d");
        std::fs::create_dir(&unit_dir).unwrap();
        std::fs::copy(&dropin, unit_dir.join("50-keel-sandbox.conf")).unwrap();
        verify(units.path(), &["keel-vmm@web.service".to_owned()]);
    }
}

#[test]
fn dropin_for_hugepages_wants_the_pool_and_skips_guest_ram() {
    let dir = SandboxDir::new();
    fake_kernel(&dir.path("vmlinux"));
    let config = dir.config(
        "name = \"huge\"\n[vcpus]\ncount = 2\naffinity = [[0], [1]]\n\
         [memory]\nsize = \"1GiB\"\nhugepages = \"2M\"\n[boot]\nkernel = \"vmlinux\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_keel-vmm"))
        .arg("systemd-dropin")
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let body = String::from_utf8(out.stdout).unwrap();
    assert!(body.contains("Wants=keel-hugepages.service\nAfter=keel-hugepages.service"));
    // Huge pages are not charged to the memory controller: overhead only.
    assert!(
        body.contains(&format!("MemoryMax={}", (128 + 16 + 16) << 20)),
        "{body}"
    );
    // Only the vCPUs are pinned: no AllowedCPUs=, and the reason.
    assert!(!body.lines().any(|l| l.starts_with("AllowedCPUs=")));
    assert!(body.contains("# AllowedCPUs= not set"));

    // A bad file: error, nothing on stdout.
    let bad = dir.config("name = \"x\"\n");
    let out = Command::new(env!("CARGO_BIN_EXE_keel-vmm"))
        .arg("systemd-dropin")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sandbox.toml"));
}

#[test]
fn hugepage_script_reserves_and_reports() {
    let dir = SandboxDir::new();
    let pool = dir.path("sys/kernel/mm/hugepages/hugepages-2048kB");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::write(pool.join("nr_hugepages"), "4\n").unwrap();
    let run = |env: &[(&str, &str)]| {
        Command::new("sh")
            .arg(systemd_dir().join("libexec/keel-hugepages"))
            .env("KEEL_SYSFS", dir.path("sys"))
            .env_remove("KEEL_HUGEPAGES_2M")
            .env_remove("KEEL_HUGEPAGES_1G")
            .env_remove("KEEL_HUGEPAGES_NODE")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let out = run(&[("KEEL_HUGEPAGES_2M", "16")]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(pool.join("nr_hugepages"))
            .unwrap()
            .trim(),
        "16"
    );
    // Never shrinks a pool.
    let out = run(&[("KEEL_HUGEPAGES_2M", "8")]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(pool.join("nr_hugepages"))
            .unwrap()
            .trim(),
        "16"
    );
    // Unsupported size and a bad number: clear errors, exit 1.
    let out = run(&[("KEEL_HUGEPAGES_1G", "2")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("1G huge pages are not supported"),
        "{}",
        text(&out)
    );
    let out = run(&[("KEEL_HUGEPAGES_2M", "lots")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("expected a number of pages"));
    // Nothing asked: nothing done.
    assert!(run(&[]).status.success());
}

fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path.clone());
            } else {
                out.push(
                    path.strip_prefix(root)
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

#[test]
fn install_and_uninstall_with_destdir() {
    use std::os::unix::fs::PermissionsExt;

    let dest = tempfile::Builder::new()
        .prefix("keel-destdir-")
        .tempdir()
        .unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_keel-vmm")).parent().unwrap();
    let install = |args: &[&str]| {
        let out = Command::new("sh")
            .arg(systemd_dir().join("install.sh"))
            .args(args)
            .env("DESTDIR", dest.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "install.sh {args:?}: {}", text(&out));
    };
    install(&["--bin-dir", bin_dir.to_str().unwrap()]);
    let files = tree(dest.path());
    for expected in [
        "usr/local/bin/keel-vmm",
        "usr/local/libexec/keel/keel-hugepages",
        "usr/local/lib/systemd/system/keel-vmm@.service",
        "usr/local/lib/systemd/system/keel-vhost-net@.service",
        "usr/local/lib/systemd/system/keel-vhost-blk@.service",
        "usr/local/lib/systemd/system/keel.slice",
        "usr/local/lib/systemd/system/keel-hugepages.service",
        "usr/local/lib/systemd/system-generators/keel-sandbox-generator",
        "usr/local/lib/tmpfiles.d/keel.conf",
        "usr/local/lib/sysusers.d/keel.conf",
        "usr/local/share/doc/keel/README.md",
        "usr/local/share/doc/keel/examples/net-disk.toml",
        "etc/keel/hugepages.conf",
    ] {
        assert!(
            files.iter().any(|f| f == expected),
            "{expected} not installed: {files:?}"
        );
    }
    for dir in ["etc/keel/sandboxes", "etc/keel/switches", "etc/keel/disks"] {
        assert!(dest.path().join(dir).is_dir(), "{dir} missing");
    }
    for exe in [
        "usr/local/bin/keel-vmm",
        "usr/local/libexec/keel/keel-hugepages",
        "usr/local/lib/systemd/system-generators/keel-sandbox-generator",
    ] {
        let mode = std::fs::metadata(dest.path().join(exe))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "{exe} not executable");
    }
    // The installed binary works.
    let out = Command::new(dest.path().join("usr/local/bin/keel-vmm"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    // Installing twice is fine.
    install(&["--bin-dir", bin_dir.to_str().unwrap()]);

    install(&["--uninstall"]);
    let left: Vec<_> = std::fs::read_dir(dest.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left after uninstall: {left:?}");
}
