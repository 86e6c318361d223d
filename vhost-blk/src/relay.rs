//! The vhost-user control connection, relayed to vhost-user-backend's request handler
//! with the inflight messages answered here.
//!
//! vhost-user-backend 0.24 refuses GET_INFLIGHT_FD and SET_INFLIGHT_FD without asking
//! the backend, and its handler cannot be wrapped. So the frontend's connection ends
//! here: every message is passed unchanged (with its file descriptors) to the daemon
//! over a private socket, and its replies are copied back, except the two inflight
//! messages, which this module answers itself (allocating and attaching the area).
//! After SET_VRING_KICK, with an area attached, the queue is kicked once so it
//! resubmits what was in flight without waiting for the driver.
//! Only control messages pass through here; the data path is untouched.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{debug, info, warn};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::backend::BlkBackend;
use crate::inflight::{self, InflightArea};

/// vhost-user message header length (request, flags, size).
const HEADER_LEN: usize = 12;
/// Largest payload accepted from a frontend.
const MAX_PAYLOAD: usize = 1 << 16;
/// Most file descriptors one message carries.
const MAX_FDS: usize = 32;
/// `VHOST_USER_SET_VRING_KICK`.
const SET_VRING_KICK: u32 = 12;
/// `VHOST_USER_GET_INFLIGHT_FD`.
const GET_INFLIGHT_FD: u32 = 31;
/// `VHOST_USER_SET_INFLIGHT_FD`.
const SET_INFLIGHT_FD: u32 = 32;
/// Header flags: protocol version 1.
const FLAG_VERSION: u32 = 0x1;
/// Header flags: this is a reply.
const FLAG_REPLY: u32 = 0x4;
/// Header flags: the frontend wants an ack (REPLY_ACK).
const FLAG_NEED_REPLY: u32 = 0x8;
/// Size of `VhostUserInflight` on the wire (two u64, two u16, padding).
const INFLIGHT_MSG_LEN: usize = 24;
/// `VHOST_USER_VRING_IDX_MASK`: the queue index in a u64 vring-fd payload.
const VRING_IDX_MASK: u64 = 0xff;
/// `VHOST_USER_VRING_NOFD_MASK`.
const VRING_NOFD_MASK: u64 = 0x100;

