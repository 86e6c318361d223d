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

    pub(crate) fn pieces(&self, f: &Frame, out: &mut Vec<(*const u8, usize)>) {
        self.for_each_piece(f, |p, n| out.push((p, n)));
    }

    /// Calls `visit` with a pointer and length for each piece of `f`, in order.
    pub(crate) fn for_each_piece(&self, f: &Frame, mut visit: impl FnMut(*const u8, usize)) {
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

/// Hints the CPU to fetch the cache line at `p` for writing (any address; never
/// faults).
#[inline(always)]
pub fn prefetch_write(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHW is a hint: it never faults and changes no memory or flags;
    // CPUs without it decode the opcode as a NOP.
    unsafe {
        std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly))
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
                    // The virtio-net header and the Ethernet header read below: two
                    // lines when the header ends a line (as virtio-user lays out).
                    prefetch(s.addr as *const u8);
                    let end = (hdr_len + MIN_FRAME_LEN - 1).min(s.len as usize - 1);
                    prefetch((s.addr + end) as *const u8);
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

pub use crate::rx::{plain_header, write_rx, RxJob, RxScratch, RxTally, RxWriter};
