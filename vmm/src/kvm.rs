//! The KVM VM: creation, in-kernel interrupt controllers and timer, and the host
//! capability checks that decide how fast guests will run.

use std::sync::Once;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use log::warn;
use thiserror::Error;

use crate::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

/// Errors while setting up the VM.
#[derive(Debug, Error)]
pub enum KvmError {
    /// /dev/kvm could not be opened.
    #[error(
        "cannot open /dev/kvm: {0} (is the kvm module loaded and do you have access to /dev/kvm?)"
    )]
    OpenKvm(kvm_ioctls::Error),
    /// The kernel's KVM API is too old.
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    /// A required KVM capability is missing.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// A VM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Ioctl {
        /// What was being done.
        op: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// Capabilities keel relies on.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// A VM with its interrupt controllers and PIT created.
pub struct Vm {
    /// The KVM system handle (for supported CPUID etc.).
    pub kvm: Kvm,
    /// The VM handle (shared with interrupt routing).
    pub fd: std::sync::Arc<VmFd>,
}

/// Opens KVM, checks its capabilities and creates a VM with its TSS and identity
/// map placed. Register guest memory next, then call [`create_irqchip`]: on hosts
/// where KVM emulates (no VT-x), a memory slot added after the in-kernel irqchip
/// exists costs milliseconds, before it microseconds.
pub fn create_vm() -> Result<Vm, KvmError> {
    let kvm = Kvm::new().map_err(KvmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(KvmError::ApiVersion(version));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    warn_if_no_hardware_virtualization();

    let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    fd.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
    fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
    Ok(Vm {
        kvm,
        fd: std::sync::Arc::new(fd),
    })
}

/// Creates the in-kernel IOAPIC, PIC and LAPICs, and the PIT. Must come before
/// any vCPU is created.
pub fn create_irqchip(vm: &Vm) -> Result<(), KvmError> {
    let fd = &vm.fd;
    fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
    Ok(())
}

/// Whether the host CPU flags in `cpuinfo` include VT-x or AMD-V.
pub fn cpuinfo_has_hardware_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

/// Logs one warning (per process) when the host CPU shows no vmx/svm flag: KVM
/// then runs guests in a much slower software-assisted mode.
fn warn_if_no_hardware_virtualization() {
    static WARNED: Once = Once::new();
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
        return;
    };
    if !cpuinfo_has_hardware_virtualization(&cpuinfo) {
        WARNED.call_once(|| {
            warn!(
                "this host's CPU shows no hardware virtualization (no vmx/svm flag): \
                 KVM runs guests in software-assisted mode, which is much slower"
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_vmx_and_svm_flags() {
        assert!(cpuinfo_has_hardware_virtualization(
            "processor: 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(cpuinfo_has_hardware_virtualization("flags : svm lm\n"));
        assert!(!cpuinfo_has_hardware_virtualization(
            "flags : fpu hypervisor lm\nvmx flags : ept\n"
        ));
        assert!(!cpuinfo_has_hardware_virtualization(""));
    }
}
