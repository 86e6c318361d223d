//! sd_notify: a datagram listener stands in for systemd (`Type=notify`) and receives
//! READY=1 once the socket listens, STATUS= lines as frontends come and go, and
//! STOPPING=1 on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use common::{make_image, Backend, Client};

fn recv(listener: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = listener
        .recv(&mut buf)
        .expect("no notification within 20 s");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// Receives until a datagram contains `want`; returns it.
fn recv_until(listener: &UnixDatagram, want: &str) -> String {
    loop {
        let msg = recv(listener);
        if msg.contains(want) {
            return msg;
        }
    }
}

fn lifecycle(listener: &UnixDatagram, notify_socket: &str) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 1 << 20, 3);
    let mut backend =
        Backend::start_with_env(dir.path(), &image, &[], &[("NOTIFY_SOCKET", notify_socket)]);
    let ready = recv(listener);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.contains("STATUS=serving 1 disk(s)"), "{ready:?}");
    // READY=1 means the socket accepts connections.
    assert!(backend.socket.exists());
    let mut c = Client::connect(&backend.socket, 4096).unwrap();
    recv_until(listener, "STATUS=1 frontend(s) connected");
    assert_eq!(c.read(0, 0, 4096), 0);
    drop(c);
    recv_until(listener, "STATUS=0 frontend(s) connected");
    let status = backend.terminate();
    let stopping = recv_until(listener, "STOPPING=1");
    assert!(stopping.contains("STATUS=stopping"), "{stopping:?}");
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[test]
fn ready_status_stopping_on_a_path_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let listener = UnixDatagram::bind(&path).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    lifecycle(&listener, path.to_str().unwrap());
}

#[test]
fn ready_status_stopping_on_an_abstract_socket() {
    let name = format!("keel-vhost-blk-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = UnixDatagram::bind_addr(&addr).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    lifecycle(&listener, &format!("@{name}"));
}

#[test]
fn failure_to_listen_is_reported_and_never_ready() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let listener = UnixDatagram::bind(&path).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 1 << 20, 3);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel-vhost-blk"))
        .arg("--socket")
        .arg(dir.path().join("no/such/dir/blk.sock"))
        .arg("--image")
        .arg(&image)
        .env("NOTIFY_SOCKET", &path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = recv(&listener);
    assert!(msg.starts_with("STATUS=failed:"), "{msg:?}");
    assert!(!msg.contains("READY=1"));
}

#[test]
fn watchdog_pings_arrive_at_half_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let listener = UnixDatagram::bind(&path).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 1 << 20, 3);
    let notify = path.to_str().unwrap();
    let mut backend = Backend::start_with_env(
        dir.path(),
        &image,
        &[],
        &[("NOTIFY_SOCKET", notify), ("WATCHDOG_USEC", "200000")],
    );
    recv_until(&listener, "READY=1");
    let start = std::time::Instant::now();
    let mut pings = 0;
    while pings < 5 {
        if recv(&listener).lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }
    let elapsed = start.elapsed();
    // Five pings at ~100 ms: generous bounds for a loaded machine.
    assert!(elapsed >= Duration::from_millis(350), "{elapsed:?}");
    assert!(elapsed <= Duration::from_secs(5), "{elapsed:?}");
    assert!(backend.terminate().success());
}
