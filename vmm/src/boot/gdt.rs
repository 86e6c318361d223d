//! The boot GDT and the KVM segment registers built from it.
//!
//! Entries: 0 null, 1 32-bit code (PVH entry, selector 0x08), 2 64-bit code (Linux
//! 64-bit boot protocol `__BOOT_CS` = 0x10), 3 data (`__BOOT_DS` = 0x18), 4 TSS (0x20).

use kvm_bindings::kvm_segment;

/// GDT entries as raw descriptors.
pub const GDT: [u64; 5] = [
    0,
    descriptor(0xc09b, 0, 0xfffff), // 32-bit code, 4 GiB, present, readable, accessed
    descriptor(0xa09b, 0, 0xfffff), // 64-bit code (L bit set)
    descriptor(0xc093, 0, 0xfffff), // data, 4 GiB, writable, accessed
    descriptor(0x808b, 0, 0xfffff), // busy 32-bit TSS
];

/// Selector of the 32-bit code segment.
pub const CODE32_SELECTOR: u16 = 0x08;
/// Selector of the 64-bit code segment.
pub const CODE64_SELECTOR: u16 = 0x10;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x20;

/// Encodes a segment descriptor from flags (access byte in bits 0..8, flags in 12..16),
/// base and 20-bit limit.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Decodes descriptor `index` of [`GDT`] into the KVM segment register form.
pub fn segment(index: usize) -> kvm_segment {
    let d = GDT.get(index).copied().unwrap_or(0);
    let base = ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000);
    let raw_limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    let g = ((d >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the limit counts pages.
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) as u16,
        type_: ((d >> 40) & 0xf) as u8,
        present: ((d >> 47) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g,
        avl: ((d >> 52) & 1) as u8,
        unusable: u8::from(((d >> 47) & 1) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_decodes() {
        let s = segment(2);
        assert_eq!(s.selector, CODE64_SELECTOR);
        assert_eq!((s.l, s.db, s.present, s.s, s.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.base, 0);
    }

    #[test]
    fn code32_and_data_segments_decode() {
        let c = segment(1);
        assert_eq!(
            (c.selector, c.l, c.db, c.type_),
            (CODE32_SELECTOR, 0, 1, 0xb)
        );
        let d = segment(3);
        assert_eq!((d.selector, d.type_, d.db, d.s), (DATA_SELECTOR, 0x3, 1, 1));
        let t = segment(4);
        assert_eq!((t.selector, t.type_, t.s), (TSS_SELECTOR, 0xb, 0));
        assert_eq!(segment(0).unusable, 1);
        assert_eq!(segment(99).unusable, 1);
    }

    #[test]
    fn descriptor_matches_known_encoding() {
        assert_eq!(descriptor(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }
}
