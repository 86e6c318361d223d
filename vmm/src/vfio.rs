//! Wiring the sandbox's `[[vfio]]` entries: host pre-flight checks (before guest RAM
//! exists), then, per device, the VFIO container and group, DMA mappings of guest
//! RAM, MSI/MSI-X vectors, BAR placement (the 32-bit hole; 64-bit prefetchable
//! BARs in the high window above RAM, see `keel_devices::pci::BarSpace`), direct
//! BAR mappings as KVM memory slots, and the function on PCI bus 0.
//!
//! A function with an interrupt pin also gets INTx: an IOAPIC pin of its own
//! ([`crate::intx`]), advertised in its configuration space and returned for the MP
//! table, so a guest that enables neither MSI nor MSI-X still gets interrupts.
//!
//! Not wired: I/O BARs (hidden from the guest).

use std::sync::{Arc, Mutex};

use keel_devices::bus::BusBuilder;
use keel_devices::pci::{BarPlaceError, BarSpace, PciRoot};
use keel_devices::vfio::backend::{BackendError, HostMapping};
use keel_devices::vfio::bars::{SlotMapper, FIRST_DEVICE_SLOT};
use keel_devices::vfio::config::{BarKind, NUM_BARS};
use keel_devices::vfio::device::{
    BarAccess, DeviceProbe, DeviceWiring, VfioDeviceError, VfioPciDevice,
};
use keel_devices::vfio::dma::{ranges_of, DmaError, DmaMappings};
use keel_devices::vfio::ioctls::{Container, VfioDeviceFd};
use keel_devices::vfio::preflight::{
    check_device, check_device_with, check_memlock, numa_mismatch, DeviceReport, HostPaths,
    IommuPath, Memlock, PreflightError,
};
use kvm_ioctls::VmFd;
use log::{info, warn};
use thiserror::Error;

use crate::boot::mptable::PciIntx;
use crate::config::SandboxConfig;
use crate::interrupts::{DeviceVectors, GsiRoutes, InterruptError};
use crate::intx::{IntxError, IntxPins, KvmIntxLine};
use crate::memory::GuestRam;
use crate::pci_devices::KvmBarMapper;

/// Errors of VFIO passthrough.
#[derive(Debug, Error)]
pub enum VfioError {
    /// The host is not ready (driver binding, IOMMU group, /dev/vfio, memlock).
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// The locked-memory limit could not be read.
    #[error("cannot read the locked-memory limit of keel-vmm: {0}")]
    Memlock(std::io::Error),
    /// A VFIO operation failed.
    #[error("vfio {id}: {source}")]
    Backend {
        /// Device id.
        id: String,
        /// The failure.
        source: BackendError,
    },
    /// The device cannot be passed through as it is.
    #[error("vfio {id}: {source}")]
    Device {
        /// Device id.
        id: String,
        /// The failure.
        source: VfioDeviceError,
    },
    /// Guest RAM could not be mapped for DMA.
    #[error("vfio: {0}")]
    Dma(#[from] DmaError),
    /// No vectors left.
    #[error("vfio {id}: {source}")]
    Interrupts {
        /// Device id.
        id: String,
        /// The failure.
        source: InterruptError,
    },
    /// No legacy interrupt line could be wired.
    #[error("vfio {id}: {source}")]
    Intx {
        /// Device id.
        id: String,
        /// The failure.
        source: IntxError,
    },
    /// A BAR does not fit in any MMIO window.
    #[error("vfio {id}: BAR {bar}: {source}")]
    NoRoom {
        /// Device id.
        id: String,
        /// BAR index.
        bar: usize,
        /// Why.
        source: BarPlaceError,
    },
    /// PCI bus 0 has no free slot.
    #[error("vfio {0}: PCI bus 0 is full")]
    BusFull(String),
    /// A BAR overlaps another device on the MMIO bus.
    #[error("vfio {id}: {source}")]
    Bus {
        /// Device id.
        id: String,
        /// The failure.
        source: keel_devices::bus::BusError,
    },
}

/// Checks the host for every `[[vfio]]` device, before anything is allocated, and
/// warns when guest RAM is bound to another NUMA node than a device.
pub fn preflight(config: &SandboxConfig) -> Result<Vec<DeviceReport>, VfioError> {
    preflight_at(config, &HostPaths::default())
}

/// [`preflight`] against the host tree `paths`.
pub fn preflight_at(
    config: &SandboxConfig,
    paths: &HostPaths,
) -> Result<Vec<DeviceReport>, VfioError> {
    let mut reports = Vec::with_capacity(config.vfio.len());
    for dev in &config.vfio {
        reports.push(check_device(paths, &dev.id, &dev.address.to_string())?);
    }
    // One IOMMU interface per VM: iommufd only if every device can use it.
    let iommufd = |r: &DeviceReport| matches!(r.iommu, IommuPath::Iommufd { .. });
    if reports.iter().any(iommufd) && !reports.iter().all(iommufd) {
        for (dev, report) in config.vfio.iter().zip(reports.iter_mut()) {
            if iommufd(report) {
                *report = check_device_with(paths, &dev.id, &dev.address.to_string(), false)?;
            }
        }
    }
    for (dev, report) in config.vfio.iter().zip(&reports) {
        info!("vfio {}: IOMMU interface: {}", dev.id, report.iommu);
        if let Some(w) = numa_mismatch(&dev.id, report.numa_node, config.memory.numa_node) {
            warn!("{w}");
        } else if let (Some(node), None) = (report.numa_node, config.memory.numa_node) {
            info!(
                "vfio {}: the device is on NUMA node {node}; guest RAM is bound there \
                 unless [memory] numa_node says otherwise",
                dev.id
            );
        }
    }
    if !config.vfio.is_empty() {
        let memlock = Memlock::current().map_err(VfioError::Memlock)?;
        check_memlock(memlock, config.memory.size_bytes)?;
    }
    Ok(reports)
}

/// The NUMA node guest RAM should be bound to: the configured one, else the node of
/// the first passthrough device that reports one (its DMA then stays local).
pub fn default_numa_node(config: &SandboxConfig, reports: &[DeviceReport]) -> Option<u32> {
    config
        .memory
        .numa_node
        .or_else(|| reports.iter().find_map(|r| r.numa_node))
}

/// Maps device BAR areas into the guest as KVM memory slots.
struct KvmSlotMapper {
    vm: Arc<VmFd>,
}

impl SlotMapper for KvmSlotMapper {
    fn map(&self, slot: u32, guest_addr: u64, mapping: &HostMapping) -> Result<(), String> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: mapping.len() as u64,
            userspace_addr: mapping.as_ptr() as u64,
        };
        // SAFETY: the mapping is owned by the device, which removes the slot (unmap)
        // before dropping the mapping.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| e.to_string())
    }

    fn unmap(&self, slot: u32) -> Result<(), String> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            ..Default::default()
        };
        // SAFETY: a zero-sized region deletes the slot; no memory is referenced.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| e.to_string())
    }
}

