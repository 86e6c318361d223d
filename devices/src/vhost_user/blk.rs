//! virtio-blk whose requests are served by a vhost-user-blk backend.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, warn};
use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::GuestMemoryMmap;

use super::connection::{ConnectError, VhostUserConnection};
use crate::pci::msix::VectorRouter;
use crate::virtio::{DeviceError, QueueSetup, VirtioDevice, TYPE_BLOCK};

/// Size of `struct virtio_blk_config` up to and including write_zeroes_may_unmap.
pub const BLK_CONFIG_LEN: usize = 60;
const OFFSET_NUM_QUEUES: usize = 34;

const F_SIZE_MAX: u32 = 1;
const F_SEG_MAX: u32 = 2;
const F_GEOMETRY: u32 = 4;
const F_RO: u32 = 5;
const F_BLK_SIZE: u32 = 6;
const F_FLUSH: u32 = 9;
const F_TOPOLOGY: u32 = 10;
const F_CONFIG_WCE: u32 = 11;
const F_MQ: u32 = 12;
const F_DISCARD: u32 = 13;
const F_WRITE_ZEROES: u32 = 14;

/// Feature bits keel passes through from a blk backend.
pub fn supported_features() -> u64 {
    super::feature_mask(&[
        F_SIZE_MAX,
        F_SEG_MAX,
        F_GEOMETRY,
        F_RO,
        F_BLK_SIZE,
        F_FLUSH,
        F_TOPOLOGY,
        F_CONFIG_WCE,
        F_MQ,
        F_DISCARD,
        F_WRITE_ZEROES,
    ])
}

/// Settings of one disk.
#[derive(Debug, Clone)]
pub struct BlkSettings {
    /// Device id (for messages).
    pub id: String,
    /// Backend socket.
    pub socket: std::path::PathBuf,
    /// Present the disk read-only.
    pub read_only: bool,
    /// Number of request queues.
    pub queues: u16,
    /// Maximum queue size.
    pub queue_size: u16,
    /// How long to wait for the backend socket.
    pub connect_timeout: Duration,
    /// Longest wait for the backend's answer to one control message.
    pub reply_timeout: Duration,
}

/// A vhost-user-blk device.
pub struct VhostUserBlk {
    settings: BlkSettings,
    conn: VhostUserConnection,
    features: u64,
    config: Vec<u8>,
    queues: u16,
}

impl VhostUserBlk {
    /// Connects to the backend and reads its configuration.
    pub fn connect(settings: BlkSettings) -> Result<Self, ConnectError> {
        let socket: &Path = &settings.socket;
        let mut conn = VhostUserConnection::connect(
            &settings.id,
            socket,
            settings.connect_timeout,
            settings.reply_timeout,
            u64::from(settings.queues),
            VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        )?;
        let handshake = |step: &'static str, reason: String| ConnectError::Handshake {
            id: settings.id.clone(),
            socket: settings.socket.clone(),
            step,
            reason,
        };
        if !conn.has_config() {
            return Err(handshake(
                "GET_PROTOCOL_FEATURES",
                "the backend does not offer the CONFIG protocol feature (needed for the disk size)"
                    .into(),
            ));
        }
        let mut config = conn
            .get_config(BLK_CONFIG_LEN)
            .map_err(|e| handshake("GET_CONFIG", e))?;
        let mut features = conn.virtio_features() & supported_features();
        if features & (1 << super::F_VERSION_1) == 0 {
            return Err(handshake(
                "GET_FEATURES",
                "the backend does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        let backend_queues = if features & (1 << F_MQ) != 0 {
            u16::from_le_bytes([config[OFFSET_NUM_QUEUES], config[OFFSET_NUM_QUEUES + 1]]).max(1)
        } else {
            1
        };
        let backend_queues = conn.backend_queues().map_or(backend_queues, |n| {
            backend_queues.min(n.min(u64::from(u16::MAX)) as u16)
        });
        let queues = settings.queues.min(backend_queues).max(1);
        if queues < settings.queues {
            warn!(
                "device {}: backend serves {backend_queues} queue(s), using {queues} of the {} configured",
                settings.id, settings.queues
            );
        }
        if queues > 1 {
            features |= 1 << F_MQ;
        } else {
            features &= !(1 << F_MQ);
        }
        config[OFFSET_NUM_QUEUES..OFFSET_NUM_QUEUES + 2].copy_from_slice(&queues.to_le_bytes());
        if settings.read_only {
            if features & (1 << F_RO) == 0 {
                warn!(
                    "device {}: shown read-only to the guest, but the backend accepts writes: \
                     start the backend read-only too",
                    settings.id
                );
            }
            features |= 1 << F_RO;
        }
        let capacity = u64::from_le_bytes(config[..8].try_into().unwrap_or([0; 8]));
        info!(
            "device {}: virtio-blk, {} sectors, {queues} queue(s){}",
            settings.id,
            capacity,
            if features & (1 << F_RO) != 0 {
                ", read-only"
            } else {
                ""
            }
        );
        conn.track_inflight(queues, settings.queue_size);
        Ok(Self {
            settings,
            conn,
            features,
            config,
            queues,
        })
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.settings.queue_size; usize::from(self.queues)]
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

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only the writeback byte (CONFIG_WCE) is writable; the backend would need a
        // SET_CONFIG to change its cache mode, which keel does not forward yet.
        debug!(
            "device {}: ignored {}-byte config write at {offset:#x}",
            self.settings.id,
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        queues: Vec<QueueSetup>,
        interrupts: &Arc<dyn VectorRouter>,
    ) -> Result<(), DeviceError> {
        // RO is ours to show, not the backend's to negotiate if it did not offer it.
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
