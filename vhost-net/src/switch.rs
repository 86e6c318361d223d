//! The L2 switch: ports, their counters, the MAC learning table, and forwarding of
//! a batch of frames from one port's TX queue to the other ports' RX queues.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::{Mac, PortConfig};
use crate::net::{self, Frame, RxDrop, RxJob, RxScratch, RxTally, RxWriter, TxBatch, TxDrop};
use crate::offload::{self, RxPlan};
use crate::segment::Gso;
use crate::tap::Tap;

/// Guest memory as the vhost-user-backend crate shares it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;
/// The vring type used by this backend.
pub type Vring = VringRwLock<GuestMem>;

/// Most MAC addresses one switch learns.
pub const MAC_TABLE_LIMIT: usize = 4096;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

/// Per-port counters. "tx" is what the port's frontend sent into the switch, "rx" what
/// the switch delivered to the frontend.
#[derive(Debug, Default)]
pub struct Counters {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    drop_spoofed: AtomicU64,
    drop_short: AtomicU64,
    drop_oversize: AtomicU64,
    drop_bad_descriptor: AtomicU64,
    drop_queue_broken: AtomicU64,
    drop_rx_no_buffer: AtomicU64,
    drop_rx_too_big: AtomicU64,
    drop_rx_bad_descriptor: AtomicU64,
    drop_rx_not_ready: AtomicU64,
    drop_rate_limit: AtomicU64,
    drop_rx_offload: AtomicU64,
    sw_segmented: AtomicU64,
}

/// A copy of a port's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    /// Frames taken from the frontend's TX queue and switched.
    pub tx_packets: u64,
    /// Their bytes (Ethernet frames, without the virtio-net header).
    pub tx_bytes: u64,
    /// Frames written to the frontend's RX queue.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// TX frames whose source MAC was not the port's configured MAC.
    pub drop_spoofed: u64,
    /// TX chains shorter than the virtio-net header plus an Ethernet header.
    pub drop_short: u64,
    /// TX chains longer than 65562 bytes.
    pub drop_oversize: u64,
    /// TX chains that loop, leave guest memory, or have writable buffers.
    pub drop_bad_descriptor: u64,
    /// Times the TX queue was found unusable (avail index out of range).
    pub drop_queue_broken: u64,
    /// Frames for this port dropped because its RX queue had no buffers.
    pub drop_rx_no_buffer: u64,
    /// Frames larger than one RX chain without MRG_RXBUF.
    pub drop_rx_too_big: u64,
    /// Frames dropped on a malformed RX chain.
    pub drop_rx_bad_descriptor: u64,
    /// Unicast frames for this port while no frontend had its RX queue running.
    pub drop_rx_not_ready: u64,
    /// TX frames over the port's bits/s or packets/s limit.
    pub drop_rate_limit: u64,
    /// Frames for this port with an offload it did not negotiate and that are not
    /// segmented in software (UDP GSO), TCP GSO frames that fail the segmentation
    /// checks, or frames with checksum offsets outside the frame.
    pub drop_rx_offload: u64,
    /// TCP GSO frames for this port split into segments in software (each segment
    /// delivered counts in `rx_packets`/`rx_bytes`).
    pub sw_segmented: u64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        if n != 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts one dropped TX chain.
    pub fn tx_drop(&self, why: TxDrop) {
        let c = match why {
            TxDrop::Short => &self.drop_short,
            TxDrop::Oversize => &self.drop_oversize,
            TxDrop::BadDescriptor => &self.drop_bad_descriptor,
        };
        Counters::add(c, 1);
    }

    /// Counts one unusable-queue event.
    pub fn queue_broken(&self) {
        Counters::add(&self.drop_queue_broken, 1);
    }

    /// A copy of all counters.
    pub fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            tx_packets: g(&self.tx_packets),
            tx_bytes: g(&self.tx_bytes),
            rx_packets: g(&self.rx_packets),
            rx_bytes: g(&self.rx_bytes),
            drop_spoofed: g(&self.drop_spoofed),
            drop_short: g(&self.drop_short),
            drop_oversize: g(&self.drop_oversize),
            drop_bad_descriptor: g(&self.drop_bad_descriptor),
            drop_queue_broken: g(&self.drop_queue_broken),
            drop_rx_no_buffer: g(&self.drop_rx_no_buffer),
            drop_rx_too_big: g(&self.drop_rx_too_big),
            drop_rx_bad_descriptor: g(&self.drop_rx_bad_descriptor),
            drop_rx_not_ready: g(&self.drop_rx_not_ready),
            drop_rate_limit: g(&self.drop_rate_limit),
            drop_rx_offload: g(&self.drop_rx_offload),
            sw_segmented: g(&self.sw_segmented),
        }
    }
}

