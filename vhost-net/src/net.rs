//! The virtio-net data path on one plain [`virtio_queue::Queue`]: taking frames off a
//! TX queue and writing frames into an RX queue (with merged RX buffers).
//!
//! Nothing here trusts the frontend: descriptor chains that loop, point outside guest
//! memory, have the wrong direction, are shorter than the virtio-net header or longer
//! than [`MAX_CHAIN_LEN`] are dropped with a reason, never a panic. The same code runs
//! under the vhost-user backend and in unit tests with a mock queue.

use std::ops::Range;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Size of the virtio-net header with VERSION_1 or MRG_RXBUF (`virtio_net_hdr_v1`).
pub const HDR_LEN: usize = 12;
/// Size of the legacy header without `num_buffers`.
pub const LEGACY_HDR_LEN: usize = 10;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Smallest Ethernet frame we forward (destination, source, EtherType).
pub const MIN_FRAME_LEN: usize = 14;
/// Largest TX chain (header plus frame) we accept: a 64 KiB GSO frame with its
/// Ethernet and VLAN headers and the virtio-net header, as other backends allow.
pub const MAX_CHAIN_LEN: usize = 65562;

/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver polls and wants no used-buffer interrupts.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether the driver wants an interrupt for the used entries added since the last
/// call: the EVENT_IDX rule when negotiated, else the avail ring's NO_INTERRUPT flag
/// (which polling drivers such as DPDK's set, sparing an eventfd write per batch).
pub fn wants_interrupt(q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if q.event_idx_enabled() {
        return q.needs_notification(mem).unwrap_or(true);
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    match mem.read_obj::<u16>(GuestAddress(q.avail_ring())) {
        Ok(flags) => u16::from_le(flags) & AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

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

/// One chain taken from a TX queue.
#[derive(Debug, Clone)]
pub struct TxFrame {
    /// Head descriptor index, for the used ring.
    pub head: u16,
    /// Where the Ethernet frame (after the virtio-net header) lies in the batch arena,
    /// or why it was dropped.
    pub frame: Result<Range<usize>, TxDrop>,
}

/// A batch of TX frames, copied out of guest memory into one arena.
#[derive(Debug, Default)]
pub struct TxBatch {
    arena: Vec<u8>,
    /// The chains of this batch, in ring order.
    pub frames: Vec<TxFrame>,
}

impl TxBatch {
    /// The bytes of a frame range.
    pub fn bytes(&self, r: &Range<usize>) -> &[u8] {
        self.arena.get(r.clone()).unwrap_or(&[])
    }

    /// Empties the batch.
    pub fn clear(&mut self) {
        self.arena.clear();
        self.frames.clear();
    }

    /// Adds a frame read from elsewhere (a TAP uplink): `data` starts with a
    /// `hdr_len`-byte virtio-net header. Runts and oversize frames are recorded as
    /// dropped.
    pub fn push_frame(&mut self, data: &[u8], hdr_len: usize) {
        let start = self.arena.len();
        let frame = if data.len() < hdr_len + MIN_FRAME_LEN {
            Err(TxDrop::Short)
        } else if data.len() > MAX_CHAIN_LEN {
            Err(TxDrop::Oversize)
        } else {
            self.arena.extend_from_slice(data);
            Ok(start + hdr_len..start + data.len())
        };
        self.frames.push(TxFrame { head: 0, frame });
    }
}

/// The avail ring index is more than a queue size ahead: the queue cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("virtqueue unusable: {0}")]
pub struct QueueBroken(#[from] pub virtio_queue::Error);

/// Takes up to `max` chains from a TX queue into `batch` (cleared first). Dropped
/// chains are in the batch too, with their reason, so the caller returns every head to
/// the used ring. Returns the number of chains taken.
pub fn pop_tx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    hdr_len: usize,
    batch: &mut TxBatch,
    max: usize,
) -> Result<usize, QueueBroken> {
    batch.clear();
    let iter = q.iter(mem)?;
    for chain in iter.take(max) {
        let head = chain.head_index();
        let start = batch.arena.len();
        let mut total = 0usize;
        let mut result = Ok(());
        let mut last_has_next = true;
        let mut any = false;
        for desc in chain {
            any = true;
            last_has_next = desc.has_next();
            if result.is_err() {
                continue;
            }
            if desc.is_write_only() {
                result = Err(TxDrop::BadDescriptor);
                continue;
            }
            let len = desc.len() as usize;
            total += len;
            if total > MAX_CHAIN_LEN {
                result = Err(TxDrop::Oversize);
                continue;
            }
            let at = batch.arena.len();
            batch.arena.resize(at + len, 0);
            let Some(dst) = batch.arena.get_mut(at..at + len) else {
                result = Err(TxDrop::BadDescriptor);
                continue;
            };
            if mem.read_slice(dst, desc.addr()).is_err() {
                result = Err(TxDrop::BadDescriptor);
            }
        }
        // A chain whose last descriptor still points on was cut short: it loops, its
        // next descriptor is out of the table, or its indirect table is invalid.
        if result.is_ok() && (!any || last_has_next) {
            result = Err(TxDrop::BadDescriptor);
        }
        if result.is_ok() && total < hdr_len + MIN_FRAME_LEN {
            result = Err(TxDrop::Short);
        }
        let frame = match result {
            Ok(()) => Ok(start + hdr_len..start + total),
            Err(e) => {
                batch.arena.truncate(start);
                Err(e)
            }
        };
        batch.frames.push(TxFrame { head, frame });
    }
    Ok(batch.frames.len())
}

/// Reusable space for writing RX chains.
#[derive(Debug, Default)]
pub struct RxScratch {
    /// Writable buffers of the first chain of the current frame.
    first: Vec<(GuestAddress, u32)>,
    /// Used entries of the current frame.
    used: Vec<(u16, u32)>,
}

/// Writes `src` at stream offset `offset` into the buffers `descs`.
fn write_at(
    mem: &GuestMemoryMmap,
    descs: &[(GuestAddress, u32)],
    mut offset: usize,
    mut src: &[u8],
) -> bool {
    for &(addr, len) in descs {
        let len = len as usize;
        if src.is_empty() {
            break;
        }
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(src.len());
        let Some(a) = addr.0.checked_add(offset as u64) else {
            return false;
        };
        if mem.write_slice(&src[..n], GuestAddress(a)).is_err() {
            return false;
        }
        src = &src[n..];
        offset = 0;
    }
    src.is_empty()
}

/// Writes one frame (with a fresh virtio-net header) into the RX queue: one chain, or
/// with `mrg` as many as needed, `num_buffers` set accordingly. Adds the used entries
/// but does not notify. On `NoBuffer`/`TooBig` the queue is left as it was.
pub fn write_rx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    hdr_len: usize,
    mrg: bool,
    frame: &[u8],
    scratch: &mut RxScratch,
) -> Result<(), RxDrop> {
    let mut hdr = [0u8; HDR_LEN];
    hdr[NUM_BUFFERS_OFFSET] = 1;
    let hdr = &hdr[..hdr_len.min(HDR_LEN)];
    let total = hdr.len() + frame.len();
    let start_avail = q.next_avail();
    scratch.used.clear();
    scratch.first.clear();
    let mut written = 0usize;
    while written < total {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            q.set_next_avail(start_avail);
            return Err(RxDrop::NoBuffer);
        };
        if !scratch.used.is_empty() && !mrg {
            q.set_next_avail(start_avail);
            return Err(RxDrop::TooBig);
        }
        let head = chain.head_index();
        let first = scratch.used.is_empty();
        let mut chain_len = 0usize;
        let mut bad = false;
        let mut last_has_next = true;
        let mut any = false;
        for desc in chain {
            any = true;
            last_has_next = desc.has_next();
            if !desc.is_write_only() {
                bad = true;
                break;
            }
            if first {
                scratch.first.push((desc.addr(), desc.len()));
            }
            if written >= total {
                continue;
            }
            let len = (desc.len() as usize).min(total - written);
            let mut off = 0;
            // The part of the header, then of the frame, that falls into this buffer.
            while off < len {
                let pos = written + off;
                let (src, n) = if pos < hdr.len() {
                    let n = (hdr.len() - pos).min(len - off);
                    (&hdr[pos..pos + n], n)
                } else {
                    let p = pos - hdr.len();
                    let n = (frame.len() - p).min(len - off);
                    (&frame[p..p + n], n)
                };
                let Some(a) = desc.addr().0.checked_add(off as u64) else {
                    bad = true;
                    break;
                };
                if mem.write_slice(src, GuestAddress(a)).is_err() {
                    bad = true;
                    break;
                }
                off += n;
            }
            if bad {
                break;
            }
            written += len;
            chain_len += len;
        }
        if bad || !any || last_has_next || chain_len == 0 {
            // Give this chain and the ones already filled for this frame back empty (a
            // chain of zero-length buffers counts as malformed too).
            let _ = q.add_used(mem, head, 0);
            for &(h, _) in &scratch.used {
                let _ = q.add_used(mem, h, 0);
            }
            return Err(RxDrop::BadDescriptor);
        }
        scratch.used.push((head, chain_len as u32));
    }
    let n = scratch.used.len();
    if n > 1 && hdr.len() == HDR_LEN {
        let count = (n.min(usize::from(u16::MAX)) as u16).to_le_bytes();
        if !write_at(mem, &scratch.first, NUM_BUFFERS_OFFSET, &count) {
            for &(h, _) in &scratch.used {
                let _ = q.add_used(mem, h, 0);
            }
            return Err(RxDrop::BadDescriptor);
        }
    }
    for &(h, len) in &scratch.used {
        if q.add_used(mem, h, len).is_err() {
            return Err(RxDrop::BadDescriptor);
        }
    }
    Ok(())
}
