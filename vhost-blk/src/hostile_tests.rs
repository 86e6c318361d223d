//! Hostile and malformed requests through the real worker and io_uring engine, driven
//! by virtio-queue's mock split queue: each must give an error status or a dropped
//! chain, never a panic and never a write outside the image.

use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::{DiskConfig, Mode};
use crate::disk::Disk;
use crate::request::{STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};
use crate::worker::QueueWorker;

const MEM_SIZE: usize = 0x40_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const STATUS: u64 = 0x30_0000;
const IMAGE_LEN: usize = 1 << 20;
const OUTSIDE: u64 = 0x1000_0000;

const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

struct Fixture {
    _dir: tempfile::TempDir,
    image: std::path::PathBuf,
    disk: Arc<Disk>,
    mem: Arc<GuestMemoryMmap>,
}

/// Result of one chain: the used element and the status byte (if any was written).
#[derive(Debug)]
struct Outcome {
    used_len: u32,
    status: u8,
    used_count: u16,
}

impl Fixture {
    fn new(read_only: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img");
        let pattern: Vec<u8> = (0..IMAGE_LEN).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, &pattern).unwrap();
        let cfg = DiskConfig {
            socket: dir.path().join("s"),
            image: image.clone(),
            read_only,
            direct: false,
            write_cache: true,
            serial: "serial-1234".into(),
            queues: 1,
            queue_size: 16,
            mode: Mode::Event,
            poll_us: 0,
            affinity: vec![],
        };
        let disk = Arc::new(Disk::open(&cfg).unwrap());
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        Fixture {
            _dir: dir,
            image,
            disk,
            mem,
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Puts `descs` (flags as given, `next` = following index) on a fresh queue, runs
    /// the worker until everything completed, and reports the used element.
    fn run(&self, descs: &[(u64, u32, u16)]) -> Outcome {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1))
            })
            .collect();
        let mock = MockSplitQueue::new(&*self.mem, 16);
        mock.add_desc_chains(&raw, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let mut worker = QueueWorker::new(self.disk.clone(), 16).unwrap();
        worker.process_avail(&mut q, &self.mem, true).unwrap();
        worker.drain(&mut q, &self.mem);
        let used = mock.used_addr();
        let used_count: u16 = self.mem.read_obj(GuestAddress(used.0 + 2)).unwrap();
        let used_len: u32 = self.mem.read_obj(GuestAddress(used.0 + 8)).unwrap();
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        Outcome {
            used_len,
            status,
            used_count,
        }
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }
}

fn pattern_at(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

#[test]
fn read_write_and_get_id_work() {
    let f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 2);
    let o = f.run(&[(HDR, 16, N), (DATA, 1024, W | N), (STATUS, 1, W)]);
    assert_eq!((o.status, o.used_len, o.used_count), (STATUS_OK, 1025, 1));
    let mut buf = vec![0u8; 1024];
    f.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, pattern_at(1024, 1024));

    f.mem.write_slice(&[7u8; 512], GuestAddress(DATA)).unwrap();
    f.header(VIRTIO_BLK_T_OUT, 1);
    let o = f.run(&[(HDR, 16, N), (DATA, 512, N), (STATUS, 1, W)]);
    assert_eq!((o.status, o.used_len), (STATUS_OK, 1));
    assert_eq!(&f.image()[512..1024], &[7u8; 512][..]);

    f.header(VIRTIO_BLK_T_GET_ID, 0);
    let o = f.run(&[(HDR, 16, N), (DATA, 20, W | N), (STATUS, 1, W)]);
    assert_eq!((o.status, o.used_len), (STATUS_OK, 21));
    let mut id = [0u8; 20];
    f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"serial-1234");
    assert!(id[11..].iter().all(|&b| b == 0));

    f.header(VIRTIO_BLK_T_FLUSH, 0);
    let o = f.run(&[(HDR, 16, N), (STATUS, 1, W)]);
    assert_eq!((o.status, o.used_len), (STATUS_OK, 1));
}

