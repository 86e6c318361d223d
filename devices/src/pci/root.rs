//! The PCI host bridge on configuration mechanism #1 (ports 0xCF8 address, 0xCFC
//! data): bus 0, a host bridge at 00:00.0, and endpoint functions in slots 1..32.

use std::sync::{Arc, Mutex};

use log::debug;

use super::config::{PciConfig, PciIds};
use crate::bus::BusDevice;

/// First I/O port of conf1.
pub const PCI_CONFIG_PORT: u64 = 0xcf8;
/// Number of ports (address dword + data dword).
pub const PCI_CONFIG_PORT_LEN: u64 = 8;

/// A PCI function's configuration-space side.
pub trait PciFunction: Send {
    /// Reads `data.len()` bytes at `offset` of the configuration space.
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// Writes `data` at `offset` of the configuration space.
    fn config_write(&mut self, offset: usize, data: &[u8]);
}

/// A function shared between the PCI root (config space) and the MMIO bus (BARs).
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

struct HostBridge {
    config: PciConfig,
}

impl PciFunction for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
}

/// Bus 0 behind conf1.
pub struct PciRoot {
    address: u32,
    slots: Vec<Option<SharedFunction>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A root with only the host bridge.
    pub fn new() -> Self {
        let bridge = HostBridge {
            config: PciConfig::new(PciIds {
                vendor: 0x8086,
                device: 0x0d57,
                revision: 0,
                class: [0x06, 0x00, 0x00],
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        };
        let mut slots: Vec<Option<SharedFunction>> = (0..32).map(|_| None).collect();
        slots[0] = Some(Arc::new(Mutex::new(bridge)));
        Self { address: 0, slots }
    }

    /// Puts `function` in the first free slot; returns the slot (device number).
    pub fn add(&mut self, function: SharedFunction) -> Option<u8> {
        let slot = self.slots.iter().position(Option::is_none)?;
        self.slots[slot] = Some(function);
        Some(slot as u8)
    }

    /// The function addressed by the current address register, and the register
    /// offset within its configuration space.
    fn target(&self) -> Option<(&SharedFunction, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        let device = ((self.address >> 11) & 0x1f) as usize;
        let function = (self.address >> 8) & 0x7;
        if bus != 0 || function != 0 {
            return None;
        }
        let register = (self.address & 0xfc) as usize;
        self.slots.get(device)?.as_ref().map(|f| (f, register))
    }
}

fn lock(f: &SharedFunction) -> std::sync::MutexGuard<'_, dyn PciFunction + 'static> {
    f.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => {
                let bytes = self.address.to_le_bytes();
                for (i, d) in data.iter_mut().enumerate() {
                    *d = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
                }
            }
            4..=7 => {
                let within = (offset - 4) as usize;
                match self.target() {
                    Some((f, reg)) if within + data.len() <= 4 => {
                        lock(f).config_read(reg + within, data)
                    }
                    _ => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            4..=7 => {
                let within = (offset - 4) as usize;
                match self.target() {
                    Some((f, reg)) if within + data.len() <= 4 => {
                        lock(f).config_write(reg + within, data)
                    }
                    _ => {}
                }
            }
            _ => debug!(
                "pci: ignored {}-byte write at conf1 offset {offset}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(root: &mut PciRoot, device: u32, reg: u32) {
        root.write(0, &(0x8000_0000 | (device << 11) | reg).to_le_bytes());
    }

    fn read32(root: &mut PciRoot) -> u32 {
        let mut d = [0u8; 4];
        root.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn host_bridge_answers_and_empty_slots_read_all_ones() {
        let mut root = PciRoot::new();
        select(&mut root, 0, 0);
        assert_eq!(read32(&mut root), 0x0d57_8086);
        select(&mut root, 5, 0);
        assert_eq!(read32(&mut root), 0xffff_ffff);
        // Disabled address register, other bus, other function.
        root.write(0, &0u32.to_le_bytes());
        assert_eq!(read32(&mut root), 0xffff_ffff);
        root.write(0, &(0x8000_0000u32 | (1 << 16)).to_le_bytes());
        assert_eq!(read32(&mut root), 0xffff_ffff);
        root.write(0, &(0x8000_0000u32 | (1 << 8)).to_le_bytes());
        assert_eq!(read32(&mut root), 0xffff_ffff);
    }

    #[test]
    fn byte_accesses_to_the_data_port_reach_the_right_bytes() {
        let mut root = PciRoot::new();
        select(&mut root, 0, 0);
        let mut b = [0u8; 2];
        root.read(6, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x0d57);
        // Crossing the data dword is refused.
        let mut d = [0u8; 4];
        root.read(6, &mut d);
        assert_eq!(d, [0xff; 4]);
        root.write(7, &[1, 2]);
    }
}
