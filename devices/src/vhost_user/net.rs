//! virtio-net whose frames are moved by a vhost-user-net backend.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::GuestMemoryMmap;

use super::connection::{ConnectError, VhostUserConnection};
use super::net_ctrl::{CtrlQueue, CtrlTarget};
use crate::pci::msix::VectorRouter;
use crate::virtio::{DeviceError, QueueSetup, VirtioDevice, TYPE_NET};

const F_CSUM: u32 = 0;
const F_GUEST_CSUM: u32 = 1;
const F_MAC: u32 = 5;
const F_GUEST_TSO4: u32 = 7;
const F_GUEST_TSO6: u32 = 8;
const F_GUEST_ECN: u32 = 9;
const F_GUEST_UFO: u32 = 10;
const F_HOST_TSO4: u32 = 11;
const F_HOST_TSO6: u32 = 12;
const F_HOST_ECN: u32 = 13;
const F_HOST_UFO: u32 = 14;
const F_MRG_RXBUF: u32 = 15;
const F_STATUS: u32 = 16;
const F_CTRL_VQ: u32 = 17;
const F_MQ: u32 = 22;

const STATUS_LINK_UP: u16 = 1;

/// Feature bits keel passes through from a net backend (single queue pair, no
/// control queue).
pub fn supported_features() -> u64 {
    super::feature_mask(&[
        F_CSUM,
        F_GUEST_CSUM,
        F_GUEST_TSO4,
        F_GUEST_TSO6,
        F_GUEST_ECN,
        F_GUEST_UFO,
        F_HOST_TSO4,
        F_HOST_TSO6,
        F_HOST_ECN,
        F_HOST_UFO,
        F_MRG_RXBUF,
    ])
}

/// Settings of one NIC.
#[derive(Debug, Clone)]
pub struct NetSettings {
    /// Device id (for messages).
    pub id: String,
    /// Backend socket.
    pub socket: std::path::PathBuf,
    /// MAC address shown to the guest.
    pub mac: [u8; 6],
    /// Queue pairs (more than one adds a control queue and MQ).
    pub queue_pairs: u16,
    /// Maximum queue size.
    pub queue_size: u16,
    /// How long to wait for the backend socket.
    pub connect_timeout: Duration,
    /// Longest wait for the backend's answer to one control message.
    pub reply_timeout: Duration,
}

/// A vhost-user-net device.
pub struct VhostUserNet {
    settings: NetSettings,
    conn: Arc<Mutex<VhostUserConnection>>,
    backend_features: u64,
    features: u64,
    config: [u8; 10],
    pairs: u16,
    ctrl: Option<CtrlQueue>,
}

/// Selects the active queue pairs in the backend for the control queue.
struct PairSelector {
    conn: Arc<Mutex<VhostUserConnection>>,
    started: Vec<usize>,
}

impl CtrlTarget for PairSelector {
    fn set_queue_pairs(&mut self, pairs: u16) -> bool {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.started.iter().all(|&q| {
            let enable = q / 2 < usize::from(pairs);
            conn.set_ring_enabled(q, enable)
                .map_err(|e| warn!("queue {q}: {e}"))
                .is_ok()
        })
    }
}

impl VhostUserNet {
    /// Connects to the backend.
    pub fn connect(settings: NetSettings) -> Result<Self, ConnectError> {
        let wanted = settings.queue_pairs.max(1);
        let conn = VhostUserConnection::connect(
            &settings.id,
            &settings.socket,
            settings.connect_timeout,
            settings.reply_timeout,
            2 * u64::from(wanted),
            VhostUserProtocolFeatures::empty(),
        )?;
        let backend_features = conn.virtio_features();
        let mut features = backend_features & supported_features();
        let backend_pairs = conn.backend_queues().map_or(1, |q| (q / 2).max(1));
        let pairs = wanted.min(backend_pairs.min(u64::from(u16::MAX)) as u16);
        if pairs < wanted {
            warn!(
                "device {}: backend serves {backend_pairs} queue pair(s), using {pairs} of the {wanted} configured",
                settings.id
            );
        }
        if pairs > 1 {
            features |= (1 << F_MQ) | (1 << F_CTRL_VQ);
        }
        if features & (1 << super::F_VERSION_1) == 0 {
            return Err(ConnectError::Handshake {
                id: settings.id.clone(),
                socket: settings.socket.clone(),
                step: "GET_FEATURES",
                reason: "the backend does not offer VIRTIO_F_VERSION_1".into(),
            });
        }
        // MAC and link status come from keel's config, not the backend.
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&settings.mac);
        config[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&pairs.to_le_bytes());
        info!("device {}: virtio-net, {pairs} queue pair(s)", settings.id);
        Ok(Self {
            settings,
            conn: Arc::new(Mutex::new(conn)),
            backend_features,
            features: features | (1 << F_MAC) | (1 << F_STATUS),
            config,
            pairs,
            ctrl: None,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, VhostUserConnection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let ctrl = usize::from(self.pairs > 1);
        vec![self.settings.queue_size; 2 * usize::from(self.pairs) + ctrl]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        queues: Vec<QueueSetup>,
        interrupts: &Arc<dyn VectorRouter>,
    ) -> Result<(), DeviceError> {
        let data_queues = 2 * usize::from(self.pairs);
        let (data, ctrl): (Vec<QueueSetup>, Vec<QueueSetup>) =
            queues.into_iter().partition(|q| q.index < data_queues);
        let backend_acked = features & self.backend_features;
        let mq = features & (1 << F_MQ) != 0;
        {
            let mut conn = self.conn();
            if mq {
                // Until the driver asks for more, only the first pair is in use: the
                // others start disabled.
                conn.start_disabled(data.iter().map(|q| q.index).filter(|&q| q >= 2));
            }
            conn.start(mem, backend_acked, &data, interrupts)?;
        }
        let started: Vec<usize> = data.iter().map(|q| q.index).collect();
        if let (Some(setup), true) = (ctrl.first(), features & (1 << F_CTRL_VQ) != 0) {
            let selector = PairSelector {
                conn: Arc::clone(&self.conn),
                started,
            };
            let ctrl = CtrlQueue::start(
                &self.settings.id,
                mem.clone(),
                setup,
                if mq { self.pairs } else { 1 },
                Arc::clone(interrupts),
                Box::new(selector),
            )
            .map_err(|e| DeviceError::BadQueue {
                queue: setup.index,
                reason: e.to_string(),
            })?;
            self.ctrl = Some(ctrl);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.ctrl = None;
        self.conn().stop();
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.conn().raw_fd())
    }

    fn reconnect_backend(&mut self) -> Result<(), String> {
        self.conn().reconnect().map_err(|e| e.to_string())
    }
}
