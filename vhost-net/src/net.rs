//! The virtio-net data path on one plain [`virtio_queue::Queue`]: taking frames off a
//! TX queue and writing frames into an RX queue (with merged RX buffers).
//!
//! Rings and buffers are reached through host pointers resolved once per batch
//! ([`crate::ring`]). A TX frame is not copied out of the sender's memory: the batch
//! keeps its buffers' host addresses (and an `Arc` of the sender's memory, so they
//! stay mapped), switching reads only the Ethernet header, and delivery copies the
//! frame once, from the sender's buffers straight into the receiver's.
//!
//! Nothing here trusts the frontend: descriptor chains that loop, point outside guest
//! memory, have the wrong direction, are shorter than the virtio-net header or longer
//! than [`MAX_CHAIN_LEN`] are dropped with a reason, never a panic. The same code runs
//! under the vhost-user backend and in unit tests with a mock queue.

use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::ring::{HostMem, Ring};

/// Size of the virtio-net header with VERSION_1 or MRG_RXBUF (`virtio_net_hdr_v1`).
pub const HDR_LEN: usize = 12;
/// Size of the legacy header without `num_buffers`.
pub const LEGACY_HDR_LEN: usize = 10;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Smallest Ethernet frame we forward (destination, source, EtherType).
pub const MIN_FRAME_LEN: usize = 14;
/// Largest TX chain (header plus frame) we accept: a 64 KiB GSO frame with its
/// Ethernet and VLAN headers and the virtio-net header, as other backends allow.
pub const MAX_CHAIN_LEN: usize = 65562;

/// Why a frame from the frontend was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxDrop {
    /// Shorter than the virtio-net header plus an Ethernet header.
    #[error("too short")]
    Short,
    /// Longer than [`MAX_CHAIN_LEN`].
    #[error("oversize")]
    Oversize,
    /// A looping or truncated chain, a buffer outside guest memory, or a device-writable
    /// buffer on the TX queue.
    #[error("bad descriptor")]
    BadDescriptor,
}

/// Why a frame could not be written to an RX queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RxDrop {
    /// The driver has not posted enough buffers.
    #[error("no RX buffer")]
    NoBuffer,
    /// Without MRG_RXBUF the frame does not fit one chain.
    #[error("frame larger than the RX buffer")]
    TooBig,
    /// An RX chain was malformed (readable buffer, outside memory, looping); it is
    /// returned to the driver with length 0.
    #[error("bad RX descriptor")]
    BadDescriptor,
}

/// The header length a driver with `features` uses.
pub fn header_len(features: u64) -> usize {
    if features & (1 << VIRTIO_F_VERSION_1) != 0 || features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0 {
        HDR_LEN
    } else {
        LEGACY_HDR_LEN
    }
}

/// Whether merged RX buffers were negotiated.
pub fn mrg_rxbuf(features: u64) -> bool {
    features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
}

/// A piece of a frame: host memory of the sender's guest, or of the batch arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seg {
    /// Host address, or offset into the arena.
    addr: usize,
    len: u32,
    arena: bool,
}

/// A frame of a batch: where its bytes are and the headers switching needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    seg_start: u32,
    seg_end: u32,
    /// Length of the Ethernet frame (without the virtio-net header).
    pub len: u32,
    /// The sender's virtio-net header (num_buffers excluded; zero past `hdr_len`).
    pub vnet: [u8; HDR_LEN],
    /// The Ethernet header (destination, source, EtherType).
    pub eth: [u8; MIN_FRAME_LEN],
}

/// One chain taken from a TX queue.
#[derive(Debug, Clone)]
pub struct TxFrame {
    /// Head descriptor index, for the used ring.
    pub head: u16,
    /// The frame, or why it was dropped.
    pub frame: Result<Frame, TxDrop>,
}

/// A batch of TX frames. Guest frames stay in the sender's memory (kept mapped by
/// `mem`); frames from elsewhere (a TAP) are copied into `arena`.
#[derive(Default)]
pub struct TxBatch {
    mem: Option<Arc<GuestMemoryMmap>>,
    ring: Option<Ring>,
    arena: Vec<u8>,
    segs: Vec<Seg>,
    heads: Vec<u16>,
    /// The chains of this batch, in ring order.
    pub frames: Vec<TxFrame>,
}

