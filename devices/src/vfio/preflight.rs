//! Checks made before a VM with passed-through devices is built, so that a host
//! that is not ready fails at once with the numbers and the fix, instead of deep in
//! VFIO ioctls (or, worse, after guest RAM was allocated).
//!
//! Every function takes the sysfs root and the VFIO device directory, so tests run
//! against a fake tree. The checks, in order:
//! 1. `/dev/vfio` exists (the kernel has VFIO and vfio-pci is loaded).
//! 2. `/sys/bus/pci/devices/ADDR` exists.
//! 3. its `driver` link names `vfio-pci`.
//! 4. it has an `iommu_group` link (the IOMMU is on).
//! 5. every other device of the group is *viable*, by the kernel's rule: bound to
//!    `vfio-pci`, to no driver, to `pci-stub` or `pcieport` (drivers that never do
//!    DMA on the device's behalf), or a bridge (header type != 0) with any driver.
//!    A group with, say, the second port of a NIC still bound to `igb` cannot be
//!    opened (the kernel reports it "not viable").
//! 6. which IOMMU interface to use ([`select_iommu`]): iommufd when `/dev/iommu` and
//!    the device's cdev (`/dev/vfio/devices/vfioN`, named by its sysfs `vfio-dev/`)
//!    exist and are readable and writable; else the legacy container/group, for
//!    which `/dev/vfio/GROUP` must exist and be readable and writable.
//! 7. separately ([`check_memlock`]): the locked-memory limit covers guest RAM plus
//!    [`MEMLOCK_MARGIN`], because the type-1 IOMMU driver pins every guest page and
//!    charges it to `RLIMIT_MEMLOCK`, unless the process has `CAP_IPC_LOCK`.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Locked memory asked for above guest RAM (other locked pages of the process).
pub const MEMLOCK_MARGIN: u64 = 64 << 20;

/// Drivers that may hold other devices of the group.
const VIABLE_DRIVERS: [&str; 3] = ["vfio-pci", "pci-stub", "pcieport"];

/// Where the host's sysfs and VFIO device nodes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// sysfs root (`/sys`).
    pub sysfs: PathBuf,
    /// VFIO device directory (`/dev/vfio`).
    pub dev_vfio: PathBuf,
    /// The iommufd node (`/dev/iommu`).
    pub dev_iommu: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            sysfs: PathBuf::from("/sys"),
            dev_vfio: PathBuf::from("/dev/vfio"),
            dev_iommu: PathBuf::from("/dev/iommu"),
        }
    }
}

