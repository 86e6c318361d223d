//! Well-formed and hostile descriptor chains through the real TX/RX data path and the
//! switch, driven by virtio-queue's mock split queue: every malformed chain is dropped
//! and counted, never a panic, never a write outside the buffers the driver gave.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use vhost_user_backend::VringT;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::{Mac, PortConfig};
use crate::net::{self, RxDrop, RxScratch, TxBatch, TxDrop, HDR_LEN, MAX_CHAIN_LEN};
use crate::switch::{CounterSnapshot, ForwardScratch, Port, RxTarget, Switch, Vring};

const MEM_SIZE: usize = 0x40_0000;
const BUF: u64 = 0x10_0000;
const OUTSIDE: u64 = 0x1000_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const QS: u16 = 16;

/// One descriptor: guest address, length, flags.
type Desc = (u64, u32, u16);
const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Chains of (addr, len, flags) descriptors; NEXT links are added within a chain.
fn add_chains(mock: &MockSplitQueue<GuestMemoryMmap>, chains: &[&[(u64, u32, u16)]]) {
    let mut raw = Vec::new();
    for chain in chains {
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let idx = raw.len() as u16;
            let (flags, next) = if i + 1 < chain.len() {
                (flags | VRING_DESC_F_NEXT as u16, idx + 1)
            } else {
                (flags, 0)
            };
            raw.push(RawDescriptor::from(Descriptor::new(addr, len, flags, next)));
        }
    }
    mock.add_desc_chains(&raw, 0).unwrap();
}

/// An Ethernet frame from `src` to `dst` with `len` bytes in all.
fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = (i % 251) as u8;
    }
    f
}

/// Writes a virtio-net header and `f` at `addr`; returns the chain length.
fn put_tx(mem: &GuestMemoryMmap, addr: u64, f: &[u8]) -> u32 {
    mem.write_slice(&[0u8; HDR_LEN], GuestAddress(addr))
        .unwrap();
    mem.write_slice(f, GuestAddress(addr + HDR_LEN as u64))
        .unwrap();
    (HDR_LEN + f.len()) as u32
}

fn pop_one(mem: &GuestMemoryMmap, chains: &[&[(u64, u32, u16)]]) -> (TxBatch, Queue) {
    let mock = MockSplitQueue::new(mem, QS);
    add_chains(&mock, chains);
    let mut q: Queue = mock.create_queue().unwrap();
    let mut batch = TxBatch::default();
    net::pop_tx(&mut q, &Arc::new(mem.clone()), HDR_LEN, &mut batch, 64).unwrap();
    (batch, q)
}

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
const C: [u8; 6] = [0x52, 0x54, 0, 0, 0, 3];
const BCAST: [u8; 6] = [0xff; 6];

#[test]
fn tx_frames_in_one_or_several_buffers() {
    let mem = memory();
    let f = frame(B, A, 60);
    let len = put_tx(&mem, BUF, &f);
    // Header and frame in one buffer; then header, and the frame in two pieces.
    let (batch, _) = pop_one(
        &mem,
        &[
            &[(BUF, len, 0)],
            &[
                (BUF, HDR_LEN as u32, 0),
                (BUF + HDR_LEN as u64, 20, 0),
                (BUF + HDR_LEN as u64 + 20, 40, 0),
            ],
        ],
    );
    assert_eq!(batch.frames.len(), 2);
    for fr in &batch.frames {
        let r = fr.frame.clone().unwrap();
        assert_eq!(batch.bytes(&r), f);
    }
    assert_eq!(batch.frames[1].head, 1);
}

#[test]
fn tx_hostile_chains_are_dropped_with_a_reason() {
    let mem = memory();
    let f = frame(B, A, 60);
    let len = put_tx(&mem, BUF, &f);
    let cases: Vec<(&str, Vec<Desc>, TxDrop)> = vec![
        ("header only", vec![(BUF, HDR_LEN as u32, 0)], TxDrop::Short),
        ("header cut", vec![(BUF, 8, 0)], TxDrop::Short),
        (
            "runt frame",
            vec![(BUF, HDR_LEN as u32 + 13, 0)],
            TxDrop::Short,
        ),
        (
            "oversize",
            vec![(BUF, MAX_CHAIN_LEN as u32, 0), (BUF, 1, 0)],
            TxDrop::Oversize,
        ),
        ("huge length", vec![(BUF, u32::MAX, 0)], TxDrop::Oversize),
        (
            "outside memory",
            vec![(OUTSIDE, len, 0)],
            TxDrop::BadDescriptor,
        ),
        (
            "straddles the end",
            vec![(MEM_SIZE as u64 - 30, len, 0)],
            TxDrop::BadDescriptor,
        ),
        ("writable", vec![(BUF, len, W)], TxDrop::BadDescriptor),
        (
            "writable tail",
            vec![(BUF, len, 0), (BUF, 10, W)],
            TxDrop::BadDescriptor,
        ),
        (
            "indirect table outside memory",
            vec![(OUTSIDE, 32, VRING_DESC_F_INDIRECT as u16)],
            TxDrop::BadDescriptor,
        ),
    ];
    for (what, chain, why) in cases {
        let (batch, _) = pop_one(&mem, &[&chain]);
        assert_eq!(batch.frames.len(), 1, "{what}");
        assert_eq!(batch.frames[0].frame, Err(why), "{what}");
    }
}

