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
