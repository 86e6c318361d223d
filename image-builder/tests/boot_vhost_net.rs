#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Boots keel-image output under QEMU TCG with its NIC on keel-vhost-net (issue 7's
//! "ping through keel-vhost-net"): the test creates a network namespace, runs the
//! switch inside it with one vhost-user port for QEMU and a TAP uplink `tap0`
//! addressed 10.0.3.1/24 there; the guest gets 10.0.3.2/24 from the kernel command
//! line and its app pings 10.0.3.1 and checks the disk. QEMU itself runs outside the
//! namespace: it only needs the vhost-user socket, a file. QEMU 7.2 under TCG
//! crashes with vhost-user-net and MSI-X, so the NIC uses INTx (`vectors=0`), and
//! guest RAM is a shared memfd (MACHINE.md).
//!
//! QEMU 7.2's virtio-net sends `SET_VRING_ENABLE` before the `SET_FEATURES` that acks
//! `VHOST_USER_F_PROTOCOL_FEATURES`; keel-vhost-net's control relay holds those and
//! passes them on after it (vhost-net/src/relay.rs), so QEMU connects straight to the
//! port's socket, and the test checks the switch logged that it did so.
//!
//! Needs root (network namespaces, TAP) and qemu-system-x86_64; skips without root.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{assert_has, build_image, writable_disk};
use keel_sd_notify::NotifyListener;
use keel_vhost_net::control_client::ControlClient;
use serde_json::Value;

const GUEST_MAC: &str = "52:54:00:12:34:56";

/// A network namespace `keel-img-PID-TAG`, deleted when dropped.
struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Option<Netns> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: network namespaces and TAP devices need root");
            return None;
        }
        let name = format!("keel-img-{}-{tag}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip (package iproute2) is needed for this test");
        assert!(st.success(), "ip netns add {name}: {st}");
        Some(Netns(name))
    }

    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip -n {} {args:?}: {out:?}", self.0);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The kernel's `dir` ("rx" or "tx") packet count of `dev`.
    fn packets(&self, dev: &str, dir: &str) -> u64 {
        let v: Value = serde_json::from_str(&self.ip(&["-s", "-j", "link", "show", dev])).unwrap();
        v[0]["stats64"][dir]["packets"].as_u64().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// QEMU arguments for a virtio-net NIC (MAC [`GUEST_MAC`]) on the vhost-user socket
/// `sock` with `pairs` queue pairs, guest RAM shareable with the backend. `vectors=0`
/// (INTx): QEMU 7.2 under TCG crashes with vhost-user-net and MSI-X (MACHINE.md).
fn vhost_user_nic(sock: &Path, pairs: u16) -> Vec<String> {
    let (netdev, mq) = if pairs > 1 {
        (format!(",queues={pairs}"), ",mq=on")
    } else {
        (String::new(), "")
    };
    vec![
        "-object".into(),
        "memory-backend-memfd,id=mem,size=512M,share=on".into(),
        "-numa".into(),
        "node,memdev=mem".into(),
        "-chardev".into(),
        format!("socket,id=c0,path={}", sock.display()),
        "-netdev".into(),
        format!("vhost-user,id=n0,chardev=c0{netdev}"),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,romfile=,vectors=0{mq},mac={GUEST_MAC}"),
    ]
}

/// Builds keel-vhost-net with the profile and into the target dir of this test's
/// own binaries (`KEEL_VHOST_NET` names a prebuilt one instead).
fn vhost_net_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEL_VHOST_NET") {
        return p.into();
    }
    let profile_dir = Path::new(env!("CARGO_BIN_EXE_keel-image"))
        .parent()
        .unwrap();
    let target_dir = profile_dir.parent().unwrap();
    let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev",
        other => other,
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(common::workspace_root())
        .args(["build", "--quiet", "-p", "keel-vhost-net", "--bin"])
        .arg("keel-vhost-net")
        .arg("--profile")
        .arg(profile)
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .unwrap();
    assert!(st.success(), "building keel-vhost-net failed: {st}");
    profile_dir.join("keel-vhost-net")
}

