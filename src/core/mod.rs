//! The mirror's decisions, with no I/O in them.
//!
//! Everything that decides *what a write waits for*, *what to copy next*, *when to flush the
//! target* and *which persistent bits to clear* lives here, as plain state transitions. The
//! production engine drives them with io_uring; a simulator (or a property test) drives them with
//! simulated media and injected crashes. Neither has a copy of this logic.
//!
//! The rules are those of docs/crash-safety.md (md's write-intent bitmap, dm-log and DRBD's
//! activity log follow the same ones), not the ordering of the 2012 drive-mirror design:
//!
//! 1. **Write intent.** A write, discard or write-zeroes to region `r` is issued to the source only
//!    once `bit(r)` is durable on the bitmap's medium. [`MirrorState::begin_write`] sets the bit in
//!    the bitmap's cache and says which bitmap flush the caller must wait for; writers that find
//!    the bit already durable do not wait. A bitmap flush covers every bit set before it *started*
//!    (see [`MirrorState::bitmap_flush_started`]), so concurrent first writers share one flush.
//! 2. **No erasing in-flight intent.** A persistent bit is cleared only after a target flush, and
//!    only for regions whose last copy completed before that flush started and that have seen no
//!    write begin or complete and no new copy start since then.
//!
//! Invariant (checked by the simulator and the property tests): for every region,
//! `bit(r)` on the bitmap's medium, or the target's medium holds `r` at least as new as the
//! source's medium.

pub mod lifecycle;
pub mod pagebits;
pub mod policy;
pub mod ship;

use crate::core::pagebits::PagedBits;
use bitvec::prelude::*;
use crate::core::ship::{BehindReason, ShipQueue, Shipment};
use std::collections::HashMap;

/// A set of `n` regions, all clear. Its memory comes zeroed from the allocator (for large sets,
/// fresh pages that cost no RAM until written): most of the state's sets stay empty or small,
/// and a device of many TiB must not pay for each of them in full.
pub fn zeroed(n: u64) -> BitVec<u64, Lsb0> {
    let mut b = BitVec::from_vec(vec![0u64; n.div_ceil(64) as usize]);
    b.truncate(n as usize);
    b
}

/// Storage for the persistent bits as the process sees them (the bitmap file's page cache, or a
/// simulated cache). Durability is not this trait's business: the engine flushes the medium.
pub trait PersistentBits {
    /// Number of regions (bits).
    fn nregions(&self) -> u64;
    fn get(&self, r: u64) -> bool;
    fn set(&mut self, r: u64);
    fn clear(&mut self, r: u64);
    /// The bits of regions `[s, e)`, indexed from `s`. Implementations that hold the bits in
    /// memory copy them a word at a time (a device of many TiB has hundreds of millions).
    fn load(&self, s: u64, e: u64) -> BitVec<u64, Lsb0> {
        (s..e).map(|r| self.get(r)).collect()
    }
    /// Clears regions `[s, e)`.
    fn clear_range(&mut self, s: u64, e: u64) {
        for r in s..e {
            self.clear(r);
        }
    }
}

/// Pieces of runs that range operations take at once: 128 KiB of bits.
const RUN_PIECE: usize = 1 << 20;

/// Persistent bits held in memory: for simulators and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemBits(pub BitVec<u64, Lsb0>);

impl MemBits {
    pub fn new(n: u64) -> Self {
        MemBits(zeroed(n))
    }
}

impl PersistentBits for MemBits {
    fn nregions(&self) -> u64 {
        self.0.len() as u64
    }
    fn load(&self, s: u64, e: u64) -> BitVec<u64, Lsb0> {
        self.0[s as usize..e as usize].to_bitvec()
    }
    fn clear_range(&mut self, s: u64, e: u64) {
        self.0[s as usize..e as usize].fill(false)
    }
    fn get(&self, r: u64) -> bool {
        self.0[r as usize]
    }
    fn set(&mut self, r: u64) {
        self.0.set(r as usize, true)
    }
    fn clear(&mut self, r: u64) {
        self.0.set(r as usize, false)
    }
}

/// A run of regions `[start, start + count)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub count: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.count
    }
    pub fn regions(&self) -> std::ops::Range<u64> {
        self.start..self.end()
    }
}

/// What a writer must do before issuing its I/O to the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intent {
    /// Every touched bit is already durable: issue now.
    Ready,
    /// Wait until a bitmap flush that started at sequence `>= seq` has completed.
    Wait { seq: u64 },
}

/// Why a target flush is being made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushKind {
    /// Nothing was dirty and nothing was being copied when it started: once it completes, the
    /// target's medium is a crash image of the source as of that start.
    Consistent,
    /// Progress made durable in the middle of a sync, so that an interruption does not recopy
    /// finished regions. The target is not a consistent image at this point.
    Checkpoint,
}

/// Result of a completed target flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlushOutcome {
    /// The flush marked a consistent point.
    pub consistent: bool,
    /// Persistent bits cleared (in the bitmap's cache).
    pub cleared: u64,
    /// Bits made eligible for lazy clearing instead.
    pub deferred: u64,
    /// Regions made dirty again because the flush failed.
    pub redirtied: u64,
    /// Async mode: shipping resumed at this consistent point (it was behind).
    pub resumed: bool,
}

/// What an active (write-blocking) write does besides writing the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivePlan {
    /// Write the same data to the target at the same time; pass `id` to
    /// [`MirrorState::end_active_write`]. If both writes succeed, the region can stay clean.
    Target { id: u64 },
    /// Do not write the target: the region is dirty or being copied, another write overlaps
    /// this one, or a consistent flush is running. The write is an ordinary one (the region
    /// becomes dirty and the mirror copies it); end it with [`MirrorState::end_write`].
    SourceOnly,
    /// Async mode: once on the source, the write is queued for the target
    /// ([`MirrorState::ship_source_done`]); the mirror loop ships it in order
    /// ([`crate::core::ship`]). If it is shipped and lands, its regions need no copy.
    Ship { id: u64 },
}

#[derive(Debug)]
struct ActiveWrite {
    ext: Extent,
    /// Byte range, to detect overlapping writes (the source and the target could apply two
    /// overlapping writes in different orders).
    off: u64,
    end: u64,
    /// Something made the target's copy of this write untrustworthy: an overlapping write, a
    /// copy of its region started meanwhile, a failed target flush. It ends as an ordinary write.
    tainted: bool,
    /// Shipped (async mode): its target write is ordered by the replication queue. Otherwise
    /// a write-blocking write, whose target write runs beside its source write.
    shipped: bool,
}

#[derive(Debug)]
struct TargetFlush {
    kind: FlushKind,
    /// Regions whose copy completed before the flush started and that nothing has touched since.
    regions: PagedBits,
    /// Regions a copy may have written to the target since the last successful flush started,
    /// as of this flush's start.
    written: PagedBits,
}

/// Counters the state keeps; the engine adds times and rates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreCounters {
    pub consistent_points: u64,
    pub checkpoints: u64,
    pub copy_errors: u64,
    pub target_flush_errors: u64,
    pub bitmap_flushes: u64,
}

/// The shared state of one mirror: one instance per device, behind the engine's lock.
pub struct MirrorState<P: PersistentBits> {
    nregions: u64,
    pbits: P,
    /// Regions written since their last copy started (the mirror's to-do list).
    to_copy: PagedBits,
    dirty: u64,
    copying: PagedBits,
    copying_count: u64,
    /// Regions whose copy completed and that nothing touched since; cleared into a target flush.
    copied: PagedBits,
    flush: Option<TargetFlush>,
    /// Lazy clearing (rule 3): regions whose bit may be cleared, aged by [`Self::clear_tick`].
    /// A bit becomes clear between one and two ticks after its region became eligible, unless a
    /// write or copy touches the region first. Without it, a region written every few seconds
    /// would pay a bitmap flush on every write, as the mirror keeps catching up with it.
    lazy: bool,
    /// Regions per intent extent (a power of two; 1: none). A write that finds its region's bit
    /// clear sets the bits of the whole aligned extent in the same bitmap flush, so that the
    /// extent's other regions take writes without a flush of their own (DRBD's activity-log
    /// extents, md's large bitmap chunks). Those extra bits are stale from the start: they go to
    /// `copied`, and the next target flush makes them eligible for clearing.
    intent_extent: u64,
    /// Regions a copy may have written to the target since the start of the last successful
    /// target flush (or of the current one). A failed fdatasync may have dropped any of those
    /// pages for good (Linux reports a writeback error once, then forgets the pages), so a
    /// failure dirties them all again, not only the failed flush's own set.
    written: PagedBits,
    /// Copies in flight when a target flush failed: their result cannot be trusted.
    poisoned: PagedBits,
    eligible_young: PagedBits,
    eligible_old: PagedBits,
    /// Writes in flight per region (begin_write .. end_write). Small: bounded by queue depth.
    inflight: HashMap<u64, u32>,
    /// Regions an online verify is reading; any write, copy or redirtying removes them (then
    /// the comparison proves nothing and the region is skipped).
    watched: PagedBits,
    /// Active (write-blocking) writes in flight that also go to the target, and async writes
    /// not yet landed on the target, by id.
    active: HashMap<u64, ActiveWrite>,
    /// How many of `active` are tainted.
    tainted: usize,
    /// How many of `active` cover each region (see [`SourceHalves`] for why a write looks at
    /// this before it iterates `active`).
    active_regions: HashMap<u64, u32>,
    /// How many of `active` are write-blocking writes (not shipped): a shipped write looks for
    /// overlaps among them only if there are any (async mode begins one per write, and
    /// `active` holds every shipped write until it lands).
    blocking: usize,
    /// Async mode: the replication queue (created when the mode is first asked for).
    ship: Option<ShipQueue>,
    /// Async mode is on: the queue may resume after falling behind.
    ship_on: bool,
    /// Async writes whose source write is in flight, by id: their byte ranges (a write that
    /// overlaps one of them could be applied in either order by the source).
    ship_src: SourceHalves,
    /// Async writes shipped early (issued to the target with their source write, see
    /// [`Self::ship_early`]) whose source write is in flight: their queue entry, by id.
    ship_early: HashMap<u64, u64>,
    next_active: u64,
    /// Regions whose bit was set in the cache but is not yet known durable, with the sequence
    /// number of that set. A bit is durable exactly when it is set and not in this map.
    pending: HashMap<u64, u64>,
    set_seq: u64,
    durable_seq: u64,
    /// Persistent bits set in the cache (kept as they change: `status` reads it under the lock
    /// that every write takes, and must not walk the device).
    pcount: u64,
    cursor: u64,
    /// A write completed or a copy finished since the last consistent flush started.
    changed: bool,
    counters: CoreCounters,
}