#[test]
fn status_in_the_data_descriptor() {
    // Data and status share the last writable descriptor.
    let f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    let o = f.run(&[(HDR, 16, N), (STATUS - 512, 513, W)]);
    assert_eq!((o.status, o.used_len), (STATUS_OK, 513));
}

#[test]
fn requests_beyond_capacity_fail() {
    let f = Fixture::new(false);
    let last = (IMAGE_LEN / 512) as u64;
    for sector in [last, last - 1, u64::MAX, u64::MAX / 512] {
        f.header(VIRTIO_BLK_T_IN, sector);
        let o = f.run(&[(HDR, 16, N), (DATA, 1024, W | N), (STATUS, 1, W)]);
        assert_eq!(o.status, STATUS_IOERR, "read at sector {sector}");
        assert_eq!(o.used_len, 1);
        f.header(VIRTIO_BLK_T_OUT, sector);
        let o = f.run(&[(HDR, 16, N), (DATA, 1024, N), (STATUS, 1, W)]);
        assert_eq!(o.status, STATUS_IOERR, "write at sector {sector}");
    }
    assert_eq!(f.image().len(), IMAGE_LEN, "the image grew");
    assert_eq!(f.image(), pattern_at(0, IMAGE_LEN));
}

#[test]
fn writes_to_read_only_disk_fail() {
    let f = Fixture::new(true);
    for kind in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ] {
        f.header(kind, 0);
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        f.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        let o = f.run(&[(HDR, 16, N), (DATA, 16, N), (STATUS, 1, W)]);
        assert_eq!(o.status, STATUS_IOERR, "type {kind}");
    }
    assert_eq!(f.image(), pattern_at(0, IMAGE_LEN));
    // Reads still work.
    f.header(VIRTIO_BLK_T_IN, 0);
    let o = f.run(&[(HDR, 16, N), (DATA, 512, W | N), (STATUS, 1, W)]);
    assert_eq!(o.status, STATUS_OK);
}

#[test]
fn malformed_headers_fail() {
    let f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    // Header too short.
    let o = f.run(&[(HDR, 8, N), (DATA, 512, W | N), (STATUS, 1, W)]);
    assert_eq!((o.status, o.used_len), (STATUS_IOERR, 1));
    // Header writable instead of readable.
    let o = f.run(&[(HDR, 16, W | N), (DATA, 512, W | N), (STATUS, 1, W)]);
    assert_eq!(o.status, STATUS_IOERR);
    // Header outside guest memory.
    let o = f.run(&[(OUTSIDE, 16, N), (DATA, 512, W | N), (STATUS, 1, W)]);
    assert_eq!(o.status, STATUS_IOERR);
    // Only a status descriptor.
    let o = f.run(&[(STATUS, 1, W)]);
    assert_eq!(o.status, STATUS_IOERR);
    // Unknown request type.
    f.header(99, 0);
    let o = f.run(&[(HDR, 16, N), (STATUS, 1, W)]);
    assert_eq!((o.status, o.used_len), (STATUS_UNSUPP, 1));
}

#[test]
fn bad_status_descriptor_drops_the_chain() {
    let f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_OUT, 0);
    // Missing (last descriptor is the readable data).
    let o = f.run(&[(HDR, 16, N), (DATA, 512, 0)]);
    assert_eq!((o.used_count, o.used_len, o.status), (1, 0, 0xff));
    // Zero length.
    let o = f.run(&[(HDR, 16, N), (DATA, 512, N), (STATUS, 0, W)]);
    assert_eq!((o.used_count, o.used_len, o.status), (1, 0, 0xff));
    // Not writable.
    let o = f.run(&[(HDR, 16, N), (DATA, 512, N), (STATUS, 1, 0)]);
    assert_eq!((o.used_count, o.used_len, o.status), (1, 0, 0xff));
    // Outside guest memory.
    let o = f.run(&[(HDR, 16, N), (DATA, 512, N), (OUTSIDE, 1, W)]);
    assert_eq!((o.used_count, o.used_len), (1, 0));
    assert_eq!(f.image(), pattern_at(0, IMAGE_LEN));
}