/// keel-vhost-net running in a namespace; killed (by PID) when dropped.
struct Switch {
    child: Child,
    control: PathBuf,
    log: PathBuf,
}

impl Switch {
    /// Starts the switch in `ns` with `args` and waits for its READY=1.
    fn start(ns: &Netns, dir: &Path, args: &[String]) -> Switch {
        let control = dir.join("control.sock");
        let notify = NotifyListener::bind(dir.join("notify.sock").to_str().unwrap()).unwrap();
        let log = dir.join("keel-vhost-net.log");
        // `ip netns exec` execs the switch: the child's PID is the switch's.
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(vhost_net_bin())
            .args(args)
            .arg("--control")
            .arg(&control)
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", notify.address())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let switch = Switch {
            child,
            control,
            log,
        };
        if let Err(e) = notify.recv_line("READY=1", Duration::from_secs(30)) {
            panic!(
                "no READY=1 from keel-vhost-net ({e}); log:\n{}",
                switch.log_text()
            );
        }
        switch
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The control socket's counters of port `name`.
    fn port(&self, name: &str) -> Value {
        ControlClient::new(&self.control).port(name).unwrap()
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// keel-vhost-net in `ns` with the guest's port vm0 (MAC [`GUEST_MAC`], `pairs` queue
/// pairs) on `sock` and a TAP uplink up0 on tap0, which gets 10.0.3.1/24.
fn guest_port_and_uplink(ns: &Netns, dir: &Path, sock: &Path, pairs: u16) -> Switch {
    let switch = Switch::start(
        ns,
        dir,
        &[
            "--port".into(),
            format!(
                "name=vm0,socket={},mac={GUEST_MAC},queues={pairs}",
                sock.display()
            ),
            "--tap".into(),
            "name=up0,dev=tap0".into(),
        ],
    );
    ns.ip(&["addr", "add", "10.0.3.1/24", "dev", "tap0"]);
    ns.ip(&["link", "set", "tap0", "up"]);
    ns.ip(&["link", "set", "lo", "up"]);
    switch
}

#[test]
fn app_pings_the_namespace_through_keel_vhost_net_and_checks_the_disk() {
    // Dropped in reverse order: the switch dies before its namespace is deleted,
    // and the temp dir (sockets, image, disk) goes last.
    let tmp = tempfile::tempdir().unwrap();
    let Some(ns) = Netns::create("net") else {
        return;
    };
    let sock = tmp.path().join("vm0.sock");
    let switch = guest_port_and_uplink(&ns, tmp.path(), &sock, 1);

    let image = build_image("boot/ext4.toml", tmp.path());
    let disk = writable_disk(&image, tmp.path());
    let net = vhost_user_nic(&sock, 1);
    let out = common::boot_qemu(
        &image,
        &disk,
        "keel.ip=10.0.3.2/24 keel.gw=10.0.3.1 keel.env=PING_ADDR=10.0.3.1",
        &net,
    );
    // Counters and log first: they explain a failed ping.
    let vm0 = switch.port("vm0");
    let up0 = switch.port("up0");
    let log = switch.log_text();
    let tap0 = ns.ip(&["-s", "link", "show", "tap0"]);
    eprintln!("vm0 {vm0}\nup0 {up0}\n{tap0}keel-vhost-net log:\n{log}");
    assert!(
        log.contains("SET_VRING_ENABLE sent before SET_FEATURES passed on after it"),
        "QEMU 7.2's early SET_VRING_ENABLE was not seen"
    );
    assert_has(&out, "keel-init: app started after ");
    assert_has(&out, "app: args=rw greeting=hello");
    assert_has(&out, "app: disk ok");
    assert_has(&out, "app: net ok (10.0.3.1)");
    assert_has(&out, "app: all checks passed");
    assert_has(&out, "keel-init: app exited with status 7");
    assert_has(&out, "keel-init: powering off with status 7");

    // The guest's write reached the disk image.
    let cat = Command::new("debugfs")
        .arg("-R")
        .arg("cat /data/new.txt")
        .arg(&disk)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout).trim(),
        "written by the guest"
    );

