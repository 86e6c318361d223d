//! The CPUID a vCPU sees: KVM's supported set, with the APIC ID and topology of
//! this vCPU filled in and the hypervisor bit set.
//!
//! Topology: one socket, one thread per core, `count` cores; APIC ID = vCPU index.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Number of bits needed to hold APIC IDs `0..count`.
fn id_bits(count: u8) -> u32 {
    match count {
        0 | 1 => 0,
        n => u32::BITS - u32::from(n - 1).leading_zeros(),
    }
}

/// The three sub-leaves (SMT, core, terminator) of leaf 0xB or 0x1F.
fn topology_leaves(function: u32, apic_id: u8, count: u8) -> [kvm_cpuid_entry2; 3] {
    let entry = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: u32::from(apic_id),
        ..Default::default()
    };
    [
        // SMT level: one thread per core, so no ID bits are used for it.
        entry(0, 0, 1, LEVEL_TYPE_SMT),
        // Core level: all vCPUs in one package.
        entry(1, id_bits(count), u32::from(count), LEVEL_TYPE_CORE),
        // Invalid level: ends the enumeration.
        entry(2, 0, 0, 0),
    ]
}

/// Returns the CPUID entries for vCPU `apic_id` of `count`, starting from the
/// host-supported `supported` entries.
pub fn vcpu_cpuid(supported: &CpuId, apic_id: u8, count: u8) -> Vec<kvm_cpuid_entry2> {
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.as_slice().len() + 6);
    let mut topology_functions = Vec::new();
    for entry in supported.as_slice() {
        let mut e = *entry;
        match e.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                e.ebx =
                    (e.ebx & 0x0000_ffff) | (u32::from(apic_id) << 24) | (u32::from(count) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this
            // cache - 1 (L1/L2 per core, L3 shared by the package). Type 0 = no cache.
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let cores_minus_one = u32::from(count).saturating_sub(1);
                let sharing = if level >= 3 { cores_minus_one } else { 0 };
                e.eax = (e.eax & 0x3fff) | (cores_minus_one << 26) | ((sharing & 0xfff) << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                if !topology_functions.contains(&e.function) {
                    topology_functions.push(e.function);
                }
                continue;
            }
            _ => {}
        }
        out.push(e);
    }
    for function in topology_functions {
        out.extend(topology_leaves(function, apic_id, count));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff08_0800,
                ecx: 0,
                edx: EDX_HTT,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                index: 0,
                eax: 0x121, // L1 data cache
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                index: 3,
                eax: 0x163, // L3 unified
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                edx: 7,
                ..Default::default()
            },
        ];
        match CpuId::from_entries(&entries) {
            Ok(c) => c,
            Err(e) => panic!("test CPUID: {e:?}"),
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        match entries
            .iter()
            .find(|e| e.function == function && e.index == index)
        {
            Some(e) => *e,
            None => panic!("leaf {function:#x}.{index} missing"),
        }
    }

    #[test]
    fn id_bits_cover_all_apic_ids() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(254), 8);
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let c = vcpu_cpuid(&supported(), 3, 4);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);

        let single = vcpu_cpuid(&supported(), 0, 1);
        assert_eq!(find(&single, 1, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_reports_x2apic_id_and_core_count() {
        let c = vcpu_cpuid(&supported(), 2, 3);
        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        let end = find(&c, 0xb, 2);
        assert_eq!(smt.edx, 2);
        assert_eq!(core.edx, 2);
        assert_eq!((smt.ecx >> 8) & 0xff, LEVEL_TYPE_SMT);
        assert_eq!((core.ecx >> 8) & 0xff, LEVEL_TYPE_CORE);
        assert_eq!(core.ebx, 3);
        assert_eq!(core.eax, 2);
        assert_eq!((end.ecx >> 8) & 0xff, 0);
        assert_eq!(c.iter().filter(|e| e.function == 0xb).count(), 3);
    }

    #[test]
    fn cache_leaf_reports_cores_and_sharing() {
        let c = vcpu_cpuid(&supported(), 0, 4);
        let l1d = find(&c, 4, 0);
        let l3 = find(&c, 4, 3);
        assert_eq!(l1d.eax >> 26, 3);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l3.eax & 0x3fff, 0x163);
    }
}