/// Marks an active write as untrustworthy for the target, counting it once.
fn taint(w: &mut ActiveWrite, tainted: &mut usize) {
    if !w.tainted {
        w.tainted = true;
        *tainted += 1;
    }
}

/// What [`MirrorState::ship_source_done`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ShipPush {
    /// The write is queued: its buffer is the queue's until it lands. Otherwise the caller frees
    /// it (the write ended as an ordinary one).
    pub queued: bool,
    /// Its place in the queue, if queued.
    pub seq: Option<u64>,
    /// The queue fell behind: these buffers are no longer queued and are freed by the caller.
    pub freed: Vec<u64>,
    pub fell_behind: Option<BehindReason>,
    /// The mirror had nothing to do and should be woken.
    pub wake: bool,
}

/// Counts (`add`) or uncounts the regions of `ext` in `counts`, which holds only regions whose
/// count is not zero.
fn count_regions(counts: &mut HashMap<u64, u32>, ext: Extent, add: bool) {
    use std::collections::hash_map::Entry;
    for r in ext.regions() {
        match (counts.entry(r), add) {
            (e, true) => *e.or_default() += 1,
            (Entry::Occupied(mut e), false) => {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
            // Never counted: nothing to take back (the callers uncount what they counted).
            (Entry::Vacant(_), false) => {}
        }
    }
}

/// Async writes whose source write is in flight (see `MirrorState::ship_src`), by id, with the
/// regions they cover counted: a write looks for byte overlaps only among those that share a
/// region with it. Iterating a map costs its capacity, not its length, and a queue depth of
/// writes begun and ended all the time keeps that at a few hundred entries for some 30 writes in
/// flight (measured): iterating on every write would be the costliest part of its beginning.
#[derive(Default)]
struct SourceHalves {
    /// By id: the byte range and the regions.
    by_id: HashMap<u64, (u64, u64, Extent)>,
    /// By region: how many of them cover it.
    regions: HashMap<u64, u32>,
}

impl SourceHalves {
    fn insert(&mut self, id: u64, off: u64, end: u64, ext: Extent) {
        if let Some((_, _, old)) = self.by_id.insert(id, (off, end, ext)) {
            self.uncount(old);
        }
        count_regions(&mut self.regions, ext, true);
    }

    fn uncount(&mut self, ext: Extent) {
        count_regions(&mut self.regions, ext, false);
    }

    fn remove(&mut self, id: u64) -> Option<(u64, u64)> {
        let (off, end, ext) = self.by_id.remove(&id)?;
        self.uncount(ext);
        Some((off, end))
    }

    fn get(&self, id: u64) -> Option<(u64, u64)> {
        self.by_id.get(&id).map(|&(o, e, _)| (o, e))
    }

    /// The ids of those whose bytes overlap `[off, end)` (in regions `ext`).
    fn overlapping(&self, ext: Extent, off: u64, end: u64) -> Vec<u64> {
        if !ext.regions().any(|r| self.regions.contains_key(&r)) {
            return Vec::new();
        }
        self.by_id.iter().filter(|(_, &(o, oe, _))| o < end && off < oe).map(|(&id, _)| id).collect()
    }

    /// The region counts match the writes.
    fn check(&self) -> Result<(), String> {
        let mut want = HashMap::new();
        for &(_, _, ext) in self.by_id.values() {
            count_regions(&mut want, ext, true);
        }
        if want != self.regions {
            return Err("the regions of shipped writes in flight on the source drifted".into());
        }
        Ok(())
    }
}

/// What [`MirrorState::ship_landed`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ShipLanded {
    /// Buffers to free (the landed write's, and the queue's if it fell behind).
    pub freed: Vec<u64>,
    pub fell_behind: Option<BehindReason>,
    pub wake: bool,
}

impl ShipLanded {
    /// Adds what `other` did to this.
    pub fn absorb(&mut self, other: ShipLanded) {
        self.freed.extend(other.freed);
        self.fell_behind = self.fell_behind.or(other.fell_behind);
        self.wake |= other.wake;
    }
}

impl<P: PersistentBits> MirrorState<P> {
    /// Builds the state from the persistent bits as found on the medium.
    ///
    /// The caller guarantees that `pbits` is what the medium holds (it flushes the bitmap once
    /// before calling this: [`crate::core::lifecycle::trusted_state`]), so every set bit is durable and
    /// every set bit is work to do: after a crash, those are exactly the regions that may differ.
    pub fn new(nregions: u64, pbits: P) -> Self {
        // Every set bit is durable (the caller's guarantee) and work to do. Loaded in pieces:
        // the set keeps whole pages of set or clear bits as one entry each, and a copy of the
        // whole bitmap would cost its full size at once.
        let mut to_copy = PagedBits::new(nregions as usize);
        for s in (0..nregions).step_by(RUN_PIECE) {
            let e = (s + RUN_PIECE as u64).min(nregions);
            to_copy.or_bits_at(s as usize, &pbits.load(s, e));
        }
        let dirty = to_copy.count_ones() as u64;
        MirrorState {
            pcount: dirty,
            nregions,
            to_copy,
            pbits,
            dirty,
            copying: PagedBits::new(nregions as usize),
            copying_count: 0,
            copied: PagedBits::new(nregions as usize),
            flush: None,
            lazy: false,
            intent_extent: 1,
            written: PagedBits::new(nregions as usize),
            poisoned: PagedBits::new(nregions as usize),
            eligible_young: PagedBits::new(nregions as usize),
            eligible_old: PagedBits::new(nregions as usize),
            inflight: HashMap::new(),
            active: HashMap::new(),
            blocking: 0,
            active_regions: HashMap::new(),
            tainted: 0,
            ship: None,
            ship_on: false,
            ship_src: SourceHalves::default(),
            ship_early: HashMap::new(),
            next_active: 0,
            watched: PagedBits::new(nregions as usize),
            pending: HashMap::new(),
            set_seq: 0,
            durable_seq: 0,
            cursor: 0,
            changed: true,
            counters: CoreCounters::default(),
        }
    }

    pub fn nregions(&self) -> u64 {
        self.nregions
    }
    pub fn pbits(&self) -> &P {
        &self.pbits
    }
    pub fn pbits_mut(&mut self) -> &mut P {
        &mut self.pbits
    }
    /// Regions waiting to be copied.
    pub fn dirty(&self) -> u64 {
        self.dirty
    }
    /// Regions being copied now.
    pub fn copying(&self) -> u64 {
        self.copying_count
    }
    pub fn writes_in_flight(&self) -> usize {
        self.inflight.len()
    }
    pub fn counters(&self) -> CoreCounters {
        self.counters
    }
    pub fn needs_copy(&self, r: u64) -> bool {
        self.to_copy.get(r as usize)
    }
    pub fn has_write_in_flight(&self, r: u64) -> bool {
        self.inflight.contains_key(&r)
    }
    pub fn target_flush_in_progress(&self) -> bool {
        self.flush.is_some()
    }
    /// Nothing dirty, nothing copying, no target flush pending and the last consistent point is
    /// still current.
    pub fn is_synced(&self) -> bool {
        self.dirty == 0
            && self.copying_count == 0
            && !self.changed
            && self.flush.is_none()
            && !self.stale_target_writes()
            && self.ship.as_ref().is_none_or(|q| q.idle())
    }

    /// A tainted active write is in flight: its target write may still land over newer data
    /// (an overlapping write that completed since, or a copy), so the target cannot be called
    /// consistent until it ends (and its region is copied again).
    fn stale_target_writes(&self) -> bool {
        self.tainted > 0
    }

    fn mark_to_copy(&mut self, r: u64) {
        if !self.to_copy.get(r as usize) {
            self.to_copy.set(r as usize, true);
            self.dirty += 1;
        }
    }

    /// Something happened to `r` after its last copy: neither the next nor the in-progress
    /// target flush may clear its bit on the strength of that copy.
    fn disturb(&mut self, r: u64) {
        self.watched.set(r as usize, false);
        self.copied.set(r as usize, false);
        self.eligible_young.set(r as usize, false);
        self.eligible_old.set(r as usize, false);
        if let Some(f) = self.flush.as_mut() {
            f.regions.set(r as usize, false);
        }
    }

    /// [`Self::disturb`] for the regions `[s, e)`, a page or a word at a time.
    fn disturb_range(&mut self, s: usize, e: usize) {
        self.watched.fill(s, e, false);
        self.copied.fill(s, e, false);
        self.eligible_young.fill(s, e, false);
        self.eligible_old.fill(s, e, false);
        if let Some(f) = self.flush.as_mut() {
            f.regions.fill(s, e, false);
        }
    }