    // The switch carried frames both ways (at least ARP request/reply and the ping).
    let n = |p: &Value, k: &str| p[k].as_u64().unwrap();
    assert!(n(&vm0, "tx_packets") >= 2, "guest sent too little: {vm0}");
    assert!(n(&vm0, "rx_packets") >= 2, "guest got too little: {vm0}");
    assert!(
        n(&up0, "tx_packets") >= 2,
        "namespace sent too little: {up0}"
    );
    assert!(
        n(&up0, "rx_packets") >= 2,
        "namespace got too little: {up0}"
    );
    assert!(n(&vm0, "tx_bytes") > 0 && n(&vm0, "rx_bytes") > 0, "{vm0}");
    for k in ["drop_spoofed", "drop_bad_descriptor", "drop_short"] {
        assert_eq!(n(&vm0, k), 0, "{k}: {vm0}");
    }
    // And the namespace's kernel saw them on tap0.
    assert!(ns.packets("tap0", "rx") >= 2);
    assert!(ns.packets("tap0", "tx") >= 2);
}

/// A Linux guest with two vCPUs and a two-pair vhost-user NIC (QEMU `queues=2`,
/// `mq=on`) on a keel-vhost-net port with two queue pairs. Linux 6.1's virtio_net
/// enables both pairs at probe and maps each CPU to its own TX queue (XPS); the guest
/// app pings the namespace from CPU 0, then from CPU 1. The port's per-pair counters
/// must show guest frames on both TX rings. Replies come from the TAP uplink, which
/// has one pair: the switch delivers to the receiver's pair with the sender's number,
/// so they all arrive on the guest's pair 0.
#[test]
fn two_queue_pairs_carry_traffic_from_a_two_cpu_guest() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(ns) = Netns::create("mq") else {
        return;
    };
    let sock = tmp.path().join("vm0.sock");
    let switch = guest_port_and_uplink(&ns, tmp.path(), &sock, 2);

    let image = build_image("boot/mq.toml", tmp.path());
    let disk = writable_disk(&image, tmp.path());
    let net = vhost_user_nic(&sock, 2);
    let out = common::boot_qemu_smp(
        &image,
        &disk,
        "keel.ip=10.0.3.2/24 keel.gw=10.0.3.1 keel.env=PING_ADDR=10.0.3.1",
        &net,
        2,
    );
    let vm0 = switch.port("vm0");
    let log = switch.log_text();
    eprintln!("vm0 {vm0}\nkeel-vhost-net log:\n{log}");
    assert_has(&out, "app: cpus=2 ");
    assert_has(&out, "rx-0 ");
    assert_has(&out, "rx-1 ");
    assert_has(&out, "app: ping from cpu 0 ok");
    assert_has(&out, "app: ping from cpu 1 ok");
    assert_has(&out, "keel-init: app exited with status 7");

    let n = |p: &Value, k: &str| p[k].as_u64().unwrap();
    assert_eq!(vm0["queues"], 2, "{vm0}");
    // (Negotiated features are cleared when the frontend leaves; traffic on the
    // second pair's ring shows MQ was on.)
    let pairs = vm0["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 2, "{vm0}");
    // Three echo requests from each CPU, each on that CPU's TX queue.
    for (i, p) in pairs.iter().enumerate() {
        assert!(n(p, "tx_packets") >= 3, "pair {i} sent too little: {vm0}");
        assert_eq!(n(p, "tx_drops"), 0, "pair {i}: {vm0}");
    }
    // Every reply came from the single-pair uplink, so onto the guest's pair 0.
    assert!(n(&pairs[0], "rx_packets") >= 6, "{vm0}");
    assert_eq!(n(&pairs[1], "rx_packets"), 0, "{vm0}");
    let sum = |k: &str| pairs.iter().map(|p| n(p, k)).sum::<u64>();
    assert_eq!(sum("tx_packets"), n(&vm0, "tx_packets"), "{vm0}");
    assert_eq!(sum("rx_packets"), n(&vm0, "rx_packets"), "{vm0}");
}
