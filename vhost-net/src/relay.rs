//! The vhost-user control connection of one port, relayed between the frontend and
//! vhost-user-backend's request handler so that QEMU 7.2's message order works.
//!
//! QEMU 7.2's virtio-net sends `SET_VRING_ENABLE` as soon as the guest driver acks its
//! features, which can be before the vhost-user `SET_FEATURES` that acks
//! `VHOST_USER_F_PROTOCOL_FEATURES`. The rust-vmm `vhost` crate's request handler
//! rejects such an enable and ends the connection, and its handler cannot be wrapped.
//! So the frontend's connection ends here: every message is passed unchanged (with
//! its file descriptors) to the daemon over a private socket, and every reply is
//! copied back, except that `SET_VRING_ENABLE`s arriving before protocol features are
//! acked are checked, held, and passed on in order right after that `SET_FEATURES`.
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

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{debug, info};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user message header length (request, flags, size).
pub const HEADER_LEN: usize = 12;
/// Largest payload relayed in either direction (the `vhost` crate's own limit).
pub const MAX_PAYLOAD: usize = 4096;
/// Most file descriptors one message may carry.
pub const MAX_FDS: usize = 32;
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
/// Header flags: protocol version 1.
pub const FLAG_VERSION: u32 = 0x1;
/// Header flags: this is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Header flags: the frontend wants an ack (REPLY_ACK).
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// `VHOST_USER_F_PROTOCOL_FEATURES` in the virtio feature bits.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VHOST_USER_PROTOCOL_F_REPLY_ACK` in the protocol feature bits.
pub const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

/// Why a relayed connection ended (other than the frontend or daemon closing it).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading or writing one of the sockets failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A message's payload is larger than any valid vhost-user message.
    #[error("message {request} announces a {size}-byte payload (at most {MAX_PAYLOAD})")]
    Oversized {
        /// The request code.
        request: u32,
        /// The announced payload size.
        size: u32,
    },
    /// A message carried more file descriptors than allowed (some were lost).
    #[error("message with more than {MAX_FDS} file descriptors")]
    TooManyFds,
    /// An early `SET_VRING_ENABLE` is malformed or names a queue that does not exist.
    #[error("SET_VRING_ENABLE before SET_FEATURES: {0}")]
    BadEnable(String),
    /// The frontend sent more early `SET_VRING_ENABLE`s than can be held.
    #[error("more than {MAX_HELD} SET_VRING_ENABLE before SET_FEATURES")]
    TooManyHeld,
}

/// One vhost-user message with the file descriptors that came with it.
#[derive(Debug)]
pub struct Message {
    /// Request code, flags and payload size, little-endian.
    pub header: [u8; HEADER_LEN],
    /// The payload (exactly as long as the header says).
    pub payload: Vec<u8>,
    /// File descriptors received with the message.
    pub files: Vec<File>,
}

impl Message {
    /// A message with `request`, `flags` and `payload`, without file descriptors.
    pub fn new(request: u32, flags: u32, payload: &[u8]) -> Message {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Message {
            header,
            payload: payload.to_vec(),
            files: Vec::new(),
        }
    }

    /// The request code.
    pub fn request(&self) -> u32 {
        u32_at(&self.header, 0)
    }

    /// The header flags.
    pub fn flags(&self) -> u32 {
        u32_at(&self.header, 4)
    }

    fn set_flags(&mut self, flags: u32) {
        self.header[4..8].copy_from_slice(&flags.to_le_bytes());
    }

    /// The payload's first u64, if it has one (features, protocol features).
    fn u64_payload(&self) -> Option<u64> {
        let b: [u8; 8] = self.payload.get(..8)?.try_into().ok()?;
        Some(u64::from_le_bytes(b))
    }
}

