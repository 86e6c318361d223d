//! virtio-blk test driver: bring-up, reset and re-initialisation, device
//! configuration, serial (GET_ID), and a write / flush / read-back pattern
//! check (or, on a read-only device, a check that writes are rejected).

use super::pci_transport::{VirtioPci, NO_VECTOR};
use super::queue::{Buffer, SplitQueue};
use super::{feature, Dma, Outcome, TestConfig, MODERN_DEVICE_BASE, VENDOR};
use crate::interrupts::{self, VECTOR_DEVICE_FIRST};
use crate::pci::Functions;
use crate::serial::Serial;

/// virtio device type of block devices.
const DEVICE_TYPE: u16 = 2;
/// Transitional (legacy + modern) device ID.
const TRANSITIONAL_ID: u16 = 0x1001;

/// Feature bits.
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
/// Features the driver accepts (with VERSION_1).
const WANTED: u64 =
    feature::VERSION_1 | F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_MQ;

/// Device configuration offsets.
const CFG_CAPACITY: u32 = 0;
const CFG_SIZE_MAX: u32 = 8;
const CFG_SEG_MAX: u32 = 12;
const CFG_BLK_SIZE: u32 = 20;
const CFG_NUM_QUEUES: u32 = 34;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
/// Request status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
/// Status byte value before the device writes it.
const S_NONE: u8 = 0xff;

/// Sector size of the request protocol.
const SECTOR: usize = 512;
/// Sectors written at the start of the disk.
const PATTERN_SECTORS: u64 = 8;
/// Queue size used (if the device allows that many).
const QUEUE_SIZE: u16 = 16;
/// Length of the GET_ID answer.
const ID_LEN: usize = 20;
/// Grace period for an interrupt after a completion seen by polling, in ms.
const IRQ_GRACE_MS: u64 = 50;

/// IDT vectors: configuration change, request queue.
const VECTOR_CONFIG: u8 = VECTOR_DEVICE_FIRST;
const VECTOR_QUEUE: u8 = VECTOR_DEVICE_FIRST + 1;
const _: () = assert!(VECTOR_QUEUE <= crate::interrupts::VECTOR_DEVICE_LAST);

/// Offsets in [`REQ`]: request header, status byte, GET_ID buffer.
const REQ_HEADER: usize = 0;
const REQ_STATUS: usize = 512;
const REQ_ID: usize = 1024;

/// The request queue.
#[link_section = ".noinit.dma"]
static QUEUE: Dma<4096> = Dma::new();
/// Request headers, status, GET_ID answer.
#[link_section = ".noinit.dma"]
static REQ: Dma<4096> = Dma::new();
/// Data of reads and writes.
#[link_section = ".noinit.dma"]
static DATA: Dma<{ PATTERN_SECTORS as usize * SECTOR }> = Dma::new();

/// A running device.
struct Blk<'a> {
    dev: &'a VirtioPci,
    queue: SplitQueue,
    features: u64,
    msix: bool,
    timeout_ms: u64,
    requests: u32,
    missed_irqs: u32,
}

/// Finds the first virtio-blk function, brings it up twice (the first time
/// followed by a reset, as a driver reload), runs the checks and prints the
/// results. Never hangs: every wait is bounded.
pub fn test(out: &mut Serial, functions: &Functions, cfg: &TestConfig) -> Outcome {
    let found = functions.iter().find(|f| {
        f.vendor == VENDOR
            && (f.device == MODERN_DEVICE_BASE + DEVICE_TYPE
                || (f.device == TRANSITIONAL_ID && f.subsystem == DEVICE_TYPE))
    });
    let Some(function) = found else {
        say!(out, "virtio-blk absent");
        return Outcome::Absent;
    };
    let dev = match VirtioPci::probe(function.bdf) {
        Ok(dev) => dev,
        Err(e) => {
            say!(out, "virtio-blk {} fail: {e}", function.bdf);
            return Outcome::Fail;
        }
    };
    match run(out, &dev, cfg) {
        Ok(outcome) => outcome,
        Err(e) => {
            say!(out, "virtio-blk fail: {e}");
            dev.fail();
            Outcome::Fail
        }
    }
}

