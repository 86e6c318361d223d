//! The vhost-user control connection of one port, relayed between the frontend and
//! vhost-user-backend's request handler so that QEMU 7.2's message order works.
//!
//! QEMU 7.2's virtio-net sends `SET_VRING_ENABLE` as soon as the guest driver acks its
//! features, which can be before the vhost-user `SET_FEATURES` that acks
//! `VHOST_USER_F_PROTOCOL_FEATURES`. The rust-vmm `vhost` crate's request handler
//! rejects such an enable and ends the connection, and its handler cannot be wrapped.
//! So the frontend's connection ends in a [`keel_vhost_relay::Relay`] (framing, the
//! private socket to the daemon, replies copied back), whose request handler here,
//! [`Order`], passes every message on unchanged, except that `SET_VRING_ENABLE`s
//! arriving before protocol features are acked are checked, held, and passed on in
//! order right after that `SET_FEATURES`.
//! A held request that asked for an ack (REPLY_ACK negotiated, `NEED_REPLY` set) is
//! acked here when it is held, since the frontend waits for that ack before it sends
//! `SET_FEATURES`; it is passed on without `NEED_REPLY` so the daemon does not ack it
//! a second time. The checks made here (queue index in range, state 0 or 1) are the
//! ones the daemon makes, so the ack tells the truth.
//!
//! QEMU 7.2 also sends each queue pair's memory regions again (`ADD_MEM_REG` once per
//! queue pair's vhost device, on the one connection; newer QEMU sends them once), and
//! the daemon refuses a region that overlaps one it has. So an `ADD_MEM_REG` for a
//! region identical to one already added only counts one more user here (acked here
//! if an ack was asked for), and a `REM_MEM_REG` is passed on when the region's last
//! user removes it.
//!
//! Only control messages pass through here; the data path is untouched. A frontend
//! that breaks the framing (oversized payload, too many held requests, a bad held
//! request) is disconnected: that ends this port's connection only.

use keel_vhost_relay::FLAG_NEED_REPLY;
use keel_vhost_relay::{le_u32, Message, Out, RelayError, RequestHandler};
use log::{debug, info};

/// Most `SET_VRING_ENABLE`s held before `SET_FEATURES` (two per queue is plenty).
pub const MAX_HELD: usize = 64;

/// Most memory regions whose users are counted (the daemon's own limit is lower).
pub const MAX_REGIONS: usize = 512;
/// `VHOST_USER_SET_MEM_TABLE`.
pub const SET_MEM_TABLE: u32 = 5;
/// `VHOST_USER_ADD_MEM_REG`.
pub const ADD_MEM_REG: u32 = 37;
/// `VHOST_USER_REM_MEM_REG`.
pub const REM_MEM_REG: u32 = 38;
/// A memory region on the wire: guest address, size, frontend address, mmap offset.
const REGION_LEN: usize = 32;
/// `VhostUserSingleMemoryRegion`: padding, then a region.
const SINGLE_REGION_LEN: usize = 8 + REGION_LEN;
/// `VHOST_USER_SET_FEATURES`.
pub const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_PROTOCOL_FEATURES`.
pub const SET_PROTOCOL_FEATURES: u32 = 16;
/// `VHOST_USER_SET_VRING_ENABLE`.
pub const SET_VRING_ENABLE: u32 = 18;
/// `VHOST_USER_F_PROTOCOL_FEATURES` in the virtio feature bits.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VHOST_USER_PROTOCOL_F_REPLY_ACK` in the protocol feature bits.
pub const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

/// Why the ordering fix disconnects a frontend.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// An early `SET_VRING_ENABLE` is malformed or names a queue that does not exist.
    #[error("SET_VRING_ENABLE before SET_FEATURES: {0}")]
    BadEnable(String),
    /// The frontend sent more early `SET_VRING_ENABLE`s than can be held.
    #[error("more than {MAX_HELD} SET_VRING_ENABLE before SET_FEATURES")]
    TooManyHeld,
}