/// Counters of one queue pair: its TX ring (frames the frontend sent on it) and its
/// RX ring (frames the switch wrote into it).
#[derive(Debug, Default)]
pub struct PairCounters {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    tx_drops: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    rx_drops: AtomicU64,
}

/// A copy of one queue pair's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PairSnapshot {
    /// The queue pair (0 is the first; its rings are virtqueues 0 and 1).
    pub pair: usize,
    /// Frames taken from this pair's TX ring and switched.
    pub tx_packets: u64,
    /// Their bytes (Ethernet frames, without the virtio-net header).
    pub tx_bytes: u64,
    /// Frames taken from this pair's TX ring and dropped (bad chain, spoofed source,
    /// rate limit).
    pub tx_drops: u64,
    /// Frames written to this pair's RX ring.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames for this pair's RX ring dropped there (no buffer, too big, bad chain,
    /// offload the port did not negotiate).
    pub rx_drops: u64,
    /// Whether the frontend has this pair's RX ring set up and enabled (a
    /// multiqueue driver enables only the pairs it uses).
    pub enabled: bool,
}

impl PairCounters {
    fn tx(&self, packets: u64, bytes: u64, drops: u64) {
        Counters::add(&self.tx_packets, packets);
        Counters::add(&self.tx_bytes, bytes);
        Counters::add(&self.tx_drops, drops);
    }

    fn rx(&self, packets: u64, bytes: u64, drops: u64) {
        Counters::add(&self.rx_packets, packets);
        Counters::add(&self.rx_bytes, bytes);
        Counters::add(&self.rx_drops, drops);
    }

    /// A copy of the counters, labelled as pair `pair`.
    pub fn snapshot(&self, pair: usize) -> PairSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PairSnapshot {
            pair,
            tx_packets: g(&self.tx_packets),
            tx_bytes: g(&self.tx_bytes),
            tx_drops: g(&self.tx_drops),
            rx_packets: g(&self.rx_packets),
            rx_bytes: g(&self.rx_bytes),
            rx_drops: g(&self.rx_drops),
            enabled: false,
        }
    }
}

/// A port's RX queue, reachable from other ports' worker threads.
#[derive(Clone)]
pub struct RxTarget {
    /// The RX vring of one queue pair.
    pub vring: Vring,
    /// The frontend's memory.
    pub mem: GuestMem,
}

/// One switch port: a vhost-user socket and whatever frontend is connected to it.
pub struct Port {
    /// Unique for the life of the process (names can be reused after removal).
    pub id: u64,
    /// Its configuration.
    pub cfg: PortConfig,
    /// Its counters.
    pub counters: Counters,
    /// Counters of each queue pair (as many as configured; an uplink has one).
    pairs: Box<[PairCounters]>,
    features: AtomicU64,
    connected: AtomicBool,
    removed: AtomicBool,
    /// The RX queue of each queue pair, once its worker published it.
    rx: RwLock<Vec<Option<RxTarget>>>,
    shutdown: Mutex<Option<vhost_user_backend::ShutdownHandle>>,
    tap: Option<Arc<Tap>>,
    /// The port's rate limit.
    pub limiter: crate::rate::Limiter,
}

/// What a port reports on the control socket.
#[derive(Debug, Clone, Serialize)]
pub struct PortStats {
    /// Port name.
    pub name: String,
    /// Socket path.
    pub socket: String,
    /// Configured MAC, if any.
    pub mac: Option<String>,
    /// Whether a frontend is connected.
    pub connected: bool,
    /// Queue pairs.
    pub queues: u16,
    /// Rate limit in bits/s (0: none).
    pub rate_bps: u64,
    /// Rate limit in packets/s (0: none).
    pub rate_pps: u64,
    /// Features the frontend negotiated.
    pub features: u64,
    /// Counters (port totals).
    #[serde(flatten)]
    pub counters: CounterSnapshot,
    /// Counters of each queue pair.
    pub pairs: Vec<PairSnapshot>,
}

