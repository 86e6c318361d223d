//! Guest RAM: one shared memfd (hugetlb when configured), mapped around the 32-bit
//! MMIO hole, optionally NUMA-bound and prefaulted.
//!
//! The memory is a file so vhost-user backends can map the same pages: the VMM hands
//! them the memfd and the offsets of each region.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::Path;

use log::{debug, info};
use thiserror::Error;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::config::{host, HugePages, MemoryConfig};
use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// Errors while creating guest RAM.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The hugepage pool cannot back the configured size.
    #[error("{0}")]
    HugePagePool(#[from] host::HostError),
    /// memfd_create failed.
    #[error("cannot create the guest memory file (memfd_create{hugetlb}): {source}")]
    Memfd {
        /// ", MFD_HUGETLB" or "".
        hugetlb: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// ftruncate failed.
    #[error("cannot size guest memory to {size} bytes: {source}")]
    Truncate {
        /// Requested size.
        size: u64,
        /// OS error.
        source: std::io::Error,
    },
    /// mmap failed.
    #[error("cannot map {size} bytes of guest memory at {addr:#x}: {reason}")]
    Map {
        /// Guest address of the region.
        addr: u64,
        /// Size of the region.
        size: u64,
        /// What went wrong.
        reason: String,
    },
    /// The regions could not be assembled (overlap, bad order).
    #[error("cannot assemble guest memory: {0}")]
    Assemble(String),
    /// mbind failed.
    #[error("cannot bind guest memory to NUMA node {node}: {source}")]
    Mbind {
        /// Requested node.
        node: u32,
        /// OS error.
        source: std::io::Error,
    },
    /// Prefaulting failed (out of memory, no hugepages left...).
    #[error("cannot prefault guest memory region at {addr:#x} ({size} bytes): {source}")]
    Prefault {
        /// Guest address of the region.
        addr: u64,
        /// Size of the region.
        size: u64,
        /// OS error.
        source: std::io::Error,
    },
}

/// One contiguous piece of guest RAM and where it lives in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// Splits `size` bytes of RAM around the MMIO hole.
pub fn ram_regions(size: u64) -> Vec<RamRegion> {
    let low = size.min(MMIO_HOLE_START);
    let mut regions = vec![RamRegion {
        guest_addr: 0,
        size: low,
        file_offset: 0,
    }];
    if size > low {
        regions.push(RamRegion {
            guest_addr: MMIO_HOLE_END,
            size: size - low,
            file_offset: low,
        });
    }
    regions
}

/// Guest RAM and the file behind it.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    file: File,
    regions: Vec<RamRegion>,
}

impl GuestRam {
    /// The mapped memory, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The memory file (for handing to vhost-user backends).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The RAM layout.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

/// Creates guest RAM as configured.
pub fn create(config: &MemoryConfig) -> Result<GuestRam, MemoryError> {
    let size = config.size_bytes;
    let page_size = match config.hugepages {
        HugePages::None => None,
        huge => Some(huge.page_size()),
    };
    if let Some(page) = page_size {
        host::check_hugepage_pool(Path::new("/sys"), page, size)?;
    }
    let file = create_memfd(config.hugepages)?;
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { size, source })?;

    let regions = ram_regions(size);
    let mut mapped = Vec::with_capacity(regions.len());
    for r in &regions {
        mapped.push(map_region(&file, r, page_size.is_some())?);
    }
    let memory =
        GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Assemble(e.to_string()))?;

    let ram = GuestRam {
        memory,
        file,
        regions,
    };
    if let Some(node) = config.numa_node {
        bind_numa(&ram, node)?;
    }
    if config.prefault {
        prefault(&ram)?;
    }
    info!(
        "guest memory: {} MiB in {} region(s), {}{}{}",
        size >> 20,
        ram.regions.len(),
        match config.hugepages {
            HugePages::None => "4 KiB pages",
            HugePages::Size2M => "2 MiB hugepages",
            HugePages::Size1G => "1 GiB hugepages",
        },
        config
            .numa_node
            .map(|n| format!(", bound to NUMA node {n}"))
            .unwrap_or_default(),
        if config.prefault { ", prefaulted" } else { "" }
    );
    Ok(ram)
}