/// The two relay threads of one connection.
pub struct Relay {
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying between `frontend` and `daemon` (the daemon's end of the
    /// private connection).
    pub fn start(
        frontend: UnixStream,
        daemon: UnixStream,
        backend: Arc<BlkBackend>,
    ) -> io::Result<Relay> {
        let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
        let daemon_in = daemon.try_clone()?;
        let frontend_down = frontend.try_clone()?;
        let replies = to_frontend.clone();
        let up = std::thread::Builder::new()
            .name("blk-relay-up".into())
            .spawn(move || {
                copy_replies(daemon_in, &replies);
                let _ = frontend_down.shutdown(Shutdown::Both);
            })?;
        let down = std::thread::Builder::new()
            .name("blk-relay-down".into())
            .spawn(move || {
                let mut r = Requests {
                    frontend,
                    daemon,
                    to_frontend,
                    backend,
                    inflight: AtomicBool::new(false),
                };
                if let Err(e) = r.run() {
                    debug!("control connection: {e}");
                }
                let _ = r.daemon.shutdown(Shutdown::Both);
                let _ = r.frontend.shutdown(Shutdown::Both);
            })?;
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

/// Copies the daemon's replies to the frontend until either side closes.
fn copy_replies(mut daemon: UnixStream, frontend: &Mutex<UnixStream>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match daemon.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut f = frontend.lock().unwrap_or_else(|p| p.into_inner());
        if f.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

struct Requests {
    frontend: UnixStream,
    daemon: UnixStream,
    to_frontend: Arc<Mutex<UnixStream>>,
    backend: Arc<BlkBackend>,
    inflight: AtomicBool,
}

impl Requests {
    fn run(&mut self) -> io::Result<()> {
        loop {
            let (header, files) = self.recv_header()?;
            let request = u32_at(&header, 0);
            let flags = u32_at(&header, 4);
            let size = u32_at(&header, 8) as usize;
            if size > MAX_PAYLOAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("message {request} with a {size}-byte payload"),
                ));
            }
            let mut payload = vec![0u8; size];
            self.frontend.read_exact(&mut payload)?;
            match request {
                GET_INFLIGHT_FD => self.get_inflight(&payload)?,
                SET_INFLIGHT_FD => self.set_inflight(flags, &payload, files)?,
                _ => {
                    self.forward(&header, &payload, &files)?;
                    if request == SET_VRING_KICK && self.inflight.load(Ordering::Relaxed) {
                        kick(&payload, &files);
                    }
                }
            }
        }
    }

    fn recv_header(&mut self) -> io::Result<([u8; HEADER_LEN], Vec<File>)> {
        let mut header = [0u8; HEADER_LEN];
        let mut fds = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: HEADER_LEN,
        }];
        // SAFETY: the iovec points at `header`, which outlives the call and may hold
        // any bytes; `fds` has room for MAX_FDS descriptors.
        let (n, nfds) = unsafe { self.frontend.recv_with_fds(&mut iov, &mut fds) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let files = fds[..nfds]
            .iter()
            // SAFETY: the kernel installed these descriptors for us; nothing else owns them.
            .map(|&fd| unsafe { File::from_raw_fd(fd) })
            .collect();
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "frontend disconnected",
            ));
        }
        if n < HEADER_LEN {
            self.frontend.read_exact(&mut header[n..])?;
        }
        Ok((header, files))
    }

    fn forward(&mut self, header: &[u8], payload: &[u8], files: &[File]) -> io::Result<()> {
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let mut msg = Vec::with_capacity(header.len() + payload.len());
        msg.extend_from_slice(header);
        msg.extend_from_slice(payload);
        let sent = self
            .daemon
            .send_with_fds(&[&msg[..]], &fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if sent < msg.len() {
            self.daemon.write_all(&msg[sent..])?;
        }
        Ok(())
    }

    fn reply(&self, request: u32, body: &[u8], fd: Option<RawFd>) -> io::Result<()> {
        let mut msg = Vec::with_capacity(HEADER_LEN + body.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        let f = self.to_frontend.lock().unwrap_or_else(|p| p.into_inner());
        let fds: Vec<RawFd> = fd.into_iter().collect();
        let sent = f
            .send_with_fds(&[&msg[..]], &fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if sent < msg.len() {
            (&*f).write_all(&msg[sent..])?;
        }
        Ok(())
    }

    fn get_inflight(&mut self, payload: &[u8]) -> io::Result<()> {
        let (queues, size) = inflight_shape(payload)?;
        let (max_queues, max_size) = self.backend.inflight_limits();
        let (file, len) = inflight::allocate(queues, size, max_queues, max_size)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        info!("GET_INFLIGHT_FD: {queues} queue(s) of {size}, {len} bytes");
        let mut body = [0u8; INFLIGHT_MSG_LEN];
        body[0..8].copy_from_slice(&len.to_le_bytes());
        body[16..18].copy_from_slice(&queues.to_le_bytes());
        body[18..20].copy_from_slice(&size.to_le_bytes());
        self.reply(GET_INFLIGHT_FD, &body, Some(file.as_raw_fd()))
    }

    fn set_inflight(&mut self, flags: u32, payload: &[u8], files: Vec<File>) -> io::Result<()> {
        let result = self.attach(payload, files);
        let ok = match &result {
            Ok(()) => true,
            Err(e) => {
                warn!("SET_INFLIGHT_FD refused: {e}");
                false
            }
        };
        if flags & FLAG_NEED_REPLY != 0 {
            self.reply(SET_INFLIGHT_FD, &u64::from(!ok).to_le_bytes(), None)?;
        }
        Ok(())
    }

    fn attach(&mut self, payload: &[u8], files: Vec<File>) -> Result<(), String> {
        let (queues, size) = inflight_shape(payload).map_err(|e| e.to_string())?;
        let [file] = <[File; 1]>::try_from(files)
            .map_err(|f| format!("expected one file descriptor, got {}", f.len()))?;
        let len = u64_at(payload, 0);
        let offset = u64_at(payload, 8);
        let (max_queues, max_size) = self.backend.inflight_limits();
        let area = InflightArea::map(&file, offset, len, queues, size, max_queues, max_size)
            .map_err(|e| e.to_string())?;
        info!("SET_INFLIGHT_FD: {queues} queue(s) of {size} tracked");
        self.backend.set_inflight(&area);
        self.inflight.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// Kicks the queue named in a SET_VRING_KICK payload through the eventfd it carries.
fn kick(payload: &[u8], files: &[File]) {
    let value = if payload.len() >= 8 {
        u64_at(payload, 0)
    } else {
        VRING_NOFD_MASK
    };
    if value & VRING_NOFD_MASK != 0 {
        return;
    }
    if let Some(mut f) = files.first() {
        if let Err(e) = f.write_all(&1u64.to_le_bytes()) {
            warn!("queue {}: cannot kick: {e}", value & VRING_IDX_MASK);
        }
    }
}

fn inflight_shape(payload: &[u8]) -> io::Result<(u16, u16)> {
    if payload.len() < 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("inflight message of {} bytes", payload.len()),
        ));
    }
    Ok((
        u16::from_le_bytes([payload[16], payload[17]]),
        u16::from_le_bytes([payload[18], payload[19]]),
    ))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}
