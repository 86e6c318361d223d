//! Identity page tables for entering long mode: the first 4 GiB mapped with 2 MiB
//! pages, so the kernel (and the probe guest) can reach RAM and the MMIO hole.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout::{PDE_ADDR, PDPTE_ADDR, PML4_ADDR};

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Writes PML4 → PDPT → 4 page directories.
pub fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    mem.write_obj(PDPTE_ADDR | PRESENT_WRITABLE, GuestAddress(PML4_ADDR))?;
    for gib in 0..4u64 {
        let pd = PDE_ADDR + gib * 0x1000;
        mem.write_obj(pd | PRESENT_WRITABLE, GuestAddress(PDPTE_ADDR + gib * 8))?;
        let mut table = [0u8; 4096];
        for (i, chunk) in table.chunks_exact_mut(8).enumerate() {
            let addr = (gib << 30) | ((i as u64) << 21);
            chunk.copy_from_slice(&(addr | PRESENT_WRITABLE | PAGE_SIZE_2M).to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(pd))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_the_mmio_hole_identity() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_identity_map(&mem).unwrap();
        // Walk 0xfee0_0000 (LAPIC) by hand.
        let va: u64 = 0xfee0_0000;
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8))
            .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8))
            .unwrap();
        assert_eq!(pde & !0x1fffff, va);
        assert_eq!(pde & 0x83, 0x83);
    }
}