impl Port {
    /// A port that is not connected yet.
    pub fn new(id: u64, cfg: PortConfig) -> Port {
        Port {
            id,
            counters: Counters::default(),
            pairs: (0..cfg.queues.max(1))
                .map(|_| PairCounters::default())
                .collect(),
            features: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            rx: RwLock::new(Vec::new()),
            shutdown: Mutex::new(None),
            tap: None,
            limiter: crate::rate::Limiter::new(cfg.rate_bps, cfg.rate_pps),
            cfg,
        }
    }

    /// A TAP uplink port; with `offloads` it sends and takes every offload.
    pub fn new_tap(id: u64, cfg: PortConfig, tap: Arc<Tap>, offloads: bool) -> Port {
        let mut p = Port::new(id, cfg);
        p.tap = Some(tap);
        if offloads {
            p.set_features(offload::OFFLOAD_FEATURES);
        }
        p.connected.store(true, Ordering::Relaxed);
        p
    }

    /// The counters of queue pair `pair` (pair 0's for an index out of range).
    pub fn pair(&self, pair: usize) -> &PairCounters {
        // `pairs` has at least one entry (see `new`).
        match self.pairs.get(pair) {
            Some(p) => p,
            None => &self.pairs[0],
        }
    }

    /// The TAP device of an uplink port.
    pub fn tap(&self) -> Option<&Arc<Tap>> {
        self.tap.as_ref()
    }

    /// The port name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Features the current frontend acknowledged.
    pub fn features(&self) -> u64 {
        self.features.load(Ordering::Relaxed)
    }

    /// Records the acknowledged features.
    pub fn set_features(&self, f: u64) {
        self.features.store(f, Ordering::Relaxed);
    }

    /// Makes the RX vring of queue pair `pair` reachable for other ports.
    pub fn attach(&self, pair: usize, target: RxTarget) {
        let mut rx = write(&self.rx);
        if rx.len() <= pair {
            rx.resize(pair + 1, None);
        }
        rx[pair] = Some(target);
    }

    /// Forgets the RX vrings (the frontend went away). Waits for deliveries in
    /// progress.
    pub fn detach(&self) {
        write(&self.rx).clear();
        if self.tap.is_none() {
            self.features.store(0, Ordering::Relaxed);
        }
    }

    /// Marks the frontend (dis)connected and keeps the handle that disconnects it.
    pub fn set_connected(&self, handle: Option<vhost_user_backend::ShutdownHandle>) {
        self.connected.store(handle.is_some(), Ordering::Relaxed);
        *lock(&self.shutdown) = handle;
    }

    /// Whether a frontend is connected.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Marks the port removed and disconnects its frontend.
    pub fn remove(&self) {
        self.removed.store(true, Ordering::Release);
        if let Some(h) = lock(&self.shutdown).take() {
            h.shutdown();
        }
    }

    /// Whether the port was removed.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The control-socket view of the port.
    pub fn stats(&self) -> PortStats {
        PortStats {
            name: self.cfg.name.clone(),
            socket: self.cfg.socket.display().to_string(),
            mac: self.cfg.mac.map(|m| m.to_string()),
            connected: self.is_connected(),
            queues: self.cfg.queues,
            rate_bps: self.limiter.get().0,
            rate_pps: self.limiter.get().1,
            features: self.features(),
            counters: self.counters.snapshot(),
            pairs: {
                let rx = read(&self.rx);
                self.pairs
                    .iter()
                    .enumerate()
                    .map(|(i, p)| PairSnapshot {
                        enabled: rx.get(i).and_then(Option::as_ref).is_some_and(|t| {
                            let state = t.vring.get_ref();
                            state.get_queue().ready() && state.is_enabled()
                        }),
                        ..p.snapshot(i)
                    })
                    .collect()
            },
        }
    }

