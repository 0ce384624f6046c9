//! The engine: one mirror's shared state (decisions in [`crate::core`], the bitmap, the source)
//! and the entry points the front ends (ublk queues, tests, offline tools) call around their I/O.
//!
//! Threads: each front-end queue has its own io_uring and calls [`Engine::begin_write`] /
//! [`Engine::end_write`] around its source writes; the mirror loop ([`crate::engine::mirror`]) runs on
//! its own thread and ring. All of them share one lock over [`MirrorState`]; nothing under the
//! lock blocks on I/O (bitmap bits are set in the mapped page cache, the flush is issued later
//! on a ring).

pub mod events;
pub mod front;
pub mod mirror;
pub mod on_consistent;
pub mod online_verify;
pub mod queue;
pub mod verify_report;

mod config;
mod status;
mod switchover;

pub use config::{alignment_problem, CopyConfig, CopyMode, Settings, DEFAULT_ASYNC_BUFFER};
pub use on_consistent::OnConsistentCommand;
pub use status::{ShipStatus, Status, StatusMode, StatusState, MODES, STATES};

use crate::io::backing::{AlignedBuf, Backing, DirectMode};
use crate::io::bitmap::{Bitmap, BitmapState, BitmapSwitch, Expect, PairIdentity};
use crate::core::{ActivePlan, CoreCounters, Extent, Intent, MirrorState};
use crate::error::{Error, Result};
use crate::engine::front::{Fds, FdsHold};
use crate::core::lifecycle;
use crate::core::policy::RateMeter;
use crate::io::target::{open_file_target, BoxTarget};
use crate::io::{is_uri, open_target};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

pub use crate::core::lifecycle::SyncMode;

/// What to open.
#[derive(Clone, Debug)]
pub struct PairOptions {
    pub source: PathBuf,
    pub target: PathBuf,
    pub bitmap: PathBuf,
    /// `None`: full for a new bitmap, resume for an existing one.
    pub mode: Option<SyncMode>,
    /// `None`: the existing bitmap's, or the default for a new one.
    pub granularity: Option<u64>,
    pub direct: DirectMode,
    /// Open the source for writing (the device does; offline sync and verify do not).
    pub source_writable: bool,
}

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
    rate: RateMeter,
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
    fn new(initial_dirty_regions: u64) -> Self {
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
    fn sample_rate(&mut self, force: bool) {
        self.rate.sample(Instant::now(), self.bytes_copied + self.bytes_zeroed, force);
    }
}

/// What a front end does with a write-like request (see [`Engine::begin_request`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteAdmission {
    /// Issue it (after the intent), to the source, and to the target too if the plan says so.
    Go(Intent, ActivePlan),
    /// Held (switchover in progress, or a consistent flush in write-blocking mode): try again
    /// in a moment.
    Wait,
    /// The device serves the target now: issue it there, with no intent and no mirroring.
    Target,
}

/// What kind of modifying request asks [`Engine::begin_request`] to begin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// A write whose data the front end holds, with the target reachable from the front end:
    /// write-blocking mode may mirror it; async mode may ship it.
    MirrorableWrite,
    /// A write whose data the front end holds (async mode may ship it; the front end cannot
    /// reach the target: an NBD target).
    Write,
    /// A discard or write-zeroes: the background copy takes their regions.
    Other,
}

/// Settings that can change while the mirror runs (`set`, `pause`, `resume`).
#[derive(Debug, Default)]
pub struct Controls {
    /// Copy bandwidth limit in bytes/s; 0 = unlimited.
    speed: AtomicU64,
    /// Copy bandwidth limit while the device serves I/O; 0 = none (the copy competes).
    busy_speed: AtomicU64,
    paused: AtomicBool,
    write_blocking: AtomicBool,
    /// Async mode is set (shipping may still be behind).
    async_mode: AtomicBool,
    /// Async mode's replication buffer in bytes (0: the default).
    async_buffer: AtomicU64,
    /// `--max-lag` in milliseconds; 0 = off.
    max_lag_ms: AtomicU64,
    /// Give up mirroring after this many failed retries in a row; 0 = retry for ever.
    max_retries: AtomicU32,
    /// Write-blocking is in force now (set by the mode or by max-lag, off while degraded).
    active_now: AtomicBool,
}

