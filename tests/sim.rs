//! Deterministic simulation of the mirror's whole lifecycle with crashes of every kind.
//!
//! Drives the real decision code ([`MirrorState`], [`GroupCommit`]) and the real lifecycle code
//! ([`lifecycle::resolve_mode`], [`lifecycle::open_bitmap`]: creating a bitmap, resuming from
//! one) with simulated media: the source, the target and the bitmap files each have a cache and a
//! medium per block, the bitmap's directory has a cached and a durable name entry, and the "OS"
//! writes any cached block (or the directory) to its medium at any moment. Two writer queues with
//! their own group commit, the copy loop (copies read the source at an arbitrary later moment),
//! target flushes (consistent or checkpoint), lazy clearing ticks and application FLUSHes all
//! interleave in a seeded random order; completions come back in any order; bitmap flushes,
//! copies, target flushes and the lifecycle's file operations fail at random.
//!
//! A run starts from one of three pairs: a new pair (a full sync: no bitmap yet, or `--sync
//! full` over an old one), an identical pair (`--sync none`), or a pair with a bitmap of an
//! earlier run (resume). It crashes in the middle of opening, and while serving, with each kind
//! of crash, and restarts through the same lifecycle code:
//! - **power loss**: only the media survive; nothing in flight completes;
//! - **daemon kill**: the media and every page cache survive (bits set in the mapped bitmap,
//!   durable or not); each operation in flight completes or not, before the restart (the new
//!   daemon cannot take the bitmap's lock until the dead one's rings are gone; see
//!   docs/crash-safety.md);
//! - a daemon kill, then later (after the restart) a power loss.
//!
//! After every step, lifecycle operations included, the media are what a power loss would leave,
//! so every step is a crash point and is checked:
//! - the invariant: a clear bit in the bitmap that a power loss would leave under the bitmap's
//!   name (none there: a full sync) implies the target's medium holds the region at least as new
//!   as the source's medium;
//! - data acknowledged before a completed FLUSH is on the source's medium;
//! - write intent: a write reaches the source only when its bit is on the bitmap's medium.
//!
//! At a consistent point the target's medium holds every write acknowledged before it (in async
//! mode: before the last write of the shipped prefix; the queue's later writes are on their way).
//!
//! A run is in background, write-blocking or **async** mode. In async mode nearly every write is
//! planned for shipping through the real [`MirrorState::begin_shipped_write`],
//! `ship_source_done`, `ship_next`, `ship_landed` and the pair flush, and most writes being
//! issued ask `ship_early` to go to the target with their source write (the queue's early
//! shipping; its halves land in any order); FLUSHes close epochs; the
//! buffer is small enough to fill (the queue falls behind, and resumes at a consistent point).
//! While shipping with no copy since it resumed, every step also checks that whatever the OS
//! writes back next, the target's medium is a crash image of the shipped history (no write of
//! an epoch without every write of the earlier ones), and that no write of a later epoch is
//! issued before the earlier one is flushed.
//!
//! Each run
//! ends with a crash of a random kind and a recovery through the lifecycle code, which must
//! converge to target == source.
//!
//! `SIM_RUNS` sets the number of runs (default small for debug builds; CI runs the release
//! build with hundreds of thousands of crash points); `SIM_SEED` replays one run, printed on
//! failure.

#![allow(clippy::needless_range_loop)] // regions index several parallel media arrays
#![allow(clippy::result_large_err)] // the crate's own error type, as in src/lib.rs

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::rc::Rc;
use std::collections::HashMap;
use ublk_mirror::core::ship::{BehindReason, ZEROES};
use ublk_mirror::core::{ActivePlan, Extent, FlushKind, GroupCommit, Intent, MirrorState, PersistentBits, ShipLanded};
use ublk_mirror::core::lifecycle::{self, BitmapFiles, Fill, SyncMode};

const N: u64 = 8;
const QUEUES: usize = 2;

#[derive(Clone)]
struct Media {
    cache: Vec<u64>,
    medium: Vec<u64>,
}

impl Media {
    fn new() -> Self {
        Media { cache: vec![0; N as usize], medium: vec![0; N as usize] }
    }
}

