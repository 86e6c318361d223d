//! The `VhostUserBackend` implementation: features, config space, and the event
//! handling of each queue's worker thread.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{DiskConfig, Mode};
use crate::disk::Disk;
use crate::engine::EngineError;
use crate::inflight::InflightArea;
use crate::worker::QueueWorker;

/// Guest memory as the vhost-user-backend crate shares it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;
/// The vring type used by this backend.
pub type Vring = VringRwLock<GuestMem>;

/// Size of the virtio-blk config space we serve (up to `write_zeroes_may_unmap`
/// and its padding).
pub const CONFIG_LEN: usize = 60;
/// Offset of the `wce` byte in the config space.
const CONFIG_WCE_OFFSET: usize = 32;
/// While busy-polling an idle queue, the clock is read every this many passes.
const IDLE_CLOCK_EVERY: u32 = 16;
/// Largest single data segment we advertise (SIZE_MAX).
const SIZE_MAX: u32 = 1 << 20;
/// Largest discard / write-zeroes request in sectors (1 GiB).
const MAX_DWZ_SECTORS: u32 = 1 << 21;

/// The custom epoll event id of a queue's completion eventfd, relative to `num_queues`.
const COMPLETION_EVENT_OFFSET: u64 = 1;

/// The block device backend of one connection.
pub struct BlkBackend {
    disk: Arc<Disk>,
    queues: u16,
    queue_size: u16,
    mode: Mode,
    poll: Duration,
    affinity: Vec<usize>,
    workers: Vec<Mutex<QueueWorker>>,
    pinned: Vec<AtomicBool>,
    mem: RwLock<Option<GuestMem>>,
    acked_features: AtomicU64,
    /// The vring of each worker thread, remembered for draining in `stop_vring`.
    vrings: Mutex<Vec<Option<Vring>>>,
}

