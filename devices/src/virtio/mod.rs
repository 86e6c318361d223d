//! virtio devices over the virtio-pci modern transport.

pub mod pci;

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::pci::msix::VectorRouter;

/// Feature bit: the device complies with virtio 1.0 or later.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Device type: network card.
pub const TYPE_NET: u32 = 1;
/// Device type: block device.
pub const TYPE_BLOCK: u32 = 2;
/// "No MSI-X vector" in the common configuration.
pub const NO_VECTOR: u16 = 0xffff;

/// Everything about one queue the driver configured, handed to the device when the
/// driver sets DRIVER_OK.
#[derive(Debug)]
pub struct QueueSetup {
    /// Queue index.
    pub index: usize,
    /// Ring size chosen by the driver.
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available (driver) ring.
    pub avail: u64,
    /// Guest address of the used (device) ring.
    pub used: u64,
    /// Written by the guest's notification (an ioeventfd on the notify address).
    pub kick: EventFd,
    /// MSI-X vector of the queue ([`NO_VECTOR`] if none).
    pub vector: u16,
}

/// Why a device refused to start or stopped working.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver's queue configuration is invalid (guest error).
    #[error("queue {queue}: {reason}")]
    BadQueue {
        /// Queue index.
        queue: usize,
        /// What is wrong.
        reason: String,
    },
    /// The backend failed.
    #[error("backend: {0}")]
    Backend(String),
}

/// A virtio device model behind the PCI transport.
pub trait VirtioDevice: Send {
    /// virtio device type ([`TYPE_NET`], [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the data plane with the negotiated features and enabled queues.
    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        queues: Vec<QueueSetup>,
        interrupts: &Arc<dyn VectorRouter>,
    ) -> Result<(), DeviceError>;
    /// Stops the data plane (driver reset).
    fn reset(&mut self);
    /// The socket of an out-of-process backend, watched for hang-ups.
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// One attempt to reconnect a restarted backend and restore its state.
    fn reconnect_backend(&mut self) -> Result<(), String> {
        Err("this device has no backend to reconnect".to_owned())
    }
}
