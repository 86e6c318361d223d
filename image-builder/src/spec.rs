//! The image spec: one TOML file describing an appliance guest.
//!
//! ```toml
//! name = "web"                        # sandbox name (default: the spec file's stem)
//!
//! [kernel]
//! package = "linux-image-cloud-amd64" # Debian package (default), or:
//! # path = "bzImage"                  # a local bzImage or vmlinux
//! # modules_dir = "lib/modules/6.1.0" # modules of a local kernel
//! modules = ["virtio_pci", "virtio_blk", "virtio_net"]  # dependencies are added
//! cmdline = "quiet"                   # appended to the generated command line
//!
//! [app]
//! path = "server"                     # host file copied to /app/server
//! args = ["--port", "80"]
//! env = { MODE = "prod" }
//!
//! [[files]]
//! src = "static/"                     # a file or a directory (copied recursively)
//! dest = "/srv/static"
//! # mode = "0644"                     # files only; default 0755 if executable else 0644
//! [[files]]
//! dest = "/bin/sh"
//! symlink = "busybox"
//!
//! [rootfs]
//! type = "ext4"                       # none | ext4 | erofs
//! dir = "rootfs/"                    # and/or:
//! # tar = "rootfs.tar.gz"             # unpacked on top of dir
//! # packages = ["busybox-static"]     # Debian packages unpacked on top (no deps)
//! size = "64MiB"                      # ext4: image size; erofs: upper limit
//! mount = "/rootfs"                   # where the init mounts it
//!
//! [network]
//! ip = "10.0.0.2/24"
//! gw = "10.0.0.1"
//! mtu = 1500
//!
//! [vm]
//! memory = "256MiB"
//! vcpus = 1
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// Errors reading or validating a spec.
#[derive(Debug, Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("{path}: {err}")]
    Read {
        /// Spec path.
        path: String,
        /// The error.
        err: std::io::Error,
    },
    /// TOML syntax or schema error, with position.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// Spec path.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A value that parses but makes no sense.
    #[error("{path}: {field}: {message}")]
    Invalid {
        /// Spec path.
        path: String,
        /// Dotted field name.
        field: String,
        /// What is wrong and what was expected.
        message: String,
    },
}

/// The whole spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Sandbox name.
    pub name: Option<String>,
    /// Kernel and modules.
    #[serde(default)]
    pub kernel: KernelSpec,
    /// The application.
    pub app: AppSpec,
    /// Extra files in the initramfs.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Root file system image.
    #[serde(default)]
    pub rootfs: RootfsSpec,
    /// Static IPv4 configuration.
    pub network: Option<NetworkSpec>,
    /// The init binary.
    #[serde(default)]
    pub init: InitSpec,
    /// VM settings for the generated sandbox snippet.
    #[serde(default)]
    pub vm: VmSpec,
}

/// `[kernel]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSpec {
    /// Debian package (default `linux-image-cloud-amd64` when `path` is not set).
    pub package: Option<String>,
    /// Local bzImage or vmlinux.
    pub path: Option<PathBuf>,
    /// `lib/modules/VERSION` directory of a local kernel.
    pub modules_dir: Option<PathBuf>,
    /// Module names to include (dependencies are added).
    #[serde(default)]
    pub modules: Vec<String>,
    /// Extra kernel command line.
    pub cmdline: Option<String>,
}

/// `[app]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    /// Host file to copy into the initramfs.
    pub path: Option<PathBuf>,
    /// Where it goes (default `/app/FILENAME`).
    pub dest: Option<String>,
    /// Guest path to run (default: `dest`); may point into the rootfs.
    pub exec: Option<String>,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment (besides PATH and HOME).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// `[[files]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Host file or directory.
    pub src: Option<PathBuf>,
    /// Absolute guest path.
    pub dest: String,
    /// Octal mode for files, e.g. "0755".
    pub mode: Option<String>,
    /// Make `dest` a symlink to this target instead.
    pub symlink: Option<String>,
}

/// Root file system type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsType {
    /// No root file system.
    #[default]
    None,
    /// ext4 via `mkfs.ext4 -d`.
    Ext4,
    /// EROFS via `mkfs.erofs`.
    Erofs,
}

impl RootfsType {
    /// The name used by mount(2).
    pub fn fstype(self) -> &'static str {
        match self {
            RootfsType::None => "none",
            RootfsType::Ext4 => "ext4",
            RootfsType::Erofs => "erofs",
        }
    }
}