fn run(out: &mut Serial, dev: &VirtioPci, cfg: &TestConfig) -> Result<Outcome, &'static str> {
    // First driver instance: bring up, one request, reset.
    let mut first = Blk::bring_up(out, dev, cfg, true)?;
    let status = first.get_id()?.0;
    if status != S_OK {
        say!(out, "virtio-blk get_id status={status}");
    }
    let status = first.request(T_IN, 0, Some(Buffer::writable(DATA.addr(), SECTOR as u32)))?;
    if status != S_OK {
        say!(out, "virtio-blk read sector 0 status={status}");
        return Ok(Outcome::Fail);
    }
    let (mut requests, mut missed) = (first.requests, first.missed_irqs);
    dev.reset()?;

    // Second instance: the real test.
    let mut blk = Blk::bring_up(out, dev, cfg, false)?;
    let (id_status, serial) = blk.get_id()?;
    say!(out, "virtio-blk reinit ok");

    let f = blk.features;
    let (capacity, size_max, seg_max, blk_size, num_queues) = dev.read_config(|d| {
        (
            u64::from(d.config32(CFG_CAPACITY)) | (u64::from(d.config32(CFG_CAPACITY + 4)) << 32),
            if f & F_SIZE_MAX != 0 {
                d.config32(CFG_SIZE_MAX)
            } else {
                0
            },
            if f & F_SEG_MAX != 0 {
                d.config32(CFG_SEG_MAX)
            } else {
                0
            },
            if f & F_BLK_SIZE != 0 {
                d.config32(CFG_BLK_SIZE)
            } else {
                512
            },
            if f & F_MQ != 0 {
                d.config16(CFG_NUM_QUEUES)
            } else {
                1
            },
        )
    });
    let ro = f & F_RO != 0;
    out.write_bytes(crate::serial::PREFIX);
    sayf!(
        out,
        "virtio-blk capacity={capacity} ro={} serial=",
        u8::from(ro)
    );
    if id_status == S_OK && serial.iter().any(|&b| b != 0) {
        for &b in serial.iter().take_while(|&&b| b != 0) {
            out.write_byte(if b.is_ascii_graphic() { b } else { b'?' });
        }
    } else {
        out.write_bytes(b"none");
    }
    sayf!(
        out,
        " blk_size={blk_size} seg_max={seg_max} size_max={size_max} num_queues={num_queues} flush={}\n",
        u8::from(f & F_FLUSH != 0)
    );

    let ok = if capacity == 0 {
        say!(out, "virtio-blk empty disk: no pattern test");
        false
    } else if ro {
        blk.ro_check(out)?
    } else {
        // Requests of at most `size_max` bytes when the device limits them.
        let max_sectors = if size_max as usize >= SECTOR {
            (size_max as usize / SECTOR) as u64
        } else {
            PATTERN_SECTORS
        };
        let mut all = true;
        for round in 1..=cfg.rounds {
            let ok = blk.pattern_check(out, capacity, max_sectors.min(PATTERN_SECTORS))?;
            if cfg.rounds > 1 {
                say!(
                    out,
                    "virtio-blk round {round} {}",
                    if ok { "ok" } else { "fail" }
                );
            }
            all &= ok;
            if !ok {
                break;
            }
        }
        all
    };

    requests += blk.requests;
    missed += blk.missed_irqs;
    let irqs = interrupts::count(VECTOR_QUEUE);
    let config_irqs = interrupts::count(VECTOR_CONFIG);
    let msix = blk.msix;
    dev.reset()?;
    if !msix {
        say!(
            out,
            "virtio-blk irq=none requests={requests} (no msi-x: polled)"
        );
        return Ok(if ok { Outcome::Ok } else { Outcome::Fail });
    }
    say!(
        out,
        "virtio-blk irq={irqs} config_irq={config_irqs} requests={requests} missed={missed}"
    );
    if irqs == 0 {
        say!(out, "virtio-blk no interrupts: completions were polled");
        return Ok(Outcome::Fail);
    }
    Ok(if ok { Outcome::Ok } else { Outcome::Fail })
}

