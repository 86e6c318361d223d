//! The config file exactly as written: serde structs with spans and no semantics.
//!
//! Values that need checks beyond their TOML type are kept as [`Spanned`] so that
//! validation errors point at the right place. Integers are read as `i64` so that
//! range errors can say what was found.

use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub name: Spanned<String>,
    #[serde(default)]
    pub vcpus: RawVcpus,
    pub memory: RawMemory,
    #[serde(default)]
    pub vmm: RawVmm,
    pub boot: RawBoot,
    #[serde(default)]
    pub serial: RawSerial,
    #[serde(default)]
    pub control: RawControl,
    #[serde(default)]
    pub devices: RawDevices,
    #[serde(default)]
    pub net: Vec<RawNet>,
    #[serde(default)]
    pub disk: Vec<RawDisk>,
    #[serde(default)]
    pub vfio: Vec<RawVfio>,
}

/// A list of host CPUs as written.
pub(crate) type RawCpuList = Spanned<Vec<Spanned<i64>>>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVcpus {
    pub count: Option<Spanned<i64>>,
    pub affinity: Option<Spanned<Vec<RawCpuList>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMemory {
    /// A size string, or an integer number of bytes.
    pub size: Spanned<toml::Value>,
    pub hugepages: Option<Spanned<String>>,
    pub numa_node: Option<Spanned<i64>>,
    #[serde(default)]
    pub prefault: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVmm {
    pub affinity: Option<RawCpuList>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBoot {
    pub kernel: Spanned<String>,
    pub initramfs: Option<Spanned<String>>,
    pub cmdline: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSerial {
    pub output: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    #[serde(default)]
    pub input: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawControl {
    pub socket: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDevices {
    pub connect_timeout: Option<Spanned<String>>,
    pub reply_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNet {
    pub id: Spanned<String>,
    pub socket: Spanned<String>,
    pub mac: Spanned<String>,
    pub queue_pairs: Option<Spanned<i64>>,
    pub queue_size: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDisk {
    pub id: Spanned<String>,
    pub socket: Spanned<String>,
    #[serde(default)]
    pub read_only: bool,
    pub queues: Option<Spanned<i64>>,
    pub queue_size: Option<Spanned<i64>>,
    pub serial: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVfio {
    pub id: Spanned<String>,
    pub address: Spanned<String>,
}