pub struct LockedState {
    pub state: MirrorState<Bitmap>,
    pub progress: Progress,
    /// Switchover in progress: new writes wait (checked under this lock together with
    /// `begin_write`, so a write is either counted in flight or held).
    pub write_barrier: bool,
    /// Async mode: the bytes of the writes in the replication queue, by the handle the queue
    /// carries ([`crate::core::ship`]). A buffer leaves only when its write is no longer queued
    /// nor in flight to the target.
    pub ship_bufs: slab::Slab<AlignedBuf>,
}

pub struct Engine {
    inner: Mutex<LockedState>,
    /// The device's data (swapped with the target by `switchover --reverse`).
    source: std::sync::RwLock<Arc<Backing>>,
    /// The target's backing (a duplicate of the mirror's), when the front end can reach it:
    /// write-blocking writes, online verify, switchover.
    front_target: Mutex<Option<Arc<Backing>>>,
    /// Descriptors the device's queues use (see [`crate::engine::front`]).
    front: crate::engine::front::FrontFds,
    /// Serializes switchovers.
    switching: Mutex<()>,
    front_requests: AtomicU64,
    /// Passes of the mirror loop (see [`Engine::loop_passes`]).
    loop_passes: AtomicU64,
    /// The mirror thread is asked to park (its target is being replaced), and whether it runs.
    mirror_restart: AtomicBool,
    mirror_running: AtomicBool,
    /// What a parked mirror thread does next.
    mirror_next: Mutex<Option<MirrorNext>>,
    /// Announces a change of the mirror thread's parking (`mirror_next`, `mirror_restart`,
    /// `mirror_running`, the stop): each is changed and then announced with `mirror_next`'s
    /// lock taken (see [`Engine::announce_parking`]), and each waiter checks them under that
    /// lock, so no waiter misses a change.
    parking: std::sync::Condvar,
    /// Announces, while a switchover holds writes, a change that can make the pair ready for
    /// it or failed; paired with the engine's lock (see [`Engine::announce_pair_change`]).
    pair_changed: std::sync::Condvar,
    size: u64,
    shift: u32,
    bitmap_fd: std::sync::Arc<std::fs::File>,
    bitmap_path: PathBuf,
    wake: nix::sys::eventfd::EventFd,
    stop: AtomicBool,
    /// The mirror's fdatasync of the source failed. Linux reports a writeback error to one
    /// fdatasync only: the mirror's call may have taken the error an application's FLUSH should
    /// see, so from then on every FLUSH of the device fails.
    source_flush_failed: AtomicBool,
    controls: Controls,
    events: crate::engine::events::EventLog,
    /// The device now serves the target directly (after `switchover`).
    serving_target: AtomicBool,
    /// An --on-consistent command is running: the target must not change.
    hook_running: AtomicBool,
    verifier: verify_report::Verifier,
    /// Tests only: while this file exists, the mirror loop fails (at its setup, and at its next
    /// wake-up when running). From UBLK_MIRROR_TEST_FAIL_MIRROR_WHILE; see docs/operations.md.
    mirror_fault: Mutex<Option<PathBuf>>,
}

/// What [`Engine::record_failure`] found.
pub struct Failure {
    /// The first failure after a healthy period (the pair just became degraded).
    pub first: bool,
    /// This failure made mirroring give up.
    pub give_up: bool,
    /// Failures in a row.
    pub failures: u32,
}

/// The environment variable naming the fault file of [`Engine::mirror_fault_injected`].
pub const MIRROR_FAULT_ENV: &str = "UBLK_MIRROR_TEST_FAIL_MIRROR_WHILE";

/// What the mirror thread does after its loop returned.
pub enum MirrorNext {
    Stop,
    Same,
    Target(BoxTarget),
}

/// How often a switchover re-wakes a mirror loop it waits to see parked.
const PARK_NUDGE: Duration = Duration::from_millis(50);
/// The longest a parking waiter sleeps without a look at its conditions: every change is
/// announced, so this only bounds the cost of a change that was not.
const PARK_SAFETY: Duration = Duration::from_secs(1);

fn lock_recovering<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are replaced whole, never left half-changed: a panic elsewhere while
    // one was held leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_lock<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

/// What opening a pair found and did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpenReport {
    pub mode: SyncMode,
    pub created_bitmap: bool,
    /// The new bitmap replaced one that was there (`--sync full` or `none` over it).
    pub replaced_bitmap: bool,
    /// The bitmap's region size.
    pub granularity: u64,
    pub dirty_regions: u64,
    pub source_direct: bool,
    pub target_direct: bool,
}

