//! Parsing the capability list of a device's real configuration space, and the
//! policy of which capabilities a guest sees.
//!
//! Kept (linked into the guest's list, at their original offsets):
//! - Power Management (0x01): read through; only the power state, PME enable and
//!   PME status (write-1-to-clear) bits of PMCSR reach the device.
//! - MSI (0x05) and MSI-X (0x11): fully emulated; the host programs the real ones.
//! - PCI Express (0x10): read through; writes reach only Device Control's error
//!   reporting, relaxed ordering, no-snoop and max-read-request bits, and Device
//!   Status' error bits (write-1-to-clear). Max payload size (must match the
//!   fabric) and Initiate FLR (resets go through VFIO) stay with the host.
//! - Vendor specific (0x09): read through, writes ignored.
//!
//! Everything else (VPD, PCI-X, AF, HyperTransport, ...) is unlinked: it reads as
//! zeros and writes are ignored. Extended capabilities (0x100 and up) are not
//! exposed at all; conf1 cannot reach them anyway.

use super::config::ConfigError;

/// Power Management capability ID.
pub const CAP_PM: u8 = 0x01;
/// MSI capability ID.
pub const CAP_MSI: u8 = 0x05;
/// Vendor-specific capability ID.
pub const CAP_VENDOR: u8 = 0x09;
/// PCI Express capability ID.
pub const CAP_PCIE: u8 = 0x10;
/// MSI-X capability ID.
pub const CAP_MSIX: u8 = 0x11;

/// First byte of the capability area.
const CAP_AREA: usize = 0x40;
/// End of the legacy configuration space.
const LEGACY_END: usize = 0x100;

/// One capability of the real device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// Capability ID.
    pub id: u8,
    /// Offset in configuration space.
    pub offset: usize,
    /// Length in bytes (clamped to the legacy space).
    pub len: usize,
}

impl Capability {
    /// Whether the guest sees this capability.
    pub fn kept(&self) -> bool {
        matches!(self.id, CAP_PM | CAP_MSI | CAP_VENDOR | CAP_PCIE | CAP_MSIX)
    }
}

/// Layout of an MSI capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiCap {
    /// Offset of the capability.
    pub offset: usize,
    /// 64-bit message address.
    pub is_64bit: bool,
    /// Per-vector masking.
    pub maskable: bool,
    /// Vectors the device can request (1, 2, 4, ... 32).
    pub max_vectors: u32,
}

impl MsiCap {
    /// From the message control word at `offset + 2`.
    pub fn new(offset: usize, control: u16) -> Self {
        let mmc = u32::from((control >> 1) & 0x7).min(5);
        Self {
            offset,
            is_64bit: control & (1 << 7) != 0,
            maskable: control & (1 << 8) != 0,
            max_vectors: 1 << mmc,
        }
    }

    /// Offset of the message data register.
    pub fn data_offset(&self) -> usize {
        self.offset + if self.is_64bit { 12 } else { 8 }
    }

    /// Offset of the mask bits register (only if maskable).
    pub fn mask_offset(&self) -> usize {
        self.data_offset() + 4
    }

    /// Length of the capability in bytes.
    pub fn len(&self) -> usize {
        match (self.is_64bit, self.maskable) {
            (false, false) => 10,
            (true, false) => 14,
            (false, true) => 20,
            (true, true) => 24,
        }
    }

    /// Always false: a capability has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Layout of an MSI-X capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCap {
    /// Offset of the capability.
    pub offset: usize,
    /// Number of table entries.
    pub vectors: u32,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u64,
    /// BAR holding the pending-bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR.
    pub pba_offset: u64,
}

impl MsixCap {
    /// From the control word and the table / PBA registers.
    pub fn new(offset: usize, control: u16, table: u32, pba: u32) -> Self {
        Self {
            offset,
            vectors: u32::from(control & 0x7ff) + 1,
            table_bar: (table & 7) as u8,
            table_offset: u64::from(table & !7),
            pba_bar: (pba & 7) as u8,
            pba_offset: u64::from(pba & !7),
        }
    }

    /// Byte length of the table.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * 16
    }

    /// Byte length of the PBA (one bit per vector, in 64-bit words).
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

fn byte(space: &[u8], at: usize) -> u8 {
    space.get(at).copied().unwrap_or(0)
}

fn word(space: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([byte(space, at), byte(space, at + 1)])
}

fn dword(space: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([
        byte(space, at),
        byte(space, at + 1),
        byte(space, at + 2),
        byte(space, at + 3),
    ])
}

/// Known length of a capability, or None when the layout is not known.
fn known_len(space: &[u8], id: u8, offset: usize) -> Option<usize> {
    Some(match id {
        CAP_PM => 8,
        CAP_MSI => MsiCap::new(offset, word(space, offset + 2)).len(),
        CAP_MSIX => 12,
        // Version 2 of the PCIe capability (all current devices) is 0x3c bytes.
        CAP_PCIE if word(space, offset + 2) & 0xf >= 2 => 0x3c,
        CAP_PCIE => 0x24,
        CAP_VENDOR => usize::from(byte(space, offset + 2)).max(3),
        0x03 => 8, // VPD
        0x13 => 6, // Advanced Features
        _ => return None,
    })
}

/// Walks the capability list of `space` (the device's configuration space, at least
/// 256 bytes). Fails on a loop or a pointer outside the capability area.
pub fn parse(space: &[u8]) -> Result<Vec<Capability>, ConfigError> {
    let status = word(space, 6);
    if status & (1 << 4) == 0 {
        return Ok(Vec::new());
    }
    let mut caps: Vec<Capability> = Vec::new();
    let mut next = usize::from(byte(space, 0x34) & 0xfc);
    while next != 0 {
        if !(CAP_AREA..LEGACY_END - 1).contains(&next) {
            return Err(ConfigError::BadCapability(next));
        }
        if caps.iter().any(|c| c.offset == next) || caps.len() >= 48 {
            return Err(ConfigError::CapabilityLoop(next));
        }
        let id = byte(space, next);
        let len = known_len(space, id, next)
            .unwrap_or(4)
            .min(LEGACY_END - next);
        caps.push(Capability {
            id,
            offset: next,
            len,
        });
        next = usize::from(byte(space, next + 1) & 0xfc);
    }
    Ok(caps)
}

/// The MSI capability, if the device has one.
pub fn msi(space: &[u8], caps: &[Capability]) -> Option<MsiCap> {
    caps.iter()
        .find(|c| c.id == CAP_MSI)
        .map(|c| MsiCap::new(c.offset, word(space, c.offset + 2)))
}

/// The MSI-X capability, if the device has one.
pub fn msix(space: &[u8], caps: &[Capability]) -> Option<MsixCap> {
    caps.iter().find(|c| c.id == CAP_MSIX).map(|c| {
        MsixCap::new(
            c.offset,
            word(space, c.offset + 2),
            dword(space, c.offset + 4),
            dword(space, c.offset + 8),
        )
    })
}
