//! virtio-net test driver: bring-up with one queue pair, MAC from the device
//! configuration, a few broadcast probe frames plus an ARP request, and the
//! replies: echoes (a peer that swaps the MACs, e.g. DPDK testpmd macswap)
//! and ARP replies (e.g. QEMU's user network answering for 10.0.2.2).

use super::pci_transport::{VirtioPci, NO_VECTOR};
use super::queue::{Buffer, SplitQueue};
use super::{feature, Dma, Mac, Outcome, TestConfig, MODERN_DEVICE_BASE, VENDOR};
use crate::interrupts::{self, VECTOR_DEVICE_FIRST};
use crate::pci::Functions;
use crate::serial::Serial;

/// virtio device type of network devices.
const DEVICE_TYPE: u16 = 1;
/// Transitional (legacy + modern) device ID.
const TRANSITIONAL_ID: u16 = 0x1000;

/// Feature bits.
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_MQ: u64 = 1 << 22;
/// Features the driver accepts (with VERSION_1).
const WANTED: u64 = feature::VERSION_1 | F_MAC | F_MRG_RXBUF | F_STATUS;

/// Device configuration offsets.
const CFG_MAC: u32 = 0;
const CFG_STATUS: u32 = 6;
/// Configuration status: link up.
const LINK_UP: u16 = 1;

/// `struct virtio_net_hdr` of virtio 1.x (with `num_buffers`).
const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const HDR_NUM_BUFFERS: usize = 10;

/// Queue indexes of the first pair.
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
/// The control queue with two pairs (after queues 0-3).
const CTRL_QUEUE: u16 = 4;
/// VIRTIO_NET_CTRL_MQ class and its VQ_PAIRS_SET command.
const CTRL_CLASS_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
/// Queue size used (if the device allows that many).
const QUEUE_SIZE: u16 = 16;
/// Receive buffers: count and size (a whole frame plus header fits).
const RX_BUFS: usize = 16;
const RX_BUF_LEN: usize = 2048;
/// Transmit slots in [`TX`].
const TX_SLOT: usize = 128;

/// Probe frames sent (besides the ARP request), and their ethertype.
const PROBE_FRAMES: u32 = 4;
const ETHERTYPE_PROBE: u16 = 0x88b5;
const ETHERTYPE_ARP: u16 = 0x0806;
/// Shortest Ethernet frame without FCS.
const MIN_FRAME: usize = 60;
/// Probe frame payload tag.
const PROBE_TAG: &[u8; 4] = b"keel";
/// ARP: who has 10.0.2.2 (QEMU user network gateway), tell 10.0.2.15.
const ARP_TARGET_IP: [u8; 4] = [10, 0, 2, 2];
const ARP_SENDER_IP: [u8; 4] = [10, 0, 2, 15];
/// MAC used when the device has none.
const FALLBACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Received frames printed one line each (the rest are only counted).
const PRINT_MAX: u32 = 16;

/// Grace period for interrupts of completions seen by polling, in ms.
const IRQ_GRACE_MS: u64 = 50;

/// IDT vectors: configuration change, receive, transmit.
const VECTOR_CONFIG: u8 = VECTOR_DEVICE_FIRST + 4;
const VECTOR_RX: u8 = VECTOR_DEVICE_FIRST + 5;
const VECTOR_TX: u8 = VECTOR_DEVICE_FIRST + 6;
const _: () = assert!(VECTOR_TX <= crate::interrupts::VECTOR_DEVICE_LAST);

