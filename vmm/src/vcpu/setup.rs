//! Architectural state of a vCPU at reset: MSRs, FPU, LAPIC, and the registers for
//! the kernel's entry protocol.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;

use crate::boot::gdt::{self, CODE32_SELECTOR, CODE64_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use crate::boot::{BootEntry, BootProtocol};
use crate::layout::{
    BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PML4_ADDR, PVH_INFO_ADDR, ZERO_PAGE_ADDR,
};

/// Errors while setting vCPU state.
#[derive(Debug, Error)]
pub enum SetupError {
    /// A vCPU ioctl failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// What was being set.
        op: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs")]
    Msrs {
        /// MSRs set.
        set: usize,
        /// MSRs given.
        wanted: usize,
    },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SetupError {
    move |source| SetupError::Ioctl { op, source }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// The MSR values every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
}

/// Sets the boot MSRs.
pub fn set_msrs(vcpu: &VcpuFd) -> Result<(), SetupError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| SetupError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(SetupError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// Sets the FPU to its reset state (x87 control word 0x37f, MXCSR 0x1f80).
pub fn set_fpu(vcpu: &VcpuFd) -> Result<(), SetupError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lvt_with_mode(value: u32, mode: u32) -> u32 {
    (value & !0x700) | (mode << 8)
}

/// Wires LINT0 to ExtINT (the PIC) and LINT1 to NMI, as firmware would.
pub fn set_lapic(vcpu: &VcpuFd) -> Result<(), SetupError> {
    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let mut bytes = [0u8; 4];
        for (b, r) in bytes.iter_mut().zip(reg.iter()) {
            *b = *r as u8;
        }
        let value = lvt_with_mode(u32::from_le_bytes(bytes), mode);
        for (r, b) in reg.iter_mut().zip(value.to_le_bytes()) {
            *r = b as std::os::raw::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))
}

/// General registers at kernel entry.
pub fn entry_regs(entry: BootEntry) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.entry,
        ..Default::default()
    };
    match entry.protocol {
        BootProtocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_ADDR;
        }
        BootProtocol::Pvh => {
            regs.rbx = PVH_INFO_ADDR;
        }
    }
    regs
}

/// Segment and control registers at kernel entry, starting from `sregs` as KVM
/// created them.
pub fn entry_sregs(mut sregs: kvm_sregs, protocol: BootProtocol) -> kvm_sregs {
    let code = match protocol {
        BootProtocol::Linux64 => CODE64_SELECTOR,
        BootProtocol::Pvh => CODE32_SELECTOR,
    };
    let data = gdt::segment(usize::from(DATA_SELECTOR / 8));
    sregs.cs = gdt::segment(usize::from(code / 8));
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment(usize::from(TSS_SELECTOR / 8));
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt::GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    match protocol {
        BootProtocol::Linux64 => {
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = (sregs.cr0 & !X86_CR0_PG) | X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// Puts the boot vCPU into the state its kernel entry expects.
pub fn set_boot_registers(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), SetupError> {
    let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&entry_sregs(sregs, entry.protocol))
        .map_err(ioctl("KVM_SET_SREGS"))?;
    vcpu.set_regs(&entry_regs(entry))
        .map_err(ioctl("KVM_SET_REGS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_replaces_only_delivery_mode_bits() {
        assert_eq!(lvt_with_mode(0x0001_0000, APIC_MODE_EXTINT), 0x0001_0700);
        assert_eq!(lvt_with_mode(0x0000_07ff, APIC_MODE_NMI), 0x0000_04ff);
    }

    #[test]
    fn linux64_entry_is_long_mode_with_zero_page_in_rsi() {
        let entry = BootEntry {
            protocol: BootProtocol::Linux64,
            entry: 0x100_0000,
        };
        let regs = entry_regs(entry);
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rsi, ZERO_PAGE_ADDR);
        assert_eq!(regs.rflags, 2);
        let s = entry_sregs(kvm_sregs::default(), BootProtocol::Linux64);
        assert_eq!(s.cs.selector, CODE64_SELECTOR);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.ds.selector, DATA_SELECTOR);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(s.cr3, PML4_ADDR);
    }

    #[test]
    fn pvh_entry_is_protected_mode_without_paging() {
        let entry = BootEntry {
            protocol: BootProtocol::Pvh,
            entry: 0x100_0100,
        };
        let regs = entry_regs(entry);
        assert_eq!(regs.rbx, PVH_INFO_ADDR);
        let s = entry_sregs(kvm_sregs::default(), BootProtocol::Pvh);
        assert_eq!(s.cs.selector, CODE32_SELECTOR);
        assert_eq!(s.cs.db, 1);
        assert_eq!(s.cs.l, 0);
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_eq!(s.efer, 0);
    }

    #[test]
    fn boot_msrs_enable_fast_strings_and_wb_mtrr() {
        let msrs = boot_msrs();
        assert!(msrs
            .iter()
            .any(|m| m.index == MSR_IA32_MISC_ENABLE && m.data == 1));
        assert!(msrs
            .iter()
            .any(|m| m.index == MSR_MTRR_DEF_TYPE && m.data == 0x806));
    }
}
