//! vCPUs: creation and set-up, one thread per vCPU (pinned when configured), and
//! the exit handling loop that routes port and MMIO accesses to the device buses.

pub mod control;
pub mod cpuid;
pub mod kick;
pub mod setup;

use std::io;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use keel_devices::bus::Bus;
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use log::{debug, error, info, warn};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

pub use control::{RunState, VcpuControl};

use crate::boot::BootEntry;

/// Errors while creating or starting vCPUs.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// Creating the vCPU failed.
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        /// vCPU index.
        index: u8,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// Reading the supported CPUID failed.
    #[error("cannot read KVM's supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    /// The CPUID could not be built or set.
    #[error("vCPU {index}: cannot set CPUID: {reason}")]
    Cpuid {
        /// vCPU index.
        index: u8,
        /// What went wrong.
        reason: String,
    },
    /// Setting architectural state failed.
    #[error("vCPU {index}: {source}")]
    Setup {
        /// vCPU index.
        index: u8,
        /// The failure.
        source: setup::SetupError,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(io::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn the thread of vCPU {index}: {source}")]
    Spawn {
        /// vCPU index.
        index: u8,
        /// OS error.
        source: io::Error,
    },
}

/// Why a vCPU stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest asked for a shutdown or reset through the hypervisor interface.
    GuestStop {
        /// vCPU index.
        vcpu: u8,
        /// What the guest asked for.
        reason: String,
    },
    /// The vCPU cannot continue (triple fault, internal error, unhandled exit).
    Fatal {
        /// vCPU index.
        vcpu: u8,
        /// What happened.
        reason: String,
    },
}

/// Where vCPU threads report events: a channel plus an eventfd that wakes the event
/// loop.
#[derive(Clone)]
pub struct EventSink {
    tx: Sender<VcpuEvent>,
    wake: Arc<EventFd>,
}

impl EventSink {
    /// Sink sending on `tx` and signalling `wake`.
    pub fn new(tx: Sender<VcpuEvent>, wake: Arc<EventFd>) -> Self {
        Self { tx, wake }
    }

    fn send(&self, event: VcpuEvent) {
        if self.tx.send(event).is_err() {
            warn!("vCPU event dropped: the event loop is gone");
        }
        if let Err(e) = self.wake.write(1) {
            warn!("cannot wake the event loop: {e}");
        }
    }
}

/// The buses a vCPU dispatches exits to.
#[derive(Clone)]
pub struct Buses {
    /// Port I/O.
    pub pio: Arc<Bus>,
    /// Memory-mapped I/O.
    pub mmio: Arc<Bus>,
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    affinity: Option<Vec<u32>>,
}

/// Creates and configures `count` vCPUs; vCPU 0 starts at `entry`, the others wait
/// for the guest's INIT/SIPI in the in-kernel LAPIC.
pub fn create_all(
    kvm: &kvm_ioctls::Kvm,
    vm: &VmFd,
    count: u8,
    affinity: Option<&[Vec<u32>]>,
    entry: BootEntry,
) -> Result<Vec<Vcpu>, VcpuError> {
    let supported: CpuId = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VcpuError::SupportedCpuid)?;
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for index in 0..count {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        let entries = cpuid::vcpu_cpuid(&supported, index, count);
        let cpuid = CpuId::from_entries(&entries).map_err(|e| VcpuError::Cpuid {
            index,
            reason: format!("{e:?}"),
        })?;
        fd.set_cpuid2(&cpuid).map_err(|e| VcpuError::Cpuid {
            index,
            reason: e.to_string(),
        })?;
        let setup_err = |source| VcpuError::Setup { index, source };
        setup::set_msrs(&fd).map_err(setup_err)?;
        setup::set_fpu(&fd).map_err(setup_err)?;
        setup::set_lapic(&fd).map_err(setup_err)?;
        if index == 0 {
            setup::set_boot_registers(&fd, entry).map_err(setup_err)?;
        }
        vcpus.push(Vcpu {
            index,
            fd,
            affinity: affinity.and_then(|a| a.get(usize::from(index)).cloned()),
        });
    }
    Ok(vcpus)
}

