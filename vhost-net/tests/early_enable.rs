#![allow(clippy::unwrap_used, clippy::expect_used)]
//! QEMU 7.2's vhost-user message order, played by a raw vhost-user frontend written
//! here: `SET_VRING_ENABLE` (with and without `NEED_REPLY`) before the `SET_FEATURES`
//! that acks `VHOST_USER_F_PROTOCOL_FEATURES`. keel-vhost-net must ack what asked for
//! an ack and keep the connection; a malformed early enable ends only that
//! connection, and the port accepts the next frontend.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::Backend;

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

struct Frontend(UnixStream);

impl Frontend {
    fn connect(path: &Path) -> Frontend {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Frontend(s)
    }

    fn send(&mut self, request: u32, flags: u32, payload: &[u8]) {
        let mut m = request.to_le_bytes().to_vec();
        m.extend_from_slice(&(VERSION | flags).to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        self.0.write_all(&m).unwrap();
    }

    /// The next reply to `request`: its u64 payload, or None if the backend closed
    /// the connection.
    fn reply(&mut self, request: u32) -> Option<u64> {
        let mut h = [0u8; 12];
        match self.0.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("no reply to request {request}: {e}"),
        }
        let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        assert_eq!(word(0), request, "reply to the wrong request");
        assert_eq!(word(4) & REPLY, REPLY, "not a reply");
        assert_eq!(word(8), 8, "u64 reply expected");
        let mut v = [0u8; 8];
        self.0.read_exact(&mut v).unwrap();
        Some(u64::from_le_bytes(v))
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }

    /// GET_FEATURES, GET/SET_PROTOCOL_FEATURES (REPLY_ACK), SET_OWNER; returns the
    /// device features.
    fn handshake(&mut self) -> u64 {
        self.send(GET_FEATURES, 0, &[]);
        let features = self.reply(GET_FEATURES).expect("GET_FEATURES answered");
        assert_ne!(features & F_PROTOCOL_FEATURES, 0);
        self.send(GET_PROTOCOL_FEATURES, 0, &[]);
        let proto = self.reply(GET_PROTOCOL_FEATURES).expect("answered");
        assert_ne!(proto & PROTOCOL_F_REPLY_ACK, 0);
        self.send(
            SET_PROTOCOL_FEATURES,
            0,
            &PROTOCOL_F_REPLY_ACK.to_le_bytes(),
        );
        self.send(SET_OWNER, 0, &[]);
        features
    }
}

fn enable(index: u32, on: u32) -> [u8; 8] {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(&index.to_le_bytes());
    p[4..].copy_from_slice(&on.to_le_bytes());
    p
}

#[test]
fn set_vring_enable_before_set_features_is_held_and_acked() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("p0.sock");
    let be = Backend::start(
        tmp.path(),
        &[format!("name=p0,socket={},queues=2", sock.display())],
        &[],
    );

    // QEMU 7.2's order: the guest acked its features, so QEMU enables the rings
    // before it sends SET_FEATURES.
    let mut fe = Frontend::connect(&sock);
    let features = fe.handshake();
    fe.send(SET_VRING_ENABLE, NEED_REPLY, &enable(0, 1));
    assert_eq!(
        fe.reply(SET_VRING_ENABLE),
        Some(0),
        "early SET_VRING_ENABLE not acked; log:\n{}",
        std::fs::read_to_string(&be.log).unwrap_or_default()
    );
    for q in 1..4 {
        fe.send(SET_VRING_ENABLE, 0, &enable(q, 1));
    }
    fe.send(SET_FEATURES, NEED_REPLY, &features.to_le_bytes());
    assert_eq!(fe.reply(SET_FEATURES), Some(0), "SET_FEATURES refused");
    // The held enables reached the daemon (with protocol features now acked, it takes
    // them) and the connection is alive: a later enable is acked by the daemon itself.
    fe.send(SET_VRING_ENABLE, NEED_REPLY, &enable(3, 0));
    assert_eq!(fe.reply(SET_VRING_ENABLE), Some(0));
    fe.send(GET_FEATURES, 0, &[]);
    assert_eq!(fe.reply(GET_FEATURES), Some(features));
    assert_eq!(be.port("p0")["connected"], true);
    drop(fe);
    be.wait_for(10, "p0 to disconnect", |b| {
        b.port("p0")["connected"] == false
    });

    // A hostile frontend: an early enable for a queue that does not exist ends its
    // connection, and nothing else.
    let mut bad = Frontend::connect(&sock);
    bad.handshake();
    bad.send(SET_VRING_ENABLE, NEED_REPLY, &enable(4, 1));
    assert!(bad.closed(), "a bad early enable must end the connection");
    // An oversized message, likewise.
    let mut big = Frontend::connect(&sock);
    big.send(SET_FEATURES, 0, &vec![0u8; 8192]);
    assert!(big.closed(), "an oversized message must end the connection");

    // The port serves the next frontend.
    let mut next = Frontend::connect(&sock);
    let f = next.handshake();
    next.send(SET_FEATURES, NEED_REPLY, &f.to_le_bytes());
    assert_eq!(next.reply(SET_FEATURES), Some(0));
    let log = std::fs::read_to_string(&be.log).unwrap();
    assert!(log.contains("passed on after it"), "{log}");
    assert!(
        log.contains("SET_VRING_ENABLE before SET_FEATURES: queue 4 of 4"),
        "{log}"
    );
}
