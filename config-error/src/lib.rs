//! Configuration errors shared by keel's programs: where in a TOML file something is
//! wrong (`FILE:LINE:COLUMN: message`, always one line), a file that cannot be read,
//! and bad command-line values.

use std::path::{Path, PathBuf};

/// Why a configuration was rejected. `Display` is one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("{}: cannot read config file: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML file is invalid: `FILE:LINE:COL: message`.
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        /// The config file as given.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column (characters).
        column: usize,
        /// What was wrong and what was expected.
        message: String,
    },
    /// A command-line option or a value is invalid.
    #[error("{0}")]
    Args(String),
}

impl ConfigError {
    /// An error at byte `offset` of `text`, the contents of `file`; a multi-line
    /// `message` is joined into one line.
    pub fn at(file: &Path, text: &str, offset: usize, message: &str) -> ConfigError {
        let (line, column) = line_column(text, offset);
        ConfigError::Invalid {
            file: file.display().to_string(),
            line,
            column,
            message: one_line(message),
        }
    }

    /// A TOML syntax or type error in `text`, the contents of `file`, at the place
    /// the parser names (the start of the file if it names none).
    pub fn toml(file: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
        let offset = e.span().map_or(0, |s| s.start);
        ConfigError::at(file, text, offset, e.message())
    }
}

/// Reads a config file, or says which one could not be read and why.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// 1-based line and column (counted in characters) of byte `offset` in `text`.
/// Offsets past the end or inside a character are clamped.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Joins the lines of a multi-line message with `"; "`, trimmed, so every error is
/// one line.
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn lines_and_columns_count_characters() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        // After the two-byte 'é': column 3, not 4.
        assert_eq!(line_column(text, 9), (2, 3));
        // Inside 'é', and past the end: clamped, never a panic.
        assert_eq!(line_column(text, 8), (2, 2));
        assert_eq!(line_column(text, 1000), (3, 1));
        assert_eq!(line_column("", 5), (1, 1));
    }

    #[test]
    fn errors_are_one_line_with_the_place() {
        let text = "x = 1\ny = @\n";
        let e = toml::from_str::<toml::Table>(text).unwrap_err();
        let msg = ConfigError::toml(Path::new("/etc/k.toml"), text, &e).to_string();
        assert!(msg.starts_with("/etc/k.toml:2:5: "), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        let e = ConfigError::at(Path::new("f"), "abc", 2, "first\n  second\n");
        assert_eq!(e.to_string(), "f:1:3: first; second");
        assert_eq!(
            one_line("invalid table header\nexpected `.`, `]`\n"),
            "invalid table header; expected `.`, `]`"
        );
        assert_eq!(one_line("plain"), "plain");
        let e = read(Path::new("/nonexistent/keel.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/keel.toml: cannot read config file: "),
            "{e}"
        );
    }
}