/// A host that is not ready for a passthrough device. Display is one line naming
/// the device and saying how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// No VFIO on the host.
    #[error(
        "vfio {id} ({address}): {} does not exist: the host kernel has no VFIO (CONFIG_VFIO, \
         CONFIG_VFIO_PCI) or the vfio-pci module is not loaded; fix: `modprobe vfio-pci` on a \
         host booted with the IOMMU on (intel_iommu=on or amd_iommu=on)",
        path.display()
    )]
    NoVfio {
        /// Device id.
        id: String,
        /// PCI address.
        address: String,
        /// The missing directory.
        path: PathBuf,
    },
    /// No such PCI device.
    #[error(
        "vfio {id} ({address}): no such PCI device ({} does not exist); list devices with `lspci -D`",
        path.display()
    )]
    NoDevice {
        /// Device id.
        id: String,
        /// PCI address.
        address: String,
        /// The missing sysfs directory.
        path: PathBuf,
    },
    /// The device is not bound to vfio-pci.
    #[error(
        "vfio {id} ({address}): {}, not to vfio-pci; fix: {fix}",
        bound_text(driver)
    )]
    NotBound {
        /// Device id.
        id: String,
        /// PCI address.
        address: String,
        /// The driver it is bound to.
        driver: Option<String>,
        /// Commands that bind it.
        fix: String,
    },
    /// The device has no IOMMU group.
    #[error(
        "vfio {id} ({address}): {} does not exist: the IOMMU is off; enable VT-d / AMD-Vi in the \
         firmware and boot with intel_iommu=on (or amd_iommu=on)",
        path.display()
    )]
    NoIommuGroup {
        /// Device id.
        id: String,
        /// PCI address.
        address: String,
        /// The missing link.
        path: PathBuf,
    },
    /// Other devices of the group are bound to host drivers.
    #[error(
        "vfio {id} ({address}): IOMMU group {group} also holds {}; every device of the group must \
         be bound to vfio-pci (or to no driver) before the group can be used; fix, for each: {fix}",
        others.iter().map(|(a, d)| format!("{a} ({})", bound_text(&Some(d.clone())))).collect::<Vec<_>>().join(", ")
    )]
    GroupNotViable {
        /// Device id.
        id: String,
        /// PCI address.
        address: String,
        /// IOMMU group.
        group: u32,
        /// Devices bound to other drivers: (address, driver).
        others: Vec<(String, String)>,
        /// Commands that rebind them.
        fix: String,
    },
    /// The group's device node is missing or not accessible.
    #[error("vfio {id} ({address}): IOMMU group {group}: {} {problem}", path.display())]
    GroupNode {
        /// Device id.
        id: String,
        /// PCI address.
        address: String,
        /// IOMMU group.
        group: u32,
        /// The node.
        path: PathBuf,
        /// What is wrong and the fix.
        problem: String,
    },
    /// The locked-memory limit is below guest RAM.
    #[error(
        "VFIO pins all guest RAM: the locked-memory limit (RLIMIT_MEMLOCK) is {} but {needed} \
         bytes ({} MiB: {ram} bytes of guest RAM + {} MiB margin) are needed; fix: `ulimit -l {}` \
         (KiB) before starting keel-vmm, LimitMEMLOCK={needed} in its systemd unit, or grant it \
         CAP_IPC_LOCK",
        limit_text(*limit), needed >> 20, MEMLOCK_MARGIN >> 20, needed.div_ceil(1024)
    )]
    Memlock {
        /// Guest RAM in bytes.
        ram: u64,
        /// Bytes needed.
        needed: u64,
        /// The soft limit in bytes.
        limit: u64,
    },
    /// A sysfs file could not be read.
    #[error("vfio {id} ({address}): cannot read {}: {source}", path.display())]
    Read {
        /// Device id.
        id: String,
        /// PCI address.
        address: String,
        /// The file.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
}

fn bound_text(driver: &Option<String>) -> String {
    match driver {
        Some(d) => format!("bound to driver {d}"),
        None => "not bound to any driver".to_owned(),
    }
}

fn limit_text(limit: u64) -> String {
    format!("{limit} bytes ({} KiB)", limit / 1024)
}

/// What the checks found out about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    /// The device's sysfs directory (what VFIO opens it by).
    pub sysfs_path: PathBuf,
    /// IOMMU group number.
    pub group: u32,
    /// NUMA node the device is attached to (None: unknown / single node).
    pub numa_node: Option<u32>,
    /// The IOMMU interface chosen for it, and why.
    pub iommu: IommuPath,
}

/// How a device is opened and its DMA mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IommuPath {
    /// The device cdev bound to an iommufd IOAS.
    Iommufd {
        /// The device's cdev (`/dev/vfio/devices/vfioN`).
        cdev: PathBuf,
    },
    /// The legacy VFIO container and group (`/dev/vfio/vfio`, `/dev/vfio/GROUP`).
    Legacy {
        /// Why iommufd is not used.
        reason: String,
    },
}

impl std::fmt::Display for IommuPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Iommufd { cdev } => write!(f, "iommufd (/dev/iommu, {})", cdev.display()),
            Self::Legacy { reason } => write!(f, "legacy container/group ({reason})"),
        }
    }
}

