//! The Intel MultiProcessor Specification 1.4 table: tells a guest without ACPI how
//! many CPUs it has, where the IOAPIC is, and how ISA IRQs reach it.
//!
//! Written as plain little-endian bytes (no unsafe layout casts). The floating pointer
//! goes at the start of the EBDA, where Linux scans for it; the configuration table
//! follows it and may run past the EBDA for large vCPU counts (Linux reserves it).

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{EBDA_START, IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};

/// Errors while writing the MP table.
#[derive(Debug, Error)]
pub enum MpTableError {
    /// More CPUs than APIC IDs allow (the IOAPIC takes the ID after the last CPU).
    #[error("too many vCPUs for an MP table: {0} (maximum 254)")]
    TooManyCpus(u8),
    /// The table does not fit in guest memory.
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;
const MP_SPEC_REV: u8 = 4;
const BUS_ID_PCI: u8 = 0;
const BUS_ID_ISA: u8 = 1;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// CPU signature for family 6 (what a modern x86-64 reports in CPUID.1:EAX).
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present (CPUID.1:EDX bits 0 and 9).
const CPU_FEATURES: u32 = 0x201;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// Builds the configuration table ("PCMP") for `cpus` processors, to live at `addr`.
fn config_table(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus; // first APIC ID after the CPUs (which use 0..cpus)
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_FLAG_ENABLED | if id == 0 { CPU_FLAG_BSP } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    for (id, name) in [(BUS_ID_PCI, b"PCI   "), (BUS_ID_ISA, b"ISA   ")] {
        entries.extend_from_slice(&[1, id]);
        entries.extend_from_slice(name);
        count += 1;
    }
    entries.extend_from_slice(&[2, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n is wired to IOAPIC pin n, active high, edge (the bus defaults).
    for pin in 0..IOAPIC_PINS as u8 {
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, BUS_ID_ISA, pin, ioapic_id, pin]);
        count += 1;
    }
    // Local interrupts: ExtINT to LINT0 of the BSP, NMI to LINT1 of every CPU.
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, BUS_ID_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, BUS_ID_ISA, 0, 0xff, 1]);
    count += 2;

    let length = (44 + entries.len()) as u16;
    let mut table = Vec::with_capacity(length as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(MP_SPEC_REV);
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"KEEL    ");
    table.extend_from_slice(b"APPLIANCEVM ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// The 16-byte floating pointer structure pointing at the table at `table_addr`.
fn floating_pointer(table_addr: u32) -> [u8; 16] {
    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = MP_SPEC_REV;
    fp[10] = checksum(&fp);
    fp
}

/// Writes the MP table for `cpus` vCPUs into guest memory at the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let table_addr = EBDA_START + 16;
    mem.write_slice(
        &floating_pointer(table_addr as u32),
        GuestAddress(EBDA_START),
    )?;
    mem.write_slice(&config_table(cpus), GuestAddress(table_addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_zero_and_counts_match() {
        for cpus in [1u8, 2, 64, 254] {
            let t = config_table(cpus);
            assert_eq!(sum(&t), 0);
            assert_eq!(u16::from_le_bytes([t[4], t[5]]) as usize, t.len());
            let count = u16::from_le_bytes([t[34], t[35]]) as usize;
            // cpus + 2 buses + ioapic + 24 irqs + 2 local ints
            assert_eq!(count, cpus as usize + 2 + 1 + 24 + 2);
            // Walk the entries by type to check the declared sizes.
            let mut off = 44;
            let mut seen = 0;
            while off < t.len() {
                off += if t[off] == 0 { 20 } else { 8 };
                seen += 1;
            }
            assert_eq!(off, t.len());
            assert_eq!(seen, count);
        }
        assert_eq!(sum(&floating_pointer(0x9fc10)), 0);
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(write(&mem, 0).is_err());
        assert!(write(&mem, 255).is_err());
        write(&mem, 254).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
