//! Boot benchmark: exec → guest first instruction, and VMM memory overhead.
//!
//! Both VMMs boot the same probe guest (PVH build). The first instruction of the
//! guest writes 0x01 to I/O port 0xe9: keel-vmm logs the CLOCK_MONOTONIC time it saw
//! that write; for QEMU an `isa-debugcon` on port 0xe9 sends the byte over a unix
//! socket this benchmark listens on. The start time is taken right before spawn,
//! so the result includes fork and exec.
//!
//! Memory overhead is the VMM's resident memory that is not guest RAM: with guest
//! RAM in a memfd (both VMMs here), that is `VmRSS - RssShmem`, read while the
//! guest is running.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::error::{io_err, BenchError};

use crate::stats::median;

/// Parameters of a boot benchmark.
#[derive(Debug)]
pub struct BootBench {
    /// Runs per VMM.
    pub runs: usize,
    /// keel-vmm binary.
    pub keel: PathBuf,
    /// PVH probe guest.
    pub guest: PathBuf,
    /// QEMU binary, if the reference is wanted.
    pub qemu: Option<String>,
}

/// One run's numbers.
#[derive(Debug, Clone, Copy)]
struct Sample {
    first_instruction_us: f64,
    overhead_kib: f64,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// `VmRSS - RssShmem` of `pid`, in KiB.
fn overhead_kib(pid: u32) -> Result<f64, BenchError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(io_err(format!("/proc/{pid}/status")))?;
    let field = |name: &str| -> Option<f64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    match (field("VmRSS:"), field("RssShmem:")) {
        (Some(rss), Some(shmem)) => Ok(rss - shmem),
        _ => Err(BenchError::Run(format!(
            "no VmRSS/RssShmem in /proc/{pid}/status"
        ))),
    }
}

/// Spawns a line reader over `stream` that sends each line on the returned channel.
fn lines(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(
    rx: &mpsc::Receiver<String>,
    pred: impl Fn(&str) -> bool,
    what: &str,
) -> Result<String, BenchError> {
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if pred(&line) => return Ok(line),
            Ok(_) => {}
            Err(_) => return Err(BenchError::Run(format!("timed out waiting for {what}"))),
        }
    }
}

/// Ends a child this benchmark started and reaps it.
fn stop(child: &mut Child) {
    // SAFETY: plain syscall on the PID of our own unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    for _ in 0..500 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn keel_run(bench: &BootBench, dir: &Path) -> Result<Sample, BenchError> {
    let config = dir.join("bench.toml");
    let guest = std::fs::canonicalize(&bench.guest)
        .map_err(io_err(format!("guest {}", bench.guest.display())))?;
    std::fs::write(
        &config,
        format!(
            "name = \"bench\"\n[memory]\nsize = \"64MiB\"\n[boot]\nkernel = \"{}\"\n\
             cmdline = \"console=ttyS0 probe.mode=spin\"\n",
            guest.display()
        ),
    )
    .map_err(io_err("write bench config"))?;
    let start = monotonic_ns();
    let mut child = Command::new(&bench.keel)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("spawn {}", bench.keel.display())))?;
    let result = (|| {
        let out = lines(
            child
                .stdout
                .take()
                .ok_or_else(|| BenchError::Run("no stdout".into()))?,
        );
        let err = lines(
            child
                .stderr
                .take()
                .ok_or_else(|| BenchError::Run("no stderr".into()))?,
        );
        let line = wait_line(
            &err,
            |l| l.contains("guest first instruction"),
            "keel's first-instruction log",
        )?;
        let ns: u64 = line
            .split("monotonic_ns=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| BenchError::Run(format!("cannot parse {line:?}")))?;
        wait_line(
            &out,
            |l| l.contains("keel-probe: tick 2"),
            "the guest's second tick",
        )?;
        Ok(Sample {
            first_instruction_us: ns.saturating_sub(start) as f64 / 1000.0,
            overhead_kib: overhead_kib(child.id())?,
        })
    })();
    stop(&mut child);
    result
}

fn qemu_run(qemu: &str, guest: &Path, dir: &Path) -> Result<Sample, BenchError> {
    let sock = dir.join("debugcon.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(io_err("bind debugcon socket"))?;
    let start = monotonic_ns();
    let mut child = Command::new(qemu)
        .args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,memory-backend=mem",
            "-accel",
            "kvm",
            "-m",
            "64M",
            "-object",
            "memory-backend-memfd,id=mem,size=64M,share=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-chardev",
        ])
        .arg(format!("socket,id=dbg,path={}", sock.display()))
        .args(["-device", "isa-debugcon,iobase=0xe9,chardev=dbg", "-kernel"])
        .arg(guest)
        .args(["-append", "console=ttyS0 probe.mode=spin"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("spawn {qemu}")))?;
    let result = (|| {
        let out = lines(
            child
                .stdout
                .take()
                .ok_or_else(|| BenchError::Run("no stdout".into()))?,
        );
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let first = listener.accept().and_then(|(mut s, _)| {
                let mut byte = [0u8; 1];
                s.read_exact(&mut byte).map(|()| (monotonic_ns(), byte[0]))
            });
            let _ = tx.send(first);
        });
        let (ns, byte) = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| BenchError::Run("QEMU: no debugcon byte within 60 s".into()))?
            .map_err(io_err("QEMU debugcon"))?;
        if byte != 1 {
            return Err(BenchError::Run(format!("QEMU: first debug byte {byte:#x}")));
        }
        wait_line(
            &out,
            |l| l.contains("keel-probe: tick 2"),
            "the guest's second tick under QEMU",
        )?;
        Ok(Sample {
            first_instruction_us: ns.saturating_sub(start) as f64 / 1000.0,
            overhead_kib: overhead_kib(child.id())?,
        })
    })();
    stop(&mut child);
    result
}

fn summarize(name: &str, samples: &[Sample]) -> Option<(f64, f64)> {
    let first: Vec<f64> = samples.iter().map(|s| s.first_instruction_us).collect();
    let mem: Vec<f64> = samples.iter().map(|s| s.overhead_kib).collect();
    let (f, m) = (median(&first)?, median(&mem)?);
    println!(
        "{name:<10} runs={:<3} exec->first instruction median {:>9.0} us   memory overhead median {:>7.0} KiB",
        samples.len(),
        f,
        m
    );
    Some((f, m))
}

/// Runs the boot benchmark and prints medians and ratios.
pub fn run(bench: &BootBench) -> Result<(), BenchError> {
    let dir = tempfile::Builder::new()
        .prefix("keel-bench-")
        .tempdir()
        .map_err(io_err("temp dir"))?;
    let mut keel = Vec::new();
    let mut qemu = Vec::new();
    // Interleave the VMMs so drift on a noisy machine hits both alike.
    for _ in 0..bench.runs {
        keel.push(keel_run(bench, dir.path())?);
        if let Some(q) = &bench.qemu {
            qemu.push(qemu_run(q, &bench.guest, dir.path())?);
        }
    }
    let k = summarize("keel-vmm", &keel);
    let q = summarize("qemu", &qemu);
    if let (Some((kf, km)), Some((qf, qm))) = (k, q) {
        println!(
            "ratio keel/qemu: first instruction {:.3}, memory overhead {:.3}",
            kf / qf,
            km / qm
        );
    }
    Ok(())
}
