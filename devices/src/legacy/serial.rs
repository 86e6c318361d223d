//! A 16550A UART (vm-superio) on the port I/O bus.
//!
//! Output goes to any writer (stdout, a file, or a sink); the interrupt line is an
//! eventfd that the VMM registers as a KVM irqfd. Input is pushed in by the event loop;
//! when the receive FIFO drains, [`SerialInputSpace`] tells it to push more, so bytes
//! typed faster than the guest reads them are held back rather than dropped.

use std::io::{self, Write};

use log::warn;
use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// Signals the event loop that the guest drained the serial receive FIFO.
#[derive(Debug)]
pub struct SerialInputSpace(EventFd);

impl SerialInputSpace {
    /// Creates the notifier.
    pub fn new() -> io::Result<Self> {
        Ok(Self(EventFd::new(EFD_NONBLOCK)?))
    }

    /// A handle for the event loop to wait on.
    pub fn try_clone_eventfd(&self) -> io::Result<EventFd> {
        self.0.try_clone()
    }
}

impl SerialEvents for SerialInputSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        warn!("serial: lost one output byte (writer failed)");
    }
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            warn!("serial: cannot signal input space: {e}");
        }
    }
}

type Uart = Serial<EventFdTrigger, SerialInputSpace, Box<dyn Write + Send>>;

/// The serial port as a bus device (8 registers at its base port).
pub struct SerialDevice {
    uart: Uart,
}

impl SerialDevice {
    /// Creates a UART raising `interrupt` and writing guest output to `out`.
    pub fn new(
        interrupt: EventFdTrigger,
        input_space: SerialInputSpace,
        out: Box<dyn Write + Send>,
    ) -> Self {
        Self {
            uart: Serial::with_events(interrupt, input_space, out),
        }
    }

    /// Queues bytes for the guest to read; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                warn!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Registers are 8 bits wide; wider accesses read the register at `offset`
        // into the low byte and zeros above, like real hardware on an 8-bit bus.
        data.fill(0);
        if offset < 8 {
            if let Some(first) = data.first_mut() {
                *first = self.uart.read(offset as u8);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), true) = (data.first(), offset < 8) else {
            return;
        };
        if let Err(e) = self.uart.write(offset as u8, value) {
            warn!("serial: write to register {offset} failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_writer_and_input_is_readable() {
        let out = Shared::default();
        let irq = EventFdTrigger::new().unwrap();
        let irq_reader = irq.try_clone().unwrap();
        let space = SerialInputSpace::new().unwrap();
        let space_fd = space.try_clone_eventfd().unwrap();
        let mut dev = SerialDevice::new(irq, space, Box::new(out.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");

        // Enable the receive-data interrupt, queue input, read it back.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        assert_eq!(irq_reader.eventfd().read().unwrap(), 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'o');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'k');
        // Draining the FIFO tells the event loop there is room again.
        assert_eq!(space_fd.read().unwrap(), 1);
    }

    #[test]
    fn fifo_full_holds_input_back() {
        let mut dev = SerialDevice::new(
            EventFdTrigger::new().unwrap(),
            SerialInputSpace::new().unwrap(),
            Box::new(io::sink()),
        );
        let cap = dev.input_capacity();
        let big = vec![b'x'; cap + 10];
        assert_eq!(dev.enqueue_input(&big), cap);
        assert_eq!(dev.enqueue_input(b"more"), 0);
    }

    #[test]
    fn out_of_range_and_wide_accesses_are_harmless() {
        let mut dev = SerialDevice::new(
            EventFdTrigger::new().unwrap(),
            SerialInputSpace::new().unwrap(),
            Box::new(io::sink()),
        );
        let mut wide = [0xaau8; 4];
        dev.read(200, &mut wide);
        assert_eq!(wide, [0; 4]);
        dev.write(200, &[1, 2, 3, 4]);
        dev.write(0, &[]);
        let mut empty: [u8; 0] = [];
        dev.read(0, &mut empty);
    }
}
