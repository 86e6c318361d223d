//! vhost-user frontends: the VMM side of devices whose data plane runs in a backend
//! process. The VMM only connects, shares guest RAM (memfd regions), and hands over
//! ring addresses and eventfds (kick = ioeventfd, call = MSI-X irqfd).

pub mod blk;
pub mod connection;
pub mod net;
pub mod net_ctrl;

pub use connection::{ConnectError, VhostUserConnection};
