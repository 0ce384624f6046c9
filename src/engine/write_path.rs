//! The write path's entry points: what a front end (a ublk queue, a test, a tool) asks the engine
//! around each write: may it begin, and with which plan ([`Engine::begin_request`]); the bitmap
//! flush it waits for; its end, as an ordinary, write-blocking or shipped write.

use super::Engine;
use crate::core::{ActivePlan, Extent, Intent};
use crate::io::backing::AlignedBuf;
use std::time::Instant;

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
    /// A discard or write-zeroes: async mode may ship it as a zeroing (see [`Shipped`]); in the
    /// other modes the background copy takes its regions.
    Other,
}

/// A shipped write the front end issues to the target itself, with its source write (see
/// [`Engine::ship_early`]), and whose target half it reports by `seq` (with its source half to
/// [`Engine::ship_early_done`], or alone to [`Engine::ship_direct_landed`]).
#[derive(Debug)]
pub struct DirectShip {
    pub seq: u64,
    pub off: u64,
    pub len: u64,
    /// The buffered bytes (`len` of them): the engine keeps them under `handle` until the
    /// write's landing is reported, or [`Engine::leak_ship_bufs`] gives them up.
    pub buf: *const u8,
    pub handle: u64,
}

/// What a shipped write's completion hands to the replication queue
/// ([`Engine::ship_written`]).
pub enum Shipped {
    /// A copy of the bytes written.
    Bytes(AlignedBuf),
    /// A discard or write-zeroes that the source carried out: its range reads as zeroes, and
    /// the target's range is zeroed in its turn (no bytes buffered).
    Zeroes,
    /// Nothing to ship (it failed, its data could not be taken, or a discard the source
    /// refused left the data as it was): it ends as an ordinary write, its regions dirty.
    Nothing,
}

impl Engine {
    pub fn intent_durable(&self, seq: u64) -> bool {
        self.lock().state.intent_durable(seq)
    }

    /// Call just before issuing an fdatasync of the bitmap; pass the result to
    /// [`Self::bitmap_flush_done`].
    pub fn bitmap_flush_start(&self) -> u64 {
        self.lock().state.bitmap_flush_started()
    }

