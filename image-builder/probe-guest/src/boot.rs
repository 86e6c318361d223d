//! What the loader handed over: the Linux zero page or the PVH start info.

use crate::phys::{self, read, size_u64};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

// Linux `struct boot_params` (the zero page) offsets.
/// `e820_entries` (u8).
const ZP_E820_ENTRIES: u64 = 0x1e8;
/// `hdr.cmd_line_ptr` (u32).
const ZP_CMD_LINE_PTR: u64 = 0x228;
/// `hdr.cmdline_size` (u32).
const ZP_CMDLINE_SIZE: u64 = 0x238;
/// `e820_table` (array of packed 20-byte entries).
const ZP_E820_TABLE: u64 = 0x2d0;
/// Capacity of `e820_table` in the zero page.
const ZP_E820_MAX: u32 = 128;
/// Size of one zero-page e820 entry: addr u64, size u64, type u32.
const ZP_E820_STRIDE: u64 = 20;

// Xen `struct hvm_start_info` offsets (PVH boot).
/// `magic` (u32).
const PVH_MAGIC_OFF: u64 = 0;
/// `cmdline_paddr` (u64).
const PVH_CMDLINE_PADDR: u64 = 24;
/// `memmap_paddr` (u64, version >= 1).
const PVH_MEMMAP_PADDR: u64 = 40;
/// `memmap_entries` (u32, version >= 1).
const PVH_MEMMAP_ENTRIES: u64 = 48;
/// Value of `magic`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// Size of one `hvm_memmap_table_entry`: addr u64, size u64, type u32, reserved u32.
const PVH_MEMMAP_STRIDE: u64 = 24;
/// Most memory map entries we look at.
const PVH_MEMMAP_MAX: u32 = 128;

/// Longest command line read, whatever the loader claims.
const CMDLINE_MAX: usize = 4096;
/// Addresses the boot structures may live at: the identity map covers 4 GiB.
const MAPPED_LIMIT: u64 = 1 << 32;

/// Which entry point and boot protocol started the guest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BootKind {
    /// Linux 64-bit boot protocol: RSI points at the zero page.
    Linux64,
    /// PVH: the 32-bit entry from the Xen ELF note, with `hvm_start_info`.
    Pvh,
}

impl BootKind {
    /// Name printed in the `boot=` line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Linux64 => "linux64",
            Self::Pvh => "pvh",
        }
    }
}

/// One memory map entry.
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// e820 type (1 = RAM, 2 = reserved, ...).
    pub kind: u32,
}

/// A memory map table in guest memory, read in place.
pub struct MemMap {
    base: u64,
    count: u32,
    stride: u64,
}

impl MemMap {
    /// The entries, in table order.
    pub fn iter(&self) -> impl Iterator<Item = E820Entry> + '_ {
        (0..u64::from(self.count)).map(move |i| {
            let at = self.base + i * self.stride;
            // SAFETY: `BootInfo::from_entry` checked that the table lies in the
            // identity map, and its caller vouched that it is loader-provided
            // memory; integers have no invalid bit patterns.
            unsafe {
                E820Entry {
                    addr: read::<u64>(at),
                    size: read::<u64>(at + size_u64::<u64>()),
                    kind: read::<u32>(at + 2 * size_u64::<u64>()),
                }
            }
        })
    }
}

/// Boot information, whichever protocol delivered it.
pub struct BootInfo {
    /// Boot protocol.
    pub kind: BootKind,
    /// Kernel command line, without the terminating NUL.
    pub cmdline: &'static [u8],
    /// Memory map.
    pub e820: MemMap,
}

impl BootInfo {
    /// Reads the boot information from the entry registers: `rsi` is the zero
    /// page address (Linux 64-bit boot), or 0 with the PVH start info at `rbx`.
    /// Returns `None` if neither is usable.
    ///
    /// # Safety
    ///
    /// A non-zero `rsi` must be the zero page set up by the loader; with `rsi`
    /// 0, `rbx` must be 0 or the PVH start info. The structures and all they
    /// point to must stay unchanged for the rest of the guest's life.
    pub unsafe fn from_entry(rsi: u64, rbx: u64) -> Option<Self> {
        if rsi != 0 && rsi < MAPPED_LIMIT {
            // SAFETY: forwarded from the caller.
            Some(unsafe { Self::from_zero_page(rsi) })
        } else if rsi == 0 && rbx != 0 && rbx < MAPPED_LIMIT {
            // SAFETY: forwarded from the caller.
            unsafe { Self::from_pvh(rbx) }
        } else {
            None
        }
    }

    /// # Safety
    ///
    /// As for [`Self::from_entry`], with `zp` the zero page.
    unsafe fn from_zero_page(zp: u64) -> Self {
        // SAFETY: the caller guarantees `zp` is the loader's zero page, a 4 KiB
        // page of plain integers.
        let (entries, cmd_ptr, cmd_size) = unsafe {
            (
                read::<u8>(zp + ZP_E820_ENTRIES),
                read::<u32>(zp + ZP_CMD_LINE_PTR),
                read::<u32>(zp + ZP_CMDLINE_SIZE),
            )
        };
        // SAFETY: the loader wrote the NUL-terminated command line there.
        let cmdline = unsafe { phys::c_str(u64::from(cmd_ptr), cmdline_max(cmd_size)) };
        Self {
            kind: BootKind::Linux64,
            cmdline,
            e820: MemMap {
                base: zp + ZP_E820_TABLE,
                count: u32::from(entries).min(ZP_E820_MAX),
                stride: ZP_E820_STRIDE,
            },
        }
    }

    /// # Safety
    ///
    /// As for [`Self::from_entry`], with `si` the PVH start info.
    unsafe fn from_pvh(si: u64) -> Option<Self> {
        // SAFETY: the caller guarantees `si` is the loader's hvm_start_info:
        // plain integers, at least 56 bytes for version 1.
        let (magic, cmd_ptr, map_ptr, map_entries) = unsafe {
            (
                read::<u32>(si + PVH_MAGIC_OFF),
                read::<u64>(si + PVH_CMDLINE_PADDR),
                read::<u64>(si + PVH_MEMMAP_PADDR),
                read::<u32>(si + PVH_MEMMAP_ENTRIES),
            )
        };
        if magic != PVH_MAGIC {
            return None;
        }
        let cmdline = if cmd_ptr < MAPPED_LIMIT {
            // SAFETY: the loader wrote the NUL-terminated command line there.
            unsafe { phys::c_str(cmd_ptr, CMDLINE_MAX) }
        } else {
            &[]
        };
        let count = if map_ptr != 0 && map_ptr < MAPPED_LIMIT {
            map_entries.min(PVH_MEMMAP_MAX)
        } else {
            0
        };
        Some(Self {
            kind: BootKind::Pvh,
            cmdline,
            e820: MemMap {
                base: map_ptr,
                count,
                stride: PVH_MEMMAP_STRIDE,
            },
        })
    }
}

/// Longest command line to read for a zero page `cmdline_size` of `size`.
fn cmdline_max(size: u32) -> usize {
    match usize::try_from(size) {
        Ok(0) | Err(_) => CMDLINE_MAX,
        Ok(n) => n.min(CMDLINE_MAX),
    }
}
