//! Device BARs in the guest: which parts are mapped straight into the guest (KVM
//! memory slots over an mmap of the VFIO region) and which are trapped (MMIO exits,
//! forwarded with region reads/writes, or emulated like the MSI-X table).
//!
//! Slot numbering: keel-vmm registers guest RAM as slots 0 and 1 (below and above
//! the 32-bit hole) and hands each passed-through device a consecutive block of
//! slots starting at [`FIRST_DEVICE_SLOT`], one per directly mapped area, in BAR
//! order. A guest BAR move removes the area's slot and adds it at the new address
//! under the same number.

use std::sync::Arc;

use super::backend::{HostMapping, RegionInfo};

/// First KVM memory slot used for device BAR mappings (RAM uses the slots below).
pub const FIRST_DEVICE_SLOT: u32 = 16;
/// Granularity of direct mappings (host page size).
pub const PAGE: u64 = 4096;

/// Maps host memory into the guest-physical address space (KVM memory slots).
pub trait SlotMapper: Send + Sync {
    /// Maps `mapping` at `guest_addr` as slot `slot`. The caller keeps `mapping`
    /// alive until [`SlotMapper::unmap`] for the same slot returns.
    fn map(&self, slot: u32, guest_addr: u64, mapping: &HostMapping) -> Result<(), String>;
    /// Removes slot `slot`.
    fn unmap(&self, slot: u32) -> Result<(), String>;
}

/// A directly mapped part of a BAR.
pub struct DirectArea {
    /// Offset in the BAR.
    pub offset: u64,
    /// The mmap of the VFIO region at that offset.
    pub mapping: HostMapping,
    /// KVM slot.
    pub slot: u32,
    /// Guest address while mapped.
    pub mapped_at: Option<u64>,
}

/// Parts of a BAR to map directly: the region's mmap-able areas (all of it, or its
/// sparse areas), minus `holes` (offset, length) that must trap (MSI-X table and
/// PBA), widened to pages; areas are page-aligned and non-empty.
pub fn direct_areas(region: &RegionInfo, bar_size: u64, holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    if !region.mmap || region.size == 0 {
        return Vec::new();
    }
    let limit = region.size.min(bar_size);
    let base: Vec<(u64, u64)> = match &region.sparse {
        Some(areas) => areas.clone(),
        None => vec![(0, limit)],
    };
    let mut holes: Vec<(u64, u64)> = holes
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|&(off, len)| {
            let start = off / PAGE * PAGE;
            let end = (off.saturating_add(len)).div_ceil(PAGE) * PAGE;
            (start, end)
        })
        .collect();
    holes.sort_unstable();
    let mut out = Vec::new();
    for (off, len) in base {
        let mut start = off.div_ceil(PAGE) * PAGE;
        let end = (off.saturating_add(len).min(limit)) / PAGE * PAGE;
        for &(h_start, h_end) in &holes {
            if h_end <= start || h_start >= end {
                continue;
            }
            if h_start > start {
                out.push((start, h_start - start));
            }
            start = start.max(h_end);
        }
        if end > start {
            out.push((start, end - start));
        }
    }
    out
}

/// Unmaps every area of `areas` from the guest.
pub fn unmap_all(slots: &Arc<dyn SlotMapper>, areas: &mut [DirectArea], name: &str) {
    for a in areas.iter_mut() {
        if a.mapped_at.take().is_some() {
            if let Err(e) = slots.unmap(a.slot) {
                log::warn!("{name}: cannot remove KVM slot {}: {e}", a.slot);
            }
        }
    }
}

/// Maps every area of `areas` at `bar_addr + offset`.
pub fn map_all(
    slots: &Arc<dyn SlotMapper>,
    areas: &mut [DirectArea],
    bar_addr: u64,
) -> Result<(), String> {
    for a in areas.iter_mut() {
        let at = bar_addr + a.offset;
        slots
            .map(a.slot, at, &a.mapping)
            .map_err(|e| format!("KVM slot {} at {at:#x}: {e}", a.slot))?;
        a.mapped_at = Some(at);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(size: u64, sparse: Option<Vec<(u64, u64)>>) -> RegionInfo {
        RegionInfo {
            size,
            readable: true,
            writable: true,
            mmap: true,
            sparse,
        }
    }

    #[test]
    fn msix_table_and_pba_pages_are_cut_out() {
        // NVMe: 16 KiB BAR 0, PBA at 0x2000, table at 0x3000 (33 vectors).
        let r = region(0x4000, None);
        assert_eq!(
            direct_areas(&r, 0x4000, &[(0x3000, 33 * 16), (0x2000, 8)]),
            vec![(0, 0x2000)]
        );
        // Table at the start of the BAR (i350 BAR 3).
        assert_eq!(
            direct_areas(&r, 0x4000, &[(0, 160), (0x2000, 8)]),
            vec![(0x1000, 0x1000), (0x3000, 0x1000)]
        );
    }

    #[test]
    fn sparse_areas_and_unmappable_regions() {
        let r = region(0x10_0000, Some(vec![(0, 0x8000), (0x9000, 0x7_0000)]));
        assert_eq!(
            direct_areas(&r, 0x10_0000, &[(0x9800, 16)]),
            vec![(0, 0x8000), (0xa000, 0x6_f000)]
        );
        let mut r = region(0x1000, None);
        r.mmap = false;
        assert!(direct_areas(&r, 0x1000, &[]).is_empty());
        // Smaller than a page: trapped.
        assert!(direct_areas(&region(0x800, None), 0x800, &[]).is_empty());
    }
}