/// One simulated bitmap file: a bit per region in the page cache and on the medium.
struct SimFile {
    cache: Vec<bool>,
    medium: Vec<bool>,
    /// The header (cached, durable): which way round it names the pair, relative to the run's
    /// start (a reverse switchover flips it), and whether the device switched over.
    head: (Head, Head),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
struct Head {
    reversed: bool,
    switched: bool,
}

type FileRef = Rc<RefCell<SimFile>>;

fn new_file(cache: Vec<bool>, medium: Vec<bool>, reversed: bool) -> FileRef {
    let h = Head { reversed, switched: false };
    Rc::new(RefCell::new(SimFile { cache, medium, head: (h, h) }))
}

/// The bits as the daemon sees them: the mapped page cache of the file it opened.
struct SimBits(FileRef);

/// What a switchover records (the real bitmap records the state or the swapped pair).
enum SimSwitch {
    Over,
    Reverse,
}

/// Like the real header write: into the mapped header, then an fdatasync of the whole file.
impl lifecycle::RecordSwitch for SimBits {
    type Switch = SimSwitch;
    fn record_switch(&mut self, s: SimSwitch) -> ublk_mirror::Result<()> {
        let mut f = self.0.borrow_mut();
        match s {
            SimSwitch::Over => f.head.0.switched = true,
            SimSwitch::Reverse => f.head.0.reversed = !f.head.0.reversed,
        }
        f.head.1 = f.head.0;
        f.medium = f.cache.clone();
        Ok(())
    }
}

impl PersistentBits for SimBits {
    fn nregions(&self) -> u64 {
        N
    }
    fn get(&self, r: u64) -> bool {
        self.0.borrow().cache[r as usize]
    }
    fn set(&mut self, r: u64) {
        self.0.borrow_mut().cache[r as usize] = true
    }
    fn clear(&mut self, r: u64) {
        self.0.borrow_mut().cache[r as usize] = false
    }
}

/// The bitmap's directory: the file its name points to as the process sees it (`cache`) and as
/// a power loss would leave it (`medium`), and a temporary file being written.
#[derive(Default)]
struct Dir {
    cache: Option<FileRef>,
    medium: Option<FileRef>,
    temp: Option<FileRef>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Crash {
    /// Only the media survive.
    Power,
    /// The media and the page caches survive; operations in flight complete or not.
    Kill,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WState {
    Waiting,
    Issued,
}

struct Write {
    ext: Extent,
    vers: Vec<u64>,
    state: WState,
    /// An active (write-blocking) write: its id, and once its target half landed, whether it
    /// succeeded.
    active: Option<(u64, Option<bool>)>,
    /// An async write planned for shipping: its id.
    ship: Option<u64>,
    /// Shipped early: issued to the target with its source write (`ship_early`): its queue
    /// entry.
    early: Option<u64>,
}

/// The half of a paired early write that completed first (see `Sim::paired`).
#[derive(Clone, Copy)]
enum Half {
    /// Its source write: the write's id, and whether it succeeded.
    Source(u64, bool),
    /// Its target write: whether it succeeded.
    Target(bool),
}

/// A shipped write issued to the target, not yet landed.
struct InShip {
    seq: u64,
    epoch: u64,
    ext: Extent,
    vers: Vec<u64>,
}

struct Copy {
    ext: Extent,
    read: Option<Vec<u64>>,
}

enum Flush {
    Bitmap { q: usize, seq: u64, snap: Vec<bool>, file: FileRef },
    App { snap: Vec<u64>, acked: Vec<u64> },
    /// The mirror's flush of the pair: the target and the source (see mirror.rs).
    /// `acked`: what a consistent point must hold (in async mode, the writes acknowledged up to
    /// the queue's shipped prefix); `ship_clean`: no shipped write was in flight at its start.
    /// `src_snap`: None for a flush of the target alone (async mode's epoch flushes).
    Pair { kind: FlushKind, snap: Vec<u64>, src_snap: Option<Vec<u64>>, acked: Vec<u64>, ship_clean: bool },
}

struct Sim {
    rng: StdRng,
    s: MirrorState<SimBits>,
    gc: Vec<GroupCommit<usize>>,
    src: Media,
    tgt: Media,
    dir: Dir,
    writes: Vec<Option<Write>>,
    copies: Vec<Copy>,
    evs: Vec<Flush>,
    target_flush_pending: bool,
    ver: u64,
    acked: Vec<u64>,
    flushed_acked: Vec<u64>,
    budget: u32,
    steps: u64,
    consistent_points: u64,
    /// Write-blocking mode: most writes are active.
    active_mode: bool,
    /// Async mode (never with write-blocking): most writes are planned for shipping, with a
    /// replication buffer of `ship_cap` bytes (a region is 100 bytes here).
    async_mode: bool,
    /// Async, one run in five: the device is flushed ten times less often and the loop issues
    /// queued writes a quarter as often, so that writes wait in the queue, often of the open
    /// epoch, which early writes may pass. (Taken from the seed, not the random stream, so that
    /// other seeds run as before.)
    lazy_loop: bool,
    ship_cap: u64,
    /// Async: the bytes of queued writes by handle (their regions and versions).
    ship_data: HashMap<u64, (Extent, Vec<u64>)>,
    next_handle: u64,
    /// Async: queued zeroings (a discard or write-zeroes: handle ZEROES, no buffered bytes) by
    /// queue seq, with what they leave (in this model, a version like any write's).
    zero_data: HashMap<u64, (Extent, Vec<u64>)>,
    /// Async: shipped writes in flight to the target.
    ships: Vec<InShip>,
    /// Async, early writes whose halves the queue keeps to report together, as the device's
    /// queue does (a target half waits for its source half; a source half that completes
    /// first waits for its target half or, at some beginnings of writes, is reported then): by
    /// queue seq, the half that completed first and is not reported yet (the source's write id
    /// and result, or the target's result).
    paired: HashMap<u64, Option<Half>>,
    /// Async: what was acknowledged when each queued write was acknowledged, by queue seq.
    ship_acked: HashMap<u64, Vec<u64>>,
    /// Async: shipping since the last resume with no copy started since: the target's medium
    /// must then always be a crash image of the shipped history (see check_ship_image): its
    /// content at the last clean ship flush (`ship_base`) and the writes issued since.
    pure: bool,
    ship_base: Vec<u64>,
    ship_issued: Vec<InShip>,
    /// Async: crash images checked, times shipping resumed, writes shipped early.
    ship_images: u64,
    ship_resumes: u64,
    ship_early: u64,
    ship_early_past: u64,
    /// Async: the epoch of the writes issued since the last clean ship flush.
    ship_unflushed: Option<u64>,
    /// Crashes still allowed in the middle of the run, and inside opening the bitmap.
    crashes_left: u32,
    open_crashes_left: u32,
    /// Opening crashes after this many more lifecycle operations.
    open_crash_in: Option<u32>,
    /// No write has reached the source since the run started: `--sync none` is still true.
    pair_identical: bool,
    crashes: Vec<(Crash, &'static str)>,
    /// `s` belongs to a running daemon (false between a crash and the next open).
    live: bool,
    /// SIM_TRACE=1 with SIM_SEED: print the media after every step.
    trace: bool,
    /// `src` and `tgt` are the run's original target and source (a reverse switchover swapped
    /// them).
    reversed: bool,
    /// A switchover waits, holding new writes, for this many more steps (and its kind).
    switching: Option<(SimSwitch, u32)>,
    switchovers_left: u32,
    /// Switchovers done (reverse, plain).
    switched: (u32, u32),
    /// A plain switchover ended the run (checked there).
    over: bool,
}

/// An fdatasync that started when a file's blocks were `snap` completes: it wrote every block
/// at some moment after it started, with the block's content at that moment. A block unchanged
/// since the start is on the medium as it is. A block changed since was written with its content
/// at the start or later: the start's only if nothing newer reached the medium meanwhile (an
/// earlier write cannot undo a later one), so a medium holding neither of the two contents (an
/// intermediate one, written back meanwhile) gets the latest. Contents are compared for equality
/// only: after a power loss a region's source may go back to older data, which a copy then writes
/// to the target, so versions do not grow over time.
fn flush_lands<T: std::marker::Copy + PartialEq>(rng: &mut StdRng, cache: &[T], medium: &mut [T], snap: &[T]) {
    for r in 0..cache.len() {
        let now = cache[r];
        let unchanged = now == snap[r];
        let intermediate = medium[r] != now && medium[r] != snap[r];
        // Otherwise the medium holds the start's content (the flush wrote then, or later) or
        // already the latest.
        if unchanged || intermediate || (medium[r] == snap[r] && rng.gen()) {
            medium[r] = now;
        }
    }
}

fn bitmap_flush_lands(rng: &mut StdRng, file: &FileRef, snap: &[bool]) {
    let mut f = file.borrow_mut();
    let f = &mut *f;
    flush_lands(rng, &f.cache, &mut f.medium, snap);
}

/// The lifecycle's file operations over the simulated directory. Each operation is a crash
/// point: the OS may write back any cached block or the directory entry first, the media are
/// checked, and the operation may crash or fail.
struct SimOpen<'a>(&'a mut Sim);

/// An operation that did not happen because the daemon crashed just before it.
const CRASHED: &str = "simulated crash";

impl SimOpen<'_> {
    fn op(&mut self) -> ublk_mirror::Result<()> {
        let sim = &mut *self.0;
        if sim.rng.gen_ratio(1, 2) {
            sim.writeback_dir();
        }
        sim.check_media();
        sim.steps += 1;
        if let Some(n) = sim.open_crash_in.as_mut() {
            if *n == 0 {
                sim.open_crash_in = None;
                return Err(ublk_mirror::Error::config(CRASHED));
            }
            *n -= 1;
        }
        if sim.rng.gen_ratio(1, 40) {
            return Err(ublk_mirror::Error::config("injected failure"));
        }
        Ok(())
    }
}

impl BitmapFiles for SimOpen<'_> {
    type Bits = SimBits;

