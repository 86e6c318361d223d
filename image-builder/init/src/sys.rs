//! Thin wrappers over the system calls PID 1 needs: mount, module loading, power-off.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Errors of the system-call wrappers.
#[derive(Debug, Error)]
pub enum SysError {
    /// A path or string with a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    /// mount(2) failed.
    #[error("mount {fstype} {device} on {target}: {err}")]
    Mount {
        /// File system type.
        fstype: String,
        /// Source device.
        device: String,
        /// Mount point.
        target: String,
        /// The error.
        err: io::Error,
    },
    /// A module could not be opened or loaded.
    #[error("load module {path}: {err}")]
    Module {
        /// Module file.
        path: String,
        /// The error.
        err: io::Error,
    },
    /// A device did not show up in time.
    #[error("{path} did not appear within {ms} ms (is its driver module listed?)")]
    Timeout {
        /// Device path.
        path: String,
        /// How long we waited.
        ms: u128,
    },
    /// Creating a mount point failed.
    #[error("create {path}: {err}")]
    Mkdir {
        /// Directory.
        path: String,
        /// The error.
        err: io::Error,
    },
}

fn cstr(s: &str) -> Result<CString, SysError> {
    CString::new(s).map_err(|_| SysError::Nul(s.to_string()))
}

/// Mounts `source` on `target` (created if missing). `EBUSY` (already mounted) is
/// accepted when `allow_busy` is set.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    allow_busy: bool,
) -> Result<(), SysError> {
    std::fs::create_dir_all(target).map_err(|err| SysError::Mkdir {
        path: target.to_string(),
        err,
    })?;
    let (c_src, c_tgt, c_fs) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call;
    // a null data pointer is allowed.
    let rc = unsafe {
        libc::mount(
            c_src.as_ptr(),
            c_tgt.as_ptr(),
            c_fs.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if allow_busy && err.raw_os_error() == Some(libc::EBUSY) {
            return Ok(());
        }
        return Err(SysError::Mount {
            fstype: fstype.to_string(),
            device: source.to_string(),
            target: target.to_string(),
            err,
        });
    }
    Ok(())
}

/// Loads one module file with finit_module(2). A module that is already loaded
/// (`EEXIST`) is fine.
pub fn load_module(path: &str) -> Result<(), SysError> {
    let file = File::open(path).map_err(|err| SysError::Module {
        path: path.to_string(),
        err,
    })?;
    let params = c"";
    // SAFETY: the fd is open for the duration of the call and `params` is a valid
    // NUL-terminated string; finit_module does not retain either.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(SysError::Module {
                path: path.to_string(),
                err,
            });
        }
    }
    Ok(())
}

/// Waits until `path` exists, polling.
pub fn wait_for(path: &str, timeout: Duration) -> Result<(), SysError> {
    let start = Instant::now();
    while !Path::new(path).exists() {
        if start.elapsed() > timeout {
            return Err(SysError::Timeout {
                path: path.to_string(),
                ms: timeout.as_millis(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Makes sure fds 0, 1 and 2 are the console (the kernel opens them for init only
/// when the initramfs has `/dev/console`).
pub fn ensure_console() {
    // SAFETY: F_GETFD on fd 1 only queries flags.
    let ok = unsafe { libc::fcntl(1, libc::F_GETFD) } >= 0;
    if ok {
        return;
    }
    let path = c"/dev/console";
    // SAFETY: valid NUL-terminated path; the returned fd is checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return;
    }
    for target in 0..3 {
        if fd != target {
            // SAFETY: dup2 onto the standard fds; both are plain integers.
            unsafe { libc::dup2(fd, target) };
        }
    }
    if fd > 2 {
        // SAFETY: fd was returned by open above and is not used afterwards.
        unsafe { libc::close(fd) };
    }
}

/// Seconds on CLOCK_MONOTONIC as a `Duration` (the time since boot, without suspend).
pub fn monotonic() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Flushes file systems and powers the machine off (or, without ACPI, restarts it,
/// which keel-vmm with `reboot=k` and QEMU with `-no-reboot` treat as the end).
/// Never returns when running as PID 1.
pub fn power_off() -> ! {
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() };
    let cmd = if Path::new("/sys/firmware/acpi").exists() {
        libc::RB_POWER_OFF
    } else {
        libc::RB_AUTOBOOT
    };
    // SAFETY: reboot with a valid command; on success it does not return.
    unsafe { libc::reboot(cmd) };
    // SAFETY: as above, as a fallback when the first command did not stop the machine.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        // SAFETY: pause just sleeps until a signal arrives.
        unsafe { libc::pause() };
    }
}
