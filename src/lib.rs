//! ublk-mirror: a block device in user space that keeps a live, crash-safe mirror of a disk.
//!
//! Layers, bottom up:
//! - [`core`]: the decisions (write intent, what to copy, when to flush, what to clear), no I/O;
//! - [`policy`]: when the mirror loop acts (rate limits, retries, max-lag, spacing of flushes
//!   and of the --on-consistent command), no I/O and no clock of its own;
//! - [`bitmap`]: the persistent dirty bitmap file; [`lifecycle`]: creating and opening it, in
//!   an order that survives every kind of crash;
//! - [`backing`], [`target`], [`uring`]: sources and targets through io_uring;
//! - [`nbd`]: a target behind an NBD server, on the same io_uring;
//! - [`engine`]: shared state of one mirror and the write-path entry points;
//! - [`mirror`]: the copy loop; [`queue`]: a front-end queue serving block requests;
//! - [`sync`]: the offline `sync` and `verify` commands.
#![deny(clippy::undocumented_unsafe_blocks)]
// Errors carry paths and fixes for the user; they occur on cold paths (opening, setup).
#![allow(clippy::result_large_err)]

// Region numbers (up to 2^32 regions) and byte offsets (up to 2^58 bytes) are u64 and index
// in-memory bit sets as usize: a 32-bit usize would truncate them. Linux servers with ublk
// are 64-bit; refuse the rest at build time rather than check every conversion.
const _: () = assert!(usize::BITS >= 64, "ublk-mirror needs a 64-bit target (usize of 64 bits)");

pub mod admin;
pub mod backing;
pub mod bitmap;
pub mod cli;
pub mod control;
pub mod core;
pub mod device;
pub mod engine;
pub mod error;
pub mod events;
pub mod front;
pub mod lifecycle;
pub mod manpage;
pub mod metrics;
pub mod mirror;
pub mod nbd;
pub mod online_verify;
pub mod pagebits;
pub mod policy;
pub mod queue;
pub mod sync;
pub mod target;
pub mod uring;
pub mod units;

pub use error::{Error, Result};
