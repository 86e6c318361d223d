//! Checksum and segmentation offloads carried in the virtio-net header.
//!
//! With offloads enabled (`--offloads`), ports offer CSUM/GUEST_CSUM and the TSO/ECN/UFO
//! features and the TAP uplink enables the matching `TUNSETOFFLOAD` flags. The
//! sender's header travels with the frame. For a receiver that did not negotiate:
//! - GUEST_CSUM: a partial checksum (`NEEDS_CSUM`) is completed in software;
//! - the GUEST_TSO4/TSO6 (and ECN) feature matching a TCP GSO frame: the frame is split
//!   into `gso_size` segments with complete checksums in software
//!   ([`crate::segment`]), counted as `sw_segmented`; a frame that fails the checks
//!   there is dropped and counted as `drop_rx_offload`;
//! - GUEST_UFO for a UDP GSO frame: the frame is dropped and counted as
//!   `drop_rx_offload` (UDP is not segmented).
//!
//! A sender's header is only honoured for the offloads it negotiated (CSUM for
//! `NEEDS_CSUM`, HOST_* for GSO); anything else is cleared.

use crate::net::{HDR_LEN, NUM_BUFFERS_OFFSET};

/// VIRTIO_NET_F_CSUM: the driver may send partial checksums.
pub const F_CSUM: u32 = 0;
/// VIRTIO_NET_F_GUEST_CSUM: the driver accepts partial checksums.
pub const F_GUEST_CSUM: u32 = 1;
/// VIRTIO_NET_F_GUEST_TSO4.
pub const F_GUEST_TSO4: u32 = 7;
/// VIRTIO_NET_F_GUEST_TSO6.
pub const F_GUEST_TSO6: u32 = 8;
/// VIRTIO_NET_F_GUEST_ECN.
pub const F_GUEST_ECN: u32 = 9;
/// VIRTIO_NET_F_GUEST_UFO.
pub const F_GUEST_UFO: u32 = 10;
/// VIRTIO_NET_F_HOST_TSO4.
pub const F_HOST_TSO4: u32 = 11;
/// VIRTIO_NET_F_HOST_TSO6.
pub const F_HOST_TSO6: u32 = 12;
/// VIRTIO_NET_F_HOST_ECN.
pub const F_HOST_ECN: u32 = 13;
/// VIRTIO_NET_F_HOST_UFO.
pub const F_HOST_UFO: u32 = 14;

/// Every offload feature bit offered with `--offloads`.
pub const OFFLOAD_FEATURES: u64 = 1 << F_CSUM
    | 1 << F_GUEST_CSUM
    | 1 << F_GUEST_TSO4
    | 1 << F_GUEST_TSO6
    | 1 << F_GUEST_ECN
    | 1 << F_GUEST_UFO
    | 1 << F_HOST_TSO4
    | 1 << F_HOST_TSO6
    | 1 << F_HOST_ECN
    | 1 << F_HOST_UFO;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
pub const HDR_F_DATA_VALID: u8 = 2;
/// GSO types.
pub const GSO_NONE: u8 = 0;
/// TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// UDP fragmentation.
pub const GSO_UDP: u8 = 3;
/// TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// ECN flag of the GSO type.
pub const GSO_ECN: u8 = 0x80;

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// The sender's header reduced to what it negotiated.
pub fn sanitize_tx(vnet: &[u8; HDR_LEN], features: u64) -> [u8; HDR_LEN] {
    let mut h = *vnet;
    h[NUM_BUFFERS_OFFSET] = 0;
    h[NUM_BUFFERS_OFFSET + 1] = 0;
    let mut flags = h[0] & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID);
    if !has(features, F_CSUM) {
        flags &= !HDR_F_NEEDS_CSUM;
    }
    let gso = h[1];
    let allowed = match gso & !GSO_ECN {
        GSO_NONE => gso == GSO_NONE,
        GSO_TCPV4 => has(features, F_HOST_TSO4),
        GSO_TCPV6 => has(features, F_HOST_TSO6),
        GSO_UDP => has(features, F_HOST_UFO),
        _ => false,
    } && (gso & GSO_ECN == 0 || has(features, F_HOST_ECN));
    if !allowed || gso == GSO_NONE {
        h[1] = GSO_NONE;
        h[2..6].fill(0);
        if flags & HDR_F_NEEDS_CSUM == 0 {
            h[6..10].fill(0);
        }
    }
    h[0] = flags;
    h
}