// SAFETY: the raw pointers in `segs` and `ring` point into the guest memory that
// `mem` keeps mapped (an `Arc` owned by the batch) or are arena offsets; nothing
// about them is tied to the thread that created them.
unsafe impl Send for TxBatch {}

impl std::fmt::Debug for TxBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxBatch")
            .field("frames", &self.frames)
            .finish()
    }
}

impl TxBatch {
    /// Empties the batch (and lets go of the sender's memory).
    pub fn clear(&mut self) {
        self.mem = None;
        self.ring = None;
        self.arena.clear();
        self.segs.clear();
        self.frames.clear();
    }

    /// Adds a frame read from elsewhere (a TAP uplink): `data` starts with a
    /// `hdr_len`-byte virtio-net header. Runts and oversize frames are recorded as
    /// dropped.
    pub fn push_frame(&mut self, data: &[u8], hdr_len: usize) {
        let frame = if data.len() < hdr_len + MIN_FRAME_LEN {
            Err(TxDrop::Short)
        } else if data.len() > MAX_CHAIN_LEN {
            Err(TxDrop::Oversize)
        } else {
            let start = self.arena.len();
            let body = &data[hdr_len..];
            self.arena.extend_from_slice(body);
            let seg_start = self.segs.len() as u32;
            self.segs.push(Seg {
                addr: start,
                len: body.len() as u32,
                arena: true,
            });
            let mut vnet = [0u8; HDR_LEN];
            let n = hdr_len.min(NUM_BUFFERS_OFFSET);
            vnet[..n].copy_from_slice(&data[..n]);
            let mut eth = [0u8; MIN_FRAME_LEN];
            eth.copy_from_slice(&body[..MIN_FRAME_LEN]);
            Ok(Frame {
                seg_start,
                seg_end: seg_start + 1,
                len: body.len() as u32,
                vnet,
                eth,
            })
        };
        self.frames.push(TxFrame { head: 0, frame });
    }

    /// The pieces of `f` as (host pointer, length), appended to `out`. The pointers
    /// are valid while the batch is neither cleared nor dropped.
    pub fn pieces_of(&self, f: &Frame, out: &mut Vec<(*const u8, usize)>) {
        self.pieces(f, out)
    }

    fn pieces(&self, f: &Frame, out: &mut Vec<(*const u8, usize)>) {
        self.for_each_piece(f, |p, n| out.push((p, n)));
    }

    /// Calls `visit` with a pointer and length for each piece of `f`, in order.
    fn for_each_piece(&self, f: &Frame, mut visit: impl FnMut(*const u8, usize)) {
        let segs = self
            .segs
            .get(f.seg_start as usize..f.seg_end as usize)
            .unwrap_or(&[]);
        for s in segs {
            let p = if s.arena {
                match self.arena.get(s.addr..s.addr + s.len as usize) {
                    Some(b) => b.as_ptr(),
                    None => continue,
                }
            } else {
                s.addr as *const u8
            };
            visit(p, s.len as usize);
        }
    }

    /// Appends the bytes of `f` to `out` (no allocation beyond `out` growing).
    pub fn gather(&self, f: &Frame, out: &mut Vec<u8>) {
        out.reserve(f.len as usize);
        self.for_each_piece(f, |p, n| {
            let at = out.len();
            out.resize(at + n, 0);
            // SAFETY: `p` points to `n` readable bytes: guest memory kept mapped by
            // `self.mem` (bounds-checked when the chain was taken) or the arena. Guest
            // bytes are plain data; a guest changing them concurrently only changes
            // the (untrusted) frame content.
            unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr().add(at), n) };
        });
    }

    /// The bytes of `f` (tests and slow paths).
    pub fn bytes(&self, f: &Frame) -> Vec<u8> {
        let mut v = Vec::with_capacity(f.len as usize);
        self.gather(f, &mut v);
        v
    }
}

/// The TX queue could not be used.
#[derive(Debug, thiserror::Error)]
pub enum QueueBroken {
    /// The avail index is more than a queue size ahead.
    #[error("virtqueue unusable: avail index {avail} is more than {size} ahead of {next}")]
    AvailAhead {
        /// The driver's index.
        avail: u16,
        /// Where we are.
        next: u16,
        /// Queue size.
        size: u16,
    },
    /// A ring lies outside guest memory or is misaligned.
    #[error("virtqueue unusable: a ring is outside guest memory or misaligned")]
    Unmapped,
}

