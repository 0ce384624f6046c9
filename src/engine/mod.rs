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
pub mod online_verify;
pub mod queue;
pub mod verify_report;

use crate::io::backing::{Backing, DirectMode};
use crate::io::bitmap::{Bitmap, BitmapState, BitmapSwitch, Expect, PairIdentity};
use crate::core::{ActivePlan, CoreCounters, Extent, Intent, MirrorState};
use crate::error::{Error, Result};
use crate::engine::front::{Fds, Held};
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
pub enum Gate {
    /// Issue it (after the intent), to the source, and to the target too if the plan says so.
    Go(Intent, ActivePlan),
    /// Held (switchover in progress, or a consistent flush in write-blocking mode): try again
    /// in a moment.
    Wait,
    /// The device serves the target now: issue it there, with no intent and no mirroring.
    Target,
}

/// How writes to the device reach the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Writes complete once on the source; the mirror copies dirty regions behind them.
    Background,
    /// Writes complete once on the source and the target (QEMU's write-blocking active mirror):
    /// regions written stay clean, the dirty set only drains.
    WriteBlocking,
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
    /// `--max-lag` in milliseconds; 0 = off.
    max_lag_ms: AtomicU64,
    /// Give up mirroring after this many failed retries in a row; 0 = retry for ever.
    max_retries: AtomicU32,
    /// Write-blocking is in force now (set by the mode or by max-lag, off while degraded).
    active_now: AtomicBool,
}

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
    /// Only carried from the saved configuration to a recovered daemon (not a live setting).
    #[serde(skip)]
    pub hook: Option<OnConsistentCommand>,
}

pub struct LockedState {
    pub state: MirrorState<Bitmap>,
    pub progress: Progress,
    /// Switchover in progress: new writes wait (checked under this lock together with
    /// `begin_write`, so a write is either counted in flight or held).
    pub write_barrier: bool,
}

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
    /// Write-blocking because the lag passed --max-lag (the mode set is background).
    MaxLag,
}

impl StatusMode {
    pub const ALL: [StatusMode; 3] = [StatusMode::Background, StatusMode::WriteBlocking, StatusMode::MaxLag];