impl Engine {
    /// Opens source, target and bitmap, checks that they belong together, and prepares the
    /// state for `mode`. On error nothing has been modified (a new bitmap is created only after
    /// every other check passed, atomically).
    pub fn open(opts: &PairOptions) -> Result<(Engine, BoxTarget, OpenReport)> {
        let source = Backing::open(&opts.source, "source", opts.source_writable, opts.direct)?;
        // Files and block devices are checked against the source here; a network target
        // checks what it can at connect time.
        let (target, target_hint): (BoxTarget, String) = if is_uri(&opts.target) {
            (open_target(&opts.target, opts.direct)?, "use a larger export".to_string())
        } else {
            let t = open_file_target(&opts.target, opts.direct)?;
            let tb = t.backing();
            if same_file(&source, tb) {
                return Err(Error::config(format!(
                    "source and target are the same file ({}): give a different target",
                    opts.target.display()
                )));
            }
            let hint = match tb.kind {
                crate::io::backing::Kind::File => {
                    format!("grow it with: truncate -s {} {}", source.size, opts.target.display())
                }
                crate::io::backing::Kind::BlockDevice => "use a larger device or volume".to_string(),
            };
            (Box::new(t), hint)
        };
        if source.size % 512 != 0 {
            return Err(Error::config(format!(
                "source {} is {} bytes, not a multiple of 512: a block device's size must be \
                 (resize it, e.g. truncate -s {} {})",
                opts.source.display(),
                source.size,
                source.size.div_ceil(512) * 512,
                opts.source.display()
            )));
        }
        if target.size() < source.size {
            return Err(Error::config(format!(
                "target {} is smaller than the source: {} < {} bytes; it needs at least {} \
                 bytes ({target_hint})",
                opts.target.display(),
                target.size(),
                source.size,
                source.size,
            )));
        }
        let target_identity = target.identity();
        let pair = PairIdentity {
            source: source.identity.0.clone(),
            source_fingerprint: source.identity.1,
            target: target_identity.0,
            target_fingerprint: target_identity.1,
        };
        // After a switchover the data lives on the target: serving or syncing the old pair
        // again would bring back the stale source.
        let found = Bitmap::read_header(&opts.bitmap).ok();
        if let Some(h) = &found {
            if h.state == BitmapState::SwitchedOver {
                return Err(Error::Bitmap {
                    path: opts.bitmap.clone(),
                    problem: crate::error::BitmapProblem::SwitchedOver,
                    what: format!(
                        "the device of this pair was switched over to its target {}: the source {} \
                         is stale",
                        h.pair.target, h.pair.source
                    ),
                    fix: "use the old target as the source (with a new bitmap); delete this bitmap \
                          only if you really mean to serve the old source again"
                        .into(),
                });
            }
        }
        let exists = opts.bitmap.exists();
        let mode = lifecycle::resolve_mode(opts.mode, exists, &|| opts.bitmap.display().to_string())?;
        // A new bitmap (full, none) keeps an existing valid bitmap's granularity for this pair
        // unless one was asked for.
        let granularity = opts.granularity.unwrap_or_else(|| {
            found
                .as_ref()
                .filter(|h| crate::io::bitmap::same_pair(h, &pair) && h.device_size == source.size)
                .map(|h| h.granularity)
                .unwrap_or_else(|| crate::io::bitmap::default_granularity(source.size))
        });
        // Checked before the bitmap is made or changed: a refused pair leaves nothing behind.
        // An invalid granularity is left to the bitmap's own checks, which say what is valid.
        let used = match (&found, mode) {
            (Some(h), SyncMode::Resume) => h.granularity,
            _ => granularity,
        };
        if (is_uri(&opts.target) || target.direct()) && crate::io::bitmap::check_granularity(used).is_ok() {
            if let Some(why) = alignment_problem(target.block_size().into(), source.size, used) {
                return Err(Error::config(format!("target {}: {why}", opts.target.display())));
            }
        }
        if mode != SyncMode::Resume && exists {
            // Refuse to replace a bitmap another live mirror holds.
            if let Ok(f) = std::fs::File::open(&opts.bitmap) {
                if !crate::io::bitmap::try_lock_exclusive(&f) {
                    return Err(Error::Bitmap {
                        path: opts.bitmap.clone(),
                        problem: crate::error::BitmapProblem::InUse,
                        what: "another ublk-mirror process is using it".into(),
                        fix: "stop that mirror first".into(),
                    });
                }
            }
        }
        let expect = Expect { pair: &pair, device_size: source.size, granularity: opts.granularity };
        let mut files = crate::io::bitmap::BitmapFiles::new(&opts.bitmap, pair.clone(), source.size, granularity, expect);
        let lifecycle::Opened { mut state, created } = lifecycle::open_bitmap(&mut files, mode)?;
        // Informational (the bits are what matters): durable with the next bitmap flush.
        state.pbits_mut().set_state_lazy(BitmapState::Active);
        let dirty = state.dirty();
        let report = OpenReport {
            mode,
            created_bitmap: created,
            replaced_bitmap: created && exists,
            granularity: state.pbits().granularity(),
            dirty_regions: dirty,
            source_direct: source.direct,
            target_direct: target.direct(),
        };
        let engine = Self::assemble(source, state, &opts.bitmap, dirty)?;
        Ok((engine, target, report))
    }