#[test]
fn tx_loops_and_bad_next_are_dropped() {
    let mem = memory();
    let f = frame(B, A, 60);
    let len = put_tx(&mem, BUF, &f);
    let n = VRING_DESC_F_NEXT as u16;
    // 0 -> 1 -> 0 -> ...: cut by the chain length limit, dropped.
    let mock = MockSplitQueue::new(&mem, QS);
    let raw = [
        RawDescriptor::from(Descriptor::new(BUF, len, n, 1)),
        RawDescriptor::from(Descriptor::new(BUF, len, n, 0)),
    ];
    mock.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let mut batch = TxBatch::default();
    net::pop_tx(&mut q, &Arc::new(mem.clone()), HDR_LEN, &mut batch, 64).unwrap();
    assert_eq!(batch.frames.len(), 1);
    assert_eq!(batch.frames[0].frame, Err(TxDrop::BadDescriptor));

    // A next index past the table.
    let mock = MockSplitQueue::new(&mem, QS);
    let raw = [RawDescriptor::from(Descriptor::new(BUF, len, n, 200))];
    mock.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    net::pop_tx(&mut q, &Arc::new(mem.clone()), HDR_LEN, &mut batch, 64).unwrap();
    assert_eq!(batch.frames[0].frame, Err(TxDrop::BadDescriptor));

    // An indirect table whose entries loop.
    let table = 0x20_0000u64;
    for (i, d) in [
        Descriptor::new(BUF, len, n, 1),
        Descriptor::new(BUF, len, n, 0),
    ]
    .iter()
    .enumerate()
    {
        mem.write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let (batch, _) = pop_one(&mem, &[&[(table, 32, VRING_DESC_F_INDIRECT as u16)]]);
    assert_eq!(batch.frames[0].frame, Err(TxDrop::BadDescriptor));

    // A valid indirect chain works.
    mem.write_obj(
        RawDescriptor::from(Descriptor::new(BUF, len, 0, 0)),
        GuestAddress(table),
    )
    .unwrap();
    let (batch, _) = pop_one(&mem, &[&[(table, 16, VRING_DESC_F_INDIRECT as u16)]]);
    let r = batch.frames[0].frame.clone().unwrap();
    assert_eq!(batch.bytes(&r), f);
}

#[test]
fn tx_avail_index_far_ahead_is_an_error_not_a_hang() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QS);
    mock.avail().idx().store(1000);
    let mut q: Queue = mock.create_queue().unwrap();
    let mut batch = TxBatch::default();
    assert!(net::pop_tx(&mut q, &Arc::new(mem.clone()), HDR_LEN, &mut batch, 64).is_err());
}

/// Reads used element `i` of a mock queue: (id, len).
fn used_elem(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>, i: u64) -> (u32, u32) {
    let at = mock.used_addr().0 + 4 + 8 * i;
    (
        mem.read_obj(GuestAddress(at)).unwrap(),
        mem.read_obj(GuestAddress(at + 4)).unwrap(),
    )
}

fn used_idx(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
    mem.read_obj(GuestAddress(mock.used_addr().0 + 2)).unwrap()
}

#[test]
fn rx_one_buffer_and_merged_buffers() {
    let mem = memory();
    let f = frame(B, A, 150);
    let mut s = RxScratch::default();

    // One big buffer.
    let mock = MockSplitQueue::new(&mem, QS);
    add_chains(&mock, &[&[(BUF, 2048, W)]]);
    let mut q: Queue = mock.create_queue().unwrap();
    net::write_rx(&mut q, &mem, HDR_LEN, true, &f, &mut s).unwrap();
    assert_eq!(used_elem(&mem, &mock, 0), (0, (HDR_LEN + f.len()) as u32));
    let mut got = vec![0u8; HDR_LEN + f.len()];
    mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(&got[HDR_LEN..], &f[..]);

    // 64-byte buffers: 162 bytes take three chains; num_buffers says so.
    let mock = MockSplitQueue::new(&mem, QS);
    add_chains(
        &mock,
        &[
            &[(BUF, 64, W)],
            &[(BUF + 0x1000, 64, W)],
            &[(BUF + 0x2000, 64, W)],
            &[(BUF + 0x3000, 64, W)],
        ],
    );
    let mut q: Queue = mock.create_queue().unwrap();
    net::write_rx(&mut q, &mem, HDR_LEN, true, &f, &mut s).unwrap();
    assert_eq!(used_idx(&mem, &mock), 3);
    assert_eq!(used_elem(&mem, &mock, 0), (0, 64));
    assert_eq!(used_elem(&mem, &mock, 1), (1, 64));
    assert_eq!(used_elem(&mem, &mock, 2), (2, 34));
    let n: u16 = mem.read_obj(GuestAddress(BUF + 10)).unwrap();
    assert_eq!(n, 3);
    let mut got = Vec::new();
    for (i, len) in [(0u64, 64usize), (1, 64), (2, 34)] {
        let mut b = vec![0u8; len];
        mem.read_slice(&mut b, GuestAddress(BUF + 0x1000 * i))
            .unwrap();
        got.extend_from_slice(&b);
    }
    assert_eq!(&got[HDR_LEN..], &f[..]);
    assert_eq!(q.next_avail(), 3);
}

#[test]
fn rx_shortages_leave_the_queue_untouched() {
    let mem = memory();
    let f = frame(B, A, 150);
    let mut s = RxScratch::default();
    // No buffers at all.
    let mock = MockSplitQueue::new(&mem, QS);
    let mut q: Queue = mock.create_queue().unwrap();
    assert_eq!(
        net::write_rx(&mut q, &mem, HDR_LEN, true, &f, &mut s),
        Err(RxDrop::NoBuffer)
    );
    // Merged buffers, but not enough of them.
    let mock = MockSplitQueue::new(&mem, QS);
    add_chains(&mock, &[&[(BUF, 64, W)], &[(BUF + 0x1000, 64, W)]]);
    let mut q: Queue = mock.create_queue().unwrap();
    assert_eq!(
        net::write_rx(&mut q, &mem, HDR_LEN, true, &f, &mut s),
        Err(RxDrop::NoBuffer)
    );
    assert_eq!((q.next_avail(), used_idx(&mem, &mock)), (0, 0));
    // Without MRG_RXBUF a frame must fit one chain.
    assert_eq!(
        net::write_rx(&mut q, &mem, HDR_LEN, false, &f, &mut s),
        Err(RxDrop::TooBig)
    );
    assert_eq!((q.next_avail(), used_idx(&mem, &mock)), (0, 0));
    // A small frame still fits.
    let small = frame(B, A, 40);
    net::write_rx(&mut q, &mem, HDR_LEN, false, &small, &mut s).unwrap();
    assert_eq!(used_elem(&mem, &mock, 0), (0, 52));
}

