//! `keel-image build`: spec → kernel, initramfs, rootfs, sandbox snippet and manifest,
//! written to a temp dir next to the output and renamed into place at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::cpio::{Archive, CpioError, Node};
use crate::kernel::{self, KernelError};
use crate::modules::{Index, ModuleError};
use crate::rootfs::{self, RootfsError};
use crate::spec::{self, LoadedSpec, RootfsType, SpecError};

/// Errors of a build.
#[derive(Debug, Error)]
pub enum BuildError {
    /// Bad spec.
    #[error("{0}")]
    Spec(#[from] SpecError),
    /// Kernel not found or not fetched.
    #[error("{0}")]
    Kernel(#[from] KernelError),
    /// Module problems.
    #[error("{0}")]
    Module(#[from] ModuleError),
    /// Initramfs assembly.
    #[error("{0}")]
    Cpio(#[from] CpioError),
    /// Rootfs image.
    #[error("{0}")]
    Rootfs(#[from] RootfsError),
    /// An input file the spec names.
    #[error("{what} {path}: {err}")]
    Input {
        /// Which input.
        what: String,
        /// Path.
        path: String,
        /// The error.
        err: std::io::Error,
    },
    /// Writing the output.
    #[error("output {path}: {err}")]
    Output {
        /// Path.
        path: String,
        /// The error.
        err: std::io::Error,
    },
    /// The init binary is missing or unusable.
    #[error("{0}")]
    Init(String),
    /// The output directory exists and is not ours to replace.
    #[error("refusing to replace {0}: it exists and has no manifest.json from keel-image")]
    NotOurs(String),
}

/// What to build and where.
#[derive(Debug, Clone)]
pub struct Options {
    /// Spec file.
    pub spec: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// Download cache (Debian kernels).
    pub cache: PathBuf,
    /// keel-init binary, if not in the spec.
    pub init: Option<PathBuf>,
}

/// One output file in the manifest.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FileEntry {
    /// File name in the output directory.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Hex SHA-256.
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    /// Sandbox name.
    pub name: String,
    /// Timestamp used for every file.
    pub source_date_epoch: u64,
    /// Kernel origin.
    pub kernel: String,
    /// Modules in load order.
    pub modules: Vec<String>,
    /// Kernel command line of the sandbox snippet.
    pub cmdline: String,
    /// Root file system type.
    pub rootfs: String,
    /// Debian packages unpacked into the rootfs (`name=version`).
    pub rootfs_packages: Vec<String>,
    /// Output files.
    pub files: Vec<FileEntry>,
}

const INIT_CONF: &str = "/etc/keel/init.conf";
const ROOT_DEVICE: &str = "/dev/vda";
const DEFAULT_ROOTMOUNT: &str = "/rootfs";

fn input_err<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BuildError + 'a {
    move |err| BuildError::Input {
        what: what.to_string(),
        path: path.display().to_string(),
        err,
    }
}

fn out_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |err| BuildError::Output {
        path: path.display().to_string(),
        err,
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Normalized mode of a file: 0755 if any execute bit is set, else 0644.
fn normal_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// Whether an ELF file is statically linked (has no PT_INTERP program header).
fn is_static_elf(data: &[u8]) -> Result<bool, &'static str> {
    if data.get(..4) != Some(b"\x7fELF") || data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF executable");
    }
    let rd = |off: usize, n: usize| -> Option<u64> {
        let b = data.get(off..off.checked_add(n)?)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    };
    let phoff = rd(0x20, 8).ok_or("truncated ELF header")? as usize;
    let phentsize = rd(0x36, 2).ok_or("truncated ELF header")? as usize;
    let phnum = rd(0x38, 2).ok_or("truncated ELF header")? as usize;
    for i in 0..phnum {
        let off = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or("bad program headers")?;
        if rd(off, 4).ok_or("truncated program headers")? == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Finds the keel-init binary: the spec, `--init`, `$KEEL_INIT`, or next to this
/// executable (also in the musl target directory of the same cargo target dir).
fn find_init(l: &LoadedSpec, opt: Option<&Path>) -> Result<PathBuf, BuildError> {
    if let Some(p) = &l.spec.init.path {
        return Ok(l.resolve(p));
    }
    if let Some(p) = opt {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("KEEL_INIT") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join("keel-init"));
        // target/{debug,release}/keel-image → target/x86_64-unknown-linux-musl/release/keel-init
        for base in [dir.parent(), dir.parent().and_then(Path::parent)]
            .into_iter()
            .flatten()
        {
            candidates.push(base.join("x86_64-unknown-linux-musl/release/keel-init"));
        }
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        BuildError::Init(
            "keel-init not found: build it with `cargo build --release -p keel-init --target x86_64-unknown-linux-musl`, then pass --init PATH, set KEEL_INIT, or set [init] path in the spec".into(),
        )
    })
}

fn add_host_tree(
    archive: &mut Archive,
    src: &Path,
    dest: &str,
    mode: Option<u32>,
    what: &str,
) -> Result<(), BuildError> {
    let meta = std::fs::symlink_metadata(src).map_err(input_err(what, src))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(src).map_err(input_err(what, src))?;
        archive.add(dest, Node::Symlink(target.to_string_lossy().into_owned()))?;
    } else if ft.is_dir() {
        archive.add_dir(dest)?;
        let mut names: Vec<_> = std::fs::read_dir(src)
            .map_err(input_err(what, src))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for n in names {
            let child_dest = format!("{}/{}", dest.trim_end_matches('/'), n.to_string_lossy());
            add_host_tree(archive, &src.join(&n), &child_dest, mode, what)?;
        }
    } else if ft.is_file() {
        let data = std::fs::read(src).map_err(input_err(what, src))?;
        let mode = mode.unwrap_or_else(|| normal_mode(&meta));
        archive.add(dest, Node::File { data, mode })?;
    } else {
        return Err(BuildError::Input {
            what: what.to_string(),
            path: src.display().to_string(),
            err: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "only files, directories and symlinks can go into the initramfs",
            ),
        });
    }
    Ok(())
}

