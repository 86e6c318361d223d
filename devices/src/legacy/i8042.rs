//! The i8042 keyboard controller, reduced to what a guest uses to reset the machine.
//!
//! Linux with `reboot=k` (and the probe guest) write 0xFE to port 0x64 to pulse the
//! CPU reset line. keel treats that as the guest asking to stop: the reset eventfd
//! wakes the event loop, which stops the VM and exits 0.

use log::{info, warn};
use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// Base port of the i8042 range; the device spans 0x60..=0x64.
pub const I8042_BASE: u64 = 0x60;
/// Length of the i8042 port range.
pub const I8042_LEN: u64 = 5;

/// The i8042 reset line as a bus device.
pub struct ResetDevice {
    inner: I8042Device<EventFdTrigger>,
}

impl ResetDevice {
    /// Creates the device; `reset` is signalled when the guest requests a reset.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            inner: I8042Device::new(reset),
        }
    }
}

impl BusDevice for ResetDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if off == 4 && value == 0xfe {
            info!("i8042: guest requested reset");
        }
        if let Err(e) = self.inner.write(off, value) {
            warn!("i8042: cannot signal reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals() {
        let evt = EventFdTrigger::new().unwrap();
        let reader = evt.try_clone().unwrap();
        let mut dev = ResetDevice::new(evt);
        dev.write(0, &[0xfe]);
        assert!(
            reader.eventfd().read().is_err(),
            "data port write must not reset"
        );
        dev.write(4, &[0xfe]);
        assert_eq!(reader.eventfd().read().unwrap(), 1);
        let mut d = [0xffu8; 2];
        dev.read(4, &mut d);
        assert_eq!(d, [0, 0]);
        dev.write(u64::MAX, &[0xfe]);
    }
}
