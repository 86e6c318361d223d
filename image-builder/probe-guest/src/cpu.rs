//! CPUID and time stamp counter.

use core::arch::asm;

/// Registers returned by CPUID.
#[derive(Clone, Copy)]
pub struct Cpuid {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// Executes CPUID for `leaf` / `subleaf`.
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let (eax, ebx, ecx, edx): (u32, u64, u32, u32);
    // SAFETY: CPUID only writes the four registers (and is always available in
    // long mode). RBX is reserved by LLVM, so it is saved and restored around it.
    unsafe {
        asm!(
            "mov {tmp}, rbx",
            "cpuid",
            "xchg {tmp}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        );
    }
    Cpuid {
        eax,
        // The upper half of RBX is zero after CPUID.
        ebx: ebx as u32,
        ecx,
        edx,
    }
}

/// What the report prints about the CPU.
pub struct CpuInfo {
    /// Vendor string from leaf 0 (EBX, EDX, ECX).
    pub vendor: [u8; 12],
    /// Initial APIC ID, CPUID.1:EBX[31:24].
    pub apic_id: u8,
    /// x2APIC ID, CPUID.0xB:EDX, if the maximum leaf reaches 0xB.
    pub x2apic_id: Option<u32>,
    /// Hypervisor present, CPUID.1:ECX[31].
    pub hypervisor: bool,
    /// Addressable logical processors per package, CPUID.1:EBX[23:16].
    pub logical: u8,
}

impl CpuInfo {
    /// Reads the CPU information with CPUID.
    pub fn read() -> Self {
        let l0 = cpuid(0, 0);
        let mut vendor = [0u8; 12];
        vendor[0..4].copy_from_slice(&l0.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&l0.edx.to_le_bytes());
        vendor[8..12].copy_from_slice(&l0.ecx.to_le_bytes());
        let l1 = cpuid(1, 0);
        let [_, _, logical, apic_id] = l1.ebx.to_le_bytes();
        let x2apic_id = (l0.eax >= 0xb).then(|| cpuid(0xb, 0).edx);
        Self {
            vendor,
            apic_id,
            x2apic_id,
            hypervisor: l1.ecx & (1 << 31) != 0,
            logical,
        }
    }
}

/// Reads the time stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only writes EDX:EAX (CR4.TSD is clear: nothing sets it).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Where the TSC frequency came from.
#[derive(Clone, Copy)]
pub enum TscSource {
    /// CPUID 0x15: crystal clock times the TSC/crystal ratio.
    Cpuid15,
    /// CPUID 0x16: processor base frequency.
    Cpuid16,
    /// Hypervisor timing leaf 0x4000_0010 (KVM, VMware).
    Hypervisor,
    /// Nothing reported it: an assumed frequency.
    Guess,
}

impl TscSource {
    /// Name printed in the spin mode's first line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpuid15 => "cpuid15",
            Self::Cpuid16 => "cpuid16",
            Self::Hypervisor => "hypervisor",
            Self::Guess => "guess",
        }
    }
}

/// TSC frequency assumed when CPUID does not report one.
const TSC_KHZ_GUESS: u64 = 2_000_000;

/// Returns the TSC frequency in kHz and where it came from.
pub fn tsc_khz() -> (u64, TscSource) {
    let max = cpuid(0, 0).eax;
    if max >= 0x15 {
        let l = cpuid(0x15, 0);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            let hz = u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax);
            if hz >= 1000 {
                return (hz / 1000, TscSource::Cpuid15);
            }
        }
    }
    if max >= 0x16 {
        let mhz = cpuid(0x16, 0).eax & 0xffff;
        if mhz != 0 {
            return (u64::from(mhz) * 1000, TscSource::Cpuid16);
        }
    }
    if cpuid(1, 0).ecx & (1 << 31) != 0 && cpuid(0x4000_0000, 0).eax >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010, 0).eax;
        if khz != 0 {
            return (u64::from(khz), TscSource::Hypervisor);
        }
    }
    (TSC_KHZ_GUESS, TscSource::Guess)
}
