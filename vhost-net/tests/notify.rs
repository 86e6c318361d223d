//! sd_notify: READY=1, watchdog pings at half of WATCHDOG_USEC, STOPPING=1 and a
//! clean exit on SIGTERM, seen by a datagram listener standing in for systemd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_sd_notify::NotifyListener;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let listener = NotifyListener::bind(dir.path().join("notify.sock").to_str().unwrap()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel-vhost-net"))
        .arg("--port")
        .arg(format!(
            "name=p0,socket={}",
            dir.path().join("p0.sock").display()
        ))
        .env("NOTIFY_SOCKET", listener.address())
        .env("WATCHDOG_USEC", "200000")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    listener.recv_line("READY=1", WAIT).unwrap();
    let start = Instant::now();
    let mut pings = 0;
    while pings < 4 {
        if listener
            .recv(WAIT)
            .unwrap()
            .lines()
            .any(|l| l == "WATCHDOG=1")
        {
            pings += 1;
        }
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(elapsed <= Duration::from_secs(5), "{elapsed:?}");
    // SAFETY: plain syscall on our own, unreaped child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    listener.recv_line("STOPPING=1", WAIT).unwrap();
    assert!(child.wait().unwrap().success());
}
