//! Wiring the sandbox's `[[disk]]` and `[[net]]` entries to virtio-pci devices backed
//! by vhost-user: connect each backend, place its BAR in the 32-bit MMIO hole,
//! attach MSI-X vectors and queue-notify ioeventfds, and put it on bus 0.

use std::sync::{Arc, Mutex, OnceLock, Weak};

use keel_devices::bus::{Bus, BusBuilder, BusError};
use keel_devices::pci::root::{PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN};
use keel_devices::pci::{BarMapper, BarSpace, PciRoot};
use keel_devices::vhost_user::blk::{BlkSettings, VhostUserBlk};
use keel_devices::vhost_user::net::{NetSettings, VhostUserNet};
use keel_devices::vhost_user::ConnectError;
use keel_devices::virtio::pci::{VirtioPci, BAR0_SIZE};
use keel_devices::virtio::VirtioDevice;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use log::{info, warn};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::config::SandboxConfig;
use crate::interrupts::{DeviceVectors, GsiRoutes, InterruptError};
use crate::kvm::Vm;
use crate::layout::{IOAPIC_ADDR, MMIO_HOLE_START};
use crate::memory::GuestRam;

/// Errors while creating PCI devices.
#[derive(Debug, Error)]
pub enum PciDeviceError {
    /// A backend could not be reached or refused the handshake.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// MSI-X vectors could not be allocated.
    #[error("device {id}: {source}")]
    Interrupts {
        /// Device id.
        id: String,
        /// The failure.
        source: InterruptError,
    },
    /// The 32-bit MMIO hole or the PCI bus is full.
    #[error("device {0}: no room left on PCI bus 0 or in the 32-bit MMIO hole")]
    NoRoom(String),
    /// The configuration space could not be built.
    #[error("device {id}: {reason}")]
    Config {
        /// Device id.
        id: String,
        /// What failed.
        reason: String,
    },
    /// KVM refused a queue-notify ioeventfd.
    #[error("device {id}: cannot register the queue notification at {addr:#x}: {source}")]
    IoEvent {
        /// Device id.
        id: String,
        /// Guest address.
        addr: u64,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// A BAR overlaps another device.
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
    /// A `[[vfio]]` device cannot be passed through.
    #[error(transparent)]
    Vfio(#[from] crate::vfio::VfioError),
}

/// Moves BARs in the MMIO bus and notify ioeventfds in KVM when the guest
/// reprograms a BAR.
pub struct KvmBarMapper {
    vm: Arc<VmFd>,
    mmio: OnceLock<Weak<Bus>>,
}

impl KvmBarMapper {
    /// Connects the mapper to the MMIO bus once it is built.
    pub fn bind(&self, mmio: &Arc<Bus>) {
        let _ = self.mmio.set(Arc::downgrade(mmio));
    }
}

impl BarMapper for KvmBarMapper {
    fn move_bar(&self, old: u64, new: u64, _len: u64) -> Result<(), String> {
        let bus = self
            .mmio
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| "the MMIO bus is not ready".to_owned())?;
        bus.relocate(old, new).map_err(|e| e.to_string())
    }

    fn move_ioeventfd(&self, fd: &EventFd, old: u64, new: u64) -> Result<(), String> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(old), NoDatamatch)
            .map_err(|e| format!("unregister at {old:#x}: {e}"))?;
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(new), NoDatamatch)
            .map_err(|e| format!("register at {new:#x}: {e}"))
    }
}

/// The PCI devices of a VM.
pub struct PciDevices {
    /// Devices served by vhost-user backends.
    pub devices: Vec<Arc<Mutex<VirtioPci>>>,
    /// Bind to the MMIO bus once built, so guest BAR moves can be followed.
    pub bar_mapper: Arc<KvmBarMapper>,
    /// Legacy interrupt routing of the functions with INTx (for the MP table).
    pub intx: Vec<crate::boot::mptable::PciIntx>,
}

/// The high MMIO window for this VM: above its RAM, below the guest's physical
/// address limit as KVM reports it in the supported CPUID (what the vCPUs get).
fn high_window(vm: &Vm, ram: &GuestRam) -> Option<std::ops::Range<u64>> {
    let ram_end = ram
        .regions()
        .iter()
        .map(|r| r.guest_addr + r.size)
        .max()
        .unwrap_or(0);
    let bits = match vm
        .kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
    {
        Ok(cpuid) => crate::layout::phys_bits(cpuid.as_slice().iter().map(|e| (e.function, e.eax))),
        Err(e) => {
            warn!("cannot read the supported CPUID ({e}); assuming a 36-bit address space");
            crate::layout::DEFAULT_PHYS_BITS
        }
    };
    let window = crate::layout::high_mmio_window(ram_end, bits);
    if let Some(w) = &window {
        log::debug!(
            "high MMIO window {:#x}..{:#x} ({bits} physical address bits)",
            w.start,
            w.end
        );
    }
    window
}

