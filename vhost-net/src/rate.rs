//! Per-port rate limits: token buckets for bits/s and packets/s on what a port sends
//! into the switch. Frames over the limit are dropped and counted
//! (`drop_rate_limit`). Buckets hold 10 ms of tokens (at least one 64 KiB frame and
//! one batch of packets), refilled once per batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// Bucket depth in seconds of the rate.
const DEPTH_SECS: f64 = 0.01;
/// Smallest bit bucket: one maximum-size frame.
const MIN_BITS: f64 = 65562.0 * 8.0;
/// Smallest packet bucket: one batch.
const MIN_PKTS: f64 = 64.0;

struct State {
    bits: f64,
    pkts: f64,
    last: Instant,
}

/// The limits of one port (0 = unlimited), changeable at runtime.
pub struct Limiter {
    bps: AtomicU64,
    pps: AtomicU64,
    state: Mutex<State>,
}

/// The tokens of one batch (the bucket stays locked while it is switched).
pub struct Budget<'a> {
    st: MutexGuard<'a, State>,
    bps: u64,
    pps: u64,
}

fn depth(rate: u64, min: f64) -> f64 {
    (rate as f64 * DEPTH_SECS).max(min)
}

impl Limiter {
    /// A limiter with `bps` bits/s and `pps` packets/s (0: no limit); buckets start
    /// full.
    pub fn new(bps: u64, pps: u64) -> Limiter {
        Limiter {
            bps: AtomicU64::new(bps),
            pps: AtomicU64::new(pps),
            state: Mutex::new(State {
                bits: depth(bps, MIN_BITS),
                pkts: depth(pps, MIN_PKTS),
                last: Instant::now(),
            }),
        }
    }

    /// Changes the limits.
    pub fn set(&self, bps: u64, pps: u64) {
        self.bps.store(bps, Ordering::Relaxed);
        self.pps.store(pps, Ordering::Relaxed);
    }

    /// The limits (bits/s, packets/s).
    pub fn get(&self) -> (u64, u64) {
        (
            self.bps.load(Ordering::Relaxed),
            self.pps.load(Ordering::Relaxed),
        )
    }

    /// Refills the buckets; `None` when the port is unlimited.
    pub fn begin(&self) -> Option<Budget<'_>> {
        let (bps, pps) = self.get();
        if bps == 0 && pps == 0 {
            return None;
        }
        let mut st = crate::switch::lock(&self.state);
        let now = Instant::now();
        let dt = now.duration_since(st.last).as_secs_f64();
        st.last = now;
        st.bits = (st.bits + bps as f64 * dt).min(depth(bps, MIN_BITS));
        st.pkts = (st.pkts + pps as f64 * dt).min(depth(pps, MIN_PKTS));
        Some(Budget { st, bps, pps })
    }

    /// Ends a batch.
    pub fn end(&self, b: Budget<'_>) {
        drop(b);
    }
}

impl Budget<'_> {
    /// Takes the tokens of one frame of `len` bytes; false if over the limit.
    pub fn take(&mut self, len: u64) -> bool {
        let bits = (len * 8) as f64;
        if (self.bps > 0 && self.st.bits < bits) || (self.pps > 0 && self.st.pkts < 1.0) {
            return false;
        }
        if self.bps > 0 {
            self.st.bits -= bits;
        }
        if self.pps > 0 {
            self.st.pkts -= 1.0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn packets_per_second() {
        let l = Limiter::new(0, 10_000);
        assert!(l.begin().is_some());
        // The bucket holds max(100, 64) packets.
        let mut b = l.begin().unwrap_or_else(|| unreachable!());
        let taken = (0..1000).filter(|_| b.take(64)).count();
        assert_eq!(taken, 100);
        drop(b);
        std::thread::sleep(Duration::from_millis(5));
        let mut b = l.begin().unwrap_or_else(|| unreachable!());
        let taken = (0..1000).filter(|_| b.take(64)).count();
        assert!((40..=100).contains(&taken), "{taken}");
    }

    #[test]
    fn bits_per_second_and_unlimited() {
        // 1 Gbit/s: 10 ms = 10 Mbit = 833 frames of 1500 B.
        let l = Limiter::new(1_000_000_000, 0);
        let mut b = l.begin().unwrap_or_else(|| unreachable!());
        let taken = (0..2000).filter(|_| b.take(1500)).count();
        assert!((833..=840).contains(&taken), "{taken}");
        drop(b);
        l.set(0, 0);
        assert!(l.begin().is_none());
    }
}
