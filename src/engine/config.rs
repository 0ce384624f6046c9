//! How a mirror copies: the copy settings fixed at start (`CopyConfig`), those a running
//! mirror takes (`Settings`, `CopyMode`), and the `--on-consistent` command.

use crate::error::{Error, Result};
use super::on_consistent::OnConsistentCommand;
use std::time::Duration;

/// How writes to the device reach the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Writes complete once on the source; the mirror copies dirty regions behind them.
    Background,
    /// Writes complete once on the source and the target (QEMU's write-blocking active mirror):
    /// regions written stay clean, the dirty set only drains.
    WriteBlocking,
    /// Writes complete once on the source and in the replication buffer; the mirror ships them
    /// to the target in order, one flush epoch at a time (DRBD's protocol A), and falls back to
    /// the background copy when the buffer is full or the target fails.
    Async,
}

/// The replication buffer of async mode when none is set: 64 MiB, about half a second of a fast
/// SSD's random writes, a few seconds of a disk's.
pub const DEFAULT_ASYNC_BUFFER: u64 = 64 << 20;

/// Live settings as a whole (for `add` and the status).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    pub speed: u64,
    /// Copy rate limit while the device is busy (`--busy-speed`); 0 = none. Absent in the saved
    /// configuration of older daemons: no limit.
    #[serde(default)]
    pub busy_speed: u64,
    pub paused: bool,
    pub mode: Option<CopyMode>,
    pub max_lag_ms: u64,
    pub max_retries: u32,
    /// Async mode's replication buffer in bytes (`--async-buffer`); 0: the default
    /// ([`DEFAULT_ASYNC_BUFFER`]). Absent in older saved configurations.
    #[serde(default)]
    pub async_buffer: u64,
    /// Only carried from the saved configuration to a recovered daemon (not a live setting).
    #[serde(skip)]
    pub hook: Option<OnConsistentCommand>,
}

/// Tunables of the copy loop.
#[derive(Clone, Debug)]
pub struct CopyConfig {
    /// Copies in flight (QEMU: 16; 32 measured faster here: bench/results/sync-2026-11-27-*).
    pub max_copies: usize,
    /// Bytes per copy buffer (QEMU: 1 MiB). Memory used is `max_copies * buf_size`.
    pub buf_size: usize,
    /// Make progress durable (target flush, then clear bits) after this many bytes copied...
    pub checkpoint_bytes: u64,
    /// ...or after this long, whichever comes first.
    pub checkpoint_interval: Duration,
    /// Live mirrors clear a region's bit only once it has stayed untouched for half this to this
    /// long after its copy reached the target (two ticks of half this), so that a region written
    /// again soon does not pay another bitmap flush (md's bitmap daemon does the same). Offline
    /// syncs clear at once.
    pub clear_delay: Duration,
    /// Live mirrors set the write intent of a whole aligned extent of this many bytes at the
    /// first write to any of its regions (one bitmap flush for all of them), so that writes
    /// spread over an extent wait for one flush instead of one per region, at the price of
    /// copying up to this much per recently written extent after a crash (DRBD's activity-log
    /// extent is 4 MiB too). The extra bits clear lazily like any stale bit. At or below the
    /// region size: none.
    pub intent_extent: u64,
    /// A command to run after consistent points (live mirrors).
    pub on_consistent: Option<OnConsistentCommand>,
}

impl Default for CopyConfig {
    fn default() -> Self {
        CopyConfig {
            max_copies: 32,
            buf_size: 1 << 20,
            checkpoint_bytes: 1 << 30,
            checkpoint_interval: Duration::from_secs(10),
            clear_delay: Duration::from_secs(5),
            intent_extent: 4 << 20,
            on_consistent: None,
        }
    }
}

/// Why copies could not all be written to a target that takes only whole blocks of `block`
/// bytes (offsets and lengths), or None. A copy starts on a region boundary and covers at most a
/// region, up to the source's end for the last one: the granularity and the source's size must
/// both be multiples of the block. (Copies are also cut at the copy buffer's size, which
/// [`CopyConfig::check_block`] checks, and at the source's holes, which the mirror rounds out
/// to whole blocks.)
pub fn alignment_problem(block: u64, source_size: u64, granularity: u64) -> Option<String> {
    if block <= 1 {
        return None;
    }
    if granularity % block != 0 {
        return Some(format!(
            "the granularity ({granularity} bytes) is not a multiple of the target's minimum block \
             size ({block} bytes), so no copy could be written: use --granularity {} or larger \
             (with --full for an existing bitmap)",
            crate::io::bitmap::size_arg(block.max(crate::io::bitmap::MIN_GRANULARITY))
        ));
    }
    if source_size % block != 0 {
        return Some(format!(
            "the source's size ({source_size} bytes) is not a multiple of {block}, the target's \
             minimum block size, so its last region could never be copied: resize the source \
             to a multiple of {block} bytes, or use a target that takes 512-byte blocks"
        ));
    }
    None
}

impl CopyConfig {
    /// Refuses copy buffers that are not whole blocks of a target that takes only `block`-byte
    /// blocks: a copy of a buffer's worth would be refused on every retry.
    pub fn check_block(&self, block: u64) -> Result<()> {
        if block > 1 && self.buf_size as u64 % block != 0 {
            return Err(Error::config(format!(
                "the copy buffer ({} bytes) is not a multiple of the target's minimum block size \
                 ({block} bytes), so copies could not be written: use --buffer {} or larger",
                self.buf_size,
                crate::io::bitmap::size_arg(block)
            )));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        if self.max_copies == 0 || self.max_copies > 1024 {
            return Err(Error::config("copies in flight must be between 1 and 1024"));
        }
        if self.buf_size < 4096 || !self.buf_size.is_power_of_two() || self.buf_size > (256 << 20) {
            return Err(Error::config(
                "copy buffer size must be a power of two from 4 KiB to 256 MiB",
            ));
        }
        Ok(())
    }
}
