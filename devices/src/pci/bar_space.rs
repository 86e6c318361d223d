//! Where BARs go: the 32-bit MMIO hole below 4 GiB, and a high window above guest
//! RAM for 64-bit BARs too large (or too many) for the hole.
//!
//! Policy, per BAR:
//! - 32-bit memory BAR: the hole only (it cannot hold a larger address).
//! - 64-bit prefetchable BAR (GPU apertures, large device memory): the high window
//!   first, the hole if there is no high window or it is full.
//! - 64-bit non-prefetchable BAR (registers): the hole first (some guests and
//!   drivers expect register BARs low), the high window when the hole is full or
//!   the BAR is larger than it.

use std::ops::Range;

use super::{BarAllocator, BarWindow};

/// A BAR that cannot be placed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BarPlaceError {
    /// Sizes of BARs are powers of two.
    #[error("BAR size {0:#x} is not a power of two")]
    BadSize(u64),
    /// No window has room.
    #[error(
        "{} BAR of {size:#x} bytes fits nowhere: the 32-bit MMIO hole {:#x}..{:#x} has \
         {low_free:#x} bytes left{}",
        if *is_64bit { "a 64-bit" } else { "a 32-bit" },
        low.start, low.end,
        match (is_64bit, high) {
            (false, _) => " (a 32-bit BAR cannot live above 4 GiB)".to_owned(),
            (true, None) => "; there is no high MMIO window (guest RAM reaches the \
                             guest's physical address limit)".to_owned(),
            (true, Some(h)) => format!(
                "; the high MMIO window {:#x}..{:#x} (up to the guest's physical address \
                 limit) has {high_free:#x} bytes left", h.start, h.end),
        }
    )]
    NoRoom {
        /// BAR size.
        size: u64,
        /// 64-bit BAR.
        is_64bit: bool,
        /// The 32-bit window.
        low: Range<u64>,
        /// Bytes left there.
        low_free: u64,
        /// The high window, if any.
        high: Option<Range<u64>>,
        /// Bytes left there.
        high_free: u64,
    },
}

/// The BAR windows of a VM.
#[derive(Debug, Clone)]
pub struct BarSpace {
    low_window: BarWindow,
    low: BarAllocator,
    high: Option<(BarWindow, BarAllocator)>,
}

impl BarSpace {
    /// Windows `low` (in the 32-bit hole) and optionally `high` (above RAM).
    pub fn new(low: BarWindow, high: Option<BarWindow>) -> Self {
        Self {
            low: BarAllocator::new(low.start, low.end),
            low_window: low,
            high: high
                .filter(|h| h.start < h.end)
                .map(|h| (h.clone(), BarAllocator::new(h.start, h.end))),
        }
    }

    /// Every window a guest may move a BAR within.
    pub fn windows(&self) -> Vec<BarWindow> {
        let mut w = vec![self.low_window.clone()];
        w.extend(self.high.as_ref().map(|(h, _)| h.clone()));
        w
    }

    /// Places a memory BAR of `size` bytes (a power of two) by the policy above.
    pub fn place(
        &mut self,
        size: u64,
        is_64bit: bool,
        prefetchable: bool,
    ) -> Result<u64, BarPlaceError> {
        if !size.is_power_of_two() {
            return Err(BarPlaceError::BadSize(size));
        }
        let high_first = is_64bit && prefetchable;
        let try_high = |s: &mut Self| {
            s.high
                .as_mut()
                .filter(|_| is_64bit)
                .and_then(|(_, a)| a.allocate(size))
        };
        let placed = if high_first {
            try_high(self).or_else(|| self.low.allocate(size))
        } else {
            self.low.allocate(size).or_else(|| try_high(self))
        };
        if let Some(addr) = placed {
            return Ok(addr);
        }
        Err(BarPlaceError::NoRoom {
            size,
            is_64bit,
            low: self.low_window.clone(),
            low_free: self.low.free(),
            high: self.high.as_ref().map(|(h, _)| h.clone()),
            high_free: self.high.as_ref().map_or(0, |(_, a)| a.free()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const LOW: Range<u64> = 0xc000_0000..0xfec0_0000;

    #[test]
    fn small_bars_stay_low_and_prefetchable_64bit_bars_go_high() {
        let mut s = BarSpace::new(LOW, Some(64 * GIB..1 << 39));
        assert_eq!(s.place(0x4000, false, false), Ok(0xc000_0000));
        assert_eq!(
            s.place(0x4000, true, false),
            Ok(0xc000_4000),
            "64-bit regs low"
        );
        assert_eq!(
            s.place(256 << 20, true, true),
            Ok(64 * GIB),
            "aperture high"
        );
        assert_eq!(s.windows(), vec![LOW, 64 * GIB..1 << 39]);
    }

    #[test]
    fn a_bar_larger_than_the_hole_goes_high_or_fails_clearly() {
        let mut s = BarSpace::new(LOW, Some(8 * GIB..1 << 36));
        // 2 GiB non-prefetchable 64-bit: larger than the hole -> high, aligned.
        assert_eq!(s.place(2 * GIB, true, false), Ok(8 * GIB));
        // 32 GiB prefetchable: aligned to 32 GiB inside 8..64 GiB.
        assert_eq!(s.place(32 * GIB, true, true), Ok(32 * GIB));
        // Another 32 GiB: 64 GiB is the end of the window.
        let e = s.place(32 * GIB, true, true).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("a 64-bit BAR of 0x800000000 bytes fits nowhere"),
            "{text}"
        );
        assert!(
            text.contains("high MMIO window 0x200000000..0x1000000000"),
            "{text}"
        );
        // A 32-bit BAR larger than the hole can never fit.
        let e = s.place(2 * GIB, false, false).unwrap_err();
        assert!(e.to_string().contains("cannot live above 4 GiB"), "{e}");
        assert!(matches!(
            s.place(3 << 20, true, true),
            Err(BarPlaceError::BadSize(_))
        ));
    }

    #[test]
    fn without_a_high_window_64bit_bars_use_the_hole() {
        let mut s = BarSpace::new(LOW, None);
        assert_eq!(s.place(256 << 20, true, true), Ok(0xc000_0000));
        let e = s.place(GIB, true, true).unwrap_err();
        assert!(e.to_string().contains("no high MMIO window"), "{e}");
        assert_eq!(s.windows(), vec![LOW]);
        // An empty high window counts as none.
        assert_eq!(BarSpace::new(LOW, Some(GIB..GIB)).windows(), vec![LOW]);
    }

    #[test]
    fn a_full_high_window_falls_back_to_the_hole() {
        let mut s = BarSpace::new(LOW, Some(8 * GIB..8 * GIB + (1 << 20)));
        assert_eq!(s.place(1 << 20, true, true), Ok(8 * GIB));
        assert_eq!(s.place(1 << 20, true, true), Ok(0xc000_0000));
    }
}
