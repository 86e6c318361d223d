//! keel-vhost-blk: a vhost-user virtio-blk backend that serves raw images and block
//! devices through io_uring, one ring and one worker thread per virtqueue.

pub mod backend;
pub mod config;
pub mod disk;
pub mod engine;
pub mod inflight;
pub use keel_sd_notify as notify;
pub mod relay;
pub mod request;
pub mod server;
pub mod worker;

#[cfg(test)]
mod hostile_tests;
