//! One vhost-user connection: connect with a deadline, negotiate features and
//! protocol features, and start or stop the rings.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info};
use thiserror::Error;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pci::msix::VectorRouter;
use crate::virtio::{DeviceError, QueueSetup, NO_VECTOR};

/// Feature bit (in the vhost-user feature word) that enables protocol features.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Errors while connecting to a backend.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The socket did not accept a connection before the deadline.
    #[error("device {id}: no vhost-user backend on {socket} after {waited:?}: {last}")]
    Timeout {
        /// Device id.
        id: String,
        /// Socket path.
        socket: PathBuf,
        /// How long we waited.
        waited: Duration,
        /// The last connect error.
        last: String,
    },
    /// The backend refused or broke the handshake.
    #[error("device {id}: vhost-user handshake with {socket} failed: {step}: {reason}")]
    Handshake {
        /// Device id.
        id: String,
        /// Socket path.
        socket: PathBuf,
        /// The step that failed.
        step: &'static str,
        /// The error.
        reason: String,
    },
}

/// A negotiated connection to a backend.
pub struct VhostUserConnection {
    id: String,
    socket: PathBuf,
    frontend: Frontend,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    backend_queues: Option<u64>,
    /// Call eventfds for queues without an MSI-X vector (nobody reads them).
    spare_calls: Vec<EventFd>,
    started: Vec<usize>,
}

/// Protocol features keel uses when the backend offers them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
}

impl VhostUserConnection {
    /// Connects to `socket`, retrying until `timeout`, and negotiates.
    pub fn connect(
        id: &str,
        socket: &Path,
        timeout: Duration,
        max_queues: u64,
    ) -> Result<Self, ConnectError> {
        let start = Instant::now();
        let frontend = loop {
            match Frontend::connect(socket, max_queues) {
                Ok(f) => break f,
                Err(e) => {
                    if start.elapsed() >= timeout {
                        return Err(ConnectError::Timeout {
                            id: id.to_owned(),
                            socket: socket.to_path_buf(),
                            waited: timeout,
                            last: e.to_string(),
                        });
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let fail = |step: &'static str| {
            let id = id.to_owned();
            let socket = socket.to_path_buf();
            move |e: vhost::Error| ConnectError::Handshake {
                id,
                socket,
                step,
                reason: e.to_string(),
            }
        };
        let mut frontend = frontend;
        frontend.set_owner().map_err(fail("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(fail("GET_FEATURES"))?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        let mut backend_queues = None;
        if backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(fail("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & wanted_protocol_features();
            frontend
                .set_protocol_features(protocol)
                .map_err(fail("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                backend_queues = Some(frontend.get_queue_num().map_err(fail("GET_QUEUE_NUM"))?);
            }
        }
        info!(
            "device {id}: connected to {} (features {backend_features:#x}, protocol {:?}, queues {backend_queues:?})",
            socket.display(),
            protocol
        );
        Ok(Self {
            id: id.to_owned(),
            socket: socket.to_path_buf(),
            frontend,
            backend_features,
            protocol,
            backend_queues,
            spare_calls: Vec::new(),
            started: Vec::new(),
        })
    }

    /// virtio feature bits the backend offers (without the vhost-user bit).
    pub fn virtio_features(&self) -> u64 {
        self.backend_features & !VHOST_USER_F_PROTOCOL_FEATURES
    }

    /// Queues the backend supports, when it says (MQ protocol feature).
    pub fn backend_queues(&self) -> Option<u64> {
        self.backend_queues
    }

    /// Whether the backend serves its config space (CONFIG protocol feature).
    pub fn has_config(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::CONFIG)
    }

    /// Reads `len` bytes of the backend's device configuration.
    pub fn get_config(&mut self, len: usize) -> Result<Vec<u8>, String> {
        let buf = vec![0u8; len];
        self.frontend
            .get_config(0, len as u32, VhostUserConfigFlags::WRITABLE, &buf)
            .map(|(_, payload)| payload)
            .map_err(|e| e.to_string())
    }

    fn backend_error(&self, step: &str, e: impl std::fmt::Display) -> DeviceError {
        DeviceError::Backend(format!(
            "device {} ({}): {step}: {e}",
            self.id,
            self.socket.display()
        ))
    }

    /// Shares guest memory and starts the given rings with `features` acked.
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        queues: &[QueueSetup],
        router: &Arc<dyn VectorRouter>,
    ) -> Result<(), DeviceError> {
        let protocol_bit = self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES;
        self.frontend
            .set_features(features | protocol_bit)
            .map_err(|e| self.backend_error("SET_FEATURES", e))?;
        let mut regions = Vec::new();
        for region in mem.iter() {
            let info = VhostUserMemoryRegionInfo::from_guest_region(region)
                .map_err(|e| self.backend_error("memory region", e))?;
            regions.push(info);
        }
        self.frontend
            .set_mem_table(&regions)
            .map_err(|e| self.backend_error("SET_MEM_TABLE", e))?;
        self.spare_calls.clear();
        for q in queues {
            let host = |addr: u64| -> Result<u64, DeviceError> {
                mem.get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|e| DeviceError::BadQueue {
                        queue: q.index,
                        reason: format!("ring address {addr:#x}: {e}"),
                    })
            };
            let config = VringConfigData {
                queue_max_size: q.size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: host(q.desc)?,
                used_ring_addr: host(q.used)?,
                avail_ring_addr: host(q.avail)?,
                log_addr: None,
            };
            let step = |s: &'static str| format!("queue {}: {s}", q.index);
            self.frontend
                .set_vring_num(q.index, q.size)
                .map_err(|e| self.backend_error(&step("SET_VRING_NUM"), e))?;
            self.frontend
                .set_vring_addr(q.index, &config)
                .map_err(|e| self.backend_error(&step("SET_VRING_ADDR"), e))?;
            self.frontend
                .set_vring_base(q.index, 0)
                .map_err(|e| self.backend_error(&step("SET_VRING_BASE"), e))?;
            let call = match (q.vector != NO_VECTOR)
                .then(|| router.eventfd(usize::from(q.vector)))
                .flatten()
            {
                Some(fd) => fd.try_clone(),
                None => EventFd::new(EFD_NONBLOCK),
            }
            .map_err(|e| self.backend_error(&step("call eventfd"), e))?;
            self.frontend
                .set_vring_call(q.index, &call)
                .map_err(|e| self.backend_error(&step("SET_VRING_CALL"), e))?;
            self.spare_calls.push(call);
            self.frontend
                .set_vring_kick(q.index, &q.kick)
                .map_err(|e| self.backend_error(&step("SET_VRING_KICK"), e))?;
            if protocol_bit != 0 {
                self.frontend
                    .set_vring_enable(q.index, true)
                    .map_err(|e| self.backend_error(&step("SET_VRING_ENABLE"), e))?;
            }
            debug!(
                "device {}: queue {} started (size {}, kick fd {})",
                self.id,
                q.index,
                q.size,
                q.kick.as_raw_fd()
            );
            self.started.push(q.index);
        }
        Ok(())
    }

    /// Stops every started ring (GET_VRING_BASE), so the backend stops touching
    /// guest memory.
    pub fn stop(&mut self) {
        let protocol = self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        for index in std::mem::take(&mut self.started) {
            if protocol {
                if let Err(e) = self.frontend.set_vring_enable(index, false) {
                    debug!("device {}: queue {index}: disable: {e}", self.id);
                }
            }
            if let Err(e) = self.frontend.get_vring_base(index) {
                debug!("device {}: queue {index}: GET_VRING_BASE: {e}", self.id);
            }
        }
        self.spare_calls.clear();
    }
}