#[link_section = ".noinit.dma"]
static RXQ: Dma<4096> = Dma::new();
#[link_section = ".noinit.dma"]
static TXQ: Dma<4096> = Dma::new();
#[link_section = ".noinit.dma"]
static RX: Dma<{ RX_BUFS * RX_BUF_LEN }> = Dma::new();
#[link_section = ".noinit.dma"]
static TX: Dma<4096> = Dma::new();
/// Rings of the second pair (`probe.net_pairs=2`), set up and never used.
#[link_section = ".noinit.dma"]
static RXQ1: Dma<4096> = Dma::new();
#[link_section = ".noinit.dma"]
static TXQ1: Dma<4096> = Dma::new();
/// The control queue's rings and one command buffer (header, data, ack).
#[link_section = ".noinit.dma"]
static CTRLQ: Dma<4096> = Dma::new();
#[link_section = ".noinit.dma"]
static CTRL: Dma<4096> = Dma::new();

/// What came back.
#[derive(Default)]
struct RxStats {
    frames: u32,
    /// Bit `n`: probe frame `n` came back.
    echoed: u32,
    arp_reply: Option<[u8; 6]>,
    arp_echo: bool,
}

/// A running device.
struct Net {
    rx: SplitQueue,
    tx: SplitQueue,
    mac: [u8; 6],
    nonce: u32,
    /// Receive buffer index of each descriptor head.
    rx_buf_of: [u8; QUEUE_SIZE as usize],
    /// Used entries still to skip: the rest of a merged frame.
    continuation: u16,
}

/// Finds the first virtio-net function, brings it up, sends the frames,
/// collects the replies and prints the results. Every wait is bounded.
pub fn test(out: &mut Serial, functions: &Functions, cfg: &TestConfig) -> Outcome {
    let found = functions.iter().find(|f| {
        f.vendor == VENDOR
            && (f.device == MODERN_DEVICE_BASE + DEVICE_TYPE
                || (f.device == TRANSITIONAL_ID && f.subsystem == DEVICE_TYPE))
    });
    let Some(function) = found else {
        say!(out, "virtio-net absent");
        return Outcome::Absent;
    };
    let dev = match VirtioPci::probe(function.bdf) {
        Ok(dev) => dev,
        Err(e) => {
            say!(out, "virtio-net {} fail: {e}", function.bdf);
            return Outcome::Fail;
        }
    };
    match run(out, &dev, cfg) {
        Ok(outcome) => outcome,
        Err(e) => {
            say!(out, "virtio-net fail: {e}");
            dev.fail();
            Outcome::Fail
        }
    }
}

