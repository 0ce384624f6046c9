//! The mirror loop: copies dirty regions from the source to the target on its own io_uring,
//! makes progress durable with target flushes, and marks consistent points.
//!
//! Each copy job owns one buffer and has exactly one operation in flight at a time (a source
//! read, a target write, or a target zero for a source hole). Jobs run concurrently up to
//! `max_copies`. The decisions (what to copy, when to flush, what to clear) are the engine's
//! [`crate::core::MirrorState`]; when to do it (rate limits, retries, max-lag, the spacing of
//! flushes and of the --on-consistent command) is [`crate::core::policy`]'s; this file performs them.

use crate::io::backing::AlignedBuf;
use crate::core::{Extent, FlushKind};
use crate::engine::{on_consistent, CopyConfig, Engine};
use crate::error::{Error, Result};
use crate::core::policy::{
    self, Backoff, BusyDetector, Checkpoints, ConsistentSpacing, LagSwitch, TokenBucket,
};
use crate::io::target::{Target, TargetDone, TargetOp};
use crate::io::uring::{self, push, Owner, Ring};
use io_uring::{opcode, types};
use slab::Slab;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Read,
    Write,
    Zero,
}

struct Job {
    ext: Extent,
    /// Next byte to copy; the job is done when it reaches `end`.
    pos: u64,
    end: u64,
    phase: Phase,
    /// Current chunk `[pos, pos + chunk)` and how much of it the current phase has done.
    chunk: u64,
    done: u64,
    buf: usize,
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
            needs_reset: false,
            bucket: TokenBucket::new(now),
            busy: BusyDetector::new(now, requests),
            throttled_until: None,
            consistent_spacing: ConsistentSpacing::default(),
            consistent_after: None,
            on_consistent,
            draining: false,
        }
    }

    pub fn set_hooks(&mut self, hooks: TestHooks) {
        self.hooks = hooks;
    }

    /// How many regions from where the next copy starts the source holds a hole, if more than
    /// one buffer's worth, up to [`HOLE_COPY_MAX`] bytes: a full sync of a sparse source then
    /// costs its SEEK_DATA walk and a few large zeroing operations, not a job per buffer.
    fn hole_run(&self) -> Option<u64> {
        let start = self.engine.lock().state.peek_copy()?;
        let source = self.engine.source();
        if !source.knows_holes() {
            return None;
        }
        let g = self.engine.granularity();
        let a = start.checked_mul(g)?;
        let limit = a.saturating_add(HOLE_COPY_MAX).min(self.engine.size());
        // An error here is left to the copy itself, which reports it.
        let hole_end = match source.next_data(a, limit).ok()? {
            None => limit,
            Some((data, _)) => data,
        };
        let n = hole_end.saturating_sub(a) / g;
        (n > self.regions_per_copy()).then_some(n)
    }

    fn regions_per_copy(&self) -> u64 {
        (self.cfg.buf_size as u64 / self.engine.granularity()).max(1)
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
        self.engine.lock().state.set_lazy_clearing(tick.is_some());
        let mut next_tick = tick.map(|t| Instant::now() + t);
        let mut cqes = Vec::new();
        let mut interrupted = false;
        loop {
            // One increment a pass: see Engine::loop_passes.
            self.engine.count_loop_pass();
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
            if until == RunUntil::Stopped {
                self.check_lag();
                self.on_consistent.check(&self.engine, stopping);
            }
            // Past the hook's limit no copy starts (the checkpoint it waits for was started on
            // the way: one starts every checkpoint_bytes), so how much an interrupted run copied
            // does not depend on how fast that checkpoint lands.
            if self.fatal.is_none() && !stopping && !past_limit {
                self.start_copies()?;
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
            // Wait for a completion, or for the backoff / throttle / checkpoint / lag timer.
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
            let timer = [retry_at, throttled_until, self.consistent_after, hook_poll, bitmap_retry]
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
            let timeout = match (timeout, progress.is_some()) {
                (Some(t), _) => Some(t.min(Duration::from_millis(500))),
                (None, true) => Some(Duration::from_millis(500)),
                (None, false) if self.running > 0 => Some(self.cfg.checkpoint_interval),
                // Offline: never sleep without a bound, even if nothing is in flight.
                _ if until == RunUntil::Synced => Some(Duration::from_secs(1)),
                // Live: the wake-up read on the eventfd is always posted.
                _ => None,
            };
            self.wait(timeout)?;
            cqes.clear();
            uring::reap(&mut self.ring, &mut cqes);
            for &(ud, res) in &cqes {
                self.dispatch(ud, res)?;
            }
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

    fn finished(&self, until: RunUntil, stopping: bool) -> bool {
        let idle = self.running == 0 && self.target_flush.is_none() && self.bitmap_flush.is_none();
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

    /// The copy rate limit now (bytes/s, 0 = none; see [`policy::copy_limit`]), and whether
    /// the copy yields to the device's I/O, which status shows.
    fn copy_speed(&mut self) -> u64 {
        let busy = self.busy.observe(Instant::now(), self.engine.front_requests());
        let mut g = self.engine.lock();
        let limit = policy::copy_limit(
            self.engine.speed(),
            self.engine.busy_speed(),
            busy,
            g.write_barrier || g.progress.lag_forced,
        );
        g.progress.yielding = limit.yielding;
        limit.rate
    }

    fn start_copies(&mut self) -> Result<()> {
        // The throttle's deadline wakes the loop only while copies may start (set again below
        // when throttled): one left from before a pause, a backoff or a give-up would be in the
        // past and make every wait return at once.
        self.throttled_until = None;
        if !self.backoff.may_retry(Instant::now()) {
            return Ok(());
        }
        if self.engine.paused() || self.engine.hook_running() || self.engine.lock().progress.gave_up.is_some() {
            return Ok(());
        }
        if self.needs_reset {
            // A target is reset with nothing of its in flight.
            if self.running > 0 || self.target_flush.is_some() {
                return Ok(());
            }
            if let Err(e) = self.target.reset() {
                self.target_failed(&format!("target {}: {e}", self.target.describe()));
                return Ok(());
            }
            self.needs_reset = false;
        }
        let speed = self.copy_speed();
        // Any copy can start with a full bucket: it holds at least one buffer.
        self.bucket.refill(Instant::now(), speed, self.cfg.buf_size as u64);
        loop {
            // A copy that failed as it started (finding the source's data) backs off like any.
            if self.backoff.retry_at().is_some() || self.needs_reset {
                break;
            }
            if let Err(at) = self.bucket.admit(Instant::now()) {
                self.throttled_until = Some(at);
                break;
            }
            let buf = match self.free_bufs.pop() {
                Some(b) => b,
                None if self.bufs.len() < self.cfg.max_copies => {
                    self.bufs.push(AlignedBuf::new(self.cfg.buf_size));
                    self.bufs.len() - 1
                }
                None => break,
            };
            // Unlimited, a run of dirty regions over a hole of the source is one copy (the
            // target is zeroed over it in one operation); under a speed limit, holes count
            // like data, a buffer's worth at a time.
            let max = if speed == 0 { self.hole_run() } else { None }.unwrap_or_else(|| self.regions_per_copy());
            let ext = self.engine.lock().state.next_copy(max);
            let Some(ext) = ext else {
                self.free_bufs.push(buf);
                break;
            };
            let (a, b) = self.engine.byte_range(ext);
            self.bucket.spend(b - a);
            let slot = self.jobs.insert(Job { ext, pos: a, end: b, phase: Phase::Read, chunk: 0, done: 0, buf });
            self.running += 1;
            self.advance(slot)?;
        }
        Ok(())
    }

    /// Issues the next operation of job `slot`, or finishes it.
    fn advance(&mut self, slot: usize) -> Result<()> {
        let Some(job) = self.jobs.get_mut(slot) else { return Ok(()) };
        if job.pos >= job.end {
            return self.finish(slot, true);
        }
        let seg = match self.engine.source().next_data(job.pos, job.end) {
            Ok(s) => s,
            // Not just finished: the region would be picked again at once, in a loop, if the
            // error persists. A failed copy backs off and counts towards --max-retries.
            Err(e) => return self.copy_failed(slot, "source: finding data", e),
        };
        let block = u64::from(self.target.block_size()).max(1);
        let r = match next_step(job.pos, job.end, seg, self.cfg.buf_size as u64, block) {
            Step::Zero(len) => self.issue_zero(slot, len),
            Step::Read(chunk) => {
                if let Some(job) = self.jobs.get_mut(slot) {
                    job.phase = Phase::Read;
                    job.chunk = chunk;
                    job.done = 0;
                }
                self.issue_read(slot)
            }
        };
        r.map_err(|e| Error::io("submitting a copy", e))
    }

    fn issue_zero(&mut self, slot: usize, len: u64) -> io::Result<()> {
        let Some(job) = self.jobs.get_mut(slot) else { return Ok(()) };
        job.phase = Phase::Zero;
        job.chunk = len;
        job.done = 0;
        let off = job.pos;
        // SAFETY: zeroing refers to no buffer of ours.
        unsafe { self.target.submit(&mut self.ring, TargetOp::Zero { off, len }, slot as u64) }
    }

    fn issue_read(&mut self, slot: usize) -> io::Result<()> {
        let Some(job) = self.jobs.get(slot) else { return Ok(()) };
        let off = job.pos + job.done;
        let len = (job.chunk - job.done) as u32;
        // SAFETY: `job.done < job.chunk <= buf_size`, so the pointer stays inside the job's
        // buffer, which the job owns until it finishes.
        let ptr = unsafe { self.bufs[job.buf].as_mut_ptr().add(job.done as usize) };
        let e = opcode::Read::new(types::Fixed(SRC_FIXED), ptr, len).offset(off).build();
        // SAFETY: the job's buffer is not touched until this read completes (one phase of a
        // job in flight at a time); it returns to the free list only in `finish`, after its
        // last completion, and Drop leaks every buffer while a job is running.
        unsafe { push(&mut self.ring, e, Owner::Source, slot as u64) }
    }

    fn issue_write(&mut self, slot: usize) -> io::Result<()> {
        let Some(job) = self.jobs.get(slot) else { return Ok(()) };
        let off = job.pos + job.done;
        let len = (job.chunk - job.done) as u32;
        // SAFETY: as in issue_read.
        let buf = unsafe { self.bufs[job.buf].as_ptr().add(job.done as usize) };
        // SAFETY: as in issue_read: the buffer stays the job's until the write completed.
        unsafe { self.target.submit(&mut self.ring, TargetOp::Write { off, buf, len }, slot as u64) }
    }

    fn finish(&mut self, slot: usize, ok: bool) -> Result<()> {
        let Some(job) = self.jobs.try_remove(slot) else { return Ok(()) };
        self.free_bufs.push(job.buf);
        self.running -= 1;
        // The backoff is reset by a good pair flush (target_ok) only: with a target whose
        // writes succeed and flushes fail, a reset here kept it at its first 100 ms for ever.
        self.engine.lock().state.copy_done(job.ext, ok);
        Ok(())
    }

    fn copy_failed(&mut self, slot: usize, what: &str, err: io::Error) -> Result<()> {
        let msg = match self.jobs.get(slot) {
            Some(j) => format!("{what} at byte {}: {err}", j.pos + j.done),
            None => format!("{what}: {err}"),
        };
        log::warn!("copy failed, region stays dirty: {msg}");
        self.finish(slot, false)?;
        if self.offline && self.fatal.is_none() {
            self.fatal = Some(Error::io("copy failed", io::Error::other(msg.clone())));
        }
        self.target_failed(&msg);
        Ok(())
    }

    /// A copy or a flush failed: back off, reset the target before the next attempt, report
    /// `degraded` (the first time) and give up after `max_retries` failures in a row. The
    /// regions stay dirty either way; the device's I/O is not affected.
    fn target_failed(&mut self, msg: &str) {
        self.backoff.failed(Instant::now());
        self.needs_reset = true;
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
    /// again once synced. Also records synced/unsynced transitions.
    fn check_lag(&mut self) {
        let switch = {
            let g = self.engine.lock();
            let (synced, since, forced) = (g.state.is_synced(), g.progress.unsynced_since, g.progress.lag_forced);
            policy::max_lag(Instant::now(), self.engine.max_lag(), forced, synced, since)
        };
        let (turn_on, lag) = match switch {
            LagSwitch::Keep => return,
            LagSwitch::On { lag } => (true, Some(lag)),
            LagSwitch::Off { lag } => (false, lag),
        };
        {
            let mut g = self.engine.lock();
            g.progress.lag_forced = turn_on;
            self.engine.update_active_locked(&g);
        }
        let secs = lag.map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let what = if turn_on { "write-blocking-on" } else { "write-blocking-off" };
        self.engine.events().emit(what, serde_json::json!({ "reason": "max-lag", "lag_secs": secs }));
    }

    fn dispatch(&mut self, ud: u64, res: i32) -> Result<()> {
        let (owner, sub) = uring::decode(ud);
        match owner {
            Some(Owner::Source) => self.on_source(sub as usize, res),
            Some(Owner::Target) => {
                let mut done = std::mem::take(&mut self.done);
                self.target.complete(&mut self.ring, sub, res, &mut done);
                for (token, r) in done.drain(..) {
                    self.on_target(token, r)?;
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
                Ok(())
            }
            _ => {
                log::error!("mirror ring: completion with unknown owner {ud:#x}");
                Ok(())
            }
        }
    }

    fn on_source(&mut self, slot: usize, res: i32) -> Result<()> {
        if slot == SRC_FLUSH_SLOT {
            let r = if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(0) };
            return self.on_flush_part(r, "source");
        }
        if self.draining {
            return self.finish(slot, false);
        }
        let Some(job) = self.jobs.get_mut(slot) else { return Ok(()) };
        if res <= 0 {
            let e = if res == 0 {
                io::Error::new(io::ErrorKind::UnexpectedEof, "source read returned no data")
            } else {
                io::Error::from_raw_os_error(-res)
            };
            return self.copy_failed(slot, "source read", e);
        }
        job.done += res as u64;
        if job.done < job.chunk {
            return self.issue_read(slot).map_err(|e| Error::io("submitting a copy", e));
        }
        job.phase = Phase::Write;
        job.done = 0;
        let ext = job.ext;
        if let Some(h) = self.hooks.after_read.as_mut() {
            h(ext);
        }
        self.issue_write(slot).map_err(|e| Error::io("submitting a copy", e))
    }

    fn on_target(&mut self, token: u64, r: io::Result<u32>) -> Result<()> {
        if token == FLUSH_TOKEN {
            return self.on_flush_part(r, "target");
        }
        let slot = token as usize;
        if self.draining {
            return self.finish(slot, false);
        }
        let Some(job) = self.jobs.get_mut(slot) else { return Ok(()) };
        match (job.phase, r) {
            (Phase::Zero, Ok(_)) => {
                let n = job.chunk;
                job.pos += n;
                self.engine.lock().progress.add_copied(n, true);
                self.advance(slot)
            }
            (Phase::Write, Ok(n)) if n > 0 => {
                job.done += n as u64;
                if job.done < job.chunk {
                    return self.issue_write(slot).map_err(|e| Error::io("submitting a copy", e));
                }
                let n = job.chunk;
                job.pos += n;
                self.checkpoints.copied(n);
                self.engine.lock().progress.add_copied(n, false);
                self.advance(slot)
            }
            (Phase::Write, Ok(_)) => {
                self.copy_failed(slot, "target write", io::Error::new(io::ErrorKind::WriteZero, "wrote nothing"))
            }
            (Phase::Zero, Err(e)) => self.copy_failed(slot, "target zeroing", e),
            (_, Err(e)) => self.copy_failed(slot, "target write", e),
            (Phase::Read, Ok(_)) => Ok(()),
        }
    }

    fn maybe_flush(&mut self, stopping: bool) -> Result<()> {
        if self.target_flush.is_some() {
            return Ok(());
        }
        self.consistent_after = None;
        let due = {
            let g = self.engine.lock();
            // A failed target is flushed again only once its backoff has passed and it was reset
            // (start_copies does both), and never once mirroring gave up (it then never resets):
            // a clean device with a broken target must not re-issue its failing consistent flush
            // in a tight loop, counting failures past max_retries. An offline copy that
            // ends on an error still tries its draining checkpoint (its last chance to keep the
            // progress made; if the target is what failed, that flush fails too, harmlessly).
            if self.needs_reset && self.fatal.is_none() {
                false
            } else if g.state.consistent_point_due() {
                // Spaced out in write-blocking mode (see ConsistentSpacing).
                match self.consistent_spacing.may_start(Instant::now(), self.engine.write_blocking_now(), stopping) {
                    Ok(()) => true,
                    Err(at) => {
                        self.consistent_after = Some(at);
                        false
                    }
                }
            } else if !self.target.flush_publishes() && g.state.checkpoint_possible() {
                let due = self.checkpoints.due(Instant::now(), self.cfg.checkpoint_interval, self.cfg.checkpoint_bytes);
                // Stopping or failing: keep what was copied so far.
                let draining = (stopping || self.fatal.is_some()) && self.running == 0;
                due || draining
            } else {
                false
            }
        };
        if !due {
            if self.bitmap_clears_pending && self.bitmap_retry_due() && self.bitmap_flush.is_none() && self.target_flush.is_none() {
                self.flush_bitmap()?;
            }
            return Ok(());
        }
        let kind = self.engine.lock().state.target_flush_started();
        self.target_flush = Some(kind);
        let now = Instant::now();
        if kind == FlushKind::Consistent {
            self.consistent_spacing.started(now);
        }
        self.checkpoints.started(now);
        // The source is flushed too: a region's bit may only go once both sides hold what
        // was copied on their media. Otherwise a power loss could keep the copy on the target
        // but lose the (never flushed) write on the source, and with the bit clear the pair
        // would stay different for good. The copies read the source before this flush starts,
        // so this fdatasync covers what they read.
        self.flush_parts = 2;
        self.flush_error = None;
        // SAFETY: a flush refers to no memory; the source is a fixed file of this ring.
        unsafe { self.target.submit(&mut self.ring, TargetOp::Flush, FLUSH_TOKEN) }
            .map_err(|e| Error::io("submitting a target flush", e))?;
        let e = opcode::Fsync::new(types::Fixed(SRC_FIXED)).flags(types::FsyncFlags::DATASYNC).build();
        // SAFETY: as above.
        unsafe { push(&mut self.ring, e, Owner::Source, SRC_FLUSH_SLOT as u64) }
            .map_err(|e| Error::io("submitting a source flush", e))
    }

    /// One part of the pair flush completed; the flush is done when both are.
    fn on_flush_part(&mut self, r: io::Result<u32>, what: &str) -> Result<()> {
        if let Err(e) = r {
            log::warn!("{what} flush failed: {e}");
            if what == "source" {
                log::error!("the source lost data it had acknowledged: every FLUSH of the device fails from now on");
                self.engine.set_source_flush_failed();
            }
            self.flush_error.get_or_insert(e);
        }
        self.flush_parts = self.flush_parts.saturating_sub(1);
        if self.flush_parts > 0 {
            return Ok(());
        }
        match self.flush_error.take() {
            None => self.on_target_flush(Ok(0)),
            Some(e) => self.on_target_flush(Err(e)),
        }
    }

    fn on_target_flush(&mut self, r: io::Result<u32>) -> Result<()> {
        let ok = r.is_ok();
        let out = {
            let mut g = self.engine.lock();
            let out = g.state.target_flush_done(ok);
            self.engine.announce_pair_change(&g);
            out
        };
        self.target_flush = None;
        if let Err(e) = r {
            log::warn!("target flush failed ({e}); {} regions are dirty again", out.redirtied);
            let msg = format!("target flush: {e}");
            if self.offline && self.fatal.is_none() {
                self.fatal = Some(Error::io("target flush failed", e));
            }
            self.target_failed(&msg);
            return Ok(());
        }
        self.target_ok();
        if out.consistent {
            let mut g = self.engine.lock();
            let synced = g.state.is_synced();
            let (copied, forced) = g.progress.consistent_point(Instant::now(), synced);
            // The target caught up: worth an event if it had to copy to get here (in
            // write-blocking mode consistent points come every half second, with nothing
            // copied), or if this is the first.
            let first = g.state.counters().consistent_points == 1;
            if forced {
                self.engine.update_active_locked(&g);
            }
            drop(g);
            if (copied > 0 || first) && !self.offline {
                self.engine.events().emit("synced", serde_json::json!({ "copied_bytes": copied }));
            }
            if forced {
                self.engine.events().emit("write-blocking-off", serde_json::json!({ "reason": "max-lag" }));
            }
            if !self.offline {
                // Not on the way out: the stop would have to wait for it (and Drop's drain,
                // which may complete a consistent flush, must not leave a command behind).
                let leaving = self.draining || self.engine.mirror_should_return();
                self.on_consistent.maybe_start(&self.engine, leaving);
            }
        }
        if out.consistent {
            log::debug!("consistent point ({} bits cleared)", out.cleared);
        }
        if out.cleared > 0 {
            // Clearing may be lazy (a stale set bit only costs a recopy after a crash), but
            // pushing the clears out now keeps the resync after a crash small. An offline run
            // ends at this consistent point: its caller's close flushes them (one fdatasync
            // for the clears and the clean state).
            self.bitmap_clears_pending = true;
            if self.bitmap_flush.is_none() && self.bitmap_retry_due() && !(self.offline && out.consistent) {
                self.flush_bitmap()?;
            }
        }
        Ok(())
    }

    /// No failed bitmap flush is waiting for its retry time.
    fn bitmap_retry_due(&self) -> bool {
        !self.bitmap_retry.waiting(Instant::now())
    }

    fn flush_bitmap(&mut self) -> Result<()> {
        let seq = self.engine.bitmap_flush_start();
        let e = opcode::Fsync::new(types::Fd(self.engine.bitmap_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        // SAFETY: an fdatasync refers to no memory; the engine (held) keeps the bitmap open.
        unsafe { push(&mut self.ring, e, Owner::Bitmap, 0) }.map_err(|e| Error::io("submitting a bitmap flush", e))?;
        self.bitmap_flush = Some(seq);
        self.bitmap_clears_pending = false;
        Ok(())
    }
}

const FLUSH_TOKEN: u64 = (1 << 40) - 1;
/// The most bytes one copy of a source's hole covers (one zeroing operation on the target; an
/// NBD target splits it into requests).
const HOLE_COPY_MAX: u64 = 64 << 30;

/// A copy's next operation at `pos`, below `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Zero this many bytes of the target: the source holds a hole there.
    Zero(u64),
    /// Read this many bytes of the source (then write them to the target).
    Read(u64),
}

/// The next step of a copy at `pos` (below `end`), from the source's next data segment there
/// (`Backing::next_data`'s answer), the size of a copy buffer and the target's block size.
///
/// Each step covers at least one byte of [pos, end) (given `pos < end` and `buf > 0`). Where
/// `pos`, `end` and `buf` are whole blocks (Engine::open and the mirror check it for targets
/// that need it), every step is whole blocks too: the source's data boundaries, which follow
/// its filesystem's blocks (4 KiB), are rounded out to the target's, so a hole that does not
/// cover a whole block of the target is copied as data (read as zeroes).
fn next_step(pos: u64, end: u64, seg: Option<(u64, u64)>, buf: u64, block: u64) -> Step {
    let down = |x: u64| x / block * block;
    let up = |x: u64| x.div_ceil(block).saturating_mul(block).min(end);
    match seg {
        None => Step::Zero(end - pos),
        Some((ds, _)) if down(ds.min(end)) > pos => Step::Zero(down(ds.min(end)) - pos),
        Some((_, de)) if de > pos => Step::Read((up(de) - pos).min(buf)),
        // A data segment that ends where it starts: `next_data`'s SEEK_DATA found data at
        // `pos` and its SEEK_HOLE a hole there, punched in between (a DISCARD or unmapping
        // WRITE_ZEROES through the device). The range is read as data: a read of what is a
        // hole now returns zeroes, the target's right contents. A read of 0 bytes would count
        // as a failed copy.
        Some(_) => Step::Read((end - pos).min(buf)),
    }
}

/// The error of the test fault ([`crate::engine::MIRROR_FAULT_ENV`]).
fn injected_fault() -> Error {
    Error::io("injected fault", io::Error::other(format!("the file {} names exists", crate::engine::MIRROR_FAULT_ENV)))
}

/// Kills an --on-consistent command with everything it started (its process group), and reaps
/// it; waits at most 2 s for the exit (a process in uninterruptible I/O on a hung target may not
/// die at once: then it is left to be reaped by init once the daemon exits, rather than blocking
/// the loop).
/// Sub-identifier of the source half of a pair flush (job slots are far below it).
const SRC_FLUSH_SLOT: usize = (1 << 40) - 1;

impl Drop for Mirror<'_> {
    /// Waits for the operations in flight, so that nothing the kernel still holds (buffers,
    /// file references keeping the bitmap's lock) outlives the loop. Jobs cut short leave their
    /// regions dirty, as a crash would.
    fn drop(&mut self) {
        self.draining = true;
        if self.on_consistent.kill_running() {
            self.engine.set_hook_running(false);
        }
        if self.wake_posted {
            self.engine.wake();
        }
        let t0 = Instant::now();
        let mut cqes = Vec::new();
        while self.running > 0 || self.target_flush.is_some() || self.bitmap_flush.is_some() || self.wake_posted {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every step covers at least one byte and stays within [pos, end), whatever the source's
    /// answer, including a data segment that ends where it starts (a hole punched between the
    /// SEEK_DATA and the SEEK_HOLE): a read of 0 bytes would count as a failed copy.
    #[test]
    fn every_step_makes_progress() {
        const MIB: u64 = 1 << 20;
        let cases = [
            (0, MIB, None, Step::Zero(MIB)),
            (0, MIB, Some((4096, MIB)), Step::Zero(4096)),
            (0, MIB, Some((0, 8192)), Step::Read(8192)),
            (0, 4 * MIB, Some((0, 4 * MIB)), Step::Read(MIB)),
            // The race: data at pos, then the hole found at pos too.
            (0, MIB, Some((0, 0)), Step::Read(MIB)),
            (8192, 3 * MIB, Some((8192, 8192)), Step::Read(MIB)),
            (8192, 12288, Some((8192, 8192)), Step::Read(4096)),
        ];
        for (pos, end, seg, want) in cases {
            assert_eq!(next_step(pos, end, seg, MIB, 512), want, "pos {pos}, end {end}, segment {seg:?}");
        }
    }

    /// With a target that takes only whole 64 KiB blocks, the 4 KiB holes and data of the
    /// source are rounded out to whole blocks: data in a block makes the whole block a read.
    #[test]
    fn steps_are_whole_target_blocks() {
        const B: u64 = 64 << 10;
        const MIB: u64 = 1 << 20;
        let cases = [
            // Data from 4 KiB into the first block: the block is read, hole and all.
            (0, MIB, Some((4096, MIB)), Step::Read(MIB)),
            // Data from 4 KiB into the second block: the first is zeroed.
            (0, MIB, Some((B + 4096, MIB)), Step::Zero(B)),
            // Data ends 4 KiB into a block: up to that block's end.
            (0, MIB, Some((0, 3 * B + 4096)), Step::Read(4 * B)),
            // ... but not past the end of the copy.
            (0, 2 * B, Some((0, B + 4096)), Step::Read(2 * B)),
            (B, 4 * B, Some((B, B)), Step::Read(3 * B)),
        ];
        for (pos, end, seg, want) in cases {
            assert_eq!(next_step(pos, end, seg, MIB, B), want, "pos {pos}, end {end}, segment {seg:?}");
        }
    }
}
