//! Writing frames into a receiver's RX queue: resolving its chains, copying the
//! virtio-net header and the frame into them, and publishing the used entries once
//! per batch.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::net::{RxDrop, TxBatch, HDR_LEN, NUM_BUFFERS_OFFSET};
use crate::ring::{HostMem, Ring};

/// Reusable space for writing RX chains.
#[derive(Debug, Default)]
pub struct RxScratch {
    /// The pieces of a frame being sent to a TAP uplink (one writev).
    pub(crate) src: Vec<(*const u8, usize)>,
    /// A frame copy for the slow paths (checksum completion).
    pub copy: Vec<u8>,
    /// Frames queued for [`RxWriter::write_batch`].
    pub jobs: Vec<RxJob>,
    /// Destination pieces of the frames reserved by the batch being written.
    dst: Vec<(usize, usize)>,
    /// Used entries of the batch being written, in ring order.
    batch_used: Vec<(u16, u32)>,
    /// The frames of the batch that got buffers.
    reserved: Vec<Reserved>,
}

/// A frame to write with [`RxWriter::write_batch`]: which one, and its header.
#[derive(Debug, Clone, Copy)]
pub struct RxJob {
    /// Index into the batch's frames.
    pub frame: usize,
    /// The virtio-net header to write in front of it (`num_buffers` set on writing).
    pub hdr: [u8; HDR_LEN],
}

/// A frame of a batch with its buffers reserved, waiting to be copied.
#[derive(Debug, Clone, Copy)]
struct Reserved {
    /// Index into the jobs.
    job: usize,
    /// Range of its destination pieces in `RxScratch::dst`.
    dst_start: usize,
    dst_end: usize,
    /// Chains used (the header's `num_buffers`).
    chains: usize,
}

/// What [`RxWriter::write_batch`] did with its frames.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxTally {
    /// Frames written.
    pub frames: u64,
    /// Their bytes (without headers).
    pub bytes: u64,
    /// Frames dropped because the queue ran out of buffers (this one and every later
    /// one of the batch).
    pub no_buffer: u64,
    /// Frames dropped because they did not fit a chain (no MRG_RXBUF).
    pub too_big: u64,
    /// Frames dropped on a malformed chain.
    pub bad_descriptor: u64,
}

impl RxTally {
    /// Adds the counts of `other`.
    pub fn add(&mut self, other: &RxTally) {
        self.frames += other.frames;
        self.bytes += other.bytes;
        self.no_buffer += other.no_buffer;
        self.too_big += other.too_big;
        self.bad_descriptor += other.bad_descriptor;
    }
}

// SAFETY: `src` only holds pointers while one frame is sent, within one call.
unsafe impl Send for RxScratch {}

/// An RX queue being filled: ring pointers resolved once, used entries published
/// once at [`RxWriter::finish`].
pub struct RxWriter<'q, 'm> {
    q: &'q mut Queue,
    hm: HostMem<'m>,
    ring: Ring,
    next_avail: u16,
    avail_idx: u16,
    start_used: u16,
    next_used: u16,
}

impl<'q, 'm> RxWriter<'q, 'm> {
    /// Maps the queue; `None` if its rings are outside memory or misaligned.
    pub fn new(q: &'q mut Queue, mem: &'m GuestMemoryMmap) -> Option<RxWriter<'q, 'm>> {
        let hm = HostMem::new(mem);
        let ring = Ring::new(q, &hm)?;
        let next_avail = q.next_avail();
        let next_used = q.next_used();
        Some(RxWriter {
            q,
            hm,
            avail_idx: next_avail,
            ring,
            next_avail,
            start_used: next_used,
            next_used,
        })
    }

