//! systemd readiness (`sd_notify`) over a datagram socket, without libsystemd.
//!
//! Under `Type=notify` systemd passes the socket in `NOTIFY_SOCKET`: a path, or an
//! abstract name written with a leading `@`. Without it nothing is sent.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use log::{debug, warn};

/// Sends `state` (for example `READY=1`) when `NOTIFY_SOCKET` is set. Returns whether
/// a datagram was sent; failures are logged, never fatal.
pub fn notify(state: &str) -> bool {
    let Ok(target) = std::env::var("NOTIFY_SOCKET") else {
        return false;
    };
    match send(&target, state) {
        Ok(()) => {
            debug!("sd_notify: {state}");
            true
        }
        Err(e) => {
            warn!("cannot notify systemd at {target:?}: {e}");
            false
        }
    }
}

fn send(target: &str, state: &str) -> std::io::Result<()> {
    let addr = if let Some(name) = target.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else if target.starts_with('/') {
        SocketAddr::from_pathname(target)?
    } else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "expected an absolute path or an @abstract name",
        ));
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn sends_to_path_and_abstract_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let l = UnixDatagram::bind(&path).unwrap();
        send(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 16];
        let n = l.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let name = format!("keel-net-notify-{}", std::process::id());
        let l = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        send(&format!("@{name}"), "READY=1").unwrap();
        let n = l.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(send("relative", "READY=1").is_err());
    }
}
