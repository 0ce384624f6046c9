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
