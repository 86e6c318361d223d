//! The seam between the passthrough device model and the kernel's VFIO device.
//!
//! Everything the model needs from a real device goes through [`VfioBackend`] (one
//! opened VFIO device) and [`DmaMapper`] (the IOMMU address space it sits in). The
//! real implementations in [`super::ioctls`] are thin wrappers over the ioctls; the
//! tests implement both traits with plain memory.

use std::ptr::NonNull;

use vmm_sys_util::eventfd::EventFd;

/// VFIO region index of the PCI configuration space (`VFIO_PCI_CONFIG_REGION_INDEX`).
/// Regions 0–5 are the BARs, 6 the expansion ROM.
pub const CONFIG_REGION: u32 = 7;

/// The interrupt kinds of a VFIO PCI device, by their VFIO IRQ index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IrqKind {
    /// Legacy level-triggered INTx (`VFIO_PCI_INTX_IRQ_INDEX`).
    Intx = 0,
    /// MSI (`VFIO_PCI_MSI_IRQ_INDEX`).
    Msi = 1,
    /// MSI-X (`VFIO_PCI_MSIX_IRQ_INDEX`).
    Msix = 2,
}

/// What the kernel reports about one VFIO region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size in bytes (0: the region does not exist, e.g. an unused BAR).
    pub size: u64,
    /// Reads are allowed.
    pub readable: bool,
    /// Writes are allowed.
    pub writable: bool,
    /// The region (or the `sparse` parts of it) can be mmap'ed.
    pub mmap: bool,
    /// Sparse mmap areas as (offset, length) within the region, when the kernel
    /// restricts mmap to parts of it (`VFIO_REGION_INFO_CAP_SPARSE_MMAP`).
    pub sparse: Option<Vec<(u64, u64)>>,
}

/// A failed VFIO operation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{op}: {reason}")]
pub struct BackendError {
    /// The operation (e.g. "VFIO_DEVICE_SET_IRQS(MSI-X)").
    pub op: String,
    /// Why it failed.
    pub reason: String,
}

impl BackendError {
    /// An error for `op` with `reason`.
    pub fn new(op: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self {
            op: op.into(),
            reason: reason.to_string(),
        }
    }
}

/// An mmap of (part of) a device region in this process; unmapped on drop.
#[derive(Debug)]
pub struct HostMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory (device MMIO or anonymous pages); the
// struct only hands out its address, never references into it.
unsafe impl Send for HostMapping {}
// SAFETY: as above; no interior state is mutated through `&HostMapping`.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Takes ownership of the mapping `ptr..ptr+len`.
    ///
    /// # Safety
    /// `ptr` must come from a successful `mmap` of `len` bytes that nobody else
    /// unmaps; it is `munmap`ed when the value is dropped.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize) -> Self {
        Self { ptr, len }
    }

    /// Anonymous shared memory of `len` bytes (used for tests and by fake devices).
    pub fn anonymous(len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Self { ptr, len })
    }

    /// Start of the mapping in this process.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is a mapping this value owns (see `from_raw`).
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            log::warn!(
                "vfio: munmap of {} bytes failed: {}",
                self.len,
                std::io::Error::last_os_error()
            );
        }
    }
}

/// One opened VFIO PCI device.
pub trait VfioBackend: Send + Sync {
    /// Region `index` (0–5 BARs, 6 ROM, 7 config), or None if the device lacks it.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;
    /// Reads `data.len()` bytes at `offset` of region `index` (all ones on failure).
    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` of region `index` (failures are logged).
    fn write_region(&self, index: u32, offset: u64, data: &[u8]);
    /// Maps `len` bytes at `offset` of region `index` into this process.
    fn mmap_region(&self, index: u32, offset: u64, len: u64) -> Result<HostMapping, BackendError>;
    /// Number of interrupts of `kind` the device has (0: none).
    fn irq_count(&self, kind: IrqKind) -> u32;
    /// Signals interrupts `0..fds.len()` of `kind` on `fds` (`VFIO_DEVICE_SET_IRQS`,
    /// `DATA_EVENTFD | ACTION_TRIGGER`).
    fn enable_irq(&self, kind: IrqKind, fds: &[&EventFd]) -> Result<(), BackendError>;
    /// Sets the eventfds of interrupts `start..start + fds.len()` of `kind` one by
    /// one: `Some(fd)` signals that vector on `fd`, `None` stops signalling it (the
    /// host masks the vector in the device; it then latches a pending bit). Enables
    /// the index first if needed (`VFIO_DEVICE_SET_IRQS`, `DATA_EVENTFD |
    /// ACTION_TRIGGER`, -1 for `None`). vfio-pci has no MASK/UNMASK action for MSI
    /// and MSI-X, so this is how a single vector is masked on the device.
    fn set_irq_triggers(
        &self,
        kind: IrqKind,
        start: u32,
        fds: &[Option<&EventFd>],
    ) -> Result<(), BackendError>;
    /// Stops signalling interrupts of `kind`.
    fn disable_irq(&self, kind: IrqKind) -> Result<(), BackendError>;
    /// Unmasks INTx whenever `fd` is written (`ACTION_UNMASK` with an eventfd: the
    /// KVM resample eventfd, written when the guest EOIs the level interrupt).
    fn set_intx_resample(&self, fd: &EventFd) -> Result<(), BackendError>;
    /// Resets the device (`VFIO_DEVICE_RESET`; FLR or another reset method the
    /// kernel picked). Ok(false) when the device has no reset method.
    fn reset(&self) -> Result<bool, BackendError>;
}

/// The IOMMU address space (VFIO container or iommufd IOAS) the device does DMA in.
pub trait DmaMapper: Send + Sync {
    /// Makes `size` bytes of this process' memory at `host` visible to devices at
    /// I/O virtual address `iova` (the guest-physical address), pinning the pages.
    ///
    /// # Safety
    /// `host..host+size` must stay mapped until [`DmaMapper::unmap`] is called for the
    /// same range; devices may read and write it at any time meanwhile.
    unsafe fn map(&self, iova: u64, size: u64, host: *mut u8) -> Result<(), BackendError>;
    /// Removes the mapping at `iova` of `size` bytes and unpins its pages.
    fn unmap(&self, iova: u64, size: u64) -> Result<(), BackendError>;
}