    pub const fn name(self) -> &'static str {
        match self {
            StatusMode::Background => "background",
            StatusMode::WriteBlocking => "write-blocking",
            StatusMode::MaxLag => "write-blocking (max-lag)",
        }
    }
}

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
    pub state: &'static str,
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
    pub mode: &'static str,
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
                .filter(|h| h.pair == pair && h.device_size == source.size)
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
            bitmap_path: bitmap.to_path_buf(),
            bitmap_fd,
            inner: Mutex::new(LockedState {
                state,
                progress: Progress::new(dirty),
                write_barrier: false,
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
        drop(g);
        if wake {
            self.wake();
        }
    }

    /// The front end's entry point for a write, discard or write-zeroes of `[off, off+len)`:
    /// what to do now. `mirror_ok`: the request may be mirrored synchronously (a write, with
    /// the target reachable from the queue). `may_wait`: the caller can retry later.
    pub fn begin_request(&self, ext: Extent, off: u64, len: u64, mirror_ok: bool, may_wait: bool) -> Gate {
        let mut g = self.lock();
        // Checked under the lock: a switchover sets serving_target before it lifts the barrier
        // under this lock, so a write that finds the barrier gone also finds the switch (checked
        // before taking the lock, it could go to the old source after the switch).
        if self.serving_target() {
            return Gate::Target;
        }
        if g.write_barrier {
            return Gate::Wait;
        }
        if mirror_ok && self.write_blocking_now() {
            if may_wait && g.state.consistent_flush_running() {
                return Gate::Wait;
            }
            let (i, p) = g.state.begin_active_write(ext, off, len);
            return Gate::Go(i, p);
        }
        Gate::Go(g.state.begin_write(ext), ActivePlan::SourceOnly)
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
    pub fn front_enter(&self) -> Held {
        self.front_requests.fetch_add(1, Ordering::Relaxed);
        self.front.enter()
    }
    pub fn front_exit(&self, h: Held) {
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
        self.update_active();
    }
    pub fn hook_running(&self) -> bool {
        self.hook_running.load(Ordering::SeqCst)
    }

    /// After a switchover, once no request can still use it: drops this process's descriptor
    /// of the old source by pointing its number at /dev/null (the number stays valid for code
    /// that still holds it, and is not reused for another file).
    fn release_source(&self, old: &Backing) {
        match std::fs::File::open("/dev/null") {
            Ok(null) => {
                use std::os::fd::AsRawFd;
                // Onto a descriptor the engine owns (the old source's), replacing it atomically;
                // no other code closes or reuses that number while it lives.
                if let Err(e) = nix::unistd::dup2(null.as_raw_fd(), old.fd()) {
                    log::warn!("releasing the old source: {}", std::io::Error::from(e));
                }
            }
            Err(e) => log::warn!("releasing the old source: /dev/null: {e}"),
        }
    }

    pub fn serving_target(&self) -> bool {
        self.serving_target.load(Ordering::SeqCst)
    }

    /// Switchover (see [`crate::daemon::control`]): holds new writes, waits for the writes in flight
    /// and for a consistent point with nothing dirty, records the switch in the bitmap, then
    /// serves the target. With `reverse` the old source becomes the mirror's target instead of
    /// being released. Bounded by `limit`; on failure writes resume on the source.
    pub fn switchover(&self, limit: Duration, reverse: bool) -> Result<()> {
        let _one = lock_recovering(&self.switching);
        let t0 = Instant::now();
        if self.serving_target() {
            return Err(Error::config("the device serves its target already"));
        }
        let Some(new_data) = lock_recovering(&self.front_target).clone() else {
            return Err(Error::config(
                "switchover needs a target the device can serve (a file or block device)",
            ));
        };
        if reverse && new_data.size != self.size {
            return Err(Error::config(format!(
                "--reverse needs a target of the source's size: the target is {} bytes, the device {} \
                 (the old source would become the target of a device the target's size); switch over \
                 without --reverse",
                new_data.size, self.size
            )));
        }
        if self.verifier.report().is_some_and(|r| r.state == verify_report::VerifyState::Running) {
            return Err(Error::config("an online verify is running: wait for it (see `status`) and retry"));
        }
        {
            let mut g = self.lock();
            if let Some(r) = &g.progress.gave_up {
                return Err(Error::config(format!("mirroring has stopped ({r}): the target is not current")));
            }
            if g.progress.degraded_since.is_some() {
                return Err(Error::config("the target is failing (degraded): switch over once it has recovered"));
            }
            if self.paused() {
                return Err(Error::config("the mirror is paused: resume it first"));
            }
            g.write_barrier = true;
        }
        self.wake();
        let release = |why: String| -> Result<()> {
            self.lock().write_barrier = false;
            Err(Error::config(why))
        };
        // No write in flight, nothing dirty, the last consistent point current, and no
        // --on-consistent command looking at the target: the target holds every write
        // acknowledged so far, on its medium.
        loop {
            // hook_running under the lock: begin_hook sets it under the lock, and refuses once
            // write_barrier is set, so no command starts after this check finds none.
            let (synced, failed) = {
                let g = self.lock();
                let synced = lifecycle::switchover_ready(&g.state) && !self.hook_running();
                (synced, g.progress.degraded_since.is_some() || g.progress.gave_up.is_some())
            };
            // A target that fails while writes are held will not catch up soon: let them go
            // now rather than at the limit.
            if failed && !synced {
                return release(
                    "the target failed during the switchover (writes were held meanwhile and now resume): \
                     switch over once it has recovered"
                        .to_string(),
                );
            }
            if synced {
                break;
            }
            if t0.elapsed() > limit {
                return release(format!(
                    "the target did not catch up within {}s (writes were held meanwhile and now resume): \
                     try again when `status` says synced",
                    limit.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if reverse {
            return match self.reverse_pair(new_data, t0, limit) {
                Ok(()) => Ok(()),
                Err(why) => release(why),
            };
        }
        // Durable before the switch: a crash from here on must not bring the old pair back.
        let r = lifecycle::record_switchover(&mut self.lock().state, BitmapSwitch::Over);
        if let Err(e) = r {
            return release(format!("recording the switchover in the bitmap: {e}"));
        }
        // From here every new request uses the target (reads and flushes ask serving_target
        // after taking their descriptors; writes are gated on it).
        self.serving_target.store(true, Ordering::SeqCst);
        self.lock().write_barrier = false;
        self.request_stop();
        let old = self.source();
        let drained = self.front.publish(Fds { source: -1, target: new_data.fd() }, Duration::from_secs(10));
        let mirror_gone = self.wait_mirror_parked(Duration::from_secs(10));
        if drained && mirror_gone {
            self.release_source(&old);
        } else {
            log::warn!("switchover: requests or the mirror still use the old source; it stays open until the daemon exits");
        }
        self.events.emit(
            "switched-over",
            serde_json::json!({ "held_ms": t0.elapsed().as_millis() as u64, "released": drained && mirror_gone }),
        );
        Ok(())
    }

    /// The second half of `switchover --reverse`, with writes held and the pair synced: the
    /// target becomes the device's data and the old source the mirror's target. On error
    /// nothing has changed (the caller lets writes resume on the source).
    fn reverse_pair(&self, new_source: Arc<Backing>, t0: Instant, limit: Duration) -> std::result::Result<(), String> {
        let old_source = self.source();
        let new_target = old_source
            .try_clone()
            .map_err(|e| format!("reopening the old source as the new target: {e}"))?;
        // A "same" left by an earlier attempt whose loop never returned (it saw the restart
        // called off in time) must not restart this one's loop before the pair is swapped. No
        // loop waits in mirror_next now: it only waits while a restart is asked for.
        *lock_recovering(&self.mirror_next) = None;
        // The mirror stops using the old pair (and its ring's reference to it) before anything
        // changes; it is synced, so parking it loses nothing.
        self.mirror_restart.store(true, Ordering::SeqCst);
        self.wake();
        // Set before the restart flag is cleared: a loop that returns for the restart (now, or
        // late, after the wait below gave up) then carries on with the same pair. Without it a
        // loop that returned just after the give-up found no next step and no restart asked,
        // and the mirror thread ended for good while the device kept serving.
        let resume_same = |why: String| {
            *lock_recovering(&self.mirror_next) = Some(MirrorNext::Same);
            self.mirror_restart.store(false, Ordering::SeqCst);
            why
        };
        let left = limit.saturating_sub(t0.elapsed()).max(Duration::from_secs(1));
        if !self.wait_mirror_parked(left) {
            return Err(resume_same("the mirror loop did not pause in time; writes resume on the source".into()));
        }
        let h = self.pair();
        let swapped = PairIdentity {
            source: h.target,
            source_fingerprint: h.target_fingerprint,
            target: h.source,
            target_fingerprint: h.source_fingerprint,
        };
        // The new pair is recorded before any write reaches the new source: a crash from here
        // on recovers the new pair (nothing is dirty, and both hold the same data).
        if let Err(e) = lifecycle::record_switchover(&mut self.lock().state, BitmapSwitch::Reverse(swapped.clone())) {
            return Err(resume_same(format!("recording the reversed pair in the bitmap: {e}")));
        }
        *write_lock(&self.source) = new_source;
        if !self.set_front_target(old_source, Duration::from_secs(10)) {
            // Nothing was closed: a request still on the old set reads a file that holds the same data.
            log::warn!("switchover --reverse: a request held the old descriptors for 10 s");
        }
        *lock_recovering(&self.mirror_next) = Some(MirrorNext::Target(Box::new(crate::io::target::FileTarget::new(new_target))));
        self.mirror_restart.store(false, Ordering::SeqCst);
        self.lock().write_barrier = false;
        self.wake();
        self.events.emit(
            "switched-over",
            serde_json::json!({
                "held_ms": t0.elapsed().as_millis() as u64,
                "reverse": true,
                "source": swapped.source,
                "target": swapped.target,
            }),
        );
        Ok(())
    }

    /// Waits until the mirror thread is not running its loop (parked or gone).
    fn wait_mirror_parked(&self, limit: Duration) -> bool {
        let t0 = Instant::now();
        while self.mirror_running.load(Ordering::SeqCst) {
            if t0.elapsed() > limit {
                return false;
            }
            self.wake();
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// The mirror loop should return (to be parked for a target change, or to stop).
    pub fn mirror_should_return(&self) -> bool {
        self.stop_requested() || self.mirror_restart.load(Ordering::SeqCst)
    }

    /// Called by the mirror thread around its loop.
    pub fn set_mirror_running(&self, yes: bool) {
        self.mirror_running.store(yes, Ordering::SeqCst);
    }

    /// Called by the mirror thread after its loop returned: stop, or go on (with the same or
    /// a new target) once a switchover has decided.
    pub fn mirror_next(&self) -> MirrorNext {
        loop {
            if self.stop_requested() {
                return MirrorNext::Stop;
            }
            if let Some(n) = lock_recovering(&self.mirror_next).take() {
                return n;
            }
            if !self.mirror_restart.load(Ordering::SeqCst) {
                // The loop returned without being asked to park: nothing else to do.
                return MirrorNext::Stop;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Ends a write begun with [`Self::begin_request`].
    pub fn end_write_planned(&self, ext: Extent, plan: ActivePlan, source_ok: bool, target_ok: bool) {
        let ActivePlan::Target { id } = plan else { return self.end_write(ext) };
        let mut g = self.lock();
        let wake = g.state.end_active_write(id, source_ok, target_ok);
        g.progress.unsynced_since.get_or_insert_with(Instant::now);
        drop(g);
        if wake {
            self.wake();
        }
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
        }
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
            mode: Some(if c.write_blocking.load(Ordering::SeqCst) { CopyMode::WriteBlocking } else { CopyMode::Background }),
            max_lag_ms: c.max_lag_ms.load(Ordering::SeqCst),
            max_retries: c.max_retries.load(Ordering::SeqCst),
            hook: None,
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
        }
        .name();
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
        let mode = if !self.controls.write_blocking.load(Ordering::SeqCst) && g.progress.lag_forced {
            StatusMode::MaxLag
        } else if self.controls.write_blocking.load(Ordering::SeqCst) {
            StatusMode::WriteBlocking
        } else {
            StatusMode::Background
        }
        .name();
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
    /// Live mirrors clear a region's bit only once it has stayed untouched this long after its
    /// copy reached the target (between 1x and 2x this), so that a region written again soon
    /// does not pay another bitmap flush (md's bitmap daemon does the same). Offline syncs clear
    /// at once.
    pub clear_delay: Duration,
    /// A command to run after consistent points (live mirrors).
    pub on_consistent: Option<OnConsistentCommand>,
}

/// `--on-consistent CMD`: run through `sh -c` after a consistent point, at most once per
/// `interval`, with the target untouched while it runs (no copies, no write-blocking writes),
/// so that it can snapshot the replica. Killed after `timeout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnConsistentCommand {
    pub command: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Extra environment (device id, paths).
    pub env: Vec<(String, String)>,
}

impl Default for CopyConfig {
    fn default() -> Self {
        CopyConfig {
            max_copies: 32,
            buf_size: 1 << 20,
            checkpoint_bytes: 1 << 30,
            checkpoint_interval: Duration::from_secs(10),
            clear_delay: Duration::from_secs(5),
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