impl<'a> Blk<'a> {
    /// Negotiates features, programs MSI-X, sets up queue 0, DRIVER_OK.
    fn bring_up(
        out: &mut Serial,
        dev: &'a VirtioPci,
        cfg: &TestConfig,
        verbose: bool,
    ) -> Result<Self, &'static str> {
        let (offered, accepted) = dev.negotiate(WANTED)?;
        let msix = dev.setup_msix(cfg.apic_id, &[VECTOR_CONFIG, VECTOR_QUEUE]);
        let config_entry = if msix {
            dev.set_config_vector(0)
        } else {
            NO_VECTOR
        };
        // SAFETY: QUEUE is this driver's queue page, used for nothing else;
        // the previous instance's queue died with the reset.
        let (queue, queue_entry) = unsafe {
            dev.setup_queue(
                0,
                QUEUE.addr(),
                QUEUE_SIZE,
                if msix { 1 } else { NO_VECTOR },
            )
        }?;
        let msix = msix && queue_entry == 1;
        if verbose {
            say!(
                out,
                "virtio-blk {} features={offered:#x} accepted={accepted:#x} queues={} queue_size={}",
                dev.bdf,
                dev.num_queues(),
                queue.size
            );
            if msix {
                say!(
                    out,
                    "virtio-blk msix entries={} config_vector={:#x} queue_vector={:#x}{}",
                    dev.msix_entries(),
                    VECTOR_CONFIG,
                    VECTOR_QUEUE,
                    if config_entry == 0 {
                        ""
                    } else {
                        " (config refused)"
                    }
                );
            } else {
                say!(out, "virtio-blk msix unavailable: polling");
            }
        }
        if !msix {
            dev.disable_msix();
        }
        dev.driver_ok()?;
        Ok(Self {
            dev,
            queue,
            features: accepted,
            msix,
            timeout_ms: cfg.timeout_ms,
            requests: 0,
            missed_irqs: 0,
        })
    }

    /// Runs one request and waits for it; returns the status byte.
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<Buffer>,
    ) -> Result<u8, &'static str> {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        REQ.write(REQ_HEADER, &header);
        REQ.write(REQ_STATUS, &[S_NONE]);
        let head_buf = Buffer::readable(REQ.at(REQ_HEADER), 16);
        let status_buf = Buffer::writable(REQ.at(REQ_STATUS), 1);
        let head = match data {
            Some(d) => self.queue.push(&[head_buf, d, status_buf]),
            None => self.queue.push(&[head_buf, status_buf]),
        }
        .ok_or("request queue full")?;
        let before = interrupts::count(VECTOR_QUEUE);
        self.queue.notify();
        let queue = &self.queue;
        if !interrupts::wait_until(self.timeout_ms, || queue.has_used()) {
            let _ = self.dev.isr();
            return Err("request timed out");
        }
        let used = self.queue.pop_used().ok_or("used ring went backwards")?;
        if used.id != head {
            return Err("used ring returned an unknown request");
        }
        if self.msix
            && !interrupts::wait_until(IRQ_GRACE_MS, || interrupts::count(VECTOR_QUEUE) != before)
        {
            self.missed_irqs += 1;
        }
        self.requests += 1;
        Ok(REQ.byte(REQ_STATUS))
    }

    /// GET_ID: the status and the 20-byte serial.
    fn get_id(&mut self) -> Result<(u8, [u8; ID_LEN]), &'static str> {
        REQ.fill(REQ_ID, ID_LEN, 0);
        let status = self.request(
            T_GET_ID,
            0,
            Some(Buffer::writable(REQ.at(REQ_ID), ID_LEN as u32)),
        )?;
        let mut id = [0u8; ID_LEN];
        REQ.read(REQ_ID, &mut id);
        Ok((status, id))
    }

    /// Read-only device: a write must fail with IOERR, a read must work.
    fn ro_check(&mut self, out: &mut Serial) -> Result<bool, &'static str> {
        fill_pattern(0, 1, 0);
        let status = self.request(T_OUT, 0, Some(Buffer::readable(DATA.addr(), SECTOR as u32)))?;
        let rejected = status == S_IOERR;
        if rejected {
            say!(out, "virtio-blk ro write rejected");
        } else {
            say!(out, "virtio-blk ro write not rejected status={status}");
        }
        let status = self.request(T_IN, 0, Some(Buffer::writable(DATA.addr(), SECTOR as u32)))?;
        if status != S_OK {
            say!(out, "virtio-blk ro read status={status}");
        }
        Ok(rejected && status == S_OK)
    }

    /// Writes the pattern to sectors 0..8 and the last sector, flushes,
    /// reads back and compares. Requests carry at most `chunk` sectors.
    fn pattern_check(
        &mut self,
        out: &mut Serial,
        capacity: u64,
        chunk: u64,
    ) -> Result<bool, &'static str> {
        let nonce = crate::cpu::rdtsc() as u32;
        let first = capacity.min(PATTERN_SECTORS);
        let mut runs = [(0u64, first), (0, 0)];
        if capacity > PATTERN_SECTORS {
            runs[1] = (capacity - 1, 1);
        }
        let chunk = chunk.max(1);
        let mut sectors = 0;
        for &(start, count) in &runs {
            let mut s = start;
            while s < start + count {
                let n = chunk.min(start + count - s);
                fill_pattern(s, n, nonce);
                let len = (n as usize * SECTOR) as u32;
                let status = self.request(T_OUT, s, Some(Buffer::readable(DATA.addr(), len)))?;
                if status != S_OK {
                    say!(out, "virtio-blk write failed at sector {s} status={status}");
                    return Ok(false);
                }
                s += n;
                sectors += n;
            }
        }
        if self.features & F_FLUSH != 0 {
            let status = self.request(T_FLUSH, 0, None)?;
            if status != S_OK {
                say!(out, "virtio-blk flush failed status={status}");
                return Ok(false);
            }
        }
        for &(start, count) in &runs {
            let mut s = start;
            while s < start + count {
                let n = chunk.min(start + count - s);
                let len = n as usize * SECTOR;
                DATA.fill(0, len, 0);
                let status =
                    self.request(T_IN, s, Some(Buffer::writable(DATA.addr(), len as u32)))?;
                if status != S_OK {
                    say!(out, "virtio-blk read failed at sector {s} status={status}");
                    return Ok(false);
                }
                if let Some(bad) = compare_pattern(s, n, nonce) {
                    say!(out, "virtio-blk pattern mismatch at sector {bad}");
                    return Ok(false);
                }
                s += n;
            }
        }
        say!(
            out,
            "virtio-blk pattern ok sectors={sectors} flush={}",
            u8::from(self.features & F_FLUSH != 0)
        );
        Ok(true)
    }
}

