//! VFIO PCI passthrough: a host PCI function handed to the guest.
//!
//! Layers, top to bottom:
//! - [`preflight`]: host checks against sysfs and `/dev/vfio`, run before the VM is
//!   built, each failure one line with the numbers and the fix.
//! - [`device`]: the guest-visible function ([`device::VfioPciDevice`]): the
//!   emulated configuration space ([`config`], [`caps`]), BARs mapped directly or
//!   trapped ([`bars`]), the emulated MSI-X table and interrupt arming ([`irq`]).
//! - [`dma`]: guest RAM mapped in the IOMMU.
//! - [`backend`]: the traits the layers above use to reach the device; [`ioctls`]
//!   implements them with the `vfio-ioctls` crate. Only that file talks to the
//!   kernel, so everything else is tested with a fake device.

pub mod backend;
pub mod bars;
pub mod caps;
pub mod config;
pub mod device;
pub mod dma;
pub mod ioctls;
pub mod irq;
pub mod preflight;

#[cfg(test)]
mod tests;
