//! IPv4 set-up with the classic socket ioctls: address, netmask, MTU, link up,
//! default route. Small and enough for one interface.

use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::IpCidr;

const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
const SIOCSIFMTU: libc::c_ulong = 0x8922;
const SIOCADDRT: libc::c_ulong = 0x890b;
const RTF_UP: libc::c_ushort = 0x1;
const RTF_GATEWAY: libc::c_ushort = 0x2;

/// Errors of network set-up.
#[derive(Debug, Error)]
pub enum NetError {
    /// No interface besides `lo` appeared.
    #[error("no network interface found (is virtio_net among the modules?)")]
    NoInterface,
    /// A named interface did not appear.
    #[error("network interface {0} not found")]
    Missing(String),
    /// An ioctl failed.
    #[error("{what} on {ifname}: {err}")]
    Ioctl {
        /// What was being done.
        what: &'static str,
        /// Interface.
        ifname: String,
        /// The error.
        err: io::Error,
    },
    /// socket(2) failed.
    #[error("socket: {0}")]
    Socket(io::Error),
}

/// `struct ifreq`: name plus a 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

/// `struct rtentry` (x86_64 layout follows from the C field types).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-data structs; the
    // kernel reads the former through the latter's type, as the C API intends.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn sockaddr_bytes(addr: Ipv4Addr) -> [u8; 24] {
    let sa = sockaddr_in(addr);
    let mut out = [0u8; 24];
    // SAFETY: sockaddr is 16 bytes of plain data; we copy it into a 24-byte buffer.
    let bytes: [u8; 16] = unsafe { std::mem::transmute::<libc::sockaddr, [u8; 16]>(sa) };
    out[..16].copy_from_slice(&bytes);
    out
}

struct Sock(libc::c_int);

impl Drop for Sock {
    fn drop(&mut self) {
        // SAFETY: the fd belongs to this struct and is closed once.
        unsafe { libc::close(self.0) };
    }
}

impl Sock {
    fn new() -> Result<Self, NetError> {
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(NetError::Socket(io::Error::last_os_error()));
        }
        Ok(Sock(fd))
    }

    fn ifreq(
        &self,
        req: libc::c_ulong,
        what: &'static str,
        ifname: &str,
        data: [u8; 24],
    ) -> Result<[u8; 24], NetError> {
        let mut ifr = IfReq {
            name: [0; libc::IFNAMSIZ],
            data,
        };
        let n = ifname.len().min(libc::IFNAMSIZ - 1);
        ifr.name[..n].copy_from_slice(&ifname.as_bytes()[..n]);
        // SAFETY: `ifr` is a properly laid out, writable ifreq for these requests.
        let rc = unsafe { libc::ioctl(self.0, req as _, &mut ifr) };
        if rc < 0 {
            return Err(NetError::Ioctl {
                what,
                ifname: ifname.to_string(),
                err: io::Error::last_os_error(),
            });
        }
        Ok(ifr.data)
    }

    fn set_up(&self, ifname: &str) -> Result<(), NetError> {
        let mut d = self.ifreq(SIOCGIFFLAGS, "get flags", ifname, [0; 24])?;
        let flags = i16::from_ne_bytes([d[0], d[1]]) | libc::IFF_UP as i16;
        d[..2].copy_from_slice(&flags.to_ne_bytes());
        self.ifreq(SIOCSIFFLAGS, "set link up", ifname, d)?;
        Ok(())
    }
}

/// Brings up `lo`.
pub fn loopback_up() -> Result<(), NetError> {
    Sock::new()?.set_up("lo")
}

/// Finds the interface to configure: `wanted`, or the first (sorted) that is not `lo`.
/// Waits up to `timeout` for it to appear.
pub fn find_interface(wanted: Option<&str>, timeout: Duration) -> Result<String, NetError> {
    let start = Instant::now();
    loop {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n != "lo")
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        let found = match wanted {
            Some(w) => names.into_iter().find(|n| n == w),
            None => names.into_iter().next(),
        };
        if let Some(name) = found {
            return Ok(name);
        }
        if start.elapsed() > timeout {
            return Err(match wanted {
                Some(w) => NetError::Missing(w.to_string()),
                None => NetError::NoInterface,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Configures `ifname`: MTU, address and netmask, link up, default route.
pub fn configure(
    ifname: &str,
    ip: IpCidr,
    gw: Option<Ipv4Addr>,
    mtu: Option<u32>,
) -> Result<(), NetError> {
    let sock = Sock::new()?;
    if let Some(mtu) = mtu {
        let mut d = [0u8; 24];
        d[..4].copy_from_slice(&(mtu as libc::c_int).to_ne_bytes());
        sock.ifreq(SIOCSIFMTU, "set mtu", ifname, d)?;
    }
    sock.ifreq(SIOCSIFADDR, "set address", ifname, sockaddr_bytes(ip.addr))?;
    sock.ifreq(
        SIOCSIFNETMASK,
        "set netmask",
        ifname,
        sockaddr_bytes(ip.netmask()),
    )?;
    sock.set_up(ifname)?;
    if let Some(gw) = gw {
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_in(gw),
            rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_flags: RTF_UP | RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // SAFETY: `rt` is a valid rtentry; rt_dev is null so the kernel picks the
        // interface from the gateway address.
        let rc = unsafe { libc::ioctl(sock.0, SIOCADDRT as _, &mut rt) };
        if rc < 0 {
            return Err(NetError::Ioctl {
                what: "add default route",
                ifname: ifname.to_string(),
                err: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}