#[test]
fn data_outside_memory_or_wrong_direction_fails() {
    let f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    let o = f.run(&[(HDR, 16, N), (OUTSIDE, 512, W | N), (STATUS, 1, W)]);
    assert_eq!(o.status, STATUS_IOERR);
    // Straddling the end of guest memory.
    let o = f.run(&[
        (HDR, 16, N),
        (MEM_SIZE as u64 - 256, 512, W | N),
        (STATUS, 1, W),
    ]);
    assert_eq!(o.status, STATUS_IOERR);
    // Read into a read-only buffer.
    let o = f.run(&[(HDR, 16, N), (DATA, 512, N), (STATUS, 1, W)]);
    assert_eq!(o.status, STATUS_IOERR);
    // Write from a writable buffer.
    f.header(VIRTIO_BLK_T_OUT, 0);
    let o = f.run(&[(HDR, 16, N), (DATA, 512, W | N), (STATUS, 1, W)]);
    assert_eq!(o.status, STATUS_IOERR);
    f.header(VIRTIO_BLK_T_OUT, 0);
    let o = f.run(&[(HDR, 16, N), (OUTSIDE, 512, N), (STATUS, 1, W)]);
    assert_eq!(o.status, STATUS_IOERR);
    assert_eq!(f.image(), pattern_at(0, IMAGE_LEN));
}

#[test]
fn discard_and_write_zeroes_checks() {
    let f = Fixture::new(false);
    let seg = |sector: u64, num: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        f.mem.write_slice(&s, GuestAddress(DATA)).unwrap();
    };
    f.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    seg(8, 8, 0);
    let o = f.run(&[(HDR, 16, N), (DATA, 16, N), (STATUS, 1, W)]);
    assert_eq!(o.status, STATUS_OK);
    assert!(f.image()[4096..8192].iter().all(|&b| b == 0));
    // Beyond the end.
    seg((IMAGE_LEN / 512) as u64 - 4, 8, 0);
    let o = f.run(&[(HDR, 16, N), (DATA, 16, N), (STATUS, 1, W)]);
    assert_eq!(o.status, STATUS_IOERR);
    // Unknown flags.
    seg(0, 8, 0x80);
    let o = f.run(&[(HDR, 16, N), (DATA, 16, N), (STATUS, 1, W)]);
    assert_eq!(o.status, STATUS_UNSUPP);
    // Two segments.
    f.header(VIRTIO_BLK_T_DISCARD, 0);
    seg(0, 8, 0);
    let o = f.run(&[(HDR, 16, N), (DATA, 32, N), (STATUS, 1, W)]);
    assert_eq!(o.status, STATUS_UNSUPP);
    // Unmap flag is not allowed on discard.
    seg(0, 8, 1);
    let o = f.run(&[(HDR, 16, N), (DATA, 16, N), (STATUS, 1, W)]);
    assert_eq!(o.status, STATUS_UNSUPP);
    assert_eq!(f.image().len(), IMAGE_LEN);
}

#[test]
fn indirect_chain_works() {
    let f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 1);
    let table = 0x20_0000u64;
    let entries = [
        Descriptor::new(HDR, 16, N, 1),
        Descriptor::new(DATA, 512, W | N, 2),
        Descriptor::new(STATUS, 1, W, 0),
    ];
    for (i, d) in entries.iter().enumerate() {
        f.mem
            .write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let o = f.run(&[(table, 48, VRING_DESC_F_INDIRECT as u16)]);
    assert_eq!((o.status, o.used_len), (STATUS_OK, 513));
    let mut buf = vec![0u8; 512];
    f.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, pattern_at(512, 512));
    // An indirect table outside guest memory: the chain is dropped.
    let o = f.run(&[(OUTSIDE, 48, VRING_DESC_F_INDIRECT as u16)]);
    assert_eq!((o.used_count, o.used_len), (1, 0));
}

