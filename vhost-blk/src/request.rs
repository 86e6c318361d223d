//! Parsing one virtio-blk descriptor chain into a checked request.
//!
//! Everything here treats the chain as hostile: lengths, directions, addresses and
//! offsets are checked before anything is submitted. A chain whose status byte cannot
//! be written is dropped (returned with used length 0); any other problem is reported
//! to the guest through the status byte.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::disk::{Disk, SECTOR_SIZE};

/// Size of `struct virtio_blk_outhdr` (type, reserved/ioprio, sector).
pub const HEADER_LEN: u32 = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes` segment.
const DWZ_SEG_LEN: u32 = 16;
/// Most descriptors accepted in one chain (data segments are limited far below this).
pub const MAX_DESCRIPTORS: usize = 1024;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
const WZ_FLAG_UNMAP: u32 = 1;

/// Status byte: success.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Status byte: I/O error (also used for malformed requests).
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status byte: unsupported request.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// A guest-physical buffer of a request's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Start in guest memory.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// What the disk has to do for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at byte `offset` into the segments.
    Read {
        /// Byte offset in the image.
        offset: u64,
        /// Guest buffers, all device-writable.
        segs: Vec<Segment>,
        /// Total length.
        len: u32,
    },
    /// Write the segments to byte `offset`.
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// Guest buffers, all device-readable.
        segs: Vec<Segment>,
        /// Total length.
        len: u32,
    },
    /// Make all completed writes durable.
    Flush,
    /// Deallocate a byte range.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Zero a byte range, deallocating it if `unmap`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// The guest allows deallocation.
        unmap: bool,
    },
    /// Nothing to submit: complete at once with this status and `data_len` bytes written
    /// to the guest before the status byte.
    Done {
        /// The status byte.
        status: u8,
        /// Bytes of data written into guest buffers.
        data_len: u32,
    },
}

/// A parsed request. `status` is `None` when the chain has no usable status byte:
/// such a chain is returned to the guest with used length 0 and nothing else done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Guest address of the status byte.
    pub status: Option<GuestAddress>,
    /// The operation.
    pub op: Op,
}

impl Request {
    fn done(status: GuestAddress, code: u8) -> Request {
        Request {
            status: Some(status),
            op: Op::Done {
                status: code,
                data_len: 0,
            },
        }
    }
}

/// A piece of the chain with its direction.
#[derive(Debug, Clone, Copy)]
struct Piece {
    seg: Segment,
    writable: bool,
}

/// Parses the descriptors of one chain. `descs` is the chain as read from the ring
/// (indirect tables already followed). Side effect: GET_ID writes the serial into the
/// guest buffer.
pub fn parse<I>(descs: I, mem: &GuestMemoryMmap, disk: &Disk) -> Request
where
    I: IntoIterator<Item = Descriptor>,
{
    let mut all: Vec<Descriptor> = Vec::new();
    for d in descs {
        if all.len() == MAX_DESCRIPTORS + 2 {
            // Too long: treat like a chain without a status byte we can trust.
            return Request {
                status: None,
                op: Op::Done {
                    status: STATUS_IOERR,
                    data_len: 0,
                },
            };
        }
        all.push(d);
    }
    let dropped = Request {
        status: None,
        op: Op::Done {
            status: STATUS_IOERR,
            data_len: 0,
        },
    };

    // The status byte is the last byte of the last descriptor, which must be writable
    // and inside guest memory.
    let Some(last) = all.last() else {
        return dropped;
    };
    if !last.is_write_only() || last.len() == 0 || !in_memory(mem, last.addr(), last.len()) {
        return dropped;
    }
    let Some(status) = last.addr().0.checked_add(u64::from(last.len()) - 1) else {
        return dropped;
    };
    let status = GuestAddress(status);

    // Split the chain into header, data pieces and status. The header is in a readable
    // first descriptor, so a one-descriptor chain (which is writable) fails here.
    let first = all[0];
    if first.is_write_only()
        || first.len() < HEADER_LEN
        || !in_memory(mem, first.addr(), first.len())
    {
        return Request::done(status, STATUS_IOERR);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    if mem.read_slice(&mut header, first.addr()).is_err() {
        return Request::done(status, STATUS_IOERR);
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    let mut pieces: Vec<Piece> = Vec::new();
    let n = all.len();
    for (i, d) in all.iter().enumerate() {
        let mut start = d.addr().0;
        let mut len = d.len();
        if i == 0 {
            start += u64::from(HEADER_LEN);
            len -= HEADER_LEN;
        }
        if i == n - 1 {
            len -= 1;
        }
        if len == 0 {
            continue;
        }
        if !in_memory(mem, d.addr(), d.len()) {
            return Request::done(status, STATUS_IOERR);
        }
        pieces.push(Piece {
            seg: Segment {
                addr: GuestAddress(start),
                len,
            },
            writable: d.is_write_only(),
        });
    }
    let total: u64 = pieces.iter().map(|p| u64::from(p.seg.len)).sum();
    let all_writable = pieces.iter().all(|p| p.writable);
    let all_readable = pieces.iter().all(|p| !p.writable);
    let segs = || pieces.iter().map(|p| p.seg).collect::<Vec<_>>();

    let op = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_read = kind == VIRTIO_BLK_T_IN;
            if (is_read && !all_writable) || (!is_read && !all_readable) {
                return Request::done(status, STATUS_IOERR);
            }
            if !is_read && disk.read_only {
                return Request::done(status, STATUS_IOERR);
            }
            let Ok(len) = u32::try_from(total) else {
                return Request::done(status, STATUS_IOERR);
            };
            let Some(offset) = range_in_disk(disk, sector, u64::from(len)) else {
                return Request::done(status, STATUS_IOERR);
            };
            if len == 0 {
                return Request::done(status, STATUS_OK);
            }
            if is_read {
                Op::Read {
                    offset,
                    segs: segs(),
                    len,
                }
            } else {
                Op::Write {
                    offset,
                    segs: segs(),
                    len,
                }
            }
        }
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        VIRTIO_BLK_T_GET_ID => {
            if !all_writable {
                return Request::done(status, STATUS_IOERR);
            }
            let mut written = 0u32;
            for p in &pieces {
                let left = disk.serial.len() - written as usize;
                if left == 0 {
                    break;
                }
                let take = left.min(p.seg.len as usize);
                let from = &disk.serial[written as usize..written as usize + take];
                if mem.write_slice(from, p.seg.addr).is_err() {
                    return Request::done(status, STATUS_IOERR);
                }
                written += take as u32;
            }
            Op::Done {
                status: STATUS_OK,
                data_len: written,
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if disk.read_only || !all_readable {
                return Request::done(status, STATUS_IOERR);
            }
            // One segment per request (max_discard_seg = max_write_zeroes_seg = 1).
            if total != u64::from(DWZ_SEG_LEN) || pieces.len() != 1 {
                return Request::done(status, STATUS_UNSUPP);
            }
            let mut seg = [0u8; DWZ_SEG_LEN as usize];
            if mem.read_slice(&mut seg, pieces[0].seg.addr).is_err() {
                return Request::done(status, STATUS_IOERR);
            }
            let mut s = [0u8; 8];
            s.copy_from_slice(&seg[0..8]);
            let start = u64::from_le_bytes(s);
            let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let len = u64::from(num) * SECTOR_SIZE;
            let is_discard = kind == VIRTIO_BLK_T_DISCARD;
            let allowed = if is_discard { 0 } else { WZ_FLAG_UNMAP };
            if flags & !allowed != 0 {
                return Request::done(status, STATUS_UNSUPP);
            }
            let Some(offset) = range_in_disk(disk, start, len) else {
                return Request::done(status, STATUS_IOERR);
            };
            if len == 0 {
                return Request::done(status, STATUS_OK);
            }
            if is_discard {
                Op::Discard { offset, len }
            } else {
                Op::WriteZeroes {
                    offset,
                    len,
                    unmap: flags & WZ_FLAG_UNMAP != 0,
                }
            }
        }
        _ => Op::Done {
            status: STATUS_UNSUPP,
            data_len: 0,
        },
    };
    Request {
        status: Some(status),
        op,
    }
}

/// Whether `[addr, addr + len)` is entirely backed by guest memory.
fn in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> bool {
    GuestMemoryBackend::check_range(mem, addr, len as usize)
}

/// Byte offset of `sector` when `[sector * 512, + len)` lies inside the disk.
fn range_in_disk(disk: &Disk, sector: u64, len: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (end <= disk.size).then_some(offset)
}
