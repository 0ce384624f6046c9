//! The mirror loop: copies dirty regions from the source to the target on its own io_uring,
//! makes progress durable with target flushes, and marks consistent points.
//!
//! Each copy job owns one buffer and has exactly one operation in flight at a time (a source
//! read, a target write, or a target zero for a source hole). Jobs run concurrently up to
//! `max_copies`. The decisions (what to copy, when to flush, what to clear) are the engine's
//! [`crate::core::MirrorState`]; when to do it (rate limits, retries, max-lag, the spacing of
//! flushes and of the --on-consistent command) is [`crate::core::policy`]'s; this module performs
//! them: the loop, its waits and its failure handling here, the copy jobs in `copy`, the pair
//! flush, consistent points and bitmap flushes in `flush`.

use crate::io::backing::AlignedBuf;
use crate::core::{Extent, FlushKind};
use crate::engine::{on_consistent, CopyConfig, Engine};
use crate::error::{Error, Result};
use crate::core::policy::{
    self, Backoff, BusyDetector, Checkpoints, ConsistentSpacing, LagSwitch, TokenBucket,
};
use crate::io::target::{Target, TargetDone};
use crate::io::uring::{self, push, Owner, Ring};
use io_uring::{opcode, types};
use slab::Slab;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod copy;
mod flush;
mod ship;

use copy::Job;
use flush::{FLUSH_TOKEN, SRC_FLUSH_SLOT};
use ship::{ShipJob, SHIP_TOKEN};

pub use crate::core::policy::{BUSY_REQUESTS, BUSY_WINDOW, HOOK_STOP_GRACE, MAX_BACKOFF};

/// When the loop returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunUntil {
    /// At the first consistent point with nothing left to do (offline sync). A copy error ends
    /// the run with that error; the regions stay dirty for the next run. The bits cleared at
    /// that last point are durable only once the caller closes the engine ([`Engine::close`]).
    Synced,
    /// When [`Engine::request_stop`] is called (a live device). Errors are retried with backoff.
    Stopped,
}

#[derive(Clone, Debug, Default)]
pub struct RunReport {
    pub bytes_copied: u64,
    pub bytes_zeroed: u64,
    pub elapsed: Duration,
    pub interrupted: bool,
}

const SRC_FIXED: u32 = 0;
const TGT_FIXED: u32 = 1;

/// Test hooks: deterministic interference with a running loop.
#[derive(Default)]
pub struct TestHooks {
    /// Called after a copy's source read completed, before its target write is issued.
    pub after_read: Option<Box<dyn FnMut(Extent)>>,
    /// Simulate an interruption (a crash of the daemon): start no copy once this many bytes were
    /// copied, and return as soon as at least one checkpoint completed, without waiting for
    /// in-flight copies or making anything more durable. Only for a file target with a limit of
    /// at least `checkpoint_bytes` (otherwise no checkpoint need start before the limit, and the
    /// run waits for `checkpoint_interval`, or for ever on a target without checkpoints).
    pub stop_after_bytes: Option<u64>,
    /// Sees (and may replace) the result of each of the mirror's bitmap fdatasyncs.
    pub bitmap_flush_result: Option<Box<dyn FnMut(i32) -> i32>>,
    /// Called at each consistent point, once its pair flush completed, before the loop issues
    /// anything more to the target (the target holds still while it runs).
    pub at_consistent_point: Option<Box<dyn FnMut()>>,
}

type ProgressFn<'a> = dyn FnMut(&Engine) + 'a;

