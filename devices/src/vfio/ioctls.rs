//! The real VFIO device: [`VfioBackend`] and [`DmaMapper`] over rust-vmm's
//! `vfio-ioctls`, through either IOMMU interface: the legacy container/group
//! (`/dev/vfio/vfio` and `/dev/vfio/GROUP`) or, with the `iommufd` feature, device
//! cdevs (`/dev/vfio/devices/vfioN`) bound to an iommufd IOAS (`/dev/iommu`).
//! Which one is chosen by [`super::preflight::select_iommu`]. Kept thin: every
//! decision is made above, in code the tests drive with a fake backend. Nothing
//! here can run on a host without VFIO.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{BackendError, DmaMapper, HostMapping, IrqKind, RegionInfo, VfioBackend};

pub use vfio_ioctls::VfioDeviceFd;

const REGION_FLAG_READ: u32 = 1 << 0;
const REGION_FLAG_WRITE: u32 = 1 << 1;
const REGION_FLAG_MMAP: u32 = 1 << 2;
/// `VFIO_DEVICE_SET_IRQS`: `_IO(VFIO_TYPE ';', VFIO_BASE 100 + 10)`.
const VFIO_DEVICE_SET_IRQS: libc::c_ulong = 0x3b6e;
const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// Size of `struct vfio_irq_set` without its data: argsz, flags, index, start, count.
const IRQ_SET_HEADER: usize = 5;

enum Domain {
    Legacy(Arc<VfioContainer>),
    #[cfg(feature = "iommufd")]
    Iommufd(Arc<vfio_ioctls::VfioIommufd>),
}

/// The IOMMU domain shared by every passed-through device of a VM: a VFIO
/// container (each device's group is attached to it when the device is opened) or
/// an iommufd IOAS (each device cdev is bound and attached to it).
pub struct Container {
    inner: Domain,
}

impl Container {
    /// Opens `/dev/vfio/vfio`. `kvm_vfio` is the VM's KVM VFIO pseudo-device
    /// (`KVM_CREATE_DEVICE` type `KVM_DEV_TYPE_VFIO`), which tells KVM about the
    /// groups (needed for non-coherent DMA and some platforms' interrupt remapping).
    pub fn open(kvm_vfio: Option<VfioDeviceFd>) -> Result<Self, BackendError> {
        let inner = VfioContainer::new(kvm_vfio.map(Arc::new))
            .map_err(|e| BackendError::new("open /dev/vfio/vfio", e))?;
        Ok(Self {
            inner: Domain::Legacy(Arc::new(inner)),
        })
    }

    /// Opens `/dev/iommu` and allocates an IOAS; devices opened later are bound to
    /// it through their cdev. `kvm_vfio` as for [`Container::open`] (told about each
    /// device file instead of each group).
    #[cfg(feature = "iommufd")]
    pub fn open_iommufd(kvm_vfio: Option<VfioDeviceFd>) -> Result<Self, BackendError> {
        let iommufd =
            iommufd_ioctls::IommuFd::new().map_err(|e| BackendError::new("open /dev/iommu", e))?;
        let inner = vfio_ioctls::VfioIommufd::new(Arc::new(iommufd), None, kvm_vfio.map(Arc::new))
            .map_err(|e| BackendError::new("IOMMU_IOAS_ALLOC", e))?;
        Ok(Self {
            inner: Domain::Iommufd(Arc::new(inner)),
        })
    }

    /// Without the `iommufd` feature: always an error (the pre-flight never picks
    /// iommufd in such a build).
    #[cfg(not(feature = "iommufd"))]
    pub fn open_iommufd(_kvm_vfio: Option<VfioDeviceFd>) -> Result<Self, BackendError> {
        Err(BackendError::new(
            "open /dev/iommu",
            "keel-devices was built without the `iommufd` feature",
        ))
    }

    /// Which interface this domain uses ("legacy container" or "iommufd").
    pub fn kind(&self) -> &'static str {
        match &self.inner {
            Domain::Legacy(_) => "legacy container",
            #[cfg(feature = "iommufd")]
            Domain::Iommufd(_) => "iommufd",
        }
    }

    /// Opens the device at `sysfs_path` (`/sys/bus/pci/devices/ADDR`): attaches its
    /// group to the container, or binds its cdev to the iommufd and attaches it to
    /// the IOAS.
    pub fn open_device(&self, sysfs_path: &Path) -> Result<Device, BackendError> {
        let (ops, attach_ioas): (Arc<dyn VfioOps>, bool) = match &self.inner {
            Domain::Legacy(c) => (c.clone(), false),
            #[cfg(feature = "iommufd")]
            Domain::Iommufd(i) => (i.clone(), true),
        };
        let device = VfioDevice::new(sysfs_path, ops, attach_ioas)
            .map_err(|e| BackendError::new(format!("open {}", sysfs_path.display()), e))?;
        Ok(Device { inner: device })
    }
}

