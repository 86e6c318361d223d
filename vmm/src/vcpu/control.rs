//! Run state shared between the event loop and the vCPU threads: running, paused or
//! stopped, with acknowledgements so a pause returns only when every vCPU is out of
//! the guest.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What the vCPUs should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Executing guest code.
    Running,
    /// Parked outside the guest until resumed.
    Paused,
    /// Leaving their threads.
    Stopped,
}

#[derive(Debug)]
struct Shared {
    requested: RunState,
    /// vCPUs currently parked.
    parked: usize,
    /// vCPU threads that have finished.
    finished: usize,
}

/// Shared run-state with a condition variable.
#[derive(Debug)]
pub struct VcpuControl {
    count: usize,
    shared: Mutex<Shared>,
    changed: Condvar,
}

impl VcpuControl {
    /// Control for `count` vCPUs, initially running.
    pub fn new(count: usize) -> Self {
        Self {
            count,
            shared: Mutex::new(Shared {
                requested: RunState::Running,
                parked: 0,
                finished: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The requested state.
    pub fn requested(&self) -> RunState {
        self.lock().requested
    }

    /// Requests `state` and wakes parked vCPUs. Stopped is final.
    pub fn request(&self, state: RunState) {
        let mut s = self.lock();
        if s.requested != RunState::Stopped {
            s.requested = state;
        }
        self.changed.notify_all();
    }

    /// Waits until every vCPU that has not finished is parked; false on timeout.
    pub fn wait_all_parked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if s.parked + s.finished >= self.count {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = match self.changed.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Called by a vCPU thread that sees `Paused`: parks until the state changes.
    /// Returns the new state.
    pub fn park(&self) -> RunState {
        let mut s = self.lock();
        s.parked += 1;
        self.changed.notify_all();
        while s.requested == RunState::Paused {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.parked -= 1;
        self.changed.notify_all();
        s.requested
    }

    /// Called by a vCPU thread as it exits.
    pub fn finished(&self) {
        let mut s = self.lock();
        s.finished += 1;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn pause_waits_for_every_vcpu_and_resume_releases_them() {
        let control = Arc::new(VcpuControl::new(2));
        control.request(RunState::Paused);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let c = Arc::clone(&control);
                thread::spawn(move || {
                    let after = c.park();
                    c.finished();
                    after
                })
            })
            .collect();
        assert!(control.wait_all_parked(Duration::from_secs(10)));
        control.request(RunState::Running);
        for t in threads {
            assert_eq!(t.join().ok(), Some(RunState::Running));
        }
    }

    #[test]
    fn pause_times_out_when_a_vcpu_does_not_park() {
        let control = VcpuControl::new(1);
        control.request(RunState::Paused);
        assert!(!control.wait_all_parked(Duration::from_millis(20)));
    }

    #[test]
    fn stopped_is_final() {
        let control = VcpuControl::new(1);
        control.request(RunState::Stopped);
        control.request(RunState::Running);
        assert_eq!(control.requested(), RunState::Stopped);
    }
}