    fn assemble(source: Backing, state: MirrorState<Bitmap>, bitmap: &Path, dirty: u64) -> Result<Engine> {
        let bitmap_fd = state.pbits().file();
        let shift = state.pbits().granularity().trailing_zeros();
        // The bitmap's device size: the source's (checked at open), or after a switchover the
        // device's, which a larger target keeps.
        let size = state.pbits().header().device_size;
        let wake = nix::sys::eventfd::EventFd::from_value_and_flags(
            0,
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )
        .map_err(|e| Error::io("eventfd", e.into()))?;
        Ok(Engine {
            size,
            shift,
            front: crate::engine::front::FrontFds::new(Fds { source: source.fd(), target: -1 }),
            source: std::sync::RwLock::new(Arc::new(source)),
            front_target: Mutex::new(None),
            switching: Mutex::new(()),
            front_requests: AtomicU64::new(0),
            loop_passes: AtomicU64::new(0),
            mirror_restart: AtomicBool::new(false),
            mirror_running: AtomicBool::new(false),
            mirror_next: Mutex::new(None),
            parking: std::sync::Condvar::new(),
            pair_changed: std::sync::Condvar::new(),
            bitmap_path: bitmap.to_path_buf(),
            bitmap_fd,
            inner: Mutex::new(LockedState {
                state,
                progress: Progress::new(dirty),
                write_barrier: false,
                ship_bufs: slab::Slab::new(),
            }),
            wake,
            stop: AtomicBool::new(false),
            source_flush_failed: AtomicBool::new(false),
            controls: Controls::default(),
            events: crate::engine::events::EventLog::default(),
            serving_target: AtomicBool::new(false),
            hook_running: AtomicBool::new(false),
            verifier: Default::default(),
            mirror_fault: Mutex::new(std::env::var_os(MIRROR_FAULT_ENV).map(PathBuf::from)),
        })
    }

    /// Opens a device's data after its switchover, for `recover`: the bitmap says the device
    /// moved to `target`, so the engine serves the target alone (no mirror; the old source is
    /// not even opened: it may be gone).
    pub fn open_switched(bitmap: &Path, target: &Path, direct: DirectMode) -> Result<Engine> {
        let data = Backing::open(target, "target", true, direct)?;
        let bm = Bitmap::open_switched(bitmap, &data.identity)?;
        if data.size < bm.header().device_size {
            return Err(Error::config(format!(
                "target {} is {} bytes, smaller than the device ({} bytes)",
                target.display(),
                data.size,
                bm.header().device_size
            )));
        }
        let state = lifecycle::trusted_state(bm, |b| b.sync())?;
        let e = Self::assemble(data, state, bitmap, 0)?;
        e.set_front_target(e.source(), Duration::from_secs(1));
        e.serving_target.store(true, Ordering::SeqCst);
        Ok(e)
    }

