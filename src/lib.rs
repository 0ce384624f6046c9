//! ublk-mirror: a block device in user space that keeps a live, crash-safe mirror of a disk.
//!
//! Layers, bottom up; each uses only the layers below it:
//! - [`core`]: the decisions, with no I/O: what a write waits for, what to copy, when to flush
//!   and what to clear ([`core::MirrorState`]); the bitmap's lifecycle ([`core::lifecycle`]); when
//!   the mirror loop acts ([`core::policy`]); the region sets ([`core::pagebits`]);
//! - [`io`]: sources, targets (files, block devices, NBD) and the bitmap file, through io_uring;
//! - [`engine`]: one mirror at work, online or offline: the shared state and the write path
//!   ([`engine::Engine`]), the copy loop ([`engine::mirror`]), the front end's request protocol
//!   ([`engine::queue`]), the event log and the online verify;
//! - [`offline`]: the `sync` and `verify` commands (no device);
//! - [`daemon`]: the ublk device, the control socket, metrics, and the commands that start and
//!   stop daemons;
//! - [`cli`]: the command line's definitions, the man page and completions (`main.rs` runs them).
//!
//! [`error`] and [`units`] serve every layer. docs/architecture.md has the map and the paths of
//! a write, a copy and a consistent point.
#![deny(clippy::undocumented_unsafe_blocks)]
// Errors carry paths and fixes for the user; they occur on cold paths (opening, setup).
#![allow(clippy::result_large_err)]

// Region numbers (up to 2^32 regions) and byte offsets (up to 2^58 bytes) are u64 and index
// in-memory bit sets as usize: a 32-bit usize would truncate them. Linux servers with ublk
// are 64-bit; refuse the rest at build time rather than check every conversion.
const _: () = assert!(usize::BITS >= 64, "ublk-mirror needs a 64-bit target (usize of 64 bits)");

pub mod cli;
pub mod core;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod io;
pub mod offline;
pub mod units;

pub use error::{Error, Result};
