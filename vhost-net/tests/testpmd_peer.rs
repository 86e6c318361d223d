//! keel-vhost-net with real vhost-user frontends: DPDK testpmd's `net_virtio_user`
//! PMD (no VM needed). One testpmd transmits (`txonly`) on port p0, another receives
//! (`rxonly`) on port p1; the switch's counters and testpmd's must agree.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{last_count, testpmd_available, testpmd_lock, Backend, Testpmd};

const MAC0: &str = "52:54:00:00:00:01";
const MAC1: &str = "52:54:00:00:00:02";

/// The switch with ports p0 (MAC0) and p1 (MAC1) in `dir`, and `extra` options.
fn two_ports(dir: &std::path::Path, extra: &[&str]) -> Backend {
    Backend::start(
        dir,
        &[
            format!("name=p0,socket={}/p0.sock,mac={MAC0}", dir.display()),
            format!("name=p1,socket={}/p1.sock,mac={MAC1}", dir.display()),
        ],
        extra,
    )
}

/// A testpmd virtio-user frontend on `sock` sending frames from `mac` to MAC1
/// (`txonly`) on CPU `cpu`.
fn sender_to_p1(
    dir: &std::path::Path,
    tag: &str,
    sock: &std::path::Path,
    mac: &str,
    cpu: usize,
) -> Testpmd {
    Testpmd::start(
        dir,
        tag,
        sock,
        mac,
        "txonly",
        cpu,
        &[&format!("--eth-peer=0,{MAC1}")],
    )
}

