//! Split virtqueues accessed through host pointers resolved once per batch.
//!
//! vm-memory resolves every guest address through its region table on each access
//! (ring index, ring entry, descriptor, buffer). Here the guest regions are looked up
//! once per batch ([`HostMem`]), the three ring areas once per batch ([`Ring`]), and
//! buffers are bounds-checked against the cached region before any raw access.
//!
//! Every value read from guest memory is untrusted: indexes are reduced modulo the
//! queue size, descriptor chains are bounded, buffers are checked against the regions.

use std::marker::PhantomData;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

#[derive(Clone, Copy)]
struct HostRegion {
    gpa: u64,
    len: u64,
    host: *mut u8,
}

/// The regions of one guest memory, as host pointers, for as long as `'m` borrows it.
pub struct HostMem<'m> {
    regions: Vec<HostRegion>,
    last: std::cell::Cell<usize>,
    _mem: PhantomData<&'m GuestMemoryMmap>,
}

impl<'m> HostMem<'m> {
    /// Resolves the regions of `mem` (the borrow keeps the mappings alive).
    pub fn new(mem: &'m GuestMemoryMmap) -> HostMem<'m> {
        HostMem {
            regions: mem
                .iter()
                .map(|r| HostRegion {
                    gpa: r.start_addr().0,
                    len: r.len(),
                    host: r.as_ptr(),
                })
                .collect(),
            last: std::cell::Cell::new(0),
            _mem: PhantomData,
        }
    }

    /// The host pointer of guest address `gpa` and how many bytes from there (at most
    /// `len`) lie in the same region; `None` outside guest memory.
    #[inline]
    pub fn piece(&self, gpa: u64, len: u64) -> Option<(*mut u8, u64)> {
        let hit = |r: &HostRegion| -> Option<(*mut u8, u64)> {
            let off = gpa.checked_sub(r.gpa)?;
            if off >= r.len {
                return None;
            }
            // SAFETY: `off < r.len`, so the result stays inside the region's mapping.
            let p = unsafe { r.host.add(off as usize) };
            Some((p, len.min(r.len - off)))
        };
        let last = self.last.get();
        if let Some(r) = self.regions.get(last) {
            if let Some(x) = hit(r) {
                return Some(x);
            }
        }
        for (i, r) in self.regions.iter().enumerate() {
            if let Some(x) = hit(r) {
                self.last.set(i);
                return Some(x);
            }
        }
        None
    }

    /// The host pointer of `[gpa, gpa + len)` if it lies entirely within one region.
    #[inline]
    pub fn whole(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        match self.piece(gpa, len)? {
            (p, n) if n == len => Some(p),
            _ => None,
        }
    }

    /// Calls `f` with the host pieces of `[gpa, gpa + len)` (split where regions
    /// end). Returns false if part of the range is outside guest memory.
    #[inline]
    pub fn pieces(&self, mut gpa: u64, mut len: u64, mut f: impl FnMut(*mut u8, usize)) -> bool {
        while len > 0 {
            let Some((p, n)) = self.piece(gpa, len) else {
                return false;
            };
            f(p, n as usize);
            len -= n;
            let Some(next) = gpa.checked_add(n) else {
                return false;
            };
            gpa = next;
        }
        true
    }
}

/// One descriptor as the guest wrote it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// VRING_DESC_F_*.
    pub flags: u16,
    /// Next descriptor index (with F_NEXT).
    pub next: u16,
}

/// Why a chain could not be walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChain;

/// The three areas of a split virtqueue as host pointers.
pub struct Ring {
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    size: u16,
}