/// What every passed-through device of the VM shares: the container and the DMA
/// mappings of guest RAM (unmapped when the last device is gone).
struct Session {
    _dma: DmaMappings,
    _container: Arc<Container>,
}

fn kvm_vfio_device(vm: &VmFd) -> Option<VfioDeviceFd> {
    let mut dev = kvm_bindings::kvm_create_device {
        type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    match vm.create_device(&mut dev) {
        Ok(fd) => Some(VfioDeviceFd::new_from_kvm(fd)),
        Err(e) => {
            warn!("cannot create the KVM VFIO device ({e}); continuing without it");
            None
        }
    }
}

/// The VM's IOMMU domain: iommufd when the pre-flight chose it for every device
/// (falling back to the legacy container if `/dev/iommu` cannot be opened after
/// all), else the legacy container.
fn open_domain(vm: &VmFd, reports: &[DeviceReport]) -> Result<Container, BackendError> {
    let kvm_vfio = kvm_vfio_device(vm);
    if reports
        .iter()
        .all(|r| matches!(r.iommu, IommuPath::Iommufd { .. }))
    {
        let for_legacy = kvm_vfio.as_ref().and_then(|fd| fd.try_clone().ok());
        match Container::open_iommufd(kvm_vfio) {
            Ok(c) => return Ok(c),
            Err(e) => {
                warn!("vfio: iommufd unusable ({e}); trying the legacy container");
                return Container::open(for_legacy);
            }
        }
    }
    Container::open(kvm_vfio)
}

/// Where the VFIO devices go.
pub struct Placement<'a> {
    /// GSI routes for the vectors.
    pub routes: &'a Arc<GsiRoutes>,
    /// PCI bus 0.
    pub root: &'a mut PciRoot,
    /// BAR addresses.
    pub bars: &'a mut BarSpace,
    /// The MMIO bus being built.
    pub mmio: &'a mut BusBuilder,
    /// Follows guest BAR moves.
    pub bar_mapper: &'a Arc<KvmBarMapper>,
    /// IOAPIC pins for INTx.
    pub intx_pins: &'a mut IntxPins,
}