    fn exists(&self) -> bool {
        self.0.dir.cache.is_some()
    }
    fn write_temp(&mut self, fill: Fill) -> ublk_mirror::Result<()> {
        self.op()?;
        // Never synced, the medium holds no bit (the worst a power loss can leave).
        let bits = vec![fill == Fill::Dirty; N as usize];
        let reversed = self.0.reversed;
        self.0.dir.temp = Some(new_file(bits, vec![false; N as usize], reversed));
        Ok(())
    }
    fn sync_temp(&mut self) -> ublk_mirror::Result<()> {
        self.op()?;
        if let Some(t) = &self.0.dir.temp {
            let mut f = t.borrow_mut();
            f.medium = f.cache.clone();
        }
        Ok(())
    }
    fn rename_temp(&mut self) -> ublk_mirror::Result<()> {
        self.op()?;
        if let Some(t) = self.0.dir.temp.take() {
            self.0.dir.cache = Some(t);
        }
        Ok(())
    }
    fn sync_dir(&mut self) -> ublk_mirror::Result<()> {
        self.op()?;
        self.0.dir.medium = self.0.dir.cache.clone();
        Ok(())
    }
    fn discard_temp(&mut self) {
        self.0.dir.temp = None;
    }
    fn open(&mut self, _created: bool) -> ublk_mirror::Result<SimBits> {
        self.op()?;
        let f = self.0.dir.cache.clone().ok_or_else(|| ublk_mirror::Error::config("no bitmap"))?;
        Ok(SimBits(f))
    }
    fn sync(&mut self, bits: &SimBits) -> ublk_mirror::Result<()> {
        self.op()?;
        let mut f = bits.0.borrow_mut();
        f.medium = f.cache.clone();
        Ok(())
    }
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let placeholder = MirrorState::new(N, SimBits(new_file(vec![false; N as usize], vec![false; N as usize], false)));
        let active_mode = rng.gen_ratio(1, 2);
        let async_mode = !active_mode && rng.gen_ratio(2, 3);
        let ship_cap = rng.gen_range(100..=600);
        let crashes_left = rng.gen_range(0..=2);
        let open_crashes_left = rng.gen_range(0..=2);
        let switchovers_left = rng.gen_range(0..=2);
        Sim {
            budget: rng.gen_range(5..40),
            rng,
            s: placeholder,
            gc: (0..QUEUES).map(|_| GroupCommit::default()).collect(),
            src: Media::new(),
            tgt: Media::new(),
            dir: Dir::default(),
            writes: Vec::new(),
            copies: Vec::new(),
            evs: Vec::new(),
            target_flush_pending: false,
            ver: 0,
            acked: vec![0; N as usize],
            flushed_acked: vec![0; N as usize],
            steps: 0,
            consistent_points: 0,
            active_mode,
            async_mode,
            lazy_loop: async_mode && seed % 5 == 1,
            ship_cap,
            ship_data: HashMap::new(),
            next_handle: 0,
            zero_data: HashMap::new(),
            ships: Vec::new(),
            paired: HashMap::new(),
            ship_acked: HashMap::new(),
            pure: false,
            ship_base: vec![0; N as usize],
            ship_issued: Vec::new(),
            ship_images: 0,
            ship_early: 0,
            ship_early_past: 0,
            ship_resumes: 0,
            ship_unflushed: None,
            crashes_left,
            open_crashes_left,
            open_crash_in: None,
            pair_identical: true,
            crashes: Vec::new(),
            live: false,
            trace: std::env::var("SIM_TRACE").is_ok(),
            reversed: false,
            switching: None,
            switchovers_left,
            switched: (0, 0),
            over: false,
        }
    }

    /// The pair as the user brings it, and the first open. Data written before the mirror
    /// existed has versions 1..=20 and is on the media.
    fn start(&mut self) {
        let old = 20;
        self.ver = old;
        for r in 0..N as usize {
            self.src.medium[r] = self.rng.gen_range(0..=old);
        }
        let requested = match self.rng.gen_range(0..4) {
            // A new pair: the target holds older data or nothing; no bitmap, or `--sync full`
            // over an old bitmap of this pair.
            0 => {
                for r in 0..N as usize {
                    self.tgt.medium[r] = if self.rng.gen() { 0 } else { self.rng.gen_range(0..=self.src.medium[r]) };
                }
                if self.rng.gen() {
                    // The old bitmap was right for the pair (as a bitmap of any pair is for the
                    // state it left): it covers every region that differs.
                    let bits: Vec<bool> =
                        (0..N as usize).map(|r| self.tgt.medium[r] < self.src.medium[r] || self.rng.gen()).collect();
                    let f = new_file(bits.clone(), bits, false);
                    self.dir.cache = Some(f.clone());
                    self.dir.medium = Some(f);
                    Some(SyncMode::Full)
                } else if self.rng.gen() {
                    Some(SyncMode::Full)
                } else {
                    None
                }
            }
            // An identical pair, declared so.
            1 => {
                self.tgt.medium = self.src.medium.clone();
                Some(SyncMode::AssumeIdentical)
            }
            // A pair with the bitmap of an earlier run: the regions that differ have their bit
            // set, and some others too.
            _ => {
                let mut bits = vec![false; N as usize];
                for r in 0..N as usize {
                    if self.rng.gen_ratio(1, 3) {
                        bits[r] = true;
                        self.tgt.medium[r] = self.rng.gen_range(0..=self.src.medium[r]);
                    } else {
                        self.tgt.medium[r] = self.src.medium[r];
                        bits[r] = self.rng.gen_ratio(1, 5);
                    }
                }
                let f = new_file(bits.clone(), bits, false);
                self.dir.cache = Some(f.clone());
                self.dir.medium = Some(f);
                *[None, Some(SyncMode::Resume), Some(SyncMode::Full)].get(self.rng.gen_range(0..3)).unwrap_or(&None)
            }
        };
        self.src.cache = self.src.medium.clone();
        self.tgt.cache = self.tgt.medium.clone();
        self.acked = self.src.medium.clone();
        self.flushed_acked = self.src.medium.clone();
        self.check_media();
        self.open(requested);
        self.clearing_policy();
        self.start_shipping();
    }

    /// The daemon's clearing policy, drawn at each start: lazy clearing or not, and intent
    /// extents of 1 (none), 2 or 4 regions (independently: the engine pairs extents with lazy
    /// clearing, but the rules hold for any combination).
    fn clearing_policy(&mut self) {
        self.s.set_lazy_clearing(self.rng.gen());
        self.s.set_intent_extent([1, 2, 4][self.rng.gen_range(0..3)]);
    }

    /// Async mode: the daemon applies its settings at start; shipping begins at the first
    /// consistent point.
    fn start_shipping(&mut self) {
        if !self.async_mode {
            return;
        }
        let freed = self.s.set_shipping(Some(self.ship_cap));
        assert!(freed.is_empty(), "a new daemon's queue held writes");
        if self.s.ship().is_some_and(|q| q.shipping()) {
            self.resumed();
        }
    }

    /// Shipping (re)starts: the target's medium is the source's as of now.
    fn resumed(&mut self) {
        self.ship_resumes += 1;
        self.pure = true;
        self.ship_base = self.tgt.medium.clone();
        self.ship_issued.clear();
    }

    /// Frees the buffers the state handed back.
    fn free(&mut self, handles: &[u64]) {
        for h in handles {
            self.ship_data.remove(h);
        }
    }

