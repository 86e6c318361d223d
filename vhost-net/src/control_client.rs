//! A client for keel-vhost-net's control socket (see [`crate::control`]): one request
//! line per connection, one JSON reply line. For tools, the bench and tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// Longest reply read (a stats reply is about 1 KiB per port); a longer one is a bad
/// reply.
pub const MAX_REPLY: u64 = 16 << 20;

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    /// Connecting, writing or reading failed (or timed out).
    #[error("control socket {}: {what}: {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The reply was not one JSON line.
    #[error("control socket {}: bad reply {reply:?}", path.display())]
    BadReply {
        /// The socket path.
        path: PathBuf,
        /// What came back.
        reply: String,
    },
    /// The switch answered `ok: false` (or the port does not exist).
    #[error("control socket {}: {message}", path.display())]
    Refused {
        /// The socket path.
        path: PathBuf,
        /// The switch's error, or what was missing.
        message: String,
    },
}

/// A control-socket client.
#[derive(Debug, Clone)]
pub struct ControlClient {
    path: PathBuf,
    timeout: Duration,
}

impl ControlClient {
    /// A client of the socket at `path`, waiting up to 10 s for a reply.
    pub fn new(path: impl AsRef<Path>) -> ControlClient {
        ControlClient {
            path: path.as_ref().to_path_buf(),
            timeout: Duration::from_secs(10),
        }
    }

    /// The same client with another reply timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> ControlClient {
        self.timeout = timeout;
        self
    }

    /// Sends `line` (a request, sent as given: it may be malformed on purpose) and
    /// returns the reply, whether `ok` or not.
    pub fn request(&self, line: &str) -> Result<Value, ControlClientError> {
        let io = |what| {
            let path = self.path.clone();
            move |source| ControlClientError::Io { path, what, source }
        };
        let mut s = UnixStream::connect(&self.path).map_err(io("connect"))?;
        s.set_read_timeout(Some(self.timeout))
            .map_err(io("set a timeout"))?;
        s.set_write_timeout(Some(self.timeout))
            .map_err(io("set a timeout"))?;
        s.write_all(line.as_bytes())
            .and_then(|()| s.write_all(b"\n"))
            .map_err(io("send"))?;
        let mut reply = String::new();
        BufReader::new(s)
            .take(MAX_REPLY)
            .read_line(&mut reply)
            .map_err(io("read the reply"))?;
        serde_json::from_str(&reply).map_err(|_| ControlClientError::BadReply {
            path: self.path.clone(),
            reply,
        })
    }

    /// Sends `line` and returns the reply if it says `ok: true`.
    pub fn ok(&self, line: &str) -> Result<Value, ControlClientError> {
        let reply = self.request(line)?;
        if reply["ok"] == true {
            return Ok(reply);
        }
        Err(ControlClientError::Refused {
            path: self.path.clone(),
            message: reply["error"]
                .as_str()
                .map_or_else(|| reply.to_string(), str::to_string),
        })
    }

    /// The switch's counters (`stats`).
    pub fn stats(&self) -> Result<Value, ControlClientError> {
        self.ok(r#"{"cmd":"stats"}"#)
    }

    /// The counters of port `name`.
    pub fn port(&self, name: &str) -> Result<Value, ControlClientError> {
        let stats = self.stats()?;
        stats["ports"]
            .as_array()
            .and_then(|ports| ports.iter().find(|p| p["name"] == name))
            .cloned()
            .ok_or_else(|| ControlClientError::Refused {
                path: self.path.clone(),
                message: format!("no port {name} in the stats"),
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::os::unix::net::UnixListener;

    use super::*;

    /// A one-shot server answering each connection with the next of `replies`.
    fn serve(
        replies: &'static [&'static str],
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for reply in replies {
                let Ok((s, _)) = listener.accept() else {
                    return;
                };
                let mut line = String::new();
                let mut r = BufReader::new(&s);
                let _ = r.read_line(&mut line);
                let _ = (&s).write_all(reply.as_bytes());
            }
        });
        (dir, path, server)
    }

    #[test]
    fn replies_refusals_and_garbage() {
        let (_dir, path, server) = serve(&[
            "{\"ok\":true,\"ports\":[{\"name\":\"p0\",\"tx_packets\":7}]}\n",
            "{\"ok\":true,\"ports\":[]}\n",
            "{\"ok\":false,\"error\":\"no such port\"}\n",
            "not json\n",
        ]);
        let c = ControlClient::new(&path);
        assert_eq!(c.port("p0").unwrap()["tx_packets"], 7);
        assert!(matches!(
            c.port("p0"),
            Err(ControlClientError::Refused { .. })
        ));
        let e = c.ok(r#"{"cmd":"remove-port","name":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("no such port"), "{e}");
        assert!(matches!(
            c.request("{}"),
            Err(ControlClientError::BadReply { .. })
        ));
        // Nobody listens any more.
        server.join().unwrap();
        assert!(matches!(c.stats(), Err(ControlClientError::Io { .. })));
    }
}