#[test]
fn rx_hostile_chains_are_returned_empty() {
    let mem = memory();
    let f = frame(B, A, 60);
    let mut s = RxScratch::default();
    let cases: Vec<(&str, Vec<Desc>)> = vec![
        ("readable buffer", vec![(BUF, 2048, 0)]),
        ("outside memory", vec![(OUTSIDE, 2048, W)]),
        ("straddles the end", vec![(MEM_SIZE as u64 - 20, 2048, W)]),
        ("zero length", vec![(BUF, 0, W)]),
        (
            "indirect outside memory",
            vec![(OUTSIDE, 32, VRING_DESC_F_INDIRECT as u16)],
        ),
    ];
    for (what, chain) in cases {
        let mock = MockSplitQueue::new(&mem, QS);
        add_chains(&mock, &[&chain]);
        let mut q: Queue = mock.create_queue().unwrap();
        assert_eq!(
            net::write_rx(&mut q, &mem, HDR_LEN, true, &f, &mut s),
            Err(RxDrop::BadDescriptor),
            "{what}"
        );
        assert_eq!(used_idx(&mem, &mock), 1, "{what}");
        assert_eq!(used_elem(&mem, &mock, 0), (0, 0), "{what}");
    }
    // A looping RX chain.
    let n = VRING_DESC_F_NEXT as u16;
    let mock = MockSplitQueue::new(&mem, QS);
    let raw = [
        RawDescriptor::from(Descriptor::new(BUF, 4, W | n, 1)),
        RawDescriptor::from(Descriptor::new(BUF, 4, W | n, 0)),
    ];
    mock.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    assert_eq!(
        net::write_rx(&mut q, &mem, HDR_LEN, true, &f, &mut s),
        Err(RxDrop::BadDescriptor)
    );
}

/// A switch with ports whose queues live in one shared guest memory.
struct Bench {
    switch: Switch,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ports: Vec<Arc<Port>>,
}

impl Bench {
    /// Ports p0..pN with the given MACs; each RX queue gets 16 chains of 2 KiB.
    fn new(macs: &[Option<[u8; 6]>]) -> Bench {
        Bench::with_pairs(macs, 1)
    }

    /// Like [`Bench::new`], with `pairs` queue pairs per port (at most 2 ports then).
    fn with_pairs(macs: &[Option<[u8; 6]>], pairs: u16) -> Bench {
        let mem = GuestMemoryAtomic::new(memory());
        let switch = Switch::new(Duration::from_secs(300));
        let mut ports = Vec::new();
        for (i, mac) in macs.iter().enumerate() {
            let port = switch
                .add_port(PortConfig {
                    name: format!("p{i}"),
                    socket: format!("/nonexistent/p{i}.sock").into(),
                    mac: mac.map(Mac),
                    queues: pairs,
                    ..PortConfig::default()
                })
                .unwrap();
            port.set_features(FEATURES);
            for pair in 0..usize::from(pairs) {
                let k = i * usize::from(pairs) + pair;
                port.attach(pair, Bench::rx_queue(&mem, k));
            }
            ports.push(port);
        }
        Bench { switch, mem, ports }
    }

    /// RX queue number `i` of the bench (its own ring and buffers).
    fn rx_queue(mem: &GuestMemoryAtomic<GuestMemoryMmap>, i: usize) -> RxTarget {
        {
            let base = 0x1_0000 * i as u64;
            let guard = mem.memory();
            let mock = MockSplitQueue::create(&*guard, GuestAddress(base), QS);
            let bufs: Vec<[(u64, u32, u16); 1]> = (0..QS as u64)
                .map(|j| [(0x20_0000 + 0x4_0000 * i as u64 + 0x800 * j, 2048, W)])
                .collect();
            let chains: Vec<&[(u64, u32, u16)]> = bufs.iter().map(|b| &b[..]).collect();
            add_chains(&mock, &chains);
            let vring = Vring::new(mem.clone(), QS).unwrap();
            vring.set_queue_size(QS);
            // The mock places its used ring over the end of its avail ring (it counts the
            // avail ring's length in entries, not bytes): use a separate used ring.
            vring
                .set_queue_info(mock.desc_table_addr().0, mock.avail_addr().0, base + 0x8000)
                .unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            RxTarget {
                vring,
                mem: mem.clone(),
            }
        }
    }

    /// Port `from` sends `frames` on its first queue pair.
    fn send(&self, from: usize, frames: &[Vec<u8>]) {
        self.send_on(from, 0, frames);
    }

    /// Port `from` sends `frames` on queue pair `pair`.
    fn send_on(&self, from: usize, pair: usize, frames: &[Vec<u8>]) {
        let guard = self.mem.memory();
        let mock = MockSplitQueue::create(&*guard, GuestAddress(0x30_0000), 64);
        let mut chains = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let addr = 0x31_0000 + 0x1000 * i as u64;
            chains.push([(addr, put_tx(&guard, addr, f), 0u16)]);
        }
        let refs: Vec<&[(u64, u32, u16)]> = chains.iter().map(|c| &c[..]).collect();
        add_chains(&mock, &refs);
        let mut q: Queue = mock.create_queue().unwrap();
        let mut batch = TxBatch::default();
        net::pop_tx(&mut q, &guard.clone().into_inner(), HDR_LEN, &mut batch, 64).unwrap();
        let mut scratch = ForwardScratch::default();
        self.switch
            .forward(&self.ports[from], pair, &batch, &mut scratch);
        net::release_tx(&mut q, &mut batch);
    }

    fn counters(&self, port: usize) -> CounterSnapshot {
        self.ports[port].counters.snapshot()
    }
}

