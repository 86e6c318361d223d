//! Software segmentation of TCP GSO frames (what Linux's `skb_gso_segment` does for
//! TCP), for receivers that did not negotiate the matching GUEST_TSO4/TSO6/ECN
//! feature.
//!
//! A frame with a TCPv4/TCPv6 virtio-net GSO header is parsed and checked against its
//! own bytes first ([`Gso::parse`]): every guest-controlled length (header fields,
//! IPv4 IHL, TCP data offset, IP total/payload length) must fit the frame, the IP
//! version must match the GSO type, `gso_size` must be nonzero and every segment must
//! fit an IP datagram. Each segment ([`Gso::write_segment`]) then gets a copy of the
//! Ethernet (with at most one 802.1Q tag), IP and TCP headers and at most `gso_size`
//! bytes of payload, with the IPv4 total length, id (+1 per segment) and header
//! checksum, or the IPv6 payload length, the TCP sequence number, FIN/PSH (last segment
//! only), CWR (first segment only) and a complete TCP checksum over the pseudo-header.
//! IPv6 extension headers, IPv4 fragments and stacked VLAN tags are refused.

use crate::net::HDR_LEN;
use crate::offload::{GSO_ECN, GSO_TCPV4, GSO_TCPV6};

/// Largest GSO frame (Ethernet header included) taken: Linux's `GSO_MAX_SIZE`.
pub const MAX_GSO_FRAME: usize = 65536;
/// Most segments one frame may be split into (64 KiB at Linux's smallest sending MSS,
/// 48 bytes, needs 1366).
pub const MAX_SEGMENTS: usize = 2048;

const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV6_LEN: usize = 40;
const PROTO_TCP: u8 = 6;
const TCP_MIN: usize = 20;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why a GSO frame cannot be segmented. Every case is the sender's doing; the frame is
/// dropped and counted (`drop_rx_offload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// The GSO type is not TCPv4 or TCPv6 (UDP fragmentation is not segmented).
    #[error("GSO type {0:#x} is not TCP")]
    NotTcp(u8),
    /// `gso_size` is zero.
    #[error("gso_size is zero")]
    ZeroGsoSize,
    /// The frame is larger than [`MAX_GSO_FRAME`].
    #[error("GSO frame of {0} bytes is over 64 KiB")]
    TooLong(usize),
    /// The header's `hdr_len` is beyond the end of the frame.
    #[error("hdr_len {hdr_len} beyond the {len}-byte frame")]
    HdrLenBeyondFrame {
        /// The header's `hdr_len`.
        hdr_len: usize,
        /// The frame length.
        len: usize,
    },
    /// The frame ends inside its Ethernet, IP or TCP header.
    #[error("frame ends inside its headers")]
    Truncated,
    /// The EtherType (or the IP version field) does not match the GSO type.
    #[error("EtherType/IP version {0:#06x} does not match the GSO type")]
    WrongProtocol(u16),
    /// More than one VLAN tag.
    #[error("stacked VLAN tags")]
    StackedVlan,
    /// IPv4 header length below 20 bytes.
    #[error("IPv4 header length {0} bytes")]
    BadIhl(usize),
    /// An IPv4 fragment.
    #[error("IPv4 fragment")]
    Fragment,
    /// The IP header's next protocol is not TCP (IPv6 extension headers included).
    #[error("IP protocol {0} is not TCP")]
    NotTcpPayload(u8),
    /// The IPv4 total length or IPv6 payload length disagrees with the frame.
    #[error("IP length {ip} but the frame carries {frame} bytes")]
    IpLength {
        /// What the IP header says.
        ip: usize,
        /// What the frame holds.
        frame: usize,
    },
    /// TCP data offset below 5 words.
    #[error("TCP header length {0} bytes")]
    BadDataOffset(usize),
    /// A segment (headers plus `gso_size`) would not fit an IP datagram.
    #[error("segments of {0} bytes do not fit an IP datagram")]
    SegmentTooLarge(usize),
    /// More than [`MAX_SEGMENTS`] segments.
    #[error("{0} segments")]
    TooManySegments(usize),
}

/// A checked TCP GSO frame: where its headers are and how it splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    /// The frame length it was checked against.
    len: usize,
    /// Start of the IP header.
    l3: usize,
    /// Start of the TCP header.
    l4: usize,
    /// Start of the payload (end of the headers).
    payload: usize,
    /// Payload bytes per segment.
    mss: usize,
    v4: bool,
    segments: usize,
}

