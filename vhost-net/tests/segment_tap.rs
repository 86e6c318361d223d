//! Software segmentation checked by a real peer: a sender with TSO (this process,
//! through the switch's API) sends TCPv4 and TCPv6 GSO frames to a TAP uplink opened
//! without offloads, moved into a network namespace the test creates. The switch must
//! split them; the namespace's kernel verifies every IP header and TCP checksum on
//! receive. The segments go to a closed port, so each one that passes the checks is
//! answered with a RST (`OutRsts`); a bad checksum is counted as `InCsumErrors`
//! instead, which a deliberately broken control frame shows. Needs root and iproute2
//! (skipped otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_vhost_net::config::PortConfig;
use keel_vhost_net::net::{TxBatch, HDR_LEN};
use keel_vhost_net::offload::{self, GSO_ECN, GSO_TCPV4, GSO_TCPV6, HDR_F_NEEDS_CSUM};
use keel_vhost_net::switch::{ForwardScratch, Switch};
use keel_vhost_net::tap::Tap;

use common::netns::Netns;

const SRC_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

/// A TCP frame with an ACK and `payload` bytes, checksums left wrong (the switch must
/// compute them).
fn tcp_frame(dst_mac: [u8; 6], v4: bool, payload: usize) -> Vec<u8> {
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&SRC_MAC);
    let tcp_len = 20 + payload;
    if v4 {
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0xee, 0xee]);
        f.extend_from_slice(&[10, 99, 0, 2, 10, 99, 0, 1]);
    } else {
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        f.extend_from_slice(&[6, 64]);
        f.extend_from_slice(&[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    }
    f.extend_from_slice(&[0xa0, 0x00, 0x1f, 0x90]); // 40960 -> 8080 (closed)
    f.extend_from_slice(&1000u32.to_be_bytes());
    f.extend_from_slice(&2000u32.to_be_bytes());
    f.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0xbe, 0xef, 0, 0]);
    f.extend((0..payload).map(|i| (i * 31 + 5) as u8));
    f
}

fn gso_header(gso: u8, mss: u16, csum_start: u16) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[0] = HDR_F_NEEDS_CSUM;
    h[1] = gso;
    h[4..6].copy_from_slice(&mss.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    h
}

/// Waits until `counter` reaches `want` (the kernel answers asynchronously only in
/// theory; the RSTs are counted while the write returns), then returns its value.
fn wait_for(ns: &Netns, counter: &str, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = ns.tcp_counter(counter);
        if v >= want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_kernel_accepts_the_segments_of_gso_frames() {
    let Some(ns) = Netns::create("keelseg") else {
        return;
    };
    let dev = format!("kseg{}", std::process::id() % 100_000);
    let tap = match Tap::open(&dev, false) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            eprintln!("skipping: cannot open a TAP: {e}");
            return;
        }
    };
    let moved = Command::new("ip")
        .args(["link", "set", &dev, "netns", &ns.0])
        .status()
        .unwrap();
    assert!(moved.success());
    ns.ip(&["addr", "add", "10.99.0.1/24", "dev", &dev]);
    ns.ip(&["-6", "addr", "add", "fd99::1/64", "dev", &dev, "nodad"]);
    ns.ip(&["link", "set", &dev, "up"]);
    let link: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-j", "link", "show", &dev])).unwrap();
    let mac: Vec<u8> = link[0]["address"]
        .as_str()
        .unwrap()
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    let mac: [u8; 6] = mac.try_into().unwrap();

    // No switch-wide offloads: the TAP takes none; the guest port negotiated them all.
    let switch = Switch::new(Duration::from_secs(300));
    let guest = switch
        .add_port(PortConfig {
            name: "g0".into(),
            socket: "/nonexistent/g0.sock".into(),
            ..PortConfig::default()
        })
        .unwrap();
    guest.set_features(offload::OFFLOAD_FEATURES);
    let up = switch
        .add_port_with(
            PortConfig {
                name: "up".into(),
                socket: "/nonexistent/up.sock".into(),
                ..PortConfig::default()
            },
            Some(tap),
        )
        .unwrap();
    assert_eq!(up.features(), 0);

    let send = |hdr: [u8; HDR_LEN], frame: Vec<u8>| {
        let mut batch = TxBatch::default();
        batch.push_frame(&[&hdr[..], &frame].concat(), HDR_LEN);
        switch.forward(&guest, 0, &batch, &mut ForwardScratch::default());
    };
    let rsts = ns.tcp_counter("OutRsts");
    let csum_errors = ns.tcp_counter("InCsumErrors");

    // TCPv4: 3 x 1448 + 517 bytes; TCPv6 with the ECN GSO type: 5 x 1000 + 1.
    send(
        gso_header(GSO_TCPV4, 1448, 34),
        tcp_frame(mac, true, 3 * 1448 + 517),
    );
    send(
        gso_header(GSO_TCPV6 | GSO_ECN, 1000, 54),
        tcp_frame(mac, false, 5001),
    );
    let s = up.stats().counters;
    assert_eq!(
        (s.rx_packets, s.sw_segmented, s.drop_rx_offload),
        (10, 2, 0),
        "{s:?}"
    );
    assert_eq!(s.drop_rx_no_buffer + s.drop_rx_not_ready, 0, "{s:?}");
    assert_eq!(wait_for(&ns, "OutRsts", rsts + 10), rsts + 10);
    assert_eq!(ns.tcp_counter("InCsumErrors"), csum_errors);

    // Control: a plain frame with a good IP header checksum and a wrong TCP checksum is
    // refused by the same kernel.
    let mut bad = tcp_frame(mac, true, 100);
    bad[24..26].fill(0);
    let mut sum: u32 = bad[14..34]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    bad[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    send([0u8; HDR_LEN], bad);
    assert_eq!(
        wait_for(&ns, "InCsumErrors", csum_errors + 1),
        csum_errors + 1
    );
    assert_eq!(ns.tcp_counter("OutRsts"), rsts + 10);
}
