//! A TAP uplink: a kernel network interface whose frames enter and leave the switch
//! like a port's, with a virtio-net header in front (`IFF_VNET_HDR`), so the host or
//! a network namespace is reachable from the sandboxes.
//!
//! The device is created (or attached, if it exists and is persistent) by name; the
//! administrator brings it up and addresses it. With offloads (`--offloads`) the
//! kernel may hand us partial checksums and GSO frames (`TUNSETOFFLOAD`), and the
//! virtio-net header of frames from the ports is passed to it; without, frames carry
//! a zeroed header both ways.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::net::{Frame, TxBatch, HDR_LEN};

/// `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO`.
const TUN_OFFLOADS: libc::c_ulong = 0x01 | 0x02 | 0x04 | 0x08 | 0x10;
/// Most pieces of a frame sent with one writev (more are gathered first).
const MAX_IOV: usize = 16;

/// Why a TAP device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit `IFNAMSIZ`.
    #[error("TAP name {0:?}: expected 1 to 15 bytes without NUL")]
    Name(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    Open(#[source] io::Error),
    /// An ioctl on the device failed.
    #[error("TAP {name}: {what}: {source}")]
    Ioctl {
        /// Interface name.
        name: String,
        /// Which request.
        what: &'static str,
        /// OS error.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF reads it: name, flags, and the rest of the union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP device with 12-byte virtio-net headers.
pub struct Tap {
    file: File,
    name: String,
    offloads: bool,
}

impl Tap {
    /// Creates or attaches to the TAP interface `name`, non-blocking; with `offloads`
    /// the kernel may send partial checksums and GSO frames.
    pub fn open(name: &str, offloads: bool) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() > 15 || name.contains('\0') {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let err = |what| {
            let source = io::Error::last_os_error();
            TapError::Ioctl {
                name: name.to_string(),
                what,
                source,
            }
        };
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a live,
        // correctly sized (40-byte) repr(C) value and `file` an open tun fd.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(err("TUNSETIFF"));
        }
        let hdr_len = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is valid.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(err("TUNSETVNETHDRSZ"));
        }
        // Without offloads the kernel hands us complete frames with checksums.
        let flags: libc::c_ulong = if offloads { TUN_OFFLOADS } else { 0 };
        // SAFETY: TUNSETOFFLOAD takes an integer argument, no pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, flags) } < 0 {
            return Err(err("TUNSETOFFLOAD"));
        }
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(16);
        Ok(Tap {
            file,
            name: String::from_utf8_lossy(&req.name[..len]).into_owned(),
            offloads,
        })
    }

    /// Whether the kernel may send (and takes) partial checksums and GSO frames.
    pub fn offloads(&self) -> bool {
        self.offloads
    }

    /// The interface name the kernel gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends frame `f` of `batch` to the kernel with header `hdr`, straight from the
    /// sender's buffers (one writev); `pieces` and `copy` are scratch space (the
    /// latter for frames in many pieces).
    pub fn send(
        &self,
        hdr: &[u8; HDR_LEN],
        batch: &TxBatch,
        f: &Frame,
        pieces: &mut Vec<(*const u8, usize)>,
        copy: &mut Vec<u8>,
    ) -> io::Result<()> {
        pieces.clear();
        batch.pieces_of(f, pieces);
        if pieces.len() >= MAX_IOV {
            copy.clear();
            batch.gather(f, copy);
            return self.send_bytes(hdr, copy);
        }
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        iov[0] = libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: HDR_LEN,
        };
        let mut total = HDR_LEN;
        for (slot, &(p, n)) in iov[1..].iter_mut().zip(pieces.iter()) {
            *slot = libc::iovec {
                iov_base: p as *mut libc::c_void,
                iov_len: n,
            };
            total += n;
        }
        let n = pieces.len();
        pieces.clear();
        self.writev(&iov[..n + 1], total)
    }

    /// Sends `frame` to the kernel with header `hdr`.
    pub fn send_bytes(&self, hdr: &[u8; HDR_LEN], frame: &[u8]) -> io::Result<()> {
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: HDR_LEN,
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        self.writev(&iov, HDR_LEN + frame.len())
    }

    fn writev(&self, iov: &[libc::iovec], total: usize) -> io::Result<()> {
        // SAFETY: every iovec points to readable memory that lives for the call: the
        // header, a local buffer, or the sender's guest memory, kept mapped by the
        // batch and bounds-checked when the chain was taken. writev only reads it.
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != total {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short TAP write"));
        }
        Ok(())
    }

    /// Reads one frame (header included) into `buf`; `WouldBlock` when none is queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Waits up to `timeout_ms` for a frame to read. Returns whether one is there.
    pub fn wait_readable(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd that lives for the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(rc > 0 && pfd.revents & libc::POLLIN != 0)
    }
}
