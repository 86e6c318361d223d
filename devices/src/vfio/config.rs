//! The configuration space a guest sees for a passed-through function.
//!
//! Every 32-bit register has a policy, fixed when the device is opened:
//! `emul` bits read from the virtual copy (`virt`), the others from the device;
//! guest writes change the `wmask` bits of the virtual copy and reach the device
//! only for `pass` bits (read-modify-write of the touched bytes) and `w1c` bits
//! (write-1-to-clear status bits, forwarded as written, never as read back).
//!
//! What the guest gets:
//! - IDs, class, subsystem IDs: the device's, read-only. The header type loses its
//!   multi-function bit (each function is a single-function device on keel's bus);
//!   BIST and the Cardbus pointer read as zero.
//! - Command: memory space, bus master and INTx disable reach the device; all other
//!   bits (I/O space included: I/O BARs are not exposed) read as zero.
//!   Status: read from the device; its error bits are write-1-to-clear.
//! - BARs: emulated (sizing, guest addresses); the device keeps its host addresses.
//!   I/O BARs are hidden; the expansion ROM BAR reads as zero (no ROM).
//! - Interrupt line: scratch for the guest; interrupt pin: the device's, only when
//!   the VMM wired INTx, else 0.
//! - Capabilities: see [`super::caps`].
//! - Bytes 0x40–0xff outside any capability (vendor-specific registers): read from
//!   the device, writes ignored. Extended space (0x100–0xfff): zeros.
//! - Accesses of widths other than 1, 2, 4, crossing a dword, or past the end:
//!   writes ignored, reads all ones.

use super::backend::{VfioBackend, CONFIG_REGION};
use super::caps::{self, Capability, MsiCap, MsixCap, CAP_PCIE, CAP_PM};

/// Size of the (extended) configuration space.
pub const CONFIG_SIZE: usize = 4096;
/// Size of the legacy configuration space (all that conf1 reaches).
pub const LEGACY_SIZE: usize = 256;
/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;

const REG_COMMAND: usize = 1;
const REG_BAR0: usize = 4;
const REG_CAP_PTR: usize = 13;
/// Register (dword index) of interrupt line (byte 0) and pin (byte 1).
pub const REG_INTERRUPT: usize = 15;

/// Command bits that reach the device: memory space, bus master, INTx disable.
pub const COMMAND_PASS: u32 = 0x0406;
/// Command bit: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Status error bits (parity, signalled/received aborts, SERR, parity error):
/// write-1-to-clear.
const STATUS_W1C: u32 = 0xf900 << 16;
const STATUS_CAP_LIST: u32 = 1 << (16 + 4);

/// Errors in a device's configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Fewer than 256 bytes were read.
    #[error("configuration space is {0} bytes, expected at least 256")]
    TooShort(usize),
    /// Not a type-0 (endpoint) header.
    #[error(
        "header type {0:#x} is not a type-0 endpoint header (bridges cannot be passed through)"
    )]
    NotEndpoint(u8),
    /// A capability pointer points outside 0x40..0xff.
    #[error("capability pointer {0:#x} is outside the capability area")]
    BadCapability(usize),
    /// The capability list loops.
    #[error("capability list loops at {0:#x}")]
    CapabilityLoop(usize),
    /// A 64-bit BAR in the last BAR slot.
    #[error("BAR {0} is 64-bit but has no upper half")]
    BadBar(usize),
}

/// Kind of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BarKind {
    /// Not implemented by the device (or the upper half of a 64-bit BAR).
    #[default]
    Unused,
    /// I/O space (not exposed to the guest).
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (this BAR and the next).
    Mem64,
}

/// One BAR as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BarDesc {
    /// Kind.
    pub kind: BarKind,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// Size in bytes (a power of two; 0 if unused).
    pub size: u64,
    /// Guest address the VMM placed it at.
    pub addr: u64,
}

impl BarDesc {
    /// Whether this is a memory BAR the guest sees.
    pub fn is_memory(&self) -> bool {
        matches!(self.kind, BarKind::Mem32 | BarKind::Mem64) && self.size != 0
    }
}

