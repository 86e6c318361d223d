//! PCI configuration space through configuration mechanism #1 (ports
//! 0xcf8/0xcfc), bus 0 enumeration, BAR sizing, capabilities and MSI-X.
//!
//! BARs are left where the firmware or VMM put them. Only a memory BAR that
//! is unassigned (0) or out of reach (above 4 GiB, outside our identity map)
//! gets an address, in the 32-bit hole from [`ASSIGN_BASE`] up.

use core::fmt;

use crate::mmio;
use crate::port::{inb, inl, inw, outl, outw};
use crate::serial::Serial;

/// Configuration address port.
const CONFIG_ADDRESS: u16 = 0xcf8;
/// Configuration data port.
const CONFIG_DATA: u16 = 0xcfc;
/// CONFIG_ADDRESS enable bit.
const CONFIG_ENABLE: u32 = 1 << 31;

/// Config space offsets (type 0 and 1 headers).
const CFG_VENDOR: u8 = 0x00;
const CFG_DEVICE: u8 = 0x02;
const CFG_COMMAND: u8 = 0x04;
const CFG_STATUS: u8 = 0x06;
const CFG_CLASS_REV: u8 = 0x08;
const CFG_HEADER_TYPE: u8 = 0x0e;
const CFG_BAR0: u8 = 0x10;
const CFG_SUBSYSTEM: u8 = 0x2e;
const CFG_CAP_PTR: u8 = 0x34;

/// Command register bits.
const CMD_MEMORY: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = 1 << 2;
/// Status register: capabilities list present.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Header type: multi-function device.
const HEADER_MULTI_FUNCTION: u8 = 0x80;

/// Capability ID of MSI-X.
pub const CAP_MSIX: u8 = 0x11;
/// Capability ID of vendor-specific capabilities (virtio uses these).
pub const CAP_VENDOR: u8 = 0x09;

/// Where fallback BAR assignment starts (keel-vmm's 32-bit MMIO hole).
pub const ASSIGN_BASE: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (IOAPIC and LAPIC live above).
pub const ASSIGN_END: u64 = 0xfec0_0000;
/// Everything we can reach through the identity map.
const MAPPED_LIMIT: u64 = 1 << 32;

/// Most functions remembered by [`enumerate`].
pub const MAX_FUNCTIONS: usize = 64;

/// Bus, device, function.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub dev: u8,
    /// Function number (0..8).
    pub func: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.dev, self.func)
    }
}

impl Bdf {
    fn address(self, offset: u8) -> u32 {
        CONFIG_ENABLE
            | (u32::from(self.bus) << 16)
            | (u32::from(self.dev & 0x1f) << 11)
            | (u32::from(self.func & 0x7) << 8)
            | u32::from(offset & 0xfc)
    }

    /// Reads the config dword at `offset` (rounded down to 4).
    pub fn read32(self, offset: u8) -> u32 {
        // SAFETY: conf1 ports: selecting an address and reading the data port
        // has no side effect beyond the config read itself.
        unsafe {
            outl(CONFIG_ADDRESS, self.address(offset));
            inl(CONFIG_DATA)
        }
    }

    /// Reads the config word at `offset` (rounded down to 2).
    pub fn read16(self, offset: u8) -> u16 {
        // SAFETY: as for `read32`, with a word access to the data port.
        unsafe {
            outl(CONFIG_ADDRESS, self.address(offset));
            inw(CONFIG_DATA + u16::from(offset & 2))
        }
    }

    /// Reads the config byte at `offset`.
    pub fn read8(self, offset: u8) -> u8 {
        // SAFETY: as for `read32`, with a byte access to the data port.
        unsafe {
            outl(CONFIG_ADDRESS, self.address(offset));
            inb(CONFIG_DATA + u16::from(offset & 3))
        }
    }

    /// Writes the config dword at `offset` (rounded down to 4).
    pub fn write32(self, offset: u8, value: u32) {
        // SAFETY: config writes only reprogram this PCI function; callers
        // write registers they own (BARs while sizing, command, MSI-X).
        unsafe {
            outl(CONFIG_ADDRESS, self.address(offset));
            outl(CONFIG_DATA, value);
        }
    }

    /// Writes the config word at `offset` (rounded down to 2).
    pub fn write16(self, offset: u8, value: u16) {
        // SAFETY: as for `write32`.
        unsafe {
            outl(CONFIG_ADDRESS, self.address(offset));
            outw(CONFIG_DATA + u16::from(offset & 2), value);
        }
    }

