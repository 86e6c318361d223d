//! Moves requests between one virtqueue and its io_uring engine.
//!
//! Works on a plain [`virtio_queue::Queue`], so the same code runs under the
//! vhost-user backend and in unit tests with a mock queue.

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{info, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::disk::Disk;
use crate::engine::{Completion, Engine, EngineError};
use crate::inflight::{self, QueueTracker};
use crate::request;

/// Why processing a queue failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The virtqueue could not be accessed (bad ring addresses, bad indexes).
    #[error("virtqueue error: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// The engine could not submit.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// One virtqueue's engine and scratch space.
pub struct QueueWorker {
    engine: Engine,
    disk: Arc<Disk>,
    done: Vec<Completion>,
    /// Inflight tracking in the frontend's shared area (INFLIGHT_SHMFD), if set.
    tracker: Option<QueueTracker>,
    /// A tracker was attached and the queue has not been recovered from it yet.
    recover_pending: bool,
}

impl QueueWorker {
    /// A worker with a ring deep enough for `queue_size` requests.
    pub fn new(disk: Arc<Disk>, queue_size: u16) -> Result<QueueWorker, EngineError> {
        Ok(QueueWorker {
            engine: Engine::new(disk.clone(), queue_size)?,
            disk,
            done: Vec::new(),
            tracker: None,
            recover_pending: false,
        })
    }

    /// Attaches (or with `None` detaches) the inflight tracker of this queue. The next
    /// [`QueueWorker::recover`] resubmits what it records as in flight.
    pub fn set_tracker(&mut self, tracker: Option<QueueTracker>) {
        self.recover_pending = tracker.is_some();
        self.tracker = tracker;
    }

    /// Whether a tracker is attached and the queue still has to be recovered from it.
    pub fn needs_recovery(&self) -> bool {
        self.recover_pending
    }

    /// Restarts the queue from the inflight area after a (re)connect: fixes up the last
    /// used-ring update, continues the avail ring at `used_idx + in flight`, and
    /// resubmits the chains in flight in the order they were first taken. Returns the
    /// number of used entries added (requests completed without I/O).
    pub fn recover(
        &mut self,
        q: &mut Queue,
        mem: &Arc<GuestMemoryMmap>,
    ) -> Result<usize, WorkerError> {
        self.recover_pending = false;
        let Some(tracker) = self.tracker.as_mut() else {
            return Ok(0);
        };
        let used_idx = q.used_idx(&**mem, Ordering::Acquire)?.0;
        let heads = tracker.recover(used_idx, q.size());
        q.set_next_used(used_idx);
        q.set_next_avail(used_idx.wrapping_add(heads.len() as u16));
        if !heads.is_empty() {
            info!(
                "resubmitting {} request(s) in flight before the reconnect (used index {used_idx})",
                heads.len()
            );
        }
        let table = vm_memory::GuestAddress(q.desc_table());
        let mut used = 0;
        for head in heads {
            let req = match inflight::read_chain(mem, table, q.size(), head) {
                Some(descs) => request::parse(descs, mem, &self.disk),
                None => {
                    warn!("in-flight chain {head} is broken; returning it unprocessed");
                    request::parse(Vec::new(), mem, &self.disk)
                }
            };
            if self.engine.is_full() {
                self.engine.submit()?;
                self.process_completions_blocking(q, mem);
            }
            if let Some(c) = self.engine.start(head, req, mem, false) {
                complete(q, mem, c, self.tracker.as_mut());
                used += 1;
            }
        }
        self.engine.submit()?;
        Ok(used)
    }

    /// Waits for at least one completion and puts what finished on the used ring.
    fn process_completions_blocking(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) {
        self.done.clear();
        self.engine.drain(&mut self.done);
        for c in self.done.drain(..) {
            complete(q, mem, c, self.tracker.as_mut());
        }
    }

    /// The engine's completion eventfd.
    pub fn completion_fd(&self) -> std::os::fd::RawFd {
        self.engine.completion_fd()
    }

    /// Requests in flight in the engine.
    pub fn inflight(&self) -> usize {
        self.engine.inflight()
    }

    /// Whether finished requests wait on the completion ring.
    pub fn has_completions(&mut self) -> bool {
        self.engine.has_completions()
    }

    /// Takes new chains from the avail ring and submits them in one batch. With
    /// `rearm`, notifications are re-enabled at the end (and the ring re-checked);
    /// without, they stay disabled (busy polling). Returns the number of used entries
    /// added (requests completed without I/O).
    pub fn process_avail(
        &mut self,
        q: &mut Queue,
        mem: &Arc<GuestMemoryMmap>,
        rearm: bool,
    ) -> Result<usize, WorkerError> {
        let mut used = 0;
        loop {
            q.disable_notification(&**mem)?;
            while !self.engine.is_full() {
                let Some(chain) = q.pop_descriptor_chain(&**mem) else {
                    break;
                };
                let head = chain.head_index();
                if let Some(t) = self.tracker.as_mut() {
                    t.mark(head);
                }
                let req = request::parse(chain, mem, &self.disk);
                // A request alone on the avail ring (queue depth 1) may be done
                // synchronously; with more waiting, they are submitted as one batch.
                let alone = q.avail_idx(&**mem, Ordering::Acquire)?.0 == q.next_avail();
                if let Some(c) = self.engine.start(head, req, mem, alone) {
                    complete(q, mem, c, self.tracker.as_mut());
                    used += 1;
                }
            }
            self.engine.submit()?;
            if self.engine.is_full() || !rearm {
                // Completions will bring us back here.
                break;
            }
            if !q.enable_notification(&**mem)? {
                break;
            }
            if self.ring_is_broken(q, mem)? {
                // The driver published more entries than the queue holds: nothing can be
                // popped, so stop instead of spinning until the frontend resets the ring.
                warn!("avail index is more than the queue size ahead; ignoring the queue");
                break;
            }
        }
        Ok(used)
    }

    fn ring_is_broken(&self, q: &Queue, mem: &GuestMemoryMmap) -> Result<bool, WorkerError> {
        let avail = q.avail_idx(mem, Ordering::Acquire)?;
        Ok((avail - Wrapping(q.next_avail())).0 > q.size())
    }

    /// Puts finished requests on the used ring. Returns how many. `clear_event` first
    /// resets the completion eventfd (when woken by it), so no wake-up is lost.
    pub fn process_completions(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        clear_event: bool,
    ) -> usize {
        if clear_event {
            self.engine.clear_event();
        }
        self.done.clear();
        let n = self.engine.reap(&mut self.done);
        for c in self.done.drain(..) {
            complete(q, mem, c, self.tracker.as_mut());
        }
        n
    }

    /// Waits for all requests in flight and puts them on the used ring.
    pub fn drain(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> usize {
        self.done.clear();
        self.engine.drain(&mut self.done);
        let n = self.done.len();
        for c in self.done.drain(..) {
            complete(q, mem, c, self.tracker.as_mut());
        }
        n
    }
}

/// Writes the status byte and adds the chain to the used ring.
/// With a tracker, records the used-ring update around it (inflight I/O tracking).
fn complete(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    c: Completion,
    mut tracker: Option<&mut QueueTracker>,
) {
    if let Some(addr) = c.status_addr {
        if let Err(e) = mem.write_obj(c.status, addr) {
            warn!("cannot write the status byte at {:#x}: {e}", addr.0);
        }
    }
    if let Some(t) = tracker.as_deref_mut() {
        t.before_used(c.head);
    }
    if let Err(e) = q.add_used(mem, c.head, c.used_len) {
        warn!("cannot add chain {} to the used ring: {e}", c.head);
        return;
    }
    if let Some(t) = tracker {
        t.after_used(c.head, q.next_used());
    }
}
