//! The receiving end of the protocol: what systemd does with `NOTIFY_SOCKET`, for
//! tests and supervisors that stand in for it.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::parse_address;

/// Largest notification read; longer datagrams are cut, as systemd's own reader
/// does (it reads at most `PIPE_BUF`, 4096 bytes).
const MAX_DATAGRAM: usize = 4096;

/// A bound notification socket.
#[derive(Debug)]
pub struct NotifyListener {
    socket: UnixDatagram,
    address: String,
}

impl NotifyListener {
    /// Binds `address`, in the form `NOTIFY_SOCKET` takes: an absolute path or an
    /// `@abstract` name.
    pub fn bind(address: &str) -> io::Result<NotifyListener> {
        let addr = parse_address(address)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        Ok(NotifyListener {
            socket: UnixDatagram::bind_addr(&addr)?,
            address: address.to_owned(),
        })
    }

    /// The value to pass as `NOTIFY_SOCKET`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The next notification (its `KEY=VALUE` lines), waiting up to `within`.
    pub fn recv(&self, within: Duration) -> io::Result<String> {
        // A zero timeout would mean "block forever" to SO_RCVTIMEO.
        self.socket
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))?;
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = self.socket.recv(&mut buf).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::TimedOut, "no notification in time")
            } else {
                e
            }
        })?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// The first notification with a line equal to `line` (or, when `line` ends in
    /// `=`, starting with it), skipping others, waiting up to `within` in all.
    pub fn recv_line(&self, line: &str, within: Duration) -> io::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no notification with {line:?} in time"),
                ));
            }
            let msg = self.recv(left)?;
            let hit = |l: &str| {
                if line.ends_with('=') {
                    l.starts_with(line)
                } else {
                    l == line
                }
            };
            if msg.lines().any(hit) {
                return Ok(msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::send_to;

    #[test]
    fn receives_on_paths_and_abstract_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let abstract_name = format!("@keel-sd-notify-test-{}", std::process::id());
        for address in [path.to_str().unwrap(), &abstract_name] {
            let l = NotifyListener::bind(address).unwrap();
            assert_eq!(l.address(), address);
            send_to(address, "STATUS=starting").unwrap();
            send_to(address, "READY=1\nSTATUS=up").unwrap();
            let msg = l.recv_line("READY=1", Duration::from_secs(5)).unwrap();
            assert_eq!(msg, "READY=1\nSTATUS=up");
            send_to(address, "STATUS=serving 2").unwrap();
            assert_eq!(
                l.recv_line("STATUS=", Duration::from_secs(5)).unwrap(),
                "STATUS=serving 2"
            );
            let e = l.recv(Duration::from_millis(50)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        }
        assert!(NotifyListener::bind("relative/path").is_err());
    }
}
