//! Intel MultiProcessor Specification table: find it and count CPUs and IOAPICs.

use crate::phys::{checksum, read};

/// Where the MP floating pointer is looked for, in order (16-byte aligned).
const SCAN_RANGES: [(u64, u64); 2] = [(0x9_fc00, 0xa_0000), (0xf_0000, 0x10_0000)];
/// Floating pointer signature.
const FP_SIGNATURE: [u8; 4] = *b"_MP_";
/// Configuration table signature.
const TABLE_SIGNATURE: [u8; 4] = *b"PCMP";
/// Size of the configuration table header.
const TABLE_HEADER_LEN: u64 = 44;

/// Entry types and sizes.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_IOAPIC: u8 = 2;
const PROCESSOR_ENTRY_LEN: u64 = 20;
const OTHER_ENTRY_LEN: u64 = 8;
/// Highest entry type of the base table (bus, IOAPIC, I/O and local interrupts).
const ENTRY_TYPE_MAX: u8 = 4;

/// What the table describes.
pub struct MpCounts {
    /// Processor entries.
    pub cpus: u32,
    /// IOAPIC entries.
    pub ioapics: u32,
}

/// Why no counts could be given.
#[derive(Clone, Copy)]
pub enum MpError {
    /// No floating pointer in the scanned ranges.
    Missing,
    /// The floating pointer or configuration table checksum is wrong.
    BadChecksum,
    /// The floating pointer names no table (a "default configuration").
    NoTable,
    /// The configuration table has a bad signature, length or entry.
    BadTable,
}

impl MpError {
    /// Text printed after `mptable `.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::BadChecksum => "bad checksum",
            Self::NoTable => "default configuration",
            Self::BadTable => "bad table",
        }
    }
}

/// Finds the MP table and counts its processor and IOAPIC entries.
pub fn find() -> Result<MpCounts, MpError> {
    let fp = scan().ok_or(MpError::Missing)?;
    // SAFETY: the scanned ranges are the EBDA and the BIOS area, plain memory
    // in keel's layout; the table the floating pointer names was written by
    // the VMM into guest RAM. Integers have no invalid bit patterns. (This
    // holds for every read below.)
    let (table, fp_len) = unsafe { (read::<u32>(fp + 4), read::<u8>(fp + 8)) };
    // SAFETY: see above; `fp_len` paragraphs of the floating pointer structure.
    if fp_len == 0 || unsafe { checksum(fp, u64::from(fp_len) * 16) } != 0 {
        return Err(MpError::BadChecksum);
    }
    if table == 0 {
        return Err(MpError::NoTable);
    }
    let table = u64::from(table);
    // SAFETY: see above; the header is 44 bytes.
    let (sig, len, count) = unsafe {
        (
            read::<[u8; 4]>(table),
            u64::from(read::<u16>(table + 4)),
            read::<u16>(table + 34),
        )
    };
    if sig != TABLE_SIGNATURE || len < TABLE_HEADER_LEN {
        return Err(MpError::BadTable);
    }
    // SAFETY: see above; the base table is `len` bytes.
    if unsafe { checksum(table, len) } != 0 {
        return Err(MpError::BadChecksum);
    }

    let end = table + len;
    let mut at = table + TABLE_HEADER_LEN;
    let mut counts = MpCounts {
        cpus: 0,
        ioapics: 0,
    };
    for _ in 0..count {
        if at >= end {
            return Err(MpError::BadTable);
        }
        // SAFETY: see above; `at` is inside the checksummed base table.
        let kind = unsafe { read::<u8>(at) };
        let size = match kind {
            ENTRY_PROCESSOR => {
                counts.cpus += 1;
                PROCESSOR_ENTRY_LEN
            }
            ENTRY_IOAPIC => {
                counts.ioapics += 1;
                OTHER_ENTRY_LEN
            }
            k if k <= ENTRY_TYPE_MAX => OTHER_ENTRY_LEN,
            _ => return Err(MpError::BadTable),
        };
        at += size;
    }
    if at > end {
        return Err(MpError::BadTable);
    }
    Ok(counts)
}

/// Returns the address of the first 16-byte aligned `_MP_` in the scan ranges.
fn scan() -> Option<u64> {
    SCAN_RANGES.iter().find_map(|&(start, end)| {
        (start..end).step_by(16).find(|&addr| {
            // SAFETY: the scan ranges are the EBDA and the BIOS area: memory
            // without read side effects.
            let sig = unsafe { read::<[u8; 4]>(addr) };
            sig == FP_SIGNATURE
        })
    })
}