    /// A write (or discard, or write-zeroes) to regions `ext` is about to be issued.
    ///
    /// Counts it in flight and sets the persistent bits in the cache. The caller may issue the
    /// I/O only once [`Intent::Ready`] holds, i.e. after waiting for the bitmap flush named by
    /// [`Intent::Wait`]. Must be paired with [`Self::end_write`], whatever happens.
    pub fn begin_write(&mut self, ext: Extent) -> Intent {
        let mut need = 0u64;
        for r in ext.regions() {
            *self.inflight.entry(r).or_insert(0) += 1;
            self.disturb(r);
            // (Most writes find no bit pending at all: no lookup then.)
            let pending = if self.pending.is_empty() { None } else { self.pending.get(&r).copied() };
            if let Some(seq) = pending {
                need = need.max(seq);
            } else if self.pbits.get(r) {
                // Set and not pending: durable.
                continue;
            } else {
                // Clear in the cache (a set bit that is not durable is always in `pending`).
                self.set_intent(r);
                if self.intent_extent > 1 {
                    self.set_extent_intent(r, &ext);
                }
                need = need.max(self.set_seq);
            }
        }
        if need > self.durable_seq {
            Intent::Wait { seq: need }
        } else {
            Intent::Ready
        }
    }

    /// Sets `r`'s bit in the cache, pending until the next bitmap flush that starts.
    fn set_intent(&mut self, r: u64) {
        self.pbits.set(r);
        self.pcount += 1;
        self.set_seq += 1;
        self.pending.insert(r, self.set_seq);
    }

    /// Sets the bits of the intent extent around `r` (clear ones, outside the write `ext`, which
    /// sets its own). A clear bit means the region is idle and the target holds it (nothing in
    /// flight, to copy or copying has its bit clear), so setting it is only a stale bit: the
    /// region goes to `copied`, for the next target flush to clear like a copied one. A write
    /// that reaches it before that finds the bit set and waits only if it is still pending.
    fn set_extent_intent(&mut self, r: u64, ext: &Extent) {
        let a = r / self.intent_extent * self.intent_extent;
        let e = (a + self.intent_extent).min(self.nregions);
        let bits = self.pbits.load(a, e);
        for i in bits.iter_zeros() {
            let x = a + i as u64;
            if ext.regions().contains(&x) {
                continue;
            }
            debug_assert!(!self.to_copy.get(x as usize) && !self.inflight.contains_key(&x));
            self.set_intent(x);
            self.copied.set(x as usize, true);
        }
    }

    /// Regions per intent extent (rounded down to a power of two; 0 or 1: none). Takes effect
    /// for the next first write to a clean region.
    pub fn set_intent_extent(&mut self, regions: u64) {
        self.intent_extent = if regions <= 1 { 1 } else { 1 << regions.ilog2() };
    }

    /// Has a bitmap flush covering sequence `seq` completed?
    pub fn intent_durable(&self, seq: u64) -> bool {
        seq <= self.durable_seq
    }

    /// A bitmap flush (fdatasync of the bitmap file) is about to be issued. Returns the sequence
    /// it covers: every bit set in the cache up to now. Call this before issuing the flush, under
    /// the same lock as [`Self::begin_write`], so that no bit set later can claim to be covered.
    pub fn bitmap_flush_started(&mut self) -> u64 {
        self.set_seq
    }

    /// The bitmap flush that started at `seq` completed. On success, every bit set up to `seq`
    /// and still set is durable. A failed flush changes nothing: waiters must fail or retry.
    pub fn bitmap_flush_done(&mut self, seq: u64, ok: bool) {
        if !ok {
            return;
        }
        self.counters.bitmap_flushes += 1;
        if seq > self.durable_seq {
            self.durable_seq = seq;
        }
        // Bits set up to `seq` are durable now: they leave `pending`. (A pending bit cannot have
        // been cleared: clearing requires no write in flight, and the writer that set it stays
        // in flight until end_write.)
        self.pending.retain(|_, &mut s| s > seq);
    }

