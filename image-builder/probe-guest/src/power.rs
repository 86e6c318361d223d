//! Leaving the guest: i8042 reset (keel's orderly shutdown) and triple faults.

use core::arch::asm;

use crate::port::{debug_code, outb, CODE_POWER_OFF};
use crate::serial::Serial;

/// i8042 command port.
const I8042_COMMAND: u16 = 0x64;
/// i8042 command: pulse the CPU reset line.
const I8042_RESET: u8 = 0xfe;

/// Announces and performs an orderly power-off: prints `poweroff`, writes the
/// power-off code to the debug port, then resets through the i8042.
pub fn power_off(out: &mut Serial) -> ! {
    say!(out, "poweroff");
    debug_code(CODE_POWER_OFF);
    reset()
}

/// Asks the i8042 for a CPU reset (keel-vmm ends the VM with exit code 0), and
/// halts if the VMM does not stop us.
pub fn reset() -> ! {
    // SAFETY: 0xfe on the i8042 command port resets the machine, which is the
    // point; it touches no guest memory.
    unsafe { outb(I8042_COMMAND, I8042_RESET) };
    halt_forever()
}

/// Halts with interrupts off, forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: `cli; hlt` only stops this CPU; no memory is touched.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Triple-faults the CPU: loads an IDT with limit 0, so the first exception
/// cannot be delivered, escalates to a double fault that cannot be delivered
/// either, and the CPU shuts down.
pub fn triple_fault() -> ! {
    // An IDTR image: 16-bit limit 0, 64-bit base 0.
    let idtr = [0u8; 10];
    // SAFETY: deliberately fatal: with no IDT, `ud2` (or `int3` after it)
    // ends in a triple fault and the VM never returns here. `lidt` only reads
    // the 10 bytes of `idtr`.
    unsafe {
        asm!(
            "lidt [{idtr}]",
            "ud2",
            "int3",
            idtr = in(reg) idtr.as_ptr(),
            options(nostack),
        );
    }
    halt_forever()
}
