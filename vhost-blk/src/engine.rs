//! The io_uring engine of one virtqueue: turns parsed requests into SQEs, submits them
//! in batches, and reaps completions from the completion ring without a syscall.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use log::{debug, warn};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::disk::Disk;
use crate::request::{Op, Request, Segment, STATUS_IOERR, STATUS_OK};

/// Most iovecs one request may use (the kernel's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// Why the engine failed (the ring itself, not an individual request).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// io_uring_setup failed.
    #[error("cannot create io_uring: {0}")]
    Setup(#[source] std::io::Error),
    /// The completion eventfd could not be created or registered.
    #[error("cannot set up the completion eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// io_uring_enter failed.
    #[error("io_uring submit failed: {0}")]
    Submit(#[source] std::io::Error),
}

/// A finished request, ready to be put on the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Descriptor chain head.
    pub head: u16,
    /// Where to write the status byte (`None`: dropped chain, used length 0).
    pub status_addr: Option<GuestAddress>,
    /// The status byte.
    pub status: u8,
    /// Used length: bytes written into the chain including the status byte.
    pub used_len: u32,
}

impl Completion {
    fn new(head: u16, status_addr: Option<GuestAddress>, status: u8, data_len: u32) -> Self {
        let used_len = if status_addr.is_some() {
            data_len.saturating_add(1)
        } else {
            0
        };
        Completion {
            head,
            status_addr,
            status,
            used_len,
        }
    }
}

/// iovecs pointing into guest memory.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers refer to guest memory mappings kept alive by the `Arc` stored next
// to them in `Inflight`; they are only handed to the kernel, never dereferenced here, so
// moving them between threads is sound.
unsafe impl Send for IoVecs {}

/// What an in-flight SQE is doing, for interpreting its result.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `done` of `len` bytes from `offset` transferred so far (a short transfer is
    /// resubmitted for the rest).
    Read {
        offset: u64,
        len: u32,
        done: u32,
    },
    Write {
        offset: u64,
        len: u32,
        done: u32,
        flags: i32,
    },
    Flush,
    Discard,
    WriteZeroes {
        offset: u64,
        len: u64,
        punch: bool,
    },
}

struct Inflight {
    head: u16,
    status_addr: GuestAddress,
    kind: Kind,
    /// Referenced by the kernel until the completion is reaped (advanced past what a
    /// short transfer did before it is resubmitted).
    iov: IoVecs,
    /// Keeps the guest memory mapped while the kernel may access it.
    _mem: Arc<GuestMemoryMmap>,
}

/// One io_uring plus the table of requests in flight on it.
pub struct Engine {
    ring: IoUring,
    event: EventFd,
    disk: Arc<Disk>,
    slots: Vec<Option<Inflight>>,
    free: Vec<u32>,
    inflight: usize,
    unsubmitted: usize,
    /// Buffered reads are first tried synchronously with `RWF_NOWAIT` (page-cache
    /// hits complete without a trip through the ring). Cleared if the file refuses.
    nowait_reads: bool,
    /// Same for writes while the write cache is on.
    nowait_writes: bool,
}