/// Whether the device at sysfs directory `dev` can be opened through iommufd on
/// the host `paths`; the legacy path, with the reason, when not.
pub fn select_iommu(paths: &HostPaths, dev: &Path) -> IommuPath {
    let legacy = |reason: String| IommuPath::Legacy { reason };
    if !cfg!(feature = "iommufd") {
        return legacy("keel was built without the `iommufd` feature".to_owned());
    }
    let iommu = &paths.dev_iommu;
    if !iommu.exists() {
        return legacy(format!(
            "{} does not exist: host kernel without CONFIG_IOMMUFD (or the iommufd module              is not loaded)",
            iommu.display()
        ));
    }
    if !accessible(iommu) {
        return legacy(format!(
            "{} is not readable and writable by this process",
            iommu.display()
        ));
    }
    let cdev_dir = dev.join("vfio-dev");
    let Ok(entries) = fs::read_dir(&cdev_dir) else {
        return legacy(format!(
            "{} does not exist: host kernel without CONFIG_VFIO_DEVICE_CDEV",
            cdev_dir.display()
        ));
    };
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vfio") && n[4..].parse::<u32>().is_ok())
        .collect();
    let [name] = names.as_slice() else {
        return legacy(format!(
            "{} holds {} vfioN entries, expected exactly one",
            cdev_dir.display(),
            names.len()
        ));
    };
    let cdev = paths.dev_vfio.join("devices").join(name);
    if !cdev.exists() {
        return legacy(format!(
            "{} does not exist (/dev not populated?)",
            cdev.display()
        ));
    }
    if !accessible(&cdev) {
        return legacy(format!(
            "{} is not readable and writable by this process",
            cdev.display()
        ));
    }
    IommuPath::Iommufd { cdev }
}

/// Commands that bind `address` to vfio-pci, unbinding `driver` first if any.
pub fn bind_fix(address: &str, driver: Option<&str>) -> String {
    let mut steps = vec!["modprobe vfio-pci".to_owned()];
    if driver.is_some() {
        steps.push(format!(
            "echo {address} > /sys/bus/pci/devices/{address}/driver/unbind"
        ));
    }
    steps.push(format!(
        "echo vfio-pci > /sys/bus/pci/devices/{address}/driver_override"
    ));
    steps.push(format!(
        "echo {address} > /sys/bus/pci/drivers/vfio-pci/bind"
    ));
    format!("`{}`", steps.join(" && "))
}

/// The driver a device is bound to (the name of its `driver` link), if any.
fn driver_of(dev: &Path) -> Option<String> {
    let target = fs::read_link(dev.join("driver")).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Whether a device is a bridge (header type != 0), from its `config` file.
fn is_bridge(dev: &Path) -> bool {
    fs::read(dev.join("config"))
        .ok()
        .and_then(|c| c.get(0x0e).copied())
        .is_some_and(|h| h & 0x7f != 0)
}

fn accessible(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path; access() only reads it.
    unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) == 0 }
}

/// Runs checks 1–6 for device `id` at PCI `address` ("DDDD:BB:DD.F"), preferring
/// iommufd where the host has it.
pub fn check_device(
    paths: &HostPaths,
    id: &str,
    address: &str,
) -> Result<DeviceReport, PreflightError> {
    check_device_with(paths, id, address, true)
}