    /// Writes `frames` (indexes into `batch.frames`; the flag says unicast) into one
    /// of this port's RX queues (chosen by `pref`, the sender's queue pair), then
    /// notifies the frontend once if it wants to be. `src_features` are the sender's
    /// negotiated features (for its virtio-net headers).
    pub fn deliver(
        &self,
        batch: &TxBatch,
        frames: &[(usize, bool)],
        src_features: u64,
        pref: usize,
        rx: &mut RxScratch,
    ) {
        let c = &self.counters;
        let frame = |i: usize| batch.frames.get(i).and_then(|f| f.frame.as_ref().ok());
        let features = self.features();
        if let Some(tap) = &self.tap {
            let (mut ok, mut bytes, mut full, mut failed, mut offl, mut segmented) =
                (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
            for &(i, _) in frames {
                let Some(f) = frame(i) else { continue };
                let h = offload::sanitize_tx(&f.vnet, src_features);
                let r = match offload::plan_rx(&h, features) {
                    RxPlan::Drop => {
                        offl += 1;
                        continue;
                    }
                    RxPlan::Pass(h) => tap.send(&h, batch, f, &mut rx.src, &mut rx.copy),
                    RxPlan::CompleteCsum(h) => {
                        rx.copy.clear();
                        batch.gather(f, &mut rx.copy);
                        if !offload::complete_checksum(&mut rx.copy, &f.vnet) {
                            offl += 1;
                            continue;
                        }
                        tap.send_bytes(&h, &rx.copy)
                    }
                    RxPlan::Segment(out) => {
                        let sent =
                            send_segments(&mut rx.copy, batch, f, &h, |s| tap.send_bytes(&out, s));
                        let Some(sent) = sent else {
                            offl += 1;
                            continue;
                        };
                        ok += sent.packets;
                        bytes += sent.bytes;
                        segmented += u64::from(sent.packets > 0);
                        match sent.result {
                            // Counted above, segment by segment.
                            Ok(()) => continue,
                            Err(e) => Err(e),
                        }
                    }
                };
                match r {
                    Ok(()) => {
                        ok += 1;
                        bytes += u64::from(f.len);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => full += 1,
                    // EIO while the interface is down, and the like.
                    Err(_) => failed += 1,
                }
            }
            Counters::add(&c.rx_packets, ok);
            Counters::add(&c.rx_bytes, bytes);
            Counters::add(&c.drop_rx_no_buffer, full);
            Counters::add(&c.drop_rx_not_ready, failed);
            Counters::add(&c.drop_rx_offload, offl);
            Counters::add(&c.sw_segmented, segmented);
            self.pair(0).rx(ok, bytes, full + failed + offl);
            return;
        }
        let unicast = || frames.iter().filter(|(_, u)| *u).count() as u64;
        let guard = read(&self.rx);
        let n = guard.len();
        // The sender's queue pair picks the receiver's; skip pairs not running.
        let mut chosen = None;
        for k in 0..n {
            let Some(t) = guard[(pref + k) % n].as_ref() else {
                continue;
            };
            let state = t.vring.get_mut();
            if state.get_queue().ready() && state.is_enabled() {
                chosen = Some(((pref + k) % n, t, state));
                break;
            }
        }
        let Some((pair, t, mut state)) = chosen else {
            Counters::add(&c.drop_rx_not_ready, unicast());
            return;
        };
        let mem = t.mem.memory();
        let (hdr_len, mrg) = (net::header_len(features), net::mrg_rxbuf(features));
        let q = state.get_queue_mut();
        let Some(mut w) = RxWriter::new(q, &mem) else {
            Counters::add(&c.drop_rx_bad_descriptor, frames.len() as u64);
            self.pair(pair).rx(0, 0, frames.len() as u64);
            return;
        };
        let mut t = RxTally::default();
        let (mut offl, mut segmented) = (0u64, 0u64);
        // Frames whose header passes through go in batches (rx.jobs); a frame that
        // needs a slow path (checksum completion, segmentation) first flushes the
        // frames queued before it, so the receiver sees them in order. Returns
        // whether the queue ran out of buffers.
        let flush = |w: &mut RxWriter<'_, '_>, rx: &mut RxScratch, t: &mut RxTally| -> bool {
            if rx.jobs.is_empty() {
                return false;
            }
            let b = w.write_batch(batch, hdr_len, mrg, rx);
            rx.jobs.clear();
            t.add(&b);
            b.no_buffer > 0
        };
        let plain = net::plain_header(hdr_len);
        rx.jobs.clear();
        let mut stopped = false;
        for (k, &(i, _)) in frames.iter().enumerate() {
            let Some(f) = frame(i) else { continue };
            if src_features & offload::OFFLOAD_FEATURES == 0 {
                rx.jobs.push(RxJob {
                    frame: i,
                    hdr: plain,
                });
                continue;
            }
            let h = offload::sanitize_tx(&f.vnet, src_features);
            let plan = offload::plan_rx(&h, features);
            let (out, segment) = match plan {
                RxPlan::Pass(out) => {
                    rx.jobs.push(RxJob { frame: i, hdr: out });
                    continue;
                }
                RxPlan::Drop => {
                    offl += 1;
                    continue;
                }
                RxPlan::CompleteCsum(out) => (out, false),
                RxPlan::Segment(out) => (out, true),
            };
            if flush(&mut w, rx, &mut t) {
                // Out of buffers: the frames after the batch are dropped too.
                t.no_buffer += (frames.len() - k) as u64;
                stopped = true;
                break;
            }
            let out = &out[..hdr_len];
            let r = match self.slow_write(&mut w, batch, f, &h, out, segment, mrg, rx) {
                Some(Written::Frame(r)) => r,
                Some(Written::Segments(sent)) => {
                    t.frames += sent.packets;
                    t.bytes += sent.bytes;
                    segmented += u64::from(sent.packets > 0);
                    match sent.result {
                        // Counted above, segment by segment.
                        Ok(()) => continue,
                        Err(e) => Err(e),
                    }
                }
                None => {
                    offl += 1;
                    continue;
                }
            };
            match r {
                Ok(()) => {
                    t.frames += 1;
                    t.bytes += u64::from(f.len);
                }
                Err(RxDrop::NoBuffer) => {
                    t.no_buffer += (frames.len() - k) as u64;
                    stopped = true;
                    break;
                }
                Err(RxDrop::TooBig) => t.too_big += 1,
                Err(RxDrop::BadDescriptor) => t.bad_descriptor += 1,
            }
        }
        if !stopped {
            flush(&mut w, rx, &mut t);
        }
        rx.jobs.clear();
        if w.finish() {
            if let Err(e) = state.signal_used_queue() {
                log::debug!("{}: cannot signal RX: {e}", self.name());
            }
        }
        drop(state);
        Counters::add(&c.rx_packets, t.frames);
        Counters::add(&c.rx_bytes, t.bytes);
        Counters::add(&c.drop_rx_no_buffer, t.no_buffer);
        Counters::add(&c.drop_rx_too_big, t.too_big);
        Counters::add(&c.drop_rx_bad_descriptor, t.bad_descriptor);
        Counters::add(&c.drop_rx_offload, offl);
        Counters::add(&c.sw_segmented, segmented);
        self.pair(pair).rx(
            t.frames,
            t.bytes,
            t.no_buffer + t.too_big + t.bad_descriptor + offl,
        );
    }

    /// Writes a frame (sanitized header `h`) whose offloads this receiver lacks, with
    /// header `out`: split in software (`segment`), or with its checksum completed.
    /// `None` when the frame fails the checks that needs.
    #[allow(clippy::too_many_arguments)]
    fn slow_write(
        &self,
        w: &mut RxWriter<'_, '_>,
        batch: &TxBatch,
        f: &Frame,
        h: &[u8; net::HDR_LEN],
        out: &[u8],
        segment: bool,
        mrg: bool,
        rx: &mut RxScratch,
    ) -> Option<Written> {
        let mut copy = std::mem::take(&mut rx.copy);
        let r = if segment {
            send_segments(&mut copy, batch, f, h, |s| {
                w.write_pieces(out, &[(s.as_ptr(), s.len())], mrg, rx)
            })
            .map(Written::Segments)
        } else {
            copy.clear();
            batch.gather(f, &mut copy);
            offload::complete_checksum(&mut copy, h).then(|| {
                Written::Frame(w.write_pieces(out, &[(copy.as_ptr(), copy.len())], mrg, rx))
            })
        };
        rx.copy = copy;
        r
    }
}

/// What writing one frame with offloads into an RX queue did.
enum Written {
    /// The frame was written as one (its header passed on or its checksum completed).
    Frame(Result<(), RxDrop>),
    /// The frame was split in software.
    Segments(Sent<RxDrop>),
}

/// The segments of one GSO frame that were sent.
struct Sent<E> {
    /// Segments sent.
    packets: u64,
    /// Their bytes.
    bytes: u64,
    /// `Ok` when every segment went, else why the next one did not (the rest of the
    /// frame is not sent).
    result: Result<(), E>,
}

/// Splits frame `f` of `batch` (sanitized header `h`) into TCP segments and passes
/// each to `send`, in order, until one fails. `copy` is scratch space: the frame is
/// gathered at its start and each segment is built after it, so a buffer reused
/// across frames needs no allocation once it has grown. `None` when the frame fails
/// the checks of [`Gso::parse`].
fn send_segments<E>(
    copy: &mut Vec<u8>,
    batch: &TxBatch,
    f: &Frame,
    h: &[u8; net::HDR_LEN],
    mut send: impl FnMut(&[u8]) -> Result<(), E>,
) -> Option<Sent<E>> {
    copy.clear();
    batch.gather(f, copy);
    let g = match Gso::parse(copy, h) {
        Ok(g) => g,
        Err(e) => {
            log::debug!("GSO frame not segmented: {e}");
            return None;
        }
    };
    let n = copy.len();
    let mut sent = Sent {
        packets: 0,
        bytes: 0,
        result: Ok(()),
    };
    for k in 0..g.segments() {
        let len = g.segment_len(k);
        copy.truncate(n);
        copy.resize(n + len, 0);
        let (frame, seg) = copy.split_at_mut(n);
        // Cannot fail: `g` was parsed from `frame` and `seg` has its segment's length.
        if !g.write_segment(frame, k, seg) {
            return None;
        }
        if let Err(e) = send(seg) {
            sent.result = Err(e);
            break;
        }
        sent.packets += 1;
        sent.bytes += len as u64;
    }
    copy.truncate(n);
    Some(sent)
}

/// A cheap keyed hash for MAC addresses: the 48 bits, XORed with a per-process random
/// key, times an odd constant. SipHash cost a third of the forwarding time; the table
/// is bounded ([`MAC_TABLE_LIMIT`]) and the key is secret, so collisions stay cheap.
#[derive(Clone, Copy)]
pub struct MacHashBuilder(u64);

impl MacHashBuilder {
    fn random() -> MacHashBuilder {
        use std::hash::BuildHasher;
        MacHashBuilder(std::collections::hash_map::RandomState::new().hash_one(0x6b65656cu32))
    }
}

/// The hasher of [`MacHashBuilder`].
pub struct MacHasher(u64);

impl std::hash::Hasher for MacHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ x >> 29
    }
}