impl Engine {
    /// Creates a ring with room for `depth` requests in flight.
    pub fn new(disk: Arc<Disk>, depth: u16) -> Result<Engine, EngineError> {
        let entries = u32::from(depth.max(1)).next_power_of_two();
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)
            .map_err(EngineError::Setup)?;
        let event = EventFd::new(EFD_NONBLOCK).map_err(EngineError::EventFd)?;
        ring.submitter()
            .register_eventfd(event.as_raw_fd())
            .map_err(EngineError::EventFd)?;
        let slots = (0..entries).map(|_| None).collect();
        let free = (0..entries).rev().collect();
        let buffered = !disk.direct;
        Ok(Engine {
            ring,
            event,
            disk,
            slots,
            free,
            inflight: 0,
            unsubmitted: 0,
            nowait_reads: buffered,
            nowait_writes: buffered,
        })
    }

    /// The eventfd signalled on every completion.
    pub fn completion_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Clears the completion eventfd (before reaping, so no wake-up is lost).
    pub fn clear_event(&self) {
        let _ = self.event.read();
    }

    /// No room for another request until completions are reaped.
    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Requests in flight.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Whether completions are waiting on the completion ring (no syscall).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Tries the whole transfer synchronously, without blocking (`RWF_NOWAIT`: page
    /// cache only) except for the buffered-write case below. `true` if all `len`
    /// bytes were transferred; otherwise the request goes through the ring (which
    /// redoes it from the start, so a short transfer is harmless: the same bytes are
    /// read or written again).
    fn try_now(&mut self, write: bool, iov: &IoVecs, offset: u64, len: u32) -> bool {
        // Without RWF_NOWAIT support for buffered writes (ext4), the ring punts each
        // write to an io-wq thread and its completion costs us a wake-up. When
        // nothing else is in flight (queue depth 1) a plain synchronous write is
        // cheaper: a buffered write only copies into the page cache, and there is no
        // other request the thread could be serving meanwhile.
        let (enabled, flags) = if !write {
            (self.nowait_reads, libc::RWF_NOWAIT)
        } else if self.nowait_writes {
            (true, libc::RWF_NOWAIT)
        } else {
            (!self.disk.direct && self.inflight == 0, 0)
        };
        let Ok(offset) = libc::off_t::try_from(offset) else {
            return false;
        };
        if !enabled || iov.0.is_empty() {
            return false;
        }
        let fd = self.disk.file.as_raw_fd();
        let (ptr, cnt) = (iov.0.as_ptr(), iov.0.len() as libc::c_int);
        // SAFETY: the iovecs point into mapped guest memory (checked when they were
        // built) that `start`'s caller keeps mapped for the duration of the call; the
        // kernel checks the rest, and nothing is retained after the call returns.
        let n = unsafe {
            if write {
                libc::pwritev2(fd, ptr, cnt, offset, flags)
            } else {
                libc::preadv2(fd, ptr, cnt, offset, flags)
            }
        };
        if n < 0 {
            let err = std::io::Error::last_os_error().raw_os_error();
            if flags != 0 && matches!(err, Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)) {
                // This file (or kernel) does not do non-blocking buffered I/O.
                debug!(
                    "RWF_NOWAIT not supported for {}",
                    if write { "writes" } else { "reads" }
                );
                if write {
                    self.nowait_writes = false;
                    // Once more, as a plain write if nothing is in flight.
                    return self.try_now(true, iov, offset as u64, len);
                }
                self.nowait_reads = false;
            }
            return false;
        }
        n as u64 == u64::from(len)
    }

    /// Starts `req` for chain `head`. Returns a completion right away when there is
    /// nothing to submit (errors found while parsing, GET_ID, unmappable buffers, a
    /// read or write done synchronously). `alone`: the caller has no further request
    /// at hand, so the synchronous fast path may be used (with more, one batched
    /// submission costs less than a syscall each).
    /// The caller must check [`Engine::is_full`] first; a full engine fails the request.
    pub fn start(
        &mut self,
        head: u16,
        req: Request,
        mem: &Arc<GuestMemoryMmap>,
        alone: bool,
    ) -> Option<Completion> {
        // Only if nothing is waiting in the submission queue either.
        let sync = alone && self.unsubmitted == 0;
        let Some(status_addr) = req.status else {
            return Some(Completion::new(head, None, STATUS_IOERR, 0));
        };
        let fail = |status| Some(Completion::new(head, Some(status_addr), status, 0));
        let fd = types::Fd(self.disk.file.as_raw_fd());
        let (kind, iov, entry) = match req.op {
            Op::Done { status, data_len } => {
                return Some(Completion::new(head, Some(status_addr), status, data_len))
            }
            Op::Read { offset, segs, len } => {
                let Some(iov) = iovecs(mem, &segs) else {
                    return fail(STATUS_IOERR);
                };
                if sync && self.try_now(false, &iov, offset, len) {
                    return Some(Completion::new(head, Some(status_addr), STATUS_OK, len));
                }
                let e = opcode::Readv::new(fd, iov.0.as_ptr(), iov.0.len() as u32)
                    .offset(offset)
                    .build();
                (
                    Kind::Read {
                        offset,
                        len,
                        done: 0,
                    },
                    iov,
                    e,
                )
            }
            Op::Write { offset, segs, len } => {
                let Some(iov) = iovecs(mem, &segs) else {
                    return fail(STATUS_IOERR);
                };
                // With the write cache off, writes must be durable before completion:
                // those always take the ring with RWF_DSYNC.
                let cached = self.disk.write_cache();
                if sync && cached && self.try_now(true, &iov, offset, len) {
                    return Some(Completion::new(head, Some(status_addr), STATUS_OK, 0));
                }
                let flags = if cached { 0 } else { libc::RWF_DSYNC };
                let e = opcode::Writev::new(fd, iov.0.as_ptr(), iov.0.len() as u32)
                    .offset(offset)
                    .rw_flags(flags)
                    .build();
                (
                    Kind::Write {
                        offset,
                        len,
                        done: 0,
                        flags,
                    },
                    iov,
                    e,
                )
            }
            Op::Flush => {
                let e = opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build();
                (Kind::Flush, IoVecs(Vec::new()), e)
            }
            Op::Discard { offset, len } => {
                let e = opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build();
                (Kind::Discard, IoVecs(Vec::new()), e)
            }
            Op::WriteZeroes { offset, len, unmap } => {
                // Block devices and most filesystems support both modes; a punched
                // hole reads back as zeroes on files too.
                let kind = Kind::WriteZeroes {
                    offset,
                    len,
                    punch: unmap,
                };
                (
                    kind,
                    IoVecs(Vec::new()),
                    self.zeroes_entry(offset, len, unmap),
                )
            }
        };
        let Some(slot) = self.free.pop() else {
            return fail(STATUS_IOERR);
        };
        self.slots[slot as usize] = Some(Inflight {
            head,
            status_addr,
            kind,
            iov,
            _mem: mem.clone(),
        });
        self.inflight += 1;
        if let Err(e) = self.push(entry.user_data(u64::from(slot))) {
            warn!("cannot queue an I/O request: {e}");
            self.slots[slot as usize] = None;
            self.free.push(slot);
            self.inflight -= 1;
            return fail(STATUS_IOERR);
        }
        None
    }

    fn zeroes_entry(&self, offset: u64, len: u64, punch: bool) -> io_uring::squeue::Entry {
        let mode = if punch {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        opcode::Fallocate::new(types::Fd(self.disk.file.as_raw_fd()), len)
            .offset(offset)
            .mode(mode)
            .build()
    }

    /// Queues one SQE, submitting what is queued first if the ring is full.
    fn push(&mut self, entry: io_uring::squeue::Entry) -> Result<(), EngineError> {
        for _ in 0..2 {
            // SAFETY: every buffer the entry points to (iovec array, guest memory, the
            // file) is owned by the slot named in its user_data or by `self`, and stays
            // alive until the completion for that slot is reaped (or the ring is dropped
            // after draining).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            self.submit()?;
        }
        Err(EngineError::Submit(std::io::Error::from_raw_os_error(
            libc::EBUSY,
        )))
    }

    /// Submits all queued SQEs with one syscall.
    pub fn submit(&mut self) -> Result<(), EngineError> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completion ring overflow backlog: let the caller reap first.
                    return Ok(());
                }
                Err(e) => return Err(EngineError::Submit(e)),
            }
        }
    }

    /// The SQE that continues slot `slot`'s request: the rest of a short read or
    /// write, or a hole punched where ZERO_RANGE was refused.
    fn retry_entry(&self, slot: usize) -> Option<io_uring::squeue::Entry> {
        let inflight = self.slots.get(slot)?.as_ref()?;
        let fd = types::Fd(self.disk.file.as_raw_fd());
        let (ptr, cnt) = (inflight.iov.0.as_ptr(), inflight.iov.0.len() as u32);
        let entry = match inflight.kind {
            Kind::Read { offset, done, .. } => opcode::Readv::new(fd, ptr, cnt)
                .offset(offset + u64::from(done))
                .build(),
            Kind::Write {
                offset,
                done,
                flags,
                ..
            } => opcode::Writev::new(fd, ptr, cnt)
                .offset(offset + u64::from(done))
                .rw_flags(flags)
                .build(),
            Kind::WriteZeroes {
                offset, len, punch, ..
            } => self.zeroes_entry(offset, len, punch),
            Kind::Flush | Kind::Discard => return None,
        };
        Some(entry.user_data(slot as u64))
    }

    /// Moves finished requests into `out` (no syscall). Returns how many were added.
    /// A read or write that transferred part of its bytes is resubmitted for the
    /// rest (block devices and network filesystems may stop short); one that makes
    /// no progress fails.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        let mut retries = Vec::new();
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(mut inflight) = self.slots.get_mut(slot).and_then(Option::take) else {
                warn!("completion for unknown slot {slot}");
                continue;
            };
            let res = cqe.result();
            let status = match &mut inflight.kind {
                Kind::Read { len, done, .. } | Kind::Write { len, done, .. } if res >= 0 => {
                    let n = res as u32;
                    match progress(*len, *done, n) {
                        Progress::Finished => STATUS_OK,
                        Progress::Partial(now) => {
                            debug!("short I/O: {n} of {} bytes, resubmitting", *len - *done);
                            *done = now;
                            advance(&mut inflight.iov.0, n as usize);
                            self.slots[slot] = Some(inflight);
                            retries.push(slot);
                            continue;
                        }
                        Progress::Stuck => {
                            debug!("I/O stopped after {} of {} bytes", *done, *len);
                            STATUS_IOERR
                        }
                    }
                }
                Kind::Discard if res >= 0 || res == -libc::EOPNOTSUPP => STATUS_OK,
                Kind::WriteZeroes { punch, .. }
                    if !*punch && (res == -libc::EOPNOTSUPP || res == -libc::EINVAL) =>
                {
                    // No ZERO_RANGE here: punch a hole instead (reads back zeroes).
                    *punch = true;
                    self.slots[slot] = Some(inflight);
                    retries.push(slot);
                    continue;
                }
                _ if res >= 0 => STATUS_OK,
                _ => {
                    debug!(
                        "request failed: {}",
                        std::io::Error::from_raw_os_error(-res)
                    );
                    STATUS_IOERR
                }
            };
            let data_len = match inflight.kind {
                Kind::Read { len, .. } if status == STATUS_OK => len,
                _ => 0,
            };
            out.push(Completion::new(
                inflight.head,
                Some(inflight.status_addr),
                status,
                data_len,
            ));
            self.free.push(slot as u32);
            self.inflight -= 1;
        }
        for slot in retries {
            let pushed = match self.retry_entry(slot) {
                Some(entry) => self.push(entry).is_ok(),
                None => false,
            };
            if !pushed {
                if let Some(inflight) = self.slots[slot].take() {
                    out.push(Completion::new(
                        inflight.head,
                        Some(inflight.status_addr),
                        STATUS_IOERR,
                        0,
                    ));
                    self.free.push(slot as u32);
                    self.inflight -= 1;
                }
            }
        }
        if self.unsubmitted > 0 {
            if let Err(e) = self.submit() {
                warn!("{e}");
            }
        }
        out.len() - before
    }

    /// Blocks until every request in flight has completed, moving them into `out`.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        while self.inflight > 0 {
            self.reap(out);
            if self.inflight == 0 {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.unsubmitted = 0,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    warn!("cannot wait for in-flight I/O: {e}");
                    return;
                }
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The kernel may still write into guest memory referenced by the slots.
        let mut done = Vec::new();
        self.drain(&mut done);
    }
}

