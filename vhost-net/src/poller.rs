//! Shared busy-poll threads ("poll groups"): one pinned thread per listed CPU polls
//! the TX rings of many ports, the way a DPDK lcore polls many queues.
//!
//! Without poll groups every queue pair has its own worker thread, which busy-polls
//! its ring after a kick. That is right when each worker has a CPU to itself, but
//! with more ports than CPUs two spinning workers share a core and the scheduler
//! takes turns between them in time slices of milliseconds: rings overflow while a
//! worker waits for its turn. A poll group instead visits every ring assigned to it
//! in turn, taking a batch from each, so one core serves many ports fairly.
//!
//! A group polls with notifications off while any of its rings has work and for a
//! `window` after the last one went idle; then it re-enables notifications on every
//! ring (re-checking each for a race with the driver) and sleeps on its wake eventfd.
//! A kick on any of its rings, received by the port's vhost-user worker thread,
//! writes that eventfd.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use log::{info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{PortBackend, IDLE_CLOCK_EVERY};
use crate::switch::{lock, Vring};

/// Longest sleep between checks of a group's membership when nothing wakes it.
const IDLE_WAIT_MS: i32 = 1000;

/// One TX ring polled by a group.
struct PolledRing {
    backend: Weak<PortBackend>,
    pair: usize,
    vring: Vring,
}

/// A thread pinned to one CPU polling the TX rings assigned to it.
pub struct PollGroup {
    cpu: usize,
    wake: EventFd,
    rings: Mutex<Vec<PolledRing>>,
    generation: AtomicU64,
}

impl PollGroup {
    /// The CPU this group's thread runs on.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// Number of rings assigned to this group.
    pub fn rings(&self) -> usize {
        lock(&self.rings).len()
    }

    /// Wakes the group's thread if it sleeps.
    pub fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            warn!("poll group on CPU {}: cannot wake: {e}", self.cpu);
        }
    }

    /// Adds the TX ring of `backend`'s queue pair `pair` and wakes the thread.
    pub fn add(&self, backend: Weak<PortBackend>, pair: usize, vring: Vring) {
        lock(&self.rings).push(PolledRing {
            backend,
            pair,
            vring,
        });
        self.generation.fetch_add(1, Ordering::Release);
        self.wake();
    }

    /// Removes every ring of `backend` (its frontend went away).
    pub fn remove(&self, backend: &Weak<PortBackend>) {
        let mut rings = lock(&self.rings);
        let before = rings.len();
        rings.retain(|r| !r.backend.ptr_eq(backend) && r.backend.strong_count() > 0);
        if rings.len() != before {
            self.generation.fetch_add(1, Ordering::Release);
        }
        drop(rings);
        self.wake();
    }

    /// The rings to poll now, holding their backends alive for one pass.
    fn snapshot(&self) -> Vec<(Arc<PortBackend>, usize, Vring)> {
        lock(&self.rings)
            .iter()
            .filter_map(|r| Some((r.backend.upgrade()?, r.pair, r.vring.clone())))
            .collect()
    }

    /// Sleeps until woken or `IDLE_WAIT_MS` passed.
    fn sleep(&self) {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.wake),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd that lives across the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, IDLE_WAIT_MS) };
        if rc > 0 {
            let _ = self.wake.read();
        }
    }

    /// The thread's loop; never returns (the group lives as long as the process).
    fn run(&self, window: Duration) {
        match keel_affinity::pin_current_thread([self.cpu]) {
            Ok(()) => info!("poll group pinned to CPU {}", self.cpu),
            Err(e) => warn!("poll group: cannot pin to CPU {}: {e}", self.cpu),
        }
        let mut seen = u64::MAX;
        let mut rings = Vec::new();
        // Busy passes do not read the clock (it is not free on a VM); the first idle
        // pass starts the window.
        let mut idle_since: Option<Instant> = None;
        let mut idle_passes = 0u32;
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            if generation != seen {
                seen = generation;
                rings = self.snapshot();
            }
            let mut busy = false;
            for (backend, pair, vring) in &rings {
                busy |= backend.process_tx(*pair, vring, false);
            }
            if busy {
                idle_since = None;
                idle_passes = 0;
                continue;
            }
            idle_passes = idle_passes.wrapping_add(1);
            if idle_since.is_some() && idle_passes % IDLE_CLOCK_EVERY != 0 {
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            if now.duration_since(*idle_since.get_or_insert(now)) < window {
                std::hint::spin_loop();
                continue;
            }
            // Idle for the window: re-arm every ring (each re-checks for chains the
            // driver queued meanwhile) and sleep unless one had work after all.
            for (backend, pair, vring) in &rings {
                busy |= backend.process_tx(*pair, vring, true);
            }
            if !busy && self.generation.load(Ordering::Acquire) == seen {
                // Release the backends while asleep: a disconnected port must not
                // be kept alive by a sleeping group.
                rings.clear();
                seen = u64::MAX;
                self.sleep();
            }
            idle_since = None;
        }
    }
}