    /// Writes the frames of `scratch.jobs` (from `batch`) in three passes over the
    /// whole batch, so that the cache misses on the driver's rings and buffers
    /// (written by another CPU) overlap instead of following one another: take and
    /// check the chains of every frame (prefetching the start of each buffer for
    /// writing), then copy every frame, then write the used entries. Drops are as in
    /// [`RxWriter::write`]; a queue out of buffers drops the rest of the batch.
    pub fn write_batch(
        &mut self,
        batch: &TxBatch,
        hdr_len: usize,
        mrg: bool,
        scratch: &mut RxScratch,
    ) -> RxTally {
        let mut tally = RxTally::default();
        let RxScratch {
            jobs,
            dst,
            batch_used,
            reserved,
            ..
        } = scratch;
        let hdr_len = hdr_len.min(HDR_LEN);
        let mut next = 0;
        while next < jobs.len() {
            dst.clear();
            batch_used.clear();
            reserved.clear();
            // Take chains until the batch ends or its pieces reach the bound (a
            // driver can split a buffer into thousands of pieces: what is held at
            // once stays bounded).
            while next < jobs.len() && dst.len() < MAX_PENDING_PIECES {
                let j = next;
                next += 1;
                let Some(f) = batch
                    .frames
                    .get(jobs[j].frame)
                    .and_then(|f| f.frame.as_ref().ok())
                else {
                    continue;
                };
                let dst_start = dst.len();
                match self.reserve(hdr_len + f.len as usize, mrg, dst, batch_used) {
                    Ok(chains) => {
                        reserved.push(Reserved {
                            job: j,
                            dst_start,
                            dst_end: dst.len(),
                            chains,
                        });
                        tally.frames += 1;
                        tally.bytes += u64::from(f.len);
                    }
                    Err(RxDrop::NoBuffer) => {
                        tally.no_buffer += (jobs.len() - j) as u64;
                        next = jobs.len();
                    }
                    Err(RxDrop::TooBig) => tally.too_big += 1,
                    Err(RxDrop::BadDescriptor) => tally.bad_descriptor += 1,
                }
            }
            for r in reserved.iter() {
                let (Some(job), Some(pieces)) = (jobs.get(r.job), dst.get(r.dst_start..r.dst_end))
                else {
                    continue;
                };
                let Some(f) = batch
                    .frames
                    .get(job.frame)
                    .and_then(|f| f.frame.as_ref().ok())
                else {
                    continue;
                };
                let mut hdr = job.hdr;
                if hdr_len == HDR_LEN {
                    let n = r.chains.min(usize::from(u16::MAX)) as u16;
                    hdr[NUM_BUFFERS_OFFSET..].copy_from_slice(&n.to_le_bytes());
                }
                let mut out = DstCursor {
                    pieces,
                    piece: 0,
                    off: 0,
                };
                out.put(&hdr[..hdr_len]);
                batch.for_each_piece(f, |p, n| {
                    // SAFETY: `p` points to `n` readable bytes of the batch (guest
                    // memory kept mapped by the batch, bounds-checked when the chain
                    // was taken, or its arena).
                    unsafe { out.put_raw(p, n) }
                });
            }
            for &(h, len) in batch_used.iter() {
                self.put_used(h, len);
            }
        }
        tally
    }

