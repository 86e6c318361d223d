//! The error type of every benchmark.

use thiserror::Error;

/// Why a benchmark could not finish.
#[derive(Debug, Error)]
pub enum BenchError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The blkio client failed.
    #[error("blkio: {0}")]
    Blkio(String),
    /// Data read back differs from what was written.
    #[error("verification failed: {0}")]
    Verify(String),
    /// A peer or the system under test did not do what was expected.
    #[error("{0}")]
    Run(String),
}

/// Maps an I/O error to [`BenchError::Io`] saying what was being done.
pub fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}
