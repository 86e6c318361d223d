//! Block benchmark: keel-vhost-blk against qemu-storage-daemon serving the same image,
//! driven by the same client (libblkio's `virtio-blk-vhost-user` driver, one queue).
//!
//! Workloads: 4 KiB random read and random write at several queue depths. Every
//! written block carries a tag (block number, write sequence); after each write run
//! the whole image is read back through the same backend and every tag checked.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{io_err, BenchError};
use blkio::{Blkio, Completion, ReqFlags};

const BLOCK: usize = 4096;

fn bk(e: blkio::Error) -> BenchError {
    BenchError::Blkio(e.to_string())
}

/// Parameters of the block benchmark.
#[derive(Debug)]
pub struct BlkBench {
    /// keel-vhost-blk binary.
    pub keel: PathBuf,
    /// qemu-storage-daemon binary, or None to skip the reference.
    pub qsd: Option<String>,
    /// Image size in MiB.
    pub size_mib: usize,
    /// Seconds per measurement.
    pub seconds: f64,
    /// Queue depths.
    pub depths: Vec<usize>,
    /// CPUs for the backend under test and for the client (the bench itself), the
    /// same for every variant; `None`: both float over all CPUs.
    pub cpus: Option<(usize, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Workload {
    RandRead,
    RandWrite,
}

/// A backend variant under test.
struct Variant {
    name: &'static str,
    args: fn(&BlkBench, &Path, &Path) -> (String, Vec<String>),
}

fn keel_args(b: &BlkBench, img: &Path, sock: &Path, poll: bool) -> (String, Vec<String>) {
    let mut a = vec![
        "--socket".to_string(),
        sock.display().to_string(),
        "--image".into(),
        img.display().to_string(),
        "--queue-size".into(),
        "256".into(),
    ];
    if poll {
        a.extend([
            "--mode".into(),
            "poll".into(),
            "--poll-us".into(),
            "50".into(),
        ]);
    }
    (b.keel.display().to_string(), a)
}

fn qsd_args(b: &BlkBench, img: &Path, sock: &Path, aio: Option<&str>) -> (String, Vec<String>) {
    let aio = aio.map(|a| format!(",aio={a}")).unwrap_or_default();
    let a = vec![
        "--blockdev".to_string(),
        format!("driver=file,node-name=f0,filename={}{aio}", img.display()),
        "--blockdev".into(),
        "driver=raw,node-name=d0,file=f0".into(),
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=e0,addr.type=unix,addr.path={},node-name=d0,writable=on",
            sock.display()
        ),
    ];
    (b.qsd.clone().unwrap_or_default(), a)
}

const VARIANTS: [Variant; 4] = [
    Variant {
        name: "keel (event)",
        args: |b, i, s| keel_args(b, i, s, false),
    },
    Variant {
        name: "keel (poll 50us)",
        args: |b, i, s| keel_args(b, i, s, true),
    },
    Variant {
        name: "qsd aio=io_uring",
        args: |b, i, s| qsd_args(b, i, s, Some("io_uring")),
    },
    Variant {
        name: "qsd aio=threads",
        args: |b, i, s| qsd_args(b, i, s, None),
    },
];

struct Server {
    child: Child,
}

impl Server {
    fn start(program: &str, args: &[String], sock: &Path) -> Result<Server, BenchError> {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err(format!("start {program}")))?;
        let server = Server { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if Instant::now() > deadline {
                return Err(BenchError::Run(format!("{program}: no socket after 20 s")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    queue: blkio::Blkioq,
    region: blkio::MemoryRegion,
    _blkio: Blkio,
}

impl Client {
    fn connect(sock: &Path, buf_len: usize) -> Result<Client, BenchError> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(bk)?;
        b.set_str("path", &sock.display().to_string()).map_err(bk)?;
        b.connect().map_err(bk)?;
        b.set_i32("num-queues", 1).map_err(bk)?;
        b.set_i32("queue-size", 256).map_err(bk)?;
        let mut started = b.start().map_err(bk)?;
        if started.queues.is_empty() {
            return Err(BenchError::Blkio("no queue".into()));
        }
        let queue = started.queues.remove(0);
        let region = b.alloc_mem_region(buf_len).map_err(bk)?;
        b.map_mem_region(&region).map_err(bk)?;
        Ok(Client {
            queue,
            region,
            _blkio: b,
        })
    }

    fn slot(&self, i: usize) -> *mut u8 {
        (self.region.addr + i * BLOCK) as *mut u8
    }

    fn slot_bytes(&mut self, i: usize) -> &mut [u8] {
        // SAFETY: the region is mapped read/write, `i` is below the number of slots it
        // was sized for, and only this client touches it.
        unsafe { std::slice::from_raw_parts_mut(self.slot(i), BLOCK) }
    }

    /// Waits for at least one completion; returns (user_data, ret) pairs.
    fn reap(
        &mut self,
        comps: &mut [MaybeUninit<Completion>],
    ) -> Result<Vec<(usize, i32)>, BenchError> {
        let mut timeout = Duration::from_secs(10);
        let n = self
            .queue
            .do_io(comps, 1, Some(&mut timeout), None)
            .map_err(bk)?;
        if n == 0 {
            return Err(BenchError::Run("no completion within 10 s".into()));
        }
        Ok(comps[..n]
            .iter()
            .map(|c| {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_ref() };
                (c.user_data, c.ret)
            })
            .collect())
    }
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Tags of the latest write of every block (0 = initial content).
struct Model {
    seq: Vec<u64>,
}

fn tag(buf: &mut [u8], block: u64, seq: u64) {
    buf[0..8].copy_from_slice(&block.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
}

fn read_tag(buf: &[u8]) -> (u64, u64) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&buf[0..8]);
    b.copy_from_slice(&buf[8..16]);
    (u64::from_le_bytes(a), u64::from_le_bytes(b))
}

/// Runs one workload for `seconds`; returns IOPS.
fn run_workload(
    c: &mut Client,
    w: Workload,
    depth: usize,
    seconds: f64,
    blocks: u64,
    model: &mut Model,
    next_seq: &mut u64,
) -> Result<f64, BenchError> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ depth as u64);
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    // Per slot: the block it targets and the sequence number written.
    let mut inflight: Vec<Option<(u64, u64)>> = vec![None; depth];
    let busy =
        |inflight: &[Option<(u64, u64)>], b: u64| inflight.iter().flatten().any(|(x, _)| *x == b);
    let mut submit =
        |c: &mut Client, slot: usize, inflight: &mut Vec<Option<(u64, u64)>>, rng: &mut Rng| {
            let mut block = rng.below(blocks);
            while busy(inflight, block) {
                block = rng.below(blocks);
            }
            let off = block * BLOCK as u64;
            match w {
                Workload::RandRead => {
                    c.queue
                        .read(off, c.slot(slot), BLOCK, slot, ReqFlags::empty());
                    inflight[slot] = Some((block, 0));
                }
                Workload::RandWrite => {
                    *next_seq += 1;
                    let seq = *next_seq;
                    tag(c.slot_bytes(slot), block, seq);
                    c.queue
                        .write(off, c.slot(slot), BLOCK, slot, ReqFlags::empty());
                    inflight[slot] = Some((block, seq));
                }
            }
        };
    for slot in 0..depth {
        submit(c, slot, &mut inflight, &mut rng);
    }
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    let mut done = 0u64;
    let mut outstanding = depth;
    while outstanding > 0 {
        for (slot, ret) in c.reap(&mut comps)? {
            if ret != 0 {
                return Err(BenchError::Verify(format!("request failed: {ret}")));
            }
            let Some((block, seq)) = inflight.get_mut(slot).and_then(Option::take) else {
                return Err(BenchError::Run(format!("unknown completion {slot}")));
            };
            if w == Workload::RandRead {
                let (b, s) = read_tag(c.slot_bytes(slot));
                if b != block || s != model.seq[block as usize] {
                    return Err(BenchError::Verify(format!(
                        "block {block}: read tag ({b}, {s}), expected ({block}, {})",
                        model.seq[block as usize]
                    )));
                }
            } else {
                model.seq[block as usize] = seq;
            }
            done += 1;
            outstanding -= 1;
            if start.elapsed() < limit {
                submit(c, slot, &mut inflight, &mut rng);
                outstanding += 1;
            }
        }
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// Reads every block back and checks its tag.
fn verify_all(c: &mut Client, blocks: u64, model: &Model) -> Result<(), BenchError> {
    let mut comps: Vec<MaybeUninit<Completion>> = (0..1).map(|_| MaybeUninit::uninit()).collect();
    for block in 0..blocks {
        c.queue
            .read(block * BLOCK as u64, c.slot(0), BLOCK, 0, ReqFlags::empty());
        let r = c.reap(&mut comps)?;
        if r.first().map(|x| x.1) != Some(0) {
            return Err(BenchError::Verify(format!("read of block {block} failed")));
        }
        let (b, s) = read_tag(c.slot_bytes(0));
        if b != block || s != model.seq[block as usize] {
            return Err(BenchError::Verify(format!(
                "block {block}: tag ({b}, {s}), expected ({block}, {})",
                model.seq[block as usize]
            )));
        }
    }
    Ok(())
}

/// Writes the initial image: every block tagged (block, 0).
fn make_image(path: &Path, blocks: u64) -> Result<(), BenchError> {
    let mut data = vec![0u8; blocks as usize * BLOCK];
    for (i, chunk) in data.chunks_mut(BLOCK).enumerate() {
        tag(chunk, i as u64, 0);
    }
    std::fs::write(path, &data).map_err(io_err("write image"))
}

/// Runs the benchmark and prints a table.
pub fn run(b: &BlkBench) -> Result<(), BenchError> {
    let dir = tempfile::tempdir().map_err(io_err("temp dir"))?;
    let img = dir.path().join("bench.img");
    let sock = dir.path().join("blk.sock");
    let blocks = (b.size_mib * 1024 * 1024 / BLOCK) as u64;
    let max_depth = b.depths.iter().copied().max().unwrap_or(1);
    if let Some((_, client)) = b.cpus {
        keel_affinity::pin_current_thread([client])
            .map_err(io_err(format!("pin the client to CPU {client}")))?;
    }
    let mut results: Vec<(&str, Workload, usize, f64)> = Vec::new();
    for v in VARIANTS.iter() {
        if v.name.starts_with("qsd") && b.qsd.is_none() {
            continue;
        }
        make_image(&img, blocks)?;
        let mut model = Model {
            seq: vec![0; blocks as usize],
        };
        let mut next_seq = 0;
        let (mut program, mut args) = (v.args)(b, &img, &sock);
        if let Some((backend, _)) = b.cpus {
            args.splice(0..0, ["-c".to_string(), backend.to_string(), program]);
            program = "taskset".into();
        }
        let _server = Server::start(&program, &args, &sock)?;
        let mut c = Client::connect(&sock, max_depth * BLOCK)?;
        for &w in &[Workload::RandRead, Workload::RandWrite] {
            for &d in &b.depths {
                let iops =
                    run_workload(&mut c, w, d, b.seconds, blocks, &mut model, &mut next_seq)?;
                eprintln!("{:<18} {:?} qd{d}: {iops:.0} IOPS", v.name, w);
                results.push((v.name, w, d, iops));
            }
        }
        verify_all(&mut c, blocks, &model)?;
        eprintln!("{:<18} image verified ({blocks} blocks)", v.name);
    }
    println!(
        "| workload | qd | {} |",
        VARIANTS.map(|v| v.name).join(" | ")
    );
    println!("|---|---|{}", "---|".repeat(VARIANTS.len()));
    for &w in &[Workload::RandRead, Workload::RandWrite] {
        for &d in &b.depths {
            let cells: Vec<String> = VARIANTS
                .iter()
                .map(|v| {
                    results
                        .iter()
                        .find(|r| r.0 == v.name && r.1 == w && r.2 == d)
                        .map(|r| format!("{:.0}", r.3))
                        .unwrap_or_else(|| "-".into())
                })
                .collect();
            println!("| {w:?} 4k | {d} | {} |", cells.join(" | "));
        }
    }
    let get = |name: &str, w: Workload, d: usize| {
        results
            .iter()
            .find(|r| r.0 == name && r.1 == w && r.2 == d)
            .map(|r| r.3)
    };
    for &w in &[Workload::RandRead, Workload::RandWrite] {
        for &d in &b.depths {
            let qsd = get("qsd aio=io_uring", w, d);
            for k in ["keel (event)", "keel (poll 50us)"] {
                if let (Some(q), Some(x)) = (qsd, get(k, w, d)) {
                    println!("ratio {k} / qsd io_uring, {w:?} qd{d}: {:.2}", x / q);
                }
            }
        }
    }
    Ok(())
}