/// Creates every configured PCI device and the conf1 host bridge.
pub fn attach(
    config: &SandboxConfig,
    vm: &Vm,
    ram: &GuestRam,
    pio: &mut BusBuilder,
    mmio: &mut BusBuilder,
) -> Result<PciDevices, PciDeviceError> {
    let mut attached = Vec::new();
    let bar_mapper = Arc::new(KvmBarMapper {
        vm: Arc::clone(&vm.fd),
        mmio: OnceLock::new(),
    });
    let routes = GsiRoutes::new(Arc::clone(&vm.fd));
    let mut root = PciRoot::new();
    let mut bars = BarSpace::new(MMIO_HOLE_START..IOAPIC_ADDR, high_window(vm, ram));
    let timeout = config.devices.connect_timeout;
    let reply_timeout = config.devices.reply_timeout;

    let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
    for disk in &config.disk {
        if let Some(serial) = &disk.serial {
            // GET_ID is answered by the backend from its own settings.
            warn!(
                "device {}: serial {serial:?} is informational here: the guest sees the \
                 serial the backend reports (keel-vhost-blk --serial)",
                disk.id
            );
        }
        let blk = VhostUserBlk::connect(BlkSettings {
            id: disk.id.clone(),
            socket: disk.socket.clone(),
            read_only: disk.read_only,
            queues: disk.queues,
            queue_size: disk.queue_size,
            connect_timeout: timeout,
            reply_timeout,
        })?;
        devices.push((disk.id.clone(), Box::new(blk)));
    }
    for nic in &config.net {
        let net = VhostUserNet::connect(NetSettings {
            id: nic.id.clone(),
            socket: nic.socket.clone(),
            mac: nic.mac,
            queue_pairs: nic.queue_pairs,
            queue_size: nic.queue_size,
            connect_timeout: timeout,
            reply_timeout,
        })?;
        devices.push((nic.id.clone(), Box::new(net)));
    }

    for (id, device) in devices {
        // One vector for configuration changes plus one per queue.
        let vectors = device.queue_max_sizes().len() + 1;
        let router = DeviceVectors::new(&id, &routes, vectors).map_err(|source| {
            PciDeviceError::Interrupts {
                id: id.clone(),
                source,
            }
        })?;
        // A 32-bit BAR: the transport programs it as one dword.
        let bar = bars
            .place(BAR0_SIZE, false, false)
            .map_err(|_| PciDeviceError::NoRoom(id.clone()))?;
        let mut pci = VirtioPci::new(id.clone(), device, router, ram.memory().clone(), bar as u32)
            .map_err(|e| PciDeviceError::Config {
                id: id.clone(),
                reason: e.to_string(),
            })?;
        pci.set_bar_mapper(bar_mapper.clone(), MMIO_HOLE_START..IOAPIC_ADDR);
        for (addr, fd) in pci.notify_eventfds() {
            vm.fd
                .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|source| PciDeviceError::IoEvent {
                    id: id.clone(),
                    addr,
                    source,
                })?;
        }
        let pci = Arc::new(Mutex::new(pci));
        mmio.insert(bar, BAR0_SIZE, pci.clone())?;
        attached.push(Arc::clone(&pci));
        let slot = root
            .add(pci)
            .ok_or_else(|| PciDeviceError::NoRoom(id.clone()))?;
        info!("device {id}: PCI 00:{slot:02x}.0, BAR 0 at {bar:#x}");
    }
    let mut intx_pins = crate::intx::IntxPins::new();
    let intx = crate::vfio::attach(
        config,
        &vm.fd,
        ram,
        crate::vfio::Placement {
            routes: &routes,
            root: &mut root,
            bars: &mut bars,
            mmio: &mut *mmio,
            bar_mapper: &bar_mapper,
            intx_pins: &mut intx_pins,
        },
    )?;
    pio.insert(
        PCI_CONFIG_PORT,
        PCI_CONFIG_PORT_LEN,
        Arc::new(Mutex::new(root)),
    )?;
    Ok(PciDevices {
        devices: attached,
        bar_mapper,
        intx,
    })
}
