//! systemd service notifications (the `sd_notify` protocol), without libsystemd.
//!
//! Under `Type=notify` systemd names a datagram socket in `NOTIFY_SOCKET`: a file
//! system path, or an abstract name written with a leading `@`. Each notification is
//! one datagram of `KEY=VALUE` lines (`READY=1`, `STATUS=...`, `STOPPING=1`). Without
//! `NOTIFY_SOCKET` every call does nothing, so the backend behaves the same outside
//! systemd.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::Duration;

use log::{debug, warn};

/// The environment variable naming the notification socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The address is neither an absolute path nor an `@abstract` name.
    #[error("NOTIFY_SOCKET={0:?}: expected an absolute path or an @abstract name")]
    BadAddress(String),
    /// The socket could not be created, addressed or written.
    #[error("NOTIFY_SOCKET={addr:?}: {source}")]
    Io {
        /// The address as given.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Parses a `NOTIFY_SOCKET` value.
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

/// An unbound datagram socket and the address notifications go to.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    name: String,
}

impl Notifier {
    /// A notifier for the socket named `name` (a `NOTIFY_SOCKET` value).
    pub fn new(name: &str) -> Result<Notifier, NotifyError> {
        let addr = parse_address(name)?;
        let socket = UnixDatagram::unbound().map_err(|source| NotifyError::Io {
            addr: name.to_owned(),
            source,
        })?;
        Ok(Notifier {
            socket,
            addr,
            name: name.to_owned(),
        })
    }

    /// Sends `state`, one or more `KEY=VALUE` lines, as one datagram.
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        let io_err = |source| NotifyError::Io {
            addr: self.name.clone(),
            source,
        };
        let sent = self
            .socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map_err(io_err)?;
        if sent != state.len() {
            return Err(io_err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short datagram",
            )));
        }
        Ok(())
    }
}

/// The process-wide notifier from `NOTIFY_SOCKET`, looked up once.
fn notifier() -> Option<&'static Notifier> {
    static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();
    NOTIFIER
        .get_or_init(|| {
            let value = std::env::var(NOTIFY_SOCKET).ok()?;
            if value.is_empty() {
                return None;
            }
            Notifier::new(&value)
                .map_err(|e| warn!("systemd notifications disabled: {e}"))
                .ok()
        })
        .as_ref()
}

/// Sends `state` to systemd when `NOTIFY_SOCKET` is set. Returns whether it was sent;
/// failures are logged, never fatal.
pub fn notify(state: &str) -> bool {
    let Some(n) = notifier() else {
        return false;
    };
    match n.send(state) {
        Ok(()) => {
            debug!("sd_notify: {}", state.replace('\n', " "));
            true
        }
        Err(e) => {
            warn!("cannot notify systemd: {e}");
            false
        }
    }
}

/// Sends one `STATUS=` line (newlines become spaces).
pub fn status(text: &str) -> bool {
    notify(&format!("STATUS={}", text.replace('\n', " ")))
}

/// The watchdog ping interval systemd asks for (`WATCHDOG_USEC`, half of it, as
/// sd_watchdog_enabled recommends), if the watchdog is meant for this process.
pub fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// Starts a thread that sends `WATCHDOG=1` at half of `WATCHDOG_USEC` while the
/// process lives, when systemd asked for it. The pings stop when `alive` returns
/// false (a worker that stopped making progress).
pub fn spawn_watchdog(alive: impl Fn() -> bool + Send + 'static) -> Option<Duration> {
    let interval = watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )?;
    let spawned = std::thread::Builder::new()
        .name("sd-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            if alive() {
                notify("WATCHDOG=1");
            }
        });
    match spawned {
        Ok(_) => Some(interval),
        Err(e) => {
            warn!("cannot start the watchdog thread: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn watchdog_interval_is_half_and_only_for_us() {
        assert_eq!(
            watchdog_interval_from(Some("200000"), None, 7),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            watchdog_interval_from(Some("200000"), Some("7"), 7),
            Some(Duration::from_millis(100))
        );
        assert_eq!(watchdog_interval_from(Some("200000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
    }

    #[test]
    fn addresses() {
        assert!(parse_address("/run/systemd/notify").is_ok());
        let a = parse_address("@keel/notify").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"keel/notify"[..]));
        assert!(matches!(
            parse_address("relative/path"),
            Err(NotifyError::BadAddress(_))
        ));
    }

    #[test]
    fn sends_to_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        Notifier::new(path.to_str().unwrap())
            .unwrap()
            .send("READY=1\nSTATUS=up")
            .unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");

        let name = format!("keel-vhost-blk-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::new(&format!("@{name}"))
            .unwrap()
            .send("STOPPING=1")
            .unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