/// The ordering fix for one connection: holds `SET_VRING_ENABLE`s that arrive before
/// `SET_FEATURES` acks protocol features, and releases them right after it.
#[derive(Debug)]
pub struct Order {
    queues: u32,
    protocol_features: u64,
    protocol_acked: bool,
    held: Vec<Message>,
    /// Memory regions the daemon has, with how many times the frontend added each.
    regions: Vec<([u8; REGION_LEN], u32)>,
}

impl Order {
    /// The state for a new connection to a device with `queues` virtqueues.
    pub fn new(queues: u32) -> Order {
        Order {
            queues,
            protocol_features: 0,
            protocol_acked: false,
            held: Vec::new(),
            regions: Vec::new(),
        }
    }

    /// Decides what to do with one request from the frontend: the messages to send,
    /// in order.
    pub fn on_request(&mut self, mut msg: Message) -> Result<Vec<Out>, OrderError> {
        match msg.request() {
            SET_PROTOCOL_FEATURES => {
                if let Some(v) = msg.u64_payload() {
                    self.protocol_features = v;
                }
                Ok(vec![Out::Daemon(msg)])
            }
            SET_VRING_ENABLE if !self.protocol_acked => {
                self.check_enable(&msg)?;
                if self.held.len() >= MAX_HELD {
                    return Err(OrderError::TooManyHeld);
                }
                let out: Vec<Out> = self.local_ack(&msg).into_iter().collect();
                msg.set_flags(msg.flags() & !FLAG_NEED_REPLY);
                debug!(
                    "SET_VRING_ENABLE {:?} before SET_FEATURES: held",
                    &msg.payload
                );
                self.held.push(msg);
                Ok(out)
            }
            SET_FEATURES => {
                let features = msg.u64_payload().unwrap_or(0);
                let mut out = vec![Out::Daemon(msg)];
                if features & F_PROTOCOL_FEATURES != 0 {
                    self.protocol_acked = true;
                    if !self.held.is_empty() {
                        info!(
                            "{} SET_VRING_ENABLE sent before SET_FEATURES passed on after it",
                            self.held.len()
                        );
                    }
                    out.extend(self.held.drain(..).map(Out::Daemon));
                } else if !self.held.is_empty() {
                    // Without protocol features every ring is enabled by SET_FEATURES
                    // itself, and SET_VRING_ENABLE is not valid: drop them.
                    info!(
                        "{} SET_VRING_ENABLE dropped: SET_FEATURES without protocol features enables every ring",
                        self.held.len()
                    );
                    self.held.clear();
                }
                Ok(out)
            }
            SET_MEM_TABLE => {
                // The table replaces every region: each now has one user.
                let n = msg.payload.get(..4).map_or(0, |_| le_u32(&msg.payload, 0));
                self.regions = msg
                    .payload
                    .get(8..)
                    .unwrap_or_default()
                    .chunks_exact(REGION_LEN)
                    .take((n as usize).min(MAX_REGIONS))
                    .filter_map(|r| Some((r.try_into().ok()?, 1)))
                    .collect();
                Ok(vec![Out::Daemon(msg)])
            }
            ADD_MEM_REG => {
                let Some(key) = single_region(&msg) else {
                    return Ok(vec![Out::Daemon(msg)]);
                };
                if let Some((_, users)) = self.regions.iter_mut().find(|(r, _)| *r == key) {
                    *users = users.saturating_add(1);
                    debug!("ADD_MEM_REG of a region the daemon has: counted, not passed on");
                    return Ok(self.local_ack(&msg).into_iter().collect());
                }
                if self.regions.len() < MAX_REGIONS {
                    self.regions.push((key, 1));
                }
                Ok(vec![Out::Daemon(msg)])
            }
            REM_MEM_REG => {
                let Some(key) = single_region(&msg) else {
                    return Ok(vec![Out::Daemon(msg)]);
                };
                let Some(i) = self.regions.iter().position(|(r, _)| *r == key) else {
                    return Ok(vec![Out::Daemon(msg)]);
                };
                if self.regions[i].1 > 1 {
                    self.regions[i].1 -= 1;
                    return Ok(self.local_ack(&msg).into_iter().collect());
                }
                self.regions.swap_remove(i);
                Ok(vec![Out::Daemon(msg)])
            }
            _ => Ok(vec![Out::Daemon(msg)]),
        }
    }

