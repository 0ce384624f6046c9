//! Errors that reach a user: each names the thing, the problem and what to do about it.

use std::io;
use std::path::PathBuf;

/// What is wrong with a bitmap file. Matchable, so tests and callers can tell the cases apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapProblem {
    Unreadable,
    ReadOnly,
    InUse,
    Truncated { len: u64, need: u64 },
    BadMagic,
    UnsupportedVersion(u32),
    Checksum,
    WrongPair { role: &'static str, recorded: String, given: String },
    SizeMismatch { recorded: u64, device: u64 },
    GranularityMismatch { recorded: u64, requested: u64 },
    Corrupt(String),
    SwitchedOver,
    /// The file shrank or became unreadable while a mirror used it (see `crate::io::sigbus`).
    Lost,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bitmap {path}: {what}\n  fix: {fix}", path = .path.display())]
    Bitmap { path: PathBuf, problem: BitmapProblem, what: String, fix: String },

    #[error("{role} {path}: {what}: {source}\n  fix: {fix}", path = .path.display())]
    Open { role: &'static str, path: PathBuf, what: String, fix: String, source: io::Error },

    #[error("{0}")]
    Config(String),

    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
    /// The bitmap problem, if this is a bitmap error.
    pub fn bitmap_problem(&self) -> Option<&BitmapProblem> {
        match self {
            Error::Bitmap { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