    /// Opens the bitmap through the real lifecycle code, as `add`, `up` or `recover` do, until it
    /// succeeds: a crash inside it is followed by a restart, a failure by the user trying again.
    fn open(&mut self, mut requested: Option<SyncMode>) {
        for _ in 0..50 {
            if self.open_crashes_left > 0 && self.rng.gen_ratio(1, 2) {
                self.open_crashes_left -= 1;
                self.open_crash_in = Some(self.rng.gen_range(0..6));
            }
            let exists = self.dir.cache.is_some();
            // The user names the pair the way the bitmap does (the real open refuses the other
            // order: "it belongs to another pair").
            if let Some(h) = self.dir.cache.as_ref().map(|f| f.borrow().head.0) {
                if h.reversed != self.reversed {
                    std::mem::swap(&mut self.src, &mut self.tgt);
                    self.reversed = h.reversed;
                }
            }
            let r = lifecycle::resolve_mode(requested, exists, &|| "sim".into())
                .and_then(|mode| lifecycle::open_bitmap(&mut SimOpen(self), mode));
            self.open_crash_in = None;
            match r {
                Ok(o) => {
                    self.s = o.state;
                    self.live = true;
                    self.check_media();
                    return;
                }
                Err(e) if e.to_string().contains(CRASHED) => {
                    let kind = if self.rng.gen() { Crash::Power } else { Crash::Kill };
                    self.crashes.push((kind, "opening"));
                    self.crash(kind);
                }
                Err(_) => {}
            }
            // After a crash the user runs the same command again, or one without --sync.
            if self.rng.gen() {
                requested = None;
            }
            if requested == Some(SyncMode::AssumeIdentical) && !self.pair_identical {
                requested = None;
            }
            if requested == Some(SyncMode::Resume) && self.dir.cache.is_none() {
                requested = None;
            }
        }
        panic!("opening the bitmap never succeeded");
    }

    /// The daemon dies. What survives depends on the kind (see the module's doc); either way
    /// the daemon's memory (the decision state, queues, copies) is gone.
    fn crash(&mut self, kind: Crash) {
        self.live = false;
        match kind {
            Crash::Kill => {
                // Operations in flight complete or not, before the restart takes the lock.
                for ev in std::mem::take(&mut self.evs) {
                    if !self.rng.gen::<bool>() {
                        continue;
                    }
                    match ev {
                        Flush::Bitmap { snap, file, .. } => bitmap_flush_lands(&mut self.rng, &file, &snap),
                        Flush::App { snap, .. } => flush_lands(&mut self.rng, &self.src.cache, &mut self.src.medium, &snap),
                        Flush::Pair { snap, src_snap, .. } => {
                            flush_lands(&mut self.rng, &self.tgt.cache, &mut self.tgt.medium, &snap);
                            if let Some(src_snap) = src_snap {
                                flush_lands(&mut self.rng, &self.src.cache, &mut self.src.medium, &src_snap);
                            }
                        }
                    }
                    self.check_media();
                }
                for c in std::mem::take(&mut self.copies) {
                    if let (Some(read), true) = (c.read, self.rng.gen()) {
                        for (r, v) in c.ext.regions().zip(read) {
                            self.tgt.cache[r as usize] = v;
                        }
                    }
                }
                for sh in std::mem::take(&mut self.ships) {
                    if self.rng.gen() {
                        for (r, v) in sh.ext.regions().zip(sh.vers) {
                            self.tgt.cache[r as usize] = v;
                        }
                    }
                }
                for w in self.writes.iter().flatten() {
                    if w.state == WState::Issued && matches!(w.active, Some((_, None))) && self.rng.gen() {
                        for (i, r) in w.ext.regions().enumerate() {
                            self.tgt.cache[r as usize] = w.vers[i];
                        }
                    }
                }
            }
            Crash::Power => {
                self.src.cache = self.src.medium.clone();
                self.tgt.cache = self.tgt.medium.clone();
                for f in [&self.dir.cache, &self.dir.medium, &self.dir.temp].into_iter().flatten() {
                    let mut f = f.borrow_mut();
                    f.cache = f.medium.clone();
                    f.head.0 = f.head.1;
                }
                {
                    let mut f = self.s.pbits().0.borrow_mut();
                    f.cache = f.medium.clone();
                    f.head.0 = f.head.1;
                }
                self.dir.cache = self.dir.medium.clone();
                self.dir.temp = None;
                // Acknowledged but never flushed: the application cannot count on it.
                for r in 0..N as usize {
                    self.acked[r] = self.acked[r].min(self.src.cache[r]);
                }
            }
        }
        self.writes.clear();
        self.copies.clear();
        self.evs.clear();
        self.ships.clear();
        self.paired.clear();
        self.ship_data.clear();
        self.zero_data.clear();
        self.ship_acked.clear();
        self.ship_issued.clear();
        self.ship_unflushed = None;
        self.pure = false;
        self.switching = None;
        self.gc = (0..QUEUES).map(|_| GroupCommit::default()).collect();
        self.target_flush_pending = false;
        self.check_media();
    }

    /// A crash while serving, then the restart (`recover`, or `add` with the same bitmap).
    fn crash_and_restart(&mut self) {
        let kind = if self.rng.gen_ratio(2, 3) { Crash::Kill } else { Crash::Power };
        self.crashes.push((kind, "serving"));
        self.crash(kind);
        let requested = if self.rng.gen_ratio(1, 4) { Some(SyncMode::Full) } else { None };
        self.open(requested);
        self.clearing_policy();
        self.start_shipping();
    }

    fn fail_p(&mut self) -> bool {
        self.rng.gen_ratio(1, 12)
    }


    fn issue(&mut self, w: usize) {
        let Some(wr) = self.writes[w].as_mut() else { return };
        // Versions are given when the data lands in the source's cache, so that later data is
        // always a higher version (two overlapping writes may be issued in any order).
        wr.vers.clear();
        let ext = wr.ext;
        for r in ext.regions() {
            assert!(
                self.s.pbits().0.borrow().medium[r as usize],
                "write intent: region {r} written before its bit was on the medium"
            );
        }
        let Some(wr) = self.writes[w].as_mut() else { return };
        for r in ext.regions() {
            self.ver += 1;
            self.src.cache[r as usize] = self.ver;
            wr.vers.push(self.ver);
        }
        wr.state = WState::Issued;
        self.pair_identical = false;
        self.try_ship_early(w);
    }

    /// Async: a shipped write being issued may go to the target with its source write (the
    /// queue's early shipping, when it can reach the target), if the real queue lets it.
    fn try_ship_early(&mut self, w: usize) {
        let Some(wr) = self.writes[w].as_ref() else { return };
        let Some(id) = wr.ship else { return };
        // Most writes that may go early do (a queue that can reach the target always tries);
        // some stay with the loop, as when a queue cannot (an NBD target).
        if self.ships.len() >= 4 || self.rng.gen_ratio(1, 8) {
            return;
        }
        let (ext, vers) = (wr.ext, wr.vers.clone());
        let handle = self.next_handle;
        self.next_handle += 1;
        let hold = self.rng.gen_ratio(1, 4);
        let queued = self.s.ship().map_or(0, |q| q.queued());
        let Some(sh) = self.s.ship_early(id, handle, 4, hold) else { return };
        if queued > 0 {
            self.ship_early_past += 1;
        }
        assert_eq!((sh.id, sh.off), (id, ext.start * 100), "the early write is not the one issued");
        if let Some(e) = self.ship_unflushed {
            assert!(sh.epoch <= e, "shipping: early write {} of epoch {} issued before epoch {e} was flushed", sh.seq, sh.epoch);
        }
        self.ship_unflushed = Some(sh.epoch);
        self.ship_data.insert(handle, (ext, vers.clone()));
        // A consistent point whose prefix ends here holds what was acknowledged before it was
        // issued (writes then in flight on the source may be missing: a crash image).
        self.ship_acked.insert(sh.seq, self.acked.clone());
        if self.pure {
            self.ship_issued.push(InShip { seq: sh.seq, epoch: sh.epoch, ext, vers: vers.clone() });
        }
        self.ships.push(InShip { seq: sh.seq, epoch: sh.epoch, ext, vers });
        if let Some(wr) = self.writes[w].as_mut() {
            wr.early = Some(sh.seq);
        }
        // Most early writes are reported as the device's queue does, both halves at once; some
        // as each half completes (a queue that could not keep them together).
        if self.rng.gen_ratio(3, 4) {
            self.paired.insert(sh.seq, None);
        }
        self.ship_early += 1;
    }

