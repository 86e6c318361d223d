//! Volatile accesses to device registers and DMA memory by physical address
//! (the low 4 GiB are identity-mapped, so physical = virtual).

use core::ptr::with_exposed_provenance_mut;

/// Reads a `T` at physical address `addr` with one volatile access.
///
/// # Safety
///
/// `addr` must be aligned for `T` and lie in the identity map, on a device
/// register or memory where a read of this width is allowed (side effects
/// of the read are the caller's business); any bit pattern must be a `T`.
#[inline]
pub unsafe fn read<T: Copy>(addr: u64) -> T {
    let ptr = with_exposed_provenance_mut::<T>(addr as usize);
    // SAFETY: forwarded from the caller.
    unsafe { ptr.read_volatile() }
}

/// Writes `value` at physical address `addr` with one volatile access.
///
/// # Safety
///
/// `addr` must be aligned for `T` and lie in the identity map, on a device
/// register or memory that nothing else in the program uses as a Rust
/// object; the effect of the write is the caller's business.
#[inline]
pub unsafe fn write<T: Copy>(addr: u64, value: T) {
    let ptr = with_exposed_provenance_mut::<T>(addr as usize);
    // SAFETY: forwarded from the caller.
    unsafe { ptr.write_volatile(value) }
}

/// Reads a 32-bit register.
///
/// # Safety
///
/// As for [`read`].
#[inline]
pub unsafe fn read32(addr: u64) -> u32 {
    // SAFETY: forwarded from the caller.
    unsafe { read::<u32>(addr) }
}

/// Writes a 32-bit register.
///
/// # Safety
///
/// As for [`write`].
#[inline]
pub unsafe fn write32(addr: u64, value: u32) {
    // SAFETY: forwarded from the caller.
    unsafe { write::<u32>(addr, value) }
}

/// Reads a 16-bit register.
///
/// # Safety
///
/// As for [`read`].
#[inline]
pub unsafe fn read16(addr: u64) -> u16 {
    // SAFETY: forwarded from the caller.
    unsafe { read::<u16>(addr) }
}

/// Writes a 16-bit register.
///
/// # Safety
///
/// As for [`write`].
#[inline]
pub unsafe fn write16(addr: u64, value: u16) {
    // SAFETY: forwarded from the caller.
    unsafe { write::<u16>(addr, value) }
}

/// Reads an 8-bit register.
///
/// # Safety
///
/// As for [`read`].
#[inline]
pub unsafe fn read8(addr: u64) -> u8 {
    // SAFETY: forwarded from the caller.
    unsafe { read::<u8>(addr) }
}

/// Writes an 8-bit register.
///
/// # Safety
///
/// As for [`write`].
#[inline]
pub unsafe fn write8(addr: u64, value: u8) {
    // SAFETY: forwarded from the caller.
    unsafe { write::<u8>(addr, value) }
}
