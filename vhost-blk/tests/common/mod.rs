//! Shared helpers for the integration tests: a running backend and a blkio client.

#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// A keel-vhost-blk process started by a test; killed (by PID) when dropped.
pub struct Backend {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
}

impl Backend {
    /// Starts the backend on `image` with extra command-line `args`.
    pub fn start(dir: &Path, image: &Path, args: &[&str]) -> Backend {
        Backend::start_with_env(dir, image, args, &[])
    }

    /// Like [`Backend::start`] with extra environment variables.
    pub fn start_with_env(
        dir: &Path,
        image: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Backend {
        let socket = dir.join("blk.sock");
        // A killed backend leaves its socket behind; the new one replaces it.
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(env!("CARGO_BIN_EXE_keel-vhost-blk"))
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(image)
            .args(args)
            .env("RUST_LOG", "debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("backend.log")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let backend = Backend { child, socket };
        backend.wait_for_socket();
        backend
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            assert!(Instant::now() < deadline, "backend socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on the PID of our own, not yet reaped, child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.child.wait().unwrap()
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A blkio `virtio-blk-vhost-user` frontend with one queue and one buffer region.
pub struct Client {
    // Field order matters: the queue before the instance that owns the driver.
    pub queue: Blkioq,
    pub region: MemoryRegion,
    pub blkio: Blkio,
}

impl Client {
    /// Connects to `socket` and maps a `buf_len`-byte buffer region.
    pub fn connect(socket: &Path, buf_len: usize) -> Result<Client, blkio::Error> {
        Client::connect_with(socket, buf_len, 256, false)
    }

    /// Like [`Client::connect`] with a queue size and the read-only property.
    pub fn connect_with(
        socket: &Path,
        buf_len: usize,
        queue_size: i32,
        read_only: bool,
    ) -> Result<Client, blkio::Error> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().unwrap())?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", 1)?;
        blkio.set_i32("queue-size", queue_size)?;
        let mut started = blkio.start()?;
        let queue = started.queues.remove(0);
        let region = blkio.alloc_mem_region(buf_len)?;
        blkio.map_mem_region(&region)?;
        Ok(Client {
            queue,
            region,
            blkio,
        })
    }

    /// Capacity in bytes as the device reports it.
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// The buffer region as a byte slice.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped read/write for its whole length and only
        // this client uses it.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Waits for `n` completions, returning their (user_data, ret).
    pub fn wait(&mut self, n: usize) -> Vec<(usize, i32)> {
        let mut out = Vec::new();
        let mut comps: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        while out.len() < n {
            let want = n - out.len();
            let mut timeout = Duration::from_secs(10);
            let got = self
                .queue
                .do_io(&mut comps[..want], want, Some(&mut timeout), None)
                .unwrap();
            assert!(got > 0, "no completion within 10 s");
            for c in &comps[..got] {
                // SAFETY: do_io initialised the first `got` entries.
                let c = unsafe { c.assume_init_ref() };
                out.push((c.user_data, c.ret));
            }
        }
        out
    }

    /// Reads `len` bytes at `offset` into the buffer at `buf_off`; returns ret.
    pub fn read(&mut self, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = (self.region.addr + buf_off) as *mut u8;
        self.queue.read(offset, p, len, 7, ReqFlags::empty());
        self.wait(1)[0].1
    }

    /// Writes `len` bytes from the buffer at `buf_off` to `offset`; returns ret.
    pub fn write(&mut self, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = (self.region.addr + buf_off) as *const u8;
        self.queue.write(offset, p, len, 8, ReqFlags::empty());
        self.wait(1)[0].1
    }

    /// Flushes; returns ret.
    pub fn flush(&mut self) -> i32 {
        self.queue.flush(9, ReqFlags::empty());
        self.wait(1)[0].1
    }
}

/// A small deterministic PRNG (xorshift64*), so failures can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Creates a sparse image of `len` bytes filled with a recognisable pattern.
pub fn make_image(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    Rng(seed).fill(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}
