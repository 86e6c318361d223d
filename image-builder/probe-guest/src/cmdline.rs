//! Kernel command line parsing.

/// Returns the value of the last `key=value` token whose key is `key`
/// (tokens are separated by ASCII whitespace; no quoting).
pub fn value<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline.rsplit(u8::is_ascii_whitespace).find_map(|token| {
        let rest = token.strip_prefix(key)?;
        rest.strip_prefix(b"=")
    })
}

/// Parses a decimal `u64` (no sign, no separators); `None` if malformed or too big.
pub fn parse_u64(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.iter().try_fold(0u64, |acc, &b| {
        let digit = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}
