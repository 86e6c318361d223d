//! Network benchmark: keel-vhost-net against DPDK testpmd's own vhost PMD
//! (`net_vhost`), both driven by the same frontend, testpmd's `net_virtio_user`
//! PMD in `txonly` mode (a real vhost-user frontend without a VM).
//!
//! - `rx`: the backend only receives (testpmd `rxonly`; keel with one port, whose
//!   frames have nowhere to go). Rate: testpmd's `Rx-pps`, keel's `tx_packets`
//!   counter (frames taken from the frontend's TX ring).
//! - `loop`: port to port, the way DPDK's PVP tests loop traffic, and it fits two
//!   cores. One testpmd with two virtio-user ports (MACs ..:01 on p0, ..:02 on p1)
//!   in `mac` forwarding mode starts with a burst on each port (`--tx-first`) and
//!   sends every frame it receives on one port out of the other, addressed to the
//!   other port's MAC. The backend forwards p0 to p1 and back: testpmd `io`
//!   forwarding between two `net_vhost` ports, or keel switching by MAC. Rate: the
//!   sum over both frontend ports of testpmd's `Rx-pps`, the same for both.
//! - `fwd` (needs three free cores to mean much): port to port with a separate
//!   sender (`txonly`) and receiver (`rxonly`); rate: the receiver's `Rx-pps`.
//!
//! The frontends run on CPU 0, the backend alone on CPU 1. Each measurement is the
//! median of the per-second rates over the window.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_vhost_net::control_client::ControlClient;

use crate::error::{io_err, BenchError};

use crate::stats::median;

/// Parameters of the network benchmark.
#[derive(Debug)]
pub struct NetBench {
    /// keel-vhost-net binary.
    pub keel: PathBuf,
    /// testpmd binary.
    pub testpmd: String,
    /// Seconds per measurement (after a 2 s warm-up).
    pub seconds: u64,
    /// Frame sizes in bytes.
    pub sizes: Vec<usize>,
    /// keel's busy-poll window in microseconds (0: event mode).
    pub poll_us: u64,
    /// The tests to run, in order, for each frame size.
    pub tests: Vec<NetTest>,
    /// keel polls every port from one shared thread on the backend's CPU.
    pub shared_poll: bool,
    /// Frames each frontend port puts into the loop at the start (testpmd
    /// `--burst`, 1..=512); the loop then holds twice this many. Small values
    /// measure latency (rate = frames in flight / round trip), large ones
    /// throughput.
    pub loop_burst: usize,
    /// Rounds per point: keel and the reference measured alternately this many
    /// times each (the order flips every round, so that a drift of the host favours
    /// neither), reported as medians.
    pub rounds: usize,
}

/// One kind of measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetTest {
    /// The backend receives only.
    Rx,
    /// Port-to-port loop driven by one two-port frontend (fits two cores).
    Loop,
    /// Port to port with separate sender and receiver. It needs three busy pollers:
    /// on a 2-core machine two share a core, and the receiver's ring overflows
    /// whenever the scheduler takes its core away, so the result measures the
    /// scheduler more than the backend.
    Fwd,
}

/// A child process killed (by PID) when dropped; testpmd's hugepage files go with it.
struct Proc {
    child: Child,
    hugepage_prefix: Option<String>,
    log: PathBuf,
}

