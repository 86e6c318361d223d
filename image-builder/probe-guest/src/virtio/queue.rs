//! Split virtqueue (virtio 1.x, section 2.7) in one 4 KiB page:
//! descriptor table at 0, available ring at 1024, used ring at 2048.
//!
//! Descriptors are managed with a free list threaded through their `next`
//! fields. No event-index feature: the device interrupts on every used buffer
//! and the driver notifies after every batch.

use core::sync::atomic::{fence, Ordering};

use crate::mmio;

/// Largest queue size this layout holds.
pub const MAX_SIZE: u16 = 64;
/// Bytes of memory a queue needs (one page).
pub const MEM_SIZE: usize = 4096;

/// Offsets of the three parts in the queue page.
const DESC_OFF: u64 = 0;
const AVAIL_OFF: u64 = 1024;
const USED_OFF: u64 = 2048;
/// Size of one descriptor.
const DESC_SIZE: u64 = 16;

/// Descriptor flags.
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// One buffer of a descriptor chain.
#[derive(Clone, Copy)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else it only reads it).
    pub device_writes: bool,
}

impl Buffer {
    /// A buffer the device reads.
    pub const fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            device_writes: false,
        }
    }

    /// A buffer the device writes.
    pub const fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            device_writes: true,
        }
    }
}

/// A used element: the chain's head descriptor and the bytes written.
#[derive(Clone, Copy)]
pub struct Used {
    /// Head descriptor index (what [`SplitQueue::push`] returned).
    pub id: u16,
    /// Bytes the device wrote into the chain's writable buffers.
    pub len: u32,
}

/// Driver side of one split virtqueue.
pub struct SplitQueue {
    /// Queue index in the device.
    pub index: u16,
    /// Number of descriptors (and ring entries).
    pub size: u16,
    mem: u64,
    notify: u64,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
}

impl SplitQueue {
    /// Lays out an empty queue of `size` (1..=[`MAX_SIZE`]) entries in the
    /// page at `mem`, clearing it.
    ///
    /// # Safety
    ///
    /// `mem` must be a 4 KiB-aligned, identity-mapped page of RAM used for
    /// nothing else while the device may use the queue.
    pub unsafe fn new(index: u16, size: u16, mem: u64) -> Self {
        let size = size.clamp(1, MAX_SIZE);
        for off in (0..MEM_SIZE as u64).step_by(8) {
            // SAFETY: inside the page the caller gave us.
            unsafe { mmio::write::<u64>(mem + off, 0) };
        }
        let q = Self {
            index,
            size,
            mem,
            notify: 0,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
        };
        for i in 0..size {
            q.set_desc_next(i, (i + 1) % size);
        }
        q
    }

    /// Physical address of the descriptor table.
    pub fn desc_addr(&self) -> u64 {
        self.mem + DESC_OFF
    }

    /// Physical address of the available (driver) ring.
    pub fn avail_addr(&self) -> u64 {
        self.mem + AVAIL_OFF
    }

    /// Physical address of the used (device) ring.
    pub fn used_addr(&self) -> u64 {
        self.mem + USED_OFF
    }

    /// Sets the address notifications for this queue are written to.
    pub fn set_notify(&mut self, addr: u64) {
        self.notify = addr;
    }

    fn desc(&self, i: u16) -> u64 {
        self.desc_addr() + DESC_SIZE * u64::from(i % self.size)
    }

    fn set_desc_next(&self, i: u16, next: u16) {
        // SAFETY: descriptor `i` is inside our queue page (index reduced
        // modulo the size, and 16 * MAX_SIZE fits before the rings).
        unsafe { mmio::write16(self.desc(i) + 14, next) };
    }

    /// Posts a chain of `bufs` and makes it available (without notifying).
    /// Returns the head descriptor, or `None` if not enough are free.
    pub fn push(&mut self, bufs: &[Buffer]) -> Option<u16> {
        let n = u16::try_from(bufs.len()).ok()?;
        if n == 0 || n > self.num_free {
            return None;
        }
        let head = self.free_head;
        let mut at = head;
        for (i, buf) in bufs.iter().enumerate() {
            let d = self.desc(at);
            // SAFETY: reading our own descriptor's `next` (the free list).
            let next = unsafe { mmio::read16(d + 14) };
            let mut flags = if buf.device_writes { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            // SAFETY: descriptor `at` is free (taken from the free list), so
            // the device does not read it; it is inside our queue page.
            unsafe {
                mmio::write::<u64>(d, buf.addr);
                mmio::write32(d + 8, buf.len);
                mmio::write16(d + 12, flags);
            }
            if i + 1 < bufs.len() {
                at = next;
            } else {
                self.free_head = next;
            }
        }
        self.num_free -= n;

        let slot = self.avail_addr() + 4 + 2 * u64::from(self.avail_idx % self.size);
        // SAFETY: the ring slot is inside the available ring of our page.
        unsafe { mmio::write16(slot, head) };
        // The descriptors and ring slot must be visible before the index.
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: `idx` of the available ring, inside our page.
        unsafe { mmio::write16(self.avail_addr() + 2, self.avail_idx) };
        fence(Ordering::SeqCst);
        Some(head)
    }

    /// Tells the device there are new available buffers.
    pub fn notify(&self) {
        // The index update must be visible before the device looks.
        fence(Ordering::SeqCst);
        if self.notify != 0 {
            // SAFETY: `notify` is this queue's notification address in the
            // device's notify BAR region (set by the transport).
            unsafe { mmio::write16(self.notify, self.index) };
        }
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: `idx` of the used ring, inside our page; the device writes
        // it, hence the volatile read.
        unsafe { mmio::read16(self.used_addr() + 2) }
    }

    /// Whether the device has returned buffers not yet popped.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Takes the next used element and frees its descriptors.
    pub fn pop_used(&mut self) -> Option<Used> {
        if !self.has_used() {
            return None;
        }
        // Read the element only after seeing the index.
        fence(Ordering::SeqCst);
        let elem = self.used_addr() + 4 + 8 * u64::from(self.last_used % self.size);
        // SAFETY: the used element is inside our page.
        let (id, len) = unsafe { (mmio::read32(elem), mmio::read32(elem + 4)) };
        self.last_used = self.last_used.wrapping_add(1);
        let id = (id % u32::from(self.size)) as u16;
        self.free_chain(id);
        Some(Used { id, len })
    }

    /// Returns the chain starting at `head` to the free list.
    fn free_chain(&mut self, head: u16) {
        let mut at = head;
        let mut n = 1;
        loop {
            let d = self.desc(at);
            // SAFETY: our own descriptor, which the device is done with.
            let (flags, next) = unsafe { (mmio::read16(d + 12), mmio::read16(d + 14)) };
            if flags & DESC_F_NEXT == 0 || n >= self.size {
                self.set_desc_next(at, self.free_head);
                break;
            }
            at = next;
            n += 1;
        }
        self.free_head = head;
        self.num_free = (self.num_free + n).min(self.size);
    }
}