    /// Vendor ID (0xffff: no function).
    pub fn vendor(self) -> u16 {
        self.read16(CFG_VENDOR)
    }

    /// Number of BARs of this function's header type (6, 2 for bridges, 0).
    pub fn bar_count(self) -> u8 {
        match self.read8(CFG_HEADER_TYPE) & 0x7f {
            0 => 6,
            1 => 2,
            _ => 0,
        }
    }

    /// Reads BAR `index`, sizing it (all-ones written with decoding off, then
    /// the original value and command register restored). `None` for an
    /// unimplemented BAR or the upper half of a 64-bit BAR.
    pub fn bar(self, index: u8) -> Option<Bar> {
        if index >= self.bar_count() {
            return None;
        }
        let off = CFG_BAR0 + 4 * index;
        let low = self.read32(off);
        let command = self.read16(CFG_COMMAND);
        // Decoding off while the BAR holds all-ones.
        self.write16(CFG_COMMAND, command & !(CMD_MEMORY | 1));
        let bar = if low & 1 != 0 {
            self.write32(off, 0xffff_ffff);
            let mask = self.read32(off) & !0x3;
            self.write32(off, low);
            let size = u64::from((!mask).wrapping_add(1) & 0xffff);
            Bar {
                index,
                kind: BarKind::Io,
                prefetchable: false,
                addr: u64::from(low & !0x3),
                size: if mask == 0 { 0 } else { size },
            }
        } else {
            let is64 = (low >> 1) & 0x3 == 0x2 && index + 1 < self.bar_count();
            let high = if is64 { self.read32(off + 4) } else { 0 };
            self.write32(off, 0xffff_ffff);
            let mask_low = self.read32(off) & !0xf;
            self.write32(off, low);
            let mask_high = if is64 {
                self.write32(off + 4, 0xffff_ffff);
                let m = self.read32(off + 4);
                self.write32(off + 4, high);
                m
            } else {
                0xffff_ffff
            };
            let mask = (u64::from(mask_high) << 32) | u64::from(mask_low);
            let size = if mask_low == 0 && (!is64 || mask_high == 0) {
                0
            } else {
                (!mask).wrapping_add(1)
            };
            Bar {
                index,
                kind: if is64 { BarKind::Mem64 } else { BarKind::Mem32 },
                prefetchable: low & 0x8 != 0,
                addr: (u64::from(high) << 32) | u64::from(low & !0xf),
                size,
            }
        };
        self.write16(CFG_COMMAND, command);
        (bar.size != 0).then_some(bar)
    }

    /// Points memory BAR `bar` at `addr` (decoding off while it changes).
    fn set_bar(self, bar: &Bar, addr: u64) {
        let off = CFG_BAR0 + 4 * bar.index;
        let command = self.read16(CFG_COMMAND);
        self.write16(CFG_COMMAND, command & !CMD_MEMORY);
        let flags = self.read32(off) & 0xf;
        self.write32(off, (addr as u32 & !0xf) | flags);
        if bar.kind == BarKind::Mem64 {
            self.write32(off + 4, (addr >> 32) as u32);
        }
        self.write16(CFG_COMMAND, command);
    }

    /// Enables memory decoding and bus mastering (DMA, MSI-X writes).
    pub fn enable_memory_and_dma(self) {
        let command = self.read16(CFG_COMMAND);
        self.write16(CFG_COMMAND, command | CMD_MEMORY | CMD_BUS_MASTER);
    }

    /// Capabilities as `(offset, id)`, following the list from 0x34.
    pub fn capabilities(self) -> Capabilities {
        let next = if self.read16(CFG_STATUS) & STATUS_CAP_LIST != 0 {
            self.read8(CFG_CAP_PTR) & 0xfc
        } else {
            0
        };
        Capabilities {
            bdf: self,
            next,
            left: 48,
        }
    }

    /// The address of memory BAR `index`, if implemented and reachable.
    pub fn bar_address(self, index: u8) -> Option<u64> {
        let bar = self.bar(index)?;
        (bar.kind != BarKind::Io && bar.addr != 0 && bar.addr + bar.size <= MAPPED_LIMIT)
            .then_some(bar.addr)
    }
}

/// Iterator over a function's capability list.
pub struct Capabilities {
    bdf: Bdf,
    next: u8,
    /// Loop guard: a config space has room for at most 48 capabilities.
    left: u8,
}

impl Iterator for Capabilities {
    type Item = (u8, u8);

