//! Address-range buses (port I/O and MMIO) that route vCPU exits to devices.
//!
//! A bus is assembled with [`BusBuilder`] and then shared between vCPU threads. Each
//! device is behind its own [`Mutex`], so two vCPUs touching different devices never
//! contend. The range map itself is behind a read-write lock that is only held to
//! look a device up, never while a device runs, so a device may move its own range
//! (a guest reprogramming a PCI BAR) from inside an access without deadlock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use thiserror::Error;

/// A device that answers reads and writes within the address range it was inserted at.
///
/// `offset` is relative to the start of that range; `data` has the access width
/// (1, 2, 4 or 8 bytes). Devices must tolerate any offset and width: both come from
/// the guest.
pub trait BusDevice: Send {
    /// Fills `data` with the value read at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else needs to reach it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors while assembling a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of zero length was inserted.
    #[error("device range at {base:#x} has zero length")]
    EmptyRange {
        /// Start of the range.
        base: u64,
    },
    /// The range wraps around the end of the address space.
    #[error("device range {base:#x}+{len:#x} overflows the address space")]
    Overflow {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// No device range starts at the given address.
    #[error("no device range starts at {0:#x}")]
    NotFound(u64),
    /// The range overlaps one that is already taken.
    #[error("device range {base:#x}+{len:#x} overlaps the range at {other:#x}")]
    Overlap {
        /// Start of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
        /// Start of the range already present.
        other: u64,
    },
}

#[derive(Clone)]
struct Slot {
    len: u64,
    device: SharedDevice,
}

/// Collects device ranges; [`BusBuilder::build`] freezes them into a [`Bus`].
#[derive(Default)]
pub struct BusBuilder {
    slots: BTreeMap<u64, Slot>,
}

impl BusBuilder {
    /// Creates an empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        insert_slot(&mut self.slots, base, Slot { len, device })
    }

    /// Turns the ranges into a bus that can be shared between vCPU threads.
    pub fn build(self) -> Bus {
        Bus {
            slots: RwLock::new(self.slots),
        }
    }
}

fn insert_slot(slots: &mut BTreeMap<u64, Slot>, base: u64, slot: Slot) -> Result<(), BusError> {
    let len = slot.len;
    if len == 0 {
        return Err(BusError::EmptyRange { base });
    }
    let last = base
        .checked_add(len - 1)
        .ok_or(BusError::Overflow { base, len })?;
    if let Some((&other, existing)) = slots.range(..=last).next_back() {
        if other + (existing.len - 1) >= base {
            return Err(BusError::Overlap { base, len, other });
        }
    }
    slots.insert(base, slot);
    Ok(())
}

/// A map from address ranges to devices.
#[derive(Default)]
pub struct Bus {
    slots: RwLock<BTreeMap<u64, Slot>>,
}

impl Bus {
    /// The device at `addr` and its range start; the map lock is released before
    /// the caller touches the device.
    fn find(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        let (&base, slot) = slots.range(..=addr).next_back()?;
        (addr - base < slot.len).then(|| (base, Arc::clone(&slot.device)))
    }

