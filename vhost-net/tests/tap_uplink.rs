//! A TAP uplink in a network namespace the test creates: frames from a testpmd
//! virtio-user frontend reach the namespace's kernel, and the kernel's ARP requests
//! (from a ping) reach the frontend's RX ring.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::netns::Netns;
use common::{testpmd_available, testpmd_lock, Backend, Testpmd};

#[test]
fn frames_reach_a_namespace_through_the_tap_uplink_and_back() {
    if !testpmd_available() {
        return;
    }
    let Some(ns) = Netns::create("keelnet") else {
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

/// Checksum and TSO offloads end to end: two TAP uplinks, each in its own namespace,
/// with `--offloads`. The kernels hand the switch partial checksums and GSO frames
/// (up to 64 KiB) with their virtio-net headers; the switch passes the headers on, so
/// the other kernel accepts them. A TCP transfer must arrive intact, and the average
/// frame the switch carried must be larger than the MTU (GSO frames passed through).
#[test]
fn tcp_with_checksum_and_tso_offloads_between_two_tap_uplinks() {
    tcp_between_two_tap_uplinks(true);
}

/// The same transfer with offloads off on B's TAP: A's kernel still hands the switch
/// GSO frames with partial checksums, which B's kernel cannot take, so the switch
/// segments them and completes every checksum. B's kernel checks each segment; the
/// data must arrive intact and `sw_segmented` must count the GSO frames.
#[test]
fn tcp_through_software_segmentation_to_a_tap_without_offloads() {
    tcp_between_two_tap_uplinks(false);
}

fn tcp_between_two_tap_uplinks(b_offloads: bool) {
    let Some(a) = Netns::create("keelnet") else {
        return;
    };
    let Some(b) = Netns::create("keelnet-b") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let be = Backend::start_in(
        &["ip", "netns", "exec", &a.0],
        dir.path(),
        &[],
        &[
            "--tap",
            "name=upa,dev=ktapa",
            "--tap",
            if b_offloads {
                "name=upb,dev=ktapb"
            } else {
                "name=upb,dev=ktapb,offloads=off"
            },
            "--offloads",
        ],
    );
    a.ip(&["link", "set", "ktapb", "netns", &b.0]);
    a.ip(&["addr", "add", "10.78.0.1/24", "dev", "ktapa"]);
    a.ip(&["link", "set", "ktapa", "up"]);
    b.ip(&["addr", "add", "10.78.0.2/24", "dev", "ktapb"]);
    b.ip(&["link", "set", "ktapb", "up"]);
    let features = a.ip(&["link", "show", "ktapa"]);
    assert!(features.contains("UP"), "{features}");

    const LEN: usize = 8 << 20;
    let mut server = Command::new("ip")
        .args(["netns", "exec", &b.0, "python3", "-c"])
        .arg(
            "import socket, hashlib, sys\n\
             s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('10.78.0.2', 5001)); s.listen(1); s.settimeout(30)\n\
             print('listening', flush=True)\n\
             c, _ = s.accept(); c.settimeout(30); h = hashlib.sha256(); n = 0\n\
             while True:\n    d = c.recv(1 << 16)\n    if not d: break\n    h.update(d); n += len(d)\n\
             print(n, h.hexdigest(), flush=True)\n",
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::BufRead;
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    let client = Command::new("ip")
        .args(["netns", "exec", &a.0, "python3", "-c"])
        .arg(format!(
            "import socket, hashlib\n\
             data = bytes((i * 7 + 3) % 251 for i in range({LEN}))\n\
             print(hashlib.sha256(data).hexdigest(), flush=True)\n\
             s = socket.create_connection(('10.78.0.2', 5001), timeout=30)\n\
             s.sendall(data); s.close()\n"
        ))
        .output()
        .unwrap();
    assert!(client.status.success(), "{client:?}");
    let sent_hash = String::from_utf8_lossy(&client.stdout).trim().to_string();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        format!("{LEN} {sent_hash}"),
        "transfer damaged"
    );
    assert!(server.wait().unwrap().success());
    let upa = be.port("upa");
    let (pkts, bytes) = (
        upa["tx_packets"].as_u64().unwrap(),
        upa["tx_bytes"].as_u64().unwrap(),
    );
    assert!(bytes >= LEN as u64, "{upa}");
    assert!(bytes / pkts > 1514, "no GSO frames crossed: {upa}");
    let upb = be.port("upb");
    assert_eq!(upb["drop_rx_offload"], 0, "{upb}");
    let segmented = upb["sw_segmented"].as_u64().unwrap();
    if b_offloads {
        assert_eq!(segmented, 0, "{upb}");
    } else {
        assert!(segmented > 0, "{upb}");
        // B's kernel got MTU-sized segments only.
        let (rx_pkts, rx_bytes) = (
            upb["rx_packets"].as_u64().unwrap(),
            upb["rx_bytes"].as_u64().unwrap(),
        );
        assert!(rx_bytes / rx_pkts <= 1514, "{upb}");
    }
}