#[test]
fn switch_floods_learns_and_delivers_unicast() {
    let b = Bench::new(&[Some(A), Some(B), None]);
    // Unknown destination: flooded to p1 and p2.
    b.send(0, &[frame(B, A, 60)]);
    assert_eq!(b.counters(0).tx_packets, 1);
    assert_eq!(b.counters(1).rx_packets, 1);
    assert_eq!(b.counters(2).rx_packets, 1);
    // p1 answers A: learned, so only p0 gets it; p1's MAC is learned too.
    b.send(1, &[frame(A, B, 60)]);
    assert_eq!(b.counters(0).rx_packets, 1);
    assert_eq!(b.counters(2).rx_packets, 1);
    // Now A -> B is unicast to p1 only.
    b.send(0, &[frame(B, A, 100), frame(B, A, 100)]);
    assert_eq!(b.counters(1).rx_packets, 3);
    assert_eq!(b.counters(1).rx_bytes, 260);
    assert_eq!(b.counters(2).rx_packets, 1);
    // Broadcast goes everywhere else.
    b.send(2, &[frame(BCAST, C, 60)]);
    assert_eq!(b.counters(0).rx_packets, 2);
    assert_eq!(b.counters(1).rx_packets, 4);
    assert_eq!(b.counters(2).rx_packets, 1);
    assert_eq!(b.switch.macs.len(), 3);
    // A frame addressed to its own port goes nowhere.
    b.send(0, &[frame(A, A, 60)]);
    assert_eq!(b.counters(1).rx_packets, 4);
    // Removing a port forgets its addresses: B is unknown again and floods to p2.
    b.switch.remove_port("p1").unwrap();
    b.send(0, &[frame(B, A, 60)]);
    assert_eq!(b.counters(2).rx_packets, 2);
}

#[test]
fn switch_drops_spoofed_and_hostile_frames_and_counts_them() {
    let b = Bench::new(&[Some(A), None]);
    let mut bad = frame(B, C, 60);
    b.send(0, &[bad.clone(), frame(B, A, 60)]);
    let c = b.counters(0);
    assert_eq!((c.drop_spoofed, c.tx_packets), (1, 1));
    assert_eq!(b.counters(1).rx_packets, 1);
    // The spoofed source was not learned.
    assert!(b.switch.macs.lookup(&Mac(C), b.switch.now_ms()).is_none());
    // p1 has no configured MAC: any source is fine.
    bad[6] = 0x02;
    b.send(1, &[bad]);
    assert_eq!(b.counters(1).tx_packets, 1);
    // Runts count as short.
    b.send(0, &[vec![0u8; 10]]);
    assert_eq!(b.counters(0).drop_short, 1);
}

#[test]
fn queue_pairs_have_their_own_counters_that_add_up_to_the_port_totals() {
    let b = Bench::with_pairs(&[Some(A), None], 2);
    // Pair 1 of p0 sends two frames and a spoofed one: they land on p1's pair 1.
    b.send_on(0, 1, &[frame(B, A, 60), frame(B, A, 100), frame(B, C, 60)]);
    // Pair 0 sends 20: 16 fit p1's pair 0 RX ring, 4 find no buffer.
    let many: Vec<Vec<u8>> = (0..20).map(|_| frame(B, A, 60)).collect();
    b.send_on(0, 0, &many);
    let s0 = b.ports[0].stats();
    let s1 = b.ports[1].stats();
    assert_eq!(s0.pairs.len(), 2);
    let (t0, t1) = (s0.pairs[0], s0.pairs[1]);
    assert_eq!((t0.tx_packets, t0.tx_bytes, t0.tx_drops), (20, 1200, 0));
    assert_eq!((t1.tx_packets, t1.tx_bytes, t1.tx_drops), (2, 160, 1));
    let (r0, r1) = (s1.pairs[0], s1.pairs[1]);
    assert_eq!((r0.rx_packets, r0.rx_bytes, r0.rx_drops), (16, 960, 4));
    assert_eq!((r1.rx_packets, r1.rx_bytes, r1.rx_drops), (2, 160, 0));
    assert_eq!((r0.tx_packets, r1.tx_packets), (0, 0));
    // Port totals are the sums.
    assert_eq!(s0.counters.tx_packets, t0.tx_packets + t1.tx_packets);
    assert_eq!(s1.counters.rx_packets, r0.rx_packets + r1.rx_packets);
    assert_eq!(s1.counters.drop_rx_no_buffer, 4);
    // The JSON the control socket sends has the pairs under "pairs".
    let v = serde_json::to_value(&s1).unwrap();
    assert_eq!(v["pairs"][1]["rx_packets"], 2);
    assert_eq!(v["rx_packets"], 18);
}

#[test]
fn switch_counts_a_full_or_stopped_rx_queue() {
    let b = Bench::new(&[None, None]);
    // 16 RX chains: 20 frames, 4 dropped for want of buffers.
    let frames: Vec<Vec<u8>> = (0..20).map(|_| frame(B, A, 60)).collect();
    b.send(0, &frames);
    let c = b.counters(1);
    assert_eq!((c.rx_packets, c.drop_rx_no_buffer), (16, 4), "{c:?}");
    assert_eq!(b.counters(0).tx_packets, 20);
    // Once p1 is known, unicast to a detached port counts as not ready.
    b.send(1, &[frame(A, B, 60)]);
    b.ports[1].detach();
    b.send(0, &[frame(B, A, 60)]);
    assert_eq!(b.counters(1).drop_rx_not_ready, 1);
}

#[test]
fn mac_table_ages_entries() {
    let t = crate::switch::MacTable::new(Duration::from_secs(1));
    t.learn(Mac(A), 7, 0);
    assert_eq!(t.lookup(&Mac(A), 500), Some(7));
    assert_eq!(t.lookup(&Mac(A), 1001), None);
    t.learn(Mac(A), 8, 1500);
    assert_eq!(t.lookup(&Mac(A), 1600), Some(8));
    t.expire(5000);
    assert!(t.is_empty());
}