/// Running vCPU threads.
pub struct VcpuThreads {
    handles: Vec<(u8, JoinHandle<()>)>,
    control: Arc<VcpuControl>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU.
    pub fn start(vcpus: Vec<Vcpu>, buses: Buses, events: EventSink) -> Result<Self, VcpuError> {
        kick::install_handler().map_err(VcpuError::KickHandler)?;
        let control = Arc::new(VcpuControl::new(vcpus.len()));
        let mut threads = Self {
            handles: Vec::with_capacity(vcpus.len()),
            control: Arc::clone(&control),
        };
        for vcpu in vcpus {
            let index = vcpu.index;
            let (buses, events, control) = (buses.clone(), events.clone(), Arc::clone(&control));
            let handle = thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu_thread(vcpu, buses, events, control))
                .map_err(|source| VcpuError::Spawn { index, source })?;
            threads.handles.push((index, handle));
        }
        Ok(threads)
    }

    /// The shared run-state.
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    fn kick_all(&self) {
        for (index, handle) in &self.handles {
            if handle.is_finished() {
                continue;
            }
            if let Err(e) = handle.kill(kick::kick_signal()) {
                debug!("cannot kick vCPU {index}: {e}");
            }
        }
    }

    /// Pauses every vCPU; returns false if they did not all stop within `timeout`.
    pub fn pause(&self, timeout: Duration) -> bool {
        self.control.request(RunState::Paused);
        self.kick_all();
        self.control.wait_all_parked(timeout)
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) {
        self.control.request(RunState::Running);
    }

    /// Stops every vCPU and joins the threads.
    pub fn stop(self) {
        self.control.request(RunState::Stopped);
        // Kick repeatedly: a thread between its state check and KVM_RUN is covered
        // by immediate_exit, but one still setting up may miss a single kick.
        for (index, handle) in self.handles {
            while !handle.is_finished() {
                if let Err(e) = handle.kill(kick::kick_signal()) {
                    debug!("cannot kick vCPU {index}: {e}");
                    break;
                }
                thread::sleep(Duration::from_millis(1));
            }
            if handle.join().is_err() {
                error!("vCPU {index} thread panicked");
            }
        }
    }
}

/// What the loop does after an exit.
enum Next {
    Continue,
    Stop(VcpuEvent),
}

fn vcpu_thread(mut vcpu: Vcpu, buses: Buses, events: EventSink, control: Arc<VcpuControl>) {
    let index = vcpu.index;
    if let Some(cpus) = &vcpu.affinity {
        match keel_affinity::pin_current_thread(cpus.iter().map(|&c| c as usize)) {
            Ok(()) => info!("vCPU {index} pinned to host CPUs {cpus:?}"),
            Err(e) => {
                events.send(VcpuEvent::Fatal {
                    vcpu: index,
                    reason: format!("cannot pin to host CPUs {cpus:?}: {e}"),
                });
                control.finished();
                return;
            }
        }
    }
    kick::set_thread_kvm_run(vcpu.fd.get_kvm_run());
    let event = run_loop(&mut vcpu, &buses, &control);
    kick::clear_thread_kvm_run();
    if let Some(event) = event {
        events.send(event);
    }
    control.finished();
}

fn run_loop(vcpu: &mut Vcpu, buses: &Buses, control: &VcpuControl) -> Option<VcpuEvent> {
    let index = vcpu.index;
    loop {
        match control.requested() {
            RunState::Running => {}
            RunState::Paused => {
                debug!("vCPU {index} paused");
                if control.park() == RunState::Stopped {
                    return None;
                }
                debug!("vCPU {index} resumed");
                continue;
            }
            RunState::Stopped => return None,
        }
        match run_once(vcpu, buses) {
            Next::Continue => {}
            Next::Stop(event) => return Some(event),
        }
    }
}

fn run_once(vcpu: &mut Vcpu, buses: &Buses) -> Next {
    let index = vcpu.index;
    let fatal = |reason: String| {
        Next::Stop(VcpuEvent::Fatal {
            vcpu: index,
            reason,
        })
    };
    let exit = match vcpu.fd.run() {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            vcpu.fd.set_kvm_immediate_exit(0);
            return Next::Continue;
        }
        Err(e) => return fatal(format!("KVM_RUN failed: {e}")),
    };
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
                debug!("vCPU {index}: read from unclaimed port {port:#x}");
            }
            Next::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if !buses.pio.write(u64::from(port), data) {
                debug!("vCPU {index}: write to unclaimed port {port:#x}: {data:02x?}");
            }
            Next::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                data.fill(0xff);
                debug!("vCPU {index}: read from unclaimed MMIO {addr:#x}");
            }
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                debug!("vCPU {index}: write to unclaimed MMIO {addr:#x}");
            }
            Next::Continue
        }
        VcpuExit::Intr => Next::Continue,
        VcpuExit::Shutdown => fatal("triple fault (KVM_EXIT_SHUTDOWN)".to_owned()),
        VcpuExit::Hlt => {
            fatal("halted with the in-kernel irqchip bypassed (KVM_EXIT_HLT)".to_owned())
        }
        VcpuExit::FailEntry(reason, cpu) => fatal(format!(
            "VM entry failed (KVM_EXIT_FAIL_ENTRY): hardware reason {reason:#x} on host CPU {cpu}"
        )),
        VcpuExit::InternalError => {
            let run = vcpu.fd.get_kvm_run();
            // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal`
            // member of the exit union; reading plain integers from it is sound.
            let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
            fatal(format!(
                "KVM internal error (KVM_EXIT_INTERNAL_ERROR), suberror {suberror}"
            ))
        }
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                Next::Stop(VcpuEvent::GuestStop {
                    vcpu: index,
                    reason: format!("system event {kind}"),
                })
            }
            other => fatal(format!(
                "guest system event {other} (KVM_EXIT_SYSTEM_EVENT)"
            )),
        },
        other => fatal(format!("unhandled exit {other:?}")),
    }
}
