//! From a validated sandbox configuration to a running VM, in clear steps, and the
//! run until it stops.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use keel_devices::bus::{BusBuilder, BusError};
use keel_devices::legacy::debug_port::{DebugPort, DebugPortLog, DEBUG_PORT};
use keel_devices::legacy::i8042::{ResetDevice, I8042_BASE, I8042_LEN};
use keel_devices::legacy::serial::{SerialDevice, SerialInputSpace};
use keel_devices::trigger::EventFdTrigger;
use keel_devices::virtio::pci::VirtioPci;
use log::{info, warn};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, BootSpec};
use crate::config::{SandboxConfig, SerialOutput};
use crate::event_loop::{EventLoop, EventLoopParts, ExitReason, SerialInput, VmFacts};
use crate::kvm;
use crate::layout::{COM1_IRQ, COM1_PORT};
use crate::memory;
use crate::pci_devices;
use crate::signals::StopSignals;
use crate::vcpu::{self, Buses, EventSink, VcpuThreads};

/// Errors that keep the VM from starting or running.
#[derive(Debug, Error)]
pub enum VmmError {
    /// KVM set-up failed.
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Registering guest memory with KVM failed.
    #[error("cannot register guest memory with KVM: {0}")]
    RegisterMemory(kvm_ioctls::Error),
    /// Loading the guest failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// vCPU set-up failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// A device could not be placed on a bus.
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
    /// An OS resource (eventfd, file, signalfd) could not be created.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// OS error.
        source: io::Error,
    },
    /// KVM refused to connect an interrupt.
    #[error("cannot connect {what} to KVM GSI {gsi}: {source}")]
    Irqfd {
        /// Device.
        what: &'static str,
        /// GSI.
        gsi: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// The control socket is in use or cannot be bound.
    #[error("control socket {path}: {reason}")]
    ControlSocket {
        /// Socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A PCI device could not be created.
    #[error(transparent)]
    PciDevice(#[from] pci_devices::PciDeviceError),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

/// What a finished run reports.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why the VM stopped.
    pub reason: ExitReason,
    /// Monotonic time of the guest's first-instruction marker, if it arrived.
    pub first_instruction_ns: Option<u64>,
}

fn serial_sink(output: &SerialOutput) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match output {
        SerialOutput::Stdout => Box::new(io::stdout()),
        SerialOutput::Off => Box::new(io::sink()),
        SerialOutput::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(io_err(format!("serial output file {}", path.display())))?;
            Box::new(file)
        }
    })
}

/// Binds the control socket, replacing a stale socket file but never one a live
/// VMM still answers on.
pub fn bind_control_socket(path: &Path) -> Result<UnixListener, VmmError> {
    let fail = |reason: String| VmmError::ControlSocket {
        path: path.to_path_buf(),
        reason,
    };
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(fail(
                "exists and is not a socket; refusing to replace it".to_owned(),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(fail("another process is listening on it".to_owned()));
        }
        fs::remove_file(path).map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| fail(format!("cannot bind: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(format!("cannot make it non-blocking: {e}")))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| fail(format!("cannot restrict its permissions: {e}")))?;
    Ok(listener)
}

/// Removes the control socket file on drop.
struct SocketFileGuard(Option<PathBuf>);

impl Drop for SocketFileGuard {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            if let Err(e) = fs::remove_file(path) {
                warn!("cannot remove control socket {}: {e}", path.display());
            }
        }
    }
}

/// Builds the VM described by `config`, runs it until it stops, and tears it down.
/// `started_ns` is the monotonic time the process started (for boot timing).
pub fn run(config: &SandboxConfig, started_ns: u64) -> Result<RunOutcome, VmmError> {
    // Signals first: every thread created later inherits the blocked mask.
    let signals = StopSignals::new().map_err(io_err("cannot set up the signalfd"))?;

    // Passthrough devices: check the host before anything is allocated.
    let vfio = crate::vfio::preflight(config).map_err(pci_devices::PciDeviceError::from)?;
    let mut memory_config = config.memory.clone();
    memory_config.numa_node = crate::vfio::default_numa_node(config, &vfio);
    let vm = kvm::create_vm()?;
    let ram = memory::create(&memory_config)?;
    // Declared after `ram`, so it is dropped first: no memory slot outlives its mapping.
    let vm = vm;

    memory::register_with_kvm(&ram, &vm.fd).map_err(VmmError::RegisterMemory)?;
    kvm::create_irqchip(&vm)?;
    let prepared = prepare(config, &vm, &ram, started_ns)?;
    launch(config, &vm, prepared, signals)
}

/// Everything set up before the vCPUs start.
struct Prepared {
    vcpus: Vec<vcpu::Vcpu>,
    buses: Buses,
    serial: Arc<Mutex<SerialDevice>>,
    space_fd: EventFd,
    reset_fd: EventFd,
    debug_log: Arc<DebugPortLog>,
    listener: Option<UnixListener>,
    backends: Vec<Arc<Mutex<VirtioPci>>>,
}

fn prepare(
    config: &SandboxConfig,
    vm: &kvm::Vm,
    ram: &memory::GuestRam,
    started_ns: u64,
) -> Result<Prepared, VmmError> {
    // Legacy devices.
    let serial_irq = EventFdTrigger::new().map_err(io_err("serial interrupt eventfd"))?;
    vm.fd
        .register_irqfd(serial_irq.eventfd(), COM1_IRQ)
        .map_err(|source| VmmError::Irqfd {
            what: "the serial port",
            gsi: COM1_IRQ,
            source,
        })?;
    let input_space = SerialInputSpace::new().map_err(io_err("serial input eventfd"))?;
    let space_fd = input_space
        .try_clone_eventfd()
        .map_err(io_err("serial input eventfd"))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        input_space,
        serial_sink(&config.serial.output)?,
    )));
    let reset = EventFdTrigger::new().map_err(io_err("reset eventfd"))?;
    let reset_fd = reset
        .eventfd()
        .try_clone()
        .map_err(io_err("reset eventfd"))?;
    let debug_log = Arc::new(DebugPortLog::new(started_ns));

    let mut pio = BusBuilder::new();
    pio.insert(COM1_PORT, 8, serial.clone())?;
    pio.insert(
        I8042_BASE,
        I8042_LEN,
        Arc::new(Mutex::new(ResetDevice::new(reset))),
    )?;
    pio.insert(
        DEBUG_PORT,
        1,
        Arc::new(Mutex::new(DebugPort::new(Arc::clone(&debug_log)))),
    )?;
    let mut mmio = BusBuilder::new();
    let pci = pci_devices::attach(config, vm, ram, &mut pio, &mut mmio)?;
    // After the PCI devices: the MP table carries their legacy interrupt routing.
    let entry = boot::load(
        ram,
        &BootSpec {
            kernel: &config.boot.kernel,
            initramfs: config.boot.initramfs.as_deref(),
            cmdline: &config.boot.cmdline,
            vcpus: config.vcpus.count,
            pci_intx: &pci.intx,
        },
    )?;
    let buses = Buses {
        pio: Arc::new(pio.build()),
        mmio: Arc::new(mmio.build()),
    };
    pci.bar_mapper.bind(&buses.mmio);
    let backends = pci.devices;

    let listener = match &config.control.socket {
        Some(path) => Some(bind_control_socket(path)?),
        None => None,
    };

    let vcpus = vcpu::create_all(
        &vm.kvm,
        &vm.fd,
        config.vcpus.count,
        config.vcpus.affinity.as_deref(),
        entry,
    )?;
    Ok(Prepared {
        vcpus,
        buses,
        serial,
        space_fd,
        reset_fd,
        debug_log,
        listener,
        backends,
    })
}