/// A frame with a virtio-net header `hdr` sent by port `from` (queue size 64).
fn send_with_header(b: &Bench, from: usize, frames: &[Vec<u8>], hdr: &[u8; HDR_LEN]) {
    let guard = b.mem.memory();
    let mock = MockSplitQueue::create(&*guard, GuestAddress(0x30_0000), 64);
    let mut chains = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let addr = 0x31_0000 + 0x1000 * i as u64;
        let len = put_tx(&guard, addr, f);
        guard.write_slice(hdr, GuestAddress(addr)).unwrap();
        chains.push([(addr, len, 0u16)]);
    }
    let refs: Vec<&[(u64, u32, u16)]> = chains.iter().map(|c| &c[..]).collect();
    add_chains(&mock, &refs);
    let mut q: Queue = mock.create_queue().unwrap();
    let mut batch = TxBatch::default();
    net::pop_tx(&mut q, &guard.clone().into_inner(), HDR_LEN, &mut batch, 64).unwrap();
    let mut scratch = ForwardScratch::default();
    b.switch.forward(&b.ports[from], 0, &batch, &mut scratch);
    net::release_tx(&mut q, &mut batch);
}

/// What port `port` received in its RX chain `j`: header and frame.
fn received(b: &Bench, port: usize, j: u64, len: usize) -> ([u8; HDR_LEN], Vec<u8>) {
    let guard = b.mem.memory();
    let at = 0x20_0000 + 0x4_0000 * port as u64 + 0x800 * j;
    let mut h = [0u8; HDR_LEN];
    guard.read_slice(&mut h, GuestAddress(at)).unwrap();
    let mut f = vec![0u8; len];
    guard
        .read_slice(&mut f, GuestAddress(at + HDR_LEN as u64))
        .unwrap();
    (h, f)
}

fn vnet(flags: u8, gso: u8, csum_start: u16, csum_offset: u16) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    h[2..4].copy_from_slice(&54u16.to_le_bytes());
    h[4..6].copy_from_slice(&1448u16.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    h
}

#[test]
fn offload_headers_pass_between_ports_that_negotiated_them() {
    use crate::offload::{self, GSO_TCPV4, HDR_F_NEEDS_CSUM};
    // p0 and p1 negotiated every offload, p2 none.
    let b = Bench::new(&[None, None, None]);
    b.ports[0].set_features(FEATURES | offload::OFFLOAD_FEATURES);
    b.ports[1].set_features(FEATURES | offload::OFFLOAD_FEATURES);
    // A partial UDP checksum: csum_start 34, offset 6, the field holds the pseudo sum.
    let pseudo: u16 = 0x1d2c;
    let mut f = frame(BCAST, A, 120);
    f[40..42].copy_from_slice(&pseudo.to_be_bytes());
    send_with_header(&b, 0, &[f.clone()], &vnet(HDR_F_NEEDS_CSUM, 0, 34, 6));
    // p1 gets the header and the frame as they were.
    let (h, got) = received(&b, 1, 0, f.len());
    assert_eq!((h[0], h[1], &h[6..10]), (1, 0, &[34, 0, 6, 0][..]));
    assert_eq!(u16::from_le_bytes([h[10], h[11]]), 1);
    assert_eq!(got, f);
    // p2 gets a complete checksum and a plain header.
    let (h, got) = received(&b, 2, 0, f.len());
    assert_eq!(&h[..10], &[0u8; 10]);
    assert_ne!(got[40..42], f[40..42]);
    let mut sum = u32::from(pseudo);
    for c in got[34..].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    assert_eq!(sum, 0xffff, "checksum does not verify");
    assert_eq!(&got[..40], &f[..40]);
    assert_eq!(&got[42..], &f[42..]);

    // A TSO frame: p1 takes it with its GSO header, p2 cannot and counts a drop.
    let big = frame(BCAST, A, 1500);
    send_with_header(&b, 0, &[big], &vnet(HDR_F_NEEDS_CSUM, GSO_TCPV4, 34, 16));
    let (h, _) = received(&b, 1, 1, 10);
    assert_eq!((h[0], h[1]), (HDR_F_NEEDS_CSUM, GSO_TCPV4));
    assert_eq!(u16::from_le_bytes([h[4], h[5]]), 1448);
    assert_eq!(b.counters(1).rx_packets, 2);
    assert_eq!(b.counters(2).rx_packets, 1);
    assert_eq!(b.counters(2).drop_rx_offload, 1);

    // p2 did not negotiate CSUM/TSO: whatever header it sends is cleared.
    send_with_header(&b, 2, &[frame(BCAST, C, 80)], &vnet(1, GSO_TCPV4, 34, 16));
    let (h, _) = received(&b, 1, 2, 10);
    assert_eq!(&h[..10], &[0u8; 10]);
    assert_eq!(b.counters(1).rx_packets, 3);
    assert_eq!(b.counters(1).drop_rx_offload, 0);
}

#[test]
fn rate_limits_drop_and_count() {
    let b = Bench::new(&[None, None]);
    // 8 Mbit/s: the bucket holds one 64 KiB frame's worth (65562 bytes).
    b.ports[0].limiter.set(8_000_000, 0);
    let frames: Vec<Vec<u8>> = (0..64).map(|_| frame(B, A, 1000)).collect();
    b.send(0, &frames);
    b.send(0, &frames);
    let c = b.counters(0);
    assert_eq!(c.tx_packets + c.drop_rate_limit, 128, "{c:?}");
    // Tokens also refill while the test runs (1 frame per ms at this rate): a loaded
    // machine lets a few more through, never fewer.
    assert!((30..=63).contains(&c.drop_rate_limit), "{c:?}");
    // Packets per second, and lifting the limit.
    let b = Bench::new(&[None, None]);
    b.ports[0].limiter.set(0, 1000);
    b.send(0, &frames);
    b.send(0, &frames);
    let c = b.counters(0);
    assert!((64..=100).contains(&c.tx_packets), "{c:?}");
    assert!(c.drop_rate_limit > 0, "{c:?}");
    b.ports[0].limiter.set(0, 0);
    b.send(0, &frames);
    assert_eq!(b.counters(0).drop_rate_limit, c.drop_rate_limit);
}

