//! The keel debug port (I/O port 0xE9): a guest writes one-byte event codes and the
//! VMM records when each arrived.
//!
//! Code 1 marks the guest's first instruction: the time from `exec` to that write is
//! the boot latency the benchmark reports. The timestamps are `CLOCK_MONOTONIC`
//! nanoseconds, comparable with the clock of the process that started the VMM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::info;

use crate::bus::BusDevice;

/// The I/O port of the debug device.
pub const DEBUG_PORT: u64 = 0xe9;

/// Code the guest writes as its first instruction.
pub const CODE_FIRST_INSTRUCTION: u8 = 0x01;

/// Reads `CLOCK_MONOTONIC` in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// What the debug port has seen, shared with the rest of the VMM.
#[derive(Debug)]
pub struct DebugPortLog {
    started_ns: u64,
    first_instruction_ns: AtomicU64,
    last_code: AtomicU64,
}

impl DebugPortLog {
    /// Creates a log whose relative times count from `started_ns` (monotonic).
    pub fn new(started_ns: u64) -> Self {
        Self {
            started_ns,
            first_instruction_ns: AtomicU64::new(0),
            last_code: AtomicU64::new(u64::MAX),
        }
    }

    /// Monotonic time of the first-instruction marker, if it arrived.
    pub fn first_instruction_ns(&self) -> Option<u64> {
        match self.first_instruction_ns.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }

    /// The last code written, if any.
    pub fn last_code(&self) -> Option<u8> {
        u8::try_from(self.last_code.load(Ordering::Acquire)).ok()
    }

    fn record(&self, code: u8) {
        let now = monotonic_ns();
        self.last_code.store(u64::from(code), Ordering::Release);
        let since_start_us = now.saturating_sub(self.started_ns) / 1000;
        if code == CODE_FIRST_INSTRUCTION
            && self
                .first_instruction_ns
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            info!("guest first instruction: monotonic_ns={now} after_start_us={since_start_us}");
        } else {
            info!(
                "guest debug code {code:#04x}: monotonic_ns={now} after_start_us={since_start_us}"
            );
        }
    }
}

/// The debug port as a bus device.
pub struct DebugPort {
    log: Arc<DebugPortLog>,
}

impl DebugPort {
    /// Creates the device writing into `log`.
    pub fn new(log: Arc<DebugPortLog>) -> Self {
        Self { log }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Bochs/QEMU convention: reading the debug port returns 0xE9 (port present).
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = 0xe9;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            self.log.record(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_marker_once() {
        let log = Arc::new(DebugPortLog::new(monotonic_ns()));
        let mut port = DebugPort::new(log.clone());
        assert_eq!(log.first_instruction_ns(), None);
        port.write(0, &[CODE_FIRST_INSTRUCTION]);
        let first = log.first_instruction_ns().unwrap();
        port.write(0, &[CODE_FIRST_INSTRUCTION]);
        assert_eq!(log.first_instruction_ns(), Some(first));
        port.write(0, &[2]);
        assert_eq!(log.last_code(), Some(2));
        let mut d = [0u8; 2];
        port.read(0, &mut d);
        assert_eq!(d, [0xe9, 0]);
    }
}
