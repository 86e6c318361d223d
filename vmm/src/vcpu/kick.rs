//! Kicking a vCPU thread out of `KVM_RUN`: a real-time signal whose handler sets
//! `kvm_run.immediate_exit` of the thread it lands on, so a kick that arrives just
//! before the thread enters the guest is not lost.

use std::cell::Cell;
use std::ptr;

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// The `kvm_run` page of the vCPU owned by this thread (null on other threads).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // Only an async-signal-safe volatile store happens here: the thread-local is a
    // plain `Cell` without destructor, read without allocation.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was set by this thread to its own vCPU's mapped
        // `kvm_run` page, which stays mapped while the thread runs (it owns the
        // `VcpuFd`, and clears the pointer before dropping it).
        unsafe { ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler (process-wide, idempotent).
pub fn install_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Publishes this thread's `kvm_run` page to the kick handler.
pub fn set_thread_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|cell| cell.set(run));
}

/// Withdraws this thread's `kvm_run` page (before the `VcpuFd` is dropped).
pub fn clear_thread_kvm_run() {
    KVM_RUN.with(|cell| cell.set(ptr::null_mut()));
}