/// Opens every `[[vfio]]` device and puts it on bus 0. Devices are released (reset)
/// when the buses holding them are dropped at VM stop. Returns the legacy interrupt
/// routing of the devices that have INTx, for the MP table.
pub fn attach(
    config: &SandboxConfig,
    vm: &Arc<VmFd>,
    ram: &GuestRam,
    at: Placement<'_>,
) -> Result<Vec<PciIntx>, VfioError> {
    let mut routing = Vec::new();
    if config.vfio.is_empty() {
        return Ok(routing);
    }
    let reports = preflight(config)?;
    let container = Arc::new(
        open_domain(vm, &reports).map_err(|source| VfioError::Backend {
            id: config.vfio[0].id.clone(),
            source,
        })?,
    );
    info!("vfio: devices opened through the {}", container.kind());
    let mut opened = Vec::new();
    for (dev, report) in config.vfio.iter().zip(&reports) {
        let device = container
            .open_device(&report.sysfs_path)
            .map_err(|source| VfioError::Backend {
                id: dev.id.clone(),
                source,
            })?;
        opened.push((dev.id.clone(), Arc::new(device)));
    }
    // Groups are attached: map guest RAM once for the container.
    // SAFETY: guest RAM stays mapped while the VM's buses (which hold the devices
    // holding these mappings) live: the builder drops them before `ram`.
    let dma = unsafe { DmaMappings::map(container.clone(), &ranges_of(ram.memory())) }?;
    let session: Arc<dyn std::any::Any + Send + Sync> = Arc::new(Session {
        _dma: dma,
        _container: container,
    });
    let slots: Arc<dyn SlotMapper> = Arc::new(KvmSlotMapper { vm: Arc::clone(vm) });
    let mut next_slot = FIRST_DEVICE_SLOT;
    for (id, backend) in opened {
        let dev_err = |source: VfioDeviceError| VfioError::Device {
            id: id.clone(),
            source,
        };
        let probe = DeviceProbe::read(&*backend).map_err(dev_err)?;
        let router =
            DeviceVectors::new(&id, at.routes, probe.vectors_needed()).map_err(|source| {
                VfioError::Interrupts {
                    id: id.clone(),
                    source,
                }
            })?;
        let mut bars = probe.bars;
        for (i, bar) in bars.iter_mut().enumerate().take(NUM_BARS) {
            if !bar.is_memory() {
                continue;
            }
            bar.addr = at
                .bars
                .place(
                    bar.size.max(keel_devices::vfio::bars::PAGE),
                    bar.kind == BarKind::Mem64,
                    bar.prefetchable,
                )
                .map_err(|source| VfioError::NoRoom {
                    id: id.clone(),
                    bar: i,
                    source,
                })?;
        }
        let intx = if probe.has_intx {
            let intx_err = |source| VfioError::Intx {
                id: id.clone(),
                source,
            };
            let gsi = at.intx_pins.allocate().map_err(intx_err)?;
            let line = KvmIntxLine::new(Arc::clone(vm), gsi).map_err(intx_err)?;
            Some(Arc::new(line) as Arc<dyn keel_devices::vfio::irq::IntxLine>)
        } else {
            None
        };
        let gsi = intx.as_ref().map(|l| l.line());
        let mut function = VfioPciDevice::new(
            id.clone(),
            backend,
            &probe,
            DeviceWiring { router, intx, bars },
        )
        .map_err(dev_err)?;
        let pin = function.intx_pin();
        function.hold(Arc::clone(&session));
        for (n, w) in at.bars.windows().into_iter().enumerate() {
            if n == 0 {
                function.set_bar_mapper(at.bar_mapper.clone(), w);
            } else {
                function.add_bar_window(w);
            }
        }
        next_slot += function
            .setup_direct(Arc::clone(&slots), next_slot)
            .map_err(dev_err)?;
        let ranges = function.bus_ranges();
        let function = Arc::new(Mutex::new(function));
        for (bar, addr, size) in ranges {
            at.mmio
                .insert(
                    addr,
                    size,
                    Arc::new(Mutex::new(BarAccess::new(function.clone(), bar))),
                )
                .map_err(|source| VfioError::Bus {
                    id: id.clone(),
                    source,
                })?;
            info!("vfio {id}: BAR {bar} at {addr:#x} ({size:#x} bytes)");
        }
        let slot = at
            .root
            .add(function)
            .ok_or_else(|| VfioError::BusFull(id.clone()))?;
        info!("vfio {id}: PCI 00:{slot:02x}.0");
        if let (Some(pin), Some(gsi)) = (pin, gsi) {
            info!(
                "vfio {id}: INT{} -> IOAPIC pin {gsi}",
                char::from(b'A' + pin.saturating_sub(1))
            );
            routing.push(PciIntx { slot, pin, gsi });
        }
    }
    Ok(routing)
}

#[cfg(test)]
mod numa_tests {
    use super::*;
    use std::path::PathBuf;

    fn report(node: Option<u32>) -> DeviceReport {
        DeviceReport {
            sysfs_path: PathBuf::from("/sys/bus/pci/devices/0000:01:00.0"),
            group: 7,
            numa_node: node,
            iommu: IommuPath::Legacy {
                reason: "test".to_owned(),
            },
        }
    }

