//! Inflight I/O tracking (INFLIGHT_SHMFD) with a minimal vhost-user frontend written
//! here on the vhost crate: the frontend keeps the area across backend processes, the
//! way keel-vmm and QEMU do, and checks that requests in flight when a backend dies are
//! completed exactly once by the next one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{make_image, Backend};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const DESC: u64 = 0x0;
const AVAIL: u64 = 0x10000;
const USED: u64 = 0x20000;
const HEADERS: u64 = 0x40000;
const STATUS: u64 = 0x50000;
const DATA: u64 = 0x100000;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Guest memory in a memfd, as a vhost-user frontend shares it.
struct Guest {
    mem: GuestMemoryMmap,
    queue_size: u16,
}

impl Guest {
    fn new(size: usize, queue_size: u16) -> Guest {
        // SAFETY: a NUL-terminated literal name; the fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"test-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).unwrap();
        let region = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(file, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .unwrap();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        Guest { mem, queue_size }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Request `i`: write `len` bytes filled with `byte` at byte `offset`. Head 3*i.
    fn write_request(&self, i: u16, offset: u64, len: u32, byte: u8) -> u16 {
        let head = 3 * i;
        let hdr = GuestAddress(HEADERS + 16 * u64::from(i));
        self.mem.write_obj(1u32, hdr).unwrap(); // VIRTIO_BLK_T_OUT
        self.mem.write_obj(0u32, hdr.unchecked_add(4)).unwrap();
        self.mem
            .write_obj(offset / 512, hdr.unchecked_add(8))
            .unwrap();
        let data = DATA + u64::from(i) * u64::from(len);
        self.mem
            .write_slice(&vec![byte; len as usize], GuestAddress(data))
            .unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS + u64::from(i)))
            .unwrap();
        self.desc(head, hdr.0, 16, F_NEXT, head + 1);
        self.desc(head + 1, data, len, F_NEXT, head + 2);
        self.desc(head + 2, STATUS + u64::from(i), 1, F_WRITE, 0);
        head
    }

