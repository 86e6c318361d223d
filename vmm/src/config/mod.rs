//! Sandbox configuration: one TOML file describes one sandbox.
//!
//! Reading a config goes through three steps, one file each:
//! - `parse.rs`: TOML text to raw serde structs (`raw.rs`, every table
//!   `deny_unknown_fields`, values kept with their spans);
//! - `validate.rs`: raw structs to the validated model (`model.rs`),
//!   checking ranges, formats, cross-field rules, the files the config names and the
//!   host's CPUs and NUMA nodes ([`host`]);
//! - every failure becomes a one-line [`ConfigError`] of the form
//!   `FILE:LINE:COL: field.path: what was expected, what was found`.
//!
//! Relative paths in the file are resolved against the directory of the file. The huge
//! page pool is not checked here but when the VM starts
//! ([`host::check_hugepage_pool`]), because it can change between check and start.
//!
//! ```toml
//! name = "demo"
//! [memory]
//! size = "512MiB"
//! [boot]
//! kernel = "vmlinux"
//! ```

mod addr;
mod error;
pub mod host;
mod locate;
mod model;
mod parse;
mod raw;
pub mod size;
mod validate;

#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use addr::{format_mac, parse_mac};
pub use error::ConfigError;
pub use host::{HostError, HostInfo};
pub use model::{
    BootConfig, ControlConfig, DevicesConfig, DiskConfig, HugePages, MemoryConfig, NetConfig,
    PciAddress, SandboxConfig, SerialConfig, SerialOutput, VcpuConfig, VfioConfig, VmmConfig,
};

/// Where the host facts come from in production.
const SYSFS_ROOT: &str = "/sys";

/// Reads, parses and validates the config file at `path` against this host (`/sys`).
pub fn load(path: &Path) -> Result<SandboxConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_str(&text, path)
}

/// Parses and validates `text` against this host (`/sys`). `origin` is the file the
/// text came from: it names the file in errors and relative paths are resolved
/// against its directory.
pub fn parse_str(text: &str, origin: &Path) -> Result<SandboxConfig, ConfigError> {
    // Syntax and type errors do not need the host; report them even if /sys is odd.
    let raw = parse::parse_raw(text).map_err(|p| p.into_error(text, origin))?;
    let host = HostInfo::read(Path::new(SYSFS_ROOT))?;
    validate::validate(raw, &base_dir(origin), &host).map_err(|p| p.into_error(text, origin))
}

/// Like [`parse_str`] but validates against `host` instead of reading `/sys`.
pub fn parse_str_with_host(
    text: &str,
    origin: &Path,
    host: &HostInfo,
) -> Result<SandboxConfig, ConfigError> {
    let raw = parse::parse_raw(text).map_err(|p| p.into_error(text, origin))?;
    validate::validate(raw, &base_dir(origin), host).map_err(|p| p.into_error(text, origin))
}

/// The directory relative paths are resolved against: the config file's directory,
/// made absolute (without touching the file system) when possible.
fn base_dir(origin: &Path) -> PathBuf {
    let dir = match origin.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}
