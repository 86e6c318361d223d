//! sd_notify: a datagram listener stands in for systemd (`Type=notify`) and receives
//! READY=1 once the socket listens, STATUS= lines as frontends come and go, and
//! STOPPING=1 on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{make_image, Backend, Client};
use keel_sd_notify::NotifyListener;

const WAIT: Duration = Duration::from_secs(20);

fn lifecycle(listener: &NotifyListener) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 1 << 20, 3);
    let mut backend = Backend::start_with_env(
        dir.path(),
        &image,
        &[],
        &[("NOTIFY_SOCKET", listener.address())],
    );
    let ready = listener.recv(WAIT).unwrap();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.contains("STATUS=serving 1 disk(s)"), "{ready:?}");
    // READY=1 means the socket accepts connections.
    assert!(backend.socket.exists());
    let mut c = Client::connect(&backend.socket, 4096).unwrap();
    listener
        .recv_line("STATUS=1 frontend(s) connected", WAIT)
        .unwrap();
    assert_eq!(c.read(0, 0, 4096), 0);
    drop(c);
    listener
        .recv_line("STATUS=0 frontend(s) connected", WAIT)
        .unwrap();
    let status = backend.terminate();
    let stopping = listener.recv_line("STOPPING=1", WAIT).unwrap();
    assert!(stopping.contains("STATUS=stopping"), "{stopping:?}");
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[test]
fn ready_status_stopping_on_a_path_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    lifecycle(&NotifyListener::bind(path.to_str().unwrap()).unwrap());
}

#[test]
fn ready_status_stopping_on_an_abstract_socket() {
    let name = format!("@keel-vhost-blk-notify-{}", std::process::id());
    lifecycle(&NotifyListener::bind(&name).unwrap());
}

#[test]
fn failure_to_listen_is_reported_and_never_ready() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let listener = NotifyListener::bind(path.to_str().unwrap()).unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 1 << 20, 3);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel-vhost-blk"))
        .arg("--socket")
        .arg(dir.path().join("no/such/dir/blk.sock"))
        .arg("--image")
        .arg(&image)
        .env("NOTIFY_SOCKET", listener.address())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = listener.recv(WAIT).unwrap();
    assert!(msg.starts_with("STATUS=failed:"), "{msg:?}");
    assert!(!msg.contains("READY=1"));
}

#[test]
fn watchdog_pings_arrive_at_half_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let listener = NotifyListener::bind(path.to_str().unwrap()).unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 1 << 20, 3);
    let mut backend = Backend::start_with_env(
        dir.path(),
        &image,
        &[],
        &[
            ("NOTIFY_SOCKET", listener.address()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    listener.recv_line("READY=1", WAIT).unwrap();
    let start = std::time::Instant::now();
    let mut pings = 0;
    while pings < 5 {
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
    // Five pings at ~100 ms: generous bounds for a loaded machine.
    assert!(elapsed >= Duration::from_millis(350), "{elapsed:?}");
    assert!(elapsed <= Duration::from_secs(5), "{elapsed:?}");
    assert!(backend.terminate().success());
}