#[test]
fn buffers_spanning_two_memory_regions_are_split_not_dropped() {
    // Two adjacent regions, separately mapped: a buffer across the boundary is read and
    // written in two pieces.
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x20_0000),
        (GuestAddress(0x20_0000), 0x20_0000),
    ])
    .unwrap();
    let f = frame(B, A, 100);
    let at = 0x20_0000 - 40;
    let len = put_tx(&mem, at, &f);
    let (batch, _) = pop_one(&mem, &[&[(at, len, 0)]]);
    let r = batch.frames[0].frame.clone().unwrap();
    assert_eq!(batch.bytes(&r), f);
    assert_eq!(r.eth[..6], B);

    let mock = MockSplitQueue::new(&mem, QS);
    add_chains(&mock, &[&[(0x20_0000 - 16, 512, W)]]);
    let mut q: Queue = mock.create_queue().unwrap();
    let mut s = RxScratch::default();
    net::write_rx(&mut q, &mem, HDR_LEN, true, &f, &mut s).unwrap();
    let mut got = vec![0u8; HDR_LEN + f.len()];
    mem.read_slice(&mut got, GuestAddress(0x20_0000 - 16))
        .unwrap();
    assert_eq!(&got[HDR_LEN..], &f[..]);
    assert_eq!(used_elem(&mem, &mock, 0), (0, (HDR_LEN + f.len()) as u32));
}

#[test]
fn rings_outside_memory_are_refused_without_a_panic() {
    use crate::net::QueueBroken;
    let mem = memory();
    for (d, a, u) in [
        (OUTSIDE, 0x2000, 0x3000),
        (0x1000, OUTSIDE, 0x3000),
        (0x1000, 0x2000, OUTSIDE),
        // The used ring runs past the end of memory.
        (0x1000, 0x2000, MEM_SIZE as u64 - 8),
        // The descriptor table runs past the end of memory (misaligned addresses are
        // refused by the queue itself).
        (MEM_SIZE as u64 - 16, 0x2000, 0x3000),
    ] {
        let mut q = Queue::new(QS).unwrap();
        q.set_size(QS);
        q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
        q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
        q.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
        q.set_ready(true);
        let mut batch = TxBatch::default();
        assert!(matches!(
            net::pop_tx(&mut q, &Arc::new(mem.clone()), HDR_LEN, &mut batch, 64),
            Err(QueueBroken::Unmapped)
        ));
        let mut s = RxScratch::default();
        assert_eq!(
            net::write_rx(&mut q, &mem, HDR_LEN, true, &frame(B, A, 60), &mut s),
            Err(RxDrop::BadDescriptor)
        );
    }
}

#[test]
fn indirect_tables_outside_memory_or_nested_are_dropped() {
    let mem = memory();
    let f = frame(B, A, 60);
    let len = put_tx(&mem, BUF, &f);
    let ind = VRING_DESC_F_INDIRECT as u16;
    // The table itself outside memory; a table whose length is not a multiple of 16.
    let (batch, _) = pop_one(&mem, &[&[(OUTSIDE, 32, ind)], &[(0x20_0000, 20, ind)]]);
    assert_eq!(batch.frames[0].frame, Err(TxDrop::BadDescriptor));
    assert_eq!(batch.frames[1].frame, Err(TxDrop::BadDescriptor));
    // An indirect descriptor inside an indirect table.
    let table = 0x20_0000u64;
    mem.write_obj(
        RawDescriptor::from(Descriptor::new(table, 16, ind, 0)),
        GuestAddress(table),
    )
    .unwrap();
    let (batch, _) = pop_one(&mem, &[&[(table, 16, ind)]]);
    assert_eq!(batch.frames[0].frame, Err(TxDrop::BadDescriptor));
    // A writable buffer from an indirect table on the TX queue.
    mem.write_obj(
        RawDescriptor::from(Descriptor::new(BUF, len, W, 0)),
        GuestAddress(table),
    )
    .unwrap();
    let (batch, _) = pop_one(&mem, &[&[(table, 16, ind)]]);
    assert_eq!(batch.frames[0].frame, Err(TxDrop::BadDescriptor));
}