pub struct Mirror<'t> {
    // Closing the ring does not wait for the operations in flight: Drop waits for them
    // (bounded) and leaks the buffers they may still use instead of freeing them.
    ring: Ring,
    engine: Arc<Engine>,
    target: &'t mut dyn Target,
    cfg: CopyConfig,
    bufs: Vec<AlignedBuf>,
    free_bufs: Vec<usize>,
    /// The copies in flight, by slot: the slot travels in their operations' user_data.
    jobs: Slab<Job>,
    running: usize,
    target_flush: Option<FlushKind>,
    /// Parts of the pair flush still outstanding (target and source), and the first error.
    flush_parts: u8,
    flush_error: Option<io::Error>,
    bitmap_flush: Option<u64>,
    bitmap_clears_pending: bool,
    /// A failed bitmap flush is tried again [`policy::BITMAP_RETRY`] later, not at once.
    bitmap_retry: Backoff,
    wake_buf: Box<u64>,
    wake_posted: bool,
    checkpoints: Checkpoints,
    /// Retries after failures of the target (copies, flushes, resets).
    backoff: Backoff,
    fatal: Option<Error>,
    hooks: TestHooks,
    done: Vec<TargetDone>,
    /// Offline run: the first error ends it instead of being retried.
    offline: bool,
    /// The target failed since its last reset: reset it (reconnect) before the next retry.
    needs_reset: bool,
    /// Copy bandwidth budget.
    bucket: TokenBucket,
    /// Whether the device serves I/O (the copy then yields to `busy_speed`).
    busy: BusyDetector,
    /// Copies wait for the budget until then.
    throttled_until: Option<Instant>,
    /// The --on-consistent command: when it may run, the run in progress.
    on_consistent: on_consistent::Runner,
    /// Consistent flushes are spaced out in write-blocking mode.
    consistent_spacing: ConsistentSpacing,
    /// The consistent flush that is due waits for its spacing until then.
    consistent_after: Option<Instant>,
    /// Dropping: operations in flight complete, jobs end there (their regions stay dirty).
    draining: bool,
    /// Async mode: shipped writes in flight to the target, by token.
    ships: std::collections::HashMap<u64, ShipJob>,
    /// Async mode: shipped writes landed (or failed) in the current batch of completions, not
    /// yet reported to the state (`report_landed`).
    landed: Vec<(u64, bool)>,
    /// Async mode: report_landed's buffers on their way back to the pool (kept for its
    /// allocation, empty between calls).
    landed_bufs: Vec<AlignedBuf>,
    /// Async mode: when flushes make points and clear bits.
    ship_spacing: policy::ShipSpacing,
    /// The flush in flight includes the source's fdatasync (a pair flush).
    flush_with_source: bool,
    /// Async mode: the shipped writes wait for an idle flush (`ship_awaits_idle_flush`), as
    /// maybe_flush found under its lock this pass: next_timeout's deadline for it.
    ship_idle_wait: bool,
    /// Max-lag's write-blocking may be on (`progress.lag_forced`): only check_lag turns it
    /// on, so with no --max-lag and this false there is nothing to check. True at first: a
    /// loop before this one may have left it on.
    lag_maybe_forced: bool,
    /// This loop opened the engine's ship gate ([`crate::engine::LockedState::ship_gate`]) and
    /// has not closed it yet.
    gate_open: bool,
    /// The last data segment of the source that SEEK_DATA/SEEK_HOLE found, `[start, end)`
    /// (see [`Mirror::source_data`]).
    data_seg: std::cell::Cell<Option<(u64, u64)>>,
}

impl<'t> Mirror<'t> {
    pub fn new(engine: Arc<Engine>, target: &'t mut dyn Target, cfg: CopyConfig) -> Result<Self> {
        Self::check_config(target, &cfg)?;
        if engine.mirror_fault_injected() {
            return Err(injected_fault());
        }
        let entries = (cfg.max_copies * 2 + 8).next_power_of_two() as u32;
        let ring = uring::new_ring(entries).map_err(|e| Error::io("io_uring setup for the mirror", e))?;
        // Slot TGT_FIXED is registered even for targets without a descriptor (as -1, a sparse
        // slot) so that the source's slot number does not depend on the target. The bitmap is
        // registered too, never used from here: its lock, which the next daemon takes before it
        // trusts the bitmap, is then held until this ring is gone, that is until every copy it
        // issued to the target has completed, even after a kill (docs/crash-safety.md).
        ring.submitter()
            .register_files(&[engine.source().fd(), target.fixed_fd().unwrap_or(-1), engine.bitmap_fd()])
            .map_err(|e| Error::io("registering source and target on the mirror ring", e))?;
        if target.fixed_fd().is_some() {
            target.use_fixed(TGT_FIXED);
        }
        Ok(Self::on_ring(ring, engine, target, cfg))
    }