/// Where a read or write of `len` bytes stands after `done` bytes and `n` more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// All bytes transferred.
    Finished,
    /// This many bytes transferred, the rest still to do.
    Partial(u32),
    /// No progress (end of file, nothing written) or more than asked: give up.
    Stuck,
}

fn progress(len: u32, done: u32, n: u32) -> Progress {
    match done.checked_add(n) {
        Some(now) if now == len => Progress::Finished,
        Some(now) if n > 0 && now < len => Progress::Partial(now),
        _ => Progress::Stuck,
    }
}

/// Drops the first `n` bytes from `iov` (whole iovecs, then the start of one).
fn advance(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut whole = 0;
    for v in iov.iter_mut() {
        if n < v.iov_len {
            // SAFETY: `n < iov_len`, so the new base stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            break;
        }
        n -= v.iov_len;
        whole += 1;
    }
    iov.drain(..whole);
}

/// Host iovecs for guest segments, or `None` if any part is not guest memory or there
/// are too many pieces.
fn iovecs(mem: &GuestMemoryMmap, segs: &[Segment]) -> Option<IoVecs> {
    let mut iov = Vec::with_capacity(segs.len());
    for seg in segs {
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let slice = slice.ok()?;
            if iov.len() == MAX_IOVECS {
                return None;
            }
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(IoVecs(iov))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::fs::File;
    use std::io::Write;
    use std::time::{Duration, Instant};

    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn progress_of_short_and_stuck_transfers() {
        assert_eq!(progress(4096, 0, 4096), Progress::Finished);
        assert_eq!(progress(4096, 1000, 3096), Progress::Finished);
        assert_eq!(progress(4096, 0, 1000), Progress::Partial(1000));
        assert_eq!(progress(4096, 1000, 0), Progress::Stuck);
        assert_eq!(progress(4096, 1000, 4000), Progress::Stuck);
        assert_eq!(progress(u32::MAX, u32::MAX - 1, 2), Progress::Stuck);
    }

    #[test]
    fn advance_drops_whole_iovecs_then_the_start_of_one() {
        let mut buf = [0u8; 300];
        let base = buf.as_mut_ptr();
        let v = |off: usize, len: usize| libc::iovec {
            // SAFETY: off + len <= 300 in every use below.
            iov_base: unsafe { base.add(off) }.cast(),
            iov_len: len,
        };
        let mut iov = vec![v(0, 100), v(100, 100), v(200, 100)];
        advance(&mut iov, 150);
        assert_eq!(iov.len(), 2);
        assert_eq!((iov[0].iov_base, iov[0].iov_len), (v(150, 50).iov_base, 50));
        assert_eq!(iov[1].iov_len, 100);
        advance(&mut iov, 50);
        assert_eq!(iov.len(), 1);
        assert_eq!(iov[0].iov_base, v(200, 100).iov_base);
        advance(&mut iov, 100);
        assert!(iov.is_empty());
    }

    /// A read at byte `offset` into (guest address, length) segments; status byte at
    /// 0x8000.
    fn read(offset: u64, segs: &[(u64, u32)]) -> Request {
        Request {
            status: Some(GuestAddress(0x8000)),
            op: Op::Read {
                offset,
                segs: segs
                    .iter()
                    .map(|&(addr, len)| Segment {
                        addr: GuestAddress(addr),
                        len,
                    })
                    .collect(),
                len: segs.iter().map(|s| s.1).sum(),
            },
        }
    }

    /// Guest memory of 64 KiB.
    fn memory() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap())
    }

    /// Reaps until `want` completions arrived or `wait` passed.
    fn reap_until(engine: &mut Engine, out: &mut Vec<Completion>, want: usize, wait: Duration) {
        let deadline = Instant::now() + wait;
        while out.len() < want && Instant::now() < deadline {
            engine.reap(out);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A pipe as the disk: reads return what has been written so far, the short
    /// transfers regular files rarely give. The rest of a read is resubmitted until
    /// every byte arrived, in order.
    #[test]
    fn a_short_read_is_resubmitted_for_the_rest() {
        let (reader, writer) = std::io::pipe().unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(reader));
        let disk = Arc::new(Disk::from_file(file, 1 << 20));
        let mut engine = Engine::new(disk, 4).unwrap();
        let mem = memory();
        // Dropped before the engine if an assertion fails: the pending read then
        // sees the end of the pipe, so the engine's drain does not wait forever.
        let mut writer = writer;
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        writer.write_all(&data[..1000]).unwrap();
        let req = read(0, &[(0x1000, 1500), (0x4000, 2596)]);
        assert_eq!(engine.start(3, req, &mem, false), None);
        engine.submit().unwrap();
        let mut out = Vec::new();
        // The first 1000 bytes come back short; the rest is asked for again.
        reap_until(&mut engine, &mut out, 1, Duration::from_millis(300));
        assert!(out.is_empty(), "completed early: {out:?}");
        assert_eq!(engine.inflight(), 1);
        writer.write_all(&data[1000..2500]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        writer.write_all(&data[2500..]).unwrap();
        reap_until(&mut engine, &mut out, 1, Duration::from_secs(5));
        assert_eq!(
            out,
            [Completion {
                head: 3,
                status_addr: Some(GuestAddress(0x8000)),
                status: STATUS_OK,
                used_len: 4097,
            }]
        );
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got[..1500], GuestAddress(0x1000))
            .unwrap();
        mem.read_slice(&mut got[1500..], GuestAddress(0x4000))
            .unwrap();
        assert_eq!(got, data);
    }

    /// A read that stops short at the end of a file that shrank: the retry gets
    /// nothing more and the request fails instead of spinning.
    #[test]
    fn a_read_that_stops_making_progress_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0x5au8; 8192]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let disk = Arc::new(Disk::from_file(file, 8192));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(6144)
            .unwrap();
        let mut engine = Engine::new(disk, 4).unwrap();
        let mem = memory();
        let req = read(4096, &[(0x1000, 4096)]);
        assert_eq!(engine.start(5, req, &mem, false), None);
        engine.submit().unwrap();
        let mut out = Vec::new();
        reap_until(&mut engine, &mut out, 1, Duration::from_secs(5));
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].head, out[0].status, out[0].used_len),
            (5, STATUS_IOERR, 1)
        );
        let mut got = vec![0u8; 2048];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert!(got.iter().all(|&b| b == 0x5a));
    }
}