fn create_memfd(hugepages: HugePages) -> Result<File, MemoryError> {
    let (extra, hugetlb) = match hugepages {
        HugePages::None => (0, ""),
        HugePages::Size2M => (libc::MFD_HUGETLB | libc::MFD_HUGE_2MB, ", MFD_HUGETLB"),
        HugePages::Size1G => (libc::MFD_HUGETLB | libc::MFD_HUGE_1GB, ", MFD_HUGETLB"),
    };
    let name = c"keel-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid memfd flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | extra) };
    if fd < 0 {
        return Err(MemoryError::Memfd {
            hugetlb,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn map_region(file: &File, r: &RamRegion, hugetlb: bool) -> Result<GuestRegionMmap, MemoryError> {
    let map_err = |reason: String| MemoryError::Map {
        addr: r.guest_addr,
        size: r.size,
        reason,
    };
    let len = usize::try_from(r.size).map_err(|e| map_err(e.to_string()))?;
    let clone = file.try_clone().map_err(|e| map_err(e.to_string()))?;
    // Without hugetlb, MAP_NORESERVE leaves overcommit to the host (pages are faulted in
    // on use). With hugetlb, the mapping reserves its pages now: a short pool fails here
    // with ENOMEM instead of a SIGBUS in the middle of the guest's run.
    let flags = libc::MAP_SHARED | if hugetlb { 0 } else { libc::MAP_NORESERVE };
    let region = MmapRegionBuilder::new(len)
        .with_file_offset(FileOffset::new(clone, r.file_offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(hugetlb)
        .build()
        .map_err(|e| map_err(e.to_string()))?;
    GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
        .ok_or_else(|| map_err("region wraps the guest address space".into()))
}

fn host_ptr(ram: &GuestRam, r: &RamRegion) -> Option<*mut u8> {
    use vm_memory::GuestMemoryBackend;
    ram.memory.get_host_address(GuestAddress(r.guest_addr)).ok()
}

fn bind_numa(ram: &GuestRam, node: u32) -> Result<(), MemoryError> {
    const MPOL_BIND: libc::c_long = 2;
    const MPOL_MF_STRICT: libc::c_ulong = 1;
    const MPOL_MF_MOVE: libc::c_ulong = 2;
    let bits = u64::BITS;
    let mut mask = vec![0u64; (node / bits) as usize + 1];
    mask[(node / bits) as usize] |= 1u64 << (node % bits);
    let max_node = (mask.len() as u32 * bits) as libc::c_ulong + 1;
    for r in &ram.regions {
        let Some(ptr) = host_ptr(ram, r) else {
            continue;
        };
        // SAFETY: `ptr..ptr+size` is a mapping this process owns; `mask` outlives the
        // call and holds `max_node - 1` bits.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                ptr,
                r.size as libc::c_ulong,
                MPOL_BIND,
                mask.as_ptr(),
                max_node,
                MPOL_MF_STRICT | MPOL_MF_MOVE,
            )
        };
        if rc != 0 {
            return Err(MemoryError::Mbind {
                node,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    debug!("guest memory bound to NUMA node {node}");
    Ok(())
}

fn prefault(ram: &GuestRam) -> Result<(), MemoryError> {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    for r in &ram.regions {
        let Some(ptr) = host_ptr(ram, r) else {
            continue;
        };
        // SAFETY: the range is a shared read-write mapping owned by this process;
        // MADV_POPULATE_WRITE only faults pages in and reports failure as an error
        // (instead of SIGBUS) when they cannot be allocated.
        let rc = unsafe { libc::madvise(ptr.cast(), r.size as usize, MADV_POPULATE_WRITE) };
        if rc != 0 {
            return Err(MemoryError::Prefault {
                addr: r.guest_addr,
                size: r.size,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Registers every RAM region as a KVM memory slot.
pub fn register_with_kvm(ram: &GuestRam, vm: &kvm_ioctls::VmFd) -> Result<(), kvm_ioctls::Error> {
    for (slot, r) in ram.regions.iter().enumerate() {
        let Some(ptr) = host_ptr(ram, r) else {
            continue;
        };
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.guest_addr,
            memory_size: r.size,
            userspace_addr: ptr as u64,
        };
        // SAFETY: the host range is a live mapping owned by `ram`, which outlives the VM
        // (the builder keeps both and drops the VM first).
        unsafe { vm.set_user_memory_region(region) }?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_low_region() {
        assert_eq!(
            ram_regions(512 << 20),
            vec![RamRegion {
                guest_addr: 0,
                size: 512 << 20,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn large_memory_splits_around_the_hole() {
        let r = ram_regions(5 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].size, MMIO_HOLE_START);
        assert_eq!(r[1].guest_addr, MMIO_HOLE_END);
        assert_eq!(r[1].file_offset, MMIO_HOLE_START);
        assert_eq!(r[0].size + r[1].size, 5 << 30);
    }

    #[test]
    fn exactly_three_gib_fills_low_memory_only() {
        assert_eq!(ram_regions(MMIO_HOLE_START).len(), 1);
    }

    #[test]
    fn memfd_memory_is_shared_with_the_file() {
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        let cfg = MemoryConfig {
            size_bytes: 16 << 20,
            hugepages: HugePages::None,
            numa_node: None,
            prefault: true,
        };
        let ram = create(&cfg).unwrap();
        ram.memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.file().read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }
}