    /// The copy settings every loop checks before it starts: sizes and counts in range, and
    /// copies in whole blocks of the target.
    fn check_config(target: &dyn Target, cfg: &CopyConfig) -> Result<()> {
        cfg.validate()?;
        cfg.check_block(target.block_size().into())
    }

    /// A loop on a ring the caller set up (tests with their own targets), with the same
    /// checks of `cfg` as [`Mirror::new`].
    pub fn with_ring(ring: Ring, engine: Arc<Engine>, target: &'t mut dyn Target, cfg: CopyConfig) -> Result<Self> {
        Self::check_config(target, &cfg)?;
        Ok(Self::on_ring(ring, engine, target, cfg))
    }

    fn on_ring(ring: Ring, engine: Arc<Engine>, target: &'t mut dyn Target, cfg: CopyConfig) -> Self {
        // A restarted loop: what the target posted on the old ring is gone with it.
        let needs_reset = target.ring_changed();
        // Buffers are made on first need: a resync of a few regions, or an idle live mirror,
        // does not pay for (or hold) max_copies x buf_size of memory.
        let now = Instant::now();
        let requests = engine.front_requests();
        let on_consistent = on_consistent::Runner::new(cfg.on_consistent.clone());
        Mirror {
            ring,
            free_bufs: Vec::new(),
            bufs: Vec::new(),
            jobs: Slab::with_capacity(cfg.max_copies),
            running: 0,
            engine,
            target,
            cfg,
            target_flush: None,
            flush_parts: 0,
            flush_error: None,
            bitmap_flush: None,
            bitmap_clears_pending: false,
            bitmap_retry: Backoff::new(policy::BITMAP_RETRY, policy::BITMAP_RETRY),
            wake_buf: Box::new(0),
            wake_posted: false,
            checkpoints: Checkpoints::new(now),
            backoff: Backoff::new(policy::MIN_BACKOFF, MAX_BACKOFF),
            fatal: None,
            hooks: TestHooks::default(),
            done: Vec::new(),
            offline: false,
            needs_reset,
            bucket: TokenBucket::new(now),
            busy: BusyDetector::new(now, requests),
            throttled_until: None,
            consistent_spacing: ConsistentSpacing::default(),
            consistent_after: None,
            on_consistent,
            draining: false,
            ships: std::collections::HashMap::new(),
            landed: Vec::new(),
            landed_bufs: Vec::new(),
            ship_spacing: policy::ShipSpacing::new(now),
            flush_with_source: true,
            ship_idle_wait: false,
            gate_open: false,
            lag_maybe_forced: true,
            data_seg: std::cell::Cell::new(None),
        }
    }

    pub fn set_hooks(&mut self, hooks: TestHooks) {
        self.hooks = hooks;
    }

