//! What `status` reports of a mirror: its state and mode (typed, with the names status and the
//! metrics use) and the figures behind them, read in constant time under the engine's lock.

use super::Engine;
use std::sync::atomic::Ordering;

/// A mirror's state as `status` and the metrics show it ([`Status::state`]), by precedence:
/// the first that applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusState {
    /// Reads and flushes go to the target (after a switchover).
    SwitchedOver,
    /// The mirror gave up after --max-retries.
    Stopped,
    /// The mirror loop failed.
    Failed,
    /// The target fails; writes go on to the source, their regions stay dirty.
    Degraded,
    Synced,
    Paused,
    Syncing,
}

impl StatusState {
    pub const ALL: [StatusState; 7] = [
        StatusState::Syncing,
        StatusState::Synced,
        StatusState::Paused,
        StatusState::Degraded,
        StatusState::Failed,
        StatusState::Stopped,
        StatusState::SwitchedOver,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            StatusState::SwitchedOver => "switched-over",
            StatusState::Stopped => "stopped",
            StatusState::Failed => "failed",
            StatusState::Degraded => "degraded",
            StatusState::Synced => "synced",
            StatusState::Paused => "paused",
            StatusState::Syncing => "syncing",
        }
    }
}

/// How writes reach the target, as `status` shows it ([`Status::mode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusMode {
    Background,
    WriteBlocking,
    /// Write-blocking because the lag passed --max-lag (the mode set is background or async).
    MaxLag,
    /// Async: writes are shipped to the target in order.
    Async,
    /// Async, fallen behind (buffer full, target failing, or not caught up yet): the background
    /// copy runs until a consistent point, then shipping resumes.
    AsyncBehind,
}

impl StatusMode {
    pub const ALL: [StatusMode; 5] =
        [StatusMode::Background, StatusMode::WriteBlocking, StatusMode::MaxLag, StatusMode::Async, StatusMode::AsyncBehind];

    pub const fn name(self) -> &'static str {
        match self {
            StatusMode::Background => "background",
            StatusMode::WriteBlocking => "write-blocking",
            StatusMode::MaxLag => "write-blocking (max-lag)",
            StatusMode::Async => "async",
            StatusMode::AsyncBehind => "async (behind)",
        }
    }
}