#[test]
fn gso_frames_are_segmented_for_ports_without_tso() {
    use crate::offload::{self, GSO_ECN, GSO_TCPV4, GSO_TCPV6, GSO_UDP};
    use crate::segment::tests::{check_segment, gso_hdr, tcp_frame};
    // p0 sends with every offload; p1 takes them; p2 takes none.
    let b = Bench::new(&[Some(B), None, None]);
    b.ports[0].set_features(FEATURES | offload::OFFLOAD_FEATURES);
    b.ports[1].set_features(FEATURES | offload::OFFLOAD_FEATURES);
    let mss = 1448usize;
    let payload = 3 * mss + 517;
    // The frame's source is B (its destination A is unknown: flooded to p1 and p2).
    let mut v4 = tcp_frame(true, false, payload, 0x19);
    v4[..12].copy_from_slice(&[A, B].concat());
    send_with_header(&b, 0, &[v4.clone()], &gso_hdr(GSO_TCPV4, 70, mss as u16));
    // p1 negotiated TSO4: one frame with the GSO header.
    let (h, got) = received(&b, 1, 0, 2048 - HDR_LEN);
    assert_eq!((h[1], u16::from_le_bytes([h[4], h[5]])), (GSO_TCPV4, 1448));
    assert_eq!(got[..], v4[..2048 - HDR_LEN]);
    assert_eq!(b.counters(1).rx_packets, 1);
    assert_eq!(b.counters(1).sw_segmented, 0);
    // p2: four segments, each with a plain header and complete checksums.
    let mut data = Vec::new();
    let mut rx_bytes = 0;
    for k in 0..4u64 {
        let len = 14 + 24 + 32 + if k == 3 { 517 } else { mss };
        let (h, seg) = received(&b, 2, k, len);
        assert_eq!(&h[..10], &[0u8; 10]);
        assert_eq!(u16::from_le_bytes([h[10], h[11]]), 1);
        let (id, seq, flags, d) = check_segment(&seg, true);
        assert_eq!(id, 0xabcdu16.wrapping_add(k as u16));
        assert_eq!(seq, 0xffff_f000u32.wrapping_add(k as u32 * 1448));
        assert_eq!(flags, if k == 3 { 0x19 } else { 0x10 });
        data.extend_from_slice(&d);
        rx_bytes += len as u64;
    }
    assert_eq!(data[..], v4[v4.len() - payload..]);
    let c = b.counters(2);
    assert_eq!(
        (c.rx_packets, c.rx_bytes, c.sw_segmented, c.drop_rx_offload),
        (4, rx_bytes, 1, 0)
    );
    let pair = b.ports[2].stats().pairs[0];
    assert_eq!(
        (pair.rx_packets, pair.rx_bytes, pair.rx_drops),
        (4, rx_bytes, 0)
    );
    let json = serde_json::to_value(b.ports[2].stats()).unwrap();
    assert_eq!(json["sw_segmented"], 1);

    // TCPv6 with ECN, in a VLAN: p2 gets two segments (chains 4 and 5).
    let mut v6 = tcp_frame(false, true, 2000, 0x90);
    v6[..12].copy_from_slice(&[A, B].concat());
    send_with_header(&b, 0, &[v6], &gso_hdr(GSO_TCPV6 | GSO_ECN, 0, 1000));
    for (k, flags) in [(4u64, 0x90), (5, 0x10)] {
        let (_, mut seg) = received(&b, 2, k, 18 + 40 + 32 + 1000);
        assert_eq!(&seg[12..16], &[0x81, 0, 0, 7]);
        seg.drain(12..16);
        let (_, _, fl, d) = check_segment(&seg, false);
        assert_eq!((fl, d.len()), (flags, 1000));
    }
    assert_eq!(b.counters(2).sw_segmented, 2);

    // Hostile or unsupported: gso_size 0, IPv4 GSO type on IPv6, UDP GSO, a truncated
    // TCP header. Dropped and counted, nothing written.
    let mut short = v4[..60].to_vec();
    short[16..18].copy_from_slice(&46u16.to_be_bytes());
    let v6 = {
        let mut f = tcp_frame(false, false, 3000, 0x10);
        f[..12].copy_from_slice(&[A, B].concat());
        f
    };
    for (f, h) in [
        (&v4, gso_hdr(GSO_TCPV4, 70, 0)),
        (&v6, gso_hdr(GSO_TCPV4, 0, 1448)),
        (&v4, gso_hdr(GSO_UDP, 0, 1448)),
        (&short, gso_hdr(GSO_TCPV4, 0, 1448)),
    ] {
        send_with_header(&b, 0, std::slice::from_ref(f), &h);
    }
    let c = b.counters(2);
    assert_eq!((c.rx_packets, c.drop_rx_offload, c.sw_segmented), (6, 4, 2));
    assert_eq!(b.ports[2].stats().pairs[0].rx_drops, 4);

    // Ten segments for the ten RX chains left: all delivered; then the next frame
    // finds no buffer and counts as one no-buffer drop.
    send_with_header(&b, 0, &[v4.clone()], &gso_hdr(GSO_TCPV4, 0, 490));
    let c = b.counters(2);
    assert_eq!(
        (c.rx_packets, c.sw_segmented, c.drop_rx_no_buffer),
        (16, 3, 0)
    );
    let (_, seg) = received(&b, 2, 15, 14 + 24 + 32 + 4861 - 9 * 490);
    assert_eq!(check_segment(&seg, true).2, 0x19);
    send_with_header(&b, 0, &[v4], &gso_hdr(GSO_TCPV4, 0, 1448));
    let c = b.counters(2);
    assert_eq!((c.rx_packets, c.drop_rx_no_buffer), (16, 1));
}

/// TX frames of the given lengths (A to B), popped into a batch from a queue at
/// 0x30_0000 (frames at 0x31_0000 + 4 KiB each).
fn tx_batch(mem: &GuestMemoryMmap, lens: &[usize]) -> (TxBatch, Vec<Vec<u8>>) {
    let mock = MockSplitQueue::create(mem, GuestAddress(0x30_0000), 64);
    let frames: Vec<Vec<u8>> = lens.iter().map(|&l| frame(B, A, l)).collect();
    let mut chains = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let addr = 0x31_0000 + 0x1000 * i as u64;
        chains.push([(addr, put_tx(mem, addr, f), 0u16)]);
    }
    let refs: Vec<&[(u64, u32, u16)]> = chains.iter().map(|c| &c[..]).collect();
    add_chains(&mock, &refs);
    let mut q: Queue = mock.create_queue().unwrap();
    let mut batch = TxBatch::default();
    net::pop_tx(&mut q, &Arc::new(mem.clone()), HDR_LEN, &mut batch, 64).unwrap();
    (batch, frames)
}

/// Writes every frame of `batch` (plain headers) into `mock`'s queue with
/// [`net::RxWriter::write_batch`]; returns what it did and the queue.
fn write_batch(
    mem: &GuestMemoryMmap,
    mock: &MockSplitQueue<GuestMemoryMmap>,
    batch: &TxBatch,
    mrg: bool,
) -> (net::RxTally, Queue) {
    let mut q: Queue = mock.create_queue().unwrap();
    let mut s = RxScratch::default();
    s.jobs
        .extend((0..batch.frames.len()).map(|frame| net::RxJob {
            frame,
            hdr: net::plain_header(HDR_LEN),
        }));
    let mut w = net::RxWriter::new(&mut q, mem).unwrap();
    let t = w.write_batch(batch, HDR_LEN, mrg, &mut s);
    w.finish();
    (t, q)
}

