//! virtio-net whose frames are moved by a vhost-user-net backend.

use std::sync::Arc;
use std::time::Duration;

use log::info;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::GuestMemoryMmap;

use super::connection::{ConnectError, VhostUserConnection};
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
const F_RING_INDIRECT_DESC: u32 = 28;
const F_RING_EVENT_IDX: u32 = 29;
const F_VERSION_1: u32 = 32;

const STATUS_LINK_UP: u16 = 1;

/// Feature bits keel passes through from a net backend (single queue pair, no
/// control queue).
pub fn supported_features() -> u64 {
    [
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
        F_RING_INDIRECT_DESC,
        F_RING_EVENT_IDX,
        F_VERSION_1,
    ]
    .iter()
    .fold(0, |acc, b| acc | (1u64 << b))
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
    /// Maximum queue size.
    pub queue_size: u16,
    /// How long to wait for the backend socket.
    pub connect_timeout: Duration,
}

/// A vhost-user-net device.
pub struct VhostUserNet {
    settings: NetSettings,
    conn: VhostUserConnection,
    features: u64,
    config: [u8; 10],
}

impl VhostUserNet {
    /// Connects to the backend.
    pub fn connect(settings: NetSettings) -> Result<Self, ConnectError> {
        let conn = VhostUserConnection::connect(
            &settings.id,
            &settings.socket,
            settings.connect_timeout,
            2,
            VhostUserProtocolFeatures::empty(),
        )?;
        let features = conn.virtio_features() & supported_features();
        if features & (1 << F_VERSION_1) == 0 {
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
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        info!("device {}: virtio-net, 1 queue pair", settings.id);
        Ok(Self {
            settings,
            conn,
            features: features | (1 << F_MAC) | (1 << F_STATUS),
            config,
        })
    }
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.settings.queue_size; 2]
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
        let backend_acked = features & self.conn.virtio_features();
        self.conn.start(mem, backend_acked, &queues, interrupts)
    }

    fn reset(&mut self) {
        self.conn.stop();
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.conn.raw_fd())
    }

    fn reconnect_backend(&mut self) -> Result<(), String> {
        self.conn.reconnect().map_err(|e| e.to_string())
    }
}
