//! Progress figures a mirror keeps beside its decision state, under the engine's lock: what was
//! copied, the sync episode, the lag, failures. Status reads them; the loop and the write path
//! update them.

use crate::core::policy::RateMeter;
use std::time::{Instant, SystemTime};

/// Progress figures kept beside the decision state, under the same lock.
#[derive(Clone, Debug)]
pub struct Progress {
    pub started: Instant,
    pub bytes_copied: u64,
    pub bytes_zeroed: u64,
    pub last_consistent: Option<SystemTime>,
    pub last_error: Option<String>,
    pub initial_dirty_regions: u64,
    /// Since when the target has been behind (the first write after the state was synced, or
    /// the consistent point that writes overtook). `None` while synced.
    pub unsynced_since: Option<Instant>,
    /// Bytes copied or zeroed since the current sync episode began (see [`Status::progress`]).
    pub episode_bytes: u64,
    /// The progress figure last reported in this episode: it never goes backwards.
    pub episode_progress: f64,
    /// Rate estimate of the bytes copied and zeroed.
    pub(super) rate: RateMeter,
    /// Target failures in a row (copies or flushes), and since when the pair is degraded.
    pub target_failures: u32,
    pub degraded_since: Option<SystemTime>,
    /// Mirroring gave up after too many failed retries (`--max-retries`): the reason.
    pub gave_up: Option<String>,
    /// The mirror loop itself ended with this error and waits to be restarted (state `failed`;
    /// the pair is degraded too). Cleared when a new loop starts.
    pub loop_failed: Option<String>,
    /// Write-blocking mode was switched on by `--max-lag` (and goes off at the next synced).
    pub lag_forced: bool,
    /// The copy runs at `--busy-speed` now because the device serves I/O.
    pub yielding: bool,
}

impl Progress {
    pub(super) fn new(initial_dirty_regions: u64) -> Self {
        let now = Instant::now();
        Progress {
            started: now,
            bytes_copied: 0,
            bytes_zeroed: 0,
            last_consistent: None,
            last_error: None,
            initial_dirty_regions,
            unsynced_since: (initial_dirty_regions > 0).then_some(now),
            episode_bytes: 0,
            episode_progress: 0.0,
            rate: RateMeter::new(now),
            target_failures: 0,
            degraded_since: None,
            gave_up: None,
            loop_failed: None,
            lag_forced: false,
            yielding: false,
        }
    }

    /// A consistent point was reached: the sync episode ends (progress restarts from the work
    /// found from now on), the lag restarts (from now if writes already overtook the point),
    /// and max-lag's write-blocking ends (it lasts until the target has caught up). Returns
    /// the episode's bytes and whether max-lag's write-blocking was on.
    pub fn consistent_point(&mut self, now: Instant, synced: bool) -> (u64, bool) {
        let copied = std::mem::take(&mut self.episode_bytes);
        self.episode_progress = 0.0;
        self.last_consistent = Some(SystemTime::now());
        self.unsynced_since = if synced { None } else { Some(now) };
        (copied, std::mem::replace(&mut self.lag_forced, false))
    }

    /// A pair flush succeeded: the failure count restarts. Returns whether the pair was
    /// degraded (and is no longer).
    pub fn target_recovered(&mut self) -> bool {
        self.target_failures = 0;
        self.degraded_since.take().is_some()
    }

    /// Bytes were copied (or zeroed) to the target.
    pub fn add_copied(&mut self, n: u64, zeroed: bool) {
        if zeroed {
            self.bytes_zeroed += n;
        } else {
            self.bytes_copied += n;
        }
        self.episode_bytes += n;
        self.sample_rate(false);
    }

    /// Refreshes the rate estimate (see [`RateMeter::sample`]; `force`: for a status request).
    pub(super) fn sample_rate(&mut self, force: bool) {
        self.rate.sample(Instant::now(), self.bytes_copied + self.bytes_zeroed, force);
    }
}
