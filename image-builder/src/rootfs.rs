//! Root file system images from a directory: ext4 (`mkfs.ext4 -d`, then `debugfs`
//! to pin the times and owners mkfs takes from the host) or EROFS (`mkfs.erofs`).
//! The source is first copied into a staging tree with every timestamp set to
//! SOURCE_DATE_EPOCH, so identical inputs give identical images.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::spec::RootfsType;

/// Errors building a rootfs image.
#[derive(Debug, Error)]
pub enum RootfsError {
    /// I/O on the source or staging tree.
    #[error("rootfs {path}: {err}")]
    Io {
        /// Path.
        path: String,
        /// The error.
        err: std::io::Error,
    },
    /// A file type an image cannot hold here.
    #[error("rootfs {0}: only regular files, directories and symlinks are supported")]
    Unsupported(String),
    /// A path debugfs cannot take.
    #[error("rootfs {0}: file names with '\"' or newlines are not supported for ext4")]
    BadName(String),
    /// The content does not fit the size limit.
    #[error("rootfs content needs about {needed} bytes, more than its size limit of {limit} bytes (rootfs.size)")]
    TooBig {
        /// Bytes needed (estimate or actual image size).
        needed: u64,
        /// The limit.
        limit: u64,
    },
    /// A tool failed.
    #[error("{tool}: {detail}")]
    Tool {
        /// Tool.
        tool: &'static str,
        /// Its stderr or the spawn error.
        detail: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError + '_ {
    move |err| RootfsError::Io {
        path: path.display().to_string(),
        err,
    }
}

/// Copies `src` into the new or empty directory `dst`, keeping permission bits and
/// symlinks. Returns the relative paths copied (sorted) and an estimate of the bytes
/// an image needs.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<(Vec<PathBuf>, u64), RootfsError> {
    std::fs::create_dir_all(dst).map_err(io_err(dst))?;
    let mut paths = Vec::new();
    let mut bytes = 4096u64;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = src.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let r = rel.join(&name);
            let (from, to) = (src.join(&r), dst.join(&r));
            let meta = std::fs::symlink_metadata(&from).map_err(io_err(&from))?;
            let ft = meta.file_type();
            bytes += 4096;
            if ft.is_dir() {
                std::fs::create_dir(&to).map_err(io_err(&to))?;
                std::fs::set_permissions(
                    &to,
                    std::fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
                )
                .map_err(io_err(&to))?;
                subdirs.push(r.clone());
            } else if ft.is_file() {
                std::fs::copy(&from, &to).map_err(io_err(&from))?;
                bytes += meta.len().div_ceil(4096) * 4096;
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&from).map_err(io_err(&from))?;
                std::os::unix::fs::symlink(&target, &to).map_err(io_err(&to))?;
            } else {
                return Err(RootfsError::Unsupported(from.display().to_string()));
            }
            paths.push(r);
        }
        // Pop in sorted order.
        stack.extend(subdirs.into_iter().rev());
    }
    paths.sort();
    Ok((paths, bytes))
}

/// `copy_tree` plus every timestamp set to SOURCE_DATE_EPOCH.
fn stage(src: &Path, dst: &Path) -> Result<(Vec<PathBuf>, u64), RootfsError> {
    let (paths, bytes) = copy_tree(src, dst)?;
    // Children first, so setting a directory's times is not undone by its entries.
    for rel in paths.iter().rev() {
        set_times(&dst.join(rel))?;
    }
    set_times(dst)?;
    Ok((paths, bytes))
}

