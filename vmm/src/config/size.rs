//! Human-readable sizes (`"512MiB"`) and durations (`"30s"`).
//!
//! Both parsers return a short description of what was expected on failure; the caller
//! adds the file position, the field path and the offending text.

use std::time::Duration;

/// One KiB.
pub const KIB: u64 = 1 << 10;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;

/// What a size string looks like, for error messages.
pub(crate) const SIZE_EXPECTED: &str = "a size like \"512MiB\" or \"2GiB\"";
/// What a duration string looks like, for error messages.
pub(crate) const DURATION_EXPECTED: &str = "a duration like \"500ms\", \"30s\" or \"2m\"";

/// Parses a size such as `"512MiB"`, `"2 GiB"`, `"4096B"` or `"16M"` into bytes.
///
/// Units are binary: `B`, `KiB`/`K`, `MiB`/`M`, `GiB`/`G` (case-sensitive, so that
/// `"1m"` cannot be misread as milli- or mega-). The number must be a non-negative
/// integer. Returns `None` when the text is not a size or does not fit in 64 bits.
pub fn parse_size(text: &str) -> Option<u64> {
    let (number, unit) = split_number(text.trim())?;
    let multiplier = match unit {
        "B" => 1,
        "K" | "KiB" => KIB,
        "M" | "MiB" => MIB,
        "G" | "GiB" => GIB,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// Formats a byte count with the largest binary unit that divides it exactly
/// (`536870912` becomes `"512MiB"`).
pub fn format_size(bytes: u64) -> String {
    for (unit, size) in [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if bytes != 0 && bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

/// Parses a duration such as `"500ms"`, `"30s"`, `"2m"` or `"1h"`.
///
/// The number must be a non-negative integer; returns `None` for anything else or on
/// overflow.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = split_number(text.trim())?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    number
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
}

/// Splits `"512 MiB"` into `(512, "MiB")`. The number must be decimal digits only.
fn split_number(text: &str) -> Option<(u64, &str)> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, rest) = text.split_at(digits_end);
    if digits.is_empty() {
        return None;
    }
    let number = digits.parse::<u64>().ok()?;
    Some((number, rest.trim_start()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Some(512 * MIB));
        assert_eq!(parse_size("512 MiB"), Some(512 * MIB));
        assert_eq!(parse_size("2GiB"), Some(2 * GIB));
        assert_eq!(parse_size("2G"), Some(2 * GIB));
        assert_eq!(parse_size("16M"), Some(16 * MIB));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("4KiB"), Some(4096));
        assert_eq!(parse_size("4096B"), Some(4096));
        assert_eq!(parse_size(" 1GiB "), Some(GIB));
        for bad in [
            "",
            "MiB",
            "12 parsecs",
            "1.5GiB",
            "-1GiB",
            "512",
            "512mib",
            "1m",
            "99999999999999999999GiB",
            "17179869184GiB",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn size_formatting() {
        assert_eq!(format_size(512 * MIB), "512MiB");
        assert_eq!(format_size(3 * GIB), "3GiB");
        assert_eq!(format_size(4096), "4KiB");
        assert_eq!(format_size(4097), "4097B");
        assert_eq!(format_size(0), "0B");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in [
            "",
            "30",
            "s",
            "1.5s",
            "30 sec",
            "-1s",
            "99999999999999999999h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }
}