/// Hints the CPU to fetch the cache line at `p` (any address; never faults).
#[inline(always)]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it does not fault or change memory, whatever the
    // address; SSE is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Reads `n` bytes at stream offset `off` of `pieces` into `out`.
fn read_prefix(pieces: &[Seg], mut off: usize, out: &mut [u8]) {
    let mut done = 0;
    for s in pieces {
        let len = s.len as usize;
        if off >= len {
            off -= len;
            continue;
        }
        let n = (len - off).min(out.len() - done);
        // SAFETY: `s` is a bounds-checked piece of mapped guest memory of `len` bytes
        // and `off + n <= len`; `out[done..done + n]` is in bounds.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (s.addr as *const u8).add(off),
                out.as_mut_ptr().add(done),
                n,
            )
        };
        done += n;
        off = 0;
        if done == out.len() {
            break;
        }
    }
}

/// Takes up to `max` chains from a TX queue into `batch` (cleared first). Dropped
/// chains are in the batch too, with their reason, so that every head is returned by
/// [`release_tx`]. Returns the number of chains taken.
pub fn pop_tx(
    q: &mut Queue,
    mem: &Arc<GuestMemoryMmap>,
    hdr_len: usize,
    batch: &mut TxBatch,
    max: usize,
) -> Result<usize, QueueBroken> {
    batch.clear();
    let hm = HostMem::new(mem);
    let ring = Ring::new(q, &hm).ok_or(QueueBroken::Unmapped)?;
    let next = q.next_avail();
    let avail = ring.avail_idx();
    let pending = avail.wrapping_sub(next);
    if pending > ring.size() {
        return Err(QueueBroken::AvailAhead {
            avail,
            next,
            size: ring.size(),
        });
    }
    let n = usize::from(pending).min(max);
    let TxBatch {
        segs,
        frames,
        heads,
        ..
    } = batch;
    // Phases over the whole batch, so that the cache misses on the rings and on the
    // frames (written by another CPU) overlap instead of following one another:
    // avail entries, then descriptors (prefetched), then chains, then frame headers.
    heads.clear();
    for k in 0..n {
        let head = ring.avail_entry(next.wrapping_add(k as u16));
        ring.prefetch_desc(head);
        heads.push(head);
    }
    for &head in heads.iter() {
        let seg0 = segs.len();
        let mut total = 0usize;
        let mut result = Ok(());
        let walked = ring.walk(&hm, head, |addr, len, writable| {
            if writable {
                result = Err(TxDrop::BadDescriptor);
                return false;
            }
            total += len as usize;
            if total > MAX_CHAIN_LEN {
                result = Err(TxDrop::Oversize);
                return false;
            }
            let ok = hm.pieces(addr, u64::from(len), |p, n| {
                segs.push(Seg {
                    addr: p as usize,
                    len: n as u32,
                    arena: false,
                })
            });
            if !ok {
                result = Err(TxDrop::BadDescriptor);
            }
            ok
        });
        if result.is_ok() && walked.is_err() {
            result = Err(TxDrop::BadDescriptor);
        }
        if result.is_ok() && total < hdr_len + MIN_FRAME_LEN {
            result = Err(TxDrop::Short);
        }
        let frame = match result {
            Ok(()) => {
                if let Some(s) = segs.get(seg0) {
                    prefetch(s.addr as *const u8);
                }
                Ok(Frame {
                    seg_start: seg0 as u32,
                    seg_end: segs.len() as u32,
                    len: total as u32,
                    vnet: [0; HDR_LEN],
                    eth: [0; MIN_FRAME_LEN],
                })
            }
            Err(e) => {
                segs.truncate(seg0);
                Err(e)
            }
        };
        frames.push(TxFrame { head, frame });
    }
    for tf in frames.iter_mut() {
        let Ok(f) = tf.frame.as_mut() else { continue };
        let (s0, s1) = (f.seg_start as usize, f.seg_end as usize);
        let mut head_bytes = [0u8; HDR_LEN + MIN_FRAME_LEN];
        let want = &mut head_bytes[..hdr_len + MIN_FRAME_LEN];
        read_prefix(&segs[s0..s1], 0, want);
        let nv = hdr_len.min(NUM_BUFFERS_OFFSET);
        f.vnet[..nv].copy_from_slice(&head_bytes[..nv]);
        f.eth
            .copy_from_slice(&head_bytes[hdr_len..hdr_len + MIN_FRAME_LEN]);
        // Skip the virtio-net header: whole pieces, then part of one.
        let mut skip = hdr_len;
        let mut first = s0;
        while skip > 0 && first < s1 {
            let s = &mut segs[first];
            let l = s.len as usize;
            if l <= skip {
                skip -= l;
                first += 1;
            } else {
                s.addr += skip;
                s.len -= skip as u32;
                skip = 0;
            }
        }
        f.seg_start = first as u32;
        f.len -= hdr_len as u32;
    }
    q.set_next_avail(next.wrapping_add(n as u16));
    batch.mem = Some(mem.clone());
    batch.ring = Some(ring);
    Ok(n)
}

