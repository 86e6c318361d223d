//! keel-vhost-net: a vhost-user virtio-net backend that is a userspace L2 switch.
//! Each sandbox port is a vhost-user socket; frames move between ports' rings with
//! MAC learning, flooding and per-port anti-spoofing, and every drop is counted.

pub mod backend;
pub mod config;
pub mod control;
pub mod control_client;
pub mod net;
pub use keel_sd_notify as notify;
pub mod offload;
pub mod poller;
pub mod rate;
pub mod relay;
pub mod ring;
pub mod rx;
pub mod segment;
pub mod server;
pub mod switch;
pub mod tap;

#[cfg(test)]
mod hostile_tests;
