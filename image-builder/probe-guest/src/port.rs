//! x86 port I/O.

use core::arch::asm;

/// Writes one byte to I/O port `port`.
///
/// # Safety
///
/// Port writes can have any side effect the device behind the port has (reset
/// the machine, start DMA, ...): the caller must know what `port` is.
#[inline]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: `out` touches no memory; the device effect is the caller's contract.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

/// Reads one byte from I/O port `port`.
///
/// # Safety
///
/// Port reads can have side effects (for example they pop a receive FIFO):
/// the caller must know what `port` is.
#[inline]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` touches no memory; the device effect is the caller's contract.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags));
    }
    value
}

/// Writes a 16-bit word to I/O port `port`.
///
/// # Safety
///
/// As for [`outb`].
#[inline]
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: `out` touches no memory; the device effect is the caller's contract.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags));
    }
}

/// Reads a 16-bit word from I/O port `port`.
///
/// # Safety
///
/// As for [`inb`].
#[inline]
pub unsafe fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: `in` touches no memory; the device effect is the caller's contract.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags));
    }
    value
}

/// Writes a 32-bit double word to I/O port `port`.
///
/// # Safety
///
/// As for [`outb`].
#[inline]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: `out` touches no memory; the device effect is the caller's contract.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags));
    }
}

/// Reads a 32-bit double word from I/O port `port`.
///
/// # Safety
///
/// As for [`inb`].
#[inline]
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: `in` touches no memory; the device effect is the caller's contract.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags));
    }
    value
}

/// keel's debug port: the VMM timestamps every byte written here.
pub const DEBUG_PORT: u16 = 0xe9;

/// Debug port code written as the very first instruction of every entry.
#[allow(dead_code)] // written by the entry assembly, kept here as the reference
pub const CODE_ENTRY: u8 = 0x01;
/// Debug port code written right before a normal power-off.
pub const CODE_POWER_OFF: u8 = 0x02;
/// Debug port code written right before the power-off that ends a panic.
pub const CODE_PANIC: u8 = 0x03;

/// Writes `code` to the keel debug port.
pub fn debug_code(code: u8) {
    // SAFETY: port 0xe9 is keel's debug port (QEMU's debugcon); writing it only logs.
    unsafe { outb(DEBUG_PORT, code) }
}