#[test]
fn looping_chain_and_bad_avail_index_do_not_hang() {
    let f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    // Descriptor 1 points back to 0: the chain is cut by its length limit.
    let raw = [
        RawDescriptor::from(Descriptor::new(HDR, 16, N, 1)),
        RawDescriptor::from(Descriptor::new(DATA, 512, W | N, 0)),
    ];
    let mock = MockSplitQueue::new(&*f.mem, 16);
    mock.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let mut worker = QueueWorker::new(f.disk.clone(), 16).unwrap();
    worker.process_avail(&mut q, &f.mem, true).unwrap();
    worker.drain(&mut q, &f.mem);

    // An avail index far ahead of the queue size: nothing is processed, no panic.
    let mock = MockSplitQueue::new(&*f.mem, 16);
    mock.avail().idx().store(1000);
    let mut q: Queue = mock.create_queue().unwrap();
    let _ = worker.process_avail(&mut q, &f.mem, true);
    worker.drain(&mut q, &f.mem);
    assert_eq!(f.image(), pattern_at(0, IMAGE_LEN));
}

#[test]
fn cached_reads_complete_inline_and_uncached_writes_take_the_ring() {
    let f = Fixture::new(false);
    // The image was just written, so it is in the page cache: the read completes
    // while the avail ring is processed, without anything in flight on the ring.
    f.header(VIRTIO_BLK_T_IN, 4);
    let mock = MockSplitQueue::new(&*f.mem, 16);
    let raw = [
        RawDescriptor::from(Descriptor::new(HDR, 16, N, 1)),
        RawDescriptor::from(Descriptor::new(DATA, 4096, W | N, 2)),
        RawDescriptor::from(Descriptor::new(STATUS, 1, W, 0)),
    ];
    mock.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let mut worker = QueueWorker::new(f.disk.clone(), 16).unwrap();
    f.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(worker.process_avail(&mut q, &f.mem, true).unwrap(), 1);
    assert_eq!(worker.inflight(), 0);
    let status: u8 = f.mem.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(status, STATUS_OK);
    let mut buf = vec![0u8; 4096];
    f.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, pattern_at(2048, 4096));

    // Write cache on, nothing else in flight: the write completes synchronously too.
    f.mem.write_slice(&[8u8; 512], GuestAddress(DATA)).unwrap();
    f.header(VIRTIO_BLK_T_OUT, 2);
    let mock = MockSplitQueue::new(&*f.mem, 16);
    let raw = [
        RawDescriptor::from(Descriptor::new(HDR, 16, N, 1)),
        RawDescriptor::from(Descriptor::new(DATA, 512, N, 2)),
        RawDescriptor::from(Descriptor::new(STATUS, 1, W, 0)),
    ];
    mock.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    assert_eq!(worker.process_avail(&mut q, &f.mem, true).unwrap(), 1);
    assert_eq!(worker.inflight(), 0);
    assert_eq!(&f.image()[1024..1536], &[8u8; 512][..]);

    // Write cache off: writes must be durable before completion, so they go through
    // the ring with RWF_DSYNC and are not completed synchronously.
    f.disk.set_write_cache(false);
    f.mem.write_slice(&[9u8; 512], GuestAddress(DATA)).unwrap();
    f.header(VIRTIO_BLK_T_OUT, 3);
    let mock = MockSplitQueue::new(&*f.mem, 16);
    let raw = [
        RawDescriptor::from(Descriptor::new(HDR, 16, N, 1)),
        RawDescriptor::from(Descriptor::new(DATA, 512, N, 2)),
        RawDescriptor::from(Descriptor::new(STATUS, 1, W, 0)),
    ];
    mock.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    assert_eq!(worker.process_avail(&mut q, &f.mem, true).unwrap(), 0);
    assert_eq!(worker.inflight(), 1);
    assert_eq!(worker.drain(&mut q, &f.mem), 1);
    let status: u8 = f.mem.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(status, STATUS_OK);
    assert_eq!(&f.image()[1536..2048], &[9u8; 512][..]);
}
