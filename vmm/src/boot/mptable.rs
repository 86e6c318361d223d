//! The Intel MultiProcessor Specification 1.4 table: tells a guest without ACPI how
//! many CPUs it has, where the IOAPIC is, and how ISA IRQs reach it.
//!
//! Written as plain little-endian bytes (no unsafe layout casts). The floating pointer
//! goes at the start of the EBDA, where Linux scans for it; the configuration table
//! follows it and may run past the EBDA for large vCPU counts (Linux reserves it).
//!
//! PCI functions with a legacy interrupt (INTx) get one I/O interrupt assignment
//! entry each: source bus PCI 0, source IRQ `(slot << 2) | (pin - 1)` (the MP spec's
//! PCI encoding), destination the IOAPIC pin the VMM wired, level-triggered and
//! active low. A guest without ACPI finds its PCI interrupt routing only here.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{EBDA_START, IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};

/// Errors while writing the MP table.
#[derive(Debug, Error)]
pub enum MpTableError {
    /// More CPUs than APIC IDs allow (the IOAPIC takes the ID after the last CPU).
    #[error("too many vCPUs for an MP table: {0} (maximum 254)")]
    TooManyCpus(u8),
    /// A PCI interrupt entry that cannot be encoded.
    #[error("bad PCI interrupt entry {0:?}: slot must be 0..32, pin 1..=4 (INTA..INTD), IOAPIC pin below {IOAPIC_PINS}")]
    BadPciInterrupt(PciIntx),
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
/// Interrupt flags: polarity active low (bits 0-1 = 11), trigger level (bits 2-3 = 11).
const FLAGS_LEVEL_LOW: u16 = 0x000f;
/// CPU signature for family 6 (what a modern x86-64 reports in CPUID.1:EAX).
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present (CPUID.1:EDX bits 0 and 9).
const CPU_FEATURES: u32 = 0x201;

/// The legacy interrupt of one PCI function on bus 0, as the guest must find it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIntx {
    /// Device (slot) number on bus 0.
    pub slot: u8,
    /// Interrupt pin as in configuration space: 1 = INTA .. 4 = INTD.
    pub pin: u8,
    /// IOAPIC pin (GSI) the line is wired to.
    pub gsi: u8,
}

impl PciIntx {
    fn valid(&self) -> bool {
        self.slot < 32 && (1..=4).contains(&self.pin) && u32::from(self.gsi) < IOAPIC_PINS
    }

    /// The MP spec's source bus IRQ for a PCI interrupt: slot in bits 2-6, pin
    /// (0 = INTA) in bits 0-1.
    pub fn source_irq(&self) -> u8 {
        (self.slot << 2) | (self.pin - 1)
    }
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// Builds the configuration table ("PCMP") for `cpus` processors and the PCI
/// interrupts `pci` (already validated).
fn config_table(cpus: u8, pci: &[PciIntx]) -> Vec<u8> {
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
    for p in pci {
        entries.extend_from_slice(&[3, INT_TYPE_INT]);
        entries.extend_from_slice(&FLAGS_LEVEL_LOW.to_le_bytes());
        entries.extend_from_slice(&[BUS_ID_PCI, p.source_irq(), ioapic_id, p.gsi]);
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

/// Writes the MP table for `cpus` vCPUs and the PCI legacy interrupts `pci` into
/// guest memory at the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u8, pci: &[PciIntx]) -> Result<(), MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    if let Some(bad) = pci.iter().find(|p| !p.valid()) {
        return Err(MpTableError::BadPciInterrupt(*bad));
    }
    let table_addr = EBDA_START + 16;
    mem.write_slice(
        &floating_pointer(table_addr as u32),
        GuestAddress(EBDA_START),
    )?;
    mem.write_slice(&config_table(cpus, pci), GuestAddress(table_addr))?;
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
            let t = config_table(cpus, &[]);
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
        assert!(write(&mem, 0, &[]).is_err());
        assert!(write(&mem, 255, &[]).is_err());
        write(&mem, 254, &[]).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }

