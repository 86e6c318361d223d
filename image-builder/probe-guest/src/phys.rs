//! Reading guest-physical memory through the identity mapping.

use core::mem::size_of;
use core::ptr::with_exposed_provenance;
use core::slice;

/// Reads a `T` (any alignment) at guest-physical address `addr`.
///
/// # Safety
///
/// `addr .. addr + size_of::<T>()` must be identity-mapped memory that is safe
/// to read (RAM or ROM, not a device with read side effects), and every bit
/// pattern must be a valid `T`.
pub unsafe fn read<T: Copy>(addr: u64) -> T {
    let ptr = with_exposed_provenance::<T>(addr as usize);
    // SAFETY: the caller guarantees the range is mapped, readable memory and
    // that any bit pattern is a valid `T`; `read_unaligned` needs no alignment.
    unsafe { ptr.read_unaligned() }
}

/// Returns the bytes of the NUL-terminated string at `addr`, without the NUL,
/// at most `max` bytes long. Address 0 gives an empty string.
///
/// # Safety
///
/// Up to `max + 1` bytes from `addr` must be identity-mapped readable memory
/// that nothing writes for the rest of the guest's life.
pub unsafe fn c_str(addr: u64, max: usize) -> &'static [u8] {
    if addr == 0 {
        return &[];
    }
    let mut len = 0;
    // SAFETY: the caller guarantees `addr .. addr + max` is readable memory.
    while len < max && unsafe { read::<u8>(addr + len as u64) } != 0 {
        len += 1;
    }
    let ptr = with_exposed_provenance::<u8>(addr as usize);
    // SAFETY: the `len` bytes were just read, so they are mapped; the caller
    // guarantees nothing writes them while the slice lives.
    unsafe { slice::from_raw_parts(ptr, len) }
}

/// Sum of the bytes `addr .. addr + len` modulo 256 (0 for a valid table).
///
/// # Safety
///
/// As for [`read`], for the whole range.
pub unsafe fn checksum(addr: u64, len: u64) -> u8 {
    let mut sum = 0u8;
    for i in 0..len {
        // SAFETY: the caller guarantees the whole range is readable memory.
        sum = sum.wrapping_add(unsafe { read::<u8>(addr + i) });
    }
    sum
}

/// Size of `T` as a `u64`, for address arithmetic.
pub const fn size_u64<T>() -> u64 {
    size_of::<T>() as u64
}