impl std::hash::BuildHasher for MacHashBuilder {
    type Hasher = MacHasher;

    fn build_hasher(&self) -> MacHasher {
        MacHasher(self.0)
    }
}

struct MacEntry {
    port: AtomicU64,
    seen_ms: AtomicU64,
}

/// MAC learning table with ageing.
pub struct MacTable {
    map: RwLock<HashMap<Mac, MacEntry, MacHashBuilder>>,
    ageing_ms: u64,
}

impl MacTable {
    /// A table whose entries expire after `ageing` without traffic.
    pub fn new(ageing: Duration) -> MacTable {
        MacTable {
            map: RwLock::new(HashMap::with_hasher(MacHashBuilder::random())),
            ageing_ms: ageing.as_millis().max(1) as u64,
        }
    }

    /// Records that `mac` was seen on `port` at `now_ms`.
    pub fn learn(&self, mac: Mac, port: u64, now_ms: u64) {
        {
            let map = read(&self.map);
            if let Some(e) = map.get(&mac) {
                if e.port.load(Ordering::Relaxed) != port {
                    e.port.store(port, Ordering::Relaxed);
                    e.seen_ms.store(now_ms, Ordering::Relaxed);
                } else if now_ms.saturating_sub(e.seen_ms.load(Ordering::Relaxed)) >= 1000 {
                    // Refresh at most once a second: keeps the cache line mostly read-only.
                    e.seen_ms.store(now_ms, Ordering::Relaxed);
                }
                return;
            }
        }
        let mut map = write(&self.map);
        if map.len() >= MAC_TABLE_LIMIT {
            let ageing = self.ageing_ms;
            map.retain(|_, e| now_ms.saturating_sub(e.seen_ms.load(Ordering::Relaxed)) <= ageing);
            if map.len() >= MAC_TABLE_LIMIT {
                return;
            }
        }
        map.insert(
            mac,
            MacEntry {
                port: AtomicU64::new(port),
                seen_ms: AtomicU64::new(now_ms),
            },
        );
    }