/// What delivering a frame with (sanitized) header `h` to a receiver with
/// `features` needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxPlan {
    /// Write the header as given (num_buffers filled in by the writer).
    Pass([u8; HDR_LEN]),
    /// Complete the checksum in software, then write this header.
    CompleteCsum([u8; HDR_LEN]),
    /// Split this TCP GSO frame in software ([`crate::segment`]) and write each
    /// segment with this (plain) header.
    Segment([u8; HDR_LEN]),
    /// The receiver cannot take this GSO frame.
    Drop,
}

/// Plans the delivery of a frame with sanitized header `h` to a receiver.
pub fn plan_rx(h: &[u8; HDR_LEN], features: u64) -> RxPlan {
    let gso = h[1];
    if gso != GSO_NONE {
        // GSO frames carry partial checksums: a receiver without GUEST_CSUM (which
        // the GUEST_TSO/UFO features require) cannot take them either.
        let ok = has(features, F_GUEST_CSUM)
            && match gso & !GSO_ECN {
                GSO_TCPV4 => has(features, F_GUEST_TSO4),
                GSO_TCPV6 => has(features, F_GUEST_TSO6),
                GSO_UDP => has(features, F_GUEST_UFO),
                _ => false,
            }
            && (gso & GSO_ECN == 0 || has(features, F_GUEST_ECN));
        if !ok {
            return match gso & !GSO_ECN {
                GSO_TCPV4 | GSO_TCPV6 => {
                    let mut plain = [0u8; HDR_LEN];
                    plain[NUM_BUFFERS_OFFSET] = 1;
                    RxPlan::Segment(plain)
                }
                _ => RxPlan::Drop,
            };
        }
    }
    let mut out = *h;
    out[NUM_BUFFERS_OFFSET] = 1;
    if !has(features, F_GUEST_CSUM) {
        out[0] = 0;
        out[2..10].fill(0);
        if h[0] & HDR_F_NEEDS_CSUM != 0 {
            return RxPlan::CompleteCsum(out);
        }
    }
    RxPlan::Pass(out)
}