/// Returns every chain of the batch to the driver (used length 0), with one used
/// index update. Returns whether the driver wants an interrupt for them.
pub fn release_tx(q: &mut Queue, batch: &mut TxBatch) -> bool {
    let Some(ring) = batch.ring.take() else {
        return false;
    };
    let start = q.next_used();
    let mut idx = start;
    for f in &batch.frames {
        ring.put_used(idx, f.head, 0);
        idx = idx.wrapping_add(1);
    }
    ring.publish_used(idx);
    q.set_next_used(idx);
    ring.wants_interrupt(q.event_idx_enabled(), idx, idx.wrapping_sub(start))
}

/// Reusable space for writing RX chains.
#[derive(Debug, Default)]
pub struct RxScratch {
    /// Writable pieces of the first chain of the current frame.
    first: Vec<(usize, usize)>,
    /// Used entries of the current frame.
    used: Vec<(u16, u32)>,
    /// The pieces of the frame being written.
    pub(crate) src: Vec<(*const u8, usize)>,
    /// A frame copy for the slow paths (checksum completion).
    pub copy: Vec<u8>,
}

// SAFETY: `src` only holds pointers while one frame is written, within one call.
unsafe impl Send for RxScratch {}

/// The bytes written into an RX chain: the header, then the frame's pieces.
struct Stream<'a> {
    hdr: &'a [u8],
    pieces: &'a [(*const u8, usize)],
    /// Position in the stream.
    pos: usize,
    piece: usize,
    piece_off: usize,
}

