//! The `VhostUserBackend` of one port: features, config space, and the worker thread
//! that moves the port's TX queue through the switch.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::net::{self, TxBatch};
use crate::offload;
use crate::poller::{PollGroup, PollGroups};
use crate::switch::{lock, ForwardScratch, GuestMem, Port, RxTarget, Switch, Vring};

/// Queue index of the RX queue (device to driver) within a pair.
pub const RX_QUEUE: usize = 0;
/// Queue index of the TX queue (driver to device) within a pair.
pub const TX_QUEUE: usize = 1;
/// The epoll id of the attach event (past every queue and the exit event).
pub const ATTACH_EVENT: u16 = 2 * crate::config::MAX_QUEUE_PAIRS + 1;
/// Chains taken from a TX queue per round. Not more: the receiver's driver can only
/// start on the frames of a round once the round is delivered, so smaller rounds
/// let it work while the next one is switched (port to port, 32 moved 1.5-1.7x
/// the frames of 64 when the sender posts bursts of 64; 16 or 24 lost again on
/// the fixed cost per round; DPDK's default burst is 32 as well).
pub const TX_BATCH: usize = 32;
/// Longest busy-poll round before the worker returns to epoll.
pub const MAX_POLL_ROUND: Duration = Duration::from_millis(50);
/// While a ring stays busy, the clock is read every this many passes only.
pub const BUSY_CLOCK_EVERY: u32 = 64;
/// While a ring stays idle, the clock is read every this many passes only (an
/// empty pass takes well under a microsecond, so the window stays exact enough).
pub const IDLE_CLOCK_EVERY: u32 = 16;
/// Size of the virtio-net config space we serve (mac, status, max_virtqueue_pairs).
const CONFIG_LEN: usize = 10;

/// Scratch space of one worker thread (one queue pair).
#[derive(Default)]
struct WorkerState {
    batch: TxBatch,
    fwd: ForwardScratch,
}

/// One worker's private parts.
struct Worker {
    state: Mutex<WorkerState>,
    attach: EventFd,
    pinned: AtomicBool,
    /// The poll group polling this pair's TX ring, once its first kick arrived.
    group: OnceLock<Arc<PollGroup>>,
}

/// The backend of one port for one frontend connection.
pub struct PortBackend {
    switch: Arc<Switch>,
    port: Arc<Port>,
    mem: GuestMem,
    queue_size: u16,
    poll: Duration,
    workers: Vec<Worker>,
    broken_logged: AtomicBool,
    /// Shared polling threads; `None`: each pair's worker polls its own ring.
    groups: Option<Arc<PollGroups>>,
    /// This backend, for handing its rings to poll groups.
    self_ref: OnceLock<Weak<PortBackend>>,
}