    fn config(numa: Option<u32>) -> SandboxConfig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"\x7fELF").unwrap();
        let host = crate::config::HostInfo {
            online_cpus: vec![0, 1],
            numa_nodes: vec![0, 1],
        };
        let numa = numa
            .map(|n| format!("numa_node = {n}\n"))
            .unwrap_or_default();
        let text = format!(
            "name = \"v\"\n[memory]\nsize = \"64MiB\"\n{numa}[boot]\nkernel = \"vmlinux\"\n"
        );
        crate::config::parse_str_with_host(&text, &dir.path().join("v.toml"), &host).unwrap()
    }

    #[test]
    fn the_devices_node_is_the_default_and_the_config_wins() {
        assert_eq!(
            default_numa_node(&config(None), &[report(Some(1))]),
            Some(1)
        );
        assert_eq!(
            default_numa_node(&config(Some(0)), &[report(Some(1))]),
            Some(0)
        );
        assert_eq!(default_numa_node(&config(None), &[report(None)]), None);
        assert_eq!(default_numa_node(&config(None), &[]), None);
    }

    /// A host tree with devices `addrs` bound to vfio-pci, each alone in group
    /// 10 + index, /dev/iommu, and a cdev for the devices in `cdevs`.
    fn host(root: &std::path::Path, addrs: &[&str], cdevs: &[&str]) -> HostPaths {
        use std::fs;
        use std::os::unix::fs::symlink;
        let sys = root.join("sys");
        let dev_vfio = root.join("dev/vfio");
        fs::create_dir_all(sys.join("bus/pci/drivers/vfio-pci")).unwrap();
        fs::create_dir_all(sys.join("bus/pci/devices")).unwrap();
        fs::create_dir_all(dev_vfio.join("devices")).unwrap();
        fs::write(root.join("dev/iommu"), "").unwrap();
        for (i, addr) in addrs.iter().enumerate() {
            let group = 10 + i;
            let dir = sys.join("devices").join(addr);
            let gdir = sys.join(format!("kernel/iommu_groups/{group}"));
            fs::create_dir_all(&dir).unwrap();
            fs::create_dir_all(gdir.join("devices")).unwrap();
            symlink(&dir, sys.join("bus/pci/devices").join(addr)).unwrap();
            symlink(sys.join("bus/pci/drivers/vfio-pci"), dir.join("driver")).unwrap();
            symlink(&gdir, dir.join("iommu_group")).unwrap();
            symlink(&dir, gdir.join("devices").join(addr)).unwrap();
            fs::write(dev_vfio.join(group.to_string()), "").unwrap();
            if cdevs.contains(addr) {
                fs::create_dir_all(dir.join(format!("vfio-dev/vfio{i}"))).unwrap();
                fs::write(dev_vfio.join(format!("devices/vfio{i}")), "").unwrap();
            }
        }
        HostPaths {
            sysfs: sys,
            dev_vfio,
            dev_iommu: root.join("dev/iommu"),
        }
    }

    fn two_devices() -> SandboxConfig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"\x7fELF").unwrap();
        let host = crate::config::HostInfo {
            online_cpus: vec![0, 1],
            numa_nodes: vec![0],
        };
        let text = "name = \"v\"\n[memory]\nsize = \"16MiB\"\n[boot]\nkernel = \"vmlinux\"\n\
                    [[vfio]]\nid = \"a\"\naddress = \"0000:01:00.0\"\n\
                    [[vfio]]\nid = \"b\"\naddress = \"0000:02:00.0\"\n";
        crate::config::parse_str_with_host(text, &dir.path().join("v.toml"), &host).unwrap()
    }

    fn is_iommufd(r: &DeviceReport) -> bool {
        matches!(r.iommu, IommuPath::Iommufd { .. })
    }

    #[test]
    fn one_iommu_interface_per_vm() {
        let config = two_devices();
        let addrs = ["0000:01:00.0", "0000:02:00.0"];
        let both = tempfile::tempdir().unwrap();
        let reports = preflight_at(&config, &host(both.path(), &addrs, &addrs)).unwrap();
        assert!(reports.iter().all(is_iommufd), "{reports:?}");
        // Only one device has a cdev: both take the legacy path, and say why.
        let one = tempfile::tempdir().unwrap();
        let reports = preflight_at(&config, &host(one.path(), &addrs, &addrs[..1])).unwrap();
        assert!(!reports.iter().any(is_iommufd), "{reports:?}");
        assert!(
            reports[0]
                .iommu
                .to_string()
                .contains("another device of the VM"),
            "{}",
            reports[0].iommu
        );
        assert!(
            reports[1].iommu.to_string().contains("vfio-dev"),
            "{}",
            reports[1].iommu
        );
    }
}