impl DmaMapper for Container {
    unsafe fn map(&self, iova: u64, size: u64, host: *mut u8) -> Result<(), BackendError> {
        let size = usize::try_from(size).map_err(|e| BackendError::new("VFIO_IOMMU_MAP_DMA", e))?;
        match &self.inner {
            // SAFETY: forwarded contract: the caller keeps the range mapped until unmap.
            Domain::Legacy(c) => unsafe { c.vfio_dma_map(iova, size, host) }
                .map_err(|e| BackendError::new("VFIO_IOMMU_MAP_DMA", e)),
            #[cfg(feature = "iommufd")]
            // SAFETY: as above.
            Domain::Iommufd(i) => unsafe { i.vfio_dma_map(iova, size, host) }
                .map_err(|e| BackendError::new("IOMMU_IOAS_MAP", e)),
        }
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), BackendError> {
        let size =
            usize::try_from(size).map_err(|e| BackendError::new("VFIO_IOMMU_UNMAP_DMA", e))?;
        match &self.inner {
            Domain::Legacy(c) => c
                .vfio_dma_unmap(iova, size)
                .map_err(|e| BackendError::new("VFIO_IOMMU_UNMAP_DMA", e)),
            #[cfg(feature = "iommufd")]
            Domain::Iommufd(i) => i
                .vfio_dma_unmap(iova, size)
                .map_err(|e| BackendError::new("IOMMU_IOAS_UNMAP", e)),
        }
    }
}

/// One opened VFIO PCI device.
pub struct Device {
    inner: VfioDevice,
}

fn irq_index(kind: IrqKind) -> u32 {
    kind as u32
}

impl VfioBackend for Device {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let flags = self.inner.get_region_flags(index);
        if flags == 0 {
            return None;
        }
        let sparse = self
            .inner
            .get_region_caps(index)
            .into_iter()
            .find_map(|cap| match cap {
                VfioRegionInfoCap::SparseMmap(s) => {
                    Some(s.areas.iter().map(|a| (a.offset, a.size)).collect())
                }
                _ => None,
            });
        Some(RegionInfo {
            size: self.inner.get_region_size(index),
            readable: flags & REGION_FLAG_READ != 0,
            writable: flags & REGION_FLAG_WRITE != 0,
            mmap: flags & REGION_FLAG_MMAP != 0,
            sparse,
        })
    }

    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) {
        self.inner.region_read(index, data, offset);
    }

    fn write_region(&self, index: u32, offset: u64, data: &[u8]) {
        self.inner.region_write(index, data, offset);
    }

    fn mmap_region(&self, index: u32, offset: u64, len: u64) -> Result<HostMapping, BackendError> {
        let op = || format!("mmap of region {index} at {offset:#x}+{len:#x}");
        let file_offset = self
            .inner
            .get_region_offset(index)
            .checked_add(offset)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| BackendError::new(op(), "offset out of range"))?;
        let len = usize::try_from(len).map_err(|e| BackendError::new(op(), e))?;
        // SAFETY: a new shared mapping of the device fd; no existing memory is
        // touched, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.inner.as_raw_fd(),
                file_offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(BackendError::new(op(), std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| BackendError::new(op(), "mmap returned NULL"))?;
        // SAFETY: `ptr` is the fresh mapping of `len` bytes made above.
        Ok(unsafe { HostMapping::from_raw(ptr, len) })
    }

    fn irq_count(&self, kind: IrqKind) -> u32 {
        self.inner
            .get_irq_info(irq_index(kind))
            .map_or(0, |i| i.count)
    }

    fn enable_irq(&self, kind: IrqKind, fds: &[&EventFd]) -> Result<(), BackendError> {
        self.inner
            .enable_irq(irq_index(kind), fds.to_vec())
            .map_err(|e| BackendError::new(format!("VFIO_DEVICE_SET_IRQS({kind:?}, enable)"), e))
    }

    fn set_irq_triggers(
        &self,
        kind: IrqKind,
        start: u32,
        fds: &[Option<&EventFd>],
    ) -> Result<(), BackendError> {
        let op = || {
            format!(
                "VFIO_DEVICE_SET_IRQS({kind:?}, eventfds {start}+{})",
                fds.len()
            )
        };
        let count = u32::try_from(fds.len()).map_err(|e| BackendError::new(op(), e))?;
        // struct vfio_irq_set followed by one s32 eventfd (-1: none) per vector, as
        // u32 words so the buffer is aligned for the kernel's reads.
        let mut buf: Vec<u32> = Vec::with_capacity(IRQ_SET_HEADER + fds.len());
        let argsz = u32::try_from((IRQ_SET_HEADER + fds.len()) * 4)
            .map_err(|e| BackendError::new(op(), e))?;
        buf.extend_from_slice(&[
            argsz,
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            irq_index(kind),
            start,
            count,
        ]);
        buf.extend(fds.iter().map(|fd| fd.map_or(-1, |f| f.as_raw_fd()) as u32));
        // SAFETY: `buf` is a complete `vfio_irq_set` of `argsz` bytes that lives across
        // the call; the kernel only reads it. The device fd is open.
        let rc = unsafe { libc::ioctl(self.inner.as_raw_fd(), VFIO_DEVICE_SET_IRQS, buf.as_ptr()) };
        if rc < 0 {
            return Err(BackendError::new(op(), std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn disable_irq(&self, kind: IrqKind) -> Result<(), BackendError> {
        self.inner
            .disable_irq(irq_index(kind))
            .map_err(|e| BackendError::new(format!("VFIO_DEVICE_SET_IRQS({kind:?}, disable)"), e))
    }

    fn set_intx_resample(&self, fd: &EventFd) -> Result<(), BackendError> {
        self.inner
            .set_irq_resample_fd(irq_index(IrqKind::Intx), vec![fd])
            .map_err(|e| BackendError::new("VFIO_DEVICE_SET_IRQS(INTx, unmask eventfd)", e))
    }

    fn reset(&self) -> Result<bool, BackendError> {
        // vfio-ioctls issues VFIO_DEVICE_RESET only when the device reports
        // VFIO_DEVICE_FLAGS_RESET, and does not report the outcome.
        self.inner.reset();
        Ok(true)
    }
}