    /// Runs the loop. `progress` is called about every `every` while copying.
    pub fn run(
        &mut self,
        until: RunUntil,
        progress: Option<(&mut ProgressFn<'_>, Duration)>,
    ) -> Result<RunReport> {
        let t0 = Instant::now();
        self.offline = until == RunUntil::Synced;
        let (b0, z0) = {
            let g = self.engine.lock();
            (g.progress.bytes_copied, g.progress.bytes_zeroed)
        };
        let mut progress = progress;
        let mut last_progress = Instant::now();
        // Lazy clearing for a live mirror (see CopyConfig::clear_delay).
        let tick = (until == RunUntil::Stopped && !self.cfg.clear_delay.is_zero()).then(|| self.cfg.clear_delay / 2);
        {
            let mut g = self.engine.lock();
            g.state.set_lazy_clearing(tick.is_some());
            // Intent extents only with lazy clearing: without it their stale bits would be
            // cleared at the next target flush and set again by the next write.
            let extent = if tick.is_some() { self.cfg.intent_extent / g.state.pbits().granularity().max(1) } else { 1 };
            g.state.set_intent_extent(extent);
            // Async mode: a live loop lets the device's queues issue shipped writes themselves
            // (Engine::ship_early), under its flush spacing.
            if until == RunUntil::Stopped {
                g.ship_gate = Some(self.ship_gate());
                self.gate_open = true;
            }
        }
        let mut next_tick = tick.map(|t| Instant::now() + t);
        let mut cqes = Vec::new();
        let mut interrupted = false;
        // A wake-up flagged pending before this run (by a run that ended without taking it)
        // must not keep the wakers of this one quiet: the first pass follows.
        self.engine.wake_taken();
        loop {
            // One increment a pass: see Engine::loop_passes.
            self.engine.count_loop_pass();
            if until == RunUntil::Stopped && self.engine.panic_injected() {
                panic!("injected panic: the file {} names exists", crate::engine::PANIC_FAULT_ENV);
            }
            if until == RunUntil::Stopped && self.engine.mirror_fault_injected() {
                return Err(injected_fault());
            }
            let mut past_limit = false;
            if let Some(limit) = self.hooks.stop_after_bytes {
                let g = self.engine.lock();
                past_limit = g.progress.bytes_copied - b0 >= limit;
                if past_limit && g.state.counters().checkpoints > 0 {
                    drop(g);
                    interrupted = true;
                    break;
                }
            }
            let stopping = until == RunUntil::Stopped && self.engine.mirror_should_return();
            if stopping {
                // What the loop stops with is its own to flush: no queue ships any more.
                self.close_ship_gate();
            }
            if until == RunUntil::Stopped {
                self.check_lag();
                self.on_consistent.check(&self.engine, stopping);
            }
            // Past the hook's limit no copy starts (the checkpoint it waits for was started on
            // the way: one starts every checkpoint_bytes), so how much an interrupted run copied
            // does not depend on how fast that checkpoint lands.
            if self.fatal.is_none() && !stopping && !past_limit {
                self.start_copies()?;
                if until == RunUntil::Stopped {
                    self.start_shipping()?;
                }
            }
            if let (Some(t), Some(at)) = (tick, next_tick) {
                if Instant::now() >= at {
                    if self.engine.lock().state.clear_tick() > 0 {
                        self.bitmap_clears_pending = true;
                    }
                    next_tick = Some(Instant::now() + t);
                }
            }
            // Stopping in order: the target holds every eligible region, and nothing writes
            // any more, so their bits can go now (a restart then copies nothing needlessly).
            if stopping && self.running == 0 && self.target_flush.is_none() && self.engine.lock().state.clear_eligible() > 0 {
                self.bitmap_clears_pending = true;
            }
            self.maybe_flush(stopping)?;
            if self.finished(until, stopping) {
                break;
            }
            if until == RunUntil::Stopped && !self.wake_posted {
                self.post_wake()?;
            }
            let timeout = self.next_timeout(until, stopping, next_tick, progress.is_some());
            self.wait(timeout)?;
            cqes.clear();
            uring::reap(&mut self.ring, &mut cqes);
            for &(ud, res) in &cqes {
                self.dispatch(ud, res)?;
            }
            self.report_landed();
            if let Some((f, every)) = progress.as_mut() {
                if last_progress.elapsed() >= *every {
                    f(&self.engine);
                    last_progress = Instant::now();
                }
            }
        }
        if let Some((f, _)) = progress.as_mut() {
            f(&self.engine);
        }
        let g = self.engine.lock();
        let report = RunReport {
            bytes_copied: g.progress.bytes_copied - b0,
            bytes_zeroed: g.progress.bytes_zeroed - z0,
            elapsed: t0.elapsed(),
            interrupted,
        };
        drop(g);
        if let Some(e) = self.fatal.take() {
            return Err(e);
        }
        Ok(report)
    }

    /// How long the loop may wait for a completion: until the earliest deadline whose action
    /// can then be taken (backoff, throttle, consistent-point spacing, the --on-consistent
    /// command's poll, a bitmap retry, max-lag, lazy clearing), at most 500 ms while progress is
    /// reported; without a bound only live and with the eventfd read posted.
    fn next_timeout(&self, until: RunUntil, stopping: bool, next_tick: Option<Instant>, progress: bool) -> Option<Duration> {
        let hook_poll = self.on_consistent.running().then(|| Instant::now() + Duration::from_millis(50));
        // Only deadlines whose action can then be taken: one that cannot (copies while
        // stopping, a bitmap retry behind a flush in flight) would, once past, make every
        // wait return at once. Their blockers wake the loop when they go.
        let may_copy = self.fatal.is_none() && !stopping;
        let retry_at = self.backoff.retry_at().filter(|_| may_copy);
        let throttled_until = self.throttled_until.filter(|_| may_copy);
        let bitmap_retry = self
            .bitmap_retry
            .retry_at()
            .filter(|_| self.bitmap_clears_pending && self.bitmap_flush.is_none() && self.target_flush.is_none());
        // Async: the flush of a queue that has shipped everything waits for its spacing.
        let ship_idle = self.ship_idle_wait.then(|| self.ship_spacing.idle_flush_at());
        let timer = [retry_at, throttled_until, self.consistent_after, hook_poll, bitmap_retry, ship_idle]
            .into_iter()
            .flatten()
            .min();
        let timer = match timer {
            // Max-lag is checked at least every second while the target is behind.
            None if self.engine.max_lag().is_some() && until == RunUntil::Stopped => {
                Some(Instant::now() + policy::MAX_LAG_POLL)
            }
            t => t,
        };
        let timeout = timer.map(|t| t.saturating_duration_since(Instant::now()));
        let timeout = match (timeout, next_tick) {
            (None, Some(at)) if self.engine.lock().state.clearing_pending() => {
                Some(at.saturating_duration_since(Instant::now()))
            }
            (t, _) => t,
        };
        match (timeout, progress) {
            (Some(t), _) => Some(t.min(Duration::from_millis(500))),
            (None, true) => Some(Duration::from_millis(500)),
            (None, false) if self.running > 0 || !self.ships.is_empty() => Some(self.cfg.checkpoint_interval),
            // Offline: never sleep without a bound, even if nothing is in flight.
            _ if until == RunUntil::Synced => Some(Duration::from_secs(1)),
            // Live: the wake-up read on the eventfd is always posted.
            _ => None,
        }
    }

    fn finished(&self, until: RunUntil, stopping: bool) -> bool {
        let idle = self.running == 0 && self.ships.is_empty() && self.target_flush.is_none() && self.bitmap_flush.is_none();
        if !idle {
            return false;
        }
        if self.fatal.is_some() || stopping {
            // A running --on-consistent command is waited for (its Runner::check bounds the wait).
            return !self.bitmap_clears_pending && (!self.on_consistent.running() || self.fatal.is_some());
        }
        // Offline, clears still pending are left to the caller's Engine::close.
        until == RunUntil::Synced && self.engine.lock().state.is_synced()
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        let r = match timeout {
            None => uring::submit_and_wait(&mut self.ring, 1),
            Some(t) => {
                let ts = types::Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                match self.ring.submitter().submit_with_args(1, &args) {
                    Ok(_) => Ok(()),
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
                    Err(e) => Err(e),
                }
            }
        };
        r.map_err(|e| Error::io("waiting on the mirror ring", e))
    }

    fn post_wake(&mut self) -> Result<()> {
        let fd = self.engine.wake_fd();
        let buf = (&mut *self.wake_buf) as *mut u64 as *mut u8;
        let e = opcode::Read::new(types::Fd(fd), buf, 8).build();
        // SAFETY: the 8-byte wake buffer is boxed in self; wake_posted keeps a second read off
        // it until this one completes, and Drop leaks it if the read is still posted.
        unsafe { push(&mut self.ring, e, Owner::Wake, 0) }.map_err(|e| Error::io("mirror wake-up", e))?;
        self.wake_posted = true;
        Ok(())
    }

    /// A copy or a flush failed: back off, reset the target before the next attempt, report
    /// `degraded` (the first time) and give up after `max_retries` failures in a row. The
    /// regions stay dirty either way; the device's I/O is not affected.
    fn target_failed(&mut self, msg: &str) {
        self.backoff.failed(Instant::now());
        self.needs_reset = true;
        // Async mode: the background copy takes over until the target works and catches up.
        self.ship_fall_behind(crate::core::ship::BehindReason::TargetFailed);
        let crate::engine::Failure { first, give_up, failures } = self.engine.record_failure(msg, false);
        if self.offline {
            return;
        }
        if first {
            self.engine.events().emit("degraded", serde_json::json!({ "error": msg }));
        }
        if give_up {
            log::error!("mirroring stopped after {failures} failed attempts: {msg}");
            self.engine.events().emit("stopped", serde_json::json!({ "error": msg, "failures": failures }));
        }
    }

    /// A pair flush succeeded: the target works again.
    fn target_ok(&mut self) {
        self.backoff.succeeded();
        let recovered = {
            let mut g = self.engine.lock();
            let recovered = g.progress.target_recovered();
            self.engine.update_active_locked(&g);
            recovered
        };
        if recovered && !self.offline {
            self.engine.events().emit("recovered", serde_json::json!({}));
        }
    }

    /// Max-lag: switch write-blocking on when the target has been behind for too long, and off
    /// again once synced (with a `write-blocking-on`/`-off` event). The lag itself is kept by
    /// the write path and the consistent points (`Progress::unsynced_since`), not here.
    fn check_lag(&mut self) {
        // Without a limit and not forced, policy::max_lag keeps things as they are: no need to
        // take the lock (the loop passes once per shipped write in async mode).
        let limit = self.engine.max_lag();
        if limit.is_none() && !self.lag_maybe_forced {
            return;
        }
        let switch = {
            let g = self.engine.lock();
            let (synced, since, forced) = (g.state.is_synced(), g.progress.unsynced_since, g.progress.lag_forced);
            self.lag_maybe_forced = forced;
            policy::max_lag(Instant::now(), limit, forced, synced, since)
        };
        let (turn_on, lag) = match switch {
            LagSwitch::Keep => return,
            LagSwitch::On { lag } => (true, Some(lag)),
            LagSwitch::Off { lag } => (false, lag),
        };
        {
            let mut g = self.engine.lock();
            g.progress.lag_forced = turn_on;
            self.lag_maybe_forced = turn_on;
            self.engine.update_active_locked(&g);
        }
        let secs = lag.map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let what = if turn_on { "write-blocking-on" } else { "write-blocking-off" };
        self.engine.events().emit(what, serde_json::json!({ "reason": "max-lag", "lag_secs": secs }));
    }

    fn dispatch(&mut self, ud: u64, res: i32) -> Result<()> {
        let (owner, sub) = uring::decode(ud);
        match owner {
            Some(Owner::Source) if sub as usize == SRC_FLUSH_SLOT => {
                let r = if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(0) };
                self.on_flush_part(r, "source")
            }
            Some(Owner::Source) => self.on_source(sub as usize, res),
            Some(Owner::Target) => {
                let mut done = std::mem::take(&mut self.done);
                self.target.complete(&mut self.ring, sub, res, &mut done);
                for (token, r) in done.drain(..) {
                    if token == FLUSH_TOKEN {
                        self.on_flush_part(r, "target")?;
                    } else if token & SHIP_TOKEN != 0 {
                        self.on_shipped(token, r)?;
                    } else {
                        self.on_target(token, r)?;
                    }
                }
                self.done = done;
                Ok(())
            }
            Some(Owner::Bitmap) => {
                let res = match self.hooks.bitmap_flush_result.as_mut() {
                    Some(h) => h(res),
                    None => res,
                };
                let seq = self.bitmap_flush.take().unwrap_or(0);
                let ok = res >= 0;
                self.engine.bitmap_flush_done(seq, ok);
                if !ok {
                    let e = io::Error::from_raw_os_error(-res);
                    log::warn!("bitmap fdatasync failed: {e}");
                    self.engine.lock().progress.last_error = Some(format!("bitmap flush: {e}"));
                    if self.offline {
                        self.fatal.get_or_insert(Error::io("bitmap fdatasync failed", e));
                    } else if self.engine.mirror_should_return() {
                        // Stopping: the clears are given up (their bits stay set on disk, which
                        // only costs a recopy), or a failing bitmap device would hold the stop
                        // for ever.
                        self.bitmap_clears_pending = false;
                    } else {
                        // Again later, not at once: a failing device fails again at once.
                        self.bitmap_clears_pending = true;
                        self.bitmap_retry.failed(Instant::now());
                    }
                } else {
                    self.bitmap_retry.cancel();
                }
                Ok(())
            }
            Some(Owner::Wake) => {
                self.wake_posted = false;
                // Before the next pass, which sees whatever the wakers changed (Engine::wake).
                self.engine.wake_taken();
                Ok(())
            }
            _ => {
                log::error!("mirror ring: completion with unknown owner {ud:#x}");
                Ok(())
            }
        }
    }

}

