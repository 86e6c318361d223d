//! The control socket and stop signals against a running VM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::{SandboxDir, Vmm, BOOT_TIMEOUT};
use serde_json::Value;

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(path: &Path) -> Self {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    return Self {
                        reader: BufReader::new(s.try_clone().unwrap()),
                        writer: s,
                    };
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot connect to {}: {e}", path.display()),
            }
        }
    }

    fn raw(&mut self, line: &[u8]) -> Value {
        self.writer.write_all(line).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut reply = String::new();
        self.reader.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad reply {reply:?}: {e}"))
    }

    fn cmd(&mut self, cmd: &str) -> Value {
        self.raw(format!("{{\"cmd\":\"{cmd}\"}}").as_bytes())
    }
}

fn last_tick(out: &str) -> Option<u64> {
    out.lines()
        .rev()
        .filter_map(|l| l.strip_prefix("keel-probe: tick "))
        .find_map(|n| n.trim().parse().ok())
}

#[test]
fn status_pause_resume_and_shutdown() {
    let dir = SandboxDir::new();
    let sock = dir.path("control.sock");
    let extra = format!("[control]\nsocket = \"{}\"\n", sock.display());
    let config = dir.probe_config("spin", 2, &extra);
    let mut vmm = Vmm::start(&config);
    vmm.stdout.wait_for("keel-probe: tick 2", BOOT_TIMEOUT);
    let mut client = Client::connect(&sock);

    let status = client.cmd("status");
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["state"], "running");
    assert_eq!(status["name"], "test");
    assert_eq!(status["vcpus"], 2);
    assert_eq!(status["memory_bytes"], 64 << 20);

    let paused = client.cmd("pause");
    assert_eq!(paused["ok"], true, "{paused}");
    assert_eq!(client.cmd("status")["state"], "paused");
    assert_eq!(client.cmd("pause")["ok"], false, "double pause is an error");
    // Give a guest that was not really paused time to tick on (ticks are ~100 ms).
    let before = last_tick(&vmm.stdout.text());
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        last_tick(&vmm.stdout.text()),
        before,
        "guest ran while paused"
    );

    let resumed = client.cmd("resume");
    assert_eq!(resumed["ok"], true, "{resumed}");
    let next = before.unwrap_or(0) + 2;
    vmm.stdout
        .wait_for(&format!("keel-probe: tick {next}"), BOOT_TIMEOUT);
    assert_eq!(
        client.cmd("resume")["ok"],
        false,
        "resume when running is an error"
    );

    let bye = client.cmd("shutdown");
    assert_eq!(bye["ok"], true, "{bye}");
    let status = vmm.wait(Duration::from_secs(30));
    assert!(status.success(), "{}", vmm.stderr.text());
    assert!(!sock.exists(), "control socket left behind");
}

#[test]
fn bad_requests_get_errors_and_the_vm_keeps_running() {
    let dir = SandboxDir::new();
    let sock = dir.path("control.sock");
    let extra = format!("[control]\nsocket = \"{}\"\n", sock.display());
    let config = dir.probe_config("spin", 1, &extra);
    let mut vmm = Vmm::start(&config);
    let mut client = Client::connect(&sock);
    for bad in [
        &b"not json"[..],
        b"{}",
        b"{\"cmd\":\"reboot\"}",
        b"{\"cmd\":\"status\",\"x\":1}",
        b"\xff\xfe\x00",
        b"[]",
        b"",
    ] {
        let reply = client.raw(bad);
        assert_eq!(reply["ok"], false, "{bad:?} -> {reply}");
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    // An over-long line: error reply, then the VMM closes that connection (possibly
    // before all of it was written, so write errors are expected here).
    let _ = client.writer.write_all(&vec![b'a'; 10_000]);
    let mut reply = String::new();
    client.reader.read_line(&mut reply).unwrap();
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"].as_str().unwrap().contains("longer than"),
        "{reply}"
    );
    // A client that connects and vanishes mid-request.
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"{\"cmd\":\"sta").unwrap();
    }
    let mut fresh = Client::connect(&sock);
    assert_eq!(fresh.cmd("status")["ok"], true);
    assert_eq!(fresh.cmd("shutdown")["ok"], true);
    assert!(vmm.wait(Duration::from_secs(30)).success());
}

#[test]
fn sigterm_stops_the_vm_in_order() {
    let dir = SandboxDir::new();
    let sock = dir.path("control.sock");
    let extra = format!("[control]\nsocket = \"{}\"\n", sock.display());
    let config = dir.probe_config("spin", 2, &extra);
    let mut vmm = Vmm::start(&config);
    vmm.stdout.wait_for("keel-probe: tick 1", BOOT_TIMEOUT);
    vmm.signal(libc::SIGTERM);
    let status = vmm.wait(Duration::from_secs(30));
    assert!(status.success(), "{}", vmm.stderr.text());
    assert!(vmm.stderr.text().contains("SIGTERM received"));
    assert!(!sock.exists(), "control socket left behind");
}

#[test]
fn a_live_control_socket_is_not_stolen() {
    let dir = SandboxDir::new();
    let sock = dir.path("control.sock");
    let extra = format!("[control]\nsocket = \"{}\"\n", sock.display());
    let config = dir.probe_config("spin", 1, &extra);
    let mut first = Vmm::start(&config);
    let _client = Client::connect(&sock);
    let mut second = Vmm::start(&config);
    let status = second.wait(BOOT_TIMEOUT);
    assert_eq!(status.code(), Some(1));
    assert!(
        second
            .stderr
            .text()
            .contains("another process is listening"),
        "{}",
        second.stderr.text()
    );
    first.signal(libc::SIGTERM);
    assert!(first.wait(Duration::from_secs(30)).success());
}

fn thread_affinity(pid: i32, thread_name: &str) -> Option<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == thread_name {
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|s| s.trim().to_owned());
        }
    }
    None
}

#[test]
fn vcpu_threads_are_pinned_as_configured() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let last = cpus.saturating_sub(1);
    let dir = SandboxDir::new();
    let extra = "[vmm]\naffinity = [0]\n";
    let config = dir.config(&format!(
        "name = \"pinned\"\n[vcpus]\ncount = 2\naffinity = [[{last}], [0]]\n\
         [memory]\nsize = \"64MiB\"\n[boot]\nkernel = \"{}\"\ncmdline = \"probe.mode=spin\"\n{extra}",
        common::probe_elf().display()
    ));
    let mut vmm = Vmm::start(&config);
    vmm.stdout.wait_for("keel-probe: tick 1", BOOT_TIMEOUT);
    assert_eq!(
        thread_affinity(vmm.pid(), "vcpu0").as_deref(),
        Some(last.to_string().as_str())
    );
    assert_eq!(thread_affinity(vmm.pid(), "vcpu1").as_deref(), Some("0"));
    assert_eq!(thread_affinity(vmm.pid(), "keel-vmm").as_deref(), Some("0"));
    vmm.signal(libc::SIGTERM);
    assert!(vmm.wait(Duration::from_secs(30)).success());
}
