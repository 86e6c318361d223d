//! A type-0 PCI configuration space: 256 bytes of registers with per-bit write
//! masks, memory BARs with sizing, and a capability list.
//!
//! Everything the guest writes goes through the masks, so read-only fields
//! (IDs, class, capability bytes, BAR size bits) cannot be changed, and accesses
//! past the end or of odd widths are ignored.

/// Number of 32-bit registers in a (non-extended) configuration space.
pub const NUM_REGS: usize = 64;
/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;

const REG_COMMAND: usize = 1;
const REG_CLASS: usize = 2;
const REG_HEADER: usize = 3;
const REG_BAR0: usize = 4;
const REG_SUBSYSTEM: usize = 11;
const REG_CAP_PTR: usize = 13;
const REG_INTERRUPT: usize = 15;

/// Command register bits the guest may change: I/O space, memory space, bus master,
/// INTx disable.
const COMMAND_WRITABLE: u32 = 0x0407;
/// Status bit: a capability list is present.
const STATUS_CAP_LIST: u32 = 1 << 4;
/// Command register bit: memory space decoding enabled.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register bit: bus mastering enabled.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;

/// First byte of the capability area.
pub const CAPABILITY_START: usize = 0x40;

/// Identity of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision.
    pub revision: u8,
    /// Class code (base class, subclass, programming interface).
    pub class: [u8; 3],
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bar {
    size: u64,
}

/// A configuration space.
#[derive(Debug, Clone)]
pub struct PciConfig {
    regs: [u32; NUM_REGS],
    wmask: [u32; NUM_REGS],
    bars: [Bar; NUM_BARS],
    next_cap: usize,
    last_cap_ptr: usize,
}

/// Errors while building a configuration space (programming errors of the VMM, not
/// guest input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciConfigError {
    /// The BAR index is out of range or already used.
    #[error("BAR {0} is invalid or already in use")]
    BadBar(usize),
    /// The BAR size is not a power of two of at least 16 bytes, or too big.
    #[error("BAR size {0:#x} is not a power of two between 16 bytes and 2 GiB")]
    BadBarSize(u64),
    /// The capability does not fit in the configuration space.
    #[error("capability of {0} bytes does not fit")]
    NoRoom(usize),
}

impl PciConfig {
    /// A type-0 header with `ids`, no BARs and no capabilities.
    pub fn new(ids: PciIds) -> Self {
        let mut regs = [0u32; NUM_REGS];
        let mut wmask = [0u32; NUM_REGS];
        regs[0] = u32::from(ids.vendor) | (u32::from(ids.device) << 16);
        wmask[REG_COMMAND] = COMMAND_WRITABLE;
        regs[REG_CLASS] = u32::from(ids.revision)
            | (u32::from(ids.class[2]) << 8)
            | (u32::from(ids.class[1]) << 16)
            | (u32::from(ids.class[0]) << 24);
        // Cache line size and latency timer are writable scratch registers.
        wmask[REG_HEADER] = 0x0000_ffff;
        regs[REG_SUBSYSTEM] = u32::from(ids.subsystem_vendor) | (u32::from(ids.subsystem) << 16);
        // Interrupt line is scratch for the OS; interrupt pin 0 (no INTx).
        wmask[REG_INTERRUPT] = 0xff;
        Self {
            regs,
            wmask,
            bars: [Bar::default(); NUM_BARS],
            next_cap: CAPABILITY_START,
            last_cap_ptr: REG_CAP_PTR * 4,
        }
    }

    /// Declares BAR `index` as a 32-bit, non-prefetchable memory BAR of `size` bytes
    /// at `addr` (which must be aligned to `size`).
    pub fn add_memory_bar32(
        &mut self,
        index: usize,
        size: u64,
        addr: u32,
    ) -> Result<(), PciConfigError> {
        if index >= NUM_BARS || self.bars[index].size != 0 {
            return Err(PciConfigError::BadBar(index));
        }
        if !size.is_power_of_two() || !(16..=(1 << 31)).contains(&size) {
            return Err(PciConfigError::BadBarSize(size));
        }
        self.bars[index].size = size;
        let mask = !((size - 1) as u32) & 0xffff_fff0;
        self.wmask[REG_BAR0 + index] = mask;
        self.regs[REG_BAR0 + index] = addr & mask;
        Ok(())
    }