/// The error of the test fault ([`crate::engine::MIRROR_FAULT_ENV`]).
fn injected_fault() -> Error {
    Error::io("injected fault", io::Error::other(format!("the file {} names exists", crate::engine::MIRROR_FAULT_ENV)))
}


impl Drop for Mirror<'_> {
    /// Waits for the operations in flight, so that nothing the kernel still holds (buffers,
    /// file references keeping the bitmap's lock) outlives the loop. Jobs cut short leave their
    /// regions dirty, as a crash would.
    fn drop(&mut self) {
        self.draining = true;
        self.close_ship_gate();
        // Landings an early return of the loop left unreported.
        self.report_landed();
        if self.on_consistent.kill_running() {
            self.engine.set_hook_running(false);
        }
        if self.wake_posted {
            self.engine.wake_now();
        }
        let t0 = Instant::now();
        let mut cqes = Vec::new();
        while self.running > 0
            || !self.ships.is_empty()
            || self.target_flush.is_some()
            || self.bitmap_flush.is_some()
            || self.wake_posted
        {
            if t0.elapsed() > Duration::from_secs(30) {
                log::error!("mirror: operations still in flight after 30 s at shutdown");
                break;
            }
            if self.wait(Some(Duration::from_millis(100))).is_err() {
                break;
            }
            cqes.clear();
            uring::reap(&mut self.ring, &mut cqes);
            for &(ud, res) in &cqes {
                let _ = self.dispatch(ud, res);
            }
            self.report_landed();
        }
        if !self.ships.is_empty() {
            // The target may still read these after the ring is closed: leak them.
            let mut g = self.engine.lock();
            for j in self.ships.values() {
                if let Some(b) = g.ship_bufs.try_remove(j.handle as usize) {
                    std::mem::forget(b);
                }
            }
        }
        if self.running > 0 || self.wake_posted {
            // The kernel may still write into these (a copy's read, the eventfd read) after the
            // ring is closed: leak them rather than free them under it.
            log::error!("mirror: leaking {} copy buffers still in use by the kernel", self.bufs.len());
            std::mem::forget(std::mem::take(&mut self.bufs));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
        }
    }
}

