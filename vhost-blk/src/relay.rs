//! The inflight part of the vhost-user control connection, answered here instead of by
//! vhost-user-backend's request handler.
//!
//! vhost-user-backend 0.24 refuses GET_INFLIGHT_FD and SET_INFLIGHT_FD without asking
//! the backend, and its handler cannot be wrapped. So the frontend's connection ends
//! in a [`keel_vhost_relay::Relay`] (framing, the private socket to the daemon,
//! replies copied back), whose request handler here, [`Inflight`], passes every
//! message on unchanged except the two inflight messages, which it answers itself
//! (allocating and attaching the area).
//! After SET_VRING_KICK, with an area attached, the queue is kicked once so it
//! resubmits what was in flight without waiting for the driver.
//! Only control messages pass through here; the data path is untouched.

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;

use keel_vhost_relay::{le_u64, Message, Out, RelayError, RequestHandler};
use log::{info, warn};

use crate::backend::BlkBackend;
use crate::inflight::{self, InflightArea};

/// `VHOST_USER_SET_VRING_KICK`.
const SET_VRING_KICK: u32 = 12;
/// `VHOST_USER_GET_INFLIGHT_FD`.
const GET_INFLIGHT_FD: u32 = 31;
/// `VHOST_USER_SET_INFLIGHT_FD`.
const SET_INFLIGHT_FD: u32 = 32;
/// Size of `VhostUserInflight` on the wire (two u64, two u16, padding).
const INFLIGHT_MSG_LEN: usize = 24;
/// `VHOST_USER_VRING_IDX_MASK`: the queue index in a u64 vring-fd payload.
const VRING_IDX_MASK: u64 = 0xff;
/// `VHOST_USER_VRING_NOFD_MASK`.
const VRING_NOFD_MASK: u64 = 0x100;

/// The inflight handling of one connection (the relay's request handler).
pub struct Inflight {
    backend: Arc<BlkBackend>,
    /// Whether SET_INFLIGHT_FD attached an area.
    attached: bool,
}

impl Inflight {
    /// The state for a new connection to `backend`.
    pub fn new(backend: Arc<BlkBackend>) -> Inflight {
        Inflight {
            backend,
            attached: false,
        }
    }

    fn get_inflight(&mut self, payload: &[u8]) -> Result<Message, RelayError> {
        let (queues, size) = inflight_shape(payload)?;
        let (max_queues, max_size) = self.backend.inflight_limits();
        let (file, len) = inflight::allocate(queues, size, max_queues, max_size)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        info!("GET_INFLIGHT_FD: {queues} queue(s) of {size}, {len} bytes");
        let mut body = [0u8; INFLIGHT_MSG_LEN];
        body[0..8].copy_from_slice(&len.to_le_bytes());
        body[16..18].copy_from_slice(&queues.to_le_bytes());
        body[18..20].copy_from_slice(&size.to_le_bytes());
        let mut reply = Message::reply(GET_INFLIGHT_FD, &body);
        reply.files.push(file);
        Ok(reply)
    }

    fn set_inflight(&mut self, msg: Message) -> Option<Out> {
        let needs_reply = msg.needs_reply();
        let ok = match self.attach(&msg.payload, msg.files) {
            Ok(()) => true,
            Err(e) => {
                warn!("SET_INFLIGHT_FD refused: {e}");
                false
            }
        };
        needs_reply.then(|| {
            Out::Frontend(Message::reply(
                SET_INFLIGHT_FD,
                &u64::from(!ok).to_le_bytes(),
            ))
        })
    }

    fn attach(&mut self, payload: &[u8], files: Vec<File>) -> Result<(), String> {
        let (queues, size) = inflight_shape(payload).map_err(|e| e.to_string())?;
        let [file] = <[File; 1]>::try_from(files)
            .map_err(|f| format!("expected one file descriptor, got {}", f.len()))?;
        let len = le_u64(payload, 0);
        let offset = le_u64(payload, 8);
        let (max_queues, max_size) = self.backend.inflight_limits();
        let area = InflightArea::map(&file, offset, len, queues, size, max_queues, max_size)
            .map_err(|e| e.to_string())?;
        info!("SET_INFLIGHT_FD: {queues} queue(s) of {size} tracked");
        self.backend.set_inflight(&area);
        self.attached = true;
        Ok(())
    }
}

impl RequestHandler for Inflight {
    fn on_request(&mut self, msg: Message) -> Result<Vec<Out>, RelayError> {
        match msg.request() {
            GET_INFLIGHT_FD => Ok(vec![Out::Frontend(self.get_inflight(&msg.payload)?)]),
            SET_INFLIGHT_FD => Ok(self.set_inflight(msg).into_iter().collect()),
            _ => Ok(vec![Out::Daemon(msg)]),
        }
    }

    fn forwarded(&mut self, msg: &Message) {
        if msg.request() == SET_VRING_KICK && self.attached {
            kick(msg);
        }
    }
}

/// Kicks the queue named in a SET_VRING_KICK message through the eventfd it carries.
fn kick(msg: &Message) {
    let value = msg.u64_payload().unwrap_or(VRING_NOFD_MASK);
    if value & VRING_NOFD_MASK != 0 {
        return;
    }
    if let Some(mut f) = msg.files.first() {
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