impl Ring {
    /// Maps the queue's areas; `None` when one lies outside guest memory, is
    /// misaligned, or the size is not a power of two.
    pub fn new(q: &Queue, hm: &HostMem<'_>) -> Option<Ring> {
        let size = q.size();
        if size == 0 || !size.is_power_of_two() {
            return None;
        }
        let n = u64::from(size);
        let (d, a, u) = (q.desc_table(), q.avail_ring(), q.used_ring());
        if d % 16 != 0 || a % 2 != 0 || u % 4 != 0 {
            return None;
        }
        Some(Ring {
            desc: hm.whole(d, 16 * n)?,
            avail: hm.whole(a, 6 + 2 * n)?,
            used: hm.whole(u, 6 + 8 * n)?,
            size,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The driver's avail index (acquire: entries up to it are visible afterwards).
    #[inline]
    pub fn avail_idx(&self) -> u16 {
        // SAFETY: `avail + 2` is inside the mapped, 2-byte aligned avail ring (checked
        // in `new`); the mapping lives as long as the `HostMem` borrow. Atomic access
        // is how memory shared with the guest must be read.
        let idx = unsafe { AtomicU16::from_ptr(self.avail.add(2) as *mut u16) };
        u16::from_le(idx.load(Ordering::Acquire))
    }

    /// The avail ring's flags.
    #[inline]
    pub fn avail_flags(&self) -> u16 {
        // SAFETY: as in `avail_idx`, offset 0 of the avail ring.
        let f = unsafe { AtomicU16::from_ptr(self.avail as *mut u16) };
        u16::from_le(f.load(Ordering::Relaxed))
    }

    /// `used_event` (after the avail ring entries).
    #[inline]
    pub fn used_event(&self) -> u16 {
        let at = 4 + 2 * usize::from(self.size);
        // SAFETY: `at + 2 <= 6 + 2 * size`, inside the mapped avail ring; aligned.
        let f = unsafe { AtomicU16::from_ptr(self.avail.add(at) as *mut u16) };
        u16::from_le(f.load(Ordering::Relaxed))
    }

    /// Avail ring entry `i` (taken modulo the size).
    #[inline]
    pub fn avail_entry(&self, i: u16) -> u16 {
        let at = 4 + 2 * usize::from(i & (self.size - 1));
        // SAFETY: the index is below `size`, so the entry is inside the mapped ring.
        let e = unsafe { AtomicU16::from_ptr(self.avail.add(at) as *mut u16) };
        u16::from_le(e.load(Ordering::Relaxed))
    }

    /// Writes used ring element `slot` (modulo the size); not visible to the driver
    /// before [`Ring::publish_used`].
    #[inline]
    pub fn put_used(&self, slot: u16, id: u16, len: u32) {
        let at = 4 + 8 * usize::from(slot & (self.size - 1));
        let v = u64::from(id) | u64::from(len) << 32;
        // SAFETY: the element is inside the mapped, 4-byte aligned used ring; an
        // unaligned write covers an 8-byte element that is only 4-byte aligned.
        unsafe { std::ptr::write_unaligned(self.used.add(at) as *mut u64, v.to_le()) };
    }

    /// Makes the used elements up to `idx` visible (release).
    #[inline]
    pub fn publish_used(&self, idx: u16) {
        // SAFETY: offset 2 of the mapped, aligned used ring.
        let u = unsafe { AtomicU16::from_ptr(self.used.add(2) as *mut u16) };
        u.store(idx.to_le(), Ordering::Release);
    }

    /// Whether the driver wants an interrupt after `added` used entries up to
    /// `new_used`: the EVENT_IDX rule, or the avail ring's NO_INTERRUPT flag.
    pub fn wants_interrupt(&self, event_idx: bool, new_used: u16, added: u16) -> bool {
        if added == 0 {
            return false;
        }
        fence(Ordering::SeqCst);
        if event_idx {
            let old = new_used.wrapping_sub(added);
            let ev = self.used_event();
            new_used.wrapping_sub(ev).wrapping_sub(1) < new_used.wrapping_sub(old)
        } else {
            self.avail_flags() & 1 == 0
        }
    }

    /// Prefetches descriptor `i` of the table.
    #[inline]
    pub fn prefetch_desc(&self, i: u16) {
        if i < self.size {
            // SAFETY: `i < size`, so the address is inside the mapped table.
            crate::net::prefetch(unsafe { self.desc.add(16 * usize::from(i)) });
        }
    }

    fn read_desc(table: *const u8, i: u16) -> Desc {
        // SAFETY: callers pass `i` below the table's entry count; the table lies in
        // mapped guest memory and is at least 1-byte aligned (read unaligned).
        let raw =
            unsafe { std::ptr::read_unaligned(table.add(16 * usize::from(i)) as *const [u8; 16]) };
        Desc {
            addr: u64::from_le_bytes([
                raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
            ]),
            len: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            flags: u16::from_le_bytes([raw[12], raw[13]]),
            next: u16::from_le_bytes([raw[14], raw[15]]),
        }
    }

    /// Walks the chain starting at `head`, calling `f(addr, len, writable)` per buffer
    /// until it returns false. Indirect tables are followed (one level). A chain that
    /// loops, leaves its table, or has a bad indirect table is an error.
    #[inline]
    pub fn walk(
        &self,
        hm: &HostMem<'_>,
        head: u16,
        mut f: impl FnMut(u64, u32, bool) -> bool,
    ) -> Result<(), BadChain> {
        if head >= self.size {
            return Err(BadChain);
        }
        let (mut table, mut count) = (self.desc, self.size);
        let mut indirect = false;
        let mut i = head;
        let mut budget = u32::from(self.size);
        loop {
            if budget == 0 {
                return Err(BadChain);
            }
            budget -= 1;
            let d = Ring::read_desc(table, i);
            if u32::from(d.flags) & VRING_DESC_F_INDIRECT != 0 {
                if indirect || d.len == 0 || d.len % 16 != 0 || d.len / 16 > u32::from(u16::MAX) {
                    return Err(BadChain);
                }
                table = hm.whole(d.addr, u64::from(d.len)).ok_or(BadChain)?;
                count = (d.len / 16) as u16;
                budget = u32::from(count);
                indirect = true;
                i = 0;
                continue;
            }
            if !f(d.addr, d.len, u32::from(d.flags) & VRING_DESC_F_WRITE != 0) {
                return Ok(());
            }
            if u32::from(d.flags) & VRING_DESC_F_NEXT == 0 {
                return Ok(());
            }
            if d.next >= count {
                return Err(BadChain);
            }
            i = d.next;
        }
    }
}
