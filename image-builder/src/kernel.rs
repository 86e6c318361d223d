//! Finding the kernel: a Debian package (downloaded once into a cache with
//! `apt-get download`, unpacked with `dpkg-deb -x`) or a local file.

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// Default Debian kernel package.
pub const DEFAULT_PACKAGE: &str = "linux-image-cloud-amd64";

/// Errors finding the kernel.
#[derive(Debug, Error)]
pub enum KernelError {
    /// apt-cache does not know the package.
    #[error("{what} {package} not found in apt's package lists ({detail}); check the name or run apt-get update")]
    UnknownPackage {
        /// Which kind of package.
        what: &'static str,
        /// Package name.
        package: String,
        /// apt-cache output.
        detail: String,
    },
    /// A tool failed.
    #[error("{tool} failed for {what}: {detail}")]
    Tool {
        /// Tool name.
        tool: &'static str,
        /// What it was doing.
        what: String,
        /// Its stderr or the spawn error.
        detail: String,
    },
    /// The package contents are not what a kernel package holds.
    #[error("{0}")]
    Layout(String),
    /// A local kernel file is missing.
    #[error("kernel {path}: {err}")]
    Local {
        /// Path.
        path: String,
        /// The error.
        err: std::io::Error,
    },
    /// Cache I/O.
    #[error("kernel cache {path}: {err}")]
    Cache {
        /// Path.
        path: String,
        /// The error.
        err: std::io::Error,
    },
}

/// A kernel ready to copy into an image.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The bootable image (bzImage or vmlinux).
    pub image: PathBuf,
    /// `lib/modules/VERSION`, if known.
    pub modules_dir: Option<PathBuf>,
    /// Where it came from, for the manifest (package=version or a path).
    pub source: String,
}