/// Byte `i` of sector `sector` in the test pattern of run `nonce`: a tag,
/// the sector number, the nonce, then a sector-dependent sequence.
fn pattern_byte(sector: u64, i: usize, nonce: u32) -> u8 {
    const TAG: &[u8; 8] = b"KEELPROB";
    match i {
        0..8 => TAG[i],
        8..16 => sector.to_le_bytes()[i - 8],
        16..20 => nonce.to_le_bytes()[i - 16],
        _ => (sector as u32)
            .wrapping_mul(31)
            .wrapping_add((i as u32).wrapping_mul(7))
            .wrapping_add(nonce) as u8,
    }
}

/// Fills [`DATA`] with the pattern of `count` sectors from `first`.
fn fill_pattern(first: u64, count: u64, nonce: u32) {
    for k in 0..count as usize {
        let mut sector = [0u8; SECTOR];
        for (i, b) in sector.iter_mut().enumerate() {
            *b = pattern_byte(first + k as u64, i, nonce);
        }
        DATA.write(k * SECTOR, &sector);
    }
}

/// Compares [`DATA`] with the pattern; returns the first differing sector.
fn compare_pattern(first: u64, count: u64, nonce: u32) -> Option<u64> {
    (0..count)
        .find(|&k| {
            let base = k as usize * SECTOR;
            (0..SECTOR).any(|i| DATA.byte(base + i) != pattern_byte(first + k, i, nonce))
        })
        .map(|k| first + k)
}