/// Starts the vCPUs and runs the event loop until the VM stops.
fn launch(
    config: &SandboxConfig,
    _vm: &kvm::Vm,
    prepared: Prepared,
    signals: StopSignals,
) -> Result<RunOutcome, VmmError> {
    let Prepared {
        vcpus,
        buses,
        serial,
        space_fd,
        reset_fd,
        debug_log,
        listener,
        backends,
    } = prepared;
    let _socket_guard = SocketFileGuard(listener.as_ref().and(config.control.socket.clone()));
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io_err("vCPU event eventfd"))?);
    let threads = VcpuThreads::start(vcpus, buses, EventSink::new(tx, Arc::clone(&wake)))?;
    crate::notify::notify(&format!(
        "READY=1\nSTATUS=running: {} vCPU(s), {} MiB",
        config.vcpus.count,
        config.memory.size_bytes >> 20
    ));
    info!(
        "sandbox {}: {} vCPU(s), {} MiB, running",
        config.name,
        config.vcpus.count,
        config.memory.size_bytes >> 20
    );

    // The VMM's own threads: pinned after the vCPU threads were spawned, so those do
    // not inherit this mask.
    if let Some(cpus) = &config.vmm.affinity {
        if let Err(e) = keel_affinity::pin_current_thread(cpus.iter().map(|&c| c as usize)) {
            warn!("cannot pin the VMM thread to host CPUs {cpus:?}: {e}");
        }
    }

    let serial_input = if config.serial.input {
        Some(SerialInput {
            serial: Arc::clone(&serial),
            space: space_fd,
        })
    } else {
        None
    };
    let event_loop = Arc::new(Mutex::new(EventLoop::new(EventLoopParts {
        facts: VmFacts {
            name: config.name.clone(),
            vcpus: config.vcpus.count,
            memory_bytes: config.memory.size_bytes,
        },
        vcpus: threads,
        reset: reset_fd,
        vcpu_wake: wake,
        vcpu_events: rx,
        signals,
        serial_input,
        listener,
        backends,
    })));
    let reason = drive(&event_loop);
    crate::notify::notify("STOPPING=1\nSTATUS=stopping");

    let event_loop = match Arc::try_unwrap(event_loop) {
        Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(_) => {
            return Err(VmmError::EventLoop(
                "event loop still shared at exit".to_owned(),
            ))
        }
    };
    event_loop.into_vcpus().stop();
    let reason = reason?;
    if let Err(e) = io::stdout().flush() {
        warn!("cannot flush serial output: {e}");
    }
    info!("sandbox {} stopped: {reason:?}", config.name);
    Ok(RunOutcome {
        reason,
        first_instruction_ns: debug_log.first_instruction_ns(),
    })
}

/// Runs the event manager until the loop has an exit reason.
fn drive(event_loop: &Arc<Mutex<EventLoop>>) -> Result<ExitReason, VmmError> {
    let mut manager: EventManager<Arc<Mutex<EventLoop>>> =
        EventManager::new().map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
    let id = manager.add_subscriber(Arc::clone(event_loop));
    loop {
        if let Some(reason) = crate::lock(event_loop).exit_reason() {
            let reason = reason.clone();
            // Unregister so the manager drops its reference to the loop.
            let _ = manager.remove_subscriber(id);
            return Ok(reason);
        }
        if let Err(e) = manager.run() {
            let _ = manager.remove_subscriber(id);
            return Err(VmmError::EventLoop(format!("{e:?}")));
        }
    }
}