fn run(out: &mut Serial, dev: &VirtioPci, cfg: &TestConfig) -> Result<Outcome, &'static str> {
    let wanted = if cfg.net_pairs > 1 {
        WANTED | F_MQ | F_CTRL_VQ
    } else {
        WANTED
    };
    let (offered, accepted) = dev.negotiate(wanted)?;
    say!(
        out,
        "virtio-net {} features={offered:#x} accepted={accepted:#x} queues={}",
        dev.bdf,
        dev.num_queues()
    );
    if dev.num_queues() < 2 {
        return Err("fewer than two queues");
    }
    let msix = dev.setup_msix(cfg.apic_id, &[VECTOR_CONFIG, VECTOR_RX, VECTOR_TX]);
    let (rx_entry, tx_entry) = if msix { (1, 2) } else { (NO_VECTOR, NO_VECTOR) };
    if msix {
        dev.set_config_vector(0);
    }
    // SAFETY: RXQ and TXQ are this driver's queue pages, used for nothing else.
    let (rx, rx_got) = unsafe { dev.setup_queue(RX_QUEUE, RXQ.addr(), QUEUE_SIZE, rx_entry) }?;
    // SAFETY: as above.
    let (tx, tx_got) = unsafe { dev.setup_queue(TX_QUEUE, TXQ.addr(), QUEUE_SIZE, tx_entry) }?;
    let msix = msix && rx_got == rx_entry && tx_got == tx_entry;
    if accepted & F_MQ != 0 && dev.num_queues() >= 4 {
        // SAFETY: RXQ1 and TXQ1 are this driver's queue pages, used for nothing else.
        unsafe {
            dev.setup_queue(RX_QUEUE + 2, RXQ1.addr(), QUEUE_SIZE, NO_VECTOR)?;
            dev.setup_queue(TX_QUEUE + 2, TXQ1.addr(), QUEUE_SIZE, NO_VECTOR)?;
        }
        say!(out, "virtio-net mq pairs_set_up=2 pairs_used=1");
    }
    let ctrl = if accepted & F_MQ != 0 && accepted & F_CTRL_VQ != 0 && dev.num_queues() >= 5 {
        // SAFETY: CTRLQ is this driver's control queue page, used for nothing else.
        let (queue, _) =
            unsafe { dev.setup_queue(CTRL_QUEUE, CTRLQ.addr(), QUEUE_SIZE, NO_VECTOR) }?;
        Some(queue)
    } else {
        None
    };
    if msix {
        say!(
            out,
            "virtio-net msix entries={} config_vector={:#x} rx_vector={:#x} tx_vector={:#x}",
            dev.msix_entries(),
            VECTOR_CONFIG,
            VECTOR_RX,
            VECTOR_TX
        );
    } else {
        dev.disable_msix();
        say!(out, "virtio-net msix unavailable: polling");
    }

    let (mac, link) = dev.read_config(|d| {
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = d.config8(CFG_MAC + i as u32);
        }
        (mac, d.config16(CFG_STATUS))
    });
    let mac = if accepted & F_MAC != 0 {
        mac
    } else {
        FALLBACK_MAC
    };
    let link = if accepted & F_STATUS == 0 {
        "unknown"
    } else if link & LINK_UP != 0 {
        "up"
    } else {
        "down"
    };
    say!(
        out,
        "virtio-net mac={}{} link={link} rx_queue_size={} tx_queue_size={}",
        Mac(mac),
        if accepted & F_MAC != 0 {
            ""
        } else {
            " (device has none)"
        },
        rx.size,
        tx.size
    );

    let mut net = Net {
        rx,
        tx,
        mac,
        nonce: crate::cpu::rdtsc() as u32,
        rx_buf_of: [0; QUEUE_SIZE as usize],
        continuation: 0,
    };
    // Receive buffers go in before DRIVER_OK, the kick after it.
    let posted = usize::from(net.rx.size).min(RX_BUFS);
    for buf in 0..posted {
        net.post_rx(buf)?;
    }
    dev.driver_ok()?;
    net.rx.notify();
    if let (Some(mut ctrl), true) = (ctrl, cfg.net_mq_set > 0) {
        let ack = vq_pairs_set(&mut ctrl, cfg.net_mq_set, cfg.timeout_ms)?;
        say!(
            out,
            "virtio-net ctrl vq_pairs_set={} ack={ack}",
            cfg.net_mq_set
        );
    }

    // Send the probe frames and the ARP request, then wait for completions.
    let sent = PROBE_FRAMES + 1;
    for n in 0..PROBE_FRAMES {
        net.send(n as usize, &net.probe_frame(n))?;
    }
    net.send(PROBE_FRAMES as usize, &net.arp_request())?;
    net.tx.notify();
    let mut completed = 0u32;
    let tx_queue = &mut net.tx;
    interrupts::wait_until(cfg.timeout_ms, || {
        while tx_queue.pop_used().is_some() {
            completed += 1;
        }
        completed >= sent
    });

    // Collect replies until every probe and the ARP request are answered.
    let mut stats = RxStats::default();
    interrupts::wait_until(cfg.timeout_ms, || {
        net.drain_rx(out, &mut stats);
        stats.echoed.count_ones() == PROBE_FRAMES && (stats.arp_reply.is_some() || stats.arp_echo)
    });
    let echoes = stats.echoed.count_ones();
    if msix {
        // Completions may all have been seen before interrupts were ever
        // enabled: give the pending ones a moment to be delivered.
        let rx_expected = stats.frames > 0;
        interrupts::wait_until(IRQ_GRACE_MS, || {
            interrupts::count(VECTOR_TX) > 0 && (!rx_expected || interrupts::count(VECTOR_RX) > 0)
        });
    }

    say!(out, "virtio-net tx={completed} rx={}", stats.frames);
    if completed < sent {
        say!(
            out,
            "virtio-net tx incomplete: {completed} of {sent} frames"
        );
    }
    if echoes == PROBE_FRAMES {
        say!(out, "virtio-net echo ok count={echoes}");
    } else if echoes > 0 {
        say!(out, "virtio-net echo partial count={echoes}");
    }
    if let Some(from) = stats.arp_reply {
        say!(
            out,
            "virtio-net arp reply from {}.{}.{}.{} mac={}",
            ARP_TARGET_IP[0],
            ARP_TARGET_IP[1],
            ARP_TARGET_IP[2],
            ARP_TARGET_IP[3],
            Mac(from)
        );
    }
    if echoes == 0 && stats.arp_reply.is_none() {
        say!(out, "virtio-net no reply within {} ms", cfg.timeout_ms);
    }
    let (irq_rx, irq_tx) = (interrupts::count(VECTOR_RX), interrupts::count(VECTOR_TX));
    if msix {
        say!(
            out,
            "virtio-net irq rx={irq_rx} tx={irq_tx} config={}",
            interrupts::count(VECTOR_CONFIG)
        );
    } else {
        say!(out, "virtio-net irq=none (no msi-x: polled)");
    }
    dev.reset()?;

    let answered = echoes == PROBE_FRAMES || stats.arp_reply.is_some();
    let irqs_ok = !msix || irq_tx > 0 || (stats.frames > 0 && irq_rx > 0);
    if msix && !irqs_ok {
        say!(out, "virtio-net no interrupts: completions were polled");
    }
    Ok(if completed >= sent && answered && irqs_ok {
        Outcome::Ok
    } else {
        Outcome::Fail
    })
}

