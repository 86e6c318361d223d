//! One vhost-user connection: connect with a deadline, negotiate features and
//! protocol features, and start or stop the rings.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use std::fs::File;
use thiserror::Error;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
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
    max_queues: u64,
    extra: VhostUserProtocolFeatures,
    /// The shared in-flight tracking area (INFLIGHT_SHMFD), kept across backend
    /// restarts so a new backend can resubmit what the old one had in flight.
    inflight: Option<(VhostUserInflight, File)>,
    /// (number of queues, maximum queue size) for the in-flight area.
    inflight_shape: Option<(u16, u16)>,
    /// Whether guest RAM was already added region by region (CONFIGURE_MEM_SLOTS)
    /// on this connection.
    regions_added: bool,
    started: Vec<usize>,
    /// Started rings the driver turned off (multiqueue pairs it does not use): a
    /// replay after a backend restart leaves them off.
    disabled: Vec<usize>,
    /// What was started, to replay on a new connection after a backend restart.
    replay: Option<Replay>,
    /// Longest wait for the answer to one control message.
    reply_timeout: Duration,
}

/// The state a restarted backend needs to continue where the old one stopped.
struct Replay {
    mem: GuestMemoryMmap,
    features: u64,
    queues: Vec<QueueSetup>,
    calls: Vec<EventFd>,
}

/// Outcome of a handshake on a fresh socket.
struct Negotiated {
    frontend: Frontend,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    backend_queues: Option<u64>,
}

/// How long the VMM waits for a backend's reply before giving up on it, unless the
/// sandbox sets another (`[devices] reply_timeout`): a hung backend must not hold a
/// vCPU (or the event loop) forever.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Shuts the backend socket down if an exchange takes longer than its deadline, so a
/// hung backend fails the exchange instead of blocking its caller forever (the
/// vhost crate retries interrupted or timed-out socket calls itself).
struct ReplyDeadline {
    done: Option<std::sync::mpsc::Sender<()>>,
}

impl ReplyDeadline {
    fn arm(fd: std::os::fd::RawFd, timeout: Duration) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let spawned = thread::Builder::new()
            .name("vhost-deadline".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                    warn!("vhost-user backend did not answer within {timeout:?}: disconnecting it");
                    // SAFETY: the fd belongs to a Frontend that stays alive until this
                    // guard is dropped (the guard is dropped first); shutdown only
                    // ends the connection, it does not close or reuse the fd.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
            });
        if let Err(e) = spawned {
            warn!("cannot arm the backend reply deadline: {e}");
        }
        Self { done: Some(tx) }
    }
}

impl Drop for ReplyDeadline {
    fn drop(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

fn handshake(
    id: &str,
    socket: &Path,
    frontend: Frontend,
    extra: VhostUserProtocolFeatures,
    reply_timeout: Duration,
) -> Result<Negotiated, ConnectError> {
    let _deadline = ReplyDeadline::arm(frontend.as_raw_fd(), reply_timeout);
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
        protocol = offered & (wanted_protocol_features() | extra);
        frontend
            .set_protocol_features(protocol)
            .map_err(fail("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            backend_queues = Some(frontend.get_queue_num().map_err(fail("GET_QUEUE_NUM"))?);
        }
    }
    Ok(Negotiated {
        frontend,
        backend_features,
        protocol,
        backend_queues,
    })
}

/// Protocol features keel uses when the backend offers them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

impl VhostUserConnection {
    /// Connects to `socket`, retrying until `timeout`, and negotiates; every later
    /// control message waits at most `reply_timeout` for its answer. `extra` names
    /// protocol features the device type wants besides the common ones
    /// (INFLIGHT_SHMFD for blk).
    pub fn connect(
        id: &str,
        socket: &Path,
        timeout: Duration,
        reply_timeout: Duration,
        max_queues: u64,
        extra: VhostUserProtocolFeatures,
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
        let Negotiated {
            frontend,
            backend_features,
            protocol,
            backend_queues,
        } = handshake(id, socket, frontend, extra, reply_timeout)?;
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
            max_queues,
            extra,
            inflight: None,
            inflight_shape: None,
            regions_added: false,
            started: Vec::new(),
            disabled: Vec::new(),
            replay: None,
            reply_timeout,
        })
    }