impl PortBackend {
    /// A backend for `port`; `mem` must be the memory handed to the daemon. A non-zero
    /// `poll` selects busy-poll mode with that idle window; with `groups`, the TX rings
    /// are polled by those shared threads instead of the pairs' own workers.
    pub fn new(
        switch: Arc<Switch>,
        port: Arc<Port>,
        mem: GuestMem,
        queue_size: u16,
        poll: Duration,
        groups: Option<Arc<PollGroups>>,
    ) -> io::Result<Arc<Self>> {
        let workers = (0..port.cfg.queues.max(1))
            .map(|_| {
                Ok(Worker {
                    state: Mutex::new(WorkerState::default()),
                    attach: EventFd::new(EFD_NONBLOCK)?,
                    pinned: AtomicBool::new(false),
                    group: OnceLock::new(),
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let backend = Arc::new(PortBackend {
            switch,
            port,
            mem,
            queue_size,
            poll,
            workers,
            broken_logged: AtomicBool::new(false),
            groups,
            self_ref: OnceLock::new(),
        });
        let _ = backend.self_ref.set(Arc::downgrade(&backend));
        Ok(backend)
    }

    /// Takes this backend's rings out of their poll groups (the frontend is gone).
    pub fn leave_poll_groups(&self) {
        let Some(me) = self.self_ref.get() else {
            return;
        };
        for w in &self.workers {
            if let Some(g) = w.group.get() {
                g.remove(me);
            }
        }
    }

    /// Hands the TX ring of pair `thread` to a poll group on its first kick, and
    /// wakes that group. Returns false when there are no poll groups.
    fn kick_poll_group(&self, thread: usize, vring: &Vring) -> bool {
        let (Some(groups), Some(w), Some(me)) = (
            self.groups.as_ref(),
            self.workers.get(thread),
            self.self_ref.get(),
        ) else {
            return false;
        };
        let cpus = &self.port.cfg.cpu;
        let preferred = (!cpus.is_empty()).then(|| cpus[thread % cpus.len()]);
        if let Some(g) = w.group.get() {
            g.wake();
            return true;
        }
        let Some(group) = groups.pick(preferred) else {
            return false;
        };
        if w.group.set(group.clone()).is_ok() {
            info!(
                "{}: TX ring of pair {thread} polled on CPU {}",
                self.port.name(),
                group.cpu()
            );
            group.add(me.clone(), thread, vring.clone());
        }
        true
    }

    /// Number of queue pairs (and worker threads).
    pub fn pairs(&self) -> usize {
        self.workers.len()
    }

    /// The eventfd to register with id [`ATTACH_EVENT`] on worker `i`: when it fires,
    /// the worker publishes its RX vring to the switch.
    pub fn attach_fd(&self, i: usize) -> Option<RawFd> {
        self.workers.get(i).map(|w| w.attach.as_raw_fd())
    }

    /// Asks every worker thread to publish its RX vring.
    pub fn request_attach(&self) -> io::Result<()> {
        for w in &self.workers {
            w.attach.write(1)?;
        }
        Ok(())
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        if let Some(mac) = self.port.cfg.mac {
            c[..6].copy_from_slice(&mac.0);
        }
        // status: VIRTIO_NET_S_LINK_UP (only meaningful with F_STATUS, harmless without).
        c[6] = 1;
        c[8..10].copy_from_slice(&(self.pairs() as u16).to_le_bytes());
        c
    }

    /// Pins the calling worker thread to its CPU, once.
    fn pin(&self, thread: usize) {
        let Some(w) = self.workers.get(thread) else {
            return;
        };
        let cpus = &self.port.cfg.cpu;
        if cpus.is_empty() || w.pinned.swap(true, Ordering::Relaxed) {
            return;
        }
        let cpu = cpus[thread % cpus.len()];
        match keel_affinity::pin_current_thread([cpu]) {
            Ok(()) => info!("{}: worker {thread} pinned to CPU {cpu}", self.port.name()),
            Err(e) => warn!(
                "{}: cannot pin worker {thread} to CPU {cpu}: {e}",
                self.port.name()
            ),
        }
    }

    /// Takes everything the frontend queued for transmission through the switch, in
    /// batches. With `rearm`, notifications are re-enabled at the end (and the ring
    /// re-checked); without, they stay off (busy polling). Returns whether any chain
    /// was taken.
    pub(crate) fn process_tx(&self, thread: usize, vring: &Vring, rearm: bool) -> bool {
        let Some(worker) = self.workers.get(thread) else {
            return false;
        };
        let mem = self.mem.memory().into_inner();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return false;
        }
        let hdr_len = net::header_len(self.port.features());
        let mut w = lock(&worker.state);
        let WorkerState { batch, fwd } = &mut *w;
        let q = state.get_queue_mut();
        let mut used = false;
        let mut notify = false;
        loop {
            if let Err(e) = q.disable_notification(&*mem) {
                self.broken(&e.to_string());
                return false;
            }
            loop {
                match net::pop_tx(q, &mem, hdr_len, batch, TX_BATCH) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        self.broken(&e.to_string());
                        break;
                    }
                }
                self.switch.forward(&self.port, thread, batch, fwd);
                notify |= net::release_tx(q, batch);
                let full = batch.frames.len() == TX_BATCH;
                batch.clear();
                used = true;
                if !full {
                    break;
                }
            }
            batch.clear();
            if !rearm {
                break;
            }
            match q.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.broken(&e.to_string());
                    break;
                }
            }
        }
        if notify {
            if let Err(e) = state.signal_used_queue() {
                debug!("{}: cannot signal TX: {e}", self.port.name());
            }
        }
        used
    }

    /// Handles a TX kick: in event mode one pass; in busy-poll mode keep polling with
    /// notifications off until the ring has been idle for the poll window (or for at
    /// most [`MAX_POLL_ROUND`], to let the worker see its other events), then re-arm.
    fn kick_tx(&self, thread: usize, vring: &Vring) {
        if self.poll.is_zero() {
            self.process_tx(thread, vring, true);
            return;
        }
        // Reading the clock is not free (on a VM it can cost as much as a small
        // batch): busy passes read it every BUSY_CLOCK_EVERY-th time (to bound the
        // round), idle passes every IDLE_CLOCK_EVERY-th.
        let start = Instant::now();
        let mut idle_since: Option<Instant> = None;
        let (mut busy_passes, mut idle_passes) = (0u32, 0u32);
        loop {
            if self.process_tx(thread, vring, false) {
                idle_since = None;
                idle_passes = 0;
                busy_passes = busy_passes.wrapping_add(1);
                if busy_passes % BUSY_CLOCK_EVERY == 0 && start.elapsed() >= MAX_POLL_ROUND {
                    break;
                }
                continue;
            }
            idle_passes = idle_passes.wrapping_add(1);
            if idle_since.is_some() && idle_passes % IDLE_CLOCK_EVERY != 0 {
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            let since = *idle_since.get_or_insert(now);
            if now.duration_since(since) >= self.poll || now.duration_since(start) >= MAX_POLL_ROUND
            {
                break;
            }
            std::hint::spin_loop();
        }
        self.process_tx(thread, vring, true);
    }

    fn broken(&self, why: &str) {
        self.port.counters.queue_broken();
        if !self.broken_logged.swap(true, Ordering::Relaxed) {
            warn!("{}: TX queue unusable: {why}", self.port.name());
        }
    }
}

