//! systemd service notifications (the `sd_notify` protocol) without libsystemd.
//!
//! Under `Type=notify`, systemd passes the path of a datagram socket in
//! `NOTIFY_SOCKET` (a file system path, or an abstract name written with a leading
//! `@`). Each notification is one datagram of `KEY=VALUE` lines: `READY=1`,
//! `STATUS=...`, `STOPPING=1`, `WATCHDOG=1`. Without `NOTIFY_SOCKET` every call is a
//! no-op, so the VMM behaves the same outside systemd.
//!
//! When `WatchdogSec=` is set, systemd also passes `WATCHDOG_USEC` (and
//! `WATCHDOG_PID`): [`Watchdog`] is a timerfd for the event loop that fires at half
//! that interval, and each firing sends `WATCHDOG=1`. The pings come from the event
//! loop itself, so a loop that stops turning stops pinging. Processes without an
//! event loop use [`spawn_watchdog`], a thread that pings while a liveness check
//! passes. [`NotifyListener`] is the receiving end (tests and supervisors).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::Duration;

use log::{debug, warn};
use thiserror::Error;
use vmm_sys_util::timerfd::TimerFd;

mod listener;
pub use listener::NotifyListener;

/// The notification socket variable.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The watchdog interval variable, in microseconds.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The PID the watchdog interval is meant for.
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// Errors sending a notification.
#[derive(Debug, Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` is not a path or an abstract (`@`) name.
    #[error("NOTIFY_SOCKET={0:?}: expected an absolute path or an @abstract name")]
    BadAddress(String),
    /// The socket could not be created, addressed or written.
    #[error("NOTIFY_SOCKET={addr:?}: {source}")]
    Io {
        /// The socket address as given.
        addr: String,
        /// OS error.
        source: io::Error,
    },
}

/// Parses a `NOTIFY_SOCKET` value into a socket address.
pub fn parse_address(value: &str) -> Result<SocketAddr, NotifyError> {
    let io_err = |source| NotifyError::Io {
        addr: value.to_owned(),
        source,
    };
    if let Some(name) = value.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(io_err)
    } else if value.starts_with('/') {
        SocketAddr::from_pathname(value).map_err(io_err)
    } else {
        Err(NotifyError::BadAddress(value.to_owned()))
    }
}

/// Sends `state` (one or more `KEY=VALUE` lines) to the socket named by `addr`
/// (a `NOTIFY_SOCKET` value).
pub fn send_to(addr: &str, state: &str) -> Result<(), NotifyError> {
    let target = Target::new(addr)?;
    target.send(state)
}

/// A connected-once notification target.
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    name: String,
}

impl Target {
    fn new(name: &str) -> Result<Self, NotifyError> {
        let addr = parse_address(name)?;
        let socket = UnixDatagram::unbound().map_err(|source| NotifyError::Io {
            addr: name.to_owned(),
            source,
        })?;
        Ok(Self {
            socket,
            addr,
            name: name.to_owned(),
        })
    }

    fn send(&self, state: &str) -> Result<(), NotifyError> {
        let sent = self
            .socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map_err(|source| NotifyError::Io {
                addr: self.name.clone(),
                source,
            })?;
        if sent != state.len() {
            return Err(NotifyError::Io {
                addr: self.name.clone(),
                source: io::Error::new(io::ErrorKind::WriteZero, "short datagram"),
            });
        }
        Ok(())
    }
}

/// The process-wide target from `NOTIFY_SOCKET`, read once.
fn target() -> Option<&'static Target> {
    static TARGET: OnceLock<Option<Target>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let value = std::env::var(NOTIFY_SOCKET).ok()?;
            if value.is_empty() {
                return None;
            }
            match Target::new(&value) {
                Ok(t) => Some(t),
                Err(e) => {
                    warn!("systemd notifications disabled: {e}");
                    None
                }
            }
        })
        .as_ref()
}

/// Sends `state` to systemd when running under `Type=notify`; does nothing otherwise.
/// Returns whether a notification was sent; failures are logged, never fatal.
pub fn notify(state: &str) -> bool {
    let Some(target) = target() else {
        return false;
    };
    match target.send(state) {
        Ok(()) => {
            debug!("sd_notify: {}", state.replace('\n', " "));
            true
        }
        Err(e) => {
            warn!("cannot notify systemd ({}): {e}", state.replace('\n', " "));
            false
        }
    }
}