impl BlkBackend {
    /// Creates the backend and one io_uring per queue.
    pub fn new(disk: Arc<Disk>, cfg: &DiskConfig) -> Result<BlkBackend, EngineError> {
        let workers = (0..cfg.queues)
            .map(|_| QueueWorker::new(disk.clone(), cfg.queue_size).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(BlkBackend {
            disk,
            queues: cfg.queues,
            queue_size: cfg.queue_size,
            mode: cfg.mode,
            poll: Duration::from_micros(u64::from(cfg.poll_us)),
            affinity: cfg.affinity.clone(),
            workers,
            pinned: (0..cfg.queues).map(|_| AtomicBool::new(false)).collect(),
            mem: RwLock::new(None),
            acked_features: AtomicU64::new(0),
            vrings: Mutex::new(vec![None; usize::from(cfg.queues)]),
        })
    }

    /// The completion eventfd of queue `index` and the epoll id to register it with.
    pub fn completion_event(&self, index: usize) -> Option<(RawFd, u64)> {
        let fd = lock(self.workers.get(index)?).completion_fd();
        Some((fd, u64::from(self.queues) + COMPLETION_EVENT_OFFSET))
    }

    /// Number of queues and largest queue size: the most an inflight area may cover.
    pub fn inflight_limits(&self) -> (u16, u16) {
        (self.queues, self.queue_size)
    }

    /// Attaches the frontend's inflight area (SET_INFLIGHT_FD): every queue it covers
    /// is recovered from it when the queue next runs.
    pub fn set_inflight(&self, area: &Arc<InflightArea>) {
        for (i, worker) in self.workers.iter().enumerate() {
            let tracker = u16::try_from(i).ok().and_then(|i| area.queue(i));
            lock(worker).set_tracker(tracker);
        }
    }

    /// The virtio-blk config space.
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &self.disk.sectors().to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &self.seg_max().to_le_bytes());
        // geometry (16..20) left zero.
        put(20, &512u32.to_le_bytes()); // blk_size
        put(24, &[0]); // physical_block_exp
        put(25, &[0]); // alignment_offset
        put(26, &1u16.to_le_bytes()); // min_io_size
        put(28, &0u32.to_le_bytes()); // opt_io_size
        put(CONFIG_WCE_OFFSET, &[u8::from(self.disk.write_cache())]);
        put(34, &self.queues.to_le_bytes());
        put(36, &MAX_DWZ_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
        put(48, &MAX_DWZ_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    fn seg_max(&self) -> u32 {
        (u32::from(self.queue_size).saturating_sub(2)).clamp(1, 1022)
    }

    fn memory(&self) -> Option<Arc<GuestMemoryMmap>> {
        let guard = self.mem.read().ok()?;
        guard.as_ref().map(|m| m.memory().into_inner())
    }

    fn pin_current_thread(&self, thread_id: usize) {
        if self.affinity.is_empty() {
            return;
        }
        let Some(flag) = self.pinned.get(thread_id) else {
            return;
        };
        if flag.swap(true, Ordering::Relaxed) {
            return;
        }
        let cpu = self.affinity[thread_id % self.affinity.len()];
        if let Err(e) = keel_affinity::pin_current_thread([cpu]) {
            warn!("cannot pin queue {thread_id} to CPU {cpu}: {e}");
        }
    }

    /// One round on queue `thread_id`: reap completions, take new requests, signal.
    fn run_once(
        &self,
        vring: &Vring,
        thread_id: usize,
        rearm: bool,
        woken_by_completion: bool,
    ) -> io::Result<Round> {
        let Some(mem) = self.memory() else {
            return Ok(Round::default());
        };
        let Some(worker) = self.workers.get(thread_id) else {
            return Ok(Round::default());
        };
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(Round::default());
        }
        let mut worker = lock(worker);
        let inflight_before = worker.inflight();
        let q = state.get_queue_mut();
        let mut used = 0;
        if worker.needs_recovery() {
            used += worker
                .recover(q, &mem)
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
        used += worker.process_completions(q, &mem, woken_by_completion);
        used += worker
            .process_avail(q, &mem, rearm)
            .map_err(|e| io::Error::other(e.to_string()))?;
        // Page-cache hits complete during submission: return them now, not on the
        // next wake-up. Those completions also signalled the completion eventfd; in
        // event mode clear it before reaping (nothing is lost: a later completion
        // signals again), so epoll does not wake us for work already done.
        let clear = rearm && worker.has_completions();
        used += worker.process_completions(q, &mem, clear);
        let waiting = worker.inflight() > 0;
        let progress = used > 0 || worker.inflight() > inflight_before;
        drop(worker);
        if used > 0 && state.needs_notification().unwrap_or(true) {
            state.signal_used_queue()?;
        }
        Ok(Round { progress, waiting })
    }
}

/// What one round on a queue did.
#[derive(Debug, Default, Clone, Copy)]
struct Round {
    /// Requests completed or submitted.
    progress: bool,
    /// Requests are in flight (their completion will come).
    waiting: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.disk.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        debug!("EVENT_IDX {}", if enabled { "on" } else { "off" });
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        keel_vhost_relay::config_window(&self.config_space(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce_acked =
            self.acked_features.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if offset as usize == CONFIG_WCE_OFFSET && buf.len() == 1 && wce_acked {
            self.disk.set_write_cache(buf[0] != 0);
            debug!("write cache {}", if buf[0] != 0 { "on" } else { "off" });
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "only the wce byte of the config space is writable",
        ))
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        let mut guard = self
            .mem
            .write()
            .map_err(|_| io::Error::other("memory lock poisoned"))?;
        *guard = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Finish what is in flight so the used ring is complete before the frontend
        // reads the ring base.
        let vring = lock(&self.vrings)
            .get(queue_index as usize)
            .cloned()
            .flatten();
        let (Some(vring), Some(mem)) = (vring, self.memory()) else {
            return Ok(());
        };
        let Some(worker) = self.workers.get(queue_index as usize) else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        let n = lock(worker).drain(state.get_queue_mut(), &mem);
        if n > 0 {
            let _ = state.signal_used_queue();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        self.pin_current_thread(thread_id);
        {
            let mut known = lock(&self.vrings);
            if let Some(slot @ None) = known.get_mut(thread_id) {
                *slot = Some(vring.clone());
            }
        }
        let is_kick = device_event == 0;
        let is_completion =
            u64::from(device_event) == u64::from(self.queues) + COMPLETION_EVENT_OFFSET;
        if !is_kick && !is_completion {
            return Ok(());
        }
        if self.mode == Mode::Event || self.poll.is_zero() {
            self.run_once(vring, thread_id, true, is_completion)?;
            return Ok(());
        }
        // Busy poll: keep the frontend's notifications off and spin on both rings
        // until nothing has happened for the poll window. The clock (not free on a
        // VM) is read on every IDLE_CLOCK_EVERY-th idle pass only, never when busy.
        let mut idle_since: Option<Instant> = None;
        let mut idle_passes = 0u32;
        loop {
            let round = self.run_once(vring, thread_id, false, false)?;
            if round.progress || round.waiting {
                idle_since = None;
                idle_passes = 0;
                if !round.progress {
                    // Only waiting for I/O in flight: the kernel's io-wq workers that
                    // carry it out (buffered writes on most filesystems) may share
                    // this CPU; spinning would keep them off it until preempted.
                    std::thread::yield_now();
                }
                continue;
            }
            idle_passes = idle_passes.wrapping_add(1);
            if idle_since.is_none() || idle_passes % IDLE_CLOCK_EVERY == 0 {
                let now = Instant::now();
                if now.duration_since(*idle_since.get_or_insert(now)) >= self.poll {
                    break;
                }
            }
            std::hint::spin_loop();
        }
        self.run_once(vring, thread_id, true, true)?;
        Ok(())
    }
}