/// `[rootfs]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsSpec {
    /// Type.
    #[serde(default, rename = "type")]
    pub kind: RootfsType,
    /// Source directory.
    pub dir: Option<PathBuf>,
    /// Tarball unpacked on top of `dir` (any compression `tar` detects).
    pub tar: Option<PathBuf>,
    /// Debian packages unpacked on top (no dependencies, no maintainer scripts).
    #[serde(default)]
    pub packages: Vec<String>,
    /// ext4: image size; erofs: upper limit.
    pub size: Option<String>,
    /// Mount point in the guest.
    pub mount: Option<String>,
    /// Mount read-only (always for erofs).
    #[serde(default)]
    pub read_only: bool,
}

/// `[network]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// `A.B.C.D/prefix`.
    pub ip: String,
    /// Default gateway.
    pub gw: Option<String>,
    /// MTU.
    pub mtu: Option<u32>,
}

/// `[init]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    /// A static keel-init binary.
    pub path: Option<PathBuf>,
}

/// `[vm]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Guest RAM, e.g. "256MiB".
    #[serde(default = "default_memory")]
    pub memory: String,
    /// vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            memory: default_memory(),
            vcpus: default_vcpus(),
        }
    }
}

fn default_memory() -> String {
    "256MiB".to_string()
}

fn default_vcpus() -> u32 {
    1
}

/// A spec with its location, validated.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    /// The parsed spec.
    pub spec: Spec,
    /// Spec file path (for messages).
    pub path: PathBuf,
    /// Directory relative paths are resolved against.
    pub base: PathBuf,
    /// Sandbox name.
    pub name: String,
}

impl LoadedSpec {
    /// Resolves a spec-relative path.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        self.base.join(p)
    }

    fn invalid(&self, field: &str, message: impl Into<String>) -> SpecError {
        SpecError::Invalid {
            path: self.path.display().to_string(),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Parses spec text; `path` is used in messages and to resolve relative paths.
pub fn parse(text: &str, path: &Path) -> Result<LoadedSpec, SpecError> {
    let spec: Spec = toml::from_str(text).map_err(|e| {
        let (line, column) = e
            .span()
            .map_or((1, 1), |s| keel_config_error::line_column(text, s.start));
        SpecError::Parse {
            path: path.display().to_string(),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    let name = spec.name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "guest".to_string())
    });
    let loaded = LoadedSpec {
        spec,
        path: path.to_path_buf(),
        base,
        name,
    };
    validate(&loaded)?;
    Ok(loaded)
}

/// Reads and parses a spec file.
pub fn load(path: &Path) -> Result<LoadedSpec, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|err| SpecError::Read {
        path: path.display().to_string(),
        err,
    })?;
    parse(&text, path)
}

fn valid_guest_path(p: &str) -> bool {
    p.starts_with('/')
        && p.len() > 1
        && !p.contains('\0')
        && !p.contains('\n')
        && p.split('/').all(|c| c != ".." && c != ".")
}

/// Parses sizes like "64MiB", "1GiB", "4096", "512K".
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Parses an octal mode string like "0755".
pub fn parse_mode(s: &str) -> Option<u32> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8).ok()?;
    (m <= 0o7777).then_some(m)
}