impl Net {
    /// Makes receive buffer `buf` available to the device.
    fn post_rx(&mut self, buf: usize) -> Result<(), &'static str> {
        let addr = RX.at(buf * RX_BUF_LEN);
        let head = self
            .rx
            .push(&[Buffer::writable(addr, RX_BUF_LEN as u32)])
            .ok_or("receive queue full")?;
        if let Some(slot) = self.rx_buf_of.get_mut(usize::from(head)) {
            *slot = buf as u8;
        }
        Ok(())
    }

    /// Puts `frame` (with a zeroed header) in transmit slot `slot` and makes
    /// it available.
    fn send(&mut self, slot: usize, frame: &[u8]) -> Result<(), &'static str> {
        let off = slot * TX_SLOT;
        TX.fill(off, HDR_LEN, 0);
        TX.write(off + HDR_LEN, frame);
        let len = (HDR_LEN + frame.len()) as u32;
        self.tx
            .push(&[Buffer::readable(TX.at(off), len)])
            .ok_or("transmit queue full")?;
        Ok(())
    }

    /// Broadcast probe frame `n`: tag, counter, nonce.
    fn probe_frame(&self, n: u32) -> [u8; MIN_FRAME] {
        let mut f = [0u8; MIN_FRAME];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&self.mac);
        f[12..14].copy_from_slice(&ETHERTYPE_PROBE.to_be_bytes());
        f[14..18].copy_from_slice(PROBE_TAG);
        f[18..22].copy_from_slice(&n.to_be_bytes());
        f[22..26].copy_from_slice(&self.nonce.to_be_bytes());
        f
    }

    /// ARP request for [`ARP_TARGET_IP`].
    fn arp_request(&self) -> [u8; MIN_FRAME] {
        let mut f = [0u8; MIN_FRAME];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&self.mac);
        f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        // Ethernet / IPv4, 6-byte and 4-byte addresses, request.
        f[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&self.mac);
        f[28..32].copy_from_slice(&ARP_SENDER_IP);
        f[38..42].copy_from_slice(&ARP_TARGET_IP);
        f
    }

    /// Takes every received frame, records and prints it, and gives the
    /// buffers back to the device.
    fn drain_rx(&mut self, out: &mut Serial, stats: &mut RxStats) {
        let mut reposted = false;
        while let Some(used) = self.rx.pop_used() {
            let buf = usize::from(
                self.rx_buf_of
                    .get(usize::from(used.id))
                    .copied()
                    .unwrap_or(0),
            );
            if self.continuation > 0 {
                self.continuation -= 1;
            } else {
                self.frame(out, buf, used.len as usize, stats);
            }
            if self.post_rx(buf).is_ok() {
                reposted = true;
            }
        }
        if reposted {
            self.rx.notify();
        }
    }

    /// Looks at the frame in receive buffer `buf` (`len` bytes with header).
    fn frame(&mut self, out: &mut Serial, buf: usize, len: usize, stats: &mut RxStats) {
        let base = buf * RX_BUF_LEN;
        let mut hdr = [0u8; HDR_LEN];
        RX.read(base, &mut hdr);
        let num_buffers = u16::from_le_bytes([hdr[HDR_NUM_BUFFERS], hdr[HDR_NUM_BUFFERS + 1]]);
        self.continuation = num_buffers.saturating_sub(1);
        let len = len.saturating_sub(HDR_LEN).min(RX_BUF_LEN - HDR_LEN);
        let mut f = [0u8; MIN_FRAME];
        let seen = len.min(MIN_FRAME);
        RX.read(base + HDR_LEN, &mut f[..seen]);
        stats.frames += 1;
        if seen < 14 {
            say!(out, "virtio-net rx runt len={len}");
            return;
        }
        let mut dst = [0u8; 6];
        let mut src = [0u8; 6];
        dst.copy_from_slice(&f[0..6]);
        src.copy_from_slice(&f[6..12]);
        let ethertype = u16::from_be_bytes([f[12], f[13]]);
        if stats.frames <= PRINT_MAX {
            say!(
                out,
                "virtio-net rx src={} dst={} type={ethertype:#06x} len={len}",
                Mac(src),
                Mac(dst)
            );
        }
        if ethertype == ETHERTYPE_PROBE && seen >= 26 && &f[14..18] == PROBE_TAG {
            let n = u32::from_be_bytes([f[18], f[19], f[20], f[21]]);
            let nonce = u32::from_be_bytes([f[22], f[23], f[24], f[25]]);
            if nonce == self.nonce && n < PROBE_FRAMES {
                stats.echoed |= 1 << n;
            }
        } else if ethertype == ETHERTYPE_ARP && seen >= 42 {
            let op = u16::from_be_bytes([f[20], f[21]]);
            if op == 2 && f[28..32] == ARP_TARGET_IP {
                let mut sha = [0u8; 6];
                sha.copy_from_slice(&f[22..28]);
                stats.arp_reply = Some(sha);
            } else if op == 1 && f[22..28] == self.mac && f[28..32] == ARP_SENDER_IP {
                stats.arp_echo = true;
            }
        }
    }
}

/// Sends VQ_PAIRS_SET(`pairs`) on the control queue and waits for the device's
/// answer: the ack byte (0: VIRTIO_NET_OK), or 0xff if none came in time.
fn vq_pairs_set(ctrl: &mut SplitQueue, pairs: u16, timeout_ms: u64) -> Result<u8, &'static str> {
    CTRL.write(0, &[CTRL_CLASS_MQ, CTRL_MQ_VQ_PAIRS_SET]);
    CTRL.write(2, &pairs.to_le_bytes());
    CTRL.write(4, &[0xff]);
    ctrl.push(&[
        Buffer::readable(CTRL.at(0), 2),
        Buffer::readable(CTRL.at(2), 2),
        Buffer::writable(CTRL.at(4), 1),
    ])
    .ok_or("control queue full")?;
    ctrl.notify();
    interrupts::wait_until(timeout_ms, || ctrl.pop_used().is_some());
    let mut ack = [0u8; 1];
    CTRL.read(4, &mut ack);
    Ok(ack[0])
}
