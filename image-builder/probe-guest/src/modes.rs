//! What the probe does after its report, chosen by `probe.mode=`.

use crate::cpu;
use crate::port::{inb, outb};
use crate::power;
use crate::serial::Serial;

/// Command line key that selects the mode.
const MODE_KEY: &[u8] = b"probe.mode";
/// Command line key that gives the TSC frequency in kHz (for `spin`), when
/// CPUID does not report it.
const TSC_KHZ_KEY: &[u8] = b"probe.tsc_khz";
/// Command line key that gives the device test timeout in milliseconds.
const TIMEOUT_KEY: &[u8] = b"probe.timeout_ms";
const ROUNDS_KEY: &[u8] = b"probe.rounds";
const REASSIGN_KEY: &[u8] = b"probe.pci_reassign";
/// Queue pairs the virtio-net driver sets up (`probe.net_pairs=2`: negotiate MQ
/// and set up a second pair it never uses, like a Linux driver with one active
/// pair).
const NET_PAIRS_KEY: &[u8] = b"probe.net_pairs";
/// With `probe.net_pairs=2`: send VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET with this many
/// pairs on the control queue after DRIVER_OK (`probe.net_mq_set=2`).
const NET_MQ_SET_KEY: &[u8] = b"probe.net_mq_set";
/// Default device test timeout (one request; the wait for network replies).
const TIMEOUT_MS_DEFAULT: u64 = 2000;
/// Longest echoed line; longer lines are cut to this length.
const LINE_MAX: usize = 256;
/// Interval between two `tick` lines in spin mode, in milliseconds.
const TICK_MS: u64 = 100;
/// An I/O port no keel device claims.
const UNHANDLED_PORT: u16 = 0x2f0;
/// Value written to [`UNHANDLED_PORT`].
const BADPORT_VALUE: u8 = 0x5a;

/// The probe's modes.
pub enum Mode<'a> {
    /// Report and power off (the default).
    Hello,
    /// Echo serial input lines until `poweroff`.
    Echo,
    /// Print a tick about every 100 ms, forever, with the TSC frequency from
    /// `probe.tsc_khz=` if given.
    Spin(Option<u64>),
    /// Triple fault.
    Fault,
    /// Panic (tests the panic path: message, debug code 3, reset).
    Panic,
    /// Access an unhandled I/O port, then as `Hello`.
    BadPort,
    /// PCI enumeration and virtio device tests, then power off.
    Devices(Devices),
    /// Anything else: reported, then power off.
    Unknown(&'a [u8]),
}

impl<'a> Mode<'a> {
    /// The mode named by the last `probe.mode=` token of `cmdline` (default `Hello`).
    pub fn from_cmdline(cmdline: &'a [u8]) -> Self {
        match crate::cmdline::value(cmdline, MODE_KEY) {
            None | Some(b"hello") => Self::Hello,
            Some(b"echo") => Self::Echo,
            Some(b"spin") => Self::Spin(
                crate::cmdline::value(cmdline, TSC_KHZ_KEY)
                    .and_then(crate::cmdline::parse_u64)
                    .filter(|&khz| khz != 0),
            ),
            Some(b"fault") => Self::Fault,
            Some(b"badport") => Self::BadPort,
            Some(b"panic") => Self::Panic,
            Some(name @ (b"pci" | b"virtio" | b"blk" | b"net")) => {
                let tsc_khz = crate::cmdline::value(cmdline, TSC_KHZ_KEY)
                    .and_then(crate::cmdline::parse_u64)
                    .filter(|&khz| khz != 0);
                let timeout_ms = crate::cmdline::value(cmdline, TIMEOUT_KEY)
                    .and_then(crate::cmdline::parse_u64)
                    .filter(|&ms| ms != 0)
                    .unwrap_or(TIMEOUT_MS_DEFAULT);
                let rounds = crate::cmdline::value(cmdline, ROUNDS_KEY)
                    .and_then(crate::cmdline::parse_u64)
                    .filter(|&n| n != 0)
                    .unwrap_or(1);
                let reassign_bars = crate::cmdline::value(cmdline, REASSIGN_KEY)
                    .and_then(crate::cmdline::parse_u64)
                    .is_some_and(|v| v != 0);
                let net_pairs = crate::cmdline::value(cmdline, NET_PAIRS_KEY)
                    .and_then(crate::cmdline::parse_u64)
                    .map_or(1, |n| n.clamp(1, 2) as u16);
                let net_mq_set = crate::cmdline::value(cmdline, NET_MQ_SET_KEY)
                    .and_then(crate::cmdline::parse_u64)
                    .map_or(0, |n| n.min(u64::from(u16::MAX)) as u16);
                Self::Devices(Devices {
                    rounds,
                    net_pairs,
                    net_mq_set,
                    reassign_bars,
                    pci_only: name == b"pci",
                    blk: matches!(name, b"virtio" | b"blk"),
                    net: matches!(name, b"virtio" | b"net"),
                    tsc_khz,
                    timeout_ms,
                })
            }
            Some(other) => Self::Unknown(other),
        }
    }
}