/// The bytes of used element `i`'s chain (one buffer each in these tests).
fn rx_chain_bytes(mem: &GuestMemoryMmap, addr: u64, len: u32) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
    b
}

#[test]
fn rx_batches_write_every_frame_whole_and_in_order() {
    let mem = memory();
    let (batch, frames) = tx_batch(&mem, &[60, 150, 60, 300, 60]);
    // Frame 0 in one chain, frame 1 across three 64-byte chains, frame 2 meets a
    // readable (bad) chain, frame 3 fits the next, frame 4 finds no buffer.
    let mock = MockSplitQueue::new(&mem, QS);
    add_chains(
        &mock,
        &[
            &[(BUF, 2048, W)],
            &[(BUF + 0x1000, 64, W)],
            &[(BUF + 0x2000, 64, W)],
            &[(BUF + 0x3000, 64, W)],
            &[(BUF + 0x4000, 2048, 0)],
            &[(BUF + 0x5000, 2048, W)],
        ],
    );
    let (t, q) = write_batch(&mem, &mock, &batch, true);
    assert_eq!(
        t,
        net::RxTally {
            frames: 3,
            bytes: 60 + 150 + 300,
            no_buffer: 1,
            too_big: 0,
            bad_descriptor: 1,
        }
    );
    assert_eq!(used_idx(&mem, &mock), 6);
    let used: Vec<(u32, u32)> = (0..6).map(|i| used_elem(&mem, &mock, i)).collect();
    assert_eq!(used, [(0, 72), (1, 64), (2, 64), (3, 34), (4, 0), (5, 312)]);
    assert_eq!(q.next_avail(), 6);
    // Frame 0 and frame 3: one buffer each, num_buffers 1.
    for (addr, f) in [(BUF, &frames[0]), (BUF + 0x5000, &frames[3])] {
        let got = rx_chain_bytes(&mem, addr, (HDR_LEN + f.len()) as u32);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(&got[HDR_LEN..], &f[..]);
    }
    // Frame 1: num_buffers 3, the bytes across the three chains.
    let mut got = Vec::new();
    for (i, len) in [(1u64, 64u32), (2, 64), (3, 34)] {
        got.extend(rx_chain_bytes(&mem, BUF + 0x1000 * i, len));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(&got[HDR_LEN..], &frames[1][..]);
}

#[test]
fn rx_batches_without_merged_buffers_skip_frames_that_do_not_fit() {
    let mem = memory();
    let (batch, frames) = tx_batch(&mem, &[150, 60, 60]);
    let mock = MockSplitQueue::new(&mem, QS);
    add_chains(&mock, &[&[(BUF, 100, W)], &[(BUF + 0x1000, 100, W)]]);
    let (t, q) = write_batch(&mem, &mock, &batch, false);
    // The 150-byte frame does not fit a 100-byte chain and leaves it for the next.
    assert_eq!((t.frames, t.too_big, t.no_buffer), (2, 1, 0));
    assert_eq!(used_elem(&mem, &mock, 0), (0, 72));
    assert_eq!(used_elem(&mem, &mock, 1), (1, 72));
    for (i, f) in [(0u64, &frames[1]), (1, &frames[2])] {
        let got = rx_chain_bytes(&mem, BUF + 0x1000 * i, 72);
        assert_eq!(&got[HDR_LEN..], &f[..]);
    }
    assert_eq!(q.next_avail(), 2);

    // One chain only: the big frame is too big (not "no buffer"), and the small one
    // after it still gets the chain.
    let mock = MockSplitQueue::new(&mem, QS);
    add_chains(&mock, &[&[(BUF, 100, W)]]);
    let (t, q) = write_batch(&mem, &mock, &batch, false);
    assert_eq!((t.frames, t.too_big, t.no_buffer), (1, 1, 1));
    assert_eq!(used_elem(&mem, &mock, 0), (0, 72));
    assert_eq!(q.next_avail(), 1);
}

#[test]
fn rx_batches_hold_a_bounded_number_of_pieces() {
    let mem = memory();
    let (batch, frames) = tx_batch(&mem, &[1100, 60, 60]);
    // Chain 0: an indirect table of one-byte buffers at consecutive addresses, so
    // frame 0 alone takes 1112 pieces (more than a round holds); chains 1 and 2: one
    // buffer each.
    let table = BUF + 0x8_0000;
    let n = (HDR_LEN + 1100) as u64;
    for i in 0..n {
        let next = if i + 1 < n {
            VRING_DESC_F_NEXT as u16
        } else {
            0
        };
        let d = RawDescriptor::from(Descriptor::new(BUF + i, 1, W | next, (i + 1) as u16));
        mem.write_obj(d, GuestAddress(table + 16 * i)).unwrap();
    }
    let mock = MockSplitQueue::new(&mem, QS);
    add_chains(
        &mock,
        &[
            &[(table, (16 * n) as u32, VRING_DESC_F_INDIRECT as u16)],
            &[(BUF + 0x1000, 2048, W)],
            &[(BUF + 0x2000, 2048, W)],
        ],
    );
    let (t, q) = write_batch(&mem, &mock, &batch, true);
    assert_eq!((t.frames, t.bytes), (3, 1220));
    assert_eq!(q.next_avail(), 3);
    assert_eq!(used_idx(&mem, &mock), 3);
    let used: Vec<(u32, u32)> = (0..3).map(|i| used_elem(&mem, &mock, i)).collect();
    assert_eq!(used, [(0, n as u32), (1, 72), (2, 72)]);
    for (addr, f) in [
        (BUF, &frames[0]),
        (BUF + 0x1000, &frames[1]),
        (BUF + 0x2000, &frames[2]),
    ] {
        let got = rx_chain_bytes(&mem, addr, (HDR_LEN + f.len()) as u32);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(&got[HDR_LEN..], &f[..]);
    }
}
