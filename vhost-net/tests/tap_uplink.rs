//! A TAP uplink in a network namespace the test creates: frames from a testpmd
//! virtio-user frontend reach the namespace's kernel, and the kernel's ARP requests
//! (from a ping) reach the frontend's RX ring.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{testpmd_available, testpmd_lock, Backend, Testpmd};

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Netns {
    fn create() -> Option<Netns> {
        let name = format!("keelnet-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("skipping: cannot create a network namespace (needs root and iproute2)");
            return None;
        }
        Some(Netns(name))
    }

    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The kernel's RX packet count of `dev`.
    fn rx_packets(&self, dev: &str) -> u64 {
        let out = self.ip(&["-s", "-j", "link", "show", dev]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn frames_reach_a_namespace_through_the_tap_uplink_and_back() {
    if !testpmd_available() {
        return;
    }
    let Some(ns) = Netns::create() else {
        return;
    };
    let _guard = testpmd_lock();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("p0.sock");
    let be = Backend::start_in(
        &["ip", "netns", "exec", &ns.0],
        dir.path(),
        &[format!(
            "name=p0,socket={},mac=52:54:00:00:00:01",
            sock.display()
        )],
        &["--tap", "name=up0,dev=ktap0"],
    );
    ns.ip(&["link", "set", "ktap0", "up"]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "ktap0"]);
    assert_eq!(be.port("up0")["connected"], true);

    let mut tx = Testpmd::start(
        dir.path(),
        "tap-tx",
        &sock,
        "52:54:00:00:00:01",
        "txonly",
        0,
        &["--eth-peer=0,02:00:00:00:00:77"],
    );
    // Guest to namespace: flooded to the uplink, written to the TAP, counted by the kernel.
    be.wait_for(60, "frames into the TAP", |b| {
        b.counter("up0", "rx_packets") > 5_000
    });
    assert!(ns.rx_packets("ktap0") >= 5_000);
    // Namespace to guest: a datagram to 10.77.0.2 makes the kernel broadcast ARP
    // requests out of the TAP; the switch floods them to p0's RX ring.
    let seen = |b: &Backend| {
        let p0 = b.port("p0");
        p0["rx_packets"].as_u64().unwrap() + p0["drop_rx_no_buffer"].as_u64().unwrap()
    };
    let before = (be.counter("up0", "tx_packets"), seen(&be));
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c"])
        .arg(
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
             s.sendto(b'keel', ('10.77.0.2', 9))",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    be.wait_for(20, "ARP from the namespace on p0", |b| {
        b.counter("up0", "tx_packets") > before.0 && seen(b) > before.1
    });
    tx.stop();
    // Removing the uplink through the control socket stops its thread.
    let r = be.request(r#"{"cmd":"remove-port","name":"up0"}"#);
    assert_eq!(r["ok"], true, "{r}");
}
