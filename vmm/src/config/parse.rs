//! TOML text to the raw structs, with serde errors turned into located [`Problem`]s.

use super::error::Problem;
use super::locate::FieldIndex;
use super::raw::RawConfig;

/// Parses `text` into the raw config, or describes the first syntax or type error.
pub(crate) fn parse_raw(text: &str) -> Result<RawConfig, Problem> {
    toml::from_str::<RawConfig>(text).map_err(|e| serde_problem(text, &e))
}

/// Turns a toml/serde error into a problem with a field path and a message that says
/// what was expected and what was found.
fn serde_problem(text: &str, err: &toml::de::Error) -> Problem {
    let span = err.span();
    let index = FieldIndex::new(text);
    let mut field = span
        .as_ref()
        .map(|s| index.path_at(s.start).to_string())
        .unwrap_or_default();
    let raw_message = err.message().trim();
    let message = if let Some(rest) = raw_message.strip_prefix("unknown field `") {
        // The span points at the unknown key itself; name the table it is in.
        if let Some((name, _)) = rest.split_once('`') {
            field = parent_of(&field, name);
        }
        raw_message.to_string()
    } else if let Some(rest) = raw_message.strip_prefix("missing field `") {
        // The span is the table missing the field; the root table has no path.
        field = span
            .as_ref()
            .map(|s| index.path_of_span(s).to_string())
            .unwrap_or_default();
        format!("missing required field `{rest}")
    } else if let Some(rest) = raw_message.strip_prefix("invalid type: ") {
        match rest.rsplit_once(", expected ") {
            Some((found, expected)) => format!(
                "expected {}, found {}",
                describe_expected(expected),
                describe_found(found)
            ),
            None => raw_message.to_string(),
        }
    } else {
        raw_message.to_string()
    };
    Problem {
        span,
        field,
        message,
    }
}

/// `"vcpus.pin"` with key `pin` becomes `"vcpus"`; top-level keys give `""`.
fn parent_of(path: &str, key: &str) -> String {
    match path.strip_suffix(key) {
        Some(rest) => rest.strip_suffix('.').unwrap_or(rest).to_string(),
        None => path.to_string(),
    }
}

/// Rewrites serde's Rust-flavoured type names in TOML terms.
fn describe_expected(expected: &str) -> String {
    match expected {
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" => "an integer".into(),
        "a sequence" => "an array".into(),
        "a map" => "a table".into(),
        e if e.starts_with("struct ") => "a table".into(),
        e => e.into(),
    }
}

fn describe_found(found: &str) -> String {
    match found {
        "sequence" => "an array".into(),
        "map" => "a table".into(),
        f => f.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(text: &str) -> Problem {
        match parse_raw(text) {
            Ok(raw) => panic!("parsed: {raw:?}"),
            Err(p) => p,
        }
    }

    const GOOD: &str = "name = \"x\"\n[memory]\nsize = \"1GiB\"\n[boot]\nkernel = \"k\"\n";

    #[test]
    fn minimal_parses() {
        assert!(parse_raw(GOOD).is_ok());
    }

    #[test]
    fn unknown_top_level_field() {
        let p = problem(&format!("cpus = 3\n{GOOD}"));
        assert_eq!(p.field, "");
        assert!(
            p.message
                .starts_with("unknown field `cpus`, expected one of"),
            "{p:?}"
        );
    }

    #[test]
    fn unknown_nested_field() {
        let p = problem(&format!("{GOOD}[vcpus]\npin = 3\n"));
        assert_eq!(p.field, "vcpus");
        assert!(
            p.message.starts_with("unknown field `pin`, expected"),
            "{p:?}"
        );
    }

    #[test]
    fn wrong_type() {
        let p = problem(&format!("{GOOD}[vcpus]\ncount = \"two\"\n"));
        assert_eq!(p.field, "vcpus.count");
        assert_eq!(p.message, "expected an integer, found string \"two\"");
        let p = problem(&format!("vcpus = 2\n{GOOD}"));
        assert_eq!(p.field, "vcpus");
        assert_eq!(p.message, "expected a table, found integer `2`");
    }

    #[test]
    fn missing_field() {
        let p = problem("name = \"x\"\n[memory]\nsize = \"1GiB\"\n[boot]\ninitramfs = \"i\"\n");
        assert_eq!(p.field, "boot");
        assert_eq!(p.message, "missing required field `kernel`");
    }

    #[test]
    fn errors_in_arrays_of_tables() {
        let net = "[[net]]\nid = \"a\"\nsocket = \"a\"\nmac = \"m\"\n";
        let p = problem(&format!("{GOOD}{net}[[net]]\nid = \"b\"\nsocket = \"b\"\n"));
        assert_eq!(p.field, "net[1]");
        assert_eq!(p.message, "missing required field `mac`");
        let p = problem(&format!("{GOOD}{net}[[net]]\nid = \"b\"\nmtu = 9000\n"));
        assert_eq!(p.field, "net[1]");
        assert!(p.message.starts_with("unknown field `mtu`"), "{p:?}");
        let p = problem(&format!("{GOOD}{net}queue_size = true\n"));
        assert_eq!(p.field, "net[0].queue_size");
        assert_eq!(p.message, "expected an integer, found boolean `true`");
    }

    #[test]
    fn errors_in_inline_tables() {
        let p = problem("name = \"x\"\nmemory = { size = \"1GiB\" }\nboot = { initrd = \"i\" }\n");
        assert_eq!(p.field, "boot");
        assert!(p.message.starts_with("unknown field `initrd`"), "{p:?}");
        let p = problem("name = \"x\"\nmemory = { size = \"1GiB\" }\nboot = { }\n");
        assert_eq!(p.field, "boot");
        assert_eq!(p.message, "missing required field `kernel`");
    }

    #[test]
    fn syntax_error_is_one_line_after_formatting() {
        let p = problem("name = \n");
        assert!(p.span.is_some());
        let err = p.into_error("name = \n", std::path::Path::new("a.toml"));
        assert!(!err.to_string().contains('\n'), "{err}");
    }
}