    fn status(&self, i: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUS + u64::from(i)))
            .unwrap()
    }

    fn publish(&self, heads: &[u16], from: u16) {
        for (k, &h) in heads.iter().enumerate() {
            let slot = (from as usize + k) % usize::from(self.queue_size);
            self.mem
                .write_obj(h, GuestAddress(AVAIL + 4 + 2 * slot as u64))
                .unwrap();
        }
        let idx = from.wrapping_add(heads.len() as u16);
        self.mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn set_used(&self, entries: &[u16]) {
        for (k, &h) in entries.iter().enumerate() {
            let at = GuestAddress(USED + 4 + 8 * k as u64);
            self.mem.write_obj(u32::from(h), at).unwrap();
            self.mem.write_obj(1u32, at.unchecked_add(4)).unwrap();
        }
        self.mem
            .write_obj(entries.len() as u16, GuestAddress(USED + 2))
            .unwrap();
    }

    fn used_heads(&self, n: u16) -> Vec<u16> {
        (0..n)
            .map(|k| {
                let slot = u64::from(k % self.queue_size);
                let id: u32 = self
                    .mem
                    .read_obj(GuestAddress(USED + 4 + 8 * slot))
                    .unwrap();
                id as u16
            })
            .collect()
    }

    fn wait_used(&self, n: u16, within: Duration) {
        let deadline = Instant::now() + within;
        while self.used_idx() != n {
            assert!(
                Instant::now() < deadline,
                "used index {} after {within:?}, expected {n}",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// One frontend connection with one started queue.
struct Session {
    /// Kept open: dropping it disconnects.
    _frontend: Frontend,
    kick: EventFd,
    _call: EventFd,
}

impl Session {
    /// Connects, negotiates, shares memory and the inflight area (allocating it on
    /// first use) and starts queue 0 at `base`.
    fn start(
        socket: &Path,
        guest: &Guest,
        area: &mut Option<(VhostUserInflight, File)>,
        base: u16,
    ) -> Session {
        let mut frontend = Frontend::connect(socket, 1).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        assert!(features & VIRTIO_F_VERSION_1 != 0);
        frontend
            .set_features(VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES)
            .unwrap();
        let offered = frontend.get_protocol_features().unwrap();
        assert!(offered.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        frontend
            .set_protocol_features(
                VhostUserProtocolFeatures::INFLIGHT_SHMFD | VhostUserProtocolFeatures::REPLY_ACK,
            )
            .unwrap();
        let regions: Vec<_> = guest
            .mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
            .collect();
        frontend.set_mem_table(&regions).unwrap();
        if area.is_none() {
            let request = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: 1,
                queue_size: guest.queue_size,
            };
            *area = Some(frontend.get_inflight_fd(&request).unwrap());
        }
        let (info, file) = area.as_ref().unwrap();
        frontend.set_inflight_fd(info, file.as_raw_fd()).unwrap();
        let host = |a: u64| guest.mem.get_host_address(GuestAddress(a)).unwrap() as u64;
        let config = VringConfigData {
            queue_max_size: guest.queue_size,
            queue_size: guest.queue_size,
            flags: 0,
            desc_table_addr: host(DESC),
            used_ring_addr: host(USED),
            avail_ring_addr: host(AVAIL),
            log_addr: None,
        };
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        frontend.set_vring_num(0, guest.queue_size).unwrap();
        frontend.set_vring_addr(0, &config).unwrap();
        frontend.set_vring_base(0, base).unwrap();
        frontend.set_vring_call(0, &call).unwrap();
        frontend.set_vring_kick(0, &kick).unwrap();
        frontend.set_vring_enable(0, true).unwrap();
        Session {
            _frontend: frontend,
            kick,
            _call: call,
        }
    }

    fn kick(&self) {
        self.kick.write(1).unwrap();
    }
}

fn read_image(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// `kill -9` while a batch of large durable writes is being processed: after a restart
/// with the same inflight area, every request is completed exactly once and its data
/// is on disk.
#[test]
fn requests_in_flight_at_a_kill_complete_exactly_once_after_restart() {
    const N: u16 = 64;
    const LEN: u32 = 1 << 20;
    const QS: u16 = 256;
    let args = ["--queue-size", "256", "--no-write-cache"];
    for attempt in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        make_image(&image, N as usize * LEN as usize, 5);
        let guest = Guest::new(DATA as usize + N as usize * LEN as usize, QS);
        let heads: Vec<u16> = (0..N)
            .map(|i| guest.write_request(i, u64::from(i) * u64::from(LEN), LEN, i as u8 + 1))
            .collect();
        let mut area = None;
        let mut backend = Backend::start(dir.path(), &image, &args);
        let session = Session::start(&backend.socket, &guest, &mut area, 0);
        guest.publish(&heads, 0);
        session.kick();
        // Kill as soon as the first request is back: the rest are in flight.
        let deadline = Instant::now() + Duration::from_secs(30);
        while guest.used_idx() == 0 {
            assert!(Instant::now() < deadline, "no request completed");
            std::hint::spin_loop();
        }
        backend.kill();
        drop(session);
        let at_kill = guest.used_idx();
        if at_kill == N {
            eprintln!("attempt {attempt}: everything completed before the kill; again");
            continue;
        }
        eprintln!("killed with {} of {N} requests not returned", N - at_kill);

        let backend = Backend::start(dir.path(), &image, &args);
        let session = Session::start(&backend.socket, &guest, &mut area, at_kill);
        guest.wait_used(N, Duration::from_secs(60));
        // Nothing more arrives later.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(guest.used_idx(), N);
        let mut seen = guest.used_heads(N);
        seen.sort_unstable();
        assert_eq!(seen, heads, "each request exactly once on the used ring");
        for i in 0..N {
            assert_eq!(guest.status(i), 0, "request {i} status");
            let data = read_image(&image, u64::from(i) * u64::from(LEN), LEN as usize);
            assert!(
                data.iter().all(|&b| b == i as u8 + 1),
                "request {i}: data not on disk"
            );
        }
        let log = std::fs::read_to_string(dir.path().join("backend.log")).unwrap();
        assert!(
            log.contains("resubmitting"),
            "no resubmission logged:\n{log}"
        );
        drop(session);
        return;
    }
    panic!("every attempt completed the whole batch before the kill");
}

/// The state a crashed backend leaves, written into the area by hand: the restarted
/// backend resubmits exactly the requests still marked, skips the one whose used-ring
/// update was not yet recorded, continues the avail ring after them, and then serves
/// new requests.
#[test]
fn recovery_follows_the_spec_for_a_crafted_area() {
    const QS: u16 = 16;
    const LEN: u32 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let original = make_image(&image, 1 << 20, 6);
    let guest = Guest::new(4 << 20, QS);
    let mut area = None;
    {
        // A first backend hands out the area; then it dies.
        let mut backend = Backend::start(dir.path(), &image, &[]);
        let session = Session::start(&backend.socket, &guest, &mut area, 0);
        drop(session);
        backend.kill();
    }
    // Requests: A=0 (block 0), B=1 (block 1), C=2 (block 2), D=3 (block 3).
    let heads: Vec<u16> = (0..4u16)
        .map(|i| guest.write_request(i, u64::from(i) * u64::from(LEN), LEN, b'A' + i as u8))
        .collect();
    guest.publish(&heads, 0);
    // The crashed backend took all four (counters: B=1, A=2, C=3, D=4), completed C
    // (recorded), and put D on the used ring but died before recording it.
    let file = area.as_ref().unwrap().1.try_clone().unwrap();
    let entry = |head: u16, inflight: u8, counter: u64| {
        let mut e = [0u8; 16];
        e[0] = inflight;
        e[8..16].copy_from_slice(&counter.to_le_bytes());
        file.write_all_at(&e, 16 + 16 * u64::from(head)).unwrap();
    };
    entry(heads[1], 1, 1);
    entry(heads[0], 1, 2);
    entry(heads[2], 0, 3);
    entry(heads[3], 1, 4);
    file.write_all_at(&heads[3].to_le_bytes(), 12).unwrap(); // last_batch_head
    file.write_all_at(&1u16.to_le_bytes(), 14).unwrap(); // used_idx recorded
    guest.set_used(&[heads[2], heads[3]]);

    let backend = Backend::start(dir.path(), &image, &[]);
    let session = Session::start(&backend.socket, &guest, &mut area, 2);
    guest.wait_used(4, Duration::from_secs(20));
    let used = guest.used_heads(4);
    let mut resubmitted = used[2..].to_vec();
    resubmitted.sort_unstable();
    assert_eq!(resubmitted, vec![heads[0], heads[1]]);
    for (i, byte) in [(0u64, b'A'), (1, b'B')] {
        assert!(read_image(&image, i * u64::from(LEN), LEN as usize)
            .iter()
            .all(|&b| b == byte));
    }
    // C and D were complete: not executed again (their blocks are untouched here).
    for i in [2u64, 3] {
        let at = (i * u64::from(LEN)) as usize;
        assert!(
            read_image(&image, at as u64, LEN as usize) == original[at..at + LEN as usize],
            "block {i} was written again"
        );
    }
    // New work continues after the four taken requests.
    let e = guest.write_request(4, 4 * u64::from(LEN), LEN, b'E');
    guest.publish(&[e], 4);
    session.kick();
    guest.wait_used(5, Duration::from_secs(20));
    assert_eq!(guest.used_heads(5)[4], e);
    assert_eq!(guest.status(4), 0);
    assert!(read_image(&image, 4 * u64::from(LEN), LEN as usize)
        .iter()
        .all(|&b| b == b'E'));
    // The area records nothing in flight any more.
    let mut bytes = vec![0u8; 16 + 16 * usize::from(QS)];
    file.read_exact_at(&mut bytes, 0).unwrap();
    for h in 0..QS {
        assert_eq!(bytes[16 + 16 * usize::from(h)], 0, "head {h} still marked");
    }
    assert_eq!(u16::from_le_bytes([bytes[14], bytes[15]]), 5);
    drop(session);
}
