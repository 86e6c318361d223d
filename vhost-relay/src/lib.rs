//! keel-vhost-relay: the vhost-user control-message relay shared by keel's backends.
//!
//! The rust-vmm `vhost` crate's request handler (inside vhost-user-backend's daemon)
//! cannot be wrapped, yet each backend has to answer or reorder a few control messages
//! itself (keel-vhost-blk: the inflight messages; keel-vhost-net: QEMU 7.2's early
//! `SET_VRING_ENABLE` and repeated `ADD_MEM_REG`). So the frontend's connection ends in
//! a [`Relay`]: the daemon gets the other end of a private socket
//! ([`private_connection`]), every request from the frontend goes through the
//! backend's [`RequestHandler`], which decides what is passed on to the daemon and what
//! is answered here, and every reply from the daemon is copied back to the frontend,
//! whole messages with their file descriptors.
//!
//! [`config_window`] answers GET_CONFIG from a device's config space the same way for
//! both backends.
//!
//! Only control messages pass through here; the data path is untouched. A frontend
//! that breaks the framing (oversized payload, too many descriptors) or that the
//! handler refuses is disconnected: that ends its own connection only.

use std::error::Error;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{debug, warn};
use vhost::vhost_user::Listener;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user message header length (request, flags, size).
pub const HEADER_LEN: usize = 12;
/// Largest payload relayed in either direction: the `vhost` crate's own limit
/// (`MAX_MSG_SIZE`), so a larger message would end the connection at the daemon anyway.
/// A `SET_MEM_TABLE` with 8 regions is 264 bytes, the inflight messages 24.
pub const MAX_PAYLOAD: usize = 4096;
/// Most file descriptors one message may carry (the `vhost` crate's
/// `MAX_ATTACHED_FD_ENTRIES`).
pub const MAX_FDS: usize = 32;
/// Header flags: protocol version 1.
pub const FLAG_VERSION: u32 = 0x1;
/// Header flags: this is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Header flags: the frontend wants an ack (REPLY_ACK).
pub const FLAG_NEED_REPLY: u32 = 0x8;

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
    /// The backend's [`RequestHandler`] refused a request.
    #[error(transparent)]
    Refused(Box<dyn Error + Send + Sync>),
}

/// One vhost-user message with the file descriptors that came with it.
#[derive(Debug)]
pub struct Message {
    /// Request code, flags and payload size, little-endian.
    pub header: [u8; HEADER_LEN],
    /// The payload (exactly as long as the header says).
    pub payload: Vec<u8>,
    /// File descriptors received with the message (or to send with it); closed when
    /// the message is dropped.
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

    /// A reply to `request` (version 1, `REPLY` set) carrying `payload`.
    pub fn reply(request: u32, payload: &[u8]) -> Message {
        Message::new(request, FLAG_VERSION | FLAG_REPLY, payload)
    }

    /// The request code.
    pub fn request(&self) -> u32 {
        le_u32(&self.header, 0)
    }

    /// The header flags.
    pub fn flags(&self) -> u32 {
        le_u32(&self.header, 4)
    }

    /// Replaces the header flags.
    pub fn set_flags(&mut self, flags: u32) {
        self.header[4..8].copy_from_slice(&flags.to_le_bytes());
    }

    /// Whether the sender asked for an ack (`NEED_REPLY`).
    pub fn needs_reply(&self) -> bool {
        self.flags() & FLAG_NEED_REPLY != 0
    }

    /// The payload's first u64, if it has one (features, protocol features, vring fd).
    pub fn u64_payload(&self) -> Option<u64> {
        let b: [u8; 8] = self.payload.get(..8)?.try_into().ok()?;
        Some(u64::from_le_bytes(b))
    }
}

/// Where a message goes after [`RequestHandler::on_request`].
#[derive(Debug)]
pub enum Out {
    /// To the daemon (a request).
    Daemon(Message),
    /// Back to the frontend (a reply produced by the relay).
    Frontend(Message),
}

/// A backend's part of the relay: what happens to each request from the frontend.
pub trait RequestHandler: Send + 'static {
    /// Decides what to do with one request from the frontend: the messages to send,
    /// in order (none to drop it). An error disconnects the frontend.
    fn on_request(&mut self, msg: Message) -> Result<Vec<Out>, RelayError>;

    /// Called after `msg` was sent to the daemon, while its descriptors are still
    /// open.
    fn forwarded(&mut self, msg: &Message) {
        let _ = msg;
    }
}