    fn next(&mut self) -> Option<(u8, u8)> {
        if self.next < 0x40 || self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.next;
        let id = self.bdf.read8(at);
        self.next = self.bdf.read8(at + 1) & 0xfc;
        Some((at, id))
    }
}

/// Kind of a BAR.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space.
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (uses the next BAR slot too).
    Mem64,
}

impl BarKind {
    fn name(self) -> &'static str {
        match self {
            Self::Io => "io",
            Self::Mem32 => "mem32",
            Self::Mem64 => "mem64",
        }
    }
}

/// One implemented BAR.
#[derive(Clone, Copy)]
pub struct Bar {
    /// BAR number (0..6).
    pub index: u8,
    /// Space and width.
    pub kind: BarKind,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// Base address as programmed.
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

impl Bar {
    /// Memory BAR that needs an address from us.
    fn needs_address(&self) -> bool {
        self.kind != BarKind::Io && (self.addr == 0 || self.addr + self.size > MAPPED_LIMIT)
    }
}

/// One function found on bus 0.
#[derive(Clone, Copy)]
pub struct Function {
    /// Address.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem ID (virtio device type for transitional devices).
    pub subsystem: u16,
    /// Class code, subclass, programming interface.
    pub class: u32,
}

/// Functions found by [`enumerate`].
pub struct Functions {
    list: [Option<Function>; MAX_FUNCTIONS],
}

impl Functions {
    /// The functions, in bus order.
    pub fn iter(&self) -> impl Iterator<Item = &Function> + '_ {
        self.list.iter().flatten()
    }
}

/// Scans bus 0 (all functions of multi-function devices), prints one line per
/// function followed by one per implemented BAR, and gives addresses to memory BARs that
/// have none (see the module documentation).
/// Scans bus 0. With `reassign`, every memory BAR is moved to a fresh address
/// (exercises a VMM's handling of guest BAR reprogramming).
pub fn enumerate(out: &mut Serial, reassign: bool) -> Functions {
    let mut found = Functions {
        list: [None; MAX_FUNCTIONS],
    };
    let mut count = 0;
    for dev in 0..32u8 {
        let first = Bdf {
            bus: 0,
            dev,
            func: 0,
        };
        if first.vendor() == 0xffff {
            continue;
        }
        let funcs = if first.read8(CFG_HEADER_TYPE) & HEADER_MULTI_FUNCTION != 0 {
            8
        } else {
            1
        };
        for func in 0..funcs {
            let bdf = Bdf { bus: 0, dev, func };
            let vendor = bdf.vendor();
            if vendor == 0xffff {
                continue;
            }
            let function = Function {
                bdf,
                vendor,
                device: bdf.read16(CFG_DEVICE),
                subsystem: if bdf.read8(CFG_HEADER_TYPE) & 0x7f == 0 {
                    bdf.read16(CFG_SUBSYSTEM)
                } else {
                    0
                },
                class: bdf.read32(CFG_CLASS_REV) >> 8,
            };
            if let Some(slot) = found.list.get_mut(count) {
                *slot = Some(function);
                count += 1;
            }
        }
    }
    assign_and_print_bars(out, &found, reassign);
    found
}

/// Prints every function and BAR, and places the memory BARs that need an
/// address in the first gap of the hole that no other BAR uses.
fn assign_and_print_bars(out: &mut Serial, found: &Functions, reassign: bool) {
    let mut used = Ranges {
        list: [(0, 0); MAX_RANGES],
        len: 0,
    };
    for f in found.iter() {
        for bar in bars(f.bdf) {
            if !bar.needs_address() && bar.addr < ASSIGN_END && bar.addr + bar.size > ASSIGN_BASE {
                used.add(bar.addr, bar.size);
            }
        }
    }
    for f in found.iter() {
        say!(
            out,
            "pci {} vendor={:04x} device={:04x} class={:06x}",
            f.bdf,
            f.vendor,
            f.device,
            f.class
        );
        for bar in bars(f.bdf) {
            say!(
                out,
                "pci {} bar{} {}{} addr={:#x} size={:#x}",
                f.bdf,
                bar.index,
                bar.kind.name(),
                if bar.prefetchable { " pref" } else { "" },
                bar.addr,
                bar.size
            );
            let move_it = reassign && bar.kind != BarKind::Io;
            if !bar.needs_address() && !move_it {
                continue;
            }
            let Some(addr) = used.find_gap(bar.size.max(16)) else {
                say!(out, "pci {} bar{} no room to assign", f.bdf, bar.index);
                continue;
            };
            f.bdf.set_bar(&bar, addr);
            used.add(addr, bar.size);
            say!(
                out,
                "pci assigned bar {} bar{} addr={:#x} size={:#x}",
                f.bdf,
                bar.index,
                addr,
                bar.size
            );
        }
    }
}

