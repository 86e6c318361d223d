//! sd_notify: READY=1, watchdog pings at half of WATCHDOG_USEC, STOPPING=1 and a
//! clean exit on SIGTERM, seen by a datagram listener standing in for systemd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn recv(listener: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = listener
        .recv(&mut buf)
        .expect("no notification within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify_path).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel-vhost-net"))
        .arg("--port")
        .arg(format!(
            "name=p0,socket={}",
            dir.path().join("p0.sock").display()
        ))
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(recv(&listener).contains("READY=1"));
    let start = Instant::now();
    let mut pings = 0;
    while pings < 4 {
        if recv(&listener).lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(elapsed <= Duration::from_secs(5), "{elapsed:?}");
    // SAFETY: plain syscall on our own, unreaped child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    loop {
        if recv(&listener).contains("STOPPING=1") {
            break;
        }
    }
    assert!(child.wait().unwrap().success());
}
