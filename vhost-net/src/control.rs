//! The JSON-lines control socket: one request per line, one reply line each.
//!
//! Requests: `{"cmd":"stats"}`, `{"cmd":"add-port","name":"p2","socket":"/run/p2.sock",
//! "mac":"52:54:00:00:00:02"}` (optional: `mac`, `queues`, `cpu` (a list),
//! `rate_bps`, `rate_pps`), `{"cmd":"remove-port","name":"p2"}`,
//! `{"cmd":"set-rate","name":"p2","bps":1000000000,"pps":0}` (0: unlimited).
//! Replies: `{"ok":true,...}` or `{"ok":false,"error":"..."}`. Lines over 4 KiB get an
//! error reply and the connection is closed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{debug, warn};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{Mac, PortConfig};
use crate::server::Server;

/// Longest request line.
pub const MAX_LINE: usize = 4096;

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Binding or configuring the socket failed.
    #[error("control socket {}: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn one() -> u16 {
    1
}

/// A control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
enum Request {
    Stats,
    AddPort {
        name: String,
        socket: PathBuf,
        #[serde(default)]
        mac: Option<String>,
        #[serde(default = "one")]
        queues: u16,
        #[serde(default)]
        cpu: Vec<usize>,
        #[serde(default)]
        rate_bps: u64,
        #[serde(default)]
        rate_pps: u64,
    },
    RemovePort {
        name: String,
    },
    SetRate {
        name: String,
        #[serde(default)]
        bps: u64,
        #[serde(default)]
        pps: u64,
    },
}

/// Binds the control socket (mode 0600, replacing a stale file) and serves it on a
/// thread of its own.
pub fn start(path: &Path, server: Arc<Server>) -> Result<(), ControlError> {
    let err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let server = server.clone();
                        let spawned = std::thread::Builder::new()
                            .name("control-conn".into())
                            .spawn(move || serve_connection(stream, &server));
                        if let Err(e) = spawned {
                            warn!("control: cannot start a thread: {e}");
                        }
                    }
                    Err(e) => warn!("control: accept: {e}"),
                }
            }
        })
        .map_err(err)?;
    Ok(())
}

fn serve_connection(stream: UnixStream, server: &Server) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(n) => n,
            Err(e) => {
                debug!("control: read: {e}");
                return;
            }
        };
        if n == 0 {
            return;
        }
        let too_long = line.len() > MAX_LINE;
        let reply = if too_long {
            error(&format!("request longer than {MAX_LINE} bytes"))
        } else {
            handle_line(&line, server)
        };
        let mut text = reply.to_string();
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() || too_long {
            return;
        }
    }
}

fn error(msg: &str) -> Value {
    json!({"ok": false, "error": msg})
}

/// Handles one request line and returns the reply.
pub fn handle_line(line: &[u8], server: &Server) -> Value {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return error("empty request");
    }
    let req: Request = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => return error(&format!("bad request: {e}")),
    };
    match req {
        Request::Stats => {
            let ports: Vec<_> = server.switch().ports().iter().map(|p| p.stats()).collect();
            json!({"ok": true, "ports": ports, "macs": server.switch().macs.len()})
        }
        Request::AddPort {
            name,
            socket,
            mac,
            queues,
            cpu,
            rate_bps,
            rate_pps,
        } => {
            if !socket.is_absolute() {
                return error("socket: expected an absolute path");
            }
            let mac = match mac.map(|m| m.parse::<Mac>()).transpose() {
                Ok(m) => m,
                Err(e) => return error(&format!("mac: {e}")),
            };
            let cfg = PortConfig {
                name,
                socket,
                mac,
                queues,
                cpu,
                rate_bps,
                rate_pps,
            };
            match server.add_port(cfg) {
                Ok(_) => json!({"ok": true}),
                Err(e) => error(&e.to_string()),
            }
        }
        Request::RemovePort { name } => match server.remove_port(&name) {
            Ok(()) => json!({"ok": true}),
            Err(e) => error(&e.to_string()),
        },
        Request::SetRate { name, bps, pps } => match server.switch().port(&name) {
            Some(p) => {
                p.limiter.set(bps, pps);
                json!({"ok": true})
            }
            None => error(&format!("no port named {name:?}")),
        },
    }
}