/// Removes a directory on drop unless disarmed.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Runs a build; on error nothing is left at `opts.out` that was not there before.
pub fn build(opts: &Options) -> Result<Manifest, BuildError> {
    let l = spec::load(&opts.spec)?;
    let s = &l.spec;
    let epoch = crate::source_date_epoch();
    let mtime = u32::try_from(epoch).unwrap_or(u32::MAX);

    // Cheap checks first: init, app, files.
    let init_path = find_init(&l, opts.init.as_deref())?;
    let init = std::fs::read(&init_path).map_err(input_err("init", &init_path))?;
    match is_static_elf(&init) {
        Ok(true) => {}
        Ok(false) => {
            return Err(BuildError::Init(format!(
                "init {} is dynamically linked; it must be static (build for x86_64-unknown-linux-musl)",
                init_path.display()
            )))
        }
        Err(e) => return Err(BuildError::Init(format!("init {}: {e}", init_path.display()))),
    }

    let mut archive = Archive::default();
    for d in ["/dev", "/proc", "/sys", "/tmp", "/run", "/etc/keel"] {
        archive.add_dir(d)?;
    }
    archive.add(
        "/dev/console",
        Node::CharDev {
            major: 5,
            minor: 1,
            mode: 0o600,
        },
    )?;
    archive.add(
        "/init",
        Node::File {
            data: init,
            mode: 0o755,
        },
    )?;

    let exec = match (&s.app.path, &s.app.dest, &s.app.exec) {
        (Some(p), dest, exec) => {
            let host = l.resolve(p);
            let file_name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "app".into());
            let dest = dest.clone().unwrap_or_else(|| format!("/app/{file_name}"));
            let meta = std::fs::metadata(&host).map_err(input_err("application", &host))?;
            if !meta.is_file() {
                return Err(BuildError::Input {
                    what: "application".into(),
                    path: host.display().to_string(),
                    err: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file"),
                });
            }
            let data = std::fs::read(&host).map_err(input_err("application", &host))?;
            archive.add(&dest, Node::File { data, mode: 0o755 })?;
            exec.clone().unwrap_or(dest)
        }
        (None, _, Some(exec)) => exec.clone(),
        (None, _, None) => unreachable_app(),
    };
    for f in &s.files {
        match (&f.src, &f.symlink) {
            (Some(src), _) => {
                let mode = f.mode.as_deref().and_then(spec::parse_mode);
                add_host_tree(&mut archive, &l.resolve(src), &f.dest, mode, "file")?;
            }
            (None, Some(target)) => archive.add(&f.dest, Node::Symlink(target.clone()))?,
            (None, None) => {}
        }
    }

    // Kernel and modules.
    let kern = match &s.kernel.path {
        Some(p) => {
            let mut k = kernel::local(
                &l.resolve(p),
                s.kernel
                    .modules_dir
                    .as_ref()
                    .map(|m| l.resolve(m))
                    .as_deref(),
            )?;
            k.source = format!("file:{}", p.display());
            k
        }
        None => {
            let pkg = s
                .kernel
                .package
                .as_deref()
                .unwrap_or(kernel::DEFAULT_PACKAGE);
            kernel::from_debian(pkg, &opts.cache.join("debian"))?
        }
    };
    let mut wanted = s.kernel.modules.clone();
    let mut implied = Vec::new();
    if s.rootfs.kind != RootfsType::None {
        implied.extend(["virtio_pci", "virtio_blk"]);
    }
    if s.rootfs.kind == RootfsType::Erofs {
        implied.push("erofs");
    }
    if s.network.is_some() {
        implied.extend(["virtio_pci", "virtio_net"]);
    }
    let modules = match &kern.modules_dir {
        Some(dir) => {
            let idx = Index::scan(dir)?;
            for m in implied {
                if !wanted.iter().any(|w| w == m) {
                    wanted.push(m.to_string());
                }
            }
            idx.resolve(&wanted)?
        }
        None if wanted.is_empty() => Vec::new(),
        None => return Err(ModuleError::NoModulesDir(wanted).into()),
    };
    let mut conf = String::from("# written by keel-image; keel.* kernel parameters override it\n");
    conf.push_str(&format!("app={exec}\n"));
    for a in &s.app.args {
        conf.push_str(&format!("arg={a}\n"));
    }
    for (k, v) in &s.app.env {
        conf.push_str(&format!("env={k}={v}\n"));
    }
    for m in &modules {
        let path = format!("/lib/modules/{}.ko", m.name);
        archive.add(
            &path,
            Node::File {
                data: m.data.clone(),
                mode: 0o644,
            },
        )?;
        conf.push_str(&format!("module={path}\n"));
    }
    if let Some(n) = &s.network {
        conf.push_str(&format!("ip={}\n", n.ip));
        if let Some(gw) = &n.gw {
            conf.push_str(&format!("gw={gw}\n"));
        }
        if let Some(mtu) = n.mtu {
            conf.push_str(&format!("mtu={mtu}\n"));
        }
    }
    let rootmount = s
        .rootfs
        .mount
        .clone()
        .unwrap_or_else(|| DEFAULT_ROOTMOUNT.to_string());
    if s.rootfs.kind != RootfsType::None {
        conf.push_str(&format!(
            "root={ROOT_DEVICE}\nrootfstype={}\nrootmount={rootmount}\nrootflags={}\n",
            s.rootfs.kind.fstype(),
            if s.rootfs.read_only || s.rootfs.kind == RootfsType::Erofs {
                "ro"
            } else {
                "rw"
            }
        ));
        archive.add_dir(&rootmount)?;
    }
    archive.add(
        INIT_CONF,
        Node::File {
            data: conf.into_bytes(),
            mode: 0o644,
        },
    )?;

    // Output, into a temp dir next to --out.
    let out = &opts.out;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    std::fs::create_dir_all(&parent).map_err(out_err(&parent))?;
    let out_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    if out.exists() && !out.join("manifest.json").is_file() {
        return Err(BuildError::NotOurs(out.display().to_string()));
    }
    let tmp = parent.join(format!(".{out_name}.keel-image-tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(out_err(&tmp))?;
    let mut guard = TempDir(Some(tmp.clone()));

    let mut written: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let kernel_data = std::fs::read(&kern.image).map_err(input_err("kernel", &kern.image))?;
    let kernel_name = if kernel_data.starts_with(b"\x7fELF") {
        "vmlinux"
    } else {
        "vmlinuz"
    };
    written.insert(kernel_name.into(), kernel_data);
    written.insert("initramfs.cpio.gz".into(), archive.to_gzip(mtime)?);

    let mut rootfs_size = None;
    let mut rootfs_packages = Vec::new();
    if s.rootfs.kind != RootfsType::None {
        let r = &s.rootfs;
        let dir = match (&r.dir, &r.tar, r.packages.is_empty()) {
            (Some(d), None, true) => l.resolve(d),
            _ => {
                let merged = tmp.join(".rootfs-src");
                std::fs::create_dir(&merged).map_err(out_err(&merged))?;
                if let Some(d) = &r.dir {
                    rootfs::copy_tree(&l.resolve(d), &merged)?;
                }
                if let Some(t) = &r.tar {
                    let t = l.resolve(t);
                    kernel::run_tool(
                        std::process::Command::new("tar")
                            .arg("-xf")
                            .arg(&t)
                            .arg("-C")
                            .arg(&merged)
                            .args(["--no-same-owner", "--delay-directory-restore"]),
                        "tar",
                        &t.display().to_string(),
                    )?;
                }
                for p in &r.packages {
                    let got = kernel::unpack_deb(p, &opts.cache.join("debs"), &merged)?;
                    rootfs_packages.push(got);
                }
                merged
            }
        };
        let limit = s.rootfs.size.as_deref().and_then(spec::parse_size);
        let uuid_hash = Sha256::digest(format!("keel-image rootfs {}", l.name).as_bytes());
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&uuid_hash[..16]);
        uuid[6] = (uuid[6] & 0x0f) | 0x40;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        let img = tmp.join("rootfs.img");
        let staging = tmp.join(".staging");
        rootfs_size = Some(rootfs::build(
            s.rootfs.kind,
            &dir,
            &staging,
            &img,
            limit,
            &uuid,
        )?);
        let _ = std::fs::remove_dir_all(&staging);
        let _ = std::fs::remove_dir_all(tmp.join(".rootfs-src"));
    }

    let mut cmdline = String::from("console=ttyS0 reboot=k panic=-1 quiet");
    if let Some(extra) = &s.kernel.cmdline {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    let mut sandbox = format!(
        "# Sandbox for keel-vmm, generated by keel-image from {spec}.\n\
         # Copy it with the image files (paths are relative to this file).\n\n\
         name = \"{name}\"\n\n[vcpus]\ncount = {vcpus}\n\n[memory]\nsize = \"{mem}\"\n\n\
         [boot]\nkernel = \"{kernel_name}\"\ninitramfs = \"initramfs.cpio.gz\"\ncmdline = \"{cmdline}\"\n",
        spec = opts.spec.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        name = l.name,
        vcpus = s.vm.vcpus,
        mem = s.vm.memory,
    );
    if s.rootfs.kind != RootfsType::None {
        sandbox.push_str(&format!(
            "\n# The root file system is the first disk (/dev/vda): serve rootfs.img with\n\
             # keel-vhost-blk (keel-vhost-blk@{name}-root.service) on this socket.\n\
             [[disk]]\nid = \"root\"\nsocket = \"/run/keel/blk/{name}-root/vhost.sock\"\nread_only = {ro}\n",
            name = l.name,
            ro = s.rootfs.read_only || s.rootfs.kind == RootfsType::Erofs,
        ));
    }
    if s.network.is_some() {
        sandbox.push_str(&format!(
            "\n# The first network interface gets the spec's address: connect it to a switch.\n\
             [[net]]\nid = \"net0\"\nsocket = \"/run/keel/net/sw0/{name}-net0.sock\"\nmac = \"52:54:00:00:00:01\"\n",
            name = l.name,
        ));
    }
    written.insert("sandbox.toml".into(), sandbox.into_bytes());

    let mut files = Vec::new();
    for (name, data) in &written {
        let p = tmp.join(name);
        std::fs::write(&p, data).map_err(out_err(&p))?;
        files.push(FileEntry {
            name: name.clone(),
            size: data.len() as u64,
            sha256: sha256_hex(data),
        });
    }
    if let Some(size) = rootfs_size {
        let p = tmp.join("rootfs.img");
        let data = std::fs::read(&p).map_err(out_err(&p))?;
        files.push(FileEntry {
            name: "rootfs.img".into(),
            size,
            sha256: sha256_hex(&data),
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let manifest = Manifest {
        name: l.name.clone(),
        source_date_epoch: epoch,
        kernel: kern.source.clone(),
        modules: modules.iter().map(|m| m.name.clone()).collect(),
        cmdline,
        rootfs: s.rootfs.kind.fstype().into(),
        rootfs_packages,
        files,
    };
    let json = serde_json::to_string_pretty(&manifest)
        .map_err(|e| out_err(&tmp)(std::io::Error::other(e)))?;
    let mp = tmp.join("manifest.json");
    std::fs::write(&mp, json + "\n").map_err(out_err(&mp))?;

    // Swap into place.
    let old = parent.join(format!(".{out_name}.keel-image-old-{}", std::process::id()));
    let had_old = out.exists();
    if had_old {
        std::fs::rename(out, &old).map_err(out_err(out))?;
    }
    if let Err(e) = std::fs::rename(&tmp, out) {
        if had_old {
            let _ = std::fs::rename(&old, out);
        }
        return Err(out_err(out)(e));
    }
    guard.0 = None;
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(manifest)
}

/// `spec::validate` guarantees `app.path` or `app.exec`.
fn unreachable_app() -> String {
    "/app".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_detection() {
        assert!(is_static_elf(b"nope").is_err());
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries on the gnu target are dynamically linked.
        assert_eq!(is_static_elf(&exe), Ok(false));
    }
}