    /// Takes chains for `total` bytes (one chain, or with `mrg` as many as needed),
    /// appending their writable pieces (trimmed to what will be written) to `dst` and
    /// their used entries to `used`, and prefetches the first lines for writing.
    /// Returns the number of chains. On `NoBuffer`/`TooBig` nothing is taken; on
    /// `BadDescriptor` the chains taken are queued back with length 0.
    fn reserve(
        &mut self,
        total: usize,
        mrg: bool,
        dst: &mut Vec<(usize, usize)>,
        used: &mut Vec<(u16, u32)>,
    ) -> Result<usize, RxDrop> {
        let start_avail = self.next_avail;
        let (dst0, used0) = (dst.len(), used.len());
        let mut covered = 0usize;
        while covered < total {
            // Without merged buffers a frame must fit its one chain, whether or not
            // more are posted.
            if used.len() > used0 && !mrg {
                self.next_avail = start_avail;
                dst.truncate(dst0);
                used.truncate(used0);
                return Err(RxDrop::TooBig);
            }
            if self.next_avail == self.avail_idx {
                self.avail_idx = self.ring.avail_idx();
                if self.next_avail == self.avail_idx
                    || self.avail_idx.wrapping_sub(self.next_avail) > self.ring.size()
                {
                    // None posted, or a driver claiming more than the ring holds.
                    self.avail_idx = self.next_avail;
                    self.next_avail = start_avail;
                    dst.truncate(dst0);
                    used.truncate(used0);
                    return Err(RxDrop::NoBuffer);
                }
            }
            let head = self.ring.avail_entry(self.next_avail);
            self.next_avail = self.next_avail.wrapping_add(1);
            let mut chain_len = 0usize;
            let mut bad = false;
            let hm = &self.hm;
            let walked = self.ring.walk(hm, head, |addr, len, writable| {
                if !writable {
                    bad = true;
                    return false;
                }
                let ok = hm.pieces(addr, u64::from(len), |p, n| {
                    let k = n.min(total - covered - chain_len);
                    if k > 0 {
                        if dst.len() == dst0 {
                            prefetch_start(p, k);
                        }
                        dst.push((p as usize, k));
                        chain_len += k;
                    }
                });
                if !ok {
                    bad = true;
                }
                ok
            });
            if bad || walked.is_err() || chain_len == 0 {
                // Give this chain and the ones already taken for this frame back empty
                // (a chain of zero-length buffers counts as malformed too).
                dst.truncate(dst0);
                for u in &mut used[used0..] {
                    u.1 = 0;
                }
                used.push((head, 0));
                return Err(RxDrop::BadDescriptor);
            }
            covered += chain_len;
            used.push((head, chain_len as u32));
        }
        Ok(used.len() - used0)
    }

    fn put_used(&mut self, head: u16, len: u32) {
        self.ring.put_used(self.next_used, head, len);
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Writes `hdr` then the bytes of `pieces` (pointers valid for the call): one
    /// chain, or with `mrg` as many as needed (`num_buffers` of a full-size header
    /// is set here). On `NoBuffer`/`TooBig` the queue is left as it was.
    pub fn write_pieces(
        &mut self,
        hdr: &[u8],
        pieces: &[(*const u8, usize)],
        mrg: bool,
        scratch: &mut RxScratch,
    ) -> Result<(), RxDrop> {
        let total = hdr.len() + pieces.iter().map(|p| p.1).sum::<usize>();
        let RxScratch {
            dst, batch_used, ..
        } = scratch;
        dst.clear();
        batch_used.clear();
        let reserved = self.reserve(total, mrg, dst, batch_used);
        if let Ok(chains) = reserved {
            let mut out = DstCursor {
                pieces: dst,
                piece: 0,
                off: 0,
            };
            match <[u8; HDR_LEN]>::try_from(hdr) {
                Ok(mut full) => {
                    let n = chains.min(usize::from(u16::MAX)) as u16;
                    full[NUM_BUFFERS_OFFSET..].copy_from_slice(&n.to_le_bytes());
                    out.put(&full);
                }
                Err(_) => out.put(hdr),
            }
            for &(p, n) in pieces {
                // SAFETY: the caller's pieces are valid for `n` bytes of reads for the
                // duration of the call.
                unsafe { out.put_raw(p, n) };
            }
        }
        // Written chains, or on a bad chain the ones taken, returned empty.
        for &(h, len) in batch_used.iter() {
            self.put_used(h, len);
        }
        reserved.map(|_| ())
    }

    /// Publishes the used entries and updates the queue. Returns whether the driver
    /// wants an interrupt.
    pub fn finish(self) -> bool {
        let added = self.next_used.wrapping_sub(self.start_used);
        self.q.set_next_avail(self.next_avail);
        if added == 0 {
            return false;
        }
        self.ring.publish_used(self.next_used);
        self.q.set_next_used(self.next_used);
        self.ring
            .wants_interrupt(self.q.event_idx_enabled(), self.next_used, added)
    }
}

/// Prefetches for writing the first lines of an RX buffer of `len` bytes at `p`: the
/// header and the start of the frame, the lines the driver's CPU touched last.
#[inline]
fn prefetch_start(p: *mut u8, len: usize) {
    let mut off = 0;
    while off < len.min(PREFETCH_BYTES) {
        // SAFETY: `off < len`: inside the checked buffer (and a prefetch never faults).
        crate::net::prefetch_write(unsafe { p.add(off) });
        off += 64;
    }
    if len > 1 {
        // The line of the last byte written within the prefetched span.
        // SAFETY: as above.
        crate::net::prefetch_write(unsafe { p.add(len.min(PREFETCH_BYTES) - 1) });
    }
}

/// Destination pieces a batch gathers before it copies what it has taken (the rest of
/// the batch follows in another round). Checked between frames: a round holds at
/// most this many plus one frame's pieces (a frame is at most `MAX_CHAIN_LEN` bytes,
/// so at most that many one-byte pieces).
const MAX_PENDING_PIECES: usize = 1024;

/// How much of each RX buffer is prefetched for writing before the copies.
const PREFETCH_BYTES: usize = 128;

/// Where the next bytes of a frame go: a position in its destination pieces.
struct DstCursor<'a> {
    pieces: &'a [(usize, usize)],
    piece: usize,
    off: usize,
}