    /// The write begun by [`Self::begin_write`] on `ext` completed (successfully or not, issued or
    /// not). Returns true if the mirror had nothing to do before and should be woken.
    pub fn end_write(&mut self, ext: Extent) -> bool {
        let was_idle = self.dirty == 0;
        for r in ext.regions() {
            match self.inflight.get_mut(&r) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    self.inflight.remove(&r);
                }
                None => debug_assert!(false, "end_write without begin_write on region {r}"),
            }
            self.disturb(r);
            self.mark_to_copy(r);
        }
        self.changed = true;
        was_idle && self.dirty > 0
    }

    /// An active (write-blocking) write of bytes `[off, off+len)` covering regions `ext` is about
    /// to be issued. Does everything [`Self::begin_write`] does (the write intent is needed all
    /// the same: a crash between the source write and the target write leaves them different),
    /// and decides whether the write also goes to the target.
    ///
    /// It does only if every region is clean and not being copied, no other active write
    /// overlaps its bytes and no consistent flush is running (the image a consistent flush
    /// makes durable must not receive writes that started after it).
    pub fn begin_active_write(&mut self, ext: Extent, off: u64, len: u64) -> (Intent, ActivePlan) {
        let (s, e) = (ext.start as usize, ext.end() as usize);
        let clean = !self.to_copy.any_in(s, e) && !self.copying.any_in(s, e) && !self.poisoned.any_in(s, e);
        let consistent_flush = matches!(self.flush, Some(TargetFlush { kind: FlushKind::Consistent, .. }));
        let end = off + len;
        let mut overlap = false;
        if ext.regions().any(|r| self.active_regions.contains_key(&r)) {
            for w in self.active.values_mut() {
                if w.off < end && off < w.end {
                    // Both end as ordinary writes: their order on the source and on the target
                    // may differ.
                    taint(w, &mut self.tainted);
                    overlap = true;
                }
            }
        }
        let intent = self.begin_write(ext);
        if !clean || consistent_flush || overlap {
            return (intent, ActivePlan::SourceOnly);
        }
        let id = self.next_active;
        self.next_active += 1;
        // A target flush that starts from now on may be followed by this target write.
        self.written.fill(s, e, true);
        self.active.insert(id, ActiveWrite { ext, off, end, tainted: false, shipped: false });
        count_regions(&mut self.active_regions, ext, true);
        self.blocking += 1;
        (intent, ActivePlan::Target { id })
    }

    /// The active write `id` completed on the source (`source_ok`) and on the target
    /// (`target_ok`). Returns true if the mirror should be woken.
    ///
    /// If both succeeded and nothing tainted it, its regions need no copy: the target got the
    /// same bytes as the source, and the regions become eligible for clearing at the next pair
    /// flush, exactly like regions whose copy just finished. Otherwise it ends as an ordinary
    /// write (dirty, copied later): a failed target write never fails the application.
    pub fn end_active_write(&mut self, id: u64, source_ok: bool, target_ok: bool) -> bool {
        self.end_active(id, source_ok, target_ok, true)
    }

    /// [`Self::end_active_write`]; `point_due`: a mirrored end makes a consistent point due
    /// (write-blocking writes). A shipped write's landing does not: the queue's own schedule
    /// ([`Self::ship_flush_due`]: epoch boundaries, holds, the idle gap) makes its points, and
    /// until one has flushed it the queue is not idle, so the state is not synced either.
    fn end_active(&mut self, id: u64, source_ok: bool, target_ok: bool, point_due: bool) -> bool {
        let Some(w) = self.active.remove(&id) else {
            debug_assert!(false, "end_active_write of unknown write {id}");
            return false;
        };
        count_regions(&mut self.active_regions, w.ext, false);
        if w.tainted {
            self.tainted -= 1;
        }
        if !w.shipped {
            self.blocking -= 1;
        }
        self.ship_src.remove(id);
        let ext = w.ext;
        let mirrored = source_ok
            && target_ok
            && !w.tainted
            && !self.to_copy.any_in(ext.start as usize, ext.end() as usize)
            && !self.copying.any_in(ext.start as usize, ext.end() as usize);
        if !mirrored {
            return self.end_write(ext);
        }
        for r in ext.regions() {
            match self.inflight.get_mut(&r) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    self.inflight.remove(&r);
                }
                None => debug_assert!(false, "end_active_write without begin on region {r}"),
            }
            self.disturb(r);
            // Eligible for clearing once a pair flush that starts after now completes, unless
            // another write is still in flight there (its own end decides).
            if !self.inflight.contains_key(&r) {
                self.copied.set(r as usize, true);
            }
        }
        if !point_due {
            return false;
        }
        // Nothing to copy, but a consistent point (and clearing) is now due: the first such
        // write after a consistent point wakes the mirror.
        let was_unchanged = !self.changed;
        self.changed = true;
        was_unchanged
    }

    /// Async mode on or off, with a replication buffer of `capacity` bytes. Off, the queue
    /// falls behind for good: the writes it held end as ordinary writes. On, shipping starts at
    /// the next consistent point reached with nothing dirty. Returns the buffer handles to free.
    pub fn set_shipping(&mut self, capacity: Option<u64>) -> Vec<u64> {
        match capacity {
            Some(c) => {
                self.ship_on = true;
                self.ship.get_or_insert_with(|| ShipQueue::new(c)).set_capacity(c);
                // Already consistent: no need to wait for the next point.
                if self.is_synced() {
                    if let Some(q) = self.ship.as_mut() {
                        q.resume();
                    }
                }
                Vec::new()
            }
            None => {
                self.ship_on = false;
                self.ship_fall_behind(BehindReason::Stopped).0
            }
        }
    }

    /// The replication queue, if async mode was ever on.
    pub fn ship(&self) -> Option<&ShipQueue> {
        self.ship.as_ref()
    }
    /// Async mode: the device received a FLUSH or completed a FUA write: the open epoch closes
    /// ([`ShipQueue::device_flush`]).
    pub fn ship_device_flush(&mut self) {
        if let Some(q) = self.ship.as_mut() {
            q.device_flush();
        }
    }

    /// Async mode: a write of bytes `[off, off+len)` covering regions `ext` is about to be issued
    /// to the source. Does everything [`Self::begin_write`] does, and decides whether it will be
    /// shipped: only if shipping (not behind), every region is clean and not being copied, and no
    /// other shipped write whose source write is in flight overlaps its bytes (the source could
    /// apply the two in either order; both then end as ordinary writes).
    pub fn begin_shipped_write(&mut self, ext: Extent, off: u64, len: u64) -> (Intent, ActivePlan) {
        let (s, e) = (ext.start as usize, ext.end() as usize);
        let clean = !self.to_copy.any_in(s, e) && !self.copying.any_in(s, e) && !self.poisoned.any_in(s, e);
        let shipping = self.ship.as_ref().is_some_and(|q| q.shipping());
        let end = off + len;
        let mut overlap = false;
        for id in self.ship_src.overlapping(ext, off, end) {
            overlap = true;
            if let Some(w) = self.active.get_mut(&id) {
                taint(w, &mut self.tainted);
            }
        }
        // A write-blocking write still in flight (the mode changed, or --max-lag or an
        // --on-consistent command made writes blocking for a while): its target write runs
        // beside its source write, outside the queue's order, so the two disks could apply it
        // and this one in different orders. Both end as ordinary writes.
        if self.blocking > 0 && ext.regions().any(|r| self.active_regions.contains_key(&r)) {
            for w in self.active.values_mut() {
                if !w.shipped && w.off < end && off < w.end {
                    taint(w, &mut self.tainted);
                    overlap = true;
                }
            }
        }
        let intent = self.begin_write(ext);
        if !clean || !shipping || overlap {
            return (intent, ActivePlan::SourceOnly);
        }
        let id = self.next_active;
        self.next_active += 1;
        // A target flush that starts from now on may be followed by this write's target write.
        self.written.fill(s, e, true);
        self.active.insert(id, ActiveWrite { ext, off, end, tainted: false, shipped: true });
        count_regions(&mut self.active_regions, ext, true);
        self.ship_src.insert(id, off, end, ext);
        (intent, ActivePlan::Ship { id })
    }

    /// Async mode: the source write of shipped write `id` completed (`ok`: in full), its bytes
    /// held under `handle`. Queues it for the target; or, if it failed, was tainted, or the
    /// queue is behind or full, ends it as an ordinary write (its regions dirty). See
    /// [`ShipPush`] for what the caller does next.
    pub fn ship_source_done(&mut self, id: u64, ok: bool, handle: u64) -> ShipPush {
        let mut out = ShipPush::default();
        let Some((off, end)) = self.ship_src.remove(id) else {
            debug_assert!(false, "ship_source_done of unknown write {id}");
            return out;
        };
        let tainted = self.active.get(&id).is_none_or(|w| w.tainted);
        let pushed = match self.ship.as_mut() {
            Some(q) if ok && !tainted => q.push(id, off, end - off, handle),
            _ => Err(None),
        };
        match pushed {
            Ok(seq) => {
                out.queued = true;
                out.seq = Some(seq);
            }
            Err(why) => {
                if let Some(why) = why {
                    let (freed, _) = self.ship_fall_behind(why);
                    out.freed = freed;
                    out.fell_behind = Some(why);
                }
                out.wake |= self.end_active_write(id, ok, false);
            }
        }
        out
    }

    /// Async mode: the next buffered write to issue to the target (see [`ShipQueue::next`]).
    pub fn ship_next(&mut self, max_in_flight: usize, hold: bool) -> Option<Shipment> {
        self.ship.as_mut()?.next(max_in_flight, hold)
    }

    /// Async mode: the target write of queue entry `seq` completed. Ends the write: mirrored
    /// (its regions eligible for clearing at the next pair flush) if it landed in full and was
    /// not abandoned; otherwise as an ordinary write, and a failure makes the queue fall behind.
    pub fn ship_landed(&mut self, seq: u64, ok: bool) -> ShipLanded {
        let Some(l) = self.ship.as_mut().and_then(|q| q.landed(seq, ok)) else {
            // An early write waits for its source write (its result is kept).
            debug_assert!(self.ship.as_ref().is_some_and(|q| q.awaits_source(seq)), "ship_landed of unknown entry {seq}");
            return ShipLanded::default();
        };
        self.ship_finish(l)
    }

    /// Ends a shipped write that landed: mirrored, or as an ordinary write; a target failure
    /// makes the queue fall behind.
    fn ship_finish(&mut self, l: crate::core::ship::Landed) -> ShipLanded {
        let mut out = ShipLanded::default();
        out.freed.push(l.handle);
        if !l.target_ok && self.ship.as_ref().is_some_and(|q| q.shipping()) {
            let (freed, _) = self.ship_fall_behind(BehindReason::TargetFailed);
            out.freed.extend(freed);
            out.fell_behind = Some(BehindReason::TargetFailed);
        }
        out.wake = self.end_active(l.id, l.source_ok, l.mirrored, false);
        out
    }

    /// Async mode, early shipping: shipped write `id`, whose intent is durable and whose source
    /// write is about to be issued, with its bytes buffered under `handle`, goes to the target
    /// now, together with its source write, if the queue allows it ([`ShipQueue::push_early`];
    /// `max_in_flight` and `hold` as for [`Self::ship_next`]) and the write is still clean and
    /// untainted. The caller then issues both and reports each half:
    /// [`Self::ship_early_source_done`] and [`Self::ship_landed`]. None: the write stays an
    /// ordinary shipped write (queued when its source write completes).
    pub fn ship_early(&mut self, id: u64, handle: u64, max_in_flight: usize, hold: bool) -> Option<Shipment> {
        let (off, end) = self.ship_src.get(id)?;
        let w = self.active.get(&id)?;
        let (s, e) = (w.ext.start as usize, w.ext.end() as usize);
        if w.tainted || self.to_copy.any_in(s, e) || self.copying.any_in(s, e) || self.poisoned.any_in(s, e) {
            return None;
        }
        let q = self.ship.as_mut()?;
        let epoch = q.open_epoch();
        let seq = q.push_early(id, off, end - off, handle, max_in_flight, hold)?;
        self.ship_early.insert(id, seq);
        Some(Shipment { seq, id, off, len: end - off, epoch, handle })
    }

    /// Async mode: the source write of early write `id` (see [`Self::ship_early`]) completed
    /// (`ok`: in full). It lands if its target write has completed too.
    pub fn ship_early_source_done(&mut self, id: u64, ok: bool) -> ShipLanded {
        let Some(seq) = self.ship_early.remove(&id) else {
            debug_assert!(false, "ship_early_source_done of unknown write {id}");
            return ShipLanded::default();
        };
        self.ship_src.remove(id);
        match self.ship.as_mut().and_then(|q| q.source_done(seq, ok)) {
            Some(l) => self.ship_finish(l),
            None => ShipLanded::default(),
        }
    }

    /// Whether write `id` was shipped early (its source write still in flight).
    pub fn is_shipped_early(&self, id: u64) -> bool {
        self.ship_early.contains_key(&id)
    }

    /// Async mode: is a target flush due for the shipped writes (see [`ShipQueue::flush_due`])?
    pub fn ship_flush_due(&self, hold: bool, idle: bool) -> bool {
        self.flush.is_none() && self.ship.as_ref().is_some_and(|q| q.flush_due(hold, idle))
    }

    /// Async mode: the shipped writes wait for an idle flush (see [`ShipQueue::awaits_idle_flush`]).
    pub fn ship_awaits_idle_flush(&self) -> bool {
        self.flush.is_none() && self.ship.as_ref().is_some_and(|q| q.awaits_idle_flush())
    }

    /// Makes the queue fall behind (a target failure, a full buffer, async mode switched off):
    /// the queued writes end as ordinary writes, those in flight are tainted (their target writes
    /// may land over newer data: no consistent point until they landed). Returns the buffer
    /// handles to free and whether the queue was shipping.
    pub fn ship_fall_behind(&mut self, why: BehindReason) -> (Vec<u64>, bool) {
        let Some(q) = self.ship.as_mut() else { return (Vec::new(), false) };
        let was = q.shipping();
        let (dropped, flying) = q.fall_behind(why);
        for id in flying {
            if let Some(w) = self.active.get_mut(&id) {
                taint(w, &mut self.tainted);
            }
        }
        let mut freed = Vec::with_capacity(dropped.len());
        for d in dropped {
            freed.push(d.handle);
            self.end_active_write(d.id, true, false);
        }
        (freed, was)
    }

    /// A consistent flush is running: an active write that starts now may not write the target
    /// (see [`Self::begin_active_write`]); a writer that can wait should begin after it.
    pub fn consistent_flush_running(&self) -> bool {
        matches!(self.flush, Some(TargetFlush { kind: FlushKind::Consistent, .. }))
    }

    /// Online verify: may region `r` be compared now? True if it is clean (not dirty, not being
    /// copied, no write in flight, no active write touching it); it is then watched until
    /// [`Self::verify_end`].
    pub fn verify_begin(&mut self, r: u64) -> bool {
        let i = r as usize;
        let busy = self.to_copy.get(i)
            || self.copying.get(i)
            || self.poisoned.get(i)
            || self.inflight.contains_key(&r)
            || self.active_regions.contains_key(&r);
        self.watched.set(i, !busy);
        !busy
    }

    /// Online verify: was region `r` left alone since [`Self::verify_begin`]? Only then do
    /// reads of source and target made in between describe one state of the pair.
    pub fn verify_end(&mut self, r: u64) -> bool {
        let still = self.watched.get(r as usize);
        self.watched.set(r as usize, false);
        still && !self.to_copy.get(r as usize)
    }

    /// Active writes in flight (for status).
    pub fn active_writes(&self) -> usize {
        self.active.len()
    }

    /// Picks the next run of dirty regions to copy (at most `max` regions), starting after the
    /// previous pick so that a hot region cannot starve the rest. Clears their to-copy bits
    /// *before* the copy: a write landing during the copy sets them again and they are recopied.
    /// A region already being copied is skipped, so two copies of one region are never in flight
    /// (their target writes could complete in the wrong order).
    pub fn next_copy(&mut self, max: u64) -> Option<Extent> {
        if self.dirty == 0 || max == 0 {
            return None;
        }
        // While a consistent flush is in flight, the target must not receive newer data: the
        // image it makes durable is the one as of the flush's start.
        if matches!(self.flush, Some(TargetFlush { kind: FlushKind::Consistent, .. })) {
            return None;
        }
        let start = self
            .find_copyable(self.cursor, self.nregions)
            .or_else(|| self.find_copyable(0, self.cursor))?;
        // The run of dirty regions not being copied from `start`, at most `max` long: searched
        // and updated a word at a time (a copy of a source's hole may cover millions of regions).
        let lim = start.saturating_add(max).min(self.nregions) as usize;
        let s = start as usize;
        let e = self.to_copy.first_zero(s, lim).unwrap_or(lim);
        let e = self.copying.first_one(s, e).unwrap_or(e);
        let end = e as u64;
        self.to_copy.fill(s, e, false);
        self.copying.fill(s, e, true);
        self.written.fill(s, e, true);
        self.disturb_range(s, e);
        // The copy may read the source before an active write lands there and write the target
        // after that write's target write: the active write cannot vouch for the target.
        for w in self.active.values_mut() {
            if w.ext.start < end && start < w.ext.end() {
                taint(w, &mut self.tainted);
            }
        }
        if let Some(q) = self.ship.as_mut() {
            q.copy_started();
        }
        self.dirty -= end - start;
        self.copying_count += end - start;
        self.cursor = if end >= self.nregions { 0 } else { end };
        Some(Extent { start, count: end - start })
    }

    /// The region [`Self::next_copy`] would start at now, if any (nothing changes).
    pub fn peek_copy(&self) -> Option<u64> {
        if self.dirty == 0 || matches!(self.flush, Some(TargetFlush { kind: FlushKind::Consistent, .. })) {
            return None;
        }
        self.find_copyable(self.cursor, self.nregions).or_else(|| self.find_copyable(0, self.cursor))
    }

    /// The first region of `[from, to)` that is dirty and not being copied, skipping runs of
    /// each kind at once.
    fn find_copyable(&self, from: u64, to: u64) -> Option<u64> {
        let (mut at, to) = (from as usize, to as usize);
        loop {
            let d = self.to_copy.first_one(at, to)?;
            match self.copying.first_zero(d, to) {
                Some(c) if self.to_copy.get(c) => return Some(c as u64),
                Some(c) => at = c,
                None => return None,
            }
        }
    }

    /// The copy of `ext` finished. On failure its regions are dirty again.
    pub fn copy_done(&mut self, ext: Extent, ok: bool) {
        let (s, e) = (ext.start as usize, ext.end() as usize);
        debug_assert!(self.copying.all_in(s, e), "copy_done on regions not being copied");
        if ok && !self.poisoned.any_in(s, e) {
            // The common case, a page or a word at a time: every region's copy counts, except
            // where a write made the region dirty again or is still in flight.
            self.copying.fill(s, e, false);
            self.copied.fill(s, e, true);
            let again: Vec<usize> = self.to_copy.ones_in(s, e).collect();
            for i in again {
                self.copied.set(i, false);
            }
            for &r in self.inflight.keys() {
                if ext.regions().contains(&r) {
                    self.copied.set(r as usize, false);
                }
            }
            self.copying_count -= ext.count;
            self.changed = true;
            return;
        }
        let mut failed = !ok;
        for r in ext.regions() {
            debug_assert!(self.copying.get(r as usize), "copy_done on region {r} not being copied");
            self.copying.set(r as usize, false);
            // In flight across a failed target flush: what it wrote may be lost already.
            let ok = ok && !self.poisoned.get(r as usize);
            self.poisoned.set(r as usize, false);
            failed |= !ok;
            if !ok {
                self.mark_to_copy(r);
            } else if !self.to_copy.get(r as usize) && !self.inflight.contains_key(&r) {
                self.copied.set(r as usize, true);
            }
        }
        self.copying_count -= ext.count;
        if failed {
            self.counters.copy_errors += 1;
        }
        self.changed = true;
    }

    /// Asks for a consistent point even if nothing changed since the last one (a restarted
    /// mirror loop proves the target works with it).
    pub fn request_consistent_point(&mut self) {
        self.changed = true;
    }

    /// Is a consistent point due? True when nothing is dirty or being copied, no target flush is
    /// pending, and something changed since the last consistent point (or there has been none).
    pub fn consistent_point_due(&self) -> bool {
        self.flush.is_none() && self.changed && self.point_possible()
    }

    /// Would a target flush starting now make a consistent point? Nothing is dirty or being
    /// copied, no stale target write is in flight, and the shipped writes form a prefix of the
    /// queue that covers every write queued before the last copy started. Under async shipping
    /// the last condition is false most of the time (writes are in flight to the target):
    /// the queue's own schedule then makes the point ([`Self::ship_flush_due`]), and a flush
    /// made only because something changed would be a checkpoint, due again at once.
    fn point_possible(&self) -> bool {
        self.dirty == 0
            && self.copying_count == 0
            && !self.stale_target_writes()
            && self.ship.as_ref().is_none_or(|q| q.prefix_consistent())
    }

    /// Are there finished copies whose bits a checkpoint flush could clear?
    pub fn checkpoint_possible(&self) -> bool {
        self.flush.is_none() && self.copied.any()
    }

    /// A pair flush (the target's flush with the source's fdatasync) is about to be issued.
    /// Returns its kind: consistent if nothing is dirty or being copied at this instant,
    /// otherwise a checkpoint.
    pub fn target_flush_started(&mut self) -> FlushKind {
        self.start_target_flush(true)
    }

    /// A flush of the target alone is about to be issued (async mode's epoch flushes, most of
    /// which need no fdatasync of the source). It makes what was written to the target durable
    /// and may mark a consistent point like a pair flush, but clears no bit: a region's bit may
    /// go only once the source holds its data durably too, so the finished copies and landed
    /// writes it could clear wait for the next pair flush.
    pub fn target_only_flush_started(&mut self) -> FlushKind {
        self.start_target_flush(false)
    }

    fn start_target_flush(&mut self, with_source: bool) -> FlushKind {
        debug_assert!(self.flush.is_none(), "two target flushes in flight");
        let possible = self.point_possible();
        if let Some(q) = self.ship.as_mut() {
            q.flush_started();
        }
        let kind = if possible {
            self.changed = false;
            FlushKind::Consistent
        } else {
            FlushKind::Checkpoint
        };
        let regions = if with_source {
            std::mem::replace(&mut self.copied, PagedBits::new(self.nregions as usize))
        } else {
            PagedBits::new(self.nregions as usize)
        };
        // Copies still in flight may write after this flush started: they stay in `written`
        // for the next one.
        let mut still = self.copying.clone();
        for w in self.active.values() {
            still.fill(w.ext.start as usize, w.ext.end() as usize, true);
        }
        let written = std::mem::replace(&mut self.written, still);
        self.flush = Some(TargetFlush { kind, regions, written });
        kind
    }

    /// The target flush completed. On success, clears the persistent bits it covers (rule 2: a
    /// region still in its set has no write in flight and no write or copy since its copy). On
    /// failure, the copies it covered may not be on the target's medium: dirty them again.
    pub fn target_flush_done(&mut self, ok: bool) -> FlushOutcome {
        let Some(flush) = self.flush.take() else {
            debug_assert!(false, "target_flush_done without a flush");
            return FlushOutcome::default();
        };
        let mut out = FlushOutcome::default();
        if let Some(q) = self.ship.as_mut() {
            q.flush_done(ok);
        }
        if ok {
            // Run by run, a word at a time: after a full sync the set covers the device.
            for (s, e) in flush.regions.runs(RUN_PIECE) {
                debug_assert!(!self.to_copy.any_in(s, e));
                debug_assert!(!self.inflight.keys().any(|&r| (s as u64..e as u64).contains(&r)));
                if self.lazy {
                    // Eligible only where the bit is set: loaded from a word boundary, so that
                    // the set takes it a word (or a page) at a time.
                    let a = s / 64 * 64;
                    let set = self.pbits.load(a as u64, e as u64);
                    out.deferred += set[s - a..].count_ones() as u64;
                    let mut part = set;
                    part[..s - a].fill(false);
                    self.eligible_young.or_bits_at(a, &part);
                } else {
                    out.cleared += self.clear_bits(s, e);
                }
            }
            match flush.kind {
                FlushKind::Consistent => {
                    out.consistent = true;
                    self.counters.consistent_points += 1;
                    // Behind, shipping resumes at a consistent point reached with nothing left
                    // to copy: the target then equals the source.
                    if self.ship_on && self.dirty == 0 && self.copying_count == 0 && !self.stale_target_writes() {
                        out.resumed = self.ship.as_mut().is_some_and(|q| q.resume());
                    }
                }
                FlushKind::Checkpoint => self.counters.checkpoints += 1,
            }
        } else {
            self.counters.target_flush_errors += 1;
            // Anything written to the target since the last successful flush started may be
            // gone: the failed flush's set, everything copied before it, and the copies that
            // ran or still run during it.
            let mut lost = flush.regions;
            lost.or_assign(&flush.written);
            lost.or_assign(&self.written);
            for (s, e) in lost.runs(RUN_PIECE) {
                let fresh = (e - s - self.to_copy.count_in(s, e)) as u64;
                out.redirtied += fresh;
                self.dirty += fresh;
                self.disturb_range(s, e);
                self.to_copy.fill(s, e, true);
            }
            self.poisoned.or_assign(&self.copying);
            for w in self.active.values_mut() {
                taint(w, &mut self.tainted);
            }
            // They stay in `written` until a flush that starts after their recopy succeeds.
            self.written.or_assign(&flush.written);
            self.changed = true;
        }
        out
    }

    /// Clears the bits of `[s, e)` (set or not); returns how many were set.
    fn clear_bits(&mut self, s: usize, e: usize) -> u64 {
        let n = self.pbits.load(s as u64, e as u64).count_ones() as u64;
        if n == 0 {
            return 0;
        }
        self.pbits.clear_range(s as u64, e as u64);
        // Saturating: a page of the bitmap lost in use (crate::io::sigbus) reads as all ones,
        // more bits than were ever counted set; the count is only reported after that.
        self.pcount = self.pcount.saturating_sub(n);
        if !self.pending.is_empty() {
            self.pending.retain(|&r, _| !(s as u64..e as u64).contains(&r));
        }
        n
    }


    /// Turns lazy clearing on or off (off: bits are cleared when the target flush completes).
    pub fn set_lazy_clearing(&mut self, lazy: bool) {
        self.lazy = lazy;
        if !lazy {
            self.clear_eligible();
        }
    }

    /// One tick of lazy clearing: clears the bits that were already eligible at the previous
    /// tick and are still untouched. Returns the number of bits cleared.
    pub fn clear_tick(&mut self) -> u64 {
        let old = std::mem::replace(&mut self.eligible_old, PagedBits::new(0));
        let mut n = 0;
        for (s, e) in old.runs(RUN_PIECE) {
            // Eligible regions are untouched since their copy was flushed to the target:
            // disturb() removes any region a write or a copy touches.
            debug_assert!(!self.to_copy.any_in(s, e));
            n += self.clear_bits(s, e);
        }
        self.eligible_old = std::mem::replace(&mut self.eligible_young, PagedBits::new(self.nregions as usize));
        n
    }

    /// Clears every eligible bit now (an orderly stop: nothing will write any more).
    pub fn clear_eligible(&mut self) -> u64 {
        self.clear_tick() + self.clear_tick()
    }

    /// Are there eligible bits waiting for a tick?
    pub fn clearing_pending(&self) -> bool {
        self.eligible_young.any() || self.eligible_old.any()
    }

    /// Marks every region dirty, in the cache and in the work list (a full sync). The caller
    /// flushes the bitmap afterwards and reports it with [`Self::bitmap_flush_done`] before
    /// copying anything, so an interrupted full sync resumes from the bitmap.
    pub fn mark_all(&mut self) {
        for r in 0..self.nregions {
            if !self.pbits.get(r) {
                self.pbits.set(r);
                self.pcount += 1;
                self.set_seq += 1;
                self.pending.insert(r, self.set_seq);
            }
            self.disturb(r);
            self.mark_to_copy(r);
        }
        self.changed = true;
    }

    /// Number of persistent bits set in the cache.
    pub fn persistent_count(&self) -> u64 {
        self.pcount
    }

    /// Self-check of the internal invariants (tests and debug builds).
    pub fn check_invariants(&self) -> Result<(), String> {
        let dirty = self.to_copy.count_ones() as u64;
        if dirty != self.dirty {
            return Err(format!("dirty count {} != to-copy bits {}", self.dirty, dirty));
        }
        if self.copying.count_ones() as u64 != self.copying_count {
            return Err("copying count drifted".into());
        }
        let pset = (0..self.nregions).filter(|&r| self.pbits.get(r)).count() as u64;
        if pset != self.pcount {
            return Err(format!("persistent count {} != bits set {pset}", self.pcount));
        }
        for r in 0..self.nregions {
            let i = r as usize;
            let p = self.pbits.get(r);
            if self.to_copy.get(i) && !p {
                return Err(format!("region {r}: to-copy but persistent bit clear"));
            }
            if self.copying.get(i) && !p {
                return Err(format!("region {r}: being copied but persistent bit clear"));
            }
            if self.inflight.contains_key(&r) && !p {
                return Err(format!("region {r}: write in flight but persistent bit clear"));
            }
            if self.pending.contains_key(&r) && !p {
                return Err(format!("region {r}: pending but persistent bit clear"));
            }
        }
        if self.active.values().filter(|w| w.tainted).count() != self.tainted {
            return Err("tainted count drifted".into());
        }
        if self.active.values().filter(|w| !w.shipped).count() != self.blocking {
            return Err("write-blocking count drifted".into());
        }
        let mut want = HashMap::new();
        for w in self.active.values() {
            count_regions(&mut want, w.ext, true);
        }
        if want != self.active_regions {
            return Err("the regions of active writes drifted".into());
        }
        if self.ship_src.by_id.keys().any(|id| !self.active.contains_key(id)) {
            return Err("a shipped write's source half outlived the write".into());
        }
        self.ship_src.check()?;
        if self.ship_early.keys().any(|id| !self.ship_src.by_id.contains_key(id)) {
            return Err("an early shipped write is not in flight on the source".into());
        }
        if let Some(q) = &self.ship {
            q.check()?;
        }
        Ok(())
    }
}

