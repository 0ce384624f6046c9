//! The settings a running mirror takes (`set`, `pause`, `resume`, max-lag's switch): stored in
//! atomics that the loops read without the engine's lock, and what follows from a change (the
//! mode in force, the replication queue started or stopped).

use super::{CopyMode, Engine, LockedState, Settings, DEFAULT_ASYNC_BUFFER};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Settings that can change while the mirror runs (`set`, `pause`, `resume`).
#[derive(Debug, Default)]
pub struct Controls {
    /// Copy bandwidth limit in bytes/s; 0 = unlimited.
    pub(super) speed: AtomicU64,
    /// Copy bandwidth limit while the device serves I/O; 0 = none (the copy competes).
    pub(super) busy_speed: AtomicU64,
    pub(super) paused: AtomicBool,
    pub(super) write_blocking: AtomicBool,
    /// Async mode is set (shipping may still be behind).
    pub(super) async_mode: AtomicBool,
    /// Async mode's replication buffer in bytes (0: the default).
    pub(super) async_buffer: AtomicU64,
    /// `--max-lag` in milliseconds; 0 = off.
    pub(super) max_lag_ms: AtomicU64,
    /// Give up mirroring after this many failed retries in a row; 0 = retry for ever.
    pub(super) max_retries: AtomicU32,
    /// Write-blocking is in force now (set by the mode or by max-lag, off while degraded).
    pub(super) active_now: AtomicBool,
}

impl Engine {
    pub fn controls(&self) -> &Controls {
        &self.controls
    }

    /// Applies `s` (at start, or from `set`); records what changed in the event log.
    pub fn apply_settings(&self, s: &Settings) {
        let c = &self.controls;
        c.speed.store(s.speed, Ordering::SeqCst);
        c.busy_speed.store(s.busy_speed, Ordering::SeqCst);
        c.paused.store(s.paused, Ordering::SeqCst);
        if let Some(m) = s.mode {
            c.write_blocking.store(m == CopyMode::WriteBlocking, Ordering::SeqCst);
            c.async_mode.store(m == CopyMode::Async, Ordering::SeqCst);
        }
        c.async_buffer.store(s.async_buffer, Ordering::SeqCst);
        self.update_shipping();
        c.max_lag_ms.store(s.max_lag_ms, Ordering::SeqCst);
        c.max_retries.store(s.max_retries, Ordering::SeqCst);
        self.update_active();
        self.wake();
    }

    pub fn settings(&self) -> Settings {
        let c = &self.controls;
        Settings {
            speed: c.speed.load(Ordering::SeqCst),
            busy_speed: c.busy_speed.load(Ordering::SeqCst),
            paused: c.paused.load(Ordering::SeqCst),
            mode: Some(self.mode()),
            async_buffer: c.async_buffer.load(Ordering::SeqCst),
            max_lag_ms: c.max_lag_ms.load(Ordering::SeqCst),
            max_retries: c.max_retries.load(Ordering::SeqCst),
            hook: None,
        }
    }

    /// The copy mode set (max-lag may force write-blocking on top of it).
    pub fn mode(&self) -> CopyMode {
        let c = &self.controls;
        if c.write_blocking.load(Ordering::SeqCst) {
            CopyMode::WriteBlocking
        } else if c.async_mode.load(Ordering::SeqCst) {
            CopyMode::Async
        } else {
            CopyMode::Background
        }
    }

    /// Async mode's replication buffer in bytes.
    pub fn async_buffer(&self) -> u64 {
        match self.controls.async_buffer.load(Ordering::SeqCst) {
            0 => DEFAULT_ASYNC_BUFFER,
            n => n,
        }
    }

    /// Starts or stops the replication queue as the mode says (see
    /// [`MirrorState::set_shipping`]); records the fall-back of a queue that was shipping.
    fn update_shipping(&self) {
        let on = self.controls.async_mode.load(Ordering::SeqCst) && !self.controls.write_blocking.load(Ordering::SeqCst);
        let mut g = self.lock();
        if !on && g.state.ship().is_none() {
            return;
        }
        let was = g.state.ship().is_some_and(|q| q.shipping());
        let freed = g.state.set_shipping(on.then(|| self.async_buffer()));
        self.free_ship_bufs(&mut g, freed);
        let now = g.state.ship().is_some_and(|q| q.shipping());
        self.announce_pair_change(&g);
        drop(g);
        if was && !on {
            self.events.emit("async-behind", serde_json::json!({ "reason": "stopped" }));
        } else if !was && now {
            // Set on an already synced pair: shipping starts at once.
            self.events.emit("async-resumed", serde_json::json!({}));
        }
    }

    pub fn speed(&self) -> u64 {
        self.controls.speed.load(Ordering::SeqCst)
    }

    pub fn busy_speed(&self) -> u64 {
        self.controls.busy_speed.load(Ordering::SeqCst)
    }

    pub fn paused(&self) -> bool {
        self.controls.paused.load(Ordering::SeqCst)
    }

    pub fn max_lag(&self) -> Option<Duration> {
        match self.controls.max_lag_ms.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    pub fn max_retries(&self) -> u32 {
        self.controls.max_retries.load(Ordering::SeqCst)
    }

    /// Are writes to be mirrored synchronously right now?
    pub fn write_blocking_now(&self) -> bool {
        self.controls.active_now.load(Ordering::SeqCst)
    }

    /// Recomputes whether write-blocking is in force: asked for (by the mode or by max-lag),
    /// and the target healthy (a failing target must not slow every write down) and mirroring
    /// not given up.
    pub fn update_active(&self) {
        let g = self.lock();
        self.update_active_locked(&g);
    }

    /// [`Engine::update_active`] under the caller's lock: begin_request reads `active_now` under
    /// that lock, so a change of its inputs and of `active_now` made in one critical section is
    /// one step for every write (none sees max-lag's mode on but still goes the background way).
    pub fn update_active_locked(&self, g: &LockedState) {
        let wanted = self.controls.write_blocking.load(Ordering::SeqCst) || g.progress.lag_forced;
        let healthy = g.progress.degraded_since.is_none()
            && g.progress.gave_up.is_none()
            && !self.hook_running.load(Ordering::SeqCst);
        self.controls.active_now.store(wanted && healthy, Ordering::SeqCst);
    }
}