impl Stream<'_> {
    fn total(&self) -> usize {
        self.hdr.len() + self.pieces.iter().map(|p| p.1).sum::<usize>()
    }

    /// Copies the next `n` bytes of the stream to `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for `n` bytes of writes and the stream must have `n` more
    /// bytes.
    unsafe fn copy_to(&mut self, mut dst: *mut u8, mut n: usize) {
        while n > 0 && self.pos < self.hdr.len() {
            let k = (self.hdr.len() - self.pos).min(n);
            // SAFETY: `k` bytes remain in `hdr` from `pos`; `dst` has room (caller).
            unsafe {
                std::ptr::copy_nonoverlapping(self.hdr.as_ptr().add(self.pos), dst, k);
                dst = dst.add(k);
            }
            self.pos += k;
            n -= k;
        }
        while n > 0 {
            let Some(&(p, len)) = self.pieces.get(self.piece) else {
                return;
            };
            let k = (len - self.piece_off).min(n);
            // SAFETY: the piece has `len` readable bytes (mapped guest memory checked
            // when the chain was taken, or a live buffer), `piece_off + k <= len`; the
            // destination is a checked RX buffer piece with room for `n >= k` bytes.
            // `copy` (memmove), not `copy_nonoverlapping`: a guest with two ports on
            // this switch may make a TX buffer overlap an RX buffer.
            unsafe {
                std::ptr::copy(p.add(self.piece_off), dst, k);
                dst = dst.add(k);
            }
            self.piece_off += k;
            self.pos += k;
            n -= k;
            if self.piece_off == len {
                self.piece += 1;
                self.piece_off = 0;
            }
        }
    }
}

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

    fn put_used(&mut self, head: u16, len: u32) {
        self.ring.put_used(self.next_used, head, len);
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Writes one frame from `batch` with header `hdr` (its `num_buffers` is set
    /// here): one chain, or with `mrg` as many as needed. On `NoBuffer`/`TooBig` the
    /// queue is left as it was.
    pub fn write(
        &mut self,
        hdr: &[u8],
        batch: &TxBatch,
        f: &Frame,
        mrg: bool,
        scratch: &mut RxScratch,
    ) -> Result<(), RxDrop> {
        let mut src = std::mem::take(&mut scratch.src);
        src.clear();
        batch.pieces(f, &mut src);
        let r = self.write_pieces(hdr, &src, mrg, scratch);
        src.clear();
        scratch.src = src;
        r
    }

    /// Writes `hdr` then the bytes of `pieces` (pointers valid for the call).
    pub fn write_pieces(
        &mut self,
        hdr: &[u8],
        pieces: &[(*const u8, usize)],
        mrg: bool,
        scratch: &mut RxScratch,
    ) -> Result<(), RxDrop> {
        let mut stream = Stream {
            hdr,
            pieces,
            pos: 0,
            piece: 0,
            piece_off: 0,
        };
        let total = stream.total();
        let start_avail = self.next_avail;
        scratch.used.clear();
        scratch.first.clear();
        let mut written = 0usize;
        while written < total {
            if self.next_avail == self.avail_idx {
                self.avail_idx = self.ring.avail_idx();
                if self.next_avail == self.avail_idx {
                    self.next_avail = start_avail;
                    return Err(RxDrop::NoBuffer);
                }
                if self.avail_idx.wrapping_sub(self.next_avail) > self.ring.size() {
                    // A driver that claims more buffers than the ring holds.
                    self.avail_idx = self.next_avail;
                    self.next_avail = start_avail;
                    return Err(RxDrop::NoBuffer);
                }
            }
            if !scratch.used.is_empty() && !mrg {
                self.next_avail = start_avail;
                return Err(RxDrop::TooBig);
            }
            let head = self.ring.avail_entry(self.next_avail);
            self.next_avail = self.next_avail.wrapping_add(1);
            let first = scratch.used.is_empty();
            let mut chain_len = 0usize;
            let mut bad = false;
            let hm = &self.hm;
            let walked = self.ring.walk(hm, head, |addr, len, writable| {
                if !writable {
                    bad = true;
                    return false;
                }
                let ok = hm.pieces(addr, u64::from(len), |p, n| {
                    if first {
                        scratch.first.push((p as usize, n));
                    }
                    let k = n.min(total - written);
                    if k > 0 {
                        // SAFETY: `p` is a bounds-checked piece of mapped guest memory
                        // with `n >= k` writable bytes the driver gave to the device;
                        // the stream has `total - written >= k` bytes left.
                        unsafe { stream.copy_to(p, k) };
                        written += k;
                        chain_len += k;
                    }
                });
                if !ok {
                    bad = true;
                }
                ok
            });
            if bad || walked.is_err() || chain_len == 0 {
                // Give this chain and the ones already filled for this frame back empty
                // (a chain of zero-length buffers counts as malformed too).
                self.put_used(head, 0);
                for i in 0..scratch.used.len() {
                    let h = scratch.used[i].0;
                    self.put_used(h, 0);
                }
                return Err(RxDrop::BadDescriptor);
            }
            scratch.used.push((head, chain_len as u32));
        }
        let n = scratch.used.len();
        if n > 1 && hdr.len() == HDR_LEN {
            let count = (n.min(usize::from(u16::MAX)) as u16).to_le_bytes();
            let mut off = NUM_BUFFERS_OFFSET;
            let mut src = &count[..];
            for &(p, len) in &scratch.first {
                if src.is_empty() {
                    break;
                }
                if off >= len {
                    off -= len;
                    continue;
                }
                let k = (len - off).min(src.len());
                // SAFETY: `p` is a checked writable RX piece of `len` bytes and
                // `off + k <= len`.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), (p as *mut u8).add(off), k) };
                src = &src[k..];
                off = 0;
            }
        }
        for i in 0..n {
            let (h, len) = scratch.used[i];
            self.put_used(h, len);
        }
        Ok(())
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
