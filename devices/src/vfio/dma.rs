//! DMA mappings of guest RAM: every RAM region is mapped in the IOMMU at its
//! guest-physical address, so the device's DMA addresses (programmed by the guest
//! driver with guest-physical addresses) land in guest memory.
//!
//! Hugepage-backed RAM needs nothing special: VFIO pins whatever backs the range
//! (2 MiB / 1 GiB pages are pinned as a whole and let the IOMMU use large pages).
//! Pinning is charged to `RLIMIT_MEMLOCK` (see [`super::preflight::check_memlock`]).
//! NUMA binding must happen before the mapping: pinned pages never migrate.

use std::sync::Arc;

use log::{debug, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use super::backend::{BackendError, DmaMapper};
use super::bars::PAGE;

/// One range of guest RAM to map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaRange {
    /// I/O virtual address (= guest-physical address).
    pub iova: u64,
    /// Length in bytes.
    pub size: u64,
    /// Address of the memory in this process.
    pub host: usize,
}

/// Errors while mapping guest RAM for DMA.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DmaError {
    /// A range is not page-aligned.
    #[error("guest RAM range {iova:#x}+{size:#x} is not page-aligned")]
    Unaligned {
        /// Start.
        iova: u64,
        /// Length.
        size: u64,
    },
    /// The IOMMU refused a mapping.
    #[error("cannot map guest RAM {iova:#x}+{size:#x} for DMA: {source}")]
    Map {
        /// Start.
        iova: u64,
        /// Length.
        size: u64,
        /// The VFIO error.
        source: BackendError,
    },
}

/// The RAM regions of `memory` as DMA ranges.
pub fn ranges_of(memory: &GuestMemoryMmap) -> Vec<DmaRange> {
    memory
        .iter()
        .filter_map(|r| {
            let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
            Some(DmaRange {
                iova: r.start_addr().0,
                size: r.len(),
                host: host as usize,
            })
        })
        .collect()
}

/// Guest RAM mapped for DMA; unmapped on drop.
pub struct DmaMappings {
    mapper: Arc<dyn DmaMapper>,
    mapped: Vec<(u64, u64)>,
}

impl DmaMappings {
    /// Maps every range; on failure, unmaps what was mapped and fails.
    ///
    /// # Safety
    /// The host memory of every range must stay mapped for as long as the returned
    /// value lives (the device may access it until then).
    pub unsafe fn map(mapper: Arc<dyn DmaMapper>, ranges: &[DmaRange]) -> Result<Self, DmaError> {
        let mut this = Self {
            mapper,
            mapped: Vec::with_capacity(ranges.len()),
        };
        for r in ranges {
            if r.iova % PAGE != 0 || r.size % PAGE != 0 || r.host as u64 % PAGE != 0 || r.size == 0
            {
                return Err(DmaError::Unaligned {
                    iova: r.iova,
                    size: r.size,
                });
            }
            // SAFETY: the caller keeps the memory mapped while `this` lives, and
            // `this` unmaps the range before it goes away.
            unsafe { this.mapper.map(r.iova, r.size, r.host as *mut u8) }.map_err(|source| {
                DmaError::Map {
                    iova: r.iova,
                    size: r.size,
                    source,
                }
            })?;
            debug!("vfio: DMA map {:#x}+{:#x}", r.iova, r.size);
            this.mapped.push((r.iova, r.size));
        }
        Ok(this)
    }

    /// The mapped (iova, size) ranges.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.mapped
    }

    /// Unmaps everything (idempotent).
    pub fn unmap_all(&mut self) {
        for (iova, size) in self.mapped.drain(..).rev() {
            if let Err(e) = self.mapper.unmap(iova, size) {
                warn!("vfio: DMA unmap {iova:#x}+{size:#x} failed: {e}");
            }
        }
    }
}

impl Drop for DmaMappings {
    fn drop(&mut self) {
        self.unmap_all();
    }
}
