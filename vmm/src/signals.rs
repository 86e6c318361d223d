//! Termination signals delivered through a signalfd, so the event loop handles them
//! like any other event and can stop the VM in order.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// Signals that stop the VM.
pub const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// A signalfd for [`STOP_SIGNALS`].
#[derive(Debug)]
pub struct StopSignals {
    fd: File,
}

fn stop_set() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    if unsafe { libc::sigemptyset(&mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for sig in STOP_SIGNALS {
        // SAFETY: `set` is initialised and `sig` a valid signal number.
        if unsafe { libc::sigaddset(&mut set, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(set)
}

impl StopSignals {
    /// Blocks the stop signals in the calling thread (and every thread it spawns
    /// afterwards) and opens a signalfd for them. Call before spawning threads.
    pub fn new() -> io::Result<Self> {
        let set = stop_set()?;
        // SAFETY: `set` is a valid, initialised signal set; the old mask is not wanted.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: -1 asks for a new signalfd; `set` is valid; flags are valid.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor owned by nothing else.
        let fd = unsafe { File::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Reads one pending signal, if any.
    pub fn read(&mut self) -> io::Result<Option<libc::c_int>> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        match self.fd.read(&mut info) {
            Ok(n) if n == info.len() => {
                // ssi_signo is the first u32 of signalfd_siginfo.
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                Ok(Some(signo as libc::c_int))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for StopSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A signal's conventional name.
pub fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}