/// Group commit of bitmap flushes for one submitter (one ublk queue, or one test thread).
///
/// Writers that need intent join the batch of the flush in flight if it started after their
/// bits were set, otherwise the next batch; at most one flush per submitter is in flight, so
/// any number of concurrent first writes share at most two flushes. `W` is whatever identifies
/// a waiting write to its submitter (a tag).
#[derive(Debug)]
pub struct GroupCommit<W> {
    in_flight: Option<u64>,
    waiting: Vec<(u64, W)>,
}

impl<W> Default for GroupCommit<W> {
    fn default() -> Self {
        GroupCommit { in_flight: None, waiting: Vec::new() }
    }
}

/// What the submitter must do after a group-commit step.
#[derive(Debug, PartialEq, Eq)]
pub struct GroupStep<W> {
    /// Writers whose intent is durable: issue them.
    pub ready: Vec<W>,
    /// Writers whose bitmap flush failed: fail them (their I/O was never issued).
    pub failed: Vec<W>,
    /// Start a bitmap flush now (call `bitmap_flush_started`, then [`GroupCommit::started`]).
    pub start_flush: bool,
}

impl<W> GroupCommit<W> {
    /// A writer needs intent sequence `seq`. Returns true if the submitter must start a flush.
    pub fn wait(&mut self, seq: u64, w: W) -> bool {
        self.waiting.push((seq, w));
        self.in_flight.is_none()
    }

