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