    /// The lock over the shared state. A poisoned lock means a thread panicked while changing
    /// the state; continuing could clear a bit that must stay, so the process stops instead.
    pub fn lock(&self) -> MutexGuard<'_, LockedState> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(_) => {
                log::error!("mirror state lock poisoned by a panic; aborting to keep the bitmap safe");
                std::process::abort()
            }
        }
    }

    /// The device's data. Hold the returned reference only for the operation at hand: a
    /// reverse switchover replaces it (the replaced backing stays open meanwhile).
    pub fn source(&self) -> Arc<Backing> {
        match self.source.read() {
            Ok(g) => g.clone(),
            // Only a panic while swapping could poison it, and the swap cannot panic.
            Err(p) => p.into_inner().clone(),
        }
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }
    pub fn bitmap_fd(&self) -> std::os::unix::io::RawFd {
        use std::os::unix::io::AsRawFd;
        self.bitmap_fd.as_raw_fd()
    }
    pub fn bitmap_path(&self) -> &Path {
        &self.bitmap_path
    }

    /// The regions covering bytes `[off, off+len)` (`len > 0`).
    pub fn extent(&self, off: u64, len: u64) -> Extent {
        let start = off >> self.shift;
        let end = (off + len.max(1) - 1) >> self.shift;
        Extent { start, count: end - start + 1 }
    }

    /// Byte range of a region extent, clipped to the device.
    pub fn byte_range(&self, ext: Extent) -> (u64, u64) {
        let a = ext.start << self.shift;
        let b = (ext.end() << self.shift).min(self.size);
        (a, b)
    }

    pub fn intent_durable(&self, seq: u64) -> bool {
        self.lock().state.intent_durable(seq)
    }
    /// Call just before issuing an fdatasync of the bitmap; pass the result to
    /// [`Self::bitmap_flush_done`].
    pub fn bitmap_flush_start(&self) -> u64 {
        self.lock().state.bitmap_flush_started()
    }
    pub fn bitmap_flush_done(&self, seq: u64, ok: bool) {
        self.lock().state.bitmap_flush_done(seq, ok)
    }
    pub fn end_write(&self, ext: Extent) {
        let mut g = self.lock();
        let wake = g.state.end_write(ext);
        g.progress.unsynced_since.get_or_insert_with(Instant::now);
        self.announce_pair_change(&g);
        drop(g);
        if wake {
            self.wake();
        }
    }

    /// The front end's entry point for a write, discard or write-zeroes of `[off, off+len)`:
    /// what to do now. `mirror_ok`: the request may be mirrored synchronously (a write, with
    /// the target reachable from the queue). `may_wait`: the caller can retry later.
    pub fn begin_request(&self, ext: Extent, off: u64, len: u64, write: WriteKind, may_wait: bool) -> WriteAdmission {
        let mut g = self.lock();
        // Checked under the lock: a switchover sets serving_target before it lifts the barrier
        // under this lock, so a write that finds the barrier gone also finds the switch (checked
        // before taking the lock, it could go to the old source after the switch).
        if self.serving_target() {
            return WriteAdmission::Target;
        }
        if g.write_barrier {
            return WriteAdmission::Wait;
        }
        if write == WriteKind::MirrorableWrite && self.write_blocking_now() {
            if may_wait && g.state.consistent_flush_running() {
                return WriteAdmission::Wait;
            }
            let (i, p) = g.state.begin_active_write(ext, off, len);
            return WriteAdmission::Go(i, p);
        }
        if write != WriteKind::Other && !self.write_blocking_now() && g.state.ship().is_some_and(|q| q.shipping()) {
            let (i, p) = g.state.begin_shipped_write(ext, off, len);
            return WriteAdmission::Go(i, p);
        }
        WriteAdmission::Go(g.state.begin_write(ext), ActivePlan::SourceOnly)
    }

    pub fn verifier(&self) -> &verify_report::Verifier {
        &self.verifier
    }

    /// Lets the front end reach `target` itself when it is a file or block device: for
    /// write-blocking writes, online verify and switchover. Call before the device serves.
    pub fn attach_target(&self, target: &dyn crate::io::target::Target) -> Result<()> {
        let Some(b) = target.backing() else { return Ok(()) };
        let b = Arc::new(b.try_clone().map_err(|e| Error::io("duplicating the target's descriptor", e))?);
        // Nothing holds the initial set yet: this returns at once.
        self.set_front_target(b, Duration::from_secs(5));
        Ok(())
    }

    /// Makes `target` the front end's target, beside the current source, and waits (at most
    /// `limit`) for requests on the previous descriptors; false if some still hold them.
    fn set_front_target(&self, target: Arc<Backing>, limit: Duration) -> bool {
        let fds = Fds { source: self.source().fd(), target: target.fd() };
        *lock_recovering(&self.front_target) = Some(target);
        self.front.publish(fds, limit)
    }

    /// The front end can write the target itself (see [`Self::attach_target`]).
    pub fn front_has_target(&self) -> bool {
        lock_recovering(&self.front_target).is_some()
    }

    /// The descriptors for one front-end request, held until [`Self::front_exit`]. A read or
    /// flush takes them first and then asks [`Self::serving_target`] which one to use; a write
    /// takes them after [`Self::begin_request`] let it go.
    pub fn front_enter(&self) -> FdsHold {
        self.front_requests.fetch_add(1, Ordering::Relaxed);
        self.front.enter()
    }
    pub fn front_exit(&self, h: FdsHold) {
        self.front.exit(h)
    }

    /// Runs `start` (an online verify's start, [`online_verify::start`]) with a duplicate of
    /// the target's descriptor, under the lock a switchover takes: a verify never begins while
    /// the pair is being switched, and a switchover refuses while a verify runs.
    pub fn with_target_for_verify(&self, start: impl FnOnce(std::os::fd::OwnedFd) -> Result<()>) -> Result<()> {
        let _one = lock_recovering(&self.switching);
        if self.serving_target() {
            return Err(Error::config("the device was switched over: there is no pair to verify"));
        }
        let Some(t) = lock_recovering(&self.front_target).clone() else {
            return Err(Error::config(
                "online verify reads the target directly: it needs a file or block device target \
                 (use the offline `verify` for others)",
            ));
        };
        let dup = t.file.try_clone().map_err(|e| Error::io("duplicating the target's descriptor", e))?;
        start(std::os::fd::OwnedFd::from(dup))
    }

    /// The --on-consistent command may start if no write-blocking write is landing on the
    /// target: checked, and write-blocking suspended, in one critical section. begin_request
    /// decides under the same lock, so no write can set out for the target between the check
    /// and the command's start. Returns the consistent point's number, or None (try at the next).
    ///
    /// Not while a switchover holds writes: it checks `hook_running` after it found the target
    /// synced, and a command started after that check would read a target the device may
    /// already be writing (forward) or hold writes for up to its stop grace (reverse).
    pub fn begin_hook(&self) -> Option<u64> {
        let g = self.lock();
        if g.state.active_writes() > 0 || g.write_barrier {
            return None;
        }
        self.hook_running.store(true, Ordering::SeqCst);
        self.update_active_locked(&g);
        Some(g.state.counters().consistent_points)
    }

    /// While an --on-consistent command runs, nothing writes the target.
    pub fn set_hook_running(&self, yes: bool) {
        self.hook_running.store(yes, Ordering::SeqCst);
        let g = self.lock();
        self.update_active_locked(&g);
        self.announce_pair_change(&g);
    }

    /// Wakes a switchover waiting for the pair, if one holds writes (`write_barrier`): called
    /// with the engine's lock held, after a change that can make the pair ready or failed. A
    /// no-op otherwise, so the write path pays only a flag test.
    pub(crate) fn announce_pair_change(&self, g: &LockedState) {
        if g.write_barrier {
            self.pair_changed.notify_all();
        }
    }
    pub fn hook_running(&self) -> bool {
        self.hook_running.load(Ordering::SeqCst)
    }

    pub fn serving_target(&self) -> bool {
        self.serving_target.load(Ordering::SeqCst)
    }

    /// Waits until the mirror thread is not running its loop (parked or gone).
    fn wait_mirror_parked(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = lock_recovering(&self.mirror_next);
        while self.mirror_running.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // The loop may be waiting on its ring: it sees the restart once woken. Woken again
            // every PARK_NUDGE in case it was mid-pass and waits again before seeing it.
            self.wake();
            g = self.parking.wait_timeout(g, left.min(PARK_NUDGE)).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    /// Wakes every waiter on the mirror thread's parking after a change of it (made before
    /// this call, under `mirror_next`'s lock or not).
    pub(crate) fn announce_parking(&self) {
        drop(lock_recovering(&self.mirror_next));
        self.parking.notify_all();
    }

    /// The mirror thread after a failed loop: waits until `until` (for ever with `None`), or
    /// until it is asked to stop or to park for a switchover, whichever comes first.
    pub fn wait_retry_or_park(&self, until: Option<Instant>) {
        let mut g = lock_recovering(&self.mirror_next);
        while !self.mirror_should_return() {
            let left = match until {
                Some(t) => t.saturating_duration_since(Instant::now()),
                None => PARK_SAFETY,
            };
            if until.is_some() && left.is_zero() {
                return;
            }
            g = self.parking.wait_timeout(g, left.min(PARK_SAFETY)).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// The mirror loop should return (to be parked for a target change, or to stop).
    pub fn mirror_should_return(&self) -> bool {
        self.stop_requested() || self.mirror_restart.load(Ordering::SeqCst)
    }

    /// Called by the mirror thread around its loop.
    pub fn set_mirror_running(&self, yes: bool) {
        self.mirror_running.store(yes, Ordering::SeqCst);
        self.announce_parking();
    }

    /// Called by the mirror thread after its loop returned: stop, or go on (with the same or
    /// a new target) once a switchover has decided.
    pub fn mirror_next(&self) -> MirrorNext {
        let mut g = lock_recovering(&self.mirror_next);
        loop {
            if self.stop_requested() {
                return MirrorNext::Stop;
            }
            if let Some(n) = g.take() {
                return n;
            }
            if !self.mirror_restart.load(Ordering::SeqCst) {
                // The loop returned without being asked to park: nothing else to do.
                return MirrorNext::Stop;
            }
            g = self.parking.wait_timeout(g, PARK_SAFETY).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Ends a write begun with [`Self::begin_request`].
    pub fn end_write_planned(&self, ext: Extent, plan: ActivePlan, source_ok: bool, target_ok: bool) {
        if let ActivePlan::Ship { id } = plan {
            // A shipped write that ends here was not buffered (it failed, or its data could
            // not be taken): an ordinary write.
            return self.ship_written(id, source_ok, None);
        }
        let ActivePlan::Target { id } = plan else { return self.end_write(ext) };
        let mut g = self.lock();
        let wake = g.state.end_active_write(id, source_ok, target_ok);
        g.progress.unsynced_since.get_or_insert_with(Instant::now);
        self.announce_pair_change(&g);
        drop(g);
        if wake {
            self.wake();
        }
    }

    /// Async mode: the source write of shipped write `id` completed (`source_ok`), with a copy
    /// of its bytes (`None`: no copy, it ends as an ordinary write). Queues it for the target
    /// (see [`MirrorState::ship_source_done`]); the request may complete once this returns.
    pub fn ship_written(&self, id: u64, source_ok: bool, data: Option<AlignedBuf>) {
        let mut g = self.lock();
        let (ok, handle) = match data {
            Some(b) if source_ok => (true, g.ship_bufs.insert(b) as u64),
            _ => (false, u64::MAX),
        };
        let was_empty = g.state.ship().is_none_or(|q| q.queued() == 0);
        let out = g.state.ship_source_done(id, ok, handle);
        if !out.queued && ok {
            g.ship_bufs.try_remove(handle as usize);
        }
        for h in &out.freed {
            g.ship_bufs.try_remove(*h as usize);
        }
        g.progress.unsynced_since.get_or_insert_with(Instant::now);
        self.announce_pair_change(&g);
        drop(g);
        if let Some(why) = out.fell_behind {
            log::info!("async: shipping fell behind ({}); the background copy takes over", why.name());
            self.events.emit("async-behind", serde_json::json!({ "reason": why.name() }));
        }
        // The loop ships what it finds queued after each completion: it needs waking only
        // when the queue was empty.
        if out.wake || (out.queued && was_empty) || out.fell_behind.is_some() {
            self.wake();
        }
    }

    /// Async mode: the device received a FLUSH, or completed a FUA write: the epoch closes.
    pub fn ship_device_flush(&self) {
        self.lock().state.ship_device_flush();
    }

    pub fn controls(&self) -> &Controls {
        &self.controls
    }
    pub fn events(&self) -> &crate::engine::events::EventLog {
        &self.events
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
        for h in freed {
            g.ship_bufs.try_remove(h as usize);
        }
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
    /// Requests the front end has begun (reads, writes, flushes...): the mirror watches it to
    /// tell whether the device is busy.
    pub fn front_requests(&self) -> u64 {
        self.front_requests.load(Ordering::Relaxed)
    }

    /// How many passes the mirror loop (every run of it, restarts included) has begun: it only
    /// grows, by one each time the loop looks at the state and does what is due (copies,
    /// flushes, retries, timers), that is at each wake-up. Each pass's work happens before the
    /// next pass is counted, so once the counter has gone up by 2 from a value read at some
    /// moment, a whole pass that began after that moment has ended: what the loop would have
    /// done then (a retry whose time had come, a copy of a region dirty by then) it has done, or
    /// begun. Tests wait on it to see that something did not happen; an operator sees a stuck
    /// loop (not moving while work is due) or a spinning one (racing while idle).
    pub fn loop_passes(&self) -> u64 {
        self.loop_passes.load(Ordering::SeqCst)
    }

    /// The mirror loop begins a pass (called once per pass, by the loop only).
    pub(crate) fn count_loop_pass(&self) {
        // SeqCst (a release): what the previous pass did is seen by whoever reads the new value.
        self.loop_passes.fetch_add(1, Ordering::SeqCst);
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

    /// Wakes the mirror loop (new dirty regions, or a stop request).
    pub fn wake(&self) {
        // The counter cannot overflow in practice (it is reset by every read); a failed write
        // only means a wake-up is already pending.
        let _ = self.wake.write(1);
    }
    pub fn wake_fd(&self) -> std::os::unix::io::RawFd {
        use std::os::fd::{AsFd, AsRawFd};
        self.wake.as_fd().as_raw_fd()
    }
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
        self.announce_parking();
    }
    pub fn set_source_flush_failed(&self) {
        self.source_flush_failed.store(true, Ordering::SeqCst);
    }
    pub fn source_flush_failed(&self) -> bool {
        self.source_flush_failed.load(Ordering::SeqCst)
    }
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Source and target as the bitmap records them.
    pub fn pair(&self) -> PairIdentity {
        self.lock().state.pbits().header().pair.clone()
    }

    pub fn counters(&self) -> CoreCounters {
        self.lock().state.counters()
    }

    /// Tests: make the mirror loop fail while `path` exists (None: never).
    pub fn set_mirror_fault(&self, path: Option<PathBuf>) {
        *lock_recovering(&self.mirror_fault) = path;
    }

    /// The test fault of [`MIRROR_FAULT_ENV`] is in force.
    pub fn mirror_fault_injected(&self) -> bool {
        lock_recovering(&self.mirror_fault).as_ref().is_some_and(|p| p.exists())
    }

    /// The mirror loop ended with `err` (not asked to): the pair is degraded and the state
    /// `failed` until a new loop starts. It counts as a failure toward `--max-retries`, like a
    /// failed copy. Returns false once mirroring has given up.
    pub fn mirror_loop_failed(&self, err: &Error, retry_in: Duration) -> bool {
        let msg = format!("mirror loop: {err}");
        let Failure { first, give_up, failures } = self.record_failure(&msg, true);
        log::error!("{msg}; {}", if give_up { "giving up".to_string() } else { format!("restarting in {retry_in:?}") });
        if first {
            self.events.emit("degraded", serde_json::json!({ "error": msg }));
        }
        self.events.emit(
            "mirror-failed",
            serde_json::json!({ "error": msg, "failures": failures, "retry_in_secs": retry_in.as_secs_f64() }),
        );
        if give_up {
            self.events.emit("stopped", serde_json::json!({ "error": msg, "failures": failures }));
        }
        self.lock().progress.gave_up.is_none()
    }

    /// Records a failure of the mirroring (a copy, a flush, or the loop itself, `loop_failed`)
    /// under one lock: the error, the failures in a row, degraded since the first, given up
    /// past `--max-retries`; write-blocking stops in the same step (see update_active_locked).
    pub fn record_failure(&self, msg: &str, loop_failed: bool) -> Failure {
        let max = self.max_retries();
        let mut g = self.lock();
        g.progress.last_error = Some(msg.to_string());
        if loop_failed {
            g.progress.loop_failed = Some(msg.to_string());
        }
        g.progress.target_failures = g.progress.target_failures.saturating_add(1);
        let first = g.progress.degraded_since.is_none();
        if first {
            g.progress.degraded_since = Some(SystemTime::now());
        }
        let give_up = crate::core::policy::gives_up(max, g.progress.target_failures) && g.progress.gave_up.is_none();
        if give_up {
            g.progress.gave_up = Some(format!("{} failures in a row; last: {msg}", g.progress.target_failures));
        }
        self.update_active_locked(&g);
        self.announce_pair_change(&g);
        Failure { first, give_up, failures: g.progress.target_failures }
    }

    /// A mirror loop is set up and about to run. After a failed one: the state leaves `failed`,
    /// and a consistent point is asked for, whose flush tells whether the target works again
    /// (it clears `degraded`; see the mirror's target_ok).
    pub fn mirror_loop_started(&self) {
        let restarted = {
            let mut g = self.lock();
            let was = g.progress.loop_failed.take();
            if was.is_some() {
                g.state.request_consistent_point();
            }
            was
        };
        if let Some(e) = restarted {
            self.events.emit("mirror-restarted", serde_json::json!({ "after": e }));
        }
    }

    /// Orderly close: the bitmap is made durable (with the bits cleared so far) and marked
    /// clean. Call only when no write is in flight and the mirror loop has stopped.
    pub fn close(&self) -> Result<()> {
        if self.serving_target() {
            return Ok(());
        }
        let mut g = self.lock();
        g.state.pbits_mut().set_state(BitmapState::Clean)
    }
}

fn same_file(a: &Backing, b: &Backing) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.file.metadata(), b.file.metadata()) {
        (Ok(x), Ok(y)) => {
            (x.dev() == y.dev() && x.ino() == y.ino()) || (x.rdev() != 0 && x.rdev() == y.rdev())
        }
        _ => false,
    }
}