/// The BARs of a device from its configuration space and its VFIO region sizes,
/// not yet placed (addresses 0). Sizes that are not powers of two are rounded up.
pub fn describe_bars(
    space: &[u8],
    sizes: [u64; NUM_BARS],
) -> Result<[BarDesc; NUM_BARS], ConfigError> {
    let mut bars = [BarDesc::default(); NUM_BARS];
    let mut i = 0;
    while i < NUM_BARS {
        let raw = read_dword(space, 0x10 + 4 * i);
        let size = sizes[i];
        if size == 0 {
            i += 1;
            continue;
        }
        let size = size.next_power_of_two();
        if raw & 1 == 1 {
            bars[i] = BarDesc {
                kind: BarKind::Io,
                prefetchable: false,
                size,
                addr: 0,
            };
        } else {
            let is_64 = (raw >> 1) & 3 == 2;
            if is_64 && i + 1 >= NUM_BARS {
                return Err(ConfigError::BadBar(i));
            }
            bars[i] = BarDesc {
                kind: if is_64 {
                    BarKind::Mem64
                } else {
                    BarKind::Mem32
                },
                prefetchable: raw & 8 != 0,
                size: size.max(16),
                addr: 0,
            };
            if is_64 {
                i += 1;
            }
        }
        i += 1;
    }
    Ok(bars)
}

fn read_dword(space: &[u8], at: usize) -> u32 {
    let b = |i: usize| u32::from(space.get(at + i).copied().unwrap_or(0));
    b(0) | (b(1) << 8) | (b(2) << 16) | (b(3) << 24)
}

#[derive(Debug, Clone, Copy, Default)]
struct Reg {
    virt: u32,
    emul: u32,
    wmask: u32,
    pass: u32,
    w1c: u32,
}

impl Reg {
    fn virtual_ro(value: u32) -> Self {
        Self {
            virt: value,
            emul: !0,
            ..Self::default()
        }
    }
}

/// The guest's view of a passed-through function's configuration space.
#[derive(Debug, Clone)]
pub struct VfioConfig {
    regs: Vec<Reg>,
    caps: Vec<Capability>,
    bars: [BarDesc; NUM_BARS],
    msi: Option<MsiCap>,
    msix: Option<MsixCap>,
}

fn lanes(offset: usize, len: usize) -> u32 {
    let mut m = 0u32;
    for i in 0..len {
        m |= 0xff << ((offset % 4 + i) * 8);
    }
    m
}

fn valid_access(offset: usize, len: usize, size: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset % 4 + len <= 4 && offset + len <= size
}

impl VfioConfig {
    /// Builds the guest view from the device's configuration space `space` (256 or
    /// 4096 bytes), the placed BARs, and the interrupt line to advertise when INTx
    /// is wired (None: no INTx, interrupt pin 0).
    pub fn new(
        space: &[u8],
        bars: [BarDesc; NUM_BARS],
        intx_line: Option<u8>,
    ) -> Result<Self, ConfigError> {
        if space.len() < LEGACY_SIZE {
            return Err(ConfigError::TooShort(space.len()));
        }
        let header = space[0x0e] & 0x7f;
        if header != 0 {
            return Err(ConfigError::NotEndpoint(header));
        }
        let size = if space.len() >= CONFIG_SIZE {
            CONFIG_SIZE
        } else {
            LEGACY_SIZE
        };
        let caps = caps::parse(space)?;
        let kept: Vec<Capability> = caps.iter().copied().filter(Capability::kept).collect();
        let msi = caps::msi(space, &caps);
        let msix = caps::msix(space, &caps);

        let mut regs = vec![Reg::virtual_ro(0); size / 4];
        let snap = |reg: usize| read_dword(space, reg * 4);
        regs[0] = Reg::virtual_ro(snap(0));
        regs[REG_COMMAND] = Reg {
            virt: if kept.is_empty() { 0 } else { STATUS_CAP_LIST },
            emul: (0xffff & !COMMAND_PASS) | STATUS_CAP_LIST,
            wmask: 0,
            pass: COMMAND_PASS,
            w1c: STATUS_W1C,
        };
        regs[2] = Reg::virtual_ro(snap(2));
        // Cache line size and latency timer: guest scratch. Header type without the
        // multi-function bit. BIST: 0.
        regs[3] = Reg {
            virt: snap(3) & 0x007f_ffff,
            emul: !0,
            wmask: 0xffff,
            ..Reg::default()
        };
        regs[11] = Reg::virtual_ro(snap(11));
        // Cardbus (10), ROM (12) and reserved (14) stay zero and read-only.
        let first = kept.first().map_or(0, |c| c.offset as u32);
        regs[REG_CAP_PTR] = Reg::virtual_ro(first);
        let pin = intx_line.map_or(0, |_| u32::from(space[0x3d].clamp(1, 4)));
        regs[REG_INTERRUPT] = Reg {
            virt: u32::from(intx_line.unwrap_or(0)) | (pin << 8),
            emul: !0,
            wmask: 0xff,
            ..Reg::default()
        };

        let mut config = Self {
            regs,
            caps: caps.clone(),
            bars,
            msi,
            msix,
        };
        config.program_bars();
        config.program_caps(space, &kept);
        Ok(config)
    }