impl DstCursor<'_> {
    /// Appends `src` (a local buffer: never overlaps guest memory).
    fn put(&mut self, src: &[u8]) {
        if let (Ok(hdr), Some(&(p, len))) =
            (<&[u8; HDR_LEN]>::try_from(src), self.pieces.get(self.piece))
        {
            if len - self.off > HDR_LEN {
                // The common case, a whole header in the first piece: a fixed-size
                // copy (inlined) instead of a call.
                // SAFETY: the piece is a checked writable RX buffer of `len` bytes
                // and `off + HDR_LEN < len`; `hdr` is local, so no overlap.
                unsafe {
                    std::ptr::write_unaligned(
                        (p as *mut u8).add(self.off) as *mut [u8; HDR_LEN],
                        *hdr,
                    )
                };
                self.off += HDR_LEN;
                return;
            }
        }
        // SAFETY: `src` is a live slice of `src.len()` readable bytes.
        unsafe { self.put_raw(src.as_ptr(), src.len()) }
    }

    /// Appends `n` bytes from `src`; bytes past the reserved pieces are not written.
    ///
    /// # Safety
    /// `src` must be valid for `n` bytes of reads.
    unsafe fn put_raw(&mut self, mut src: *const u8, mut n: usize) {
        while n > 0 {
            let Some(&(p, len)) = self.pieces.get(self.piece) else {
                return;
            };
            let k = (len - self.off).min(n);
            // SAFETY: the piece is a checked writable RX buffer of `len` bytes and
            // `off + k <= len`; `src` has `n >= k` readable bytes (caller). `copy`
            // (memmove): a guest with two ports on this switch may make a TX buffer
            // overlap an RX buffer.
            unsafe {
                std::ptr::copy(src, (p as *mut u8).add(self.off), k);
                src = src.add(k);
            }
            n -= k;
            self.off += k;
            if self.off == len {
                self.piece += 1;
                self.off = 0;
            }
        }
    }
}

/// The header written in front of a frame for a receiver without offloads.
pub fn plain_header(hdr_len: usize) -> [u8; HDR_LEN] {
    let mut hdr = [0u8; HDR_LEN];
    if hdr_len == HDR_LEN {
        hdr[NUM_BUFFERS_OFFSET] = 1;
    }
    hdr
}

/// Writes one frame (with a zeroed virtio-net header) into the RX queue and publishes
/// it: the single-frame form of [`RxWriter`] (tests and slow paths).
pub fn write_rx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    hdr_len: usize,
    mrg: bool,
    frame: &[u8],
    scratch: &mut RxScratch,
) -> Result<(), RxDrop> {
    let Some(mut w) = RxWriter::new(q, mem) else {
        return Err(RxDrop::BadDescriptor);
    };
    let hdr = plain_header(hdr_len);
    let r = w.write_pieces(
        &hdr[..hdr_len.min(HDR_LEN)],
        &[(frame.as_ptr(), frame.len())],
        mrg,
        scratch,
    );
    w.finish();
    r
}
