//! virtio devices backed by real vhost-user backends: qemu-storage-daemon for blk,
//! DPDK testpmd's vhost PMD for net; and what happens when a backend is missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{SandboxDir, Vmm, BOOT_TIMEOUT};

/// DPDK peers need hugepages from a shared pool: tests that start them run one at a
/// time, in this process (the mutex) and across test processes (an exclusive flock
/// of the file vhost-net's tests take too).
static DPDK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Held while a test runs testpmd.
struct DpdkLock {
    _file: Option<std::fs::File>,
    _guard: std::sync::MutexGuard<'static, ()>,
}

fn dpdk_lock() -> DpdkLock {
    let guard = DPDK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/tmp/keel-dpdk-tests.lock")
        .ok();
    if let Some(f) = &file {
        // SAFETY: flock(2) on an open file descriptor; blocks until it is ours.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(f), libc::LOCK_EX) };
    }
    DpdkLock {
        _file: file,
        _guard: guard,
    }
}

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

/// A zeroed 1 MiB disk image in `dir` and the path for its backend's socket.
fn scratch_disk(dir: &SandboxDir) -> (PathBuf, PathBuf) {
    let image = dir.path("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    (image, dir.path("blk.sock"))
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
    let (image, socket) = scratch_disk(&dir);
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

const SECTOR: usize = 512;

/// Checks that sector `sector` of `image` holds the probe's pattern (tag, sector
/// number, run nonce, then a sequence derived from them).
fn assert_probe_pattern(image: &[u8], sector: u64) {
    let s = &image[sector as usize * SECTOR..(sector as usize + 1) * SECTOR];
    assert_eq!(&s[..8], b"KEELPROB", "sector {sector} has no pattern tag");
    assert_eq!(u64::from_le_bytes(s[8..16].try_into().unwrap()), sector);
    let nonce = u32::from_le_bytes(s[16..20].try_into().unwrap());
    for (i, b) in s.iter().enumerate().skip(20) {
        let want = (sector as u32)
            .wrapping_mul(31)
            .wrapping_add((i as u32).wrapping_mul(7))
            .wrapping_add(nonce) as u8;
        assert_eq!(*b, want, "sector {sector} byte {i}");
    }
}

#[test]
fn guest_writes_reach_the_disk_image_through_qemu_storage_daemon() {
    let dir = SandboxDir::new();
    let image = dir.path("disk.img");
    let sectors = 2048u64;
    std::fs::write(&image, vec![0u8; sectors as usize * SECTOR]).unwrap();
    let socket = dir.path("blk.sock");
    let Some(_qsd) = qemu_storage_daemon(&image, &socket, true) else {
        return;
    };
    let config = disk_config(&dir, "blk", &socket, "");
    let out = run_to_end(&config);
    assert_has(&out, "keel-probe: pci 00:01.0 vendor=1af4 device=1042");
    assert_has(&out, "keel-probe: virtio-blk reinit ok");
    assert!(
        out.contains(&format!("keel-probe: virtio-blk capacity={sectors} ro=0")),
        "{out}"
    );
    assert_has(&out, "keel-probe: virtio-blk pattern ok");
    assert_has(&out, "keel-probe: virtio done blk=ok");
    // The data is really in the image, where the guest put it.
    let bytes = std::fs::read(&image).unwrap();
    for sector in (0..8).chain([sectors - 1]) {
        assert_probe_pattern(&bytes, sector);
    }
    assert!(
        bytes[8 * SECTOR..16 * SECTOR].iter().all(|&b| b == 0),
        "stray writes"
    );
}

#[test]
fn a_read_only_disk_rejects_guest_writes() {
    let dir = SandboxDir::new();
    let (image, socket) = scratch_disk(&dir);
    let Some(_qsd) = qemu_storage_daemon(&image, &socket, false) else {
        return;
    };
    let config = disk_config(&dir, "blk", &socket, "read_only = true\n");
    let out = run_to_end(&config);
    assert_has(&out, "ro=1");
    assert_has(&out, "keel-probe: virtio-blk ro write rejected");
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 0));
}

/// DPDK testpmd serving a vhost-user socket with its net_vhost PMD and echoing
/// every frame back with MACs swapped.
fn testpmd_macswap(socket: &Path) -> Option<Backend> {
    testpmd_macswap_queues(socket, 1)
}