#[test]
fn frames_cross_the_switch_and_counters_match_across_reconnects() {
    if !testpmd_available() {
        return;
    }
    let _guard = testpmd_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut be = two_ports(dir.path(), &[]);
    let (p0, p1) = (dir.path().join("p0.sock"), dir.path().join("p1.sock"));

    for round in 0..2 {
        let mut rx = Testpmd::start(
            dir.path(),
            &format!("rx{round}"),
            &p1,
            MAC1,
            "rxonly",
            1,
            &[],
        );
        be.wait_for(60, "p1 connected", |b| b.port("p1")["connected"] == true);
        let b1 = be.port("p1");
        let before_rx = b1["rx_packets"].as_u64().unwrap();
        let before_tx = be.counter("p0", "tx_packets");
        let mut tx = sender_to_p1(dir.path(), &format!("tx{round}"), &p0, MAC0, 0);
        be.wait_for(60, "frames on p1", |b| {
            b.counter("p1", "rx_packets") > before_rx + 20_000
        });
        let tx_log = tx.stop();
        be.wait_for(20, "p0 disconnected", |b| {
            b.port("p0")["connected"] == false
        });
        // Everything p0 sent reached p1's ring or was counted as dropped there.
        let s0 = be.port("p0");
        let s1 = be.port("p1");
        let sent = s0["tx_packets"].as_u64().unwrap() - before_tx;
        let got = s1["rx_packets"].as_u64().unwrap() - before_rx;
        let c1 = |k: &str| s1[k].as_u64().unwrap() - b1[k].as_u64().unwrap();
        assert!(sent > 20_000, "{s0}");
        assert_eq!(s0["drop_spoofed"], 0, "{s0}");
        assert_eq!(s0["drop_bad_descriptor"], 0, "{s0}");
        assert_eq!(
            s0["tx_bytes"].as_u64().unwrap(),
            64 * s0["tx_packets"].as_u64().unwrap()
        );
        assert_eq!(
            sent,
            got + c1("drop_rx_no_buffer") + c1("drop_rx_not_ready"),
            "p0 {s0}\np1 {s1}"
        );
        // testpmd's own transmit count matches what the switch took from p0.
        let tpmd_tx = last_count(&tx_log, "TX-packets:").unwrap();
        assert_eq!(tpmd_tx, sent, "testpmd tx log:\n{tx_log}");
        // And its receive count matches what the switch delivered to p1.
        let rx_log = rx.stop();
        let tpmd_rx = last_count(&rx_log, "RX-packets:").unwrap();
        assert_eq!(tpmd_rx, got, "p1 {s1}\ntestpmd rx log:\n{rx_log}");
        be.wait_for(20, "p1 disconnected", |b| {
            b.port("p1")["connected"] == false
        });
        assert!(be.is_running(), "the switch exited with its frontends");
        // The switch learned p0's address.
        assert!(be.request(r#"{"cmd":"stats"}"#)["macs"].as_u64().unwrap() >= 1);
    }

    // A frontend killed outright (SIGKILL) only affects its port.
    let mut rx = Testpmd::start(dir.path(), "rx-killed", &p1, MAC1, "rxonly", 1, &[]);
    be.wait_for(60, "p1 connected", |b| b.port("p1")["connected"] == true);
    rx.kill();
    be.wait_for(20, "p1 disconnected", |b| {
        b.port("p1")["connected"] == false
    });
    assert!(be.is_running());
}

#[test]
fn spoofed_source_macs_are_dropped_and_counted() {
    if !testpmd_available() {
        return;
    }
    let _guard = testpmd_lock();
    let dir = tempfile::tempdir().unwrap();
    let be = two_ports(dir.path(), &[]);
    let p0 = dir.path().join("p0.sock");
    // testpmd on p0 uses another MAC than the port's configured one.
    let mut tx = sender_to_p1(dir.path(), "spoof", &p0, "52:54:00:00:00:99", 0);
    be.wait_for(60, "spoofed drops", |b| {
        b.counter("p0", "drop_spoofed") > 10_000
    });
    tx.stop();
    let s0 = be.port("p0");
    assert_eq!(s0["tx_packets"], 0, "{s0}");
    assert_eq!(be.counter("p1", "drop_rx_not_ready"), 0);
    assert_eq!(be.request(r#"{"cmd":"stats"}"#)["macs"], 0);
}

#[test]
fn control_socket_adds_and_removes_ports() {
    let dir = tempfile::tempdir().unwrap();
    let be = Backend::start(
        dir.path(),
        &[format!("name=p0,socket={}/p0.sock", dir.path().display())],
        &[],
    );
    let p2 = dir.path().join("p2.sock");
    let r = be.request(&format!(
        r#"{{"cmd":"add-port","name":"p2","socket":"{}","mac":"52:54:00:00:00:03"}}"#,
        p2.display()
    ));
    assert_eq!(r["ok"], true, "{r}");
    assert!(p2.exists());
    let port = be.port("p2");
    assert_eq!(port["mac"], "52:54:00:00:00:03");
    assert_eq!(port["connected"], false);
    // Duplicates, bad values and unknown requests are refused with a reason.
    let r = be.request(&format!(
        r#"{{"cmd":"add-port","name":"p2","socket":"{}/x.sock"}}"#,
        dir.path().display()
    ));
    assert!(
        r["error"].as_str().unwrap().contains("defined twice"),
        "{r}"
    );
    let r = be.request(r#"{"cmd":"add-port","name":"p3","socket":"rel.sock"}"#);
    assert!(r["error"].as_str().unwrap().contains("absolute"), "{r}");
    let r = be.request(r#"{"cmd":"add-port","name":"p3","socket":"/tmp/x","mac":"zz"}"#);
    assert_eq!(r["ok"], false, "{r}");
    let r = be.request(r#"{"cmd":"reboot"}"#);
    assert_eq!(r["ok"], false, "{r}");
    let r = be.request("not json");
    assert_eq!(r["ok"], false, "{r}");
    // A connected client is cut off when its port is removed.
    let client = std::os::unix::net::UnixStream::connect(&p2).unwrap();
    be.wait_for(10, "p2 connected", |b| b.port("p2")["connected"] == true);
    let r = be.request(r#"{"cmd":"remove-port","name":"p2"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert!(!p2.exists(), "socket left behind");
    let mut buf = [0u8; 1];
    use std::io::Read;
    assert_eq!((&client).read(&mut buf).unwrap_or(0), 0);
    let r = be.request(r#"{"cmd":"remove-port","name":"p2"}"#);
    assert!(r["error"].as_str().unwrap().contains("no port"), "{r}");
    // The name can be used again.
    let r = be.request(&format!(
        r#"{{"cmd":"add-port","name":"p2","socket":"{}"}}"#,
        p2.display()
    ));
    assert_eq!(r["ok"], true, "{r}");
    let r = be.request(r#"{"cmd":"remove-port","name":"p2"}"#);
    assert_eq!(r["ok"], true, "{r}");
    // p0 is untouched.
    assert_eq!(
        be.request(r#"{"cmd":"stats"}"#)["ports"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// The `/proc` directories of the threads of process `pid` named `name`.
fn threads_named(pid: u32, name: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| t.path())
        .filter(|t| {
            std::fs::read_to_string(t.join("comm"))
                .unwrap_or_default()
                .trim()
                == name
        })
        .collect()
}

/// CPUs allowed for each `vring_worker` thread of process `pid`.
fn worker_cpus(pid: u32) -> Vec<String> {
    threads_named(pid, "vring_worker")
        .iter()
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
            let l = status
                .lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))?;
            Some(l["Cpus_allowed_list:".len()..].trim().to_string())
        })
        .collect()
}

/// TX-packets of testpmd's forwarding stream on queue `q` in its final report.
fn stream_tx(log: &str, q: usize) -> Option<u64> {
    let key = format!("RX Port= 0/Queue= {q} -> TX Port= 0/Queue= {q}");
    let mut lines = log.lines().skip_while(|l| !l.contains(&key));
    lines.next()?;
    last_count(lines.next()?, "TX-packets:")
}

#[test]
fn queue_pairs_pinned_workers_and_rate_limits() {
    if !testpmd_available() {
        return;
    }
    let _guard = testpmd_lock();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let be = Backend::start(
        d,
        &[
            format!(
                "name=p0,socket={}/p0.sock,mac={MAC0},queues=2,cpu=1",
                d.display()
            ),
            format!("name=p1,socket={}/p1.sock,mac={MAC1}", d.display()),
        ],
        &[],
    );
    let (p0, p1) = (d.join("p0.sock"), d.join("p1.sock"));
    let _rx = Testpmd::start(d, "mq-rx", &p1, MAC1, "rxonly", 1, &[]);
    be.wait_for(60, "p1 connected", |b| b.port("p1")["connected"] == true);
    // Two queue pairs: virtio-user serves its control queue itself (like keel-vmm)
    // and enables both pairs on the backend.
    let mut tx = Testpmd::start_queues(
        d,
        "mq-tx",
        &p0,
        MAC0,
        "txonly",
        0,
        "queues=2,cq=1",
        &["--txq=2", "--rxq=2", &format!("--eth-peer=0,{MAC1}")],
    );
    be.wait_for(60, "frames from p0", |b| {
        b.counter("p0", "tx_packets") > 100_000
    });
    let s0 = be.port("p0");
    assert_eq!(s0["queues"], 2, "{s0}");
    assert_ne!(
        s0["features"].as_u64().unwrap() & (1 << 22),
        0,
        "no MQ: {s0}"
    );
    // p0's two workers are pinned to CPU 1; p1's single worker is not pinned.
    let cpus = worker_cpus(be.pid());
    assert_eq!(cpus.len(), 3, "{cpus:?}");
    assert_eq!(cpus.iter().filter(|c| *c == "1").count(), 2, "{cpus:?}");

    // A packets/s limit set through the control socket.
    let r = be.request(r#"{"cmd":"set-rate","name":"p0","pps":20000}"#);
    assert_eq!(r["ok"], true, "{r}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (t0, d0) = (
        be.counter("p0", "tx_packets"),
        be.counter("p0", "drop_rate_limit"),
    );
    let start = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let secs = start.elapsed().as_secs_f64();
    let (t1, d1) = (
        be.counter("p0", "tx_packets"),
        be.counter("p0", "drop_rate_limit"),
    );
    let rate = (t1 - t0) as f64 / secs;
    // At most the limit (plus one bucket); less when the scheduler starves the workers
    // (they share CPU 1 with the receiving testpmd) for longer than a bucket holds.
    assert!(rate < 24_000.0 && rate > 2_000.0, "{rate} pps");
    assert!(d1 > d0 + 10_000, "drops {d0} -> {d1}");
    let r = be.request(r#"{"cmd":"set-rate","name":"p0","pps":0}"#);
    assert_eq!(r["ok"], true, "{r}");
    let r = be.request(r#"{"cmd":"set-rate","name":"nope","pps":1}"#);
    assert_eq!(r["ok"], false, "{r}");

    // Both of the frontend's TX queues were served.
    let log = tx.stop();
    let s0 = be.port("p0");
    let pairs = s0["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 2, "{s0}");
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    for (q, p) in pairs.iter().enumerate() {
        let sent = stream_tx(&log, q).unwrap_or_else(|| panic!("no stream {q}:\n{log}"));
        assert!(sent > 10_000, "queue {q} sent {sent}:\n{log}");
        // Per-pair counters: what keel took from TX ring q (switched or dropped) is
        // what testpmd put on it, less at most one ring's worth still queued when
        // testpmd stopped.
        assert_eq!(n(p, "pair"), q as u64);
        let taken = n(p, "tx_packets") + n(p, "tx_drops");
        assert!(
            taken <= sent && taken + 1024 >= sent,
            "pair {q}: keel took {taken}, testpmd sent {sent}: {p}"
        );
        assert!(n(p, "tx_packets") > 10_000, "pair {q}: {p}");
        assert_eq!(n(p, "tx_bytes"), 64 * n(p, "tx_packets"), "pair {q}: {p}");
    }
    // The port totals are the sums of the pairs'.
    let sum = |k: &str| pairs.iter().map(|p| n(p, k)).sum::<u64>();
    assert_eq!(sum("tx_packets"), n(&s0, "tx_packets"), "{s0}");
    assert_eq!(sum("tx_bytes"), n(&s0, "tx_bytes"), "{s0}");
    let tx_drops: u64 = [
        "drop_spoofed",
        "drop_short",
        "drop_oversize",
        "drop_bad_descriptor",
        "drop_rate_limit",
    ]
    .iter()
    .map(|k| n(&s0, k))
    .sum();
    assert_eq!(sum("tx_drops"), tx_drops, "{s0}");
    // p1 has one pair: it received everything p1 did.
    let s1 = be.port("p1");
    let p1 = &s1["pairs"][0];
    assert_eq!(n(p1, "rx_packets"), n(&s1, "rx_packets"), "{s1}");
    assert!(n(p1, "rx_packets") > 0, "{s1}");
    assert!(s1["pairs"].as_array().unwrap().len() == 1, "{s1}");
}

/// CPU time (user + system, in clock ticks) of each thread of `pid` named `name`.
fn thread_ticks(pid: u32, name: &str) -> Vec<u64> {
    threads_named(pid, name)
        .iter()
        .map(|t| {
            let stat = std::fs::read_to_string(t.join("stat")).unwrap_or_default();
            // Fields after the ")" that closes comm: state is field 3, utime 14, stime 15.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
        })
        .collect()
}

#[test]
fn one_shared_poll_thread_serves_both_ports_across_reconnects() {
    if !testpmd_available() {
        return;
    }
    let _guard = testpmd_lock();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let be = two_ports(d, &["--poll-us", "200", "--poll-cpus", "0"]);
    let (p0, p1) = (d.join("p0.sock"), d.join("p1.sock"));
    let mut rx = Testpmd::start(d, "rx", &p1, MAC1, "rxonly", 1, &[]);
    be.wait_for(60, "p1 connected", |b| b.port("p1")["connected"] == true);
    for round in 0..2 {
        let before = be.counter("p1", "rx_packets");
        let mut tx = sender_to_p1(d, &format!("tx{round}"), &p0, MAC0, 1);
        be.wait_for(60, "frames on p1", |b| {
            b.counter("p1", "rx_packets") > before + 20_000
        });
        tx.stop();
        be.wait_for(20, "p0 disconnected", |b| {
            b.port("p0")["connected"] == false
        });
    }
    let log = std::fs::read_to_string(&be.log).unwrap();
    assert!(log.contains("poll group pinned to CPU 0"), "{log}");
    // p0's TX ring went to the group once per connection.
    assert_eq!(
        log.matches("p0: TX ring of pair 0 polled on CPU 0").count(),
        2,
        "{log}"
    );
    // The group did the polling: the per-pair workers only relay kicks.
    let poll = thread_ticks(be.pid(), "poll-cpu0");
    let workers: u64 = thread_ticks(be.pid(), "vring_worker").iter().sum();
    assert_eq!(poll.len(), 1);
    assert!(poll[0] > 2 * workers, "poll {poll:?} workers {workers}");
    // Everything p0 sent reached p1 or was counted as dropped there.
    let (s0, s1) = (be.port("p0"), be.port("p1"));
    let c1 = |k: &str| s1[k].as_u64().unwrap();
    assert_eq!(
        s0["tx_packets"].as_u64().unwrap(),
        c1("rx_packets") + c1("drop_rx_no_buffer") + c1("drop_rx_not_ready"),
        "p0 {s0}\np1 {s1}"
    );
    // A port whose ring is being polled by the group is removed mid-traffic: the
    // group lets go of it and keeps serving the rest.
    let _tx = sender_to_p1(d, "tx-removed", &p0, MAC0, 1);
    let before = be.counter("p1", "rx_packets");
    be.wait_for(60, "frames on p1 again", |b| {
        b.counter("p1", "rx_packets") > before + 10_000
    });
    let r = be.request(r#"{"cmd":"remove-port","name":"p0"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let ports = be.request(r#"{"cmd":"stats"}"#)["ports"].clone();
    assert_eq!(ports.as_array().unwrap().len(), 1, "{ports}");
    assert!(be.port("p1")["connected"] == true);
    let rx_log = rx.stop();
    let s1 = be.port("p1");
    assert_eq!(
        last_count(&rx_log, "RX-packets:").unwrap(),
        s1["rx_packets"].as_u64().unwrap(),
        "{rx_log}"
    );
}