    pub fn bitmap_flush_done(&self, seq: u64, ok: bool) {
        let mut g = self.lock();
        // A bitmap whose mapping lost pages (crate::io::sigbus) did not make their bits durable:
        // the flush counts only once the file is marked so that no later start trusts it.
        let (trusted, lost) = self.check_bitmap_lost(&mut g);
        g.state.bitmap_flush_done(seq, ok && trusted);
        drop(g);
        if let Some(error) = lost {
            self.events.emit("bitmap-lost", serde_json::json!({ "error": error }));
        }
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
    /// what to do now. `write`: what kind of request it is (may it be mirrored or shipped).
    /// `may_wait`: the caller can retry later.
    pub fn begin_request(&self, ext: Extent, off: u64, len: u64, write: WriteKind, may_wait: bool) -> WriteAdmission {
        self.begin_request_with_copy(ext, off, len, write, may_wait, None, &[]).0
    }

    /// [`Self::begin_request`] for a write whose bytes the caller copied beforehand (`copy`,
    /// for a caller that can write the target itself and expects the write to be shipped): if
    /// the write is shipped with its intent already durable, [`Self::ship_early`]'s question
    /// is asked in the same hold of the lock, and its answer comes back (`Ok`: issue the
    /// target write with the source write; `Err`: the copy, kept for later). The copy also
    /// comes back (`Err`) when the write is not shipped or must wait for its intent first.
    ///
    /// `sources_done`: early writes (id, whether the source took all of it) whose source
    /// halves completed since the caller last reported ([`Self::ship_early_source_done`] for
    /// each), reported first, before the new write's overlap checks.
    #[allow(clippy::too_many_arguments)]
    pub fn begin_request_with_copy(
        &self,
        ext: Extent,
        off: u64,
        len: u64,
        write: WriteKind,
        may_wait: bool,
        copy: Option<AlignedBuf>,
        sources_done: &[(u64, bool)],
    ) -> (WriteAdmission, Option<Result<DirectShip, AlignedBuf>>) {
        let mut g = self.lock();
        let mut done = crate::core::ShipLanded::default();
        for &(id, ok) in sources_done {
            done.absorb(g.state.ship_early_source_done(id, ok));
        }
        let a = self.begin_locked(&mut g, ext, off, len, write, may_wait);
        let early = match (a, copy) {
            (WriteAdmission::Go(Intent::Ready, ActivePlan::Ship { id }), Some(b)) => Some(self.ship_early_locked(&mut g, id, b)),
            (_, copy) => copy.map(Err),
        };
        if sources_done.is_empty() {
            drop(g);
        } else {
            g.progress.unsynced_since.get_or_insert_with(Instant::now);
            self.after_direct_landing(g, done, None);
        }
        (a, early)
    }

    fn begin_locked(&self, g: &mut super::LockedState, ext: Extent, off: u64, len: u64, write: WriteKind, may_wait: bool) -> WriteAdmission {
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
        let aligned = off % self.ship_block == 0 && len % self.ship_block == 0;
        if aligned && !self.write_blocking_now() && g.state.ship().is_some_and(|q| q.shipping()) {
            let (i, p) = g.state.begin_shipped_write(ext, off, len);
            return WriteAdmission::Go(i, p);
        }
        WriteAdmission::Go(g.state.begin_write(ext), ActivePlan::SourceOnly)
    }

    /// Ends a write begun with [`Self::begin_request`].
    pub fn end_write_planned(&self, ext: Extent, plan: ActivePlan, source_ok: bool, target_ok: bool) {
        if let ActivePlan::Ship { id } = plan {
            // A shipped write that ends here was not buffered (it failed, or its data could
            // not be taken): an ordinary write.
            return self.ship_written(id, source_ok, Shipped::Nothing);
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

    /// Async mode: the source write of shipped write `id` completed (`source_ok`), with what to
    /// ship (see [`Shipped`]). Queues it for the target (see [`MirrorState::ship_source_done`]);
    /// the request may complete once this returns.
    pub fn ship_written(&self, id: u64, source_ok: bool, data: Shipped) {
        let mut g = self.lock();
        let (ok, handle) = match data {
            Shipped::Bytes(b) if source_ok => (true, g.ship_bufs.insert(b) as u64),
            Shipped::Zeroes if source_ok => (true, crate::core::ship::ZEROES),
            _ => (false, crate::core::ship::ZEROES),
        };
        let was_empty = g.state.ship().is_none_or(|q| q.queued() == 0);
        let out = g.state.ship_source_done(id, ok, handle);
        let unqueued = (!out.queued && ok).then_some(handle);
        let mut bufs = Vec::new();
        Self::take_ship_bufs(&mut g, unqueued.into_iter().chain(out.freed.iter().copied()), &mut bufs);
        g.progress.unsynced_since.get_or_insert_with(Instant::now);
        self.announce_pair_change(&g);
        drop(g);
        self.recycle_ship_bufs(bufs);
        if let Some(why) = out.fell_behind {
            self.ship_fell_behind(why);
        }
        // The loop ships what it finds queued after each completion: it needs waking only
        // when the queue was empty.
        if out.wake || (out.queued && was_empty) || out.fell_behind.is_some() {
            self.wake();
        }
    }

    /// Async mode, early shipping: shipped write `id` is about to be issued to the source (its
    /// intent durable), and the caller, which can write the target itself, copied its bytes
    /// into `buf`. If the write may go to the target now ([`MirrorState::ship_early`]: the live
    /// loop lets queues ship ([`LockedState::ship_gate`]), not paused, no --on-consistent
    /// command running, nothing queued before it, the queue's rules), the engine keeps `buf`
    /// and hands back what to issue to the target, *together with* the source write; the
    /// caller reports both halves once both completed to [`Self::ship_early_done`] (or each on
    /// its own: the source half to [`Self::ship_early_source_done`], the target half to
    /// [`Self::ship_direct_landed`]). Otherwise `buf` comes back, for [`Self::ship_written`]
    /// when the source write completes.
    ///
    /// Issued together, both halves complete at about the same time and are handled in the same
    /// pass of the caller's ring, as in write-blocking mode, and the mirror loop has no work per
    /// write; the request still completes when its source write does.
    ///
    /// [`MirrorState::ship_early`]: crate::core::MirrorState::ship_early
    /// [`LockedState::ship_gate`]: super::LockedState::ship_gate
    pub fn ship_early(&self, id: u64, buf: AlignedBuf) -> Result<DirectShip, AlignedBuf> {
        self.ship_early_locked(&mut self.lock(), id, buf)
    }

    fn ship_early_locked(&self, g: &mut super::LockedState, id: u64, buf: AlignedBuf) -> Result<DirectShip, AlignedBuf> {
        let Some(gate) = g.ship_gate.clone() else { return Err(buf) };
        // As the loop's own shipping: nothing goes while paused or while an --on-consistent
        // command looks at the target.
        if self.paused() || self.hook_running() {
            return Err(buf);
        }
        // No count limit: the loop's (--max-copies) sizes the loop's ring, and an early write
        // goes on the caller's; the buffer's capacity bounds them. A limit, once reached, would
        // send writes to the loop's queue, and early shipping resumes only once that queue is
        // empty, which a steady load may not let happen for long.
        let hold = gate.spacing.hold(Instant::now());
        // The handle the buffer gets if the write goes: the slab's next key (nothing else
        // inserts under the lock held here).
        let handle = g.ship_bufs.vacant_key() as u64;
        let Some(s) = g.state.ship_early(id, handle, usize::MAX, hold) else { return Err(buf) };
        let ptr = buf.as_ptr();
        let inserted = g.ship_bufs.insert(buf) as u64;
        debug_assert_eq!(inserted, handle);
        self.ship_direct_writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(DirectShip { seq: s.seq, off: s.off, len: s.len, buf: ptr, handle })
    }

    /// Async mode: the source write of early write `id` ([`Self::ship_early`]) completed
    /// (`source_ok`: in full); the request may complete once this returns. The write lands if
    /// its target half has too (a source failure ends it as an ordinary write, its regions
    /// dirty: the target may hold bytes the source did not take, which the copy repairs).
    pub fn ship_early_source_done(&self, id: u64, source_ok: bool) {
        let mut g = self.lock();
        let out = g.state.ship_early_source_done(id, source_ok);
        g.progress.unsynced_since.get_or_insert_with(Instant::now);
        self.after_direct_landing(g, out, None);
    }

    /// Async mode: the target write of a shipped write the caller issued itself
    /// ([`Self::ship_early`]) completed; `error` is `None` if the target took all of it. Once
    /// its source half completed too ([`Self::ship_early_source_done`]), it ends as the loop's
    /// landings do (a target failure makes the queue fall behind). Wakes
    /// the loop when it has something to do: writes queued (they may have waited for this one),
    /// none left in flight (a flush may be due), a write that ends a wait, or a failure (the
    /// loop's target-failure handling: backoff, reset, failure count, events).
    pub fn ship_direct_landed(&self, seq: u64, error: Option<String>) {
        let mut g = self.lock();
        let out = g.state.ship_landed(seq, error.is_none());
        self.after_direct_landing(g, out, error);
    }

    /// Async mode: both halves of early write `id` (queue entry `seq`, see [`Self::ship_early`])
    /// completed: its source write (`source_ok`) and its target write (`error`: `None` if the
    /// target took all of it). One hold of the lock for what [`Self::ship_early_source_done`]
    /// and [`Self::ship_direct_landed`] do in turn.
    pub fn ship_early_done(&self, id: u64, seq: u64, source_ok: bool, error: Option<String>) {
        let mut g = self.lock();
        let mut out = g.state.ship_early_source_done(id, source_ok);
        out.absorb(g.state.ship_landed(seq, error.is_none()));
        g.progress.unsynced_since.get_or_insert_with(Instant::now);
        self.after_direct_landing(g, out, error);
    }

    /// What follows a landing reported by a queue: buffers freed, the loop woken if needed.
    fn after_direct_landing(&self, mut g: std::sync::MutexGuard<'_, super::LockedState>, out: crate::core::ShipLanded, error: Option<String>) {
        let mut bufs = Vec::new();
        Self::take_ship_bufs(&mut g, out.freed.iter().copied(), &mut bufs);
        let loop_needed = g.state.ship().is_some_and(|q| q.queued() > 0 || q.in_flight() == 0);
        let failed = error.is_some();
        if let Some(e) = error {
            g.ship_direct_failure.get_or_insert(e);
            self.ship_direct_failed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.announce_pair_change(&g);
        drop(g);
        self.recycle_ship_bufs(bufs);
        if let Some(why) = out.fell_behind {
            self.ship_fell_behind(why);
        }
        if out.wake || loop_needed || failed || out.fell_behind.is_some() {
            self.wake();
        }
    }

    /// The failure of a target write a queue issued itself, once (see
    /// [`Self::ship_direct_landed`]); the mirror loop asks on every pass.
    pub(crate) fn take_ship_direct_failure(&self) -> Option<String> {
        if !self.ship_direct_failed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        self.lock().ship_direct_failure.take()
    }

    /// Buffers of shipped writes the caller issued and can no longer wait for (its ring is
    /// gone): the kernel may still read them, so they are leaked, not freed. Their writes stay
    /// in flight for the state (no consistent point, their regions stay dirty), as after a crash.
    pub fn leak_ship_bufs(&self, handles: impl IntoIterator<Item = u64>) {
        let mut g = self.lock();
        for h in handles {
            if let Some(b) = g.ship_bufs.try_remove(h as usize) {
                std::mem::forget(b);
            }
        }
    }

    /// Async mode: the queue fell behind (the background copy takes over): logged and evented.
    pub(crate) fn ship_fell_behind(&self, why: crate::core::ship::BehindReason) {
        log::info!("async: shipping fell behind ({}); the background copy takes over", why.name());
        self.events.emit("async-behind", serde_json::json!({ "reason": why.name() }));
    }

    /// Async mode: a buffer for a copy of a shipped write's `len` bytes (from the pool).
    pub fn ship_buffer(&self, len: usize) -> AlignedBuf {
        self.ship_pool.take(len)
    }

    /// Frees the buffers of shipped writes the state handed back (`handles`), into the pool,
    /// which keeps up to a quarter of the replication buffer's size for reuse.
    pub(crate) fn free_ship_bufs(&self, g: &mut super::LockedState, handles: impl IntoIterator<Item = u64>) {
        let mut bufs = Vec::new();
        Self::take_ship_bufs(g, handles, &mut bufs);
        self.recycle_ship_bufs(bufs);
    }

    /// Takes the buffers of shipped writes the state handed back (`handles`) out of
    /// `ship_bufs` into `out`, for [`Self::recycle_ship_bufs`] once the lock is released: the
    /// paths that run for every shipped write keep the pool's lock (and a buffer's release)
    /// out of the state lock, which the device's queues wait for.
    pub(crate) fn take_ship_bufs(g: &mut super::LockedState, handles: impl IntoIterator<Item = u64>, out: &mut Vec<AlignedBuf>) {
        out.extend(handles.into_iter().filter_map(|h| g.ship_bufs.try_remove(h as usize)));
    }

    /// Gives buffers taken by [`Self::take_ship_bufs`] to the pool, which keeps up to a
    /// quarter of the replication buffer's size for reuse (and frees the rest).
    pub(crate) fn recycle_ship_bufs(&self, bufs: impl IntoIterator<Item = AlignedBuf>) {
        let limit = self.async_buffer() / 4;
        for b in bufs {
            self.ship_pool.give(b, limit);
        }
    }

    /// Async mode: the device received a FLUSH, or completed a FUA write: the epoch closes.
    /// In the other modes every FLUSH would take the engine's lock for nothing: a queue that is
    /// not in async mode ships nothing, and shipping starts again in a new epoch (resume).
    pub fn ship_device_flush(&self) {
        if self.mode() == super::CopyMode::Async {
            self.lock().state.ship_device_flush();
        }
    }
}
