//! The config error type and the conversion of byte spans into `line:column`.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::host::HostError;

/// Why a sandbox config was rejected. `Display` is always exactly one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("{}: cannot read config file: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The config file is not valid: bad syntax, wrong type, bad value, or it does not
    /// fit this host. Displays as `FILE:LINE:COL: field.path: message`.
    #[error("{file}:{line}:{column}: {}", with_field(field, message))]
    Invalid {
        /// The config file as given by the caller.
        file: String,
        /// 1-based line of the offending text.
        line: usize,
        /// 1-based column (in characters) of the offending text.
        column: usize,
        /// Dotted path of the field, e.g. `net[1].mac`; empty for the document itself.
        field: String,
        /// What was expected and what was found.
        message: String,
    },
    /// Host facts (CPUs, NUMA nodes) needed for validation could not be read.
    #[error("cannot check the config against this host: {0}")]
    Host(#[from] HostError),
}

impl ConfigError {
    /// The field path of an [`ConfigError::Invalid`] error (`""` for the document).
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }

    /// The 1-based `(line, column)` of an [`ConfigError::Invalid`] error.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Invalid { line, column, .. } => Some((*line, *column)),
            _ => None,
        }
    }
}

fn with_field(field: &str, message: &str) -> String {
    if field.is_empty() {
        message.to_string()
    } else {
        format!("{field}: {message}")
    }
}

/// A validation failure before it is tied to a file: where, which field, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    /// Byte range in the config text; `None` points at the start of the file.
    pub span: Option<Range<usize>>,
    /// Dotted field path.
    pub field: String,
    /// What was expected and what was found.
    pub message: String,
}

impl Problem {
    /// A problem at `span` in field `field`.
    pub fn new(span: Range<usize>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            span: Some(span),
            field: field.into(),
            message: message.into(),
        }
    }

    /// Ties the problem to the config text it came from.
    pub fn into_error(self, text: &str, origin: &Path) -> ConfigError {
        let offset = self.span.map(|s| s.start).unwrap_or(0);
        let (line, column) = line_column(text, offset);
        ConfigError::Invalid {
            file: origin.display().to_string().replace('\n', "\\n"),
            line,
            column,
            field: one_line(&self.field),
            message: one_line(&self.message),
        }
    }
}

pub(crate) use keel_config_error::{line_column, one_line};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        let err = Problem::new(0..1, "memory.size", "bad").into_error("x", Path::new("demo.toml"));
        assert_eq!(err.to_string(), "demo.toml:1:1: memory.size: bad");
        let err = Problem::new(0..1, "", "bad").into_error("x", Path::new("demo.toml"));
        assert_eq!(err.to_string(), "demo.toml:1:1: bad");
    }
}
