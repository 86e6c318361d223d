//! keel-init: the guest's PID 1.
//!
//! Mounts /proc, /sys and /dev; reads `/etc/keel/init.conf` and the `keel.*` kernel
//! parameters; loads kernel modules; configures IPv4 on one interface; mounts the
//! root file system from a block device; runs the application with a clean
//! environment and the console as its stdio; reaps zombies; and, when the
//! application exits, powers the VM off, printing its exit status. Any error prints
//! one `keel-init: error: ...` line and powers off with status 1.

mod config;
mod net;
mod sys;

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use thiserror::Error;

use config::{Config, ConfigError, CONFIG_PATH};

/// How long to wait for a device (disk, network interface) after loading modules.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(5);
/// Mount point of the root file system unless `rootmount` says otherwise.
const DEFAULT_ROOTMOUNT: &str = "/rootfs";
/// PATH given to the application.
const APP_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything that can stop the init before the application runs.
#[derive(Debug, Error)]
enum InitError {
    #[error("must run as PID 1 (this is PID {0})")]
    NotPid1(u32),
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Sys(#[from] sys::SysError),
    #[error("network: {0}")]
    Net(#[from] net::NetError),
    #[error("read {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("start application {app}: {err}")]
    Spawn { app: String, err: std::io::Error },
}

fn say(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "keel-init: {msg}");
    let _ = out.flush();
}

fn main() {
    let start = sys::monotonic();
    let status = match run(start) {
        Ok(status) => status,
        Err(InitError::NotPid1(pid)) => {
            eprintln!("keel-init: error: must run as PID 1 (this is PID {pid})");
            std::process::exit(2);
        }
        Err(e) => {
            say(&format!("error: {e}"));
            1
        }
    };
    say(&format!("powering off with status {status}"));
    sys::power_off();
}

fn read_optional(path: &str) -> Result<Option<String>, InitError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(InitError::Read {
            path: path.to_string(),
            err,
        }),
    }
}

fn run(start: Duration) -> Result<i32, InitError> {
    if std::process::id() != 1 {
        return Err(InitError::NotPid1(std::process::id()));
    }
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    sys::mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, true)?;
    sys::ensure_console();
    sys::mount("proc", "/proc", "proc", nosuid_nodev_noexec, true)?;
    sys::mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, true)?;

    let mut cfg = Config::default();
    if let Some(text) = read_optional(CONFIG_PATH)? {
        cfg.apply_file(&text)?;
    }
    let cmdline = read_optional("/proc/cmdline")?.unwrap_or_default();
    cfg.apply_cmdline(&cmdline)?;
    cfg.validate()?;

    let t_modules = sys::monotonic();
    for m in &cfg.modules {
        sys::load_module(m)?;
    }
    let t_net = sys::monotonic();

    if let Err(e) = net::loopback_up() {
        say(&format!("warning: lo: {e}"));
    }
    if let Some(ip) = cfg.ip {
        let ifname = net::find_interface(cfg.ifname.as_deref(), DEVICE_TIMEOUT)?;
        net::configure(&ifname, ip, cfg.gw, cfg.mtu)?;
    }

    let t_root = sys::monotonic();
    let rootmount = cfg.rootmount.as_deref().unwrap_or(DEFAULT_ROOTMOUNT);
    if let Some(root) = &cfg.root {
        sys::wait_for(root, DEVICE_TIMEOUT)?;
        let fstype = cfg.rootfstype.as_deref().unwrap_or("ext4");
        let flags = if cfg.root_ro { libc::MS_RDONLY } else { 0 };
        sys::mount(root, rootmount, fstype, flags, false)?;
    }

    let t_exec = sys::monotonic();
    let program = cfg.app.first().cloned().unwrap_or_default();
    let mut cmd = Command::new(&program);
    cmd.args(cfg.app.iter().skip(1))
        .env_clear()
        .env("PATH", APP_PATH)
        .env("HOME", "/")
        .envs(cfg.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let child = cmd.spawn().map_err(|err| InitError::Spawn {
        app: program.clone(),
        err,
    })?;
    let started = sys::monotonic();
    let us = |a: Duration, b: Duration| b.saturating_sub(a).as_micros();
    say(&format!(
        "app started after {} us (setup {} us, modules {} us, network {} us, root {} us, exec {} us; kernel until init {} ms)",
        us(start, started),
        us(start, t_modules),
        us(t_modules, t_net),
        us(t_net, t_root),
        us(t_root, t_exec),
        us(t_exec, started),
        start.as_millis()
    ));

    let app_pid = i32::try_from(child.id()).unwrap_or(-1);
    let status = reap_until(app_pid);
    say(&format!("app exited with status {status}"));
    if cfg.root.is_some() {
        // SAFETY: sync has no arguments and cannot fail.
        unsafe { libc::sync() };
        if let Ok(target) = std::ffi::CString::new(rootmount) {
            // SAFETY: valid NUL-terminated path; failure is harmless (we power off).
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
    Ok(status)
}

/// Reaps every child until the application exits; returns its status (exit code, or
/// 128 + signal number).
fn reap_until(app_pid: i32) -> i32 {
    loop {
        let mut wstatus: libc::c_int = 0;
        // SAFETY: waitpid writes to a valid c_int.
        let pid = unsafe { libc::waitpid(-1, &mut wstatus, 0) };
        if pid < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // ECHILD: nothing left to wait for, so the application is gone.
            return 1;
        }
        if pid == app_pid {
            let st = std::process::ExitStatus::from_raw(wstatus);
            return match (st.code(), st.signal()) {
                (Some(code), _) => code,
                (None, Some(sig)) => 128 + sig,
                _ => 1,
            };
        }
    }
}