fn validate(l: &LoadedSpec) -> Result<(), SpecError> {
    let s = &l.spec;
    if l.name.is_empty()
        || l.name.len() > 64
        || l.name.starts_with('.')
        || !l
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(l.invalid(
            "name",
            format!(
                "{:?}: expected 1 to 64 characters from A-Z a-z 0-9 _ . -, not starting with \".\"",
                l.name
            ),
        ));
    }
    if s.kernel.path.is_some() && s.kernel.package.is_some() {
        return Err(l.invalid("kernel", "set either `path` or `package`, not both"));
    }
    if s.kernel.modules_dir.is_some() && s.kernel.path.is_none() {
        return Err(l.invalid(
            "kernel.modules_dir",
            "only with `path` (a Debian package brings its own modules)",
        ));
    }
    if let Some(c) = &s.kernel.cmdline {
        if c.contains('\n') {
            return Err(l.invalid("kernel.cmdline", "must be one line"));
        }
    }
    for m in &s.kernel.modules {
        if m.is_empty() || m.contains('/') || m.contains('.') {
            return Err(l.invalid(
                "kernel.modules",
                format!("{m:?}: expected a module name like \"virtio_blk\""),
            ));
        }
    }
    let a = &s.app;
    if a.path.is_none() && a.exec.is_none() {
        return Err(l.invalid(
            "app",
            "set `path` (a host file to include) or `exec` (a guest path to run)",
        ));
    }
    for (f, v) in [("app.dest", &a.dest), ("app.exec", &a.exec)] {
        if let Some(v) = v {
            if !valid_guest_path(v) {
                return Err(l.invalid(f, format!("{v:?}: expected an absolute guest path")));
            }
        }
    }
    for arg in &a.args {
        if arg.contains('\n') {
            return Err(l.invalid("app.args", "arguments cannot contain newlines"));
        }
    }
    for (k, v) in &a.env {
        if k.is_empty() || k.contains('=') || k.contains('\n') || v.contains('\n') {
            return Err(l.invalid(
                "app.env",
                format!("{k:?}: names must be non-empty without '='; no newlines"),
            ));
        }
    }
    for (i, f) in s.files.iter().enumerate() {
        let field = format!("files[{i}]");
        if !valid_guest_path(&f.dest) {
            return Err(l.invalid(
                &format!("{field}.dest"),
                format!("{:?}: expected an absolute guest path", f.dest),
            ));
        }
        match (&f.src, &f.symlink) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => {
                return Err(l.invalid(&field, "set exactly one of `src` and `symlink`"));
            }
        }
        if let Some(m) = &f.mode {
            if parse_mode(m).is_none() {
                return Err(l.invalid(
                    &format!("{field}.mode"),
                    format!("{m:?}: expected an octal mode like \"0644\""),
                ));
            }
        }
    }
    let r = &s.rootfs;
    match r.kind {
        RootfsType::None => {
            if r.dir.is_some()
                || r.tar.is_some()
                || !r.packages.is_empty()
                || r.size.is_some()
                || r.mount.is_some()
            {
                return Err(l.invalid(
                    "rootfs",
                    "`dir`, `tar`, `packages`, `size` and `mount` need a `type`",
                ));
            }
        }
        RootfsType::Ext4 | RootfsType::Erofs => {
            if r.dir.is_none() && r.tar.is_none() && r.packages.is_empty() {
                return Err(l.invalid(
                    "rootfs",
                    "an ext4 or erofs rootfs needs `dir`, `tar` or `packages`",
                ));
            }
        }
    }
    if let Some(sz) = &r.size {
        if parse_size(sz).is_none_or(|n| n == 0) {
            return Err(l.invalid(
                "rootfs.size",
                format!("{sz:?}: expected a size like \"64MiB\""),
            ));
        }
    }
    if let Some(m) = &r.mount {
        if !valid_guest_path(m) {
            return Err(l.invalid("rootfs.mount", format!("{m:?}: expected an absolute path")));
        }
    }
    if let Some(n) = &s.network {
        let ok = n.ip.split_once('/').is_some_and(|(a, p)| {
            a.parse::<Ipv4Addr>().is_ok() && p.parse::<u8>().is_ok_and(|p| p <= 32)
        });
        if !ok {
            return Err(l.invalid("network.ip", format!("{:?}: expected A.B.C.D/PREFIX", n.ip)));
        }
        if let Some(gw) = &n.gw {
            if gw.parse::<Ipv4Addr>().is_err() {
                return Err(l.invalid("network.gw", format!("{gw:?}: expected an IPv4 address")));
            }
        }
        if let Some(mtu) = n.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(l.invalid("network.mtu", format!("{mtu}: expected 68 to 65535")));
            }
        }
    }
    if parse_size(&s.vm.memory).is_none_or(|n| n < 16 << 20) {
        return Err(l.invalid(
            "vm.memory",
            format!("{:?}: expected a size of at least 16MiB", s.vm.memory),
        ));
    }
    if !(1..=254).contains(&s.vm.vcpus) {
        return Err(l.invalid("vm.vcpus", "expected 1 to 254"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_ok() {
        let l = parse(
            "[app]\npath = \"run\"\nargs = [\"-x\"]\n[rootfs]\ntype = \"erofs\"\ndir = \"r\"\n",
            Path::new("dir/web.toml"),
        )
        .unwrap();
        assert_eq!(l.name, "web");
        assert_eq!(l.spec.rootfs.kind, RootfsType::Erofs);
        assert_eq!(l.resolve(Path::new("r")), PathBuf::from("dir/r"));
    }

    #[test]
    fn unknown_key_has_position() {
        let e = parse("[app]\npath = \"x\"\nbogus = 1\n", Path::new("s.toml")).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("s.toml:3:1: unknown field `bogus`"),
            "{msg}"
        );
    }

    #[test]
    fn sizes_and_modes() {
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("1TB"), None);
        assert_eq!(parse_mode("0755"), Some(0o755));
        assert_eq!(parse_mode("9"), None);
    }
}
