//! The control socket protocol: one JSON object per line in each direction.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"stats"}`, `{"cmd":"pause"}`, `{"cmd":"resume"}`,
//! `{"cmd":"shutdown"}`. Replies: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//! Every malformed request gets an error reply; a line longer than
//! [`MAX_REQUEST_LINE`] gets one and the connection is closed.

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Longest accepted request line, in bytes (without the newline).
pub const MAX_REQUEST_LINE: usize = 4096;
/// Most pending reply bytes kept for a client that does not read them.
const MAX_PENDING_REPLY: usize = 64 * 1024;

/// A control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Request {
    /// Report the VM's state.
    Status,
    /// Report the VM's state with per-device details.
    Stats,
    /// Stop executing guest code until resumed.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Stop the VM and exit the VMM (status 0).
    Shutdown,
}

/// The wire form of a request: exactly one field, `cmd`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest {
    cmd: Request,
}

/// Parses one request line.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_owned())?;
    let text = text.trim();
    if text.is_empty() {
        return Err("empty request: expected a JSON object like {\"cmd\":\"status\"}".to_owned());
    }
    serde_json::from_str::<WireRequest>(text)
        .map(|w| w.cmd)
        .map_err(|e| {
        format!(
            "bad request: {e}; expected {{\"cmd\": \"status\" | \"stats\" | \"pause\" | \"resume\" | \"shutdown\"}}"
        )
    })
}

/// The reply to a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reply(Value);

impl Reply {
    /// A successful reply carrying `fields` (an object) plus `"ok": true`.
    pub fn ok(fields: Value) -> Self {
        let mut v = match fields {
            Value::Object(map) => Value::Object(map),
            _ => json!({}),
        };
        if let Value::Object(map) = &mut v {
            map.insert("ok".to_owned(), Value::Bool(true));
        }
        Reply(v)
    }

    /// A failure reply.
    pub fn error(message: impl Into<String>) -> Self {
        Reply(json!({"ok": false, "error": message.into()}))
    }

    /// The reply as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = self.0.to_string().into_bytes();
        line.push(b'\n');
        line
    }
}

/// What reading from a connection produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Complete request lines (parsed or not).
    Lines(Vec<Result<Request, String>>),
    /// The peer closed its side, or the connection must be dropped.
    Closed,
}

/// One accepted control connection with its partial input and pending output.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Close once the pending output is written.
    closing: bool,
}

impl Connection {
    /// Wraps an accepted stream (made non-blocking).
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            closing: false,
        })
    }

    /// The socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Reads what is available and splits it into request lines.
    pub fn read_requests(&mut self) -> Input {
        let mut buf = [0u8; 4096];
        let mut closed = false;
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Input::Closed,
            }
            if self.input.len() > MAX_REQUEST_LINE && !self.input.contains(&b'\n') {
                break;
            }
        }
        let mut lines = Vec::new();
        while let Some(pos) = self.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.input.drain(..=pos).collect();
            let line = &line[..line.len() - 1];
            if line.len() > MAX_REQUEST_LINE {
                lines.push(Err(format!("request longer than {MAX_REQUEST_LINE} bytes")));
                self.closing = true;
                self.input.clear();
                break;
            }
            lines.push(parse_request(line));
        }
        if self.input.len() > MAX_REQUEST_LINE {
            lines.push(Err(format!("request longer than {MAX_REQUEST_LINE} bytes")));
            self.closing = true;
            self.input.clear();
        }
        if closed && lines.is_empty() {
            return Input::Closed;
        }
        if closed {
            self.closing = true;
        }
        Input::Lines(lines)
    }

    /// Queues a reply and writes as much as the socket takes. Returns false when the
    /// connection should be dropped (peer gone, not reading, or closing and done).
    pub fn send(&mut self, reply: &Reply) -> bool {
        self.output.extend_from_slice(&reply.to_line());
        if self.output.len() > MAX_PENDING_REPLY {
            return false;
        }
        self.flush()
    }

    /// Writes pending output. Returns false when the connection should be dropped.
    pub fn flush(&mut self) -> bool {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => return false,
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        !self.closing
    }

    /// Whether replies are waiting to be written.
    pub fn has_pending_output(&self) -> bool {
        !self.output.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        assert_eq!(parse_request(br#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(parse_request(br#"{"cmd":"stats"}"#), Ok(Request::Stats));
        assert_eq!(parse_request(br#" {"cmd": "pause"} "#), Ok(Request::Pause));
        assert_eq!(parse_request(br#"{"cmd":"resume"}"#), Ok(Request::Resume));
        assert_eq!(
            parse_request(br#"{"cmd":"shutdown"}"#),
            Ok(Request::Shutdown)
        );
    }

    #[test]
    fn rejects_bad_requests_with_a_message() {
        for bad in [
            &b""[..],
            b"status",
            b"{}",
            br#"{"cmd":"reboot"}"#,
            br#"{"cmd":"status","extra":1}"#,
            br#"{"cmd":7}"#,
            b"\xff\xfe",
            b"[1,2,3]",
        ] {
            let err = parse_request(bad);
            assert!(err.is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn replies_are_single_json_lines() {
        let ok = Reply::ok(json!({"state": "running"})).to_line();
        assert_eq!(ok.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&ok).unwrap_or(Value::Null);
        assert_eq!(v["ok"], Value::Bool(true));
        assert_eq!(v["state"], "running");
        let err: Value =
            serde_json::from_slice(&Reply::error("x\ny").to_line()).unwrap_or(Value::Null);
        assert_eq!(err["ok"], Value::Bool(false));
        assert_eq!(err["error"], "x\ny");
    }

    #[test]
    fn connection_splits_lines_and_limits_length() {
        let (a, mut b) = match UnixStream::pair() {
            Ok(p) => p,
            Err(e) => panic!("socketpair: {e}"),
        };
        let mut conn = match Connection::new(a) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let _ = b.write_all(b"{\"cmd\":\"status\"}\n{\"cmd\":\"pau");
        assert_eq!(
            conn.read_requests(),
            Input::Lines(vec![Ok(Request::Status)])
        );
        let _ = b.write_all(b"se\"}\n");
        assert_eq!(conn.read_requests(), Input::Lines(vec![Ok(Request::Pause)]));
        let _ = b.write_all(&vec![b'x'; MAX_REQUEST_LINE + 10]);
        match conn.read_requests() {
            Input::Lines(l) => assert!(matches!(l.as_slice(), [Err(_)])),
            other => panic!("{other:?}"),
        }
        assert!(
            !conn.send(&Reply::error("too long")),
            "closing after the error"
        );
        drop(b);
    }
}
