//! keel device models: the I/O buses that vCPU exits are dispatched on, and the
//! devices behind them.
//!
//! Devices are reached from vCPU threads through a [`bus::Bus`] that is built once and
//! never changes; each device sits behind its own lock, so there is no global device
//! lock and no manager object on the exit path.

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod trigger;
pub mod vfio;
pub mod vhost_user;
pub mod virtio;