    /// The submitter issued a flush covering `seq` (from `bitmap_flush_started`).
    pub fn started(&mut self, seq: u64) {
        debug_assert!(self.in_flight.is_none());
        self.in_flight = Some(seq);
    }

    pub fn flush_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The flush in flight completed; `durable_seq` is the state's durable sequence after
    /// reporting it with `bitmap_flush_done`.
    pub fn completed(&mut self, ok: bool, durable_seq_ok: impl Fn(u64) -> bool) -> GroupStep<W> {
        let covered = self.in_flight.take().unwrap_or(0);
        let mut step = GroupStep { ready: Vec::new(), failed: Vec::new(), start_flush: false };
        for (seq, w) in std::mem::take(&mut self.waiting) {
            if durable_seq_ok(seq) {
                step.ready.push(w);
            } else if !ok && seq <= covered {
                step.failed.push(w);
            } else {
                self.waiting.push((seq, w));
            }
        }
        step.start_flush = !self.waiting.is_empty();
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(n: u64) -> MirrorState<MemBits> {
        MirrorState::new(n, MemBits::new(n))
    }
    fn ext(start: u64, count: u64) -> Extent {
        Extent { start, count }
    }

    #[test]
    fn first_write_waits_for_intent_and_later_ones_do_not() {
        let mut s = state(8);
        let Intent::Wait { seq } = s.begin_write(ext(2, 1)) else { panic!("first write must wait") };
        // A second write to the same region before the flush waits for the same sequence.
        assert_eq!(s.begin_write(ext(2, 1)), Intent::Wait { seq });
        let f = s.bitmap_flush_started();
        assert!(f >= seq);
        s.bitmap_flush_done(f, true);
        assert!(s.intent_durable(seq));
        s.end_write(ext(2, 1));
        s.end_write(ext(2, 1));
        assert_eq!(s.begin_write(ext(2, 1)), Intent::Ready);
        s.end_write(ext(2, 1));
        s.check_invariants().unwrap();
    }

    #[test]
    fn flush_started_before_a_bit_was_set_does_not_cover_it() {
        let mut s = state(8);
        let Intent::Wait { seq: a } = s.begin_write(ext(0, 1)) else { panic!() };
        let f1 = s.bitmap_flush_started();
        let Intent::Wait { seq: b } = s.begin_write(ext(1, 1)) else { panic!() };
        s.bitmap_flush_done(f1, true);
        assert!(s.intent_durable(a));
        assert!(!s.intent_durable(b), "bit set after the flush started is not covered by it");
        let f2 = s.bitmap_flush_started();
        s.bitmap_flush_done(f2, true);
        assert!(s.intent_durable(b));
    }

    #[test]
    fn write_during_copy_is_copied_again_and_bit_survives() {
        let mut s = state(4);
        let Intent::Wait { seq } = s.begin_write(ext(1, 1)) else { panic!() };
        s.bitmap_flush_done(seq, true);
        s.end_write(ext(1, 1));
        let c = s.next_copy(16).unwrap();
        assert_eq!(c, ext(1, 1));
        // A write lands during the copy.
        assert_eq!(s.begin_write(ext(1, 1)), Intent::Ready);
        s.end_write(ext(1, 1));
        assert!(s.next_copy(16).is_none(), "no second copy of a region while one is in flight");
        s.copy_done(c, true);
        assert!(!s.consistent_point_due());
        let c2 = s.next_copy(16).unwrap();
        assert_eq!(c2, ext(1, 1));
        s.copy_done(c2, true);
        assert!(s.consistent_point_due());
        assert_eq!(s.target_flush_started(), FlushKind::Consistent);
        let out = s.target_flush_done(true);
        assert!(out.consistent);
        assert_eq!(out.cleared, 1);
        assert!(!s.pbits().get(1));
        assert!(s.is_synced());
        s.check_invariants().unwrap();
    }

    #[test]
    fn in_flight_write_keeps_its_bit_through_a_target_flush() {
        let mut s = state(4);
        s.mark_all();
        let f = s.bitmap_flush_started();
        s.bitmap_flush_done(f, true);
        let c = s.next_copy(16).unwrap();
        assert_eq!(c, ext(0, 4));
        s.copy_done(c, true);
        // Write begins on region 2 (bit durable: no wait) and is still in flight at the flush.
        assert_eq!(s.begin_write(ext(2, 1)), Intent::Ready);
        assert_eq!(s.target_flush_started(), FlushKind::Consistent);
        let out = s.target_flush_done(true);
        assert_eq!(out.cleared, 3);
        assert!(s.pbits().get(2), "bit of a region with a write in flight must stay");
        s.end_write(ext(2, 1));
        s.check_invariants().unwrap();
    }

    #[test]
    fn write_completing_during_target_flush_keeps_its_bit() {
        let mut s = state(2);
        s.mark_all();
        let f = s.bitmap_flush_started();
        s.bitmap_flush_done(f, true);
        let c = s.next_copy(16).unwrap();
        s.copy_done(c, true);
        assert_eq!(s.target_flush_started(), FlushKind::Consistent);
        assert_eq!(s.begin_write(ext(0, 1)), Intent::Ready);
        s.end_write(ext(0, 1));
        let out = s.target_flush_done(true);
        assert_eq!(out.cleared, 1);
        assert!(s.pbits().get(0));
        assert!(!s.pbits().get(1));
    }

    #[test]
    fn copy_and_flush_errors_redirty() {
        let mut s = state(4);
        s.mark_all();
        let c = s.next_copy(2).unwrap();
        s.copy_done(c, false);
        assert_eq!(s.dirty(), 4);
        while let Some(c) = s.next_copy(4) {
            s.copy_done(c, true);
        }
        s.target_flush_started();
        let out = s.target_flush_done(false);
        assert_eq!(out.redirtied, 4);
        assert_eq!(s.dirty(), 4);
        assert_eq!(s.persistent_count(), 4);
        s.check_invariants().unwrap();
    }

    #[test]
    fn checkpoint_clears_finished_regions_while_copying_goes_on() {
        let mut s = state(8);
        s.mark_all();
        let a = s.next_copy(4).unwrap();
        s.copy_done(a, true);
        let b = s.next_copy(4).unwrap();
        assert!(s.checkpoint_possible());
        assert_eq!(s.target_flush_started(), FlushKind::Checkpoint);
        // Copies may go on during a checkpoint flush.
        s.copy_done(b, true);
        let out = s.target_flush_done(true);
        assert_eq!(out.cleared, 4);
        assert!(!out.consistent);
        assert_eq!(s.persistent_count(), 4);
        assert!(s.consistent_point_due());
    }

    #[test]
    fn no_copy_starts_during_a_consistent_flush() {
        let mut s = state(2);
        assert_eq!(s.target_flush_started(), FlushKind::Consistent);
        assert_eq!(s.begin_write(ext(0, 1)), Intent::Wait { seq: 1 });
        s.bitmap_flush_done(1, true);
        s.end_write(ext(0, 1));
        assert_eq!(s.next_copy(4), None);
        s.target_flush_done(true);
        assert_eq!(s.next_copy(4), Some(ext(0, 1)));
    }

    #[test]
    fn coalesces_and_round_robins() {
        let mut s = state(16);
        for r in [3, 4, 5, 9, 10] {
            s.begin_write(ext(r, 1));
            let f = s.bitmap_flush_started();
            s.bitmap_flush_done(f, true);
            s.end_write(ext(r, 1));
        }
        assert_eq!(s.next_copy(2), Some(ext(3, 2)));
        assert_eq!(s.next_copy(8), Some(ext(5, 1)));
        assert_eq!(s.next_copy(8), Some(ext(9, 2)));
        assert_eq!(s.next_copy(8), None);
    }

    #[test]
    fn lazy_clearing_waits_two_ticks_and_a_write_cancels_it() {
        let mut s = state(4);
        s.set_lazy_clearing(true);
        s.mark_all();
        let f = s.bitmap_flush_started();
        s.bitmap_flush_done(f, true);
        let c = s.next_copy(4).unwrap();
        s.copy_done(c, true);
        s.target_flush_started();
        let out = s.target_flush_done(true);
        assert_eq!((out.cleared, out.deferred), (0, 4));
        assert_eq!(s.persistent_count(), 4);
        assert_eq!(s.clear_tick(), 0, "young eligible bits survive one tick");
        // A write to region 1 while eligible: its bit must stay, and it needs no new flush.
        assert_eq!(s.begin_write(ext(1, 1)), Intent::Ready);
        s.end_write(ext(1, 1));
        assert_eq!(s.clear_tick(), 3);
        assert!(s.pbits().get(1));
        s.check_invariants().unwrap();
    }

    #[test]
    fn an_intent_extent_shares_one_flush_and_its_stale_bits_clear_lazily() {
        let mut s = state(12);
        s.set_lazy_clearing(true);
        s.set_intent_extent(4);
        // The first write to region 5 sets 4..8 with one flush; region 6, written before that
        // flush ends, waits for it; after it, region 7 needs none.
        let Intent::Wait { seq } = s.begin_write(ext(5, 1)) else { panic!("first write must wait") };
        assert!((4..8).all(|r| s.pbits().get(r)) && !s.pbits().get(3) && !s.pbits().get(8));
        assert_eq!(s.persistent_count(), 4);
        assert!(matches!(s.begin_write(ext(6, 1)), Intent::Wait { seq: w } if w <= seq));
        let f = s.bitmap_flush_started();
        s.bitmap_flush_done(f, true);
        assert_eq!(s.begin_write(ext(7, 1)), Intent::Ready);
        // A write across the extent's end sets the next extent's bits too.
        assert!(matches!(s.begin_write(ext(7, 2)), Intent::Wait { .. }));
        assert!((8..12).all(|r| s.pbits().get(r)));
        let f = s.bitmap_flush_started();
        s.bitmap_flush_done(f, true);
        for e in [ext(5, 1), ext(6, 1), ext(7, 1), ext(7, 2)] {
            s.end_write(e);
        }
        assert_eq!(s.dirty(), 4, "only the regions written are to copy");
        s.check_invariants().unwrap();
        while let Some(c) = s.next_copy(8) {
            s.copy_done(c, true);
        }
        s.target_flush_started();
        let out = s.target_flush_done(true);
        assert_eq!(out.deferred, 8, "written and extra bits alike wait for lazy clearing");
        assert_eq!(s.clear_tick(), 0);
        // A write to an extra region before the bit clears needs no flush and keeps it.
        assert_eq!(s.begin_write(ext(10, 1)), Intent::Ready);
        s.end_write(ext(10, 1));
        assert_eq!(s.clear_tick(), 7);
        assert!(s.pbits().get(10) && s.persistent_count() == 1);
        s.check_invariants().unwrap();
    }

    /// The sequence spin found (models/README.md): a copy that completed after a flush started
    /// must be recopied if that flush fails, because the failed writeback may have dropped its
    /// pages and the next fdatasync will not report it again.
    #[test]
    fn failed_target_flush_redirties_everything_written_since_the_last_good_one() {
        let mut s = state(2);
        s.set_lazy_clearing(true);
        s.mark_all();
        let f = s.bitmap_flush_started();
        s.bitmap_flush_done(f, true);
        let c1 = s.next_copy(1).unwrap();
        let c0 = s.next_copy(1).unwrap();
        assert_eq!((c1, c0), (ext(0, 1), ext(1, 1)));
        s.copy_done(c1, true);
        assert_eq!(s.target_flush_started(), FlushKind::Checkpoint);
        // The second copy completes while the flush runs, then the flush fails.
        s.copy_done(c0, true);
        let out = s.target_flush_done(false);
        assert_eq!(out.redirtied, 2, "both regions were written since the last good flush");
        assert_eq!(s.dirty(), 2);
        // A copy in flight across a failed flush counts as failed.
        let a = s.next_copy(1).unwrap();
        s.target_flush_started();
        s.target_flush_done(false);
        s.copy_done(a, true);
        assert!(s.needs_copy(a.start));
        s.check_invariants().unwrap();
    }

    fn durable(s: &mut MirrorState<MemBits>) {
        let f = s.bitmap_flush_started();
        s.bitmap_flush_done(f, true);
    }

    #[test]
    fn active_write_on_a_clean_region_leaves_it_clean_and_its_bit_cleared_after_a_flush() {
        let mut s = state(8);
        let (intent, plan) = s.begin_active_write(ext(3, 1), 3 * 4096, 4096);
        assert!(matches!(intent, Intent::Wait { .. }), "intent is needed all the same");
        let ActivePlan::Target { id } = plan else { panic!("clean region: write the target too") };
        durable(&mut s);
        s.end_active_write(id, true, true);
        assert_eq!(s.dirty(), 0, "mirrored: nothing to copy");
        assert!(s.pbits().get(3), "bit stays until a pair flush covers the target write");
        assert!(s.consistent_point_due());
        assert_eq!(s.target_flush_started(), FlushKind::Consistent);
        let out = s.target_flush_done(true);
        assert!(out.consistent && out.cleared == 1 && !s.pbits().get(3));
        s.check_invariants().unwrap();
    }

    #[test]
    fn active_write_falls_back_to_an_ordinary_one() {
        // Dirty region: source only.
        let mut s = state(8);
        s.begin_write(ext(1, 1));
        durable(&mut s);
        s.end_write(ext(1, 1));
        let (_, plan) = s.begin_active_write(ext(1, 1), 4096, 512);
        assert_eq!(plan, ActivePlan::SourceOnly);
        s.end_write(ext(1, 1));
        // Target write failed: the region is dirty, the application saw no error.
        let (_, plan) = s.begin_active_write(ext(5, 1), 5 * 4096, 512);
        let ActivePlan::Target { id } = plan else { panic!() };
        durable(&mut s);
        s.end_active_write(id, true, false);
        assert!(s.needs_copy(5));
        s.check_invariants().unwrap();
    }

    #[test]
    fn overlapping_active_writes_are_both_copied_again() {
        let mut s = state(8);
        let (_, a) = s.begin_active_write(ext(2, 1), 8192, 4096);
        let (_, b) = s.begin_active_write(ext(2, 1), 8192 + 1024, 512);
        let ActivePlan::Target { id } = a else { panic!() };
        assert_eq!(b, ActivePlan::SourceOnly, "overlaps a write in flight");
        durable(&mut s);
        s.end_write(ext(2, 1));
        s.end_active_write(id, true, true);
        assert!(s.needs_copy(2), "order of the two on source and target may differ");
        // Non-overlapping writes to one region both stay mirrored.
        let mut s = state(8);
        let (_, a) = s.begin_active_write(ext(2, 1), 8192, 512);
        let (_, b) = s.begin_active_write(ext(2, 1), 8192 + 512, 512);
        let (ActivePlan::Target { id: x }, ActivePlan::Target { id: y }) = (a, b) else { panic!() };
        durable(&mut s);
        s.end_active_write(y, true, true);
        s.end_active_write(x, true, true);
        assert_eq!(s.dirty(), 0);
        s.check_invariants().unwrap();
    }

    #[test]
    fn a_copy_during_an_active_write_taints_it_and_blocks_consistent_points() {
        let mut s = state(8);
        let (_, a) = s.begin_active_write(ext(4, 1), 4 * 4096, 512);
        let ActivePlan::Target { id } = a else { panic!() };
        durable(&mut s);
        // An ordinary write completes there and its copy runs while the active one is in flight.
        s.begin_write(ext(4, 1));
        s.end_write(ext(4, 1));
        let c = s.next_copy(1).unwrap();
        s.copy_done(c, true);
        // The active write's target half may land after the copy: no consistent point yet.
        assert!(!s.consistent_point_due() && !s.is_synced());
        assert_eq!(s.target_flush_started(), FlushKind::Checkpoint);
        s.target_flush_done(true);
        s.end_active_write(id, true, true);
        assert!(s.needs_copy(4), "copied again after the stale target write");
        assert!(s.pbits().get(4));
        s.check_invariants().unwrap();
    }

    /// A state of `n` regions in async mode, shipping: shipping starts at the first consistent
    /// point.
    fn shipping_state(n: u64) -> MirrorState<MemBits> {
        let mut s = state(n);
        s.set_shipping(Some(1 << 20));
        assert_eq!(s.target_flush_started(), FlushKind::Consistent);
        assert!(s.target_flush_done(true).resumed);
        s
    }

    /// A copy made while shipped writes are queued: the target is a crash image again only once
    /// those writes have landed. Until then no point is due, however much changed: a flush would
    /// be a checkpoint and leave the point due, and the loop would flush the pair on every pass.
    #[test]
    fn no_point_is_due_while_writes_shipped_before_a_copy_are_in_flight() {
        let mut s = shipping_state(8);
        let (_, plan) = s.begin_shipped_write(ext(1, 1), 4096, 4096);
        let ActivePlan::Ship { id } = plan else { panic!("not shipped: {plan:?}") };
        durable(&mut s);
        assert!(s.ship_source_done(id, true, 7).queued);
        let sh = s.ship_next(8, false).expect("the shipped write is issued");
        // An ordinary write elsewhere, copied while the shipped write is in flight.
        s.begin_write(ext(5, 1));
        durable(&mut s);
        s.end_write(ext(5, 1));
        let c = s.next_copy(1).unwrap();
        s.copy_done(c, true);
        assert!(!s.consistent_point_due(), "due with a write queued before the copy in flight");
        s.ship_landed(sh.seq, true);
        assert!(s.consistent_point_due());
        assert_eq!(s.target_flush_started(), FlushKind::Consistent);
        s.target_flush_done(true);
        s.check_invariants().unwrap();
    }

    /// A shipped write that overlaps a write-blocking write still in flight (async mode set
    /// while it ran): the two disks could apply them in different orders, so neither counts
    /// as mirrored and the region is copied.
    #[test]
    fn a_shipped_write_over_a_write_blocking_one_in_flight_is_not_mirrored() {
        let mut s = shipping_state(8);
        let (_, a) = s.begin_active_write(ext(2, 1), 2 * 4096, 4096);
        let ActivePlan::Target { id: wb } = a else { panic!("not write-blocking: {a:?}") };
        let (_, b) = s.begin_shipped_write(ext(2, 1), 2 * 4096, 4096);
        assert_eq!(b, ActivePlan::SourceOnly, "overlaps a write-blocking write in flight");
        durable(&mut s);
        s.end_active_write(wb, true, true);
        s.end_write(ext(2, 1));
        assert!(s.needs_copy(2), "neither write counts as mirrored");
        s.check_invariants().unwrap();
    }

    #[test]
    fn no_active_target_write_starts_during_a_consistent_flush() {
        let mut s = state(8);
        s.begin_write(ext(0, 1));
        durable(&mut s);
        s.end_write(ext(0, 1));
        let c = s.next_copy(1).unwrap();
        s.copy_done(c, true);
        assert_eq!(s.target_flush_started(), FlushKind::Consistent);
        let (_, plan) = s.begin_active_write(ext(6, 1), 6 * 4096, 512);
        assert_eq!(plan, ActivePlan::SourceOnly);
        s.target_flush_done(true);
        s.end_write(ext(6, 1));
        s.check_invariants().unwrap();
    }

    #[test]
    fn online_verify_skips_regions_touched_while_read() {
        let mut s = state(8);
        assert!(s.verify_begin(2));
        assert!(s.verify_end(2), "untouched: the comparison counts");
        assert!(s.verify_begin(3));
        s.begin_write(ext(3, 1));
        assert!(!s.verify_end(3), "a write began during the reads");
        assert!(!s.verify_begin(3), "a write in flight");
        durable(&mut s);
        s.end_write(ext(3, 1));
        assert!(!s.verify_begin(3), "dirty");
        let c = s.next_copy(1).unwrap();
        assert!(!s.verify_begin(3), "being copied");
        s.copy_done(c, true);
        assert!(s.verify_begin(3), "clean again");
        s.check_invariants().unwrap();
    }

    #[test]
    fn group_commit_shares_flushes() {
        let mut g: GroupCommit<u32> = GroupCommit::default();
        let mut s = state(8);
        let mut starts = 0;
        let mut tags = Vec::new();
        for (i, r) in [0u64, 1, 2].iter().enumerate() {
            let Intent::Wait { seq } = s.begin_write(ext(*r, 1)) else { panic!() };
            if g.wait(seq, i as u32) {
                starts += 1;
                g.started(s.bitmap_flush_started());
            }
            tags.push(i as u32);
        }
        assert_eq!(starts, 1, "only the first writer starts a flush");
        // The flush started after the first write only: it covers write 0.
        s.bitmap_flush_done(1, true);
        let st = g.completed(true, |q| s.intent_durable(q));
        assert_eq!(st.ready, vec![0]);
        assert!(st.start_flush);
        g.started(s.bitmap_flush_started());
        s.bitmap_flush_done(3, true);
        let st = g.completed(true, |q| s.intent_durable(q));
        assert_eq!(st.ready, vec![1, 2]);
        assert!(!st.start_flush);
    }

    #[test]
    fn group_commit_failure_fails_covered_waiters_only() {
        let mut g: GroupCommit<u32> = GroupCommit::default();
        let mut s = state(8);
        let Intent::Wait { seq: a } = s.begin_write(ext(0, 1)) else { panic!() };
        assert!(g.wait(a, 0));
        g.started(s.bitmap_flush_started());
        let Intent::Wait { seq: b } = s.begin_write(ext(1, 1)) else { panic!() };
        assert!(!g.wait(b, 1));
        s.bitmap_flush_done(a, false);
        let st = g.completed(false, |q| s.intent_durable(q));
        assert_eq!(st.failed, vec![0]);
        assert!(st.ready.is_empty());
        assert!(st.start_flush);
    }
}
