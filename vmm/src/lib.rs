//! keel-vmm: a minimal appliance VMM with a vhost-user data plane.
//!
//! The binary (`main.rs`) only parses the command line; everything else lives here so
//! integration tests and tools can use it.

pub mod backends;
pub mod boot;
pub mod builder;
pub mod config;
pub mod control;
pub mod event_loop;
pub mod interrupts;
pub mod intx;
pub mod kvm;
pub mod layout;
pub mod memory;
pub use keel_sd_notify as notify;
pub mod pci_devices;
pub mod signals;
pub mod systemd_dropin;
pub mod vcpu;
pub mod vfio;

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, recovering the data if a thread panicked while holding it: every
/// critical section in keel leaves its data consistent.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
