//! MAC addresses and PCI addresses as written in the config file.

use std::fmt;

/// What a MAC address looks like, for error messages.
pub(crate) const MAC_EXPECTED: &str = "a MAC address like \"52:54:00:12:34:56\"";
/// What a PCI address looks like, for error messages.
pub(crate) const PCI_EXPECTED: &str = "a PCI address like \"0000:01:00.0\" or \"01:00.0\"";

/// Parses `"52:54:00:12:34:56"` (six pairs of hex digits separated by `:`).
///
/// Only the syntax is checked here; unicast / non-zero rules are checked by validation.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        *byte = parse_hex_exact(parts.next()?, 2)? as u8;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(mac)
}

/// Formats a MAC address as `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// A PCI address: domain (segment), bus, device and function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// PCI domain (segment group), usually 0.
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..=31.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl PciAddress {
    /// Parses `"DDDD:BB:DD.F"` or `"BB:DD.F"` (hex; domain defaults to 0).
    pub fn parse(text: &str) -> Option<PciAddress> {
        let (rest, function) = text.rsplit_once('.')?;
        let function = parse_hex_exact(function, 1)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [bus, device] => (0, *bus, *device),
            [domain, bus, device] => (parse_hex_exact(domain, 4)?, *bus, *device),
            _ => return None,
        };
        let bus = parse_hex_exact(bus, 2)?;
        let device = parse_hex_exact(device, 2)?;
        if device > 0x1f || function > 7 {
            return None;
        }
        Some(PciAddress {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// Parses exactly `digits` hex digits (no sign, no prefix).
fn parse_hex_exact(text: &str, digits: usize) -> Option<u32> {
    if text.len() != digits || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(text, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5F"),
            Some([0x52, 0x54, 0x00, 0x12, 0x34, 0x5f])
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "5:54:00:12:34:56",
            "52:54:00:12:34:5g",
            "+2:54:00:12:34:56",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            "52:54:00:12:34:56"
        );
    }

    #[test]
    fn pci_addresses() {
        let full = PciAddress::parse("0000:01:00.0");
        assert_eq!(
            full,
            Some(PciAddress {
                domain: 0,
                bus: 1,
                device: 0,
                function: 0
            })
        );
        assert_eq!(PciAddress::parse("01:00.0"), full);
        let other = PciAddress::parse("abcd:ff:1f.7");
        assert_eq!(
            other.map(|a| a.to_string()).as_deref(),
            Some("abcd:ff:1f.7")
        );
        for bad in [
            "",
            "01:00",
            "1:00.0",
            "0000:01:20.0",
            "0000:01:00.8",
            "00000:01:00.0",
            "0000:01:00.0.1",
            "x:0000:01:00.0",
        ] {
            assert_eq!(PciAddress::parse(bad), None, "{bad:?}");
        }
    }
}
