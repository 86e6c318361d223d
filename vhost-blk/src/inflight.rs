//! Inflight I/O tracking (the vhost-user `INFLIGHT_SHMFD` protocol feature) for split
//! virtqueues.
//!
//! The backend allocates a shared memory area (GET_INFLIGHT_FD); the frontend keeps
//! its fd and hands it to every backend process it connects to (SET_INFLIGHT_FD).
//! Each queue's region is, as the vhost-user specification lays it out:
//!
//! ```text
//! header: features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16
//! desc_num entries: inflight u8, padding [u8; 5], next u16, counter u64
//! ```
//!
//! A descriptor head is marked in flight (with a rising counter) when it is taken from
//! the avail ring and cleared after it is on the used ring. After a crash the next
//! backend process fixes up the last used-ring update, resubmits every marked head in
//! counter order and continues the avail ring at `used_idx + number in flight`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Version of the region layout written into each queue header.
pub const VERSION: u16 = 1;
/// Size of a queue region header.
const HEADER_LEN: usize = 16;
/// Size of one descriptor state entry.
const DESC_LEN: usize = 16;
/// Queue regions start on this alignment.
const ALIGN: usize = 64;
/// Offsets inside the header.
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
/// Offsets inside a descriptor entry.
const OFF_INFLIGHT: usize = 0;
const OFF_COUNTER: usize = 8;

/// Why an inflight area was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend asked for a shape this backend cannot serve.
    #[error("inflight area for {queues} queues of {size} entries: {reason}")]
    Shape {
        /// Queues asked for.
        queues: u16,
        /// Queue size asked for.
        size: u16,
        /// What is wrong.
        reason: String,
    },
    /// A queue region holds a header this backend does not understand.
    #[error("inflight area, queue {queue}: {reason}")]
    Header {
        /// The queue.
        queue: u16,
        /// What is wrong.
        reason: String,
    },
    /// memfd_create, ftruncate, mmap or a write failed.
    #[error("inflight area: {0}")]
    Io(#[from] io::Error),
}