fn testpmd_macswap_queues(socket: &Path, queues: u16) -> Option<Backend> {
    let backend = macswap_testpmd(
        &format!("net_vhost0,iface={},queues={queues}", socket.display()),
        &[],
    )?;
    wait_for_socket(socket);
    Some(backend)
}

/// DPDK testpmd with one `vdev`, echoing every frame with its MAC addresses swapped;
/// `None` (with a "skipping" line) when testpmd is not installed. It keeps no
/// hugepage files at all (`--in-memory`), so a killed testpmd leaves nothing in
/// /dev/hugepages.
fn macswap_testpmd(vdev: &str, eal: &[&str]) -> Option<Backend> {
    let child = Command::new("dpdk-testpmd")
        .args(["--lcores=0@0,1@0", "-n", "1", "--no-pci", "--in-memory"])
        .args(eal)
        .args(["-m", "64", "--vdev", vdev])
        .args([
            "--",
            "--forward-mode=macswap",
            "--auto-start",
            "--stats-period=1",
            "--no-mlockall",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(c) => Some(Backend(c)),
        Err(e) => {
            eprintln!("skipping: dpdk-testpmd is not available ({e}); run scripts/setup.sh");
            None
        }
    }
}

#[test]
fn frames_echo_through_dpdk_testpmd_and_both_devices_work_together() {
    let _dpdk = dpdk_lock();
    let dir = SandboxDir::new();
    let net_sock = dir.path("net.sock");
    let Some(_pmd) = testpmd_macswap(&net_sock) else {
        return;
    };
    let (image, blk_sock) = scratch_disk(&dir);
    let Some(_qsd) = qemu_storage_daemon(&image, &blk_sock, true) else {
        return;
    };
    let config = dir.probe_config(
        "virtio",
        1,
        &format!(
            "[devices]\nconnect_timeout = \"20s\"\n\
             [[disk]]\nid = \"disk0\"\nsocket = \"{}\"\n\
             [[net]]\nid = \"net0\"\nsocket = \"{}\"\nmac = \"52:54:00:12:34:56\"\n",
            blk_sock.display(),
            net_sock.display()
        ),
    );
    let out = run_to_end(&config);
    assert_has(&out, "keel-probe: virtio-net mac=52:54:00:12:34:56 link=up");
    assert_has(&out, "keel-probe: virtio-net echo ok count=4");
    assert_has(&out, "keel-probe: virtio done blk=ok net=ok");
    assert_probe_pattern(&std::fs::read(&image).unwrap(), 0);
}

#[test]
fn disk_io_survives_a_backend_crash_and_restart() {
    let dir = SandboxDir::new();
    let (image, socket) = scratch_disk(&dir);
    let Some(mut qsd) = qemu_storage_daemon(&image, &socket, true) else {
        return;
    };
    let config = dir.probe_config(
        "blk probe.rounds=60 probe.timeout_ms=20000",
        1,
        &format!(
            "[devices]\nconnect_timeout = \"10s\"\n[[disk]]\nid = \"disk0\"\nsocket = \"{}\"\n",
            socket.display()
        ),
    );
    let mut vmm = Vmm::start(&config);
    vmm.stdout
        .wait_for("keel-probe: virtio-blk round 3 ok", BOOT_TIMEOUT);
    // Crash the backend mid-workload, then bring a new one up on the same socket.
    crash_backend(&mut vmm, &mut qsd, "disk0");
    let _ = std::fs::remove_file(&socket);
    thread::sleep(Duration::from_millis(300));
    let Some(_qsd2) = qemu_storage_daemon(&image, &socket, true) else {
        return;
    };
    let status = vmm.wait(BOOT_TIMEOUT);
    let out = vmm.stdout.text();
    let err = vmm.stderr.text();
    assert!(status.success(), "{out}\n{err}");
    assert!(err.contains("device disk0: backend is back"), "{err}");
    assert_has(&out, "keel-probe: virtio-blk round 60 ok");
    assert!(!out.contains("round") || !out.contains(" fail"), "{out}");
    assert_has(&out, "keel-probe: virtio done blk=ok");
    assert_probe_pattern(&std::fs::read(&image).unwrap(), 0);
}

/// A socket that accepts connections and never answers, until dropped.
struct HungListener {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HungListener {
    fn bind(path: &Path) -> HungListener {
        use std::sync::atomic::Ordering;
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        held.push(conn);
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        HungListener {
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for HungListener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Boots `config` to the end; panics (with the VM's output) unless it exits 0.
/// Returns the guest's serial output.
fn run_to_end(config: &Path) -> String {
    let mut vmm = Vmm::start(config);
    let status = vmm.wait(BOOT_TIMEOUT);
    let out = vmm.stdout.text();
    assert!(status.success(), "{out}\n{}", vmm.stderr.text());
    out
}

/// Panics unless the guest output `out` contains `line`.
fn assert_has(out: &str, line: &str) {
    assert!(out.contains(line), "missing {line:?} in:\n{out}");
}

/// Kills a device's backend (SIGKILL) and waits until the VMM noticed.
fn crash_backend(vmm: &mut Vmm, backend: &mut Backend, device: &str) {
    let _ = backend.0.kill();
    let _ = backend.0.wait();
    vmm.stderr.wait_for(
        &format!("device {device}: backend disconnected"),
        Duration::from_secs(30),
    );
}

/// Builds (once) and returns the project's own blk backend.
fn keel_vhost_blk() -> std::path::PathBuf {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| own_backend("keel-vhost-blk")).clone()
}

fn start_keel_vhost_blk(image: &Path, socket: &Path, serial: &str) -> Backend {
    let child = Command::new(keel_vhost_blk())
        .arg("--socket")
        .arg(socket)
        .arg("--image")
        .arg(image)
        .args(["--serial", serial])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let backend = Backend(child);
    wait_for_socket(socket);
    backend
}

#[test]
fn guest_data_goes_through_keel_vhost_blk_and_survives_its_restart() {
    let dir = SandboxDir::new();
    let (image, socket) = scratch_disk(&dir);
    let mut backend = start_keel_vhost_blk(&image, &socket, "keel-disk-1");
    let control = dir.path("control.sock");
    let config = dir.probe_config(
        "blk probe.rounds=120 probe.timeout_ms=20000",
        1,
        &format!(
            "[control]\nsocket = \"{}\"\n[devices]\nconnect_timeout = \"10s\"\n[[disk]]\nid = \"disk0\"\nsocket = \"{}\"\n",
            control.display(),
            socket.display()
        ),
    );
    let mut vmm = Vmm::start(&config);
    vmm.stdout
        .wait_for("keel-probe: virtio-blk round 2 ok", BOOT_TIMEOUT);
    crash_backend(&mut vmm, &mut backend, "disk0");
    // Meanwhile something accepts on the socket and never answers: reconnect
    // attempts wait for it (up to the reply deadline), but the event loop must not:
    // the control socket keeps answering at once.
    let _ = std::fs::remove_file(&socket);
    let hung = HungListener::bind(&socket);
    let ctl_stats = || {
        let out = Command::new(env!("CARGO_BIN_EXE_keel-vmm"))
            .args(["ctl", "--socket"])
            .arg(&control)
            .arg("stats")
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut slowest = Duration::ZERO;
    while Instant::now() < deadline {
        let t = Instant::now();
        let stats = ctl_stats();
        slowest = slowest.max(t.elapsed());
        assert_eq!(stats["devices"][0]["backend"], "disconnected", "{stats}");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        hung.accepted() >= 1,
        "no reconnect attempt reached the socket"
    );
    assert!(slowest < Duration::from_secs(1), "stats took {slowest:?}");
    drop(hung);
    let _ = std::fs::remove_file(&socket);
    let _backend2 = start_keel_vhost_blk(&image, &socket, "keel-disk-1");
    vmm.stderr
        .wait_for("device disk0: backend is back", Duration::from_secs(30));
    // The operator sees the reconnect in the control socket's stats.
    let stats = ctl_stats();
    assert_eq!(stats["devices"][0]["id"], "disk0", "{stats}");
    assert_eq!(stats["devices"][0]["backend"], "connected", "{stats}");
    assert_eq!(stats["devices"][0]["reconnects"], 1, "{stats}");
    let status = vmm.wait(BOOT_TIMEOUT);
    let out = vmm.stdout.text();
    let err = vmm.stderr.text();
    assert!(status.success(), "{out}\n{err}");
    assert_has(&out, "serial=keel-disk-1");
    assert!(err.contains("device disk0: backend is back"), "{err}");
    assert_has(&out, "keel-probe: virtio-blk round 120 ok");
    assert_has(&out, "keel-probe: virtio done blk=ok");
    assert_probe_pattern(&std::fs::read(&image).unwrap(), 0);
}

#[test]
fn devices_keep_working_after_the_guest_moves_their_bars() {
    let dir = SandboxDir::new();
    let (image, socket) = scratch_disk(&dir);
    let _backend = start_keel_vhost_blk(&image, &socket, "moved");
    let config = disk_config(&dir, "blk probe.pci_reassign=1", &socket, "");
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(BOOT_TIMEOUT);
    let out = vmm.stdout.text();
    let err = vmm.stderr.text();
    assert!(status.success(), "{out}\n{err}");
    assert_has(
        &out,
        "keel-probe: pci assigned bar 00:01.0 bar0 addr=0xc0008000",
    );
    assert!(
        err.contains("BAR 0 moved by the guest 0xc0000000 -> 0xc0008000"),
        "{err}"
    );
    assert_has(&out, "keel-probe: virtio done blk=ok");
}

#[test]
fn a_multiqueue_disk_shows_its_queues_to_the_guest() {
    let dir = SandboxDir::new();
    let (image, socket) = scratch_disk(&dir);
    let child = Command::new(keel_vhost_blk())
        .arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(&image)
        .args(["--queues", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _backend = Backend(child);
    wait_for_socket(&socket);
    let config = disk_config(&dir, "blk", &socket, "queues = 2\n");
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(BOOT_TIMEOUT);
    let out = vmm.stdout.text();
    let err = vmm.stderr.text();
    assert!(status.success(), "{out}\n{err}");
    assert!(err.contains("2 queue(s)"), "{err}");
    assert_has(&out, "num_queues=2");
    assert_has(&out, "keel-probe: virtio done blk=ok");
}

#[test]
fn a_multiqueue_nic_offers_its_pairs_and_a_simple_driver_still_works() {
    let _dpdk = dpdk_lock();
    let dir = SandboxDir::new();
    let net_sock = dir.path("net.sock");
    let Some(_pmd) = testpmd_macswap_queues(&net_sock, 2) else {
        return;
    };
    let config = dir.probe_config(
        "net",
        1,
        &format!(
            "[devices]\nconnect_timeout = \"20s\"\n\
             [[net]]\nid = \"net0\"\nsocket = \"{}\"\nmac = \"52:54:00:12:34:57\"\nqueue_pairs = 2\n",
            net_sock.display()
        ),
    );
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(BOOT_TIMEOUT);
    let out = vmm.stdout.text();
    let err = vmm.stderr.text();
    assert!(status.success(), "{out}\n{err}");
    assert!(
        err.contains("device net0: virtio-net, 2 queue pair(s)"),
        "{err}"
    );
    // Two pairs plus the control queue.
    assert_has(&out, " queues=5");
    assert_has(&out, "keel-probe: virtio-net echo ok count=4");
}

/// Builds (once) and returns one of the project's own backends.
fn own_backend(package: &str) -> std::path::PathBuf {
    let root = common::workspace_root();
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", package])
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(status.success(), "building {package} failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("debug").join(package)
}

#[test]
fn frames_cross_keel_vhost_net_to_a_dpdk_peer_and_back() {
    cross_keel_vhost_net(1);
}

#[test]
fn a_two_pair_nic_on_keel_vhost_net_still_echoes_on_pair_zero() {
    cross_keel_vhost_net(2);
}

/// keel-vhost-net with a port `vm` (`pairs` queue pairs) at `dir/vm.sock`, a port
/// `peer` at `dir/peer.sock`, a control socket at `dir/switch-control.sock`, logging
/// to `log` (appended).
fn start_switch(dir: &SandboxDir, pairs: u16, log: &Path) -> Backend {
    let (vm_sock, peer_sock) = (dir.path("vm.sock"), dir.path("peer.sock"));
    let _ = std::fs::remove_file(&vm_sock);
    let _ = std::fs::remove_file(&peer_sock);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let switch = Command::new(own_backend("keel-vhost-net"))
        .arg("--port")
        .arg(format!(
            "name=vm,socket={},mac=52:54:00:12:34:56,queues={pairs}",
            vm_sock.display()
        ))
        .arg("--port")
        .arg(format!("name=peer,socket={}", peer_sock.display()))
        .arg("--control")
        .arg(dir.path("switch-control.sock"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let switch = Backend(switch);
    wait_for_socket(&vm_sock);
    wait_for_socket(&peer_sock);
    switch
}

/// One port's stats from keel-vhost-net's control socket.
fn switch_port(dir: &SandboxDir, port: &str) -> serde_json::Value {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(dir.path("switch-control.sock")).unwrap();
    s.write_all(b"{\"cmd\":\"stats\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port)
        .cloned()
        .unwrap()
}

/// Waits until `log` has `times` lines containing `what`.
fn wait_in_log(log: &Path, what: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(what)
        .count()
        < times
    {
        assert!(
            Instant::now() < deadline,
            "{what:?} never seen {times}x in {}",
            log.display()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// testpmd's virtio-user PMD on `socket`, echoing every frame with its MAC
/// addresses swapped: a real vhost-user frontend on the switch's other port.
fn virtio_user_macswap(socket: &Path) -> Option<Backend> {
    // virtio-user needs its memory in few segments to share it over vhost-user.
    macswap_testpmd(
        &format!("net_virtio_user0,path={},queues=1", socket.display()),
        &["--single-file-segments"],
    )
}

fn cross_keel_vhost_net(pairs: u16) {
    let _dpdk = dpdk_lock();
    let dir = SandboxDir::new();
    let vm_sock = dir.path("vm.sock");
    let switch_log = dir.path("switch.log");
    let _switch = start_switch(&dir, pairs, &switch_log);
    let Some(_peer) = virtio_user_macswap(&dir.path("peer.sock")) else {
        return;
    };
    // Wait until the peer's rings are up on the switch before the guest sends.
    wait_in_log(&switch_log, "port peer: frontend connected", 1);
    thread::sleep(Duration::from_millis(500));
    let config = dir.probe_config(
        "net",
        1,
        &format!(
            "[[net]]\nid = \"net0\"\nsocket = \"{}\"\nmac = \"52:54:00:12:34:56\"\nqueue_pairs = {pairs}\n",
            vm_sock.display()
        ),
    );
    let out = run_to_end(&config);
    assert_has(&out, "keel-probe: virtio-net echo ok count=4");
    assert_has(&out, "keel-probe: virtio done blk=skipped net=ok");
}

#[test]
fn a_restarted_nic_backend_gets_only_the_queue_pairs_the_driver_enabled() {
    // The probe's driver negotiates MQ, sets up two pairs and uses one: the VMM
    // enables pair 0 only, and the replay after the restart too (not all rings).
    pairs_across_a_backend_restart("", "keel-probe: virtio-net mq pairs_set_up=2", false);
}

#[test]
fn the_guests_vq_pairs_set_enables_the_second_pair_also_after_a_backend_restart() {
    // The guest's driver asks for both pairs on the control queue, which keel-vmm
    // serves: it acks and enables pair 1's rings in the backend; after a backend
    // restart the replay enables what the driver selected: both.
    pairs_across_a_backend_restart(
        " probe.net_mq_set=2",
        "keel-probe: virtio-net ctrl vq_pairs_set=2 ack=0",
        true,
    );
}

/// A probe guest with a two-pair NIC (`probe.net_pairs=2` plus `probe_args`) on
/// keel-vhost-net: once `ready` is printed, pair 0 is enabled and pair 1 is
/// `pair1_enabled`; the switch crashes and comes back, and the same holds. No peer
/// answers, so the probe waits (up to its timeout) with the NIC running.
fn pairs_across_a_backend_restart(probe_args: &str, ready: &str, pair1_enabled: bool) {
    let dir = SandboxDir::new();
    let switch_log = dir.path("switch.log");
    let mut switch = start_switch(&dir, 2, &switch_log);
    let config = dir.probe_config(
        &format!("net probe.timeout_ms=30000 probe.net_pairs=2{probe_args}"),
        1,
        &format!(
            "[devices]\nconnect_timeout = \"20s\"\n\
             [[net]]\nid = \"net0\"\nsocket = \"{}\"\nmac = \"52:54:00:12:34:56\"\nqueue_pairs = 2\n",
            dir.path("vm.sock").display()
        ),
    );
    let mut vmm = Vmm::start(&config);
    vmm.stdout.wait_for(ready, BOOT_TIMEOUT);
    // Waits until the switch shows the expected state (or 20 s passed).
    let settled = |dir: &SandboxDir| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let vm = switch_port(dir, "vm");
            let done =
                vm["pairs"][0]["enabled"] == true && vm["pairs"][1]["enabled"] == pair1_enabled;
            if done || Instant::now() > deadline {
                return vm;
            }
            thread::sleep(Duration::from_millis(50));
        }
    };
    let vm = settled(&dir);
    assert_eq!(vm["pairs"][0]["enabled"], true, "{vm}");
    assert_eq!(vm["pairs"][1]["enabled"], pair1_enabled, "{vm}");
    crash_backend(&mut vmm, &mut switch, "net0");
    switch = start_switch(&dir, 2, &switch_log);
    vmm.stderr
        .wait_for("device net0: backend is back", Duration::from_secs(30));
    let vm = settled(&dir);
    assert_eq!(vm["pairs"][0]["enabled"], true, "{vm}");
    assert_eq!(vm["pairs"][1]["enabled"], pair1_enabled, "{vm}");
    // The probe still waits for echoes that never come: stop it here.
    drop(vmm);
    drop(switch);
}

#[test]
fn disk_io_continues_while_the_nic_backend_is_down_and_the_nic_recovers() {
    let _dpdk = dpdk_lock();
    let dir = SandboxDir::new();
    let net_sock = dir.path("net.sock");
    let Some(mut pmd) = testpmd_macswap(&net_sock) else {
        return;
    };
    let (image, blk_sock) = scratch_disk(&dir);
    let _blk = start_keel_vhost_blk(&image, &blk_sock, "both");
    let config = dir.probe_config(
        "virtio probe.rounds=80 probe.timeout_ms=20000",
        1,
        &format!(
            "[devices]\nconnect_timeout = \"20s\"\n\
             [[disk]]\nid = \"disk0\"\nsocket = \"{}\"\n\
             [[net]]\nid = \"net0\"\nsocket = \"{}\"\nmac = \"52:54:00:12:34:56\"\n",
            blk_sock.display(),
            net_sock.display()
        ),
    );
    let mut vmm = Vmm::start(&config);
    vmm.stdout
        .wait_for("keel-probe: virtio-blk round 2 ok", BOOT_TIMEOUT);
    crash_backend(&mut vmm, &mut pmd, "net0");
    // The disk keeps serving the guest while the NIC's backend is gone.
    let seen = vmm.stdout.text().matches("round ").count();
    vmm.stdout.wait_for(
        &format!("keel-probe: virtio-blk round {} ok", seen + 3),
        BOOT_TIMEOUT,
    );
    let _ = std::fs::remove_file(&net_sock);
    let Some(_pmd2) = testpmd_macswap(&net_sock) else {
        return;
    };
    vmm.stderr
        .wait_for("device net0: backend is back", Duration::from_secs(30));
    let status = vmm.wait(BOOT_TIMEOUT);
    let out = vmm.stdout.text();
    assert!(status.success(), "{out}\n{}", vmm.stderr.text());
    assert_has(&out, "keel-probe: virtio-blk round 80 ok");
    assert_has(&out, "keel-probe: virtio done blk=ok net=ok");
}

#[test]
fn a_hung_backend_cannot_hang_the_vmm() {
    // Given up by the default 5 s reply deadline, not by the peer closing (at 12 s).
    let took = vmm_facing_a_hung_backend(None);
    assert!(took < Duration::from_secs(11), "{took:?}");
    assert!(took >= Duration::from_secs(5), "{took:?}");
}

#[test]
fn the_reply_deadline_is_the_sandboxs_reply_timeout() {
    let took = vmm_facing_a_hung_backend(Some("1s"));
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(took >= Duration::from_secs(1), "{took:?}");
}

/// Starts a VM whose disk backend accepts the connection and never answers; returns
/// how long the VMM took to give up (it must, exit 1, naming device and step).
fn vmm_facing_a_hung_backend(reply_timeout: Option<&str>) -> Duration {
    let dir = SandboxDir::new();
    let socket = dir.path("hung.sock");
    // Accepts connections and never answers.
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let keep = thread::spawn(move || {
        let conn = listener.accept();
        thread::sleep(Duration::from_secs(12));
        drop(conn);
    });
    let config = dir.probe_config(
        "hello",
        1,
        &format!(
            "[devices]\nconnect_timeout = \"10s\"\n{}[[disk]]\nid = \"disk0\"\nsocket = \"{}\"\n",
            reply_timeout.map_or(String::new(), |t| format!("reply_timeout = \"{t}\"\n")),
            socket.display()
        ),
    );
    let started = Instant::now();
    let mut vmm = Vmm::start(&config);
    let status = vmm.wait(Duration::from_secs(40));
    let took = started.elapsed();
    let err = vmm.stderr.text();
    eprintln!("hung backend: VMM gave up after {took:?}");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("device disk0"), "{err}");
    assert!(err.contains("GET_FEATURES"), "{err}");
    drop(keep);
    took
}