/// Where a message goes after [`Order::on_request`].
#[derive(Debug)]
pub enum Out {
    /// To the daemon (a request).
    Daemon(Message),
    /// Back to the frontend (an ack produced by the relay).
    Frontend(Message),
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
    pub fn on_request(&mut self, mut msg: Message) -> Result<Vec<Out>, RelayError> {
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
                    return Err(RelayError::TooManyHeld);
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
                let n = msg.payload.get(..4).map_or(0, |_| u32_at(&msg.payload, 0));
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
            .then(|| {
                Out::Frontend(Message::new(
                    msg.request(),
                    FLAG_VERSION | FLAG_REPLY,
                    &0u64.to_le_bytes(),
                ))
            })
    }

    /// The checks the daemon makes on a `SET_VRING_ENABLE` (payload size, queue index,
    /// state 0 or 1), made here for one that is held and may be acked here.
    fn check_enable(&self, msg: &Message) -> Result<(), RelayError> {
        let p = &msg.payload;
        if p.len() != 8 {
            return Err(RelayError::BadEnable(format!(
                "{}-byte payload, expected 8",
                p.len()
            )));
        }
        if !msg.files.is_empty() {
            return Err(RelayError::BadEnable("carries file descriptors".into()));
        }
        let (index, state) = (u32_at(p, 0), u32_at(p, 4));
        if index >= self.queues {
            return Err(RelayError::BadEnable(format!(
                "queue {index} of {}",
                self.queues
            )));
        }
        if state > 1 {
            return Err(RelayError::BadEnable(format!("state {state}")));
        }
        Ok(())
    }
}

