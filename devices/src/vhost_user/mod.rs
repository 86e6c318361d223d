//! vhost-user frontends: the VMM side of devices whose data plane runs in a backend
//! process. The VMM only connects, shares guest RAM (memfd regions), and hands over
//! ring addresses and eventfds (kick = ioeventfd, call = MSI-X irqfd).

pub mod blk;
pub mod connection;
pub mod net;
pub mod net_ctrl;

pub use connection::{ConnectError, VhostUserConnection};

/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub(crate) const F_RING_INDIRECT_DESC: u32 = 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub(crate) const F_RING_EVENT_IDX: u32 = 29;
/// `VIRTIO_F_VERSION_1`.
pub(crate) const F_VERSION_1: u32 = 32;

/// The feature word with the device-type `bits` set, plus the ring and version bits
/// every device here passes through from its backend.
pub(crate) fn feature_mask(bits: &[u32]) -> u64 {
    bits.iter()
        .chain(&[F_RING_INDIRECT_DESC, F_RING_EVENT_IDX, F_VERSION_1])
        .fold(0, |acc, b| acc | (1u64 << b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_masks_add_the_ring_and_version_bits() {
        assert_eq!(feature_mask(&[]), 1 << 28 | 1 << 29 | 1 << 32);
        assert_eq!(
            feature_mask(&[0, 5]),
            1 | 1 << 5 | 1 << 28 | 1 << 29 | 1 << 32
        );
        let blk = blk::supported_features();
        assert_eq!(blk & (1 << 12 | 1 << 32), 1 << 12 | 1 << 32, "{blk:#x}");
        let net = net::supported_features();
        assert_eq!(net & (1 << 15 | 1 << 32), 1 << 15 | 1 << 32, "{net:#x}");
        // No control queue or MQ by default on net.
        assert_eq!(net & (1 << 17 | 1 << 22), 0, "{net:#x}");
    }
}