impl Proc {
    fn stop(&mut self) {
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(prefix) = &self.hugepage_prefix {
            if let Ok(entries) = std::fs::read_dir("/dev/hugepages") {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with(prefix.as_str()) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(cmd: &mut Command, log: &Path, prefix: Option<String>) -> Result<Proc, BenchError> {
    let out = std::fs::File::create(log).map_err(io_err(format!("{}", log.display())))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            out.try_clone().map_err(io_err("duplicate a log fd"))?,
        ))
        .stderr(Stdio::from(out))
        .spawn()
        .map_err(io_err(format!("start {:?}", cmd.get_program())))?;
    Ok(Proc {
        child,
        hugepage_prefix: prefix,
        log: log.to_path_buf(),
    })
}

/// testpmd with the given vdevs and application arguments on `cpu`.
fn testpmd(
    b: &NetBench,
    dir: &Path,
    tag: &str,
    cpu: usize,
    vdevs: &[String],
    app: &[String],
) -> Result<Proc, BenchError> {
    let prefix = format!("keelbench-{}-{tag}", std::process::id());
    let mut cmd = Command::new(&b.testpmd);
    cmd.arg(format!("--lcores=0@{cpu},1@{cpu}"))
        .args(["-n", "1", "--no-pci", "--single-file-segments", "-m", "256"])
        .arg(format!("--file-prefix={prefix}"));
    for v in vdevs {
        cmd.arg("--vdev").arg(v);
    }
    cmd.arg("--")
        .args(["--stats-period=1", "--no-mlockall"])
        .args(app);
    spawn(&mut cmd, &dir.join(format!("{tag}.log")), Some(prefix))
}

fn wait_for_path(p: &Path) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.exists() {
        if Instant::now() > deadline {
            return Err(BenchError::Run(format!("{} never appeared", p.display())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The frontend: virtio-user `txonly` with `size`-byte frames to `dst`, on CPU 0.
fn sender(b: &NetBench, dir: &Path, sock: &Path, size: usize) -> Result<Proc, BenchError> {
    testpmd(
        b,
        dir,
        "sender",
        0,
        &[format!(
            "net_virtio_user0,path={},queues=1,mac=52:54:00:00:00:01",
            sock.display()
        )],
        &[
            "--forward-mode=txonly".into(),
            format!("--txpkts={size}"),
            "--eth-peer=0,52:54:00:00:00:02".into(),
        ],
    )
}

/// The median of the last `n` `Rx-pps:` values in testpmd's output.
fn rx_pps(log: &str, n: usize) -> Option<f64> {
    let v: Vec<f64> = log
        .lines()
        .filter_map(|l| {
            let at = l.find("Rx-pps:")?;
            l[at + 7..].split_whitespace().next()?.parse().ok()
        })
        .filter(|&x: &f64| x > 0.0)
        .collect();
    let tail = &v[v.len().saturating_sub(n)..];
    median(tail)
}

/// keel's `tx_packets` of port `p0` from its control socket.
fn keel_tx_packets(control: &Path) -> Result<u64, BenchError> {
    let p0 = ControlClient::new(control)
        .port("p0")
        .map_err(|e| BenchError::Run(e.to_string()))?;
    p0["tx_packets"]
        .as_u64()
        .ok_or_else(|| BenchError::Run(format!("no tx_packets in {p0}")))
}

fn keel(b: &NetBench, dir: &Path, ports: usize) -> Result<Proc, BenchError> {
    let control = dir.join("control.sock");
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"]).arg(&b.keel);
    for i in 0..ports {
        cmd.arg("--port").arg(format!(
            "name=p{i},socket={}/p{i}.sock,mac=52:54:00:00:00:0{}",
            dir.display(),
            i + 1
        ));
    }
    cmd.arg("--control")
        .arg(&control)
        .arg("--poll-us")
        .arg(b.poll_us.to_string());
    if b.shared_poll && b.poll_us > 0 {
        cmd.args(["--poll-cpus", "1"]);
    }
    let p = spawn(&mut cmd, &dir.join("keel.log"), None)?;
    wait_for_path(&control)?;
    Ok(p)
}

const WARMUP: Duration = Duration::from_secs(2);

/// Receive rate of the reference (testpmd net_vhost rxonly), in packets/s.
fn rx_reference(b: &NetBench, dir: &Path, size: usize) -> Result<f64, BenchError> {
    let sock = dir.join("vhost0.sock");
    let be = testpmd(
        b,
        dir,
        "ref-rx",
        1,
        &[format!("net_vhost0,iface={},queues=1", sock.display())],
        &["--forward-mode=rxonly".into()],
    )?;
    wait_for_path(&sock)?;
    let _fe = sender(b, dir, &sock, size)?;
    std::thread::sleep(WARMUP + Duration::from_secs(b.seconds));
    rx_pps(&be.output(), b.seconds as usize)
        .ok_or_else(|| BenchError::Run(format!("no Rx-pps from testpmd:\n{}", be.output())))
}

/// Receive rate of keel-vhost-net with one port, in packets/s.
fn rx_keel(b: &NetBench, dir: &Path, size: usize) -> Result<f64, BenchError> {
    let _be = keel(b, dir, 1)?;
    let sock = dir.join("p0.sock");
    let _fe = sender(b, dir, &sock, size)?;
    std::thread::sleep(WARMUP);
    let control = dir.join("control.sock");
    let mut rates = Vec::new();
    let mut last = keel_tx_packets(&control)?;
    for _ in 0..b.seconds {
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        let now = keel_tx_packets(&control)?;
        rates.push((now - last) as f64 / t.elapsed().as_secs_f64());
        last = now;
    }
    median(&rates).ok_or_else(|| BenchError::Run("no keel samples".into()))
}

/// A two-port backend on CPU 1: testpmd io-forwarding between two net_vhost ports
/// (`reference`) or keel; returns the two sockets and the process.
fn two_port_backend(
    b: &NetBench,
    dir: &Path,
    reference: bool,
) -> Result<(PathBuf, PathBuf, Proc), BenchError> {
    Ok(if reference {
        let (s0, s1) = (dir.join("vhost0.sock"), dir.join("vhost1.sock"));
        let be = testpmd(
            b,
            dir,
            "ref-fwd",
            1,
            &[
                format!("net_vhost0,iface={},queues=1", s0.display()),
                format!("net_vhost1,iface={},queues=1", s1.display()),
            ],
            &["--forward-mode=io".into()],
        )?;
        wait_for_path(&s0)?;
        wait_for_path(&s1)?;
        (s0, s1, be)
    } else {
        let be = keel(b, dir, 2)?;
        (dir.join("p0.sock"), dir.join("p1.sock"), be)
    })
}

/// The median `Rx-pps` of each port over the last `n` reports in testpmd's output.
fn rx_pps_per_port(log: &str, n: usize) -> Vec<f64> {
    let mut per_port: Vec<Vec<f64>> = Vec::new();
    let mut port = None;
    for l in log.lines() {
        if let Some(at) = l.find("statistics for port ") {
            port = l[at + 20..]
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<usize>().ok());
        } else if let (Some(p), Some(at)) = (port, l.find("Rx-pps:")) {
            if let Some(v) = l[at + 7..]
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
            {
                if per_port.len() <= p {
                    per_port.resize(p + 1, Vec::new());
                }
                per_port[p].push(v);
            }
        }
    }
    per_port
        .iter()
        .filter_map(|v| median(&v[v.len().saturating_sub(n)..]))
        .collect()
}

/// Port-to-port loop rate (frames per second received by the two-port frontend)
/// through testpmd io-forwarding (`reference`) or through keel.
fn loop_rate(b: &NetBench, dir: &Path, size: usize, reference: bool) -> Result<f64, BenchError> {
    let (s0, s1, _be) = two_port_backend(b, dir, reference)?;
    let fe = testpmd(
        b,
        dir,
        "loop",
        0,
        &[
            format!(
                "net_virtio_user0,path={},queues=1,mac=52:54:00:00:00:01",
                s0.display()
            ),
            format!(
                "net_virtio_user1,path={},queues=1,mac=52:54:00:00:00:02",
                s1.display()
            ),
        ],
        &[
            "--forward-mode=mac".into(),
            "--eth-peer=0,52:54:00:00:00:02".into(),
            "--eth-peer=1,52:54:00:00:00:01".into(),
            "--tx-first".into(),
            format!("--burst={}", b.loop_burst),
            format!("--txpkts={size}"),
        ],
    )?;
    std::thread::sleep(WARMUP + Duration::from_secs(b.seconds));
    let rates = rx_pps_per_port(&fe.output(), b.seconds as usize);
    if rates.len() != 2 {
        return Err(BenchError::Run(format!(
            "expected Rx-pps of two ports from the loop frontend:\n{}",
            fe.output()
        )));
    }
    Ok(rates.iter().sum())
}

/// Port-to-port rate at a virtio-user receiver, through testpmd io-forwarding
/// between two net_vhost ports (`reference`) or through keel.
fn fwd(b: &NetBench, dir: &Path, size: usize, reference: bool) -> Result<f64, BenchError> {
    let (s0, s1, _be) = two_port_backend(b, dir, reference)?;
    // The receiver shares CPU 0 with the sender: the backend has CPU 1 to itself.
    let rx = testpmd(
        b,
        dir,
        "receiver",
        0,
        &[format!(
            "net_virtio_user0,path={},queues=1,mac=52:54:00:00:00:02",
            s1.display()
        )],
        &["--forward-mode=rxonly".into()],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let _fe = sender(b, dir, &s0, size)?;
    std::thread::sleep(WARMUP + Duration::from_secs(b.seconds));
    rx_pps(&rx.output(), b.seconds as usize)
        .ok_or_else(|| BenchError::Run(format!("no Rx-pps at the receiver:\n{}", rx.output())))
}

fn fresh_dir() -> Result<tempfile::TempDir, BenchError> {
    tempfile::tempdir().map_err(io_err("create a temporary directory"))
}

/// One measurement of `test` at `size` bytes: keel, or the reference.
fn measure(b: &NetBench, test: NetTest, size: usize, reference: bool) -> Result<f64, BenchError> {
    let dir = fresh_dir()?;
    match (test, reference) {
        (NetTest::Rx, false) => rx_keel(b, dir.path(), size),
        (NetTest::Rx, true) => rx_reference(b, dir.path(), size),
        (NetTest::Loop, _) => loop_rate(b, dir.path(), size, reference),
        (NetTest::Fwd, _) => fwd(b, dir.path(), size, reference),
    }
}

/// Runs the benchmark and prints one table row per measurement.
pub fn run(b: &NetBench) -> Result<(), BenchError> {
    if !b.keel.is_file() {
        return Err(BenchError::Run(format!(
            "{} not found: run `cargo build --release -p keel-vhost-net` first (or give --keel)",
            b.keel.display()
        )));
    }
    println!(
        "keel-vhost-net ({}{}) vs testpmd net_vhost; frontends testpmd virtio-user; {} s per point",
        if b.poll_us == 0 {
            "event mode".to_string()
        } else {
            format!("busy-poll {} us", b.poll_us)
        },
        if b.shared_poll && b.poll_us > 0 {
            ", one shared poll thread"
        } else {
            ""
        },
        b.seconds
    );
    if b.tests.contains(&NetTest::Loop) {
        println!(
            "loop: {} frames per frontend port in flight; rate = both ports' Rx-pps",
            b.loop_burst
        );
    }
    println!(
        "{} round(s) per point, keel and testpmd alternating; Mpps are medians, ratio is the median of the rounds' ratios",
        b.rounds
    );
    println!("| test | frame | keel Mpps | testpmd Mpps | ratio | rounds' ratios |");
    println!("|---|---|---|---|---|---|");
    for &size in &b.sizes {
        for &test in &b.tests {
            let (mut keel, mut reference, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..b.rounds.max(1) {
                let (k, r) = if round % 2 == 0 {
                    let k = measure(b, test, size, false)?;
                    (k, measure(b, test, size, true)?)
                } else {
                    let r = measure(b, test, size, true)?;
                    (measure(b, test, size, false)?, r)
                };
                keel.push(k);
                reference.push(r);
                if r > 0.0 {
                    ratios.push(k / r);
                }
            }
            let name = format!("{test:?}").to_lowercase();
            let each: Vec<String> = ratios.iter().map(|x| format!("{x:.2}")).collect();
            println!(
                "| {name} | {size} B | {:.2} | {:.2} | {:.2} | {} |",
                median(&keel).unwrap_or(0.0) / 1e6,
                median(&reference).unwrap_or(0.0) / 1e6,
                median(&ratios).unwrap_or(0.0),
                each.join(" ")
            );
        }
    }
    Ok(())
}