    /// The socket of the current connection (watched for hang-ups).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.frontend.as_raw_fd()
    }

    /// One attempt to connect to a restarted backend and bring it to the state the
    /// old one had: same features, memory table, and rings continuing from the
    /// used index the old backend last published.
    pub fn reconnect(&mut self) -> Result<(), ConnectError> {
        let frontend = Frontend::connect(&self.socket, self.max_queues).map_err(|e| {
            ConnectError::Timeout {
                id: self.id.clone(),
                socket: self.socket.clone(),
                waited: Duration::ZERO,
                last: e.to_string(),
            }
        })?;
        let n = handshake(
            &self.id,
            &self.socket,
            frontend,
            self.extra,
            self.reply_timeout,
        )?;
        let needed = self
            .replay
            .as_ref()
            .map_or(0, |r| r.features & !VHOST_USER_F_PROTOCOL_FEATURES);
        let missing = needed & !n.backend_features;
        if missing != 0 {
            return Err(ConnectError::Handshake {
                id: self.id.clone(),
                socket: self.socket.clone(),
                step: "GET_FEATURES",
                reason: format!("the new backend lacks negotiated features {missing:#x}"),
            });
        }
        self.frontend = n.frontend;
        self.regions_added = false;
        self.backend_features = n.backend_features;
        self.protocol = n.protocol;
        self.backend_queues = n.backend_queues;
        self.started.clear();
        if let Some(replay) = self.replay.take() {
            let result = self.replay_rings(&replay);
            self.replay = Some(replay);
            result.map_err(|e| ConnectError::Handshake {
                id: self.id.clone(),
                socket: self.socket.clone(),
                step: "replay",
                reason: e.to_string(),
            })?;
        }
        info!(
            "device {}: reconnected to {}",
            self.id,
            self.socket.display()
        );
        Ok(())
    }

    fn replay_rings(&mut self, replay: &Replay) -> Result<(), DeviceError> {
        let mut bases = Vec::with_capacity(replay.queues.len());
        for q in &replay.queues {
            // The used index is what the guest has seen completed; the backend
            // continues from there (requests it took but never completed are
            // processed again).
            let used_idx: u16 = replay
                .mem
                .read_obj(GuestAddress(q.used.wrapping_add(2)))
                .map_err(|e| DeviceError::BadQueue {
                    queue: q.index,
                    reason: format!("cannot read the used index: {e}"),
                })?;
            bases.push(used_idx);
        }
        let calls: Vec<&EventFd> = replay.calls.iter().collect();
        self.program(&replay.mem, replay.features, &replay.queues, &calls, &bases)
    }

    /// Asks for in-flight tracking with this shape, when the backend offers
    /// INFLIGHT_SHMFD.
    pub fn track_inflight(&mut self, queues: u16, queue_size: u16) {
        self.inflight_shape = Some((queues, queue_size));
    }

    fn setup_inflight(&mut self) -> Result<(), DeviceError> {
        let Some((queues, size)) = self.inflight_shape else {
            return Ok(());
        };
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            return Ok(());
        }
        if self.inflight.is_none() {
            let request = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: queues,
                queue_size: size,
            };
            let area = self
                .frontend
                .get_inflight_fd(&request)
                .map_err(|e| self.backend_error("GET_INFLIGHT_FD", e))?;
            self.inflight = Some(area);
        }
        if let Some((info, file)) = &self.inflight {
            self.frontend
                .set_inflight_fd(info, file.as_raw_fd())
                .map_err(|e| self.backend_error("SET_INFLIGHT_FD", e))?;
        }
        Ok(())
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
        let _deadline = ReplyDeadline::arm(self.frontend.as_raw_fd(), self.reply_timeout);
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
        let mut calls = Vec::with_capacity(queues.len());
        let mut kicks = Vec::with_capacity(queues.len());
        for q in queues {
            let call = match (q.vector != NO_VECTOR)
                .then(|| router.eventfd(usize::from(q.vector)))
                .flatten()
            {
                Some(fd) => fd.try_clone(),
                None => EventFd::new(EFD_NONBLOCK),
            }
            .map_err(|e| self.backend_error(&format!("queue {}: call eventfd", q.index), e))?;
            calls.push(call);
            let kick = q
                .kick
                .try_clone()
                .map_err(|e| self.backend_error(&format!("queue {}: kick eventfd", q.index), e))?;
            kicks.push(QueueSetup {
                index: q.index,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick,
                vector: q.vector,
            });
        }
        let refs: Vec<&EventFd> = calls.iter().collect();
        let bases = vec![0u16; queues.len()];
        self.program(mem, features, queues, &refs, &bases)?;
        self.replay = Some(Replay {
            mem: mem.clone(),
            features,
            queues: kicks,
            calls,
        });
        Ok(())
    }

    /// Gives the backend guest RAM: region by region when it supports memory slots
    /// (once per connection), else as one memory table.
    fn share_memory(&mut self, regions: &[VhostUserMemoryRegionInfo]) -> Result<(), DeviceError> {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
        {
            return self
                .frontend
                .set_mem_table(regions)
                .map(|_| ())
                .map_err(|e| self.backend_error("SET_MEM_TABLE", e));
        }
        if self.regions_added {
            return Ok(());
        }
        let slots = self
            .frontend
            .get_max_mem_slots()
            .map_err(|e| self.backend_error("GET_MAX_MEM_SLOTS", e))?;
        if regions.len() as u64 > slots {
            return Err(self.backend_error(
                "memory slots",
                format!(
                    "guest RAM has {} regions, the backend takes {slots}",
                    regions.len()
                ),
            ));
        }
        for region in regions {
            self.frontend
                .add_mem_region(region)
                .map_err(|e| self.backend_error("ADD_MEM_REG", e))?;
        }
        self.regions_added = true;
        Ok(())
    }

    fn program(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        queues: &[QueueSetup],
        calls: &[&EventFd],
        bases: &[u16],
    ) -> Result<(), DeviceError> {
        let _deadline = ReplyDeadline::arm(self.frontend.as_raw_fd(), self.reply_timeout);
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
        self.share_memory(&regions)?;
        self.setup_inflight()?;
        for ((q, call), base) in queues.iter().zip(calls).zip(bases) {
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
                .set_vring_base(q.index, *base)
                .map_err(|e| self.backend_error(&step("SET_VRING_BASE"), e))?;
            self.frontend
                .set_vring_call(q.index, call)
                .map_err(|e| self.backend_error(&step("SET_VRING_CALL"), e))?;
            self.frontend
                .set_vring_kick(q.index, &q.kick)
                .map_err(|e| self.backend_error(&step("SET_VRING_KICK"), e))?;
            if protocol_bit != 0 && !self.disabled.contains(&q.index) {
                self.frontend
                    .set_vring_enable(q.index, true)
                    .map_err(|e| self.backend_error(&step("SET_VRING_ENABLE"), e))?;
            }
            // Kick once: requests the guest queued while no backend listened must
            // not wait for the guest's next notification.
            let _ = q.kick.write(1);
            debug!(
                "device {}: queue {} started (size {}, base {base}, kick fd {})",
                self.id,
                q.index,
                q.size,
                q.kick.as_raw_fd()
            );
            self.started.push(q.index);
        }
        Ok(())
    }

    /// Marks rings to be left disabled when they are started next (multiqueue pairs
    /// the driver does not use yet), so they are never enabled in between.
    pub fn start_disabled(&mut self, rings: impl IntoIterator<Item = usize>) {
        for q in rings {
            if !self.disabled.contains(&q) {
                self.disabled.push(q);
            }
        }
    }

    /// Enables or disables a started ring (multiqueue pair selection).
    pub fn set_ring_enabled(&mut self, index: usize, enabled: bool) -> Result<(), String> {
        // Remembered first: a backend that is gone gets the state on reconnect.
        self.disabled.retain(|&q| q != index);
        if !enabled {
            self.disabled.push(index);
        }
        let _deadline = ReplyDeadline::arm(self.frontend.as_raw_fd(), self.reply_timeout);
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Err("the backend has no per-ring enable (no protocol features)".to_owned());
        }
        self.frontend
            .set_vring_enable(index, enabled)
            .map_err(|e| e.to_string())
    }

    /// Stops every started ring (GET_VRING_BASE), so the backend stops touching
    /// guest memory.
    pub fn stop(&mut self) {
        let _deadline = ReplyDeadline::arm(self.frontend.as_raw_fd(), self.reply_timeout);
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
        self.replay = None;
        self.disabled.clear();
        // A driver reset starts the device afresh: nothing is in flight any more.
        self.inflight = None;
    }
}
