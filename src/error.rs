//! The crate's error type. Every failure that bad input can cause is an [`Error`] with a
//! message naming the file, the field and the row where that is known; nothing panics on
//! malformed input.

use std::path::{Path, PathBuf};

/// Errors of the engine. The `Display` text is what the user sees, so each variant says
/// where the problem is (file, tensor/field, row/line) and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory being accessed.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A malformed or inconsistent dataset file: `file`, then what is wrong (naming the
    /// tensor or manifest field and the row where known).
    #[error("{file}: {msg}")]
    Format {
        /// The offending file.
        file: PathBuf,
        /// What is wrong, with tensor/field and row.
        msg: String,
    },
    /// Bad user input that is not tied to a file (arguments, configuration values).
    #[error("{0}")]
    Invalid(String),
    /// A failure of the compute device or its libraries (CUDA driver, NVRTC, cuBLAS, a kernel
    /// launch), or a fault a kernel detected (an id beyond its vocabulary, a length beyond
    /// its padded extent).
    #[error("{0}")]
    Device(String),
    /// A training run diverged (a loss that is not finite or exploded, a model collapsed to
    /// a constant score): what happened, and what was kept.
    #[error("{0}")]
    Diverged(String),
    /// A data-parallel job failed as a whole: a rank did not arrive at the rendezvous, failed,
    /// stopped without a word or stayed silent past the watchdog timeout (naming the rank).
    #[error("{0}")]
    Distributed(String),
    /// Standard output could not be written (a closed pipe, a full disk); see
    /// [`crate::io::stdout`].
    #[error("writing to standard output: {0}")]
    Stdout(std::io::Error),
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A format error in `file`.
    pub fn format(file: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            file: file.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    /// A device error.
    pub fn device(msg: impl Into<String>) -> Self {
        Error::Device(msg.into())
    }

    /// An invalid-input error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// Whether this is a write to standard output that failed because the reader went away
    /// (`mgkd-train … | head`): the command stops quietly.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Stdout(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}