    fn start_bitmap_flush(&mut self, q: usize) {
        let seq = self.s.bitmap_flush_started();
        self.gc[q].started(seq);
        let snap = (0..N).map(|r| self.s.pbits().get(r)).collect();
        let file = self.s.pbits().0.clone();
        self.evs.push(Flush::Bitmap { q, seq, snap, file });
    }
    fn new_write(&mut self) {
        if self.switching.is_some() {
            return; // held by the switchover
        }
        // The device's queue reports the source halves it kept with the next write's beginning
        // (before its overlap checks); here, at some beginnings.
        if self.rng.gen() {
            let mut due: Vec<(u64, u64, bool)> = self
                .paired
                .iter()
                .filter_map(|(&seq, h)| match h {
                    Some(Half::Source(id, ok)) => Some((seq, *id, *ok)),
                    _ => None,
                })
                .collect();
            // In queue order: the map's iteration order would make a run depend on more than its seed.
            due.sort_unstable();
            for (seq, id, ok) in due {
                self.paired.remove(&seq);
                let out = self.s.ship_early_source_done(id, ok);
                self.free(&out.freed);
                if out.fell_behind.is_some() {
                    self.pure = false;
                }
            }
        }
        self.budget -= 1;
        let start = self.rng.gen_range(0..N);
        let count = self.rng.gen_range(1..=2u64).min(N - start);
        let ext = Extent { start, count };
        let vers = Vec::new();
        let q = self.rng.gen_range(0..QUEUES);
        let w = self.writes.len();
        // In async mode nearly every write is shipped, so that shipping runs long between the
        // copies that interrupt its checks (see check_ship_image).
        let planned = (self.active_mode && self.rng.gen_ratio(3, 4)) || (self.async_mode && self.rng.gen_ratio(15, 16));
        // Byte ranges are whole regions: two writes to one region overlap.
        let (intent, plan) = if planned && self.active_mode {
            self.s.begin_active_write(ext, start * 100, count * 100)
        } else if planned {
            self.s.begin_shipped_write(ext, start * 100, count * 100)
        } else {
            (self.s.begin_write(ext), ActivePlan::SourceOnly)
        };
        let (active, ship) = match plan {
            ActivePlan::Target { id } => (Some((id, None)), None),
            ActivePlan::Ship { id } => (None, Some(id)),
            ActivePlan::SourceOnly => (None, None),
        };
        self.writes.push(Some(Write { ext, vers, state: WState::Waiting, active, ship, early: None }));
        match intent {
            Intent::Ready => self.issue(w),
            Intent::Wait { seq } => {
                if self.gc[q].wait(seq, w) {
                    self.start_bitmap_flush(q);
                }
            }
        }
    }

    /// Async: the loop issues the next shipped write the queue allows, or one in flight lands
    /// (or fails), in any order.
    fn ship_step(&mut self) {
        if self.rng.gen() && self.ships.len() < 2 {
            let hold = self.rng.gen_ratio(1, 4);
            let Some(sh) = self.s.ship_next(2, hold) else { return };
            let data = if sh.handle == ZEROES { self.zero_data.remove(&sh.seq) } else { self.ship_data.get(&sh.handle).cloned() };
            let (ext, vers) = data.expect("a queued write's data");
            assert_eq!(ext.start * 100, sh.off, "the queue's write is not the one buffered");
            // Rule 1 of the shipping order, seen from outside: nothing of a later epoch is issued
            // while an earlier one is not durable on the target.
            if let Some(e) = self.ship_unflushed {
                assert!(sh.epoch <= e, "shipping: write {} of epoch {} issued before epoch {e} was flushed", sh.seq, sh.epoch);
            }
            self.ship_unflushed = Some(sh.epoch);
            let w = InShip { seq: sh.seq, epoch: sh.epoch, ext, vers };
            if self.pure {
                self.ship_issued.push(InShip { seq: w.seq, epoch: w.epoch, ext: w.ext, vers: w.vers.clone() });
            }
            self.ships.push(w);
            return;
        }
        if self.ships.is_empty() {
            return;
        }
        let i = self.rng.gen_range(0..self.ships.len());
        let sh = self.ships.swap_remove(i);
        let ok = !self.fail_p();
        if ok {
            for (r, v) in sh.ext.regions().zip(&sh.vers) {
                self.tgt.cache[r as usize] = *v;
            }
        }
        let out = match self.paired.get_mut(&sh.seq) {
            // Its source write is in flight: the landing waits for it (end).
            Some(half @ None) => {
                *half = Some(Half::Target(ok));
                return;
            }
            Some(Some(Half::Source(id, source_ok))) => {
                let (id, source_ok) = (*id, *source_ok);
                self.paired.remove(&sh.seq);
                self.report_both(id, source_ok, sh.seq, ok)
            }
            _ => self.s.ship_landed(sh.seq, ok),
        };
        self.free(&out.freed);
        if out.fell_behind.is_some() {
            self.pure = false;
        }
    }

    /// Both halves of an early write, reported at once (Engine::ship_early_done).
    fn report_both(&mut self, id: u64, source_ok: bool, seq: u64, target_ok: bool) -> ShipLanded {
        let mut out = self.s.ship_early_source_done(id, source_ok);
        let landed = self.s.ship_landed(seq, target_ok);
        out.freed.extend(landed.freed);
        out.fell_behind = out.fell_behind.or(landed.fell_behind);
        out
    }

    /// Async, shipping with no copy since it resumed: whatever the OS writes back next, the
    /// target's medium must be a crash image of the shipped history. Each region may reach the
    /// medium with its cached or its current medium content; each must be the content of the
    /// last clean ship flush or of a write issued since; and no choice may show a write of one
    /// epoch while missing (holding older content than) a write of an earlier epoch issued
    /// since, in another region.
    fn check_ship_image(&mut self) {
        if !self.live || !self.pure || !self.s.ship().is_some_and(|q| q.shipping()) {
            return;
        }
        self.ship_images += 1;
        // For each region, what it may show: None for the base content, else (seq, epoch).
        let mut cands: Vec<Vec<Option<(u64, u64)>>> = vec![Vec::new(); N as usize];
        for r in 0..N as usize {
            for m in [self.tgt.medium[r], self.tgt.cache[r]] {
                let from = self.ship_issued.iter().find(|w| w.ext.regions().zip(&w.vers).any(|(x, &v)| x as usize == r && v == m));
                match from {
                    Some(w) => cands[r].push(Some((w.seq, w.epoch))),
                    None => {
                        assert_eq!(
                            m, self.ship_base[r],
                            "shipping: region {r} of the target holds {m}, neither its content at the last ship flush nor a write issued since"
                        );
                        cands[r].push(None);
                    }
                }
            }
        }
        for w in &self.ship_issued {
            for r in w.ext.regions().map(|r| r as usize) {
                let can_miss = cands[r].iter().any(|c| c.is_none_or(|(seq, _)| seq < w.seq));
                if !can_miss {
                    continue;
                }
                for (r2, cs) in cands.iter().enumerate() {
                    if r2 != r && cs.iter().flatten().any(|&(_, e)| e > w.epoch) {
                        panic!(
                            "shipping: the target may hold region {r2} from epoch > {} without write {} (epoch {}) in region {r}: not a crash image",
                            w.epoch, w.seq, w.epoch
                        );
                    }
                }
            }
        }
    }