pub(crate) fn run_tool(
    cmd: &mut Command,
    tool: &'static str,
    what: &str,
) -> Result<String, KernelError> {
    let out = cmd.output().map_err(|e| KernelError::Tool {
        tool,
        what: what.to_string(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let detail = err
            .lines()
            .rfind(|l| !l.trim().is_empty() && !l.starts_with("W:"))
            .unwrap_or("no output")
            .trim()
            .to_string();
        return Err(KernelError::Tool {
            tool,
            what: what.to_string(),
            detail: format!("{detail} ({})", out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `(version, depends)` of the candidate version of a package, from apt-cache.
fn apt_show(package: &str, what: &'static str) -> Result<(String, String), KernelError> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .output()
        .map_err(|e| KernelError::Tool {
            tool: "apt-cache",
            what: package.to_string(),
            detail: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    match field("Version:") {
        Some(v) if out.status.success() => Ok((v, field("Depends:").unwrap_or_default())),
        _ => Err(KernelError::UnknownPackage {
            what,
            package: package.to_string(),
            detail: String::from_utf8_lossy(&out.stderr)
                .lines()
                .find(|l| l.starts_with("E:") || l.starts_with("N:"))
                .unwrap_or("no such package")
                .to_string(),
        }),
    }
}

/// Resolves a Debian kernel package (following a meta package such as
/// `linux-image-cloud-amd64` to the real one), downloading and unpacking it into
/// `cache` if it is not there yet.
pub fn from_debian(package: &str, cache: &Path) -> Result<Kernel, KernelError> {
    let (mut version, depends) = apt_show(package, "kernel package")?;
    let mut real = package.to_string();
    // A meta package depends on exactly the versioned image package.
    if let Some(dep) = depends
        .split(',')
        .map(|d| d.trim())
        .find(|d| d.starts_with("linux-image-"))
    {
        real = dep.split_whitespace().next().unwrap_or(dep).to_string();
        version = apt_show(&real, "kernel package")?.0;
    }
    let dir = cache.join(format!("{real}_{version}"));
    let root = dir.join("root");
    if !root.is_dir() {
        fetch(&real, &version, &dir)?;
    }
    let boot = root.join("boot");
    let image = std::fs::read_dir(&boot)
        .map_err(|err| KernelError::Cache {
            path: boot.display().to_string(),
            err,
        })?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") || n.starts_with("vmlinux-"))
        })
        .ok_or_else(|| {
            KernelError::Layout(format!(
                "package {real} has no /boot/vmlinuz-*: is it a kernel image package?"
            ))
        })?;
    let kver = image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split_once('-'))
        .map(|(_, v)| v.to_string())
        .unwrap_or_default();
    let modules_dir = root.join("lib/modules").join(&kver);
    Ok(Kernel {
        image,
        modules_dir: modules_dir.is_dir().then_some(modules_dir),
        source: format!("debian:{real}={version}"),
    })
}

fn fetch(package: &str, version: &str, dir: &Path) -> Result<(), KernelError> {
    let cache_err = |path: &Path, err| KernelError::Cache {
        path: path.display().to_string(),
        err,
    };
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| cache_err(&tmp, e))?;
    let result = (|| {
        log::info!("downloading {package}={version}");
        run_tool(
            Command::new("apt-get")
                .args(["download", "-q", &format!("{package}={version}")])
                .current_dir(&tmp),
            "apt-get download",
            package,
        )?;
        let deb = std::fs::read_dir(&tmp)
            .map_err(|e| cache_err(&tmp, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| {
                KernelError::Layout(format!("apt-get download {package} left no .deb"))
            })?;
        run_tool(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(tmp.join("root")),
            "dpkg-deb -x",
            package,
        )?;
        std::fs::remove_file(&deb).map_err(|e| cache_err(&deb, e))?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&tmp, dir).map_err(|e| cache_err(dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Unpacks the candidate version of a Debian package into `dest` (no dependencies,
/// no maintainer scripts), downloading the .deb into `cache` once. Returns
/// `package=version`.
pub fn unpack_deb(package: &str, cache: &Path, dest: &Path) -> Result<String, KernelError> {
    let (version, _) = apt_show(package, "rootfs package")?;
    let dir = cache.join(format!("{package}_{version}"));
    let cache_err = |path: &Path, err| KernelError::Cache {
        path: path.display().to_string(),
        err,
    };
    let find_deb = |d: &Path| -> Option<PathBuf> {
        std::fs::read_dir(d)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
    };
    let deb = match find_deb(&dir) {
        Some(deb) => deb,
        None => {
            let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| cache_err(&tmp, e))?;
            log::info!("downloading {package}={version}");
            let got = run_tool(
                Command::new("apt-get")
                    .args(["download", "-q", &format!("{package}={version}")])
                    .current_dir(&tmp),
                "apt-get download",
                package,
            );
            if let Err(e) = got {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).map_err(|e| cache_err(&dir, e))?;
            find_deb(&dir).ok_or_else(|| {
                KernelError::Layout(format!("apt-get download {package} left no .deb"))
            })?
        }
    };
    run_tool(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dest),
        "dpkg-deb -x",
        package,
    )?;
    Ok(format!("{package}={version}"))
}

/// A local kernel file, with optional modules directory.
pub fn local(image: &Path, modules_dir: Option<&Path>) -> Result<Kernel, KernelError> {
    let meta = std::fs::metadata(image).map_err(|err| KernelError::Local {
        path: image.display().to_string(),
        err,
    })?;
    if !meta.is_file() {
        return Err(KernelError::Layout(format!(
            "kernel {} is not a file",
            image.display()
        )));
    }
    if let Some(m) = modules_dir {
        if !m.is_dir() {
            return Err(KernelError::Layout(format!(
                "kernel modules_dir {} is not a directory",
                m.display()
            )));
        }
    }
    Ok(Kernel {
        image: image.to_path_buf(),
        modules_dir: modules_dir.map(Path::to_path_buf),
        source: format!("file:{}", image.display()),
    })
}
