//! The validated sandbox configuration: plain data, every rule already checked.

use std::path::PathBuf;
use std::time::Duration;

pub use super::addr::PciAddress;

/// One sandbox, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxConfig {
    /// Sandbox name: 1 to 64 of `[A-Za-z0-9_.-]`, not starting with `.`.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: VcpuConfig,
    /// Guest memory.
    pub memory: MemoryConfig,
    /// The VMM's own threads.
    pub vmm: VmmConfig,
    /// Kernel, initramfs and command line.
    pub boot: BootConfig,
    /// The guest serial port.
    pub serial: SerialConfig,
    /// The control socket.
    pub control: ControlConfig,
    /// Settings shared by all devices.
    pub devices: DevicesConfig,
    /// vhost-user network devices.
    pub net: Vec<NetConfig>,
    /// vhost-user block devices.
    pub disk: Vec<DiskConfig>,
    /// Host PCI devices passed through with VFIO.
    pub vfio: Vec<VfioConfig>,
}

/// Virtual CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuConfig {
    /// Number of vCPUs, 1..=254.
    pub count: u8,
    /// For each vCPU (by index), the online host CPUs it may run on.
    pub affinity: Option<Vec<Vec<u32>>>,
}

/// Guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Size in bytes: at least 16 MiB and a multiple of the page size.
    pub size_bytes: u64,
    /// Backing page size.
    pub hugepages: HugePages,
    /// Host NUMA node to bind guest memory to.
    pub numa_node: Option<u32>,
    /// Populate all guest memory before the guest starts.
    pub prefault: bool,
}

/// Page size backing guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HugePages {
    /// Normal 4 KiB pages.
    #[default]
    None,
    /// 2 MiB huge pages.
    Size2M,
    /// 1 GiB huge pages.
    Size1G,
}

impl HugePages {
    /// Page size in bytes (4096 for [`HugePages::None`]).
    pub fn page_size(&self) -> u64 {
        match self {
            HugePages::None => 4096,
            HugePages::Size2M => 2 << 20,
            HugePages::Size1G => 1 << 30,
        }
    }

    /// The name used in config files: `"none"`, `"2M"` or `"1G"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            HugePages::None => "none",
            HugePages::Size2M => "2M",
            HugePages::Size1G => "1G",
        }
    }
}

/// The VMM's own (non-vCPU) threads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmmConfig {
    /// Online host CPUs the event loop and other VMM threads may run on.
    pub affinity: Option<Vec<u32>>,
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// Kernel image (ELF vmlinux or bzImage), resolved against the config directory.
    pub kernel: PathBuf,
    /// Initramfs, resolved against the config directory.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line (at most 2047 bytes, no NUL); empty if not given.
    pub cmdline: String,
}

/// The guest serial port (ttyS0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialConfig {
    /// Where guest output goes.
    pub output: SerialOutput,
    /// Forward the VMM's stdin to the guest.
    pub input: bool,
}

/// Where guest serial output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's stdout (the journal under systemd).
    Stdout,
    /// Appended to this file (resolved against the config directory).
    File(PathBuf),
    /// Discarded.
    Off,
}

/// The control socket.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControlConfig {
    /// Unix socket path for control commands; none means no control socket.
    pub socket: Option<PathBuf>,
}

/// Settings shared by all devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicesConfig {
    /// How long to wait for vhost-user backends to accept a connection.
    pub connect_timeout: Duration,
    /// How long a vhost-user backend may take to answer one control message before
    /// it counts as hung (disconnected, then reconnected).
    pub reply_timeout: Duration,
}

/// A vhost-user network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Device id, unique across all devices.
    pub id: String,
    /// vhost-user socket served by the backend.
    pub socket: PathBuf,
    /// Guest MAC address (unicast, not zero).
    pub mac: [u8; 6],
    /// Number of RX/TX queue pairs.
    pub queue_pairs: u16,
    /// Descriptors per queue (power of two).
    pub queue_size: u16,
}

/// A vhost-user block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Device id, unique across all devices.
    pub id: String,
    /// vhost-user socket served by the backend.
    pub socket: PathBuf,
    /// Expose the disk read-only.
    pub read_only: bool,
    /// Number of request queues.
    pub queues: u16,
    /// Descriptors per queue (power of two).
    pub queue_size: u16,
    /// Serial number reported to the guest (at most 20 printable ASCII bytes).
    pub serial: Option<String>,
}

/// A host PCI device passed through with VFIO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioConfig {
    /// Device id, unique across all devices.
    pub id: String,
    /// Host PCI address.
    pub address: PciAddress,
}
