//! PCI: configuration spaces, the conf1 host bridge, MSI-X, and BAR placement.

pub mod bar_space;
pub mod config;
pub mod msix;
pub mod root;

pub use bar_space::{BarPlaceError, BarSpace};
pub use config::{PciConfig, PciIds};

use std::ops::Range;

/// Where guest-programmed BARs may live (the 32-bit MMIO hole, minus the
/// interrupt controllers).
pub type BarWindow = Range<u64>;
pub use root::{PciFunction, PciRoot, SharedFunction};

/// Carries out a BAR move the guest asked for, in the hypervisor's address maps.
pub trait BarMapper: Send + Sync {
    /// Maps the `len`-byte BAR at `new` instead of `old` (MMIO exits).
    fn move_bar(&self, old: u64, new: u64, len: u64) -> Result<(), String>;
    /// Moves an ioeventfd (a queue-notify register) from `old` to `new`.
    fn move_ioeventfd(
        &self,
        fd: &vmm_sys_util::eventfd::EventFd,
        old: u64,
        new: u64,
    ) -> Result<(), String>;
}

/// Hands out naturally aligned BAR addresses from a window of the 32-bit MMIO hole.
#[derive(Debug, Clone)]
pub struct BarAllocator {
    next: u64,
    end: u64,
}

impl BarAllocator {
    /// Allocates from `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        Self { next: start, end }
    }

    /// Bytes left above the next free address.
    pub fn free(&self) -> u64 {
        self.end.saturating_sub(self.next)
    }

    /// A `size`-aligned range of `size` bytes (size a power of two), or None when the
    /// window is exhausted.
    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        if !size.is_power_of_two() {
            return None;
        }
        let base = self.next.checked_add(size - 1)? & !(size - 1);
        let end = base.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_aligned_and_bounded() {
        let mut a = BarAllocator::new(0xc000_1000, 0xc002_0000);
        assert_eq!(a.allocate(0x8000), Some(0xc000_8000));
        assert_eq!(a.allocate(0x1000), Some(0xc001_0000));
        assert_eq!(a.allocate(0x10000), None);
        assert_eq!(a.allocate(0x3000), None);
    }
}