    /// The port `mac` was last seen on, unless that is older than the ageing time.
    pub fn lookup(&self, mac: &Mac, now_ms: u64) -> Option<u64> {
        let map = read(&self.map);
        let e = map.get(mac)?;
        if now_ms.saturating_sub(e.seen_ms.load(Ordering::Relaxed)) > self.ageing_ms {
            return None;
        }
        Some(e.port.load(Ordering::Relaxed))
    }

    /// Drops expired entries.
    pub fn expire(&self, now_ms: u64) {
        let ageing = self.ageing_ms;
        write(&self.map)
            .retain(|_, e| now_ms.saturating_sub(e.seen_ms.load(Ordering::Relaxed)) <= ageing);
    }

    /// Forgets every address learned on `port`.
    pub fn forget_port(&self, port: u64) {
        write(&self.map).retain(|_, e| e.port.load(Ordering::Relaxed) != port);
    }

    /// Number of entries (including expired ones not swept yet).
    pub fn len(&self) -> usize {
        read(&self.map).len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where one frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    Drop,
    Flood,
    One(u64),
}

/// Per-worker scratch space for forwarding.
#[derive(Debug, Default)]
pub struct ForwardScratch {
    dest: Vec<Dest>,
    out: Vec<(usize, bool)>,
    /// RX writing scratch.
    pub rx: RxScratch,
}

/// The switch: its ports and its MAC table.
pub struct Switch {
    ports: RwLock<Arc<Vec<Arc<Port>>>>,
    /// The learned addresses.
    pub macs: MacTable,
    next_id: AtomicU64,
    epoch: Instant,
    /// Whether checksum/segmentation offloads are offered (see [`crate::offload`]).
    pub offloads: bool,
}

impl Switch {
    /// An empty switch.
    pub fn new(mac_ageing: Duration) -> Switch {
        Switch {
            ports: RwLock::new(Arc::new(Vec::new())),
            macs: MacTable::new(mac_ageing),
            next_id: AtomicU64::new(1),
            epoch: Instant::now(),
            offloads: false,
        }
    }