/// `status` and its JSON show a state or mode by its name; tests and callers may compare one
/// with a name.
macro_rules! shown_by_name {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl PartialEq<&str> for $t {
            fn eq(&self, name: &&str) -> bool {
                self.name() == *name
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

shown_by_name!(StatusState);
shown_by_name!(StatusMode);

/// Every value [`Status::state`] takes (the metrics export each, one-hot).
pub const STATES: [&str; StatusState::ALL.len()] = {
    let mut names = [""; StatusState::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = StatusState::ALL[i].name();
        i += 1;
    }
    names
};

/// Every value [`Status::mode`] takes.
pub const MODES: [&str; StatusMode::ALL.len()] = {
    let mut names = [""; StatusMode::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = StatusMode::ALL[i].name();
        i += 1;
    }
    names
};

/// A snapshot for status displays and tests.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    pub state: StatusState,
    pub device_size: u64,
    pub granularity: u64,
    pub dirty_bytes: u64,
    pub copying_bytes: u64,
    pub persistent_dirty_regions: u64,
    pub bytes_copied: u64,
    pub bytes_zeroed: u64,
    pub consistent_points: u64,
    pub checkpoints: u64,
    pub last_consistent_age_secs: Option<f64>,
    /// When the last consistent point was made, in seconds since the Unix epoch (the daemon's
    /// clock): what monitoring compares with its own clock, where an age would go stale.
    pub last_consistent_unix_secs: Option<f64>,
    pub copy_errors: u64,
    pub target_flush_errors: u64,
    pub bitmap_flushes: u64,
    pub writes_in_flight: usize,
    pub last_error: Option<String>,
    pub elapsed_secs: f64,
    /// Bytes copied or zeroed in this sync episode (since the pair was last synced).
    pub episode_bytes: u64,
    /// `episode_bytes / (episode_bytes + bytes still to copy)`, reported as a running maximum
    /// within the episode so that it never goes backwards (new writes lengthen the remaining
    /// work, and the ETA shows it); 1 when synced. A new episode starts at 0.
    pub progress: f64,
    /// Copy rate in bytes/s over the last seconds.
    pub rate: f64,
    /// Seconds to synced at the current rate, if it is copying.
    pub eta_secs: Option<f64>,
    /// How long the target has been behind the source (0 when synced).
    pub lag_secs: f64,
    pub mode: StatusMode,
    pub speed: u64,
    pub busy_speed: u64,
    /// The copy is held to `busy_speed` now (the device serves I/O).
    pub yielding: bool,
    pub max_lag_secs: Option<f64>,
    pub active_writes: usize,
    pub target_failures: u32,
    pub degraded_secs: Option<f64>,
    /// Passes the mirror loop has begun since the daemon started (see [`Engine::loop_passes`]).
    pub loop_passes: u64,
    /// Times a thread waited for the engine's lock (see [`Engine::lock_waits`]).
    pub lock_waits: u64,
    /// Wake-ups written to the mirror loop (see [`Engine::loop_wakeups`]).
    pub loop_wakeups: u64,
    /// Async mode (absent otherwise): the replication buffer and what went through it.
    pub shipping: Option<ShipStatus>,
}

/// Async mode's figures in [`Status::shipping`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct ShipStatus {
    pub buffer_bytes: u64,
    pub buffer_used_bytes: u64,
    pub buffer_peak_bytes: u64,
    /// Memory kept for reuse by the buffers of writes that landed (at most a quarter of
    /// `buffer_bytes`): async mode's memory is at most `buffer_bytes` plus this.
    pub pool_bytes: u64,
    /// Writes waiting in the queue, and in flight to the target.
    pub queued_writes: usize,
    pub in_flight_writes: usize,
    pub shipped_writes: u64,
    pub shipped_bytes: u64,
    /// Shipped writes the device's queues issued to the target themselves (a file or block
    /// device target), the others being issued by the mirror loop.
    pub issued_by_queues: u64,
    /// Epochs (device flushes with shipped writes before them).
    pub epochs: u64,
    /// Times shipping fell behind and resumed, and why it is behind now.
    pub fell_behind: u64,
    pub resumed: u64,
    pub behind_reason: Option<&'static str>,
}

impl Engine {
    pub fn status(&self) -> Status {
        let mut g = self.lock();
        let gran = self.granularity();
        let c = g.state.counters();
        let synced = g.state.is_synced();
        let state = if self.serving_target() {
            StatusState::SwitchedOver
        } else if g.progress.gave_up.is_some() {
            StatusState::Stopped
        } else if g.progress.loop_failed.is_some() {
            StatusState::Failed
        } else if g.progress.degraded_since.is_some() {
            StatusState::Degraded
        } else if synced {
            StatusState::Synced
        } else if self.paused() {
            StatusState::Paused
        } else {
            StatusState::Syncing
        };
        g.progress.sample_rate(true);
        let remaining = ((g.state.dirty() + g.state.copying()) * gran).min(self.size);
        let progress = if synced {
            1.0
        } else {
            let done = g.progress.episode_bytes as f64;
            let p = if done + remaining as f64 > 0.0 { done / (done + remaining as f64) } else { 0.0 };
            // Not 1 until synced: the last flush is part of the work.
            let p = p.max(g.progress.episode_progress).min(0.999);
            g.progress.episode_progress = p;
            p
        };
        let rate = g.progress.rate.rate();
        let shipping_on = self.mode() == super::CopyMode::Async;
        let behind = g.state.ship().is_some_and(|q| !q.shipping());
        let mode = if !self.controls.write_blocking.load(Ordering::SeqCst) && g.progress.lag_forced {
            StatusMode::MaxLag
        } else if self.controls.write_blocking.load(Ordering::SeqCst) {
            StatusMode::WriteBlocking
        } else if shipping_on && behind {
            StatusMode::AsyncBehind
        } else if shipping_on {
            StatusMode::Async
        } else {
            StatusMode::Background
        };
        let shipping = g.state.ship().filter(|_| shipping_on).map(|q| {
            let k = q.counters();
            ShipStatus {
                buffer_bytes: q.capacity(),
                buffer_used_bytes: q.used(),
                buffer_peak_bytes: q.peak(),
                pool_bytes: self.ship_pool.bytes(),
                queued_writes: q.queued(),
                in_flight_writes: q.in_flight(),
                shipped_writes: k.shipped_writes,
                shipped_bytes: k.shipped_bytes,
                issued_by_queues: self.ship_direct_writes.load(std::sync::atomic::Ordering::Relaxed),
                epochs: k.epochs,
                fell_behind: k.fell_behind,
                resumed: k.resumed,
                behind_reason: q.behind().map(|b| b.name()),
            }
        });

        Status {
            episode_bytes: g.progress.episode_bytes,
            progress,
            rate,
            eta_secs: (!synced && rate > 1.0 && !self.paused()).then(|| remaining as f64 / rate),
            lag_secs: if synced { 0.0 } else { g.progress.unsynced_since.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0) },
            mode,
            speed: self.speed(),
            busy_speed: self.busy_speed(),
            yielding: g.progress.yielding && !synced,
            max_lag_secs: self.max_lag().map(|d| d.as_secs_f64()),
            active_writes: g.state.active_writes(),
            target_failures: g.progress.target_failures,
            degraded_secs: g.progress.degraded_since.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs_f64()),
            loop_passes: self.loop_passes(),
            lock_waits: self.lock_waits(),
            loop_wakeups: self.loop_wakeups(),
            shipping,
            state,
            device_size: self.size,
            granularity: gran,
            dirty_bytes: (g.state.dirty() * gran).min(self.size),
            copying_bytes: (g.state.copying() * gran).min(self.size),
            persistent_dirty_regions: g.state.persistent_count(),
            bytes_copied: g.progress.bytes_copied,
            bytes_zeroed: g.progress.bytes_zeroed,
            consistent_points: c.consistent_points,
            checkpoints: c.checkpoints,
            last_consistent_age_secs: g
                .progress
                .last_consistent
                .and_then(|t| t.elapsed().ok())
                .map(|d| d.as_secs_f64()),
            last_consistent_unix_secs: g
                .progress
                .last_consistent
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64()),
            copy_errors: c.copy_errors,
            target_flush_errors: c.target_flush_errors,
            bitmap_flushes: c.bitmap_flushes,
            writes_in_flight: g.state.writes_in_flight(),
            last_error: g.progress.last_error.clone(),
            elapsed_secs: g.progress.started.elapsed().as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ALL lists every state and mode once, so the metrics export every value `status` can
    /// show. (A new variant fails to compile here until it has its place in ALL.)
    #[test]
    fn every_state_and_mode_is_listed_once() {
        let place = |s: StatusState| match s {
            StatusState::Syncing => 0,
            StatusState::Synced => 1,
            StatusState::Paused => 2,
            StatusState::Degraded => 3,
            StatusState::Failed => 4,
            StatusState::Stopped => 5,
            StatusState::SwitchedOver => 6,
        };
        for (i, s) in StatusState::ALL.into_iter().enumerate() {
            assert_eq!(place(s), i, "{s:?}");
            assert_eq!(STATES[i], s.name());
        }
        let place = |m: StatusMode| match m {
            StatusMode::Background => 0,
            StatusMode::WriteBlocking => 1,
            StatusMode::MaxLag => 2,
            StatusMode::Async => 3,
            StatusMode::AsyncBehind => 4,
        };
        for (i, m) in StatusMode::ALL.into_iter().enumerate() {
            assert_eq!(place(m), i, "{m:?}");
            assert_eq!(MODES[i], m.name());
        }
        let mut names: Vec<&str> = STATES.iter().chain(MODES.iter()).copied().collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), STATES.len() + MODES.len(), "a name is used twice");
    }
}