impl VhostUserBackend for PortBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * self.pairs()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.port.cfg.mac.is_some() {
            f |= 1 << VIRTIO_NET_F_MAC;
        }
        if self.pairs() > 1 {
            f |= 1 << VIRTIO_NET_F_MQ;
        }
        if self.switch.offloads {
            f |= offload::OFFLOAD_FEATURES;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.port.set_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let f = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if self.pairs() > 1 {
            f | VhostUserProtocolFeatures::MQ
        } else {
            f
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        debug!(
            "{}: EVENT_IDX {}",
            self.port.name(),
            if enabled { "on" } else { "off" }
        );
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        keel_vhost_relay::config_window(&self.config_space(), offset, size)
    }

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        // The daemon replaces the memory inside the atomic we already hold.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker per queue pair.
        (0..self.pairs()).map(|i| 0b11 << (2 * i)).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        self.pin(thread_id);
        match device_event {
            ATTACH_EVENT => {
                if let Some(w) = self.workers.get(thread_id) {
                    let _ = w.attach.read();
                }
                if let Some(rx) = vrings.get(RX_QUEUE) {
                    self.port.attach(
                        thread_id,
                        RxTarget {
                            vring: rx.clone(),
                            mem: self.mem.clone(),
                        },
                    );
                }
            }
            e if usize::from(e) == TX_QUEUE => {
                if let Some(tx) = vrings.get(TX_QUEUE) {
                    if !self.kick_poll_group(thread_id, tx) {
                        self.kick_tx(thread_id, tx);
                    }
                }
            }
            // RX kicks: the driver posted buffers. Frames are delivered as they arrive
            // (and dropped when no buffer is there), so the kick carries nothing we
            // wait for: ask the driver to stop sending them (saves it a syscall or VM
            // exit per refill, and us a wake-up).
            e if usize::from(e) == RX_QUEUE => {
                if let Some(rx) = vrings.get(RX_QUEUE) {
                    let mem = self.mem.memory();
                    let mut state = rx.get_mut();
                    if let Err(e) = state.get_queue_mut().disable_notification(&*mem) {
                        debug!("{}: cannot disable RX kicks: {e}", self.port.name());
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}