/// The two threads relaying one connection.
pub struct Relay {
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying between `frontend` and `daemon` (the daemon's end of the
    /// private connection) for a device with `queues` virtqueues; `name` labels logs.
    pub fn start(
        frontend: UnixStream,
        daemon: UnixStream,
        queues: u32,
        name: &str,
    ) -> io::Result<Relay> {
        let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
        let replies_from = daemon.try_clone()?;
        let frontend_end = frontend.try_clone()?;
        let daemon_end = daemon.try_clone()?;
        let replies_to = to_frontend.clone();
        let up_name = name.to_string();
        let up = std::thread::Builder::new()
            .name(format!("relay-up-{name}"))
            .spawn(move || {
                if let Err(e) = copy_replies(&replies_from, &replies_to) {
                    debug!("port {up_name}: replies: {e}");
                }
                let _ = frontend_end.shutdown(Shutdown::Both);
            })?;
        let down_name = name.to_string();
        let stopper = frontend.try_clone()?;
        let down = std::thread::Builder::new()
            .name(format!("relay-down-{name}"))
            .spawn(move || {
                match relay_requests(&frontend, &daemon, &to_frontend, queues) {
                    Ok(()) => {}
                    Err(RelayError::Io(e)) => debug!("port {down_name}: requests: {e}"),
                    Err(e) => log::warn!("port {down_name}: frontend disconnected: {e}"),
                }
                let _ = daemon_end.shutdown(Shutdown::Both);
                let _ = frontend.shutdown(Shutdown::Both);
            });
        let down = match down {
            Ok(t) => t,
            Err(e) => {
                // Make the reply thread end too before reporting the failure.
                let _ = stopper.shutdown(Shutdown::Both);
                let _ = up.join();
                return Err(e);
            }
        };
        Ok(Relay {
            threads: vec![up, down],
        })
    }

    /// Waits for both threads (after either side closed).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Copies the daemon's replies, whole messages with their descriptors, to the
/// frontend until either side closes.
fn copy_replies(daemon: &UnixStream, frontend: &Mutex<UnixStream>) -> Result<(), RelayError> {
    while let Some(msg) = recv_message(daemon)? {
        let f = frontend.lock().unwrap_or_else(|p| p.into_inner());
        send_message(&f, &msg)?;
    }
    Ok(())
}

/// Relays the frontend's requests to the daemon through [`Order`] until the frontend
/// closes (Ok) or breaks the protocol (Err).
fn relay_requests(
    frontend: &UnixStream,
    daemon: &UnixStream,
    to_frontend: &Mutex<UnixStream>,
    queues: u32,
) -> Result<(), RelayError> {
    let mut order = Order::new(queues);
    while let Some(msg) = recv_message(frontend)? {
        for out in order.on_request(msg)? {
            match out {
                Out::Daemon(m) => send_message(daemon, &m)?,
                Out::Frontend(m) => {
                    let f = to_frontend.lock().unwrap_or_else(|p| p.into_inner());
                    send_message(&f, &m)?;
                }
            }
        }
    }
    Ok(())
}

/// Reads one message; `None` when the peer closed between messages.
pub fn recv_message(sock: &UnixStream) -> Result<Option<Message>, RelayError> {
    let mut header = [0u8; HEADER_LEN];
    let mut fds = [-1 as RawFd; MAX_FDS + 1];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    let (n, nfds) = loop {
        // SAFETY: the iovec points at `header`, which outlives the call and may hold
        // any bytes; `fds` has room for MAX_FDS + 1 descriptors.
        match unsafe { sock.recv_with_fds(&mut iov, &mut fds) } {
            Ok(r) => break r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    };
    let files: Vec<File> = fds[..nfds.min(fds.len())]
        .iter()
        // SAFETY: the kernel installed these descriptors for us; nothing else owns them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    if files.len() > MAX_FDS {
        return Err(RelayError::TooManyFds);
    }
    let mut s = sock;
    if n < HEADER_LEN {
        s.read_exact(&mut header[n..])?;
    }
    let size = u32_at(&header, 8);
    if size as usize > MAX_PAYLOAD {
        return Err(RelayError::Oversized {
            request: u32_at(&header, 0),
            size,
        });
    }
    let mut payload = vec![0u8; size as usize];
    s.read_exact(&mut payload)?;
    Ok(Some(Message {
        header,
        payload,
        files,
    }))
}

/// Writes one message with its descriptors.
pub fn send_message(sock: &UnixStream, msg: &Message) -> Result<(), RelayError> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + msg.payload.len());
    bytes.extend_from_slice(&msg.header);
    bytes.extend_from_slice(&msg.payload);
    let fds: Vec<RawFd> = msg.files.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = sock
        .send_with_fds(&[&bytes[..]], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent < bytes.len() {
        let mut s = sock;
        s.write_all(&bytes[sent..])?;
    }
    Ok(())
}

/// The region of an ADD_MEM_REG or REM_MEM_REG payload.
fn single_region(msg: &Message) -> Option<[u8; REGION_LEN]> {
    if msg.payload.len() != SINGLE_REGION_LEN {
        return None;
    }
    msg.payload.get(8..)?.try_into().ok()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

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
            Err(RelayError::BadEnable(_))
        ));
        assert!(matches!(
            o.on_request(enable(0, 7, 0)),
            Err(RelayError::BadEnable(_))
        ));
        let short = Message::new(SET_VRING_ENABLE, FLAG_VERSION, &[0u8; 4]);
        assert!(matches!(o.on_request(short), Err(RelayError::BadEnable(_))));
        for _ in 0..MAX_HELD {
            o.on_request(enable(1, 1, 0)).unwrap();
        }
        assert!(matches!(
            o.on_request(enable(1, 1, 0)),
            Err(RelayError::TooManyHeld)
        ));
    }

    #[test]
    fn framing_limits_end_the_connection() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut big = Message::new(1, FLAG_VERSION, &[]);
        big.header[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        send_message(&a, &big).unwrap();
        assert!(matches!(
            recv_message(&b),
            Err(RelayError::Oversized { request: 1, .. })
        ));
        // A truncated message: the peer closes mid-payload.
        let mut m = Message::new(SET_FEATURES, FLAG_VERSION, &[0u8; 8]);
        m.payload.truncate(3);
        send_message(&a, &m).unwrap();
        drop(a);
        assert!(matches!(recv_message(&b), Err(RelayError::Io(_))));
        assert!(recv_message(&b).unwrap().is_none());
    }
}