    /// An I/O interrupt assignment entry as a guest reads it.
    #[derive(Debug, PartialEq, Eq)]
    struct IoInt {
        flags: u16,
        bus_type: String,
        src_irq: u8,
        dst_apic: u8,
        dst_pin: u8,
    }

    /// Finds and parses the table in guest memory like a guest does: floating
    /// pointer at the EBDA, checksums, bus entries, then interrupt entries.
    fn parse_from_guest(mem: &GuestMemoryMmap) -> (u8, Vec<IoInt>) {
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(&fp), 0);
        let at = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;
        let mut head = [0u8; 44];
        mem.read_slice(&mut head, GuestAddress(at)).unwrap();
        assert_eq!(&head[..4], b"PCMP");
        let len = u16::from_le_bytes([head[4], head[5]]) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(at)).unwrap();
        assert_eq!(sum(&t), 0, "table checksum");
        let count = u16::from_le_bytes([t[34], t[35]]) as usize;
        let mut buses = std::collections::HashMap::new();
        let mut ioapic = None;
        let mut ints = Vec::new();
        let mut off = 44;
        for _ in 0..count {
            let e = &t[off..];
            match e[0] {
                0 => off += 20,
                1 => {
                    buses.insert(e[1], String::from_utf8_lossy(&e[2..8]).trim().to_owned());
                    off += 8;
                }
                2 => {
                    ioapic = Some(e[1]);
                    off += 8;
                }
                3 => {
                    ints.push(IoInt {
                        flags: u16::from_le_bytes([e[2], e[3]]),
                        bus_type: buses[&e[4]].clone(),
                        src_irq: e[5],
                        dst_apic: e[6],
                        dst_pin: e[7],
                    });
                    off += 8;
                }
                4 => off += 8,
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(off, len, "entries fill the table");
        (ioapic.unwrap(), ints)
    }

    #[test]
    fn pci_interrupts_are_found_by_a_guest() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let pci = [
            PciIntx {
                slot: 3,
                pin: 1,
                gsi: 16,
            },
            PciIntx {
                slot: 31,
                pin: 4,
                gsi: 23,
            },
        ];
        write(&mem, 2, &pci).unwrap();
        let (ioapic, ints) = parse_from_guest(&mem);
        assert_eq!(ioapic, 2, "IOAPIC ID follows the two CPUs");
        let pci_ints: Vec<&IoInt> = ints.iter().filter(|i| i.bus_type == "PCI").collect();
        assert_eq!(
            pci_ints,
            vec![
                &IoInt {
                    flags: 0x0f,
                    bus_type: "PCI".into(),
                    src_irq: 3 << 2,
                    dst_apic: 2,
                    dst_pin: 16,
                },
                &IoInt {
                    flags: 0x0f,
                    bus_type: "PCI".into(),
                    src_irq: (31 << 2) | 3,
                    dst_apic: 2,
                    dst_pin: 23,
                },
            ]
        );
        // The ISA identity routes are still all there.
        let isa = ints.iter().filter(|i| i.bus_type == "ISA").count();
        assert_eq!(isa, IOAPIC_PINS as usize);
    }

    #[test]
    fn bad_pci_interrupts_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        for bad in [
            PciIntx {
                slot: 32,
                pin: 1,
                gsi: 16,
            },
            PciIntx {
                slot: 1,
                pin: 0,
                gsi: 16,
            },
            PciIntx {
                slot: 1,
                pin: 5,
                gsi: 16,
            },
            PciIntx {
                slot: 1,
                pin: 1,
                gsi: 24,
            },
        ] {
            assert!(matches!(
                write(&mem, 1, &[bad]),
                Err(MpTableError::BadPciInterrupt(b)) if b == bad
            ));
        }
    }
}