    fn program_bars(&mut self) {
        let bars = self.bars;
        for (i, bar) in bars.iter().enumerate() {
            let reg = REG_BAR0 + i;
            match bar.kind {
                BarKind::Mem32 => {
                    let mask = !((bar.size - 1) as u32) & 0xffff_fff0;
                    self.regs[reg] = Reg {
                        virt: (bar.addr as u32 & mask) | (u32::from(bar.prefetchable) << 3),
                        emul: !0,
                        wmask: mask,
                        ..Reg::default()
                    };
                }
                BarKind::Mem64 => {
                    let mask = !(bar.size - 1) & !0xf;
                    self.regs[reg] = Reg {
                        virt: (bar.addr & mask) as u32 | 0b100 | (u32::from(bar.prefetchable) << 3),
                        emul: !0,
                        wmask: mask as u32,
                        ..Reg::default()
                    };
                    if let Some(hi) = self.regs.get_mut(reg + 1) {
                        *hi = Reg {
                            virt: ((bar.addr & mask) >> 32) as u32,
                            emul: !0,
                            wmask: (mask >> 32) as u32,
                            ..Reg::default()
                        };
                    }
                }
                // I/O BARs are hidden; the upper half of a 64-bit BAR was set above.
                BarKind::Io | BarKind::Unused => {}
            }
        }
    }

    fn set_byte_policy(&mut self, at: usize, virt: Option<u8>) {
        let Some(reg) = self.regs.get_mut(at / 4) else {
            return;
        };
        let shift = (at % 4) * 8;
        match virt {
            Some(v) => {
                reg.virt = (reg.virt & !(0xff << shift)) | (u32::from(v) << shift);
                reg.emul |= 0xff << shift;
            }
            None => reg.emul &= !(0xff << shift),
        }
    }

    fn program_caps(&mut self, space: &[u8], kept: &[Capability]) {
        // Capability area: read through by default (vendor-specific registers).
        for at in 0x40..LEGACY_SIZE {
            self.set_byte_policy(at, None);
        }
        // Hidden capabilities read as zeros.
        for cap in self.caps.clone().iter().filter(|c| !c.kept()) {
            for at in cap.offset..cap.offset + cap.len {
                self.set_byte_policy(at, Some(0));
            }
        }
        for (i, cap) in kept.iter().enumerate() {
            let next = kept.get(i + 1).map_or(0, |n| n.offset as u8);
            self.set_byte_policy(cap.offset + 1, Some(next));
            match cap.id {
                CAP_PM => {
                    // PMCSR: power state, PME enable; PME status is write-1-to-clear.
                    let reg = &mut self.regs[(cap.offset + 4) / 4];
                    reg.pass = 0x0103;
                    reg.w1c = 0x8000;
                }
                CAP_PCIE => {
                    let ctl = &mut self.regs[(cap.offset + 8) / 4];
                    // Device Control: error reporting enables (0-3), relaxed ordering
                    // (4), no snoop (11), max read request size (12-14).
                    ctl.pass = 0x0000_781f;
                    // Device Status: error detected bits, write-1-to-clear.
                    ctl.w1c = 0x000f << 16;
                }
                _ => {}
            }
        }
        if let Some(msi) = self.msi {
            self.emulate_msi(space, msi);
        }
        if let Some(msix) = self.msix {
            let at = msix.offset;
            let next = (self.regs[at / 4].virt >> 8) & 0xff;
            for (b, &v) in space.iter().enumerate().skip(at).take(12) {
                self.set_byte_policy(b, Some(v));
            }
            let reg = &mut self.regs[at / 4];
            // Control starts disabled and unmasked; enable and function mask writable.
            reg.virt = (reg.virt & 0x07ff_00ff) | (next << 8);
            reg.wmask = 0xc000_0000;
        }
    }

    fn emulate_msi(&mut self, space: &[u8], msi: MsiCap) {
        let at = msi.offset;
        let next = (self.regs[at / 4].virt >> 8) & 0xff;
        for b in at..at + msi.len() {
            self.set_byte_policy(b, Some(0));
        }
        let control = u32::from(u16::from_le_bytes([space[at + 2], space[at + 3]])) & 0x018e;
        let head = &mut self.regs[at / 4];
        head.virt = u32::from(space[at]) | (next << 8) | (control << 16);
        // Enable and multiple message enable.
        head.wmask = 0x0071 << 16;
        self.regs[(at + 4) / 4].wmask = 0xffff_fffc;
        if msi.is_64bit {
            self.regs[(at + 8) / 4].wmask = 0xffff_ffff;
        }
        self.regs[msi.data_offset() / 4].wmask = 0xffff;
        if msi.maskable {
            self.regs[msi.mask_offset() / 4].wmask = if msi.max_vectors >= 32 {
                0xffff_ffff
            } else {
                (1u32 << msi.max_vectors) - 1
            };
        }
    }