/// What the device modes (`pci`, `virtio`, `blk`, `net`) do.
pub struct Devices {
    /// Only enumerate PCI (`probe.mode=pci`).
    pub pci_only: bool,
    /// Test virtio-blk.
    pub blk: bool,
    /// Test virtio-net.
    pub net: bool,
    /// TSC frequency from `probe.tsc_khz=`, for the timeouts.
    pub tsc_khz: Option<u64>,
    /// Timeout from `probe.timeout_ms=`.
    pub timeout_ms: u64,
    /// How many times the blk pattern test runs (`probe.rounds=`, default 1).
    pub rounds: u64,
    /// Move every memory BAR before using the devices (`probe.pci_reassign=1`).
    pub reassign_bars: bool,
    /// Queue pairs the virtio-net driver sets up (`probe.net_pairs=`, 1 or 2).
    pub net_pairs: u16,
    /// Pairs to select with VQ_PAIRS_SET on the control queue (0: send nothing).
    pub net_mq_set: u16,
}

/// Runs `mode`; every mode ends in a power-off, a triple fault or runs forever.
pub fn run(out: &mut Serial, mode: Mode<'_>) -> ! {
    match mode {
        Mode::Hello => power::power_off(out),
        Mode::Echo => echo(out),
        Mode::Spin(tsc_khz) => spin(out, tsc_khz),
        Mode::Fault => {
            say!(out, "faulting");
            power::triple_fault()
        }
        Mode::Panic => panic!("requested by probe.mode=panic"),
        Mode::BadPort => {
            badport(out);
            power::power_off(out)
        }
        Mode::Devices(devices) => {
            crate::virtio::run_mode(out, &devices);
            power::power_off(out)
        }
        Mode::Unknown(name) => {
            out.write_bytes(crate::serial::PREFIX);
            out.write_bytes(b"unknown mode ");
            out.write_bytes(name);
            out.write_bytes(b"\n");
            power::power_off(out)
        }
    }
}

/// Echoes input lines as `echo: <line>` until the line `poweroff`.
fn echo(out: &mut Serial) -> ! {
    say!(out, "echo ready");
    let mut line = [0u8; LINE_MAX];
    let mut len = 0;
    // A '\n' right after a '\r' ends no second (empty) line.
    let mut after_cr = false;
    loop {
        let byte = out.read_byte();
        let was_cr = after_cr;
        after_cr = byte == b'\r';
        match byte {
            b'\n' if was_cr => {}
            b'\r' | b'\n' => {
                let text = &line[..len];
                len = 0;
                out.write_bytes(crate::serial::PREFIX);
                out.write_bytes(b"echo: ");
                out.write_bytes(text);
                out.write_bytes(b"\n");
                if text == b"poweroff" {
                    power::power_off(out);
                }
            }
            _ => {
                if let Some(slot) = line.get_mut(len) {
                    *slot = byte;
                    len += 1;
                }
            }
        }
    }
}

/// Prints `tick N` about every [`TICK_MS`] milliseconds, timed with the TSC
/// (frequency from the command line if given, else from CPUID, else a guess).
fn spin(out: &mut Serial, tsc_khz: Option<u64>) -> ! {
    let (khz, source) = match tsc_khz {
        Some(khz) => (khz, "cmdline"),
        None => {
            let (khz, source) = cpu::tsc_khz();
            (khz, source.name())
        }
    };
    say!(out, "spin tsc_khz={khz} source={source}");
    let period = khz.saturating_mul(TICK_MS).max(1);
    let mut next = cpu::rdtsc().wrapping_add(period);
    let mut tick: u64 = 0;
    loop {
        // Wrapping difference: correct across a TSC wrap-around.
        while (cpu::rdtsc().wrapping_sub(next) as i64) < 0 {
            core::hint::spin_loop();
        }
        tick += 1;
        say!(out, "tick {tick}");
        next = next.wrapping_add(period);
        // After a long pause (VM stopped), do not print a burst of late ticks.
        let now = cpu::rdtsc();
        if (now.wrapping_sub(next) as i64) > 0 {
            next = now.wrapping_add(period);
        }
    }
}

/// Writes and reads an I/O port no device claims, and prints what came back.
fn badport(out: &mut Serial) {
    // SAFETY: nothing is behind UNHANDLED_PORT in keel's machine; the point is
    // to see that the VMM survives the access (reads usually give 0xff).
    let value = unsafe {
        outb(UNHANDLED_PORT, BADPORT_VALUE);
        inb(UNHANDLED_PORT)
    };
    say!(out, "badport read={value:#04x}");
}