    /// The target half of an issued active write lands (or fails), at any moment after issue
    /// and in any order with copies: a late one may overwrite newer data in the target's cache.
    fn land_target_half(&mut self) {
        let pending: Vec<usize> = (0..self.writes.len())
            .filter(|&i| matches!(&self.writes[i], Some(w) if w.state == WState::Issued && matches!(w.active, Some((_, None)))))
            .collect();
        if pending.is_empty() {
            return;
        }
        let w = pending[self.rng.gen_range(0..pending.len())];
        let ok = !self.fail_p();
        let Some(wr) = self.writes[w].as_mut() else { return };
        if ok {
            for (i, r) in wr.ext.regions().enumerate() {
                self.tgt.cache[r as usize] = wr.vers[i];
            }
        }
        if let Some((_, done)) = wr.active.as_mut() {
            *done = Some(ok);
        }
    }

    fn end(&mut self, wr: Write, source_ok: bool) {
        if let (Some(id), Some(seq)) = (wr.ship, wr.early) {
            // Its target half lands on its own (ship_step); the write lands with both. A paired
            // write's source half is reported with its target half: now if that completed, else
            // when it does (the application's write completes either way).
            let out = match self.paired.get_mut(&seq) {
                Some(half @ None) => {
                    *half = Some(Half::Source(id, source_ok));
                    return;
                }
                Some(Some(Half::Target(target_ok))) => {
                    let target_ok = *target_ok;
                    self.paired.remove(&seq);
                    self.report_both(id, source_ok, seq, target_ok)
                }
                _ => self.s.ship_early_source_done(id, source_ok),
            };
            self.free(&out.freed);
            if out.fell_behind.is_some() {
                self.pure = false;
            }
            return;
        }
        if let Some(id) = wr.ship {
            // Async: the source write completed; queue a copy of its data (or, failed, end it).
            // One in eight is a zeroing (a discard or write-zeroes): no buffered bytes.
            let zeroing = self.rng.gen_ratio(1, 8);
            let handle = if zeroing { ZEROES } else { self.next_handle };
            if !zeroing {
                self.next_handle += 1;
                if source_ok {
                    self.ship_data.insert(handle, (wr.ext, wr.vers.clone()));
                }
            }
            let out = self.s.ship_source_done(id, source_ok, handle);
            if !out.queued && !zeroing {
                self.ship_data.remove(&handle);
            }
            if let (true, Some(seq)) = (zeroing, out.seq) {
                self.zero_data.insert(seq, (wr.ext, wr.vers.clone()));
            }
            self.free(&out.freed);
            if out.fell_behind.is_some() {
                self.pure = false;
            }
            if let Some(seq) = out.seq {
                // The write is acknowledged right after (complete_write updates acked first).
                self.ship_acked.insert(seq, self.acked.clone());
            }
            return;
        }
        match wr.active {
            Some((id, done)) => {
                self.s.end_active_write(id, source_ok, done.unwrap_or(false));
            }
            None => {
                self.s.end_write(wr.ext);
            }
        }
    }

    fn complete_write(&mut self) {
        let issued: Vec<usize> = (0..self.writes.len())
            .filter(|&i| {
                matches!(&self.writes[i], Some(w) if w.state == WState::Issued && !matches!(w.active, Some((_, None))))
            })
            .collect();
        if issued.is_empty() {
            return;
        }
        let w = issued[self.rng.gen_range(0..issued.len())];
        let Some(wr) = self.writes[w].take() else { return };
        for (i, r) in wr.ext.regions().enumerate() {
            // Acknowledged: the application now relies on it (after a FLUSH, durably).
            self.acked[r as usize] = self.acked[r as usize].max(wr.vers[i]);
        }
        self.end(wr, true);
    }

    fn complete_event(&mut self) {
        if self.evs.is_empty() {
            return;
        }
        let i = self.rng.gen_range(0..self.evs.len());
        let ok = !self.fail_p();
        match self.evs.swap_remove(i) {
            Flush::Bitmap { q, seq, snap, file } => {
                if ok {
                    bitmap_flush_lands(&mut self.rng, &file, &snap);
                }
                self.s.bitmap_flush_done(seq, ok);
                let s = &self.s;
                let step = self.gc[q].completed(ok, |x| s.intent_durable(x));
                for w in step.ready {
                    self.issue(w);
                }
                for w in step.failed {
                    // Never issued: the write fails with EIO and changes nothing.
                    if let Some(wr) = self.writes[w].take() {
                        self.end(wr, false);
                    }
                }
                if step.start_flush {
                    self.start_bitmap_flush(q);
                }
            }
            Flush::App { snap, acked } => {
                if ok {
                    flush_lands(&mut self.rng, &self.src.cache, &mut self.src.medium, &snap);
                    for r in 0..N as usize {
                        self.flushed_acked[r] = self.flushed_acked[r].max(acked[r]);
                    }
                }
            }
            Flush::Pair { kind, snap, src_snap, acked, ship_clean } => {
                if ok {
                    flush_lands(&mut self.rng, &self.tgt.cache, &mut self.tgt.medium, &snap);
                    if let Some(src_snap) = &src_snap {
                        flush_lands(&mut self.rng, &self.src.cache, &mut self.src.medium, src_snap);
                    }
                } else {
                    // Linux drops pages whose writeback failed and reports the error once: any
                    // target page not yet on the medium may be gone for good.
                    for r in 0..N as usize {
                        if self.rng.gen() {
                            self.tgt.cache[r] = self.tgt.medium[r];
                        }
                    }
                }
                let out = self.s.target_flush_done(ok);
                self.target_flush_pending = false;
                if !ok {
                    // The loop treats a failed pair flush as a target failure.
                    let (freed, _) = self.s.ship_fall_behind(BehindReason::TargetFailed);
                    self.free(&freed);
                    self.pure = false;
                }
                if ok && ship_clean {
                    self.ship_unflushed = None;
                }
                if ok && self.pure && ship_clean {
                    // Nothing was issued during it and no copy ran: the medium is the snapshot.
                    assert_eq!(self.tgt.medium, snap, "a clean ship flush left the medium other than its start");
                    self.ship_base = snap.clone();
                    self.ship_issued.clear();
                }
                if out.resumed {
                    self.resumed();
                }
                if ok && kind == FlushKind::Consistent {
                    assert!(out.consistent);
                    self.consistent_points += 1;
                    for r in 0..N as usize {
                        assert!(
                            self.tgt.medium[r] >= acked[r],
                            "consistent point: region {r} lacks a write acknowledged before it"
                        );
                    }
                }
            }
        }
    }