    /// The success ack for `msg` when the frontend asked for one and negotiated
    /// REPLY_ACK (the daemon's rule).
    fn local_ack(&self, msg: &Message) -> Option<Out> {
        (msg.flags() & FLAG_NEED_REPLY != 0 && self.protocol_features & PROTOCOL_F_REPLY_ACK != 0)
            .then(|| Out::Frontend(Message::reply(msg.request(), &0u64.to_le_bytes())))
    }

    /// The checks the daemon makes on a `SET_VRING_ENABLE` (payload size, queue index,
    /// state 0 or 1), made here for one that is held and may be acked here.
    fn check_enable(&self, msg: &Message) -> Result<(), OrderError> {
        let p = &msg.payload;
        if p.len() != 8 {
            return Err(OrderError::BadEnable(format!(
                "{}-byte payload, expected 8",
                p.len()
            )));
        }
        if !msg.files.is_empty() {
            return Err(OrderError::BadEnable("carries file descriptors".into()));
        }
        let (index, state) = (le_u32(p, 0), le_u32(p, 4));
        if index >= self.queues {
            return Err(OrderError::BadEnable(format!(
                "queue {index} of {}",
                self.queues
            )));
        }
        if state > 1 {
            return Err(OrderError::BadEnable(format!("state {state}")));
        }
        Ok(())
    }
}

impl RequestHandler for Order {
    fn on_request(&mut self, msg: Message) -> Result<Vec<Out>, RelayError> {
        Order::on_request(self, msg).map_err(|e| RelayError::Refused(Box::new(e)))
    }
}

