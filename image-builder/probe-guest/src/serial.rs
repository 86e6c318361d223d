//! The first serial port: a 16550 UART at I/O port 0x3f8, polled (no interrupts).

use core::fmt;

use crate::port::{inb, outb};

/// I/O base of COM1.
const COM1: u16 = 0x3f8;

/// Register offsets from the base port.
const DATA: u16 = 0; // THR (write) / RBR (read); DLL when DLAB=1
const IER: u16 = 1; // interrupt enable; DLM when DLAB=1
const FCR: u16 = 2; // FIFO control (write)
const LCR: u16 = 3; // line control
const MCR: u16 = 4; // modem control
const LSR: u16 = 5; // line status

/// LCR: divisor latch access.
const LCR_DLAB: u8 = 0x80;
/// LCR: 8 data bits, no parity, 1 stop bit.
const LCR_8N1: u8 = 0x03;
/// FCR: enable the FIFOs, clear both, 14-byte receive trigger.
const FCR_ENABLE_CLEAR: u8 = 0xc7;
/// MCR: DTR and RTS.
const MCR_DTR_RTS: u8 = 0x03;
/// LSR: a received byte is waiting.
const LSR_DATA_READY: u8 = 0x01;
/// LSR: the transmit holding register is empty.
const LSR_THR_EMPTY: u8 = 0x20;
/// Divisor for 115200 baud from the 1.8432 MHz clock.
const DIVISOR_115200: u16 = 1;
/// Polls of LSR before a byte is written anyway (a stuck UART must not hang us).
const TX_POLL_LIMIT: u32 = 100_000;

/// What every output line starts with.
pub const PREFIX: &[u8] = b"keel-probe: ";

/// Handle to COM1. It holds no state, so any number of them may exist (the
/// panic handler makes its own).
pub struct Serial(());

impl Serial {
    /// Returns a handle without touching the UART.
    pub const fn new() -> Self {
        Self(())
    }

    /// Programs the UART for 115200 8N1 with FIFOs and interrupts off.
    pub fn init() -> Self {
        // SAFETY: COM1 is the 16550 the boot contract puts at 0x3f8; programming
        // its line settings has no effect outside the UART.
        unsafe {
            outb(COM1 + IER, 0);
            outb(COM1 + LCR, LCR_DLAB);
            let [lo, hi] = DIVISOR_115200.to_le_bytes();
            outb(COM1 + DATA, lo);
            outb(COM1 + IER, hi);
            outb(COM1 + LCR, LCR_8N1);
            outb(COM1 + FCR, FCR_ENABLE_CLEAR);
            outb(COM1 + MCR, MCR_DTR_RTS);
        }
        Self::new()
    }

    fn lsr() -> u8 {
        // SAFETY: reading LSR of COM1 has no side effect on the data path.
        unsafe { inb(COM1 + LSR) }
    }

    /// Sends one byte once the transmit holding register is empty.
    pub fn write_byte(&mut self, byte: u8) {
        let mut polls = 0;
        while Self::lsr() & LSR_THR_EMPTY == 0 && polls < TX_POLL_LIMIT {
            polls += 1;
            core::hint::spin_loop();
        }
        // SAFETY: writing THR of COM1 transmits the byte; nothing else.
        unsafe { outb(COM1 + DATA, byte) }
    }

    /// Sends `bytes` as they are.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_byte(b);
        }
    }

    /// Returns a received byte if one is waiting.
    pub fn try_read_byte(&mut self) -> Option<u8> {
        if Self::lsr() & LSR_DATA_READY == 0 {
            return None;
        }
        // SAFETY: reading RBR of COM1 pops the byte LSR said is waiting.
        Some(unsafe { inb(COM1 + DATA) })
    }

    /// Waits for and returns the next received byte.
    pub fn read_byte(&mut self) -> u8 {
        loop {
            if let Some(b) = self.try_read_byte() {
                return b;
            }
            core::hint::spin_loop();
        }
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Writes one whole line to `$out` (a `&mut Serial`): the `keel-probe: ` prefix, the formatted text, `\n`.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {{
        let out: &mut $crate::serial::Serial = $out;
        out.write_bytes($crate::serial::PREFIX);
        // Serial::write_str never fails.
        let _ = ::core::fmt::Write::write_fmt(out, format_args!($($arg)*));
        out.write_bytes(b"\n");
    }};
}

/// Writes formatted text without prefix or newline (for lines built in parts).
macro_rules! sayf {
    ($out:expr, $($arg:tt)*) => {{
        let out: &mut $crate::serial::Serial = $out;
        // Serial::write_str never fails.
        let _ = ::core::fmt::Write::write_fmt(out, format_args!($($arg)*));
    }};
}
