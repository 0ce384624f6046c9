//! The engine: one mirror's shared state (decisions in [`crate::core`], the bitmap, the source)
//! and the entry points the front ends (ublk queues, tests, offline tools) call around their I/O.
//!
//! Threads: each front-end queue has its own io_uring and calls [`Engine::begin_request`] /
//! [`Engine::end_write_planned`] around its source writes (`write_path`); the mirror loop ([`crate::engine::mirror`]) runs on
//! its own thread and ring. All of them share one lock over [`MirrorState`]; nothing under the
//! lock blocks on I/O (bitmap bits are set in the mapped page cache, the flush is issued later
//! on a ring).
//!
//! Around the engine's state: `write_path` (the front ends' entry points), `controls` (live
//! settings), `supervision` (the mirror thread's parking, failures and restarts), `progress`
//! (the figures status shows), `status`, `switchover`, `config`.

pub mod events;
pub mod front;
pub mod mirror;
pub mod on_consistent;
pub mod online_verify;
pub mod queue;
pub mod verify_report;

mod config;
mod controls;
mod progress;
mod ship_pool;
mod status;
mod supervision;
mod switchover;
mod write_path;

pub use config::{alignment_problem, CopyConfig, CopyMode, Settings, DEFAULT_ASYNC_BUFFER};
pub use controls::Controls;
pub use progress::Progress;
pub use supervision::{Failure, MirrorNext};
pub use write_path::{DirectShip, Shipped, WriteAdmission, WriteKind};
pub use on_consistent::OnConsistentCommand;
pub use status::{ShipStatus, Status, StatusMode, StatusState, MODES, STATES};

use crate::io::backing::{AlignedBuf, Backing, DirectMode};
use crate::io::bitmap::{Bitmap, BitmapState, BitmapSwitch, Expect, PairIdentity};
use crate::core::{CoreCounters, Extent, MirrorState};
use crate::error::{Error, Result};
use crate::engine::front::{Fds, FdsHold};
use crate::core::lifecycle;
use crate::io::target::{open_file_target, BoxTarget};
use crate::io::{is_uri, open_target};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
    /// TLS files for an `nbds://` target.
    pub tls: crate::io::nbd::tls::TlsFiles,
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
    /// Async mode: whether the device's queues may issue a shipped write to the target
    /// themselves, and within which limits (see [`ShipGate`]); `None` while no live mirror loop
    /// runs, or it is stopping.
    pub ship_gate: Option<ShipGate>,
    /// The failure of a target write a queue issued itself, for the mirror loop's target-failure
    /// handling (see [`Engine::ship_direct_landed`] and [`Engine::ship_early_done`]).
    pub ship_direct_failure: Option<String>,
}

/// What the live mirror loop lets the device's queues do with shipped writes (see
/// [`Engine::ship_early`]): its flush spacing, kept here by the loop so that a queue reads it
/// under the lock it holds anyway.
#[derive(Clone, Debug)]
pub struct ShipGate {
    /// The loop's flush spacing, as of its last flush: a write is held (not issued) once a
    /// flush should make a point ([`crate::core::policy::ShipSpacing::hold`]).
    pub spacing: crate::core::policy::ShipSpacing,
}

pub struct Engine {
    inner: Mutex<LockedState>,
    /// Async mode: buffers for the bytes of shipped writes, kept for reuse.
    ship_pool: ship_pool::ShipPool,
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
    /// Times [`Engine::lock`] found the lock held (see [`Engine::lock_waits`]).
    lock_waits: AtomicU64,
    /// A wake-up of the mirror loop is on its way: written to the eventfd and not yet taken by
    /// the loop (see [`Engine::wake`]).
    wake_pending: AtomicBool,
    /// Wake-ups written to the eventfd (see [`Engine::loop_wakeups`]).
    wakeups: AtomicU64,
    /// The bitmap file was marked lost (see [`Engine::check_bitmap_lost`]).
    bitmap_lost_marked: AtomicBool,
    /// Shipped writes the device's queues issued to the target themselves (see
    /// [`Engine::ship_early`]).
    ship_direct_writes: AtomicU64,
    /// `ship_direct_failure` holds a failure (read without the lock on every loop pass).
    ship_direct_failed: AtomicBool,
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
    /// Async mode ships only requests whose offset and length are multiples of this (the
    /// target's block size at open; the device's own blocks may be smaller): the target would
    /// refuse the others, failing the queue. They go to the copy instead.
    ship_block: u64,
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
    /// Tests only: while this file exists, the mirror loop panics at its next wake-up (the
    /// daemon's fail-stop). From UBLK_MIRROR_TEST_PANIC_WHILE; see docs/operations.md.
    panic_fault: Option<PathBuf>,
}