/// The switch's poll groups, one per configured CPU.
pub struct PollGroups {
    groups: Vec<Arc<PollGroup>>,
}

impl PollGroups {
    /// Starts one polling thread per CPU in `cpus`; `window` is how long a group keeps
    /// polling after its rings went idle.
    pub fn start(cpus: &[usize], window: Duration) -> io::Result<Arc<PollGroups>> {
        let mut groups = Vec::with_capacity(cpus.len());
        for &cpu in cpus {
            let group = Arc::new(PollGroup {
                cpu,
                wake: EventFd::new(EFD_NONBLOCK)?,
                rings: Mutex::new(Vec::new()),
                generation: AtomicU64::new(0),
            });
            let g = group.clone();
            std::thread::Builder::new()
                .name(format!("poll-cpu{cpu}"))
                .spawn(move || g.run(window))?;
            groups.push(group);
        }
        Ok(Arc::new(PollGroups { groups }))
    }

    /// The groups.
    pub fn groups(&self) -> &[Arc<PollGroup>] {
        &self.groups
    }

    /// The group for a queue pair whose port asks for CPU `preferred` (if any): the
    /// group on that CPU when there is one, else the group with the fewest rings.
    pub fn pick(&self, preferred: Option<usize>) -> Option<&Arc<PollGroup>> {
        preferred
            .and_then(|cpu| self.groups.iter().find(|g| g.cpu == cpu))
            .or_else(|| self.groups.iter().min_by_key(|g| g.rings()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle_groups(cpus: &[usize]) -> PollGroups {
        PollGroups {
            groups: cpus
                .iter()
                .map(|&cpu| {
                    Arc::new(PollGroup {
                        cpu,
                        wake: EventFd::new(EFD_NONBLOCK).unwrap(),
                        rings: Mutex::new(Vec::new()),
                        generation: AtomicU64::new(0),
                    })
                })
                .collect(),
        }
    }

    #[test]
    fn pick_prefers_the_ports_cpu_then_the_least_loaded_group() {
        let g = idle_groups(&[3, 5]);
        assert_eq!(g.pick(Some(5)).map(|g| g.cpu()), Some(5));
        assert_eq!(g.pick(Some(3)).map(|g| g.cpu()), Some(3));
        // Not a poll CPU, or no preference: least loaded (ties: first).
        assert_eq!(g.pick(Some(9)).map(|g| g.cpu()), Some(3));
        assert_eq!(g.pick(None).map(|g| g.cpu()), Some(3));
        assert!(idle_groups(&[]).pick(None).is_none());
    }

    #[test]
    fn wake_makes_a_sleeping_group_return() {
        let g = idle_groups(&[0]);
        let group = g.groups()[0].clone();
        group.wake();
        let t = Instant::now();
        group.sleep();
        assert!(t.elapsed() < Duration::from_millis(IDLE_WAIT_MS as u64));
        // The wake-up was consumed: a second sleep waits for the timeout.
        let t = Instant::now();
        group.sleep();
        assert!(t.elapsed() >= Duration::from_millis(900));
    }
}