fn be16(b: &[u8], at: usize) -> Result<u16, SegmentError> {
    match b.get(at..at + 2) {
        Some(x) => Ok(u16::from_be_bytes([x[0], x[1]])),
        None => Err(SegmentError::Truncated),
    }
}

fn byte(b: &[u8], at: usize) -> Result<u8, SegmentError> {
    b.get(at).copied().ok_or(SegmentError::Truncated)
}

/// Adds `data` as big-endian 16-bit words (an odd last byte padded with zero) to a
/// one's-complement accumulator.
fn add_words(mut acc: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds an accumulator to 16 bits and complements it: the Internet checksum.
fn finish(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

impl Gso {
    /// Checks `frame` (an Ethernet frame) against its sanitized virtio-net header `h`
    /// and works out its segments.
    pub fn parse(frame: &[u8], h: &[u8; HDR_LEN]) -> Result<Gso, SegmentError> {
        let gso = h[1] & !GSO_ECN;
        let v4 = match gso {
            GSO_TCPV4 => true,
            GSO_TCPV6 => false,
            _ => return Err(SegmentError::NotTcp(h[1])),
        };
        let hdr_len = usize::from(u16::from_le_bytes([h[2], h[3]]));
        let mss = usize::from(u16::from_le_bytes([h[4], h[5]]));
        let len = frame.len();
        if mss == 0 {
            return Err(SegmentError::ZeroGsoSize);
        }
        if len > MAX_GSO_FRAME {
            return Err(SegmentError::TooLong(len));
        }
        // `hdr_len` is only a hint of the header length (Linux senders put the length
        // of their linear buffer there), but it must not point past the frame.
        if hdr_len > len {
            return Err(SegmentError::HdrLenBeyondFrame { hdr_len, len });
        }
        let mut l3 = ETH_LEN;
        let mut ethertype = be16(frame, 12)?;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype = be16(frame, 16)?;
            l3 += VLAN_LEN;
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                return Err(SegmentError::StackedVlan);
            }
        }
        let version = byte(frame, l3)? >> 4;
        let (l4, ip_len) = if v4 {
            if ethertype != ETH_P_IPV4 || version != 4 {
                return Err(SegmentError::WrongProtocol(ethertype));
            }
            let ihl = usize::from(byte(frame, l3)? & 0x0f) * 4;
            if ihl < 20 {
                return Err(SegmentError::BadIhl(ihl));
            }
            if frame.len() < l3 + ihl {
                return Err(SegmentError::Truncated);
            }
            // More-fragments flag or a fragment offset.
            if be16(frame, l3 + 6)? & 0x3fff != 0 {
                return Err(SegmentError::Fragment);
            }
            let proto = byte(frame, l3 + 9)?;
            if proto != PROTO_TCP {
                return Err(SegmentError::NotTcpPayload(proto));
            }
            (l3 + ihl, usize::from(be16(frame, l3 + 2)?))
        } else {
            if ethertype != ETH_P_IPV6 || version != 6 {
                return Err(SegmentError::WrongProtocol(ethertype));
            }
            if frame.len() < l3 + IPV6_LEN {
                return Err(SegmentError::Truncated);
            }
            let next = byte(frame, l3 + 6)?;
            if next != PROTO_TCP {
                return Err(SegmentError::NotTcpPayload(next));
            }
            (l3 + IPV6_LEN, IPV6_LEN + usize::from(be16(frame, l3 + 4)?))
        };
        if ip_len != len - l3 {
            return Err(SegmentError::IpLength {
                ip: ip_len,
                frame: len - l3,
            });
        }
        let doff = usize::from(byte(frame, l4 + 12)? >> 4) * 4;
        if doff < TCP_MIN {
            return Err(SegmentError::BadDataOffset(doff));
        }
        let payload = l4 + doff;
        if payload > len {
            return Err(SegmentError::Truncated);
        }
        // The largest segment's IP datagram must fit the 16-bit IP length fields.
        let biggest = payload - l3 + mss.min(len - payload);
        if biggest > usize::from(u16::MAX) {
            return Err(SegmentError::SegmentTooLarge(biggest));
        }
        let segments = (len - payload).div_ceil(mss).max(1);
        if segments > MAX_SEGMENTS {
            return Err(SegmentError::TooManySegments(segments));
        }
        Ok(Gso {
            len,
            l3,
            l4,
            payload,
            mss,
            v4,
            segments,
        })
    }

    /// How many segments the frame splits into (at least one).
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// The payload range of segment `k` in the frame.
    fn payload_range(&self, k: usize) -> (usize, usize) {
        let start = self.payload.saturating_add(k.saturating_mul(self.mss));
        let end = start.saturating_add(self.mss).min(self.len);
        (start.min(self.len), end)
    }

    /// The length of segment `k` (an Ethernet frame); 0 past the last segment.
    pub fn segment_len(&self, k: usize) -> usize {
        if k >= self.segments {
            return 0;
        }
        let (start, end) = self.payload_range(k);
        self.payload + (end - start)
    }

    /// Writes segment `k` of `frame` (the frame this was parsed from) into `dst`,
    /// which must be exactly [`Gso::segment_len`] bytes. Returns false, writing
    /// nothing, when `frame` or `dst` do not match or `k` is past the last segment.
    pub fn write_segment(&self, frame: &[u8], k: usize, dst: &mut [u8]) -> bool {
        if frame.len() != self.len || k >= self.segments || dst.len() != self.segment_len(k) {
            return false;
        }
        let (start, end) = self.payload_range(k);
        let hl = self.payload;
        dst[..hl].copy_from_slice(&frame[..hl]);
        dst[hl..].copy_from_slice(&frame[start..end]);
        let (l3, l4) = (self.l3, self.l4);
        let ip_len = dst.len() - l3;
        let tcp_len = dst.len() - l4;
        // Both fit 16 bits: checked by `parse` (SegmentTooLarge).
        let mut pseudo: u64;
        if self.v4 {
            dst[l3 + 2..l3 + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
            let id = u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]).wrapping_add(k as u16);
            dst[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
            dst[l3 + 10..l3 + 12].fill(0);
            let csum = finish(add_words(0, &dst[l3..l4]));
            dst[l3 + 10..l3 + 12].copy_from_slice(&csum.to_be_bytes());
            pseudo = add_words(0, &dst[l3 + 12..l3 + 20]);
        } else {
            dst[l3 + 4..l3 + 6].copy_from_slice(&((ip_len - IPV6_LEN) as u16).to_be_bytes());
            pseudo = add_words(0, &dst[l3 + 8..l3 + 40]);
        }
        pseudo += u64::from(PROTO_TCP) + tcp_len as u64;
        let seq = u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]])
            .wrapping_add((k as u32).wrapping_mul(self.mss as u32));
        dst[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = frame[l4 + 13];
        if k + 1 < self.segments {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if k > 0 {
            flags &= !TCP_CWR;
        }
        dst[l4 + 13] = flags;
        dst[l4 + 16..l4 + 18].fill(0);
        let csum = finish(add_words(pseudo, &dst[l4..]));
        dst[l4 + 16..l4 + 18].copy_from_slice(&csum.to_be_bytes());
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::offload::HDR_F_NEEDS_CSUM;

    /// An independent RFC 1071 checksum check: the 32-bit sum of all 16-bit words,
    /// folded, is 0xffff when the checksum inside `data` (plus `pseudo`) is right.
    pub(crate) fn verifies(pseudo: &[u8], data: &[u8]) -> bool {
        let mut sum: u32 = 0;
        for part in [pseudo, data] {
            let mut i = 0;
            while i < part.len() {
                let hi = u32::from(part[i]) << 8;
                let lo = part.get(i + 1).map_or(0, |&b| u32::from(b));
                sum = sum.wrapping_add(hi | lo);
                i += 2;
            }
        }
        while sum > 0xffff {
            sum = (sum >> 16) + (sum & 0xffff);
        }
        sum == 0xffff
    }

    /// An independent check of one TCP segment in an Ethernet frame: IP header
    /// checksum (v4), lengths, TCP checksum. Returns (ip id or 0, seq, flags, payload).
    pub(crate) fn check_segment(seg: &[u8], v4: bool) -> (u16, u32, u8, Vec<u8>) {
        let l3 = 14;
        let (l4, id) = if v4 {
            let ihl = usize::from(seg[l3] & 15) * 4;
            assert!(verifies(&[], &seg[l3..l3 + ihl]), "IPv4 header checksum");
            let tot = usize::from(u16::from_be_bytes([seg[l3 + 2], seg[l3 + 3]]));
            assert_eq!(tot, seg.len() - l3, "IPv4 total length");
            (l3 + ihl, u16::from_be_bytes([seg[l3 + 4], seg[l3 + 5]]))
        } else {
            let pl = usize::from(u16::from_be_bytes([seg[l3 + 4], seg[l3 + 5]]));
            assert_eq!(pl, seg.len() - l3 - 40, "IPv6 payload length");
            (l3 + 40, 0)
        };
        let tcp_len = (seg.len() - l4) as u32;
        let mut pseudo = Vec::new();
        if v4 {
            pseudo.extend_from_slice(&seg[l3 + 12..l3 + 20]);
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        } else {
            pseudo.extend_from_slice(&seg[l3 + 8..l3 + 40]);
            pseudo.extend_from_slice(&tcp_len.to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 6]);
        }
        assert!(verifies(&pseudo, &seg[l4..]), "TCP checksum");
        let seq = u32::from_be_bytes(seg[l4 + 4..l4 + 8].try_into().unwrap());
        let doff = usize::from(seg[l4 + 12] >> 4) * 4;
        (id, seq, seg[l4 + 13], seg[l4 + doff..].to_vec())
    }

    /// A TCP GSO frame: Ethernet (optionally one VLAN tag), IPv4 with `opts` bytes of
    /// options or IPv6, TCP with 12 bytes of options, `payload` bytes, flags `flags`.
    pub(crate) fn tcp_frame(v4: bool, vlan: bool, payload: usize, flags: u8) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1];
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        }
        let body_len = 32 + payload;
        if v4 {
            f.extend_from_slice(&[0x08, 0x00]);
            let tot = (24 + body_len) as u16;
            f.extend_from_slice(&[0x46, 0x02]);
            f.extend_from_slice(&tot.to_be_bytes());
            f.extend_from_slice(&[0xab, 0xcd, 0x40, 0x00, 64, 6, 0x12, 0x34]);
            f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
            f.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
        } else {
            f.extend_from_slice(&[0x86, 0xdd]);
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(body_len as u16).to_be_bytes());
            f.extend_from_slice(&[6, 64]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        }
        // Ports, seq near the wrap, ack, doff 8, flags, window, csum (partial), urg.
        f.extend_from_slice(&[0x9c, 0x40, 0x00, 0x50]);
        f.extend_from_slice(&0xffff_f000u32.to_be_bytes());
        f.extend_from_slice(&0x1111_2222u32.to_be_bytes());
        f.extend_from_slice(&[0x80, flags, 0x01, 0xf5, 0xde, 0xad, 0, 0]);
        f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        f.extend((0..payload).map(|i| (i * 13 + 7) as u8));
        f
    }

    pub(crate) fn gso_hdr(gso: u8, hdr_len: u16, mss: u16) -> [u8; HDR_LEN] {
        let mut h = [0u8; HDR_LEN];
        h[0] = HDR_F_NEEDS_CSUM;
        h[1] = gso;
        h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
        h[4..6].copy_from_slice(&mss.to_le_bytes());
        h
    }

    fn segment_all(frame: &[u8], h: &[u8; HDR_LEN]) -> Result<Vec<Vec<u8>>, SegmentError> {
        let g = Gso::parse(frame, h)?;
        Ok((0..g.segments())
            .map(|k| {
                let mut d = vec![0u8; g.segment_len(k)];
                assert!(g.write_segment(frame, k, &mut d));
                d
            })
            .collect())
    }

    fn check_split(v4: bool, vlan: bool, gso: u8) {
        const MSS: usize = 1448;
        let payload = 3 * MSS + 517;
        let flags = 0x80 | 0x10 | 0x08 | 0x01; // CWR ACK PSH FIN
        let mut frame = tcp_frame(v4, vlan, payload, flags);
        let segs = segment_all(&frame, &gso_hdr(gso, 54, MSS as u16)).unwrap();
        assert_eq!(segs.len(), 4);
        // Drop the tag so the verifier sees a plain Ethernet frame, like the segments.
        if vlan {
            frame.drain(12..16);
        }
        let orig_payload = &frame[frame.len() - payload..];
        let mut joined = Vec::new();
        for (k, mut s) in segs.into_iter().enumerate() {
            if vlan {
                assert_eq!(&s[12..16], &[0x81, 0, 0, 7]);
                s.drain(12..16);
            }
            let (id, seq, fl, data) = check_segment(&s, v4);
            let last = k == 3;
            assert_eq!(data.len(), if last { 517 } else { MSS });
            assert_eq!(seq, 0xffff_f000u32.wrapping_add((k * MSS) as u32));
            if v4 {
                assert_eq!(id, 0xabcdu16.wrapping_add(k as u16));
            }
            let want = 0x10 | if k == 0 { 0x80 } else { 0 } | if last { 0x09 } else { 0 };
            assert_eq!(fl, want, "flags of segment {k}");
            // Everything else in the headers is copied.
            let l4 = if v4 { 14 + 24 } else { 14 + 40 };
            assert_eq!(&s[..14], &frame[..14]);
            assert_eq!(&s[l4 + 8..l4 + 13], &frame[l4 + 8..l4 + 13]);
            assert_eq!(&s[l4 + 14..l4 + 16], &frame[l4 + 14..l4 + 16]);
            assert_eq!(&s[l4 + 18..l4 + 32], &frame[l4 + 18..l4 + 32]);
            joined.extend_from_slice(&data);
        }
        assert_eq!(joined, orig_payload);
    }

    #[test]
    fn tcpv4_frames_split_into_checked_segments() {
        check_split(true, false, GSO_TCPV4);
        check_split(true, false, GSO_TCPV4 | GSO_ECN);
        check_split(true, true, GSO_TCPV4);
    }

    #[test]
    fn tcpv6_frames_split_into_checked_segments() {
        check_split(false, false, GSO_TCPV6);
        check_split(false, true, GSO_TCPV6 | GSO_ECN);
    }

    #[test]
    fn small_and_exact_payloads() {
        // Payload under the MSS: one segment, checksums completed, flags kept.
        let f = tcp_frame(true, false, 100, 0x18);
        let segs = segment_all(&f, &gso_hdr(GSO_TCPV4, 0, 1448)).unwrap();
        assert_eq!(segs.len(), 1);
        let (id, _, fl, data) = check_segment(&segs[0], true);
        assert_eq!((id, fl, data.len()), (0xabcd, 0x18, 100));
        // Exactly two MSS: two full segments; no payload: one header-only segment.
        let f = tcp_frame(false, false, 2 * 1000, 0x19);
        let segs = segment_all(&f, &gso_hdr(GSO_TCPV6, 0, 1000)).unwrap();
        assert_eq!(segs.len(), 2);
        assert_eq!(check_segment(&segs[0], false).2, 0x10);
        assert_eq!(check_segment(&segs[1], false).2, 0x19);
        let f = tcp_frame(false, false, 0, 0x11);
        let segs = segment_all(&f, &gso_hdr(GSO_TCPV6, 0, 1000)).unwrap();
        assert_eq!(check_segment(&segs[0], false).3.len(), 0);
        // A 64 KiB frame at an MSS of 33 needs at most MAX_SEGMENTS.
        let f = tcp_frame(true, false, 65536 - 14 - 24 - 32, 0x10);
        let g = Gso::parse(&f, &gso_hdr(GSO_TCPV4, 0, 33)).unwrap();
        assert_eq!(g.segments(), (65536 - 70usize).div_ceil(33));
        let last = g.segments() - 1;
        let mut d = vec![0u8; g.segment_len(last)];
        assert!(g.write_segment(&f, last, &mut d));
        check_segment(&d, true);
        // Misuse of write_segment is refused, not a panic.
        assert!(!g.write_segment(&f, last + 1, &mut d));
        assert!(!g.write_segment(&f[1..], last, &mut d));
        assert!(!g.write_segment(&f, 0, &mut d));
        assert_eq!(g.segment_len(last + 1), 0);
    }

    #[test]
    fn hostile_headers_are_refused() {
        use SegmentError as E;
        let v4 = tcp_frame(true, false, 3000, 0x10);
        let v6 = tcp_frame(false, false, 3000, 0x10);
        let h4 = gso_hdr(GSO_TCPV4, 0, 1448);
        let h6 = gso_hdr(GSO_TCPV6, 0, 1448);
        // hdr_len is a hint: anything up to the frame length is taken.
        for hl in [0, 20, 70, v4.len() as u16] {
            assert!(Gso::parse(&v4, &gso_hdr(GSO_TCPV4, hl, 1448)).is_ok());
        }
        assert!(Gso::parse(&v6, &h6).is_ok());
        let with = |f: &[u8], at: usize, b: u8| {
            let mut f = f.to_vec();
            f[at] = b;
            f
        };
        let cases: Vec<(&str, Vec<u8>, [u8; HDR_LEN], SegmentError)> = vec![
            (
                "hdr_len beyond frame",
                v4.clone(),
                gso_hdr(GSO_TCPV4, v4.len() as u16 + 1, 1448),
                E::HdrLenBeyondFrame {
                    hdr_len: v4.len() + 1,
                    len: v4.len(),
                },
            ),
            (
                "gso_size 0",
                v4.clone(),
                gso_hdr(GSO_TCPV4, 70, 0),
                E::ZeroGsoSize,
            ),
            ("IHL 4", with(&v4, 14, 0x44), h4, E::BadIhl(16)),
            ("IHL 0", with(&v4, 14, 0x40), h4, E::BadIhl(0)),
            (
                "data offset 4",
                with(&v4, 38 + 12, 0x40),
                h4,
                E::BadDataOffset(16),
            ),
            (
                "data offset 0",
                with(&v6, 54 + 12, 0x00),
                h6,
                E::BadDataOffset(0),
            ),
            (
                "IPv4 gso_type on IPv6",
                v6.clone(),
                gso_hdr(GSO_TCPV4, 0, 1448),
                E::WrongProtocol(0x86dd),
            ),
            (
                "IPv6 gso_type on IPv4",
                v4.clone(),
                gso_hdr(GSO_TCPV6, 0, 1448),
                E::WrongProtocol(0x0800),
            ),
            (
                "IPv6 EtherType, version 4",
                with(&v6, 14, 0x40),
                h6,
                E::WrongProtocol(0x86dd),
            ),
            ("UDP GSO", v4.clone(), gso_hdr(3, 0, 1448), E::NotTcp(3)),
            ("UDP in IPv4", with(&v4, 23, 17), h4, E::NotTcpPayload(17)),
            (
                "IPv6 extension header",
                with(&v6, 20, 0),
                h6,
                E::NotTcpPayload(0),
            ),
            ("fragment", with(&v4, 20, 0x20), h4, E::Fragment),
            ("truncated Ethernet", v4[..13].to_vec(), h4, E::Truncated),
            (
                "truncated IPv4 options",
                v4[..36].to_vec(),
                h4,
                E::Truncated,
            ),
            ("truncated IPv6", v6[..50].to_vec(), h6, E::Truncated),
            (
                "truncated TCP",
                v4[..60].to_vec(),
                h4,
                E::IpLength {
                    ip: v4.len() - 14,
                    frame: 46,
                },
            ),
            (
                "IPv4 length short",
                with(&v4, 16, 0),
                h4,
                E::IpLength {
                    ip: usize::from(v4[17]),
                    frame: v4.len() - 14,
                },
            ),
            (
                "IPv6 length long",
                with(&v6, 18, 0xff),
                h6,
                E::IpLength {
                    ip: 40 + usize::from(u16::from_be_bytes([0xff, v6[19]])),
                    frame: v6.len() - 14,
                },
            ),
            (
                "stacked VLAN",
                [&v4[..12], &[0x88, 0xa8, 0, 1, 0x81, 0, 0, 2], &v4[12..]].concat(),
                h4,
                E::StackedVlan,
            ),
        ];
        for (what, f, h, want) in cases {
            assert_eq!(Gso::parse(&f, &h), Err(want), "{what}");
        }
        // TCP header cut short with consistent IP lengths.
        let mut short = v4[..60].to_vec();
        short[16..18].copy_from_slice(&46u16.to_be_bytes());
        assert_eq!(Gso::parse(&short, &h4), Err(E::Truncated));
        // 64 KiB + 1: refused before anything else is read.
        let huge = vec![0u8; MAX_GSO_FRAME + 1];
        assert_eq!(Gso::parse(&huge, &h4), Err(E::TooLong(MAX_GSO_FRAME + 1)));
        // Tiny MSS on a large frame: too many segments.
        let big = tcp_frame(true, false, 60000, 0x10);
        assert_eq!(
            Gso::parse(&big, &gso_hdr(GSO_TCPV4, 0, 1)),
            Err(E::TooManySegments(60000))
        );
        // Every prefix of valid frames, and every single-byte corruption of the headers,
        // is either refused or yields segments that verify: never a panic.
        for (f, h, v4) in [(&v4, h4, true), (&v6, h6, false)] {
            for n in 0..f.len().min(200) {
                let _ = Gso::parse(&f[..n], &h);
            }
            for at in 0..90 {
                for b in [0u8, 0x0f, 0x45, 0x60, 0xff] {
                    let g = with(f, at, b);
                    if let Ok(segs) = segment_all(&g, &h) {
                        for s in &segs {
                            check_segment(s, v4);
                        }
                    }
                }
            }
        }
    }
}