/// Most BAR ranges tracked during assignment.
const MAX_RANGES: usize = 64;

/// Address ranges `(start, size)` taken in the hole.
struct Ranges {
    list: [(u64, u64); MAX_RANGES],
    len: usize,
}

impl Ranges {
    fn add(&mut self, start: u64, size: u64) {
        if let Some(slot) = self.list.get_mut(self.len) {
            *slot = (start, size);
            self.len += 1;
        }
    }

    /// Lowest `size`-aligned address in the hole where `size` bytes overlap
    /// no taken range.
    fn find_gap(&self, size: u64) -> Option<u64> {
        let mut at = ASSIGN_BASE.next_multiple_of(size);
        while at + size <= ASSIGN_END {
            let clash = self.list[..self.len]
                .iter()
                .find(|&&(start, len)| at < start + len && start < at + size);
            match clash {
                None => return Some(at),
                Some(&(start, len)) => at = (start + len).next_multiple_of(size),
            }
        }
        None
    }
}

/// The implemented BARs of `bdf`, sized (64-bit BARs once).
pub fn bars(bdf: Bdf) -> impl Iterator<Item = Bar> {
    let mut index = 0;
    core::iter::from_fn(move || {
        while index < bdf.bar_count() {
            let at = index;
            // The upper half of a 64-bit BAR is not a BAR of its own.
            let low = bdf.read32(CFG_BAR0 + 4 * at);
            index += if low & 0x7 == 0x4 { 2 } else { 1 };
            if let Some(bar) = bdf.bar(at) {
                return Some(bar);
            }
        }
        None
    })
}

/// MSI-X message control: enable.
const MSIX_ENABLE: u16 = 1 << 15;
/// MSI-X message control: function mask.
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// MSI-X table entry: vector control mask bit.
const MSIX_ENTRY_MASKED: u32 = 1;

/// A function's MSI-X capability, with its table located in memory.
pub struct MsiX {
    bdf: Bdf,
    cap: u8,
    /// Number of table entries.
    pub table_size: u16,
    table: u64,
}

impl MsiX {
    /// Finds the MSI-X capability of `bdf` and its table (memory decoding
    /// must be enabled for the table to be used).
    pub fn find(bdf: Bdf) -> Option<Self> {
        let (cap, _) = bdf.capabilities().find(|&(_, id)| id == CAP_MSIX)?;
        let control = bdf.read16(cap + 2);
        let table = bdf.read32(cap + 4);
        let base = bdf.bar_address((table & 0x7) as u8)?;
        Some(Self {
            bdf,
            cap,
            table_size: (control & 0x7ff) + 1,
            table: base + u64::from(table & !0x7),
        })
    }

    /// Turns MSI-X on with the whole function masked, for programming.
    pub fn enable_masked(&self) {
        let control = self.bdf.read16(self.cap + 2);
        self.bdf
            .write16(self.cap + 2, control | MSIX_ENABLE | MSIX_FUNCTION_MASK);
    }

    /// Clears the function mask (entries are delivered as programmed).
    pub fn unmask_function(&self) {
        let control = self.bdf.read16(self.cap + 2);
        self.bdf
            .write16(self.cap + 2, (control | MSIX_ENABLE) & !MSIX_FUNCTION_MASK);
    }

    /// Turns MSI-X off.
    pub fn disable(&self) {
        let control = self.bdf.read16(self.cap + 2);
        self.bdf
            .write16(self.cap + 2, control & !(MSIX_ENABLE | MSIX_FUNCTION_MASK));
    }

    /// Programs entry `index` with `address` / `data`, unmasked. Returns
    /// false if there is no such entry.
    pub fn set_entry(&self, index: u16, address: u64, data: u32) -> bool {
        if index >= self.table_size {
            return false;
        }
        let entry = self.table + 16 * u64::from(index);
        // SAFETY: `entry` is inside the MSI-X table of this function (index
        // checked against the table size), in a BAR the identity map covers;
        // the table is only written here.
        unsafe {
            mmio::write32(entry + 12, MSIX_ENTRY_MASKED);
            mmio::write32(entry, address as u32);
            mmio::write32(entry + 4, (address >> 32) as u32);
            mmio::write32(entry + 8, data);
            mmio::write32(entry + 12, 0);
        }
        true
    }
}