    fn writeback(&mut self) {
        let r = self.rng.gen_range(0..N) as usize;
        match self.rng.gen_range(0..4) {
            0 => self.src.medium[r] = self.src.cache[r],
            1 => self.tgt.medium[r] = self.tgt.cache[r],
            2 => self.writeback_dir(),
            _ => {
                let mut f = self.s.pbits().0.borrow_mut();
                f.medium[r] = f.cache[r];
            }
        }
    }

    /// The OS writes back the directory entry or a block of any bitmap file.
    fn writeback_dir(&mut self) {
        let r = self.rng.gen_range(0..N) as usize;
        match self.rng.gen_range(0..3) {
            0 => self.dir.medium = self.dir.cache.clone(),
            1 => {
                if let Some(t) = &self.dir.temp {
                    let mut f = t.borrow_mut();
                    f.medium[r] = f.cache[r];
                }
            }
            _ => {
                if let Some(t) = &self.dir.cache {
                    let mut f = t.borrow_mut();
                    f.medium[r] = f.cache[r];
                }
            }
        }
    }

    fn mirror_step(&mut self) {
        match self.rng.gen_range(0..5) {
            0 if self.copies.len() < 3 => {
                let max = self.rng.gen_range(1..=3);
                if let Some(ext) = self.s.next_copy(max) {
                    self.copies.push(Copy { ext, read: None });
                    // A copy reads the source as it is now: the shipped history alone no longer
                    // describes the target until shipping resumes.
                    self.pure = false;
                }
            }
            1 if !self.copies.is_empty() => {
                let i = self.rng.gen_range(0..self.copies.len());
                let c = &mut self.copies[i];
                if c.read.is_none() {
                    c.read = Some(c.ext.regions().map(|r| self.src.cache[r as usize]).collect());
                }
            }
            2 if !self.copies.is_empty() => {
                let i = self.rng.gen_range(0..self.copies.len());
                if self.copies[i].read.is_some() {
                    let c = self.copies.swap_remove(i);
                    let ok = !self.fail_p();
                    if ok {
                        for (r, v) in c.ext.regions().zip(c.read.unwrap_or_default()) {
                            self.tgt.cache[r as usize] = v;
                        }
                    }
                    self.s.copy_done(c.ext, ok);
                }
            }
            3 if !self.target_flush_pending
                && (self.s.consistent_point_due() || self.s.checkpoint_possible() || self.s.ship_flush_due(self.rng.gen(), self.rng.gen())) =>
            {
                // Async mode flushes the target alone at most epoch boundaries; the core must
                // stay safe whichever flush goes without the source, so any may here.
                let with_source = !self.async_mode || self.rng.gen();
                let kind = if with_source { self.s.target_flush_started() } else { self.s.target_only_flush_started() };
                self.target_flush_pending = true;
                // Async: a consistent point holds what was acknowledged up to the shipped
                // prefix (the queue's writes after it are on their way); everything else
                // acknowledged was copied (nothing is dirty at a consistent point).
                let acked = match self.s.ship().filter(|q| q.queued() > 0) {
                    Some(q) => q
                        .prefix_end()
                        .checked_sub(1)
                        .and_then(|p| self.ship_acked.get(&p).cloned())
                        .unwrap_or_else(|| self.ship_base.clone()),
                    None => self.acked.clone(),
                };
                self.evs.push(Flush::Pair {
                    kind,
                    snap: self.tgt.cache.clone(),
                    src_snap: with_source.then(|| self.src.cache.clone()),
                    acked,
                    ship_clean: self.ships.is_empty(),
                });
            }
            4 => {
                self.s.clear_tick();
            }
            _ => {}
        }
    }

    fn step(&mut self) {
        match self.rng.gen_range(0..10) {
            0 | 1 if self.budget > 0 => self.new_write(),
            2 => self.complete_write(),
            7 if self.active_mode => self.land_target_half(),
            3 | 4 => self.complete_event(),
            5 => self.writeback(),
            6 if self.rng.gen_ratio(1, if self.lazy_loop { 20 } else if self.async_mode { 2 } else { 3 }) => {
                // A FLUSH arriving at the device closes the async epoch.
                self.s.ship_device_flush();
                self.evs.push(Flush::App { snap: self.src.cache.clone(), acked: self.acked.clone() })
            }
            7 if self.async_mode && (!self.lazy_loop || self.rng.gen_ratio(1, 4)) => self.ship_step(),
            8 if self.crashes_left > 0 && self.rng.gen_ratio(1, 30) => {
                self.crashes_left -= 1;
                self.crash_and_restart();
            }
            9 if self.switching.is_none() && self.switchovers_left > 0 && self.rng.gen_ratio(1, 15) => {
                self.switchovers_left -= 1;
                let kind = if self.rng.gen_ratio(3, 4) { SimSwitch::Reverse } else { SimSwitch::Over };
                self.switching = Some((kind, 80));
            }
            _ => self.mirror_step(),
        }
        self.try_switchover();
        self.steps += 1;
        self.check_media();
        self.check_ship_image();
    }

    /// A switchover waiting for the pair (new writes held, see new_write) goes once the real
    /// `switchover_ready` says so, through the real `record_switchover`; it gives up after its
    /// steps. The application's and the mirror's flushes in flight land first (they belong to
    /// the old roles; the engine's would flush the old descriptors, which changes nothing).
    fn try_switchover(&mut self) {
        let Some((_, left)) = self.switching.as_mut() else { return };
        if *left == 0 {
            self.switching = None;
            return;
        }
        *left -= 1;
        if !lifecycle::switchover_ready(&self.s) || self.evs.iter().any(|e| !matches!(e, Flush::Bitmap { .. })) {
            return;
        }
        let Some((kind, _)) = self.switching.take() else { return };
        let reverse = matches!(kind, SimSwitch::Reverse);
        if lifecycle::record_switchover(&mut self.s, kind).is_err() {
            return;
        }
        if reverse {
            // The engine fdatasyncs the old source before it becomes the target (async mode's
            // last consistent point may have flushed the target alone).
            self.src.medium = self.src.cache.clone();
            // From now on the old target is the device's data and the old source the mirror's
            // target: both hold the same data (ready), and the bitmap says so.
            std::mem::swap(&mut self.src, &mut self.tgt);
            // The queue is idle (ready): the shipped history starts again on the new target.
            if self.pure {
                self.ship_base = self.tgt.medium.clone();
                self.ship_issued.clear();
                self.ship_unflushed = None;
            }
            self.reversed = !self.reversed;
            self.switched.0 += 1;
            return;
        }
        // The device serves the target alone: it must hold every acknowledged write, on its
        // medium, whatever crash comes next; and a restart must find the switch recorded (so it
        // serves the target, through the real recover path, rather than the stale source).
        self.switched.1 += 1;
        for r in 0..N as usize {
            assert_eq!(self.tgt.medium[r], self.src.cache[r], "switchover: region {r} is not on the target's medium");
        }
        let data = self.tgt.medium.clone();
        let kind = if self.rng.gen() { Crash::Kill } else { Crash::Power };
        self.crashes.push((kind, "switched over"));
        self.crash(kind);
        let f = self.dir.cache.clone().expect("a bitmap under its name after a switchover");
        assert!(f.borrow().head.0.switched, "a crash after the switchover brought the old pair back");
        let bits = SimBits(f);
        lifecycle::trusted_state(bits, |b| {
            let mut f = b.0.borrow_mut();
            f.medium = f.cache.clone();
            Ok(())
        })
        .expect("recover after the switchover");
        assert_eq!(self.tgt.medium, data);
        self.over = true;
    }