/// [`check_device`]; with `allow_iommufd` false the legacy path is required (all
/// devices of a VM share one IOMMU interface).
pub fn check_device_with(
    paths: &HostPaths,
    id: &str,
    address: &str,
    allow_iommufd: bool,
) -> Result<DeviceReport, PreflightError> {
    let ids = || (id.to_owned(), address.to_owned());
    if !paths.dev_vfio.is_dir() {
        let (id, address) = ids();
        return Err(PreflightError::NoVfio {
            id,
            address,
            path: paths.dev_vfio.clone(),
        });
    }
    let dev = paths.sysfs.join("bus/pci/devices").join(address);
    if !dev.exists() {
        let (id, address) = ids();
        return Err(PreflightError::NoDevice {
            id,
            address,
            path: dev,
        });
    }
    let driver = driver_of(&dev);
    if driver.as_deref() != Some("vfio-pci") {
        let (id, address) = ids();
        let fix = bind_fix(&address, driver.as_deref());
        return Err(PreflightError::NotBound {
            id,
            address,
            driver,
            fix,
        });
    }
    let group_link = dev.join("iommu_group");
    let group = fs::read_link(&group_link)
        .ok()
        .and_then(|t| t.file_name()?.to_str()?.parse::<u32>().ok());
    let Some(group) = group else {
        let (id, address) = ids();
        return Err(PreflightError::NoIommuGroup {
            id,
            address,
            path: group_link,
        });
    };

    let members = group_link.join("devices");
    let entries = fs::read_dir(&members).map_err(|source| {
        let (id, address) = ids();
        PreflightError::Read {
            id,
            address,
            path: members.clone(),
            source,
        }
    })?;
    let mut others = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == address {
            continue;
        }
        let path = entry.path();
        let Some(d) = driver_of(&path) else {
            continue;
        };
        if VIABLE_DRIVERS.contains(&d.as_str()) || is_bridge(&path) {
            continue;
        }
        others.push((name, d));
    }
    if !others.is_empty() {
        others.sort();
        let (id, address) = ids();
        let fix = bind_fix("ADDR", Some("driver"));
        return Err(PreflightError::GroupNotViable {
            id,
            address,
            group,
            others,
            fix,
        });
    }

    let iommu = if allow_iommufd {
        select_iommu(paths, &dev)
    } else {
        IommuPath::Legacy {
            reason: "another device of the VM cannot use iommufd".to_owned(),
        }
    };
    let node = paths.dev_vfio.join(group.to_string());
    let problem = if matches!(iommu, IommuPath::Iommufd { .. }) {
        None
    } else if !node.exists() {
        Some(
            "does not exist: the group is not claimed by vfio-pci yet (bind every device of the \
             group to vfio-pci) or /dev is not populated"
                .to_owned(),
        )
    } else if !accessible(&node) {
        Some(
            "is not readable and writable by this process: run keel-vmm as root, or give its \
             user the node (udev rule, e.g. GROUP=\"kvm\" MODE=\"0660\") and DeviceAllow= it in \
             the unit"
                .to_owned(),
        )
    } else {
        None
    };
    if let Some(mut problem) = problem {
        if let IommuPath::Legacy { reason } = &iommu {
            problem = format!("{problem} (iommufd not used: {reason})");
        }
        let (id, address) = ids();
        return Err(PreflightError::GroupNode {
            id,
            address,
            group,
            path: node,
            problem,
        });
    }

    let numa_node = fs::read_to_string(dev.join("numa_node"))
        .ok()
        .and_then(|t| t.trim().parse::<i64>().ok())
        .and_then(|n| u32::try_from(n).ok());
    Ok(DeviceReport {
        sysfs_path: dev,
        group,
        numa_node,
        iommu,
    })
}

/// The locked-memory situation of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memlock {
    /// Soft `RLIMIT_MEMLOCK` in bytes (None: unlimited).
    pub limit: Option<u64>,
    /// The process has `CAP_IPC_LOCK` (pinning is not charged against the limit).
    pub cap_ipc_lock: bool,
}

impl Memlock {
    /// Reads the limit and the effective capabilities of this process.
    pub fn current() -> io::Result<Self> {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `rl` is a valid rlimit struct getrlimit fills in.
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let limit = (rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur);
        let status = fs::read_to_string("/proc/self/status")?;
        Ok(Self {
            limit,
            cap_ipc_lock: cap_ipc_lock_in(&status),
        })
    }
}

/// Whether a `/proc/PID/status` text has `CAP_IPC_LOCK` (bit 14) in `CapEff`.
pub fn cap_ipc_lock_in(status: &str) -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Check 7: whether `memlock` lets VFIO pin `ram` bytes of guest RAM.
pub fn check_memlock(memlock: Memlock, ram: u64) -> Result<(), PreflightError> {
    let needed = ram.saturating_add(MEMLOCK_MARGIN);
    match memlock.limit {
        _ if memlock.cap_ipc_lock => Ok(()),
        None => Ok(()),
        Some(limit) if limit >= needed => Ok(()),
        Some(limit) => Err(PreflightError::Memlock { ram, needed, limit }),
    }
}

/// Advice about guest RAM placement for a device on `device_node`: a warning when
/// `[memory] numa_node` names another node (DMA then crosses the interconnect).
pub fn numa_mismatch(
    id: &str,
    device_node: Option<u32>,
    configured: Option<u32>,
) -> Option<String> {
    match (device_node, configured) {
        (Some(dev), Some(mem)) if dev != mem => Some(format!(
            "vfio {id}: the device is on NUMA node {dev} but guest memory is bound to node {mem}; \
             DMA will cross nodes (set [memory] numa_node = {dev})"
        )),
        _ => None,
    }
}