/// Sends a `STATUS=` line (one line: newlines become spaces).
pub fn status(text: &str) -> bool {
    notify(&format!("STATUS={}", text.replace('\n', " ")))
}

/// The watchdog interval from the `WATCHDOG_USEC` and `WATCHDOG_PID` values: set, a
/// positive number, and (when the PID is given) meant for `my_pid`.
pub fn watchdog_interval_from(
    usec: Option<&str>,
    pid: Option<&str>,
    my_pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != my_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// The watchdog interval systemd expects pings within, if it set one for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var(WATCHDOG_USEC).ok();
    let pid = std::env::var(WATCHDOG_PID).ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// Starts a thread that sends `WATCHDOG=1` at half the watchdog interval while
/// `alive` returns true, when systemd asked for pings. Returns the ping period.
pub fn spawn_watchdog(alive: impl Fn() -> bool + Send + 'static) -> Option<Duration> {
    let period = watchdog_interval()? / 2;
    let period = period.max(Duration::from_millis(1));
    let spawned = std::thread::Builder::new()
        .name("sd-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(period);
            if alive() {
                notify("WATCHDOG=1");
            }
        });
    match spawned {
        Ok(_) => Some(period),
        Err(e) => {
            warn!("cannot start the watchdog thread: {e}");
            None
        }
    }
}

/// A periodic timer for the event loop that sends `WATCHDOG=1` each time it fires.
pub struct Watchdog {
    timer: TimerFd,
    period: Duration,
}

impl Watchdog {
    /// A timer firing every `period` (half the systemd watchdog interval).
    pub fn new(period: Duration) -> io::Result<Self> {
        let mut timer = TimerFd::new()?;
        timer.reset(period, Some(period))?;
        Ok(Self { timer, period })
    }

    /// The watchdog systemd asked for, pinging at half its interval; `None` when no
    /// watchdog is set or no notification socket is available.
    pub fn from_env() -> Option<Self> {
        let interval = watchdog_interval()?;
        target()?;
        let period = (interval / 2).max(Duration::from_millis(1));
        match Self::new(period) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!("systemd watchdog disabled: cannot create its timer: {e}");
                None
            }
        }
    }

    /// Time between two pings.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Consumes the timer expiration and sends one `WATCHDOG=1`.
    pub fn fire(&mut self) {
        // Readable when epoll says so: the read does not block.
        if let Err(e) = self.timer.wait() {
            debug!("watchdog timer read: {e}");
        }
        notify("WATCHDOG=1");
    }
}

impl AsRawFd for Watchdog {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn addresses() {
        assert!(parse_address("/run/systemd/notify").is_ok());
        let abs = parse_address("@keel/notify").unwrap();
        assert_eq!(abs.as_abstract_name(), Some(&b"keel/notify"[..]));
        assert!(matches!(
            parse_address("relative"),
            Err(NotifyError::BadAddress(_))
        ));
        assert!(matches!(
            parse_address("vsock:2:1"),
            Err(NotifyError::BadAddress(_))
        ));
    }

    #[test]
    fn send_to_path_and_abstract() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        send_to(path.to_str().unwrap(), "READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");

        let name = format!("keel-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn watchdog_interval_rules() {
        let d = watchdog_interval_from;
        assert_eq!(d(Some("200000"), None, 7), Some(Duration::from_millis(200)));
        assert_eq!(
            d(Some("200000"), Some("7"), 7),
            Some(Duration::from_millis(200))
        );
        assert_eq!(d(Some("200000"), Some("8"), 7), None);
        assert_eq!(d(Some("0"), None, 7), None);
        assert_eq!(d(Some("x"), None, 7), None);
        assert_eq!(d(None, Some("7"), 7), None);
    }

    #[test]
    fn watchdog_timer_fires() {
        let mut w = Watchdog::new(Duration::from_millis(10)).unwrap();
        assert_eq!(w.period(), Duration::from_millis(10));
        // Blocks until the first expiration; no socket in tests, so no datagram.
        w.fire();
    }
}