/// The environment variable naming the fault file of [`Engine::mirror_fault_injected`].
pub const MIRROR_FAULT_ENV: &str = "UBLK_MIRROR_TEST_FAIL_MIRROR_WHILE";
/// The environment variable naming the fault file of [`Engine::panic_injected`].
pub const PANIC_FAULT_ENV: &str = "UBLK_MIRROR_TEST_PANIC_WHILE";


pub(crate) fn lock_recovering<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are replaced whole, never left half-changed: a panic elsewhere while
    // one was held leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_lock<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    // As lock_recovering: the writer (a reverse switchover) replaces the value whole.
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
            (open_target(&opts.target, opts.direct, &opts.tls)?, "use a larger export".to_string())
        } else {
            crate::io::check_no_tls(&opts.target, &opts.tls)?;
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
        let engine = Self::assemble(source, state, &opts.bitmap, dirty, u64::from(target.block_size()).max(1))?;
        Ok((engine, target, report))
    }

    fn assemble(source: Backing, state: MirrorState<Bitmap>, bitmap: &Path, dirty: u64, ship_block: u64) -> Result<Engine> {
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
            ship_block,
            front: crate::engine::front::FrontFds::new(Fds { source: source.fd(), target: -1 }),
            source: std::sync::RwLock::new(Arc::new(source)),
            front_target: Mutex::new(None),
            switching: Mutex::new(()),
            front_requests: AtomicU64::new(0),
            loop_passes: AtomicU64::new(0),
            lock_waits: AtomicU64::new(0),
            wake_pending: AtomicBool::new(false),
            wakeups: AtomicU64::new(0),
            bitmap_lost_marked: AtomicBool::new(false),
            ship_direct_failed: AtomicBool::new(false),
            ship_direct_writes: AtomicU64::new(0),
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
                ship_gate: None,
                ship_direct_failure: None,
            }),
            ship_pool: ship_pool::ShipPool::default(),
            wake,
            stop: AtomicBool::new(false),
            source_flush_failed: AtomicBool::new(false),
            controls: Controls::default(),
            events: crate::engine::events::EventLog::default(),
            serving_target: AtomicBool::new(false),
            hook_running: AtomicBool::new(false),
            verifier: Default::default(),
            mirror_fault: Mutex::new(std::env::var_os(MIRROR_FAULT_ENV).map(PathBuf::from)),
            panic_fault: std::env::var_os(PANIC_FAULT_ENV).map(PathBuf::from),
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
        let e = Self::assemble(data, state, bitmap, 0, 1)?;
        e.set_front_target(e.source(), Duration::from_secs(1));
        e.serving_target.store(true, Ordering::SeqCst);
        Ok(e)
    }

    /// The lock over the shared state. A poisoned lock means a thread panicked while changing
    /// the state; continuing could clear a bit that must stay, so the process stops instead.
    pub fn lock(&self) -> MutexGuard<'_, LockedState> {
        let r = match self.inner.try_lock() {
            Ok(g) => Ok(g),
            Err(std::sync::TryLockError::WouldBlock) => {
                self.lock_waits.fetch_add(1, Ordering::Relaxed);
                self.inner.lock()
            }
            Err(std::sync::TryLockError::Poisoned(p)) => Err(p),
        };
        match r {
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

    /// Whether the bitmap file can be counted on (`.0`), asked before a bitmap flush counts.
    /// When its mapping lost pages ([`Bitmap::lost`]: it shrank or became unreadable under
    /// the mirror), the file is first marked so that no later start trusts it
    /// ([`Bitmap::mark_lost`], tried again at each flush until it succeeds); the flush counts
    /// only once it is. The first time, the loss is logged and recorded as `last_error`, and
    /// `.1` is the message for the caller's `bitmap-lost` event (emitted once the lock is
    /// released). The mark is I/O under the engine's lock, once: the loss is rare and
    /// everything waits for it anyway (no write may count on its intent before it). The mirror
    /// goes on from its state in memory, which is conservative (lost pages read as dirty);
    /// what is gone is crash safety: after a crash or a stop the pair needs a full sync with a
    /// new bitmap.
    pub(crate) fn check_bitmap_lost(&self, g: &mut LockedState) -> (bool, Option<String>) {
        if !g.state.pbits().lost() || self.bitmap_lost_marked.load(Ordering::SeqCst) {
            return (true, None);
        }
        let path = g.state.pbits().path().display().to_string();
        let mut msg = format!(
            "the bitmap file {path} shrank or became unreadable while in use (truncated by another process, \
             or a failing disk): the mirror goes on from memory, but is not crash-safe; after a stop or \
             crash, re-create the pair with a new bitmap and --sync full"
        );
        let marked = g.state.pbits().mark_lost();
        if let Err(e) = &marked {
            msg.push_str(&format!("; marking the file failed ({e}): writes that need a new bit fail until it works"));
        }
        let first = g.progress.last_error.as_deref() != Some(msg.as_str());
        if first {
            log::error!("{msg}");
            g.progress.last_error = Some(msg.clone());
        }
        self.bitmap_lost_marked.store(marked.is_ok(), Ordering::SeqCst);
        (marked.is_ok(), first.then_some(msg))
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
    /// The front end's descriptors for an operation that is not a request of the device (a
    /// shipped write a queue issues to the target), held until [`Self::front_exit`]: a
    /// switchover waits for it as for a request, but it does not count as the device's activity.
    pub fn front_hold(&self) -> FdsHold {
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

    pub fn events(&self) -> &crate::engine::events::EventLog {
        &self.events
    }

    /// Requests the front end has begun (reads, writes, flushes...): the mirror watches it to
    /// tell whether the device is busy.
    pub fn front_requests(&self) -> u64 {
        self.front_requests.load(Ordering::Relaxed)
    }

    /// How many times a thread (a queue, the mirror loop, a status request) found the state's
    /// lock held by another and waited for it: contention between the front end and the loop,
    /// whose cost on a busy device is a sleep and a wake-up of the waiting thread.
    pub fn lock_waits(&self) -> u64 {
        self.lock_waits.load(Ordering::Relaxed)
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

    /// Wakes the mirror loop (new dirty regions, or a stop request). Callers change what the
    /// loop is to see first: the wake-up makes the loop begin a pass after it.
    ///
    /// One wake-up is written while none is pending: a queue calls this for most writes under
    /// load, and each write to the eventfd is a system call. Skipping is safe by the order of
    /// the flag: the loop clears it ([`Self::wake_taken`]) when its read of the eventfd
    /// completes and before the pass that follows, so a caller that finds it still set changed
    /// the state before that pass began (SeqCst: one order of the swap and the clear).
    pub fn wake(&self) {
        if self.wake_pending.swap(true, Ordering::SeqCst) {
            return;
        }
        self.wake_now();
    }

    /// Writes a wake-up whether or not one is pending: for the loop's own use (its read of the
    /// eventfd must complete before it goes) and a stop request.
    pub(crate) fn wake_now(&self) {
        self.wakeups.fetch_add(1, Ordering::Relaxed);
        // The counter cannot overflow in practice (it is reset by every read); a failed write
        // only means a wake-up is already pending.
        let _ = self.wake.write(1);
    }

    /// The mirror loop took a wake-up (its read of the eventfd completed) or is about to wait
    /// for the first time; its next pass follows. See [`Self::wake`].
    pub(crate) fn wake_taken(&self) {
        self.wake_pending.store(false, Ordering::SeqCst);
    }

    /// How many wake-ups were written to the mirror loop's eventfd (each a system call of the
    /// thread that wrote it, and a pass of the loop): the benchmarks print it per write.
    pub fn loop_wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }
    pub fn wake_fd(&self) -> std::os::unix::io::RawFd {
        use std::os::fd::{AsFd, AsRawFd};
        self.wake.as_fd().as_raw_fd()
    }
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // Written whatever the flag says: a stop is never left to a wake-up thought pending.
        self.wake_now();
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