    /// The address BAR `index` currently decodes (None if the BAR is unused).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index)?;
        (bar.size != 0).then(|| u64::from(self.regs[REG_BAR0 + index] & 0xffff_fff0))
    }

    /// Size of BAR `index` (0 if unused).
    pub fn bar_size(&self, index: usize) -> u64 {
        self.bars.get(index).map_or(0, |b| b.size)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[REG_COMMAND] as u16
    }

    /// Appends a capability whose body (after the ID and next-pointer bytes) is
    /// `body`; `writable` gives write masks for the body bytes (same length or
    /// shorter: missing bytes are read-only). Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, PciConfigError> {
        let len = (body.len() + 2 + 3) & !3;
        let offset = self.next_cap;
        if offset + len > NUM_REGS * 4 {
            return Err(PciConfigError::NoRoom(len));
        }
        self.set_byte(offset, id);
        self.set_byte(offset + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + 2 + i, *b);
        }
        for (i, m) in writable.iter().enumerate().take(body.len()) {
            let at = offset + 2 + i;
            let shift = (at % 4) * 8;
            self.wmask[at / 4] |= u32::from(*m) << shift;
        }
        // Link it from the previous capability (or the capabilities pointer).
        self.set_byte(self.last_cap_ptr, offset as u8);
        self.last_cap_ptr = offset + 1;
        self.regs[REG_COMMAND] |= STATUS_CAP_LIST << 16;
        self.next_cap = offset + len;
        Ok(offset)
    }

    fn set_byte(&mut self, at: usize, value: u8) {
        if let Some(reg) = self.regs.get_mut(at / 4) {
            let shift = (at % 4) * 8;
            *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
        }
    }

    /// Reads the byte at `at` (0xff past the end).
    pub fn byte(&self, at: usize) -> u8 {
        self.regs
            .get(at / 4)
            .map_or(0xff, |r| (r >> ((at % 4) * 8)) as u8)
    }

    /// Reads register `reg` (all ones past the end).
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Sets register `reg` regardless of masks (for the device model itself).
    pub fn set_reg(&mut self, reg: usize, value: u32) {
        if let Some(r) = self.regs.get_mut(reg) {
            *r = value;
        }
    }

    /// Applies a guest write of `data` at byte `offset` (any width up to 4 bytes,
    /// not crossing a register). Returns the register index written, if any.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Option<usize> {
        let reg = offset / 4;
        let byte = offset % 4;
        if reg >= NUM_REGS || data.is_empty() || byte + data.len() > 4 {
            return None;
        }
        let mut value = 0u32;
        let mut lanes = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << ((byte + i) * 8);
            lanes |= 0xff << ((byte + i) * 8);
        }
        let mask = self.wmask[reg] & lanes;
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
        Some(reg)
    }

    /// Reads `data.len()` bytes (1, 2 or 4, not crossing a register) at `offset`.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        let value = self.read_reg(offset / 4);
        let byte = offset % 4;
        for (i, d) in data.iter_mut().enumerate() {
            *d = if byte + i < 4 {
                (value >> ((byte + i) * 8)) as u8
            } else {
                0xff
            };
        }
    }

    /// Which BAR register `reg` is, if it is one.
    pub fn bar_index(reg: usize) -> Option<usize> {
        (REG_BAR0..REG_BAR0 + NUM_BARS)
            .contains(&reg)
            .then(|| reg - REG_BAR0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: [0x01, 0x00, 0x00],
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    #[test]
    fn ids_are_read_only() {
        let mut c = PciConfig::new(ids());
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.read_reg(2) >> 24, 0x01);
    }

    #[test]
    fn bar_sizing_returns_the_size_mask_and_restores() {
        let mut c = PciConfig::new(ids());
        c.add_memory_bar32(0, 0x8000, 0xc000_0000).unwrap();
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
        c.write(0x10, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_reg(4), 0xffff_8000);
        c.write(0x10, &0xc000_0000u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
        // Unused BARs read as zero and ignore writes.
        c.write(0x14, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_reg(5), 0);
        assert_eq!(c.bar_address(1), None);
    }

    #[test]
    fn bad_bars_are_rejected() {
        let mut c = PciConfig::new(ids());
        assert_eq!(
            c.add_memory_bar32(6, 0x1000, 0),
            Err(PciConfigError::BadBar(6))
        );
        assert_eq!(
            c.add_memory_bar32(0, 0x1001, 0),
            Err(PciConfigError::BadBarSize(0x1001))
        );
        c.add_memory_bar32(0, 0x1000, 0).unwrap();
        assert_eq!(
            c.add_memory_bar32(0, 0x1000, 0),
            Err(PciConfigError::BadBar(0))
        );
    }

    #[test]
    fn capabilities_are_chained_and_masked() {
        let mut c = PciConfig::new(ids());
        let a = c.add_capability(0x11, &[1, 2], &[0xff, 0]).unwrap();
        let b = c.add_capability(0x09, &[3, 4, 5], &[]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x44);
        assert_eq!(c.byte(0x34), 0x40);
        assert_eq!(c.byte(0x41), 0x44);
        assert_eq!(c.byte(0x45), 0);
        assert_ne!(c.read_reg(1) & (STATUS_CAP_LIST << 16), 0);
        c.write(0x42, &[0xaa, 0xbb]);
        assert_eq!(c.byte(0x42), 0xaa, "writable byte");
        assert_eq!(c.byte(0x43), 2, "read-only byte");
    }

    #[test]
    fn out_of_range_and_odd_accesses_are_ignored() {
        let mut c = PciConfig::new(ids());
        assert_eq!(c.write(256, &[1]), None);
        assert_eq!(c.write(3, &[1, 2]), None);
        assert_eq!(c.write(0, &[]), None);
        let mut d = [0u8; 4];
        c.read(1000, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut d = [0u8; 2];
        c.read(3, &mut d);
        assert_eq!(d[1], 0xff);
    }

    #[test]
    fn command_register_masks_reserved_bits() {
        let mut c = PciConfig::new(ids());
        c.write(4, &[0xff, 0xff]);
        assert_eq!(c.command(), 0x0407);
    }
}
