//! Legacy PCI interrupts (INTx) through KVM: one IOAPIC pin per function, driven by
//! a KVM irqfd registered with a resample eventfd.
//!
//! INTx is level-triggered. The device's side (VFIO) writes the trigger eventfd and
//! masks its line; KVM asserts the IOAPIC pin until the guest's EOI, then deasserts
//! it and writes the resample eventfd, on which VFIO unmasks the line. The whole
//! cycle stays in the kernel.
//!
//! Pins: IOAPIC pins 16–23 only. They have no ISA device and no PIC behind them,
//! so a PCI line never shares with COM1 (IRQ 4), the i8042 (IRQ 1 and 12), the PIT
//! (0) or the RTC (8), and the guest never sees it through the 8259.

use std::sync::Arc;

use keel_devices::vfio::irq::IntxLine;
use kvm_ioctls::VmFd;
use log::warn;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::layout::IOAPIC_PINS;

/// First IOAPIC pin handed to PCI functions.
pub const FIRST_PCI_PIN: u32 = 16;

/// Errors while wiring a legacy interrupt.
#[derive(Debug, Error)]
pub enum IntxError {
    /// Every PCI pin is taken.
    #[error(
        "no free IOAPIC pin for a legacy PCI interrupt (pins {FIRST_PCI_PIN}..{IOAPIC_PINS} \
         are all used; pass fewer devices that need INTx)"
    )]
    Exhausted,
    /// An eventfd could not be created.
    #[error("cannot create an INTx eventfd: {0}")]
    EventFd(std::io::Error),
    /// KVM refused the irqfd.
    #[error("cannot register the INTx irqfd with resample on GSI {gsi}: {source}")]
    Irqfd {
        /// The GSI.
        gsi: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
}

/// Hands out IOAPIC pins 16–23, one per function.
#[derive(Debug, Clone)]
pub struct IntxPins {
    next: u32,
}

impl Default for IntxPins {
    fn default() -> Self {
        Self::new()
    }
}

impl IntxPins {
    /// All pins free.
    pub fn new() -> Self {
        Self {
            next: FIRST_PCI_PIN,
        }
    }

    /// The next free pin.
    pub fn allocate(&mut self) -> Result<u32, IntxError> {
        if self.next >= IOAPIC_PINS {
            return Err(IntxError::Exhausted);
        }
        let pin = self.next;
        self.next += 1;
        Ok(pin)
    }
}

/// A level-triggered line on an IOAPIC pin: a KVM irqfd with a resample eventfd.
/// Deregistered when dropped.
pub struct KvmIntxLine {
    vm: Arc<VmFd>,
    gsi: u32,
    trigger: EventFd,
    resample: EventFd,
}

impl KvmIntxLine {
    /// Registers the irqfd and resample eventfd on `gsi` (an IOAPIC pin).
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> Result<Self, IntxError> {
        let trigger = EventFd::new(EFD_NONBLOCK).map_err(IntxError::EventFd)?;
        let resample = EventFd::new(EFD_NONBLOCK).map_err(IntxError::EventFd)?;
        vm.register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(|source| IntxError::Irqfd { gsi, source })?;
        Ok(Self {
            vm,
            gsi,
            trigger,
            resample,
        })
    }
}

impl IntxLine for KvmIntxLine {
    fn trigger(&self) -> &EventFd {
        &self.trigger
    }

    fn resample(&self) -> &EventFd {
        &self.resample
    }

    fn line(&self) -> u8 {
        // Pins are below IOAPIC_PINS (24).
        self.gsi as u8
    }
}

impl Drop for KvmIntxLine {
    fn drop(&mut self) {
        if let Err(e) = self.vm.unregister_irqfd(&self.trigger, self.gsi) {
            warn!("cannot deregister the INTx irqfd on GSI {}: {e}", self.gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn pins_avoid_isa_irqs_and_run_out_clearly() {
        let mut pins = IntxPins::new();
        let got: Vec<u32> = (0..8).map(|_| pins.allocate().unwrap()).collect();
        assert_eq!(got, (16..24).collect::<Vec<_>>());
        for isa in [0, 1, 2, 4, 8, 12] {
            assert!(!got.contains(&isa));
        }
        let err = pins.allocate().unwrap_err();
        assert!(matches!(err, IntxError::Exhausted));
        assert!(err.to_string().contains("pins 16..24"), "{err}");
    }

    fn ioapic_irr(vm: &VmFd) -> u32 {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        // SAFETY: chip_id IOAPIC makes KVM fill the `ioapic` member of the union.
        unsafe { chip.chip.ioapic.irr }
    }

    /// A real in-kernel IOAPIC: writing the line's trigger eventfd asserts exactly
    /// its pin (level held until an EOI, which needs a guest).
    #[test]
    fn the_trigger_asserts_its_ioapic_pin() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: no /dev/kvm");
            return;
        }
        let vm = crate::kvm::create_vm().unwrap();
        crate::kvm::create_irqchip(&vm).unwrap();
        let line = KvmIntxLine::new(Arc::clone(&vm.fd), 17).unwrap();
        assert_eq!(line.line(), 17);
        assert_eq!(ioapic_irr(&vm.fd) & (1 << 17), 0);
        line.trigger().write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ioapic_irr(&vm.fd) & (1 << 17) == 0 {
            assert!(Instant::now() < deadline, "IOAPIC pin 17 never asserted");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(ioapic_irr(&vm.fd) & !(1 << 17), 0, "only pin 17");
        // A second resample irqfd on the same pin is accepted (KVM shares the
        // resampler between the lines of one GSI).
        let second = KvmIntxLine::new(Arc::clone(&vm.fd), 17).unwrap();
        drop(second);
        drop(line);
    }
}