/// The two threads relaying one connection.
pub struct Relay {
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying between `frontend` and `daemon` (the daemon's end of the
    /// private connection), passing requests through `handler`; `name` labels the
    /// threads and logs. When either side closes or the frontend breaks the protocol,
    /// both connections are shut down and both threads end.
    pub fn start<H: RequestHandler>(
        frontend: UnixStream,
        daemon: UnixStream,
        name: &str,
        mut handler: H,
    ) -> io::Result<Relay> {
        let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
        let replies_from = daemon.try_clone()?;
        let frontend_end = frontend.try_clone()?;
        let daemon_end = daemon.try_clone()?;
        let stopper = frontend.try_clone()?;
        let replies_to = to_frontend.clone();
        let up_name = name.to_string();
        let up = std::thread::Builder::new()
            .name(format!("relay-up-{name}"))
            .spawn(move || {
                if let Err(e) = copy_replies(&replies_from, &replies_to) {
                    debug!("relay {up_name}: replies: {e}");
                }
                let _ = frontend_end.shutdown(Shutdown::Both);
            })?;
        let down_name = name.to_string();
        let down = std::thread::Builder::new()
            .name(format!("relay-down-{name}"))
            .spawn(move || {
                match relay_requests(&frontend, &daemon, &to_frontend, &mut handler) {
                    Ok(()) => {}
                    Err(RelayError::Io(e)) => debug!("relay {down_name}: requests: {e}"),
                    Err(e) => warn!("relay {down_name}: frontend disconnected: {e}"),
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

/// Relays the frontend's requests to the daemon through `handler` until the frontend
/// closes (Ok) or breaks the protocol (Err).
fn relay_requests<H: RequestHandler>(
    frontend: &UnixStream,
    daemon: &UnixStream,
    to_frontend: &Mutex<UnixStream>,
    handler: &mut H,
) -> Result<(), RelayError> {
    while let Some(msg) = recv_message(frontend)? {
        for out in handler.on_request(msg)? {
            match out {
                Out::Daemon(m) => {
                    send_message(daemon, &m)?;
                    handler.forwarded(&m);
                }
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
    let size = le_u32(&header, 8);
    if size as usize > MAX_PAYLOAD {
        return Err(RelayError::Oversized {
            request: le_u32(&header, 0),
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

/// A listener with one connection already queued, plus that connection's other end,
/// for the daemon of connection `id` served on `socket`. The listener lives in a
/// directory only this user can enter, removed again before this returns, so no other
/// process can take the daemon's place.
pub fn private_connection(socket: &Path, id: u64) -> io::Result<(Listener, UnixStream)> {
    let name = socket
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let dir = parent.join(format!(".{name}.{}.{id}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let result = (|| {
        let path = dir.join("s");
        let listener = UnixListener::bind(&path)?;
        let inner = UnixStream::connect(&path)?;
        Ok((Listener::from(listener), inner))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Largest GET_CONFIG answer: the vhost-user limit on a device's config space.
pub const MAX_CONFIG_SIZE: usize = 256;

/// What a GET_CONFIG of `size` bytes at `offset` returns for a device whose config
/// space is `config`: its bytes, zero past its end (fields of newer spec versions
/// than the device knows), at most [`MAX_CONFIG_SIZE`] bytes, whatever the frontend
/// asked for.
pub fn config_window(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let size = (size as usize).min(MAX_CONFIG_SIZE);
    (0..size)
        .map(|i| {
            let at = (offset as usize).saturating_add(i);
            config.get(at).copied().unwrap_or(0)
        })
        .collect()
}

/// The little-endian u32 at `at` in `b` (0 past the end).
pub fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

/// The little-endian u64 at `at` in `b` (0 past the end).
pub fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::Seek;
    use std::os::unix::fs::MetadataExt;

    use super::*;

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
        let mut m = Message::new(2, FLAG_VERSION, &[0u8; 8]);
        m.payload.truncate(3);
        send_message(&a, &m).unwrap();
        drop(a);
        assert!(matches!(recv_message(&b), Err(RelayError::Io(_))));
        assert!(recv_message(&b).unwrap().is_none());
    }

    #[test]
    fn too_many_descriptors_end_the_connection() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        let mut m = Message::new(5, FLAG_VERSION, &[0u8; 8]);
        m.files = (0..=MAX_FDS).map(|_| f.try_clone().unwrap()).collect();
        send_message(&a, &m).unwrap();
        assert!(matches!(recv_message(&b), Err(RelayError::TooManyFds)));
        // At the limit (on a fresh connection: the refused one is dropped): received
        // whole, descriptors included.
        let (a, b) = UnixStream::pair().unwrap();
        m.files.truncate(MAX_FDS);
        send_message(&a, &m).unwrap();
        let got = recv_message(&b).unwrap().unwrap();
        assert_eq!((got.request(), got.files.len()), (5, MAX_FDS));
        assert_eq!(got.u64_payload(), Some(0));
    }

    /// Answers request 99 locally (with a descriptor), refuses 66, passes the rest on
    /// and counts what was forwarded.
    struct Test {
        forwarded: Arc<Mutex<Vec<u32>>>,
    }

    impl RequestHandler for Test {
        fn on_request(&mut self, msg: Message) -> Result<Vec<Out>, RelayError> {
            match msg.request() {
                99 => {
                    let mut r = Message::reply(99, &7u64.to_le_bytes());
                    r.files.push(tempfile::tempfile()?);
                    Ok(vec![Out::Frontend(r)])
                }
                66 => Err(RelayError::Refused("66 is refused".into())),
                _ => Ok(vec![Out::Daemon(msg)]),
            }
        }

        fn forwarded(&mut self, msg: &Message) {
            self.forwarded.lock().unwrap().push(msg.request());
        }
    }

    #[test]
    fn requests_go_through_the_handler_and_replies_come_back() {
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_daemon, daemon) = UnixStream::pair().unwrap();
        let forwarded = Arc::new(Mutex::new(Vec::new()));
        let relay = Relay::start(
            relay_front,
            relay_daemon,
            "test",
            Test {
                forwarded: forwarded.clone(),
            },
        )
        .unwrap();
        // Passed on with its descriptor; the daemon's reply is copied back.
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"kick").unwrap();
        let mut m = Message::new(12, FLAG_VERSION | FLAG_NEED_REPLY, &3u64.to_le_bytes());
        m.files.push(file.try_clone().unwrap());
        send_message(&frontend, &m).unwrap();
        let got = recv_message(&daemon).unwrap().unwrap();
        assert_eq!((got.request(), got.flags(), got.files.len()), (12, 9, 1));
        assert!(got.needs_reply());
        let ino = |f: &File| f.metadata().unwrap().ino();
        assert_eq!(ino(&got.files[0]), ino(&file));
        send_message(&daemon, &Message::reply(12, &0u64.to_le_bytes())).unwrap();
        let reply = recv_message(&frontend).unwrap().unwrap();
        assert_eq!(
            (reply.request(), reply.flags()),
            (12, FLAG_VERSION | FLAG_REPLY)
        );
        // Answered here, with a descriptor; nothing reaches the daemon.
        send_message(&frontend, &Message::new(99, FLAG_VERSION, &[])).unwrap();
        let mut reply = recv_message(&frontend).unwrap().unwrap();
        assert_eq!((reply.request(), reply.u64_payload()), (99, Some(7)));
        assert_eq!(reply.files[0].stream_position().unwrap(), 0);
        reply.files[0].write_all(b"x").unwrap();
        assert_eq!(*forwarded.lock().unwrap(), [12]);
        // A refused request disconnects the frontend and the daemon.
        send_message(&frontend, &Message::new(66, FLAG_VERSION, &[])).unwrap();
        assert!(recv_message(&daemon).unwrap().is_none());
        assert!(recv_message(&frontend).unwrap().is_none());
        relay.join();
    }

    #[test]
    fn the_daemon_closing_ends_the_relay() {
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_daemon, daemon) = UnixStream::pair().unwrap();
        let forwarded = Arc::new(Mutex::new(Vec::new()));
        let relay = Relay::start(relay_front, relay_daemon, "test", Test { forwarded }).unwrap();
        drop(daemon);
        assert!(recv_message(&frontend).unwrap().is_none());
        relay.join();
    }

    #[test]
    fn private_connection_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vm.sock");
        let (l, mut inner) = private_connection(&socket, 3).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut accepted = l.accept().unwrap().unwrap();
        inner.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        accepted.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
    }

    #[test]
    fn short_fields_read_as_zero() {
        assert_eq!(le_u32(&[1, 0, 0, 0, 2], 0), 1);
        assert_eq!(le_u32(&[1, 0], 0), 0);
        assert_eq!(le_u64(&[0; 12], 8), 0);
        assert_eq!(le_u64(&2u64.to_le_bytes(), 0), 2);
    }

    #[test]
    fn config_window_zero_fills_and_caps() {
        let config = [1u8, 2, 3, 4];
        assert_eq!(config_window(&config, 1, 2), [2, 3]);
        assert_eq!(config_window(&config, 2, 4), [3, 4, 0, 0]);
        assert_eq!(config_window(&config, u32::MAX, 2), [0, 0]);
        assert_eq!(config_window(&config, 0, u32::MAX).len(), MAX_CONFIG_SIZE);
    }
}