/// The region of an ADD_MEM_REG or REM_MEM_REG payload.
fn single_region(msg: &Message) -> Option<[u8; REGION_LEN]> {
    if msg.payload.len() != SINGLE_REGION_LEN {
        return None;
    }
    msg.payload.get(8..)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use keel_vhost_relay::{FLAG_REPLY, FLAG_VERSION};

    fn enable(index: u32, state: u32, flags: u32) -> Message {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&state.to_le_bytes());
        Message::new(SET_VRING_ENABLE, FLAG_VERSION | flags, &p)
    }

    fn kinds(out: &[Out]) -> Vec<(char, u32, u32)> {
        out.iter()
            .map(|o| match o {
                Out::Daemon(m) => ('d', m.request(), m.flags()),
                Out::Frontend(m) => ('f', m.request(), m.flags()),
            })
            .collect()
    }

    #[test]
    fn early_enables_are_held_acked_and_released_after_set_features() {
        let mut o = Order::new(4);
        let pf = Message::new(
            SET_PROTOCOL_FEATURES,
            FLAG_VERSION,
            &(1u64 << 3).to_le_bytes(),
        );
        assert_eq!(kinds(&o.on_request(pf).unwrap()), [('d', 16, 1)]);
        // With NEED_REPLY: acked here (value 0), held without NEED_REPLY.
        let out = o.on_request(enable(0, 1, FLAG_NEED_REPLY)).unwrap();
        assert_eq!(kinds(&out), [('f', 18, FLAG_VERSION | FLAG_REPLY)]);
        let Out::Frontend(ack) = &out[0] else {
            unreachable!()
        };
        assert_eq!(ack.payload, 0u64.to_le_bytes());
        assert!(o.on_request(enable(1, 1, 0)).unwrap().is_empty());
        let features = F_PROTOCOL_FEATURES | 1;
        let sf = Message::new(SET_FEATURES, FLAG_VERSION, &features.to_le_bytes());
        let out = o.on_request(sf).unwrap();
        assert_eq!(
            kinds(&out),
            [
                ('d', 2, 1),
                ('d', 18, FLAG_VERSION),
                ('d', 18, FLAG_VERSION)
            ]
        );
        // After: passed straight on, NEED_REPLY kept for the daemon to answer.
        let out = o.on_request(enable(2, 1, FLAG_NEED_REPLY)).unwrap();
        assert_eq!(kinds(&out), [('d', 18, FLAG_VERSION | FLAG_NEED_REPLY)]);
    }

    #[test]
    fn no_ack_without_reply_ack_and_dropped_without_protocol_features() {
        let mut o = Order::new(2);
        assert!(o
            .on_request(enable(0, 1, FLAG_NEED_REPLY))
            .unwrap()
            .is_empty());
        let sf = Message::new(SET_FEATURES, FLAG_VERSION, &1u64.to_le_bytes());
        assert_eq!(kinds(&o.on_request(sf).unwrap()), [('d', 2, 1)]);
        // Still not acked: later early enables are held again.
        assert!(o.on_request(enable(1, 0, 0)).unwrap().is_empty());
    }

    fn region(gpa: u64, flags: u32, request: u32) -> Message {
        let mut p = vec![0u8; 8];
        for v in [gpa, 0x1000_0000, 0x7f00_0000_0000 + gpa, 0] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        Message::new(request, FLAG_VERSION | flags, &p)
    }

    #[test]
    fn a_region_added_again_is_counted_not_passed_on() {
        let mut o = Order::new(4);
        let pf = Message::new(
            SET_PROTOCOL_FEATURES,
            FLAG_VERSION,
            &(1u64 << 3).to_le_bytes(),
        );
        o.on_request(pf).unwrap();
        let n = FLAG_NEED_REPLY;
        // First pair's device adds two regions: passed on (the daemon acks).
        assert_eq!(
            kinds(&o.on_request(region(0, n, ADD_MEM_REG)).unwrap()),
            [('d', 37, 9)]
        );
        assert_eq!(
            kinds(&o.on_request(region(1 << 32, 0, ADD_MEM_REG)).unwrap()),
            [('d', 37, 1)]
        );
        // Second pair's device adds the same: acked here, or nothing without NEED_REPLY.
        assert_eq!(
            kinds(&o.on_request(region(0, n, ADD_MEM_REG)).unwrap()),
            [('f', 37, 5)]
        );
        assert!(o
            .on_request(region(1 << 32, 0, ADD_MEM_REG))
            .unwrap()
            .is_empty());
        // Removal: the first is local, the last user's goes to the daemon.
        assert_eq!(
            kinds(&o.on_request(region(0, n, REM_MEM_REG)).unwrap()),
            [('f', 38, 5)]
        );
        assert_eq!(
            kinds(&o.on_request(region(0, n, REM_MEM_REG)).unwrap()),
            [('d', 38, 9)]
        );
        // Unknown region or odd payload: the daemon decides.
        assert_eq!(
            kinds(&o.on_request(region(0, n, REM_MEM_REG)).unwrap()),
            [('d', 38, 9)]
        );
        let odd = Message::new(ADD_MEM_REG, FLAG_VERSION, &[0u8; 12]);
        assert_eq!(kinds(&o.on_request(odd).unwrap()), [('d', 37, 1)]);
        // SET_MEM_TABLE replaces everything: its regions have one user each.
        let mut table = 1u32.to_le_bytes().to_vec();
        table.extend_from_slice(&[0u8; 4]);
        table.extend_from_slice(&region(1 << 33, 0, 0).payload[8..]);
        let t = Message::new(SET_MEM_TABLE, FLAG_VERSION, &table);
        assert_eq!(kinds(&o.on_request(t).unwrap()), [('d', 5, 1)]);
        assert_eq!(
            kinds(&o.on_request(region(1 << 32, 0, ADD_MEM_REG)).unwrap()),
            [('d', 37, 1)]
        );
        assert!(o
            .on_request(region(1 << 33, 0, ADD_MEM_REG))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn bad_early_enables_are_refused() {
        let mut o = Order::new(2);
        assert!(matches!(
            o.on_request(enable(2, 1, 0)),
            Err(OrderError::BadEnable(_))
        ));
        assert!(matches!(
            o.on_request(enable(0, 7, 0)),
            Err(OrderError::BadEnable(_))
        ));
        let short = Message::new(SET_VRING_ENABLE, FLAG_VERSION, &[0u8; 4]);
        assert!(matches!(o.on_request(short), Err(OrderError::BadEnable(_))));
        for _ in 0..MAX_HELD {
            o.on_request(enable(1, 1, 0)).unwrap();
        }
        assert!(matches!(
            o.on_request(enable(1, 1, 0)),
            Err(OrderError::TooManyHeld)
        ));
    }
}
