//! virtio 1.x over PCI: the modern transport ([`pci_transport`]), split
//! virtqueues ([`queue`]), and small drivers that test a block device
//! ([`blk`]) and a network device ([`net`]).
//!
//! Everything is single-threaded and allocation-free: each driver owns a few
//! page-aligned static DMA areas (guest-physical = virtual), keeps at most a
//! handful of requests in flight, and waits with [`crate::interrupts::wait_until`].

pub mod blk;
pub mod net;
pub mod pci_transport;
pub mod queue;

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;

use crate::modes::Devices;
use crate::serial::Serial;
use crate::{cpu, interrupts, mmio, pci};

/// PCI vendor ID of virtio devices.
pub const VENDOR: u16 = 0x1af4;
/// Modern (virtio 1.x only) device IDs are this plus the virtio device type.
pub const MODERN_DEVICE_BASE: u16 = 0x1040;

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and needs a reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Device-independent feature bits.
pub mod feature {
    /// VIRTIO_F_VERSION_1: a virtio 1.x device (required).
    pub const VERSION_1: u64 = 1 << 32;
}

/// How long to wait for the first LAPIC timer tick, in ms.
const TIMER_CHECK_MS: u64 = 500;

/// Result of one device test, for the summary line.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every check passed.
    Ok,
    /// Some check failed (the line before says which).
    Fail,
    /// No such device on bus 0.
    Absent,
    /// Not tested in this mode.
    Skipped,
}

impl Outcome {
    /// Word printed in the summary line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Fail => "fail",
            Self::Absent => "absent",
            Self::Skipped => "skipped",
        }
    }
}

/// Settings shared by the device tests.
#[derive(Clone, Copy)]
pub struct TestConfig {
    /// APIC ID that MSI-X messages target.
    pub apic_id: u32,
    /// Timeout of one request, and of the wait for network replies, in ms.
    pub timeout_ms: u64,
    /// Rounds of the blk pattern test.
    pub rounds: u64,
    /// Queue pairs the virtio-net driver sets up (only the first carries frames).
    pub net_pairs: u16,
    /// Pairs to select with VQ_PAIRS_SET on the control queue (0: send nothing).
    pub net_mq_set: u16,
}

/// A page-aligned static DMA area of `N` bytes, handed to devices by its
/// (identity-mapped) physical address. Its contents start undefined: drivers
/// write before they read, and only with volatile accesses (devices write it
/// behind the compiler's back).
#[repr(C, align(4096))]
pub struct Dma<const N: usize>(UnsafeCell<MaybeUninit<[u8; N]>>);

// SAFETY: the guest is single-threaded; the contents are only accessed with
// volatile reads and writes through raw addresses, never through references.
unsafe impl<const N: usize> Sync for Dma<N> {}

impl<const N: usize> Dma<N> {
    /// An area with undefined contents (place it in `.noinit` so the entry
    /// code does not spend time clearing it).
    pub const fn new() -> Self {
        Self(UnsafeCell::new(MaybeUninit::uninit()))
    }

    /// Physical address of byte 0.
    pub fn addr(&self) -> u64 {
        self.0.get() as u64
    }

    /// Physical address of byte `off`; panics if out of range.
    pub fn at(&self, off: usize) -> u64 {
        assert!(off < N, "DMA offset out of range");
        self.addr() + off as u64
    }

    /// Writes `bytes` at `off`.
    pub fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= N, "DMA write out of range");
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: in range (checked above) of this static area, which is
            // only accessed through such volatile accesses.
            unsafe { mmio::write8(self.addr() + (off + i) as u64, b) };
        }
    }

    /// Sets `len` bytes at `off` to `byte`.
    pub fn fill(&self, off: usize, len: usize, byte: u8) {
        assert!(off + len <= N, "DMA fill out of range");
        for i in 0..len {
            // SAFETY: as for `write`.
            unsafe { mmio::write8(self.addr() + (off + i) as u64, byte) };
        }
    }

    /// Reads the byte at `off`.
    pub fn byte(&self, off: usize) -> u8 {
        assert!(off < N, "DMA read out of range");
        // SAFETY: as for `write`; any byte value is valid, and reading an
        // unwritten byte only gives an unspecified value (volatile read of
        // plain memory).
        unsafe { mmio::read8(self.addr() + off as u64) }
    }

    /// Copies `buf.len()` bytes from `off` into `buf`.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.byte(off + i);
        }
    }
}

/// Runs a device mode: interrupts, PCI enumeration, then the selected
/// device tests and the summary line.
pub fn run_mode(out: &mut Serial, devices: &Devices) {
    let (tsc_khz, source) = match devices.tsc_khz {
        Some(khz) => (khz, "cmdline"),
        None => {
            let (khz, source) = cpu::tsc_khz();
            (khz, source.name())
        }
    };
    let apic = interrupts::init(tsc_khz);
    // One LAPIC timer tick proves the IDT, GDT and LAPIC work on this boot path.
    let timer = interrupts::wait_until(TIMER_CHECK_MS, || {
        interrupts::count(interrupts::VECTOR_TIMER) > 0
    });
    say!(
        out,
        "apic id={} mode={} base={:#x} timer_irq={} tsc_khz={tsc_khz} source={source}",
        apic.id,
        if apic.x2apic { "x2apic" } else { "xapic" },
        apic.base,
        if timer { "ok" } else { "missing" }
    );
    let functions = pci::enumerate(out, devices.reassign_bars);
    if devices.pci_only {
        say!(out, "pci done functions={}", functions.iter().count());
        return;
    }
    let cfg = TestConfig {
        apic_id: apic.id,
        timeout_ms: devices.timeout_ms,
        rounds: devices.rounds,
        net_pairs: devices.net_pairs,
        net_mq_set: devices.net_mq_set,
    };
    let blk = if devices.blk {
        blk::test(out, &functions, &cfg)
    } else {
        Outcome::Skipped
    };
    let net = if devices.net {
        net::test(out, &functions, &cfg)
    } else {
        Outcome::Skipped
    };
    say!(out, "virtio done blk={} net={}", blk.name(), net.name());
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub struct Mac(pub [u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}