/// Completes a partial checksum: the one's complement sum from `csum_start` to the
/// end (the field at `csum_start + csum_offset` holds the pseudo-header sum) is
/// stored there. Returns false if the offsets do not fit the frame.
pub fn complete_checksum(frame: &mut [u8], h: &[u8; HDR_LEN]) -> bool {
    let start = usize::from(u16::from_le_bytes([h[6], h[7]]));
    let off = usize::from(u16::from_le_bytes([h[8], h[9]]));
    let Some(field) = start.checked_add(off) else {
        return false;
    };
    if start >= frame.len() || field + 2 > frame.len() {
        return false;
    }
    let mut sum: u64 = 0;
    let mut chunks = frame[start..].chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !(sum as u16);
    frame[field..field + 2].copy_from_slice(&csum.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn hdr(flags: u8, gso: u8, start: u16, off: u16) -> [u8; HDR_LEN] {
        let mut h = [0u8; HDR_LEN];
        h[0] = flags;
        h[1] = gso;
        h[4..6].copy_from_slice(&1448u16.to_le_bytes());
        h[6..8].copy_from_slice(&start.to_le_bytes());
        h[8..10].copy_from_slice(&off.to_le_bytes());
        h
    }

    #[test]
    fn headers_are_honoured_only_for_negotiated_offloads() {
        let h = hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 34, 16);
        assert_eq!(sanitize_tx(&h, OFFLOAD_FEATURES), {
            let mut x = h;
            x[10] = 0;
            x
        });
        let s = sanitize_tx(&h, 0);
        assert_eq!(s, [0u8; HDR_LEN]);
        let s = sanitize_tx(&h, 1 << F_CSUM);
        assert_eq!((s[0], s[1]), (HDR_F_NEEDS_CSUM, GSO_NONE));
        assert_eq!(&s[6..10], &h[6..10]);
        let ecn = hdr(0, GSO_TCPV6 | GSO_ECN, 0, 0);
        assert_eq!(sanitize_tx(&ecn, 1 << F_HOST_TSO6)[1], GSO_NONE);
        assert_eq!(
            sanitize_tx(&ecn, 1 << F_HOST_TSO6 | 1 << F_HOST_ECN)[1],
            GSO_TCPV6 | GSO_ECN
        );
    }

    #[test]
    fn receivers_get_what_they_negotiated() {
        let gso = hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 34, 16);
        let mut plain = [0u8; HDR_LEN];
        plain[10] = 1;
        assert_eq!(plan_rx(&gso, 1 << F_GUEST_CSUM), RxPlan::Segment(plain));
        // TSO6 does not take TCPv4; TSO4 without ECN does not take ECN frames.
        assert_eq!(plan_rx(&gso, 1 << F_GUEST_TSO6), RxPlan::Segment(plain));
        let ecn = hdr(HDR_F_NEEDS_CSUM, GSO_TCPV6 | GSO_ECN, 54, 16);
        assert_eq!(plan_rx(&ecn, 1 << F_GUEST_TSO6), RxPlan::Segment(plain));
        let csum = 1 << F_GUEST_CSUM;
        assert!(matches!(
            plan_rx(&ecn, csum | 1 << F_GUEST_TSO6 | 1 << F_GUEST_ECN),
            RxPlan::Pass(h) if h[1] == GSO_TCPV6 | GSO_ECN && h[4..6] == [0xa8, 5]
        ));
        // TSO without GUEST_CSUM (not valid virtio) is segmented, not passed on with
        // a cleared header.
        assert_eq!(
            plan_rx(&ecn, 1 << F_GUEST_TSO6 | 1 << F_GUEST_ECN),
            RxPlan::Segment(plain)
        );
        // UDP fragmentation is not segmented.
        let udp = hdr(HDR_F_NEEDS_CSUM, GSO_UDP, 34, 6);
        assert_eq!(
            plan_rx(&udp, OFFLOAD_FEATURES & !(1 << F_GUEST_UFO)),
            RxPlan::Drop
        );
        match plan_rx(&gso, OFFLOAD_FEATURES) {
            RxPlan::Pass(h) => assert_eq!((h[0], h[1], h[10]), (1, GSO_TCPV4, 1)),
            p => panic!("{p:?}"),
        }
        let csum = hdr(HDR_F_NEEDS_CSUM, GSO_NONE, 34, 16);
        match plan_rx(&csum, 0) {
            RxPlan::CompleteCsum(h) => assert_eq!(h, {
                let mut z = [0u8; HDR_LEN];
                z[10] = 1;
                z
            }),
            p => panic!("{p:?}"),
        }
        assert!(matches!(
            plan_rx(&[0; HDR_LEN], 0),
            RxPlan::Pass(h) if h[10] == 1
        ));
    }

    #[test]
    fn checksum_completion_matches_a_full_checksum() {
        // A UDP-like payload: checksum over [start..], field at start + 6.
        let mut f: Vec<u8> = (0..101u32).map(|i| (i * 7 + 3) as u8).collect();
        let (start, off) = (20usize, 6usize);
        // Reference: full checksum with the field zeroed plus a pseudo sum of 0x1234.
        f[start + off] = 0;
        f[start + off + 1] = 0;
        let mut reference = f.clone();
        let pseudo: u16 = 0x1234;
        f[start + off..start + off + 2].copy_from_slice(&pseudo.to_be_bytes());
        let h = hdr(HDR_F_NEEDS_CSUM, 0, start as u16, off as u16);
        assert!(complete_checksum(&mut f, &h));
        // Verifying: the sum over the region with the pseudo sum added is 0xffff.
        reference[start + off..start + off + 2].copy_from_slice(&f[start + off..start + off + 2]);
        let mut sum: u32 = u32::from(pseudo);
        let mut c = reference[start..].chunks_exact(2);
        for x in &mut c {
            sum += u32::from(u16::from_be_bytes([x[0], x[1]]));
        }
        if let [l] = c.remainder() {
            sum += u32::from(*l) << 8;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        assert!(!complete_checksum(&mut f, &hdr(1, 0, 100, 6)));
        assert!(!complete_checksum(&mut f, &hdr(1, 0, 200, 0)));
    }
}
