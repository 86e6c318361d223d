//! Network namespaces the tests create (and delete when dropped).

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A network namespace, deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    /// Creates `{prefix}-{pid}-{n}` (unique within the process: tests run in
    /// parallel threads); `None` (with a "skipping" line) without root or iproute2.
    pub fn create(prefix: &str) -> Option<Netns> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("skipping: cannot create a network namespace (needs root and iproute2)");
            return None;
        }
        Some(Netns(name))
    }

    /// Runs `ip ARGS` in the namespace; panics if it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The kernel's RX packet count of `dev`.
    pub fn rx_packets(&self, dev: &str) -> u64 {
        let out = self.ip(&["-s", "-j", "link", "show", dev]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
    }

    /// The namespace's TCP counter `name` from /proc/net/snmp (IPv4 and IPv6).
    pub fn tcp_counter(&self, name: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "cat", "/proc/net/snmp"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("Tcp:")).collect();
        let (keys, values) = (lines[0], lines[1]);
        let at = keys.split_whitespace().position(|k| k == name).unwrap();
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