/// Bytes of one queue's region for `queue_size` descriptors.
pub fn queue_region_len(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_LEN * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// Checks a requested shape against what the backend serves.
fn check_shape(
    queues: u16,
    size: u16,
    max_queues: u16,
    max_size: u16,
) -> Result<(), InflightError> {
    let bad = |reason: String| InflightError::Shape {
        queues,
        size,
        reason,
    };
    if queues == 0 || queues > max_queues {
        return Err(bad(format!("expected 1 to {max_queues} queues")));
    }
    if size == 0 || size > max_size {
        return Err(bad(format!("expected a queue size from 1 to {max_size}")));
    }
    Ok(())
}

/// Allocates a zeroed, initialised area (GET_INFLIGHT_FD): the memfd and its size.
pub fn allocate(
    queues: u16,
    size: u16,
    max_queues: u16,
    max_size: u16,
) -> Result<(File, u64), InflightError> {
    check_shape(queues, size, max_queues, max_size)?;
    let len = queue_region_len(size) * usize::from(queues);
    // SAFETY: the name is a NUL-terminated string literal; the returned fd (if any) is
    // owned by nobody else.
    let fd = unsafe { libc::memfd_create(c"keel-vhost-blk-inflight".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `fd` was just created and is owned by this File only.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64)?;
    let mut header = [0u8; HEADER_LEN];
    header[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&VERSION.to_le_bytes());
    header[OFF_DESC_NUM..OFF_DESC_NUM + 2].copy_from_slice(&size.to_le_bytes());
    for q in 0..usize::from(queues) {
        file.write_all_at(&header, (q * queue_region_len(size)) as u64)?;
    }
    Ok((file, len as u64))
}

/// A mapped inflight area shared with the frontend (SET_INFLIGHT_FD).
pub struct InflightArea {
    base: NonNull<u8>,
    len: usize,
    queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is plain shared memory owned by this value until it is dropped;
// every access goes through raw volatile reads and writes at checked offsets, and each
// queue's region is written by one worker at a time (under its worker lock).
unsafe impl Send for InflightArea {}
// SAFETY: see `Send`; shared references only hand out per-queue views.
unsafe impl Sync for InflightArea {}

impl InflightArea {
    /// Maps `len` bytes at `offset` of `file` holding `queues` regions of `size`
    /// entries, and checks (or, for an all-zero region, writes) each header.
    pub fn map(
        file: &File,
        offset: u64,
        len: u64,
        queues: u16,
        size: u16,
        max_queues: u16,
        max_size: u16,
    ) -> Result<Arc<InflightArea>, InflightError> {
        check_shape(queues, size, max_queues, max_size)?;
        let need = queue_region_len(size) * usize::from(queues);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len < need {
            return Err(InflightError::Shape {
                queues,
                size,
                reason: format!("the area has {len} bytes, {need} needed"),
            });
        }
        let file_len = file.metadata()?.len();
        if offset
            .checked_add(need as u64)
            .is_none_or(|end| end > file_len)
        {
            return Err(InflightError::Shape {
                queues,
                size,
                reason: format!("offset {offset} + {need} bytes is past the file ({file_len})"),
            });
        }
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap offset out of range"))?;
        // SAFETY: a new shared mapping of a file we hold open; the kernel checks the fd,
        // offset alignment and length. The result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                need,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        let Some(base) = NonNull::new(p.cast::<u8>()) else {
            return Err(io::Error::other("mmap returned NULL").into());
        };
        let area = InflightArea {
            base,
            len: need,
            queues,
            queue_size: size,
        };
        for q in 0..queues {
            let region = area.region(q);
            let version = region.read_u16(OFF_VERSION);
            let desc_num = region.read_u16(OFF_DESC_NUM);
            if version == 0 && desc_num == 0 {
                region.write_u16(OFF_VERSION, VERSION);
                region.write_u16(OFF_DESC_NUM, size);
            } else if version != VERSION || desc_num != size {
                return Err(InflightError::Header {
                    queue: q,
                    reason: format!(
                        "version {version}, {desc_num} entries; expected version {VERSION}, {size} entries"
                    ),
                });
            }
        }
        Ok(Arc::new(area))
    }

    /// Number of queue regions.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    fn region(&self, queue: u16) -> Region {
        let off = usize::from(queue) * queue_region_len(self.queue_size);
        debug_assert!(off + queue_region_len(self.queue_size) <= self.len);
        // SAFETY: `queue < self.queues`, so the region lies inside the mapping.
        let base = unsafe { self.base.add(off) };
        Region {
            base,
            desc_num: self.queue_size,
        }
    }

    /// The tracker of queue `queue`, if the area has a region for it.
    pub fn queue(self: &Arc<Self>, queue: u16) -> Option<QueueTracker> {
        (queue < self.queues).then(|| QueueTracker {
            region: self.region(queue),
            counter: 1,
            _area: self.clone(),
        })
    }
}

impl Drop for InflightArea {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map`; no views outlive the
        // area (each tracker holds an Arc to it).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// One queue's region: raw volatile access at offsets inside it.
#[derive(Clone, Copy)]
struct Region {
    base: NonNull<u8>,
    desc_num: u16,
}

impl Region {
    fn read_u16(&self, off: usize) -> u16 {
        // SAFETY: callers pass header offsets or offsets of entries below `desc_num`,
        // all inside the region; the mapping is 64-byte aligned so `off` (even) is
        // aligned for u16.
        unsafe { self.base.add(off).cast::<u16>().as_ptr().read_volatile() }
    }
    fn write_u16(&self, off: usize, v: u16) {
        // SAFETY: as in `read_u16`.
        unsafe { self.base.add(off).cast::<u16>().as_ptr().write_volatile(v) }
    }
    fn read_u8(&self, off: usize) -> u8 {
        // SAFETY: as in `read_u16`.
        unsafe { self.base.add(off).as_ptr().read_volatile() }
    }
    fn write_u8(&self, off: usize, v: u8) {
        // SAFETY: as in `read_u16`.
        unsafe { self.base.add(off).as_ptr().write_volatile(v) }
    }
    fn read_u64(&self, off: usize) -> u64 {
        // SAFETY: as in `read_u16`; entry counters are at 8-byte aligned offsets.
        unsafe { self.base.add(off).cast::<u64>().as_ptr().read_volatile() }
    }
    fn write_u64(&self, off: usize, v: u64) {
        // SAFETY: as in `read_u64`.
        unsafe { self.base.add(off).cast::<u64>().as_ptr().write_volatile(v) }
    }
    fn desc(head: u16) -> usize {
        HEADER_LEN + DESC_LEN * usize::from(head)
    }
}

/// Marks and clears the descriptor heads of one queue.
pub struct QueueTracker {
    region: Region,
    counter: u64,
    _area: Arc<InflightArea>,
}

// SAFETY: the region belongs to the Arc'd area kept alive by `_area`; one tracker per
// queue, used by the queue's worker under its lock.
unsafe impl Send for QueueTracker {}

impl QueueTracker {
    /// Records that chain `head` was taken from the avail ring and is being processed.
    pub fn mark(&mut self, head: u16) {
        if head >= self.region.desc_num {
            return;
        }
        let d = Region::desc(head);
        self.region.write_u64(d + OFF_COUNTER, self.counter);
        self.counter += 1;
        fence(Ordering::SeqCst);
        self.region.write_u8(d + OFF_INFLIGHT, 1);
        fence(Ordering::SeqCst);
    }

    /// Called right before `head` is put on the used ring.
    pub fn before_used(&mut self, head: u16) {
        if head >= self.region.desc_num {
            return;
        }
        self.region.write_u16(OFF_LAST_BATCH_HEAD, head);
        fence(Ordering::SeqCst);
    }

    /// Called right after `head` is on the used ring, whose index is now `used_idx`.
    pub fn after_used(&mut self, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        if head < self.region.desc_num {
            self.region.write_u8(Region::desc(head) + OFF_INFLIGHT, 0);
        }
        fence(Ordering::SeqCst);
        self.region.write_u16(OFF_USED_IDX, used_idx);
        fence(Ordering::SeqCst);
    }

    /// Prepares a restart on a ring whose used index is `ring_used_idx`: undoes a used
    /// ring update the previous process made but did not record, and returns the heads
    /// still in flight in the order they were taken (oldest first). Heads at or above
    /// `queue_size` (the ring is smaller than the area) are dropped from the area.
    pub fn recover(&mut self, ring_used_idx: u16, queue_size: u16) -> Vec<u16> {
        let r = self.region;
        if r.read_u16(OFF_USED_IDX) != ring_used_idx {
            let last = r.read_u16(OFF_LAST_BATCH_HEAD);
            if last < r.desc_num {
                r.write_u8(Region::desc(last) + OFF_INFLIGHT, 0);
            }
            fence(Ordering::SeqCst);
            r.write_u16(OFF_USED_IDX, ring_used_idx);
        }
        let mut heads: Vec<(u64, u16)> = Vec::new();
        for head in 0..r.desc_num {
            let d = Region::desc(head);
            if r.read_u8(d + OFF_INFLIGHT) == 0 {
                continue;
            }
            if head >= queue_size {
                r.write_u8(d + OFF_INFLIGHT, 0);
                continue;
            }
            heads.push((r.read_u64(d + OFF_COUNTER), head));
        }
        heads.sort_unstable();
        self.counter = heads.last().map_or(1, |(c, _)| c + 1);
        heads.into_iter().map(|(_, h)| h).collect()
    }

    /// Number of heads currently marked (for tests and logs).
    pub fn count(&self) -> usize {
        (0..self.region.desc_num)
            .filter(|&h| self.region.read_u8(Region::desc(h) + OFF_INFLIGHT) != 0)
            .count()
    }
}

/// Reads the descriptors of the chain starting at `head` of the descriptor table at
/// `table` (`size` entries), following one level of indirection. `None` for a broken
/// chain (out-of-range index, loop, unreadable memory, nested indirect table).
pub fn read_chain(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Option<Vec<Descriptor>> {
    let read = |base: GuestAddress, n: u16, i: u16| -> Option<Descriptor> {
        if i >= n {
            return None;
        }
        let addr = GuestAddress(base.0.checked_add(u64::from(i) * DESC_LEN as u64)?);
        mem.read_obj::<Descriptor>(addr).ok()
    };
    let mut out = Vec::new();
    let mut d = read(table, size, head)?;
    let mut ttl = size;
    loop {
        if u32::from(d.flags()) & VRING_DESC_F_INDIRECT != 0 {
            if !out.is_empty() || d.len() % DESC_LEN as u32 != 0 {
                return None;
            }
            let n = u16::try_from(d.len() / DESC_LEN as u32).ok()?;
            let base = d.addr();
            let mut e = read(base, n, 0)?;
            let mut ttl = n;
            loop {
                if u32::from(e.flags()) & VRING_DESC_F_INDIRECT != 0 {
                    return None;
                }
                out.push(e);
                if u32::from(e.flags()) & VRING_DESC_F_NEXT == 0 {
                    return Some(out);
                }
                ttl = ttl.checked_sub(1).filter(|t| *t > 0)?;
                e = read(base, n, e.next())?;
            }
        }
        out.push(d);
        if u32::from(d.flags()) & VRING_DESC_F_NEXT == 0 {
            return Some(out);
        }
        ttl = ttl.checked_sub(1).filter(|t| *t > 0)?;
        d = read(table, size, d.next())?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn area(queues: u16, size: u16) -> Arc<InflightArea> {
        let (file, len) = allocate(queues, size, 4, 256).unwrap();
        assert_eq!(len as usize, queue_region_len(size) * usize::from(queues));
        InflightArea::map(&file, 0, len, queues, size, 4, 256).unwrap()
    }

    #[test]
    fn layout_and_shape_checks() {
        assert_eq!(queue_region_len(1), 64);
        assert_eq!(queue_region_len(128), 16 + 128 * 16 + 48);
        assert!(allocate(0, 128, 4, 256).is_err());
        assert!(allocate(5, 128, 4, 256).is_err());
        assert!(allocate(1, 512, 4, 256).is_err());
        let (file, len) = allocate(2, 8, 4, 256).unwrap();
        // Wrong size for the header written at allocation.
        assert!(InflightArea::map(&file, 0, len, 2, 4, 4, 256).is_err());
        // Too short.
        assert!(InflightArea::map(&file, 0, 64, 2, 8, 4, 256).is_err());
        let mut h = [0u8; 16];
        file.read_exact_at(&mut h, queue_region_len(8) as u64)
            .unwrap();
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), VERSION);
        assert_eq!(u16::from_le_bytes([h[10], h[11]]), 8);
    }

    #[test]
    fn recovery_in_counter_order_with_last_batch_fixup() {
        let a = area(2, 16);
        let mut t = a.queue(1).unwrap();
        assert!(a.queue(2).is_none());
        for head in [5, 2, 9, 7] {
            t.mark(head);
        }
        // 2 completes normally (used idx 1).
        t.before_used(2);
        t.after_used(2, 1);
        // 9 reached the used ring (idx 2) but the crash came before it was cleared.
        t.before_used(9);
        assert_eq!(t.count(), 3);
        let mut t2 = a.queue(1).unwrap();
        assert_eq!(t2.recover(2, 16), vec![5, 7]);
        // New marks continue after the old counters.
        t2.mark(3);
        let mut t3 = a.queue(1).unwrap();
        assert_eq!(t3.recover(2, 16), vec![5, 7, 3]);
        // Queue 0 is untouched.
        assert!(a.queue(0).unwrap().recover(0, 16).is_empty());
        // A smaller ring drops heads it cannot have.
        assert_eq!(a.queue(1).unwrap().recover(2, 6), vec![5, 3]);
    }
}