    /// Milliseconds since the switch was created (the MAC table's clock).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A snapshot of the ports.
    pub fn ports(&self) -> Arc<Vec<Arc<Port>>> {
        read(&self.ports).clone()
    }

    /// The port called `name`.
    pub fn port(&self, name: &str) -> Option<Arc<Port>> {
        self.ports().iter().find(|p| p.name() == name).cloned()
    }

    /// Creates a port and adds it, unless its name or socket is taken.
    pub fn add_port(&self, cfg: PortConfig) -> Result<Arc<Port>, String> {
        self.add_port_with(cfg, None)
    }

    /// Adds a vhost-user port, or with `tap` an uplink port.
    pub fn add_port_with(
        &self,
        cfg: PortConfig,
        tap: Option<Arc<Tap>>,
    ) -> Result<Arc<Port>, String> {
        let mut ports = write(&self.ports);
        let mut all: Vec<PortConfig> = ports.iter().map(|p| p.cfg.clone()).collect();
        all.push(cfg.clone());
        if let Some(m) = crate::config::duplicate(&all) {
            return Err(m);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let port = Arc::new(match tap {
            Some(tap) => {
                let offloads = tap.offloads();
                Port::new_tap(id, cfg, tap, offloads)
            }
            None => Port::new(id, cfg),
        });
        let mut next: Vec<Arc<Port>> = ports.as_ref().clone();
        next.push(port.clone());
        *ports = Arc::new(next);
        Ok(port)
    }

    /// Takes the port called `name` out of the switch and forgets its addresses.
    pub fn remove_port(&self, name: &str) -> Option<Arc<Port>> {
        let mut ports = write(&self.ports);
        let port = ports.iter().find(|p| p.name() == name).cloned()?;
        let next: Vec<Arc<Port>> = ports.iter().filter(|p| p.id != port.id).cloned().collect();
        *ports = Arc::new(next);
        drop(ports);
        self.macs.forget_port(port.id);
        Some(port)
    }

    /// An empty switch that offers offloads when `offloads` is set.
    pub fn with_offloads(mac_ageing: Duration, offloads: bool) -> Switch {
        let mut s = Switch::new(mac_ageing);
        s.offloads = offloads;
        s
    }

    /// Switches a batch of frames that `src`'s frontend sent on its queue pair
    /// `queue`: rate limit, anti-spoofing, learning, then delivery to the learned port
    /// or flooding to all others.
    pub fn forward(&self, src: &Port, queue: usize, batch: &TxBatch, s: &mut ForwardScratch) {
        let now = self.now_ms();
        let mut budget = src.limiter.begin();
        let c = &src.counters;
        s.dest.clear();
        let (mut pkts, mut bytes, mut spoofed, mut limited, mut bad) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut any = false;
        // Frames of a batch mostly share source and destination: learn and look up
        // once per run of equal addresses.
        let mut last_src: Option<Mac> = None;
        let mut last_dst: Option<(Mac, Dest)> = None;
        for f in &batch.frames {
            let r = match &f.frame {
                Ok(r) => r,
                Err(why) => {
                    c.tx_drop(*why);
                    bad += 1;
                    s.dest.push(Dest::Drop);
                    continue;
                }
            };
            let (dst, smac) = (mac_at(&r.eth, 0), mac_at(&r.eth, 6));
            if src.cfg.mac.is_some_and(|m| m != smac) {
                spoofed += 1;
                s.dest.push(Dest::Drop);
                continue;
            }
            if let Some(b) = budget.as_mut() {
                if !b.take(u64::from(r.len)) {
                    limited += 1;
                    s.dest.push(Dest::Drop);
                    continue;
                }
            }
            pkts += 1;
            bytes += u64::from(r.len);
            if !smac.is_multicast() && last_src != Some(smac) {
                self.macs.learn(smac, src.id, now);
                last_src = Some(smac);
                // What a previous frame's destination resolved to may have changed.
                last_dst = None;
            }
            let d = match last_dst {
                Some((m, d)) if m == dst => d,
                _ => {
                    let d = if dst.is_multicast() {
                        Dest::Flood
                    } else {
                        match self.macs.lookup(&dst, now) {
                            // Addressed to its own port: nothing to do.
                            Some(id) if id == src.id => Dest::Drop,
                            Some(id) => Dest::One(id),
                            None => Dest::Flood,
                        }
                    };
                    last_dst = Some((dst, d));
                    d
                }
            };
            any |= d != Dest::Drop;
            s.dest.push(d);
        }
        Counters::add(&c.tx_packets, pkts);
        Counters::add(&c.tx_bytes, bytes);
        Counters::add(&c.drop_spoofed, spoofed);
        Counters::add(&c.drop_rate_limit, limited);
        src.pair(queue).tx(pkts, bytes, bad + spoofed + limited);
        if let Some(b) = budget {
            src.limiter.end(b);
        }
        if !any {
            return;
        }
        let ports = self.ports();
        for port in ports.iter().filter(|p| p.id != src.id) {
            s.out.clear();
            for (i, d) in s.dest.iter().enumerate() {
                let unicast = match d {
                    Dest::Flood => false,
                    Dest::One(id) if *id == port.id => true,
                    _ => continue,
                };
                s.out.push((i, unicast));
            }
            if !s.out.is_empty() {
                port.deliver(batch, &s.out, src.features(), queue, &mut s.rx);
            }
        }
    }
}

fn mac_at(b: &[u8; net::MIN_FRAME_LEN], at: usize) -> Mac {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[at..at + 6]);
    Mac(m)
}
