//! The guest-physical address map keel gives every VM (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT                       0x0000_7000  zero page (Linux boot params)
//! 0x0000_6000  PVH start info + memmap   0x0000_8ff0  initial stack (grows down)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 page directories (4 GiB identity map)
//! 0x0002_0000  kernel command line       0x0009_fc00  EBDA: MP table
//! 0x0010_0000  kernel (HIMEM_START)      ...          initramfs at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: PCI BARs, then IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000  RAM above the hole, when memory is larger than 3 GiB
//! (1 GiB-aligned end of RAM, at least 4 GiB) .. 2^phys_bits: high MMIO window for
//!                64-bit BARs (see [`high_mmio_window`])
//! ```

/// GDT address.
pub const GDT_ADDR: u64 = 0x500;
/// IDT address (an empty IDT is loaded so early faults triple-fault visibly).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info` address.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH memory map address (right after the start info).
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// Maximum PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX: usize = 128;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer handed to the kernel.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_ADDR: u64 = 0xa000;
/// First of four page directories (identity map of 4 GiB with 2 MiB pages).
pub const PDE_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Maximum command line size including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy 1 MiB area; kernels load here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (no RAM from here to 4 GiB).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) inside the hole, below the APICs.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page (real-mode emulation), right below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Smallest guest memory keel accepts.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Number of IOAPIC pins (GSIs 0..24).
pub const IOAPIC_PINS: u32 = 24;
/// Serial port (COM1) base and IRQ.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's IRQ line.
pub const COM1_IRQ: u32 = 4;

/// Alignment of the high MMIO window's start.
pub const HIGH_MMIO_ALIGN: u64 = 1 << 30;
/// Physical address width assumed when CPUID does not report one (leaf 0x80000008
/// missing: the architectural default).
pub const DEFAULT_PHYS_BITS: u8 = 36;

/// The window for 64-bit BARs above guest RAM: from the end of RAM (at least 4 GiB)
/// rounded up to 1 GiB, to the top of the guest's physical address space
/// (`2^phys_bits`, from CPUID 0x80000008 EAX[7:0]). None when RAM leaves no room.
pub fn high_mmio_window(ram_end: u64, phys_bits: u8) -> Option<std::ops::Range<u64>> {
    let top = 1u64.checked_shl(u32::from(phys_bits.clamp(32, 52)))?;
    let start = ram_end
        .max(MMIO_HOLE_END)
        .checked_add(HIGH_MMIO_ALIGN - 1)?
        & !(HIGH_MMIO_ALIGN - 1);
    (start < top).then_some(start..top)
}

/// The guest's physical address width from its CPUID leaves (`(function, eax)`).
pub fn phys_bits(leaves: impl IntoIterator<Item = (u32, u32)>) -> u8 {
    leaves
        .into_iter()
        .find(|&(function, _)| function == 0x8000_0008)
        .map(|(_, eax)| (eax & 0xff) as u8)
        .filter(|&b| b >= 32)
        .unwrap_or(DEFAULT_PHYS_BITS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_high_window_starts_above_ram_and_ends_at_the_address_limit() {
        assert_eq!(high_mmio_window(512 << 20, 39), Some(4 * GIB..1 << 39));
        // 6 GiB of RAM: 3 GiB low, 3 GiB from 4 GiB: RAM ends at 7 GiB.
        assert_eq!(high_mmio_window(7 * GIB, 40), Some(7 * GIB..1 << 40));
        assert_eq!(high_mmio_window(7 * GIB + 1, 40), Some(8 * GIB..1 << 40));
        // RAM up to the limit: no window.
        assert_eq!(high_mmio_window(64 * GIB, 36), None);
        assert_eq!(high_mmio_window(u64::MAX - 5, 52), None);
    }

    #[test]
    fn phys_bits_come_from_cpuid_or_the_default() {
        assert_eq!(phys_bits([(0, 0xd), (0x8000_0008, 0x3030)]), 48);
        assert_eq!(phys_bits([(0x8000_0008, 0x3027)]), 39);
        assert_eq!(phys_bits([(0, 0xd)]), DEFAULT_PHYS_BITS);
        assert_eq!(phys_bits([(0x8000_0008, 0)]), DEFAULT_PHYS_BITS, "garbage");
    }
}