    /// What a power loss at this instant would leave must be recoverable: the bitmap under the
    /// bitmap's name on the medium (none: the next start is a full sync) covers every region
    /// where the target's medium is behind the source's.
    fn check_media(&self) {
        if self.trace {
            let bm = |f: &Option<FileRef>| f.as_ref().map(|f| f.borrow().medium.iter().map(|&b| b as u8).collect::<Vec<_>>());
            eprintln!(
                "step {}: src {:?}/{:?} tgt {:?}/{:?} bm-name-medium {:?} crashes {:?}",
                self.steps, self.src.cache, self.src.medium, self.tgt.cache, self.tgt.medium, bm(&self.dir.medium), self.crashes
            );
        }
        if self.live {
            self.s.check_invariants().unwrap_or_else(|e| panic!("core invariant: {e}"));
        }
        let on_medium = self.dir.medium.as_ref().map(|f| f.borrow().medium.clone());
        for r in 0..N as usize {
            let bit = on_medium.as_ref().is_none_or(|m| m[r]);
            assert!(
                bit || self.tgt.medium[r] == self.src.medium[r],
                "region {r}: bit clear on the medium, target medium {} differs from source medium {} (crashes so far: {:?})",
                self.tgt.medium[r],
                self.src.medium[r],
                self.crashes
            );
            assert!(
                self.src.medium[r] >= self.flushed_acked[r],
                "region {r}: data acknowledged before a completed FLUSH is not on the source medium"
            );
        }
    }

    /// The last crash, of a random kind, and the recovery through the lifecycle code: a resync
    /// of what the bitmap says, with the real decision code, must end with target == source.
    fn crash_and_recover(&mut self) {
        let kind = if self.rng.gen() { Crash::Kill } else { Crash::Power };
        self.crashes.push((kind, "final"));
        self.crash(kind);
        self.open(None);
        for _ in 0..100 {
            while let Some(ext) = self.s.next_copy(N) {
                for r in ext.regions() {
                    self.tgt.cache[r as usize] = self.src.cache[r as usize];
                }
                self.s.copy_done(ext, true);
            }
            if self.s.consistent_point_due() {
                self.s.target_flush_started();
                self.tgt.medium = self.tgt.cache.clone();
                self.s.target_flush_done(true);
                self.s.clear_eligible();
            }
            if self.s.is_synced() {
                break;
            }
        }
        assert!(self.s.is_synced(), "recovery did not converge");
        assert_eq!(self.s.persistent_count(), 0, "bits left after recovery");
        assert_eq!(self.tgt.cache, self.src.cache, "after recovery the target differs from the source (crashes: {:?})", self.crashes);
    }
}

/// What a run went through: steps (each a crash point), consistent points, and its crashes.
struct RunStats {
    steps: u64,
    consistent: u64,
    crashes: Vec<(Crash, &'static str)>,
    /// Switchovers: reverse, plain.
    switched: (u32, u32),
    /// Async: crash images of the shipped history checked, times shipping resumed, writes
    /// shipped early.
    ship_images: u64,
    ship_resumes: u64,
    ship_early: u64,
    /// Of them, issued while the loop's queue still held writes (of the same epoch).
    ship_early_past: u64,
}

fn run(seed: u64, steps: u64) -> RunStats {
    let mut sim = Sim::new(seed);
    sim.start();
    let crash_at = sim.rng.gen_range(1..=steps);
    for _ in 0..crash_at {
        sim.step();
        if sim.over {
            break;
        }
    }
    if !sim.over {
        sim.crash_and_recover();
    }
    RunStats {
        steps: sim.steps,
        consistent: sim.consistent_points,
        crashes: sim.crashes,
        switched: sim.switched,
        ship_images: sim.ship_images,
        ship_resumes: sim.ship_resumes,
        ship_early: sim.ship_early,
        ship_early_past: sim.ship_early_past,
    }
}

#[test]
fn crashes_anywhere_are_recoverable() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(seed) = env("SIM_SEED") {
        run(seed, 400);
        return;
    }
    let runs = env("SIM_RUNS").unwrap_or(if cfg!(debug_assertions) { 2_000 } else { 20_000 });
    let base = env("SIM_BASE").unwrap_or(0x5eed);
    let t0 = std::time::Instant::now();
    let (mut points, mut consistent) = (0u64, 0u64);
    // Crashes by kind and place; a kill followed by a power loss in the same run.
    let mut kinds = std::collections::BTreeMap::<String, u64>::new();
    let mut kill_then_power = 0u64;
    let (mut reversed, mut switched_over) = (0u64, 0u64);
    let (mut ship_images, mut ship_resumes, mut ship_early, mut ship_early_past) = (0u64, 0u64, 0u64, 0u64);
    for i in 0..runs {
        let seed = base + i;
        match std::panic::catch_unwind(|| run(seed, 400)) {
            Ok(st) => {
                points += st.steps;
                consistent += st.consistent;
                reversed += st.switched.0 as u64;
                switched_over += st.switched.1 as u64;
                ship_images += st.ship_images;
                ship_resumes += st.ship_resumes;
                ship_early += st.ship_early;
                ship_early_past += st.ship_early_past;
                for (k, at) in &st.crashes {
                    *kinds.entry(format!("{k:?} while {at}")).or_default() += 1;
                }
                if let Some(first_kill) = st.crashes.iter().position(|c| c.0 == Crash::Kill) {
                    if st.crashes[first_kill..].iter().any(|c| c.0 == Crash::Power) {
                        kill_then_power += 1;
                    }
                }
            }
            Err(e) => {
                eprintln!("simulation failed with seed {seed}: replay with SIM_SEED={seed} cargo test --test sim");
                std::panic::resume_unwind(e);
            }
        }
    }
    let kinds_text: Vec<String> = kinds.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    println!(
        "sim: {runs} runs, {points} crash points checked, {consistent} consistent points, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    println!("sim: crashes: {}; runs with a kill then a power loss: {kill_then_power}", kinds_text.join(", "));
    println!("sim: switchovers: {reversed} reverse, {switched_over} plain (a plain one is followed by a crash at once)");
    println!(
        "sim: async: shipping resumed {ship_resumes} times, {ship_images} target media checked as crash images of the shipped history, {ship_early} writes shipped early, {ship_early_past} of them past queued writes"
    );
    assert!(points >= runs, "runs did nothing");
    assert!(consistent > 0, "no run reached a consistent point: the simulation is not exercising the mirror");
    // Every kind of crash, at every place, must have happened (with enough runs to expect it).
    if runs >= 1000 {
        for k in ["Kill while opening", "Power while opening", "Kill while serving", "Power while serving", "Kill while final", "Power while final"] {
            assert!(kinds.get(k).copied().unwrap_or(0) > 0, "no run had a crash '{k}': the simulation is not exercising it");
        }
        assert!(kill_then_power > 0, "no run had a daemon kill followed by a power loss");
        assert!(reversed > 0 && switched_over > 0, "no switchover of each kind: {reversed} reverse, {switched_over} plain");
        assert!(
            ship_resumes > 0 && ship_images > runs && ship_early > runs / 100 && ship_early_past >= (runs / 2000).max(1),
            "async mode hardly exercised: {ship_resumes} resumes, {ship_images} images, {ship_early} early writes, {ship_early_past} past queued ones"
        );
    }
}