fn set_times(path: &Path) -> Result<(), RootfsError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| RootfsError::Unsupported(path.display().to_string()))?;
    let epoch = crate::source_date_epoch();
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(epoch).unwrap_or(0),
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: valid NUL-terminated path and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(RootfsError::Io {
            path: path.display().to_string(),
            err: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn run(cmd: &mut Command, tool: &'static str) -> Result<String, RootfsError> {
    let out = cmd.output().map_err(|e| RootfsError::Tool {
        tool,
        detail: format!("cannot run it: {e} (install e2fsprogs / erofs-utils)"),
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(RootfsError::Tool {
            tool,
            detail: format!("{} ({})", stderr.trim(), out.status),
        });
    }
    Ok(stderr)
}

/// Formats a 16-byte UUID.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Builds `out` from `src`. `size` is the ext4 image size (default: fitted to the
/// content) or the EROFS upper limit. Returns the image size.
pub fn build(
    kind: RootfsType,
    src: &Path,
    staging: &Path,
    out: &Path,
    size: Option<u64>,
    uuid: &[u8; 16],
) -> Result<u64, RootfsError> {
    let meta = std::fs::metadata(src).map_err(io_err(src))?;
    if !meta.is_dir() {
        return Err(RootfsError::Io {
            path: src.display().to_string(),
            err: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let (paths, needed) = stage(src, staging)?;
    let epoch = crate::source_date_epoch();
    let uuid_s = format_uuid(uuid);
    match kind {
        RootfsType::None => return Ok(0),
        RootfsType::Ext4 => {
            // Metadata (inode tables, journal) on top of the content estimate.
            let auto = (needed + needed / 4 + (8 << 20)).div_ceil(1 << 20) * (1 << 20);
            let img_size = size.unwrap_or(auto);
            if needed > img_size {
                return Err(RootfsError::TooBig {
                    needed,
                    limit: img_size,
                });
            }
            // mke2fs treats a fake time of 0 as unset.
            let fake = epoch.max(1).to_string();
            let mkfs = Command::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-t",
                    "ext4",
                    "-m",
                    "0",
                    "-U",
                    &uuid_s,
                    "-L",
                    "keel-root",
                ])
                .arg("-E")
                .arg(format!("root_owner=0:0,hash_seed={uuid_s}"))
                .arg("-d")
                .arg(staging)
                .arg(out)
                .arg(format!("{}k", img_size / 1024))
                .env("E2FSPROGS_FAKE_TIME", &fake)
                .output()
                .map_err(|e| RootfsError::Tool {
                    tool: "mkfs.ext4",
                    detail: format!("cannot run it: {e} (install e2fsprogs)"),
                })?;
            if !mkfs.status.success() {
                let err = String::from_utf8_lossy(&mkfs.stderr);
                if err.contains("Could not allocate") || err.contains("No space") {
                    return Err(RootfsError::TooBig {
                        needed,
                        limit: img_size,
                    });
                }
                return Err(RootfsError::Tool {
                    tool: "mkfs.ext4",
                    detail: err.trim().to_string(),
                });
            }
            // mkfs.ext4 -d copies ctime and owners from the staging tree: pin them.
            let mut script = String::new();
            let all = ["/".to_string(), "/lost+found".to_string()]
                .into_iter()
                .chain(paths.iter().map(|p| format!("/{}", p.display())));
            for p in all {
                if p.contains('"') || p.contains('\n') {
                    return Err(RootfsError::BadName(p));
                }
                for (field, value) in [
                    ("ctime", format!("@{epoch}")),
                    ("crtime", format!("@{epoch}")),
                    ("atime", format!("@{epoch}")),
                    ("mtime", format!("@{epoch}")),
                    ("uid", "0".to_string()),
                    ("gid", "0".to_string()),
                ] {
                    script.push_str(&format!("sif \"{p}\" {field} {value}\n"));
                }
            }
            let script_path = staging.with_extension("debugfs");
            std::fs::write(&script_path, script).map_err(io_err(&script_path))?;
            let stderr = run(
                Command::new("debugfs")
                    .arg("-w")
                    .arg("-f")
                    .arg(&script_path)
                    .arg(out)
                    .env("E2FSPROGS_FAKE_TIME", &fake),
                "debugfs",
            )?;
            let _ = std::fs::remove_file(&script_path);
            if let Some(line) = stderr
                .lines()
                .find(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
            {
                return Err(RootfsError::Tool {
                    tool: "debugfs",
                    detail: line.to_string(),
                });
            }
        }
        RootfsType::Erofs => {
            run(
                Command::new("mkfs.erofs")
                    .arg(format!("-T{epoch}"))
                    .arg(format!("-U{uuid_s}"))
                    .arg("--all-root")
                    .arg("-x-1")
                    .arg("--quiet")
                    .arg(out)
                    .arg(staging),
                "mkfs.erofs",
            )?;
        }
    }
    let len = std::fs::metadata(out).map_err(io_err(out))?.len();
    if let Some(limit) = size {
        if len > limit {
            return Err(RootfsError::TooBig { needed: len, limit });
        }
    }
    Ok(len)
}
