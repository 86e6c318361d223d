//! Port-to-port forwarding cost of the switch on one CPU, without a second frontend:
//! one thread plays the driver of p0's TX ring and of p1's RX ring (recycling buffers
//! through host pointers, a few ns per frame) and runs the switch's real data path
//! (`pop_tx`, `Switch::forward` with MAC lookup and one copy into p1's RX buffers,
//! `release_tx`). Also measured: the same frames with no destination (no copy), as in
//! `keel-bench net`'s `rx` test.
//!
//!     cargo run --release -p keel-vhost-net --example fwd_inproc [SECONDS]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use keel_vhost_net::config::{Mac, PortConfig};
use keel_vhost_net::net::{self, TxBatch, HDR_LEN};
use keel_vhost_net::switch::{ForwardScratch, RxTarget, Switch, Vring};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};

const QS: u16 = 256;
const MAC0: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const MAC1: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

/// A split ring the "driver" side fills through host pointers.
struct DriverRing {
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    gpa: (u64, u64, u64),
    last_used: u16,
    avail_idx: u16,
}

impl DriverRing {
    fn new(mem: &GuestMemoryMmap, base: u64) -> DriverRing {
        let p = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap();
        let gpa = (base, base + 0x1000, base + 0x2000);
        DriverRing {
            desc: p(gpa.0),
            avail: p(gpa.1),
            used: p(gpa.2),
            gpa,
            last_used: 0,
            avail_idx: 0,
        }
    }

    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        // SAFETY: descriptor `i < QS` lies in the mapped table of this ring.
        unsafe {
            std::ptr::copy_nonoverlapping(d.as_ptr(), self.desc.add(16 * usize::from(i)), 16)
        };
    }

    fn idx(p: *mut u8) -> &'static AtomicU16 {
        // SAFETY: `p + 2` is the 2-byte aligned index of a mapped ring that lives as
        // long as the program (the memory is never dropped).
        unsafe { AtomicU16::from_ptr(p.add(2) as *mut u16) }
    }

    fn push_avail(&mut self, head: u16) {
        let at = 4 + 2 * usize::from(self.avail_idx % QS);
        // SAFETY: the entry lies in the mapped avail ring.
        unsafe { (self.avail.add(at) as *mut u16).write(head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    fn publish(&self) {
        DriverRing::idx(self.avail).store(self.avail_idx, Ordering::Release);
    }

    /// Re-posts every chain the device returned.
    fn recycle(&mut self) -> u16 {
        let used = DriverRing::idx(self.used).load(Ordering::Acquire);
        let n = used.wrapping_sub(self.last_used);
        while self.last_used != used {
            let at = 4 + 8 * usize::from(self.last_used % QS);
            // SAFETY: the element lies in the mapped used ring.
            let id = unsafe { (self.used.add(at) as *const u32).read() } as u16;
            self.push_avail(id);
            self.last_used = self.last_used.wrapping_add(1);
        }
        self.publish();
        n
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QS).unwrap();
        q.set_size(QS);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (l, h) = split(self.gpa.0);
        q.set_desc_table_address(l, h);
        let (l, h) = split(self.gpa.1);
        q.set_avail_ring_address(l, h);
        let (l, h) = split(self.gpa.2);
        q.set_used_ring_address(l, h);
        q.set_ready(true);
        q
    }
}

fn run(size: usize, forward: bool, secs: f64) -> f64 {
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap(),
    );
    let guard = mem.memory();
    let features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF;
    let switch = Switch::new(Duration::from_secs(300));
    let port = |name: &str, mac| {
        let p = switch
            .add_port(PortConfig {
                name: name.into(),
                socket: format!("/nonexistent/{name}").into(),
                mac: Some(Mac(mac)),
                ..PortConfig::default()
            })
            .unwrap();
        p.set_features(features);
        p
    };
    let p0 = port("p0", MAC0);
    // TX ring of p0 with 256 frames to MAC1.
    let mut tx = DriverRing::new(&guard, 0x10_0000);
    for i in 0..QS {
        let at = 0x40_0000 + 0x800 * u64::from(i);
        let mut f = vec![0u8; HDR_LEN + size];
        f[HDR_LEN..HDR_LEN + 6].copy_from_slice(&MAC1);
        f[HDR_LEN + 6..HDR_LEN + 12].copy_from_slice(&MAC0);
        f[HDR_LEN + 12] = 0x08;
        let host = guard.get_host_address(GuestAddress(at)).unwrap();
        // SAFETY: the buffer at `at` is mapped and 2 KiB long; `f` is at most 1512.
        unsafe { std::ptr::copy_nonoverlapping(f.as_ptr(), host, f.len()) };
        tx.set_desc(i, at, f.len() as u32, 0);
        tx.push_avail(i);
    }
    tx.publish();
    let mut q = tx.queue();
    // RX ring of p1 with 256 buffers of 2 KiB.
    let mut rx = DriverRing::new(&guard, 0x20_0000);
    if forward {
        let p1 = port("p1", MAC1);
        for i in 0..QS {
            rx.set_desc(i, 0x80_0000 + 0x800 * u64::from(i), 2048, 2);
            rx.push_avail(i);
        }
        rx.publish();
        let vring = Vring::new(mem.clone(), QS).unwrap();
        vring.set_queue_size(QS);
        vring.set_queue_info(rx.gpa.0, rx.gpa.1, rx.gpa.2).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        p1.attach(
            0,
            RxTarget {
                vring,
                mem: mem.clone(),
            },
        );
        switch.macs.learn(Mac(MAC1), p1.id, switch.now_ms());
    }
    let arc = guard.clone().into_inner();
    let mut batch = TxBatch::default();
    let mut scratch = ForwardScratch::default();
    let start = Instant::now();
    let mut frames = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..64 {
            net::pop_tx(&mut q, &arc, HDR_LEN, &mut batch, 64).unwrap();
            switch.forward(&p0, 0, &batch, &mut scratch);
            net::release_tx(&mut q, &mut batch);
            batch.clear();
            tx.recycle();
            if forward {
                frames += u64::from(rx.recycle());
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if !forward {
        frames = p0.counters.snapshot().tx_packets;
    }
    frames as f64 / secs
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    println!("| path | frame | Mpps (one CPU, driver included) |");
    println!("|---|---|---|");
    for size in [64usize, 1500] {
        for (name, fwd) in [
            ("switch, no destination", false),
            ("switch + copy to p1", true),
        ] {
            let r = run(size, fwd, secs);
            println!("| {name} | {size} B | {:.2} |", r / 1e6);
        }
    }
}