    /// Moves the range starting at `old_base` to start at `new_base`, keeping its
    /// length and device. Fails (and changes nothing) if the new range is invalid or
    /// overlaps another device.
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        let slot = slots
            .remove(&old_base)
            .ok_or(BusError::NotFound(old_base))?;
        let keep = slot.clone();
        match insert_slot(&mut slots, new_base, slot) {
            Ok(()) => Ok(()),
            Err(e) => {
                slots.insert(old_base, keep);
                Err(e)
            }
        }
    }

    /// Reads from the device at `addr`; returns false (and leaves `data` as all ones)
    /// when no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((base, device)) => {
                lock(&device).read(addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((base, device)) => {
                lock(&device).write(addr - base, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if another thread panicked while holding the lock:
/// device state is plain data and a poisoned lock must not take the VM down with it.
pub fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
        fill: u8,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.fill.wrapping_add(offset as u8));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn recorder(fill: u8) -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder {
            last_write: None,
            fill,
        }))
    }

    #[test]
    fn routes_by_range_with_relative_offsets() {
        let a = recorder(0x10);
        let b = recorder(0x20);
        let mut builder = BusBuilder::new();
        builder.insert(0x3f8, 8, a.clone()).unwrap();
        builder.insert(0x60, 5, b.clone()).unwrap();
        let bus = builder.build();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [0x12]);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(b.lock().unwrap().last_write, Some((4, vec![0xfe])));
        assert!(a.lock().unwrap().last_write.is_none());
    }

    #[test]
    fn unclaimed_addresses_read_all_ones() {
        let bus = BusBuilder::new().build();
        let mut data = [0u8; 4];
        assert!(!bus.read(0xcf0, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0xcf0, &[1]));
    }

    #[test]
    fn range_edges() {
        let a = recorder(0);
        let mut builder = BusBuilder::new();
        builder.insert(0x100, 0x10, a).unwrap();
        let bus = builder.build();
        let mut d = [0u8; 1];
        assert!(!bus.read(0xff, &mut d));
        assert!(bus.read(0x100, &mut d));
        assert!(bus.read(0x10f, &mut d));
        assert!(!bus.read(0x110, &mut d));
    }

    #[test]
    fn relocation_moves_a_range_or_changes_nothing() {
        let a = recorder(0x10);
        let b = recorder(0x20);
        let mut builder = BusBuilder::new();
        builder.insert(0x1000, 0x100, a.clone()).unwrap();
        builder.insert(0x2000, 0x100, b).unwrap();
        let bus = builder.build();
        bus.relocate(0x1000, 0x3000).unwrap();
        let mut d = [0u8; 1];
        assert!(!bus.read(0x1000, &mut d));
        assert!(bus.read(0x3001, &mut d));
        assert_eq!(d, [0x11]);
        // Overlapping another device: refused, old range kept.
        assert!(matches!(
            bus.relocate(0x3000, 0x1f80),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.read(0x3000, &mut d));
        assert_eq!(
            bus.relocate(0x5000, 0x6000),
            Err(BusError::NotFound(0x5000))
        );
        assert!(bus.relocate(0x3000, u64::MAX - 1).is_err());
        assert!(bus.read(0x3000, &mut d));
    }

    /// A device that moves its own range from inside an access (like a guest
    /// reprogramming a BAR through the device) must not deadlock the bus.
    #[test]
    fn a_device_may_relocate_itself_during_an_access() {
        struct Mover(Arc<Bus>);
        impl BusDevice for Mover {
            fn read(&mut self, _offset: u64, data: &mut [u8]) {
                data.fill(7);
            }
            fn write(&mut self, _offset: u64, _data: &[u8]) {
                self.0.relocate(0x100, 0x900).unwrap();
            }
        }
        let bus = Arc::new(Bus::default());
        let mover = Arc::new(Mutex::new(Mover(Arc::clone(&bus))));
        {
            let mut slots = bus.slots.write().unwrap();
            insert_slot(
                &mut slots,
                0x100,
                Slot {
                    len: 0x10,
                    device: mover,
                },
            )
            .unwrap();
        }
        assert!(bus.write(0x100, &[1]));
        let mut d = [0u8; 1];
        assert!(bus.read(0x905, &mut d));
        assert_eq!(d, [7]);
    }

    #[test]
    fn rejects_overlap_empty_and_overflow() {
        let mut builder = BusBuilder::new();
        builder.insert(0x100, 0x10, recorder(0)).unwrap();
        assert_eq!(
            builder.insert(0x10f, 1, recorder(0)).err(),
            Some(BusError::Overlap {
                base: 0x10f,
                len: 1,
                other: 0x100
            })
        );
        assert!(builder.insert(0xf8, 0x10, recorder(0)).is_err());
        assert!(builder.insert(0x110, 1, recorder(0)).is_ok());
        assert_eq!(
            builder.insert(0x200, 0, recorder(0)).err(),
            Some(BusError::EmptyRange { base: 0x200 })
        );
        assert!(builder.insert(u64::MAX, 2, recorder(0)).is_err());
    }
}