    /// Size of the space (256 or 4096).
    pub fn size(&self) -> usize {
        self.regs.len() * 4
    }

    /// The device's capabilities (kept and hidden).
    pub fn capabilities(&self) -> &[Capability] {
        &self.caps
    }

    /// The MSI capability.
    pub fn msi(&self) -> Option<MsiCap> {
        self.msi
    }

    /// The MSI-X capability.
    pub fn msix(&self) -> Option<MsixCap> {
        self.msix
    }

    /// The BARs as placed by the VMM.
    pub fn bars(&self) -> &[BarDesc; NUM_BARS] {
        &self.bars
    }

    /// The virtual value of register `reg` (for emulated registers).
    pub fn virt(&self, reg: usize) -> u32 {
        self.regs.get(reg).map_or(!0, |r| r.virt)
    }

    /// The virtual 16-bit value at byte `at`.
    pub fn virt_word(&self, at: usize) -> u16 {
        (self.virt(at / 4) >> ((at % 4) * 8)) as u16
    }

    /// The address the guest programmed into memory BAR `index` (None: not a
    /// memory BAR).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index)?;
        if !bar.is_memory() {
            return None;
        }
        let lo = u64::from(self.virt(REG_BAR0 + index) & 0xffff_fff0);
        let hi = if bar.kind == BarKind::Mem64 {
            u64::from(self.virt(REG_BAR0 + index + 1))
        } else {
            0
        };
        Some(lo | (hi << 32))
    }

    /// Which BAR register `reg` is (the upper half of a 64-bit BAR maps to its
    /// lower BAR's index).
    pub fn bar_of_reg(&self, reg: usize) -> Option<usize> {
        let i = reg.checked_sub(REG_BAR0).filter(|&i| i < NUM_BARS)?;
        if i > 0 && self.bars[i - 1].kind == BarKind::Mem64 {
            return Some(i - 1);
        }
        Some(i)
    }

    /// Reads `data.len()` bytes at `offset`, combining virtual and device bits.
    pub fn read(&self, device: &dyn VfioBackend, offset: usize, data: &mut [u8]) {
        if !valid_access(offset, data.len(), self.size()) {
            data.fill(0xff);
            return;
        }
        let reg = self.regs[offset / 4];
        let lanes = lanes(offset, data.len());
        let value = if reg.emul & lanes == lanes {
            reg.virt
        } else {
            let mut raw = [0u8; 4];
            device.read_region(CONFIG_REGION, (offset & !3) as u64, &mut raw);
            (u32::from_le_bytes(raw) & !reg.emul) | (reg.virt & reg.emul)
        };
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[offset % 4..offset % 4 + data.len()]);
    }

    /// Applies a guest write of `data` at `offset`: updates the virtual bits and
    /// forwards the permitted bits to the device. Returns the register written, or
    /// None when the access was ignored.
    pub fn write(&mut self, device: &dyn VfioBackend, offset: usize, data: &[u8]) -> Option<usize> {
        if !valid_access(offset, data.len(), self.size()) {
            log::debug!(
                "vfio: ignored {}-byte config write at {offset:#x}",
                data.len()
            );
            return None;
        }
        let index = offset / 4;
        let lanes = lanes(offset, data.len());
        let mut value = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << ((offset % 4 + i) * 8);
        }
        let reg = &mut self.regs[index];
        let wmask = reg.wmask & lanes;
        reg.virt = (reg.virt & !wmask) | (value & wmask);
        let pass = reg.pass & lanes;
        let w1c = reg.w1c & lanes;
        if pass | w1c != 0 {
            let mut raw = [0u8; 4];
            device.read_region(CONFIG_REGION, (index * 4) as u64, &mut raw);
            let current = u32::from_le_bytes(raw);
            // Never write back a 1 read from a write-1-to-clear bit.
            let merged = (current & !pass & !reg.w1c) | (value & pass) | (value & w1c);
            // Forward only the bytes that carry device bits.
            let touched: Vec<usize> = (0..4)
                .filter(|b| (pass | w1c) & (0xff << (b * 8)) != 0)
                .collect();
            if let (Some(&lo), Some(&hi)) = (touched.first(), touched.last()) {
                let bytes = merged.to_le_bytes();
                let (lo, hi) = match hi - lo {
                    0 => (lo, hi),
                    1 if lo % 2 == 0 => (lo, hi),
                    _ => (0, 3),
                };
                device.write_region(CONFIG_REGION, (index * 4 + lo) as u64, &bytes[lo..=hi]);
            }
        }
        Some(index)
    }
}
