//! Ordered asynchronous shipping (`--mode async`, DRBD's protocol A): the replication queue's
//! decisions, with no I/O and no data in them.
//!
//! A write that is shipped completes to the application once it is on the source and its bytes
//! are in the replication buffer (the engine holds them, under a handle this queue carries). The
//! mirror loop then writes the buffered writes to the target in the order of their **epochs**:
//! the writes that completed between two flushes of the device (a FLUSH, or after a FUA write)
//! form an epoch, and
//!
//! 1. no write of a later epoch is issued to the target before every write of the earlier ones
//!    is durable there (written, and covered by a target flush that started after it completed);
//! 2. within an epoch, a write that overlaps one still in flight to the target waits for it (the
//!    source applied them in that order: the second began after the first completed);
//! 3. nothing is issued while a target flush is in flight.
//!
//! So at any instant the target's medium holds every write of the epochs before some epoch `e`
//! and a subset of `e`'s: the state of a disk that lost power after flush `e - 1` (a crash
//! image). A target flush issued with nothing in flight makes a prefix of the queue durable: a
//! consistent point (the target then equals the source as of the moment the last shipped write
//! completed, writes then in flight on the source excluded, which a crash allows, and writes of
//! the same epoch issued early past queued ones included, which a disk that kept a later
//! write of an epoch and lost earlier ones, not overlapping it, would hold too).
//!
//! **Behind.** When the buffer is full, a target write or flush fails, or shipping is switched
//! off, the queue falls behind: every queued write is handed back to be ended as an ordinary
//! write (its regions are dirty in the bitmap anyway, and the background copy takes them), and
//! writes go unshipped until the background copy has caught up (the next consistent point
//! reached with nothing dirty); then shipping resumes.
//!
//! **Copies beside shipping.** A background copy reads the source as it is *now*, while queued
//! writes still describe the past: a target holding both is not a crash image until the queue
//! has shipped every write that was queued when the copy started. [`ShipQueue::copy_started`]
//! records that point, and [`ShipQueue::prefix_consistent`] says when it has passed.
//!
//! **Zeroings.** A discard or write-zeroes that the source carried out (its range reads as
//! zeroes after it) is shipped like a write, in its epoch and order, under the handle
//! [`ZEROES`]: it holds no bytes in the buffer, and the target's range is zeroed.

use std::collections::VecDeque;

/// The handle of a shipped zeroing (a discard or write-zeroes): no bytes are buffered; the
/// loop zeroes the range on the target.
pub const ZEROES: u64 = u64::MAX;

/// The most queued writes an early write may pass (each is checked for its epoch and an
/// overlap, under the engine's lock, as the write begins). Queued writes are those the loop has
/// not issued yet: a few dozen after a pause for a consistent point, more only when the target
/// is slower than the load, when shipping from the queue's thread gains nothing anyway.
pub const EARLY_PAST_QUEUED: usize = 128;

/// Whether the byte ranges `[off, end)` and `[other_off, other_end)` share a byte.
fn overlaps(off: u64, end: u64, other_off: u64, other_end: u64) -> bool {
    off < other_end && other_off < end
}

/// The buffer bytes a queued entry holds.
fn held(len: u64, handle: u64) -> u64 {
    if handle == ZEROES {
        0
    } else {
        len
    }
}

/// Why shipping fell behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BehindReason {
    /// The replication buffer had no room for a write.
    BufferFull,
    /// A target write or flush failed.
    TargetFailed,
    /// The mode was switched away from async, or the queue was started behind.
    Stopped,
}

impl BehindReason {
    pub fn name(self) -> &'static str {
        match self {
            BehindReason::BufferFull => "buffer-full",
            BehindReason::TargetFailed => "target-failed",
            BehindReason::Stopped => "stopped",
        }
    }
}

/// A write waiting in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shipment {
    /// Order of completion on the source (the queue's order).
    pub seq: u64,
    /// The write's id in [`crate::core::MirrorState`]'s active writes.
    pub id: u64,
    pub off: u64,
    pub len: u64,
    pub epoch: u64,
    /// The engine's handle on the buffered bytes.
    pub handle: u64,
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    seq: u64,
    id: u64,
    off: u64,
    end: u64,
    len: u64,
    handle: u64,
    /// Issued before the queue fell behind: its result no longer counts as mirrored.
    abandoned: bool,
    /// Issued with its source write ([`ShipQueue::push_early`]) and the source write has not
    /// completed yet: the write lands once both halves completed.
    source_pending: bool,
    /// The source write completed in full (always true for a write queued after its source).
    source_ok: bool,
    /// An early write's target half completed first: its result, waiting for the source's.
    target_done: Option<bool>,
    /// Issued early, by the front end (not counted in the loop's in-flight limit).
    early: bool,
}

/// What became of a shipped write whose target write completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Landed {
    pub id: u64,
    pub handle: u64,
    /// The target holds the write: end it as mirrored. Otherwise end it as an ordinary write.
    pub mirrored: bool,
    /// The target write took all of it (a failure is a target failure: the queue falls behind).
    pub target_ok: bool,
    /// The source write completed in full (false only for an early write whose source failed:
    /// it ends as an ordinary write, its regions dirty, for the background copy).
    pub source_ok: bool,
}

/// Counters for status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShipCounters {
    pub shipped_writes: u64,
    pub shipped_bytes: u64,
    /// Epochs closed by a device flush that held at least one shipped write.
    pub epochs: u64,
    pub fell_behind: u64,
    pub resumed: u64,
}

/// The replication queue of one mirror in async mode.
#[derive(Debug)]
pub struct ShipQueue {
    capacity: u64,
    /// Bytes buffered: queued and in flight to the target.
    used: u64,
    /// The most bytes ever buffered at once.
    peak: u64,
    behind: Option<BehindReason>,
    /// The epoch writes completing now join.
    open_epoch: u64,
    /// The open epoch holds a shipped write (for counting epochs).
    open_used: bool,
    queue: VecDeque<Shipment>,
    inflight: Vec<InFlight>,
    /// Of `inflight`, those [`Self::next`] issued (not early).
    loop_inflight: usize,
    /// The epoch of the writes issued since the last flush that made them all durable.
    unflushed_epoch: Option<u64>,
    /// A target flush is in flight; `Some(true)` if nothing was in flight when it started.
    flushing: Option<bool>,
    next_seq: u64,
    /// Writes queued before this seq must have landed before the target is a crash image again
    /// (see the module's "Copies beside shipping").
    copy_barrier: u64,
    counters: ShipCounters,
}

impl ShipQueue {
    /// A queue holding at most `capacity` bytes. It starts behind: shipping begins at the first
    /// consistent point (before it, the target is not known to equal the source).
    pub fn new(capacity: u64) -> Self {
        ShipQueue {
            capacity,
            used: 0,
            peak: 0,
            behind: Some(BehindReason::Stopped),
            open_epoch: 0,
            open_used: false,
            queue: VecDeque::new(),
            inflight: Vec::new(),
            loop_inflight: 0,
            unflushed_epoch: None,
            flushing: None,
            next_seq: 0,
            copy_barrier: 0,
            counters: ShipCounters::default(),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }
    pub fn set_capacity(&mut self, capacity: u64) {
        self.capacity = capacity;
    }
    pub fn used(&self) -> u64 {
        self.used
    }
    pub fn peak(&self) -> u64 {
        self.peak
    }
    /// The epoch writes completing now join.
    pub fn open_epoch(&self) -> u64 {
        self.open_epoch
    }
    pub fn behind(&self) -> Option<BehindReason> {
        self.behind
    }
    pub fn counters(&self) -> ShipCounters {
        self.counters
    }
    /// Writes queued, not yet issued to the target.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }
    /// Nothing buffered and nothing written to the target that a flush has not made durable.
    pub fn idle(&self) -> bool {
        self.queue.is_empty() && self.inflight.is_empty() && self.unflushed_epoch.is_none() && self.flushing.is_none()
    }
    /// Whether a new write may be shipped (the caller also checks that its regions are clean).
    pub fn shipping(&self) -> bool {
        self.behind.is_none()
    }

    /// A write of `len` bytes completed on the source (or a zeroing: `handle` [`ZEROES`]): queue
    /// it in the open epoch. Refused when behind, or when the buffer has no room (which makes
    /// the queue fall behind: the caller then ends the write as an ordinary one, and ends the
    /// writes [`Self::fall_behind`] returns).
    pub fn push(&mut self, id: u64, off: u64, len: u64, handle: u64) -> Result<u64, Option<BehindReason>> {
        if self.behind.is_some() {
            return Err(None);
        }
        let bytes = held(len, handle);
        if self.used.saturating_add(bytes) > self.capacity {
            return Err(Some(BehindReason::BufferFull));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.used += bytes;
        self.peak = self.peak.max(self.used);
        self.open_used = true;
        self.queue.push_back(Shipment { seq, id, off, len, epoch: self.open_epoch, handle });
        Ok(seq)
    }

    /// The device received a FLUSH (or completed a FUA write): the open epoch closes. Writes
    /// that complete from now on belong to the next one.
    pub fn device_flush(&mut self) {
        if self.open_used {
            self.counters.epochs += 1;
            self.open_used = false;
            self.open_epoch += 1;
        }
    }

    /// The next write to issue to the target, if rules 1 to 3 allow one now and fewer than
    /// `max_in_flight` of those this issued are in flight (early writes go on the front end's
    /// ring, not the caller's, and do not count). `hold`: issue nothing more (the caller wants
    /// a flush soon, to make a consistent point within a long epoch).
    pub fn next(&mut self, max_in_flight: usize, hold: bool) -> Option<Shipment> {
        // Holding stops adding to writes not yet flushed; with none, there is nothing to hold.
        let holding = hold && self.unflushed_epoch.is_some();
        if holding
            || self.behind.is_some()
            || self.flushing.is_some()
            || self.loop_inflight >= max_in_flight
        {
            return None;
        }
        let head = *self.queue.front()?;
        if self.unflushed_epoch.is_some_and(|e| head.epoch > e) {
            return None;
        }
        let end = head.off + head.len;
        if self.inflight.iter().any(|w| overlaps(head.off, end, w.off, w.end)) {
            return None;
        }
        self.queue.pop_front();
        self.loop_inflight += 1;
        self.unflushed_epoch = Some(head.epoch);
        self.inflight.push(InFlight {
            seq: head.seq,
            id: head.id,
            off: head.off,
            end,
            len: head.len,
            handle: head.handle,
            abandoned: false,
            source_pending: false,
            source_ok: true,
            target_done: None,
            early: false,
        });
        Some(head)
    }

    /// Early shipping: a write whose bytes are buffered under `handle` *before* its source write
    /// is issued (its intent durable), to be issued to the target together with it. Allowed
    /// when the order allows it to go now: shipping, no target flush in flight, fewer than
    /// `max_in_flight` in flight, not `hold`ing an unflushed epoch, the writes in flight and
    /// those still queued all from the open epoch (rule 1), none of either overlapping it (rule
    /// 2), and room in the buffer. Queued writes of the open epoch do not hold it back: they
    /// completed on the source before it began, but without a device flush between them a disk
    /// may keep the later write and lose the earlier ones, so a target holding it without them
    /// is still a crash image (see [`Self::prefix_end`] for what a consistent point holds).
    /// At most [`EARLY_PAST_QUEUED`] queued writes are looked at; behind more, it waits.
    ///
    /// It joins the open epoch at once, in flight; it lands when both its target write
    /// ([`Self::landed`]) and its source write ([`Self::source_done`]) completed, so a target
    /// flush that makes it durable and counts as a consistent point also finds its source write
    /// complete. Returns its sequence number.
    ///
    /// Why the epoch may be taken at issue: a device FLUSH covers only the writes that completed
    /// before it was issued; one in flight then may or may not be in the flushed image, so it
    /// may belong to the epoch it is issued in. A write that began after an earlier one ended
    /// is issued after it, in the same epoch or a later one.
    pub fn push_early(&mut self, id: u64, off: u64, len: u64, handle: u64, max_in_flight: usize, hold: bool) -> Option<u64> {
        let end = off + len;
        // The constant-time conditions first: the two scans run only for a write that passes them.
        let ok = self.behind.is_none()
            && self.queue.len() <= EARLY_PAST_QUEUED
            && self.flushing.is_none()
            && self.inflight.len() < max_in_flight
            && !(hold && self.unflushed_epoch.is_some())
            && self.unflushed_epoch.is_none_or(|e| e == self.open_epoch)
            && self.used.saturating_add(len) <= self.capacity
            && !self.inflight.iter().any(|w| overlaps(off, end, w.off, w.end))
            && self.queue.iter().all(|s| s.epoch == self.open_epoch && !overlaps(off, end, s.off, s.off + s.len));
        if !ok {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.used += len;
        self.peak = self.peak.max(self.used);
        self.open_used = true;
        self.unflushed_epoch = Some(self.open_epoch);
        self.inflight.push(InFlight {
            seq,
            id,
            off,
            end,
            len,
            handle,
            abandoned: false,
            source_pending: true,
            source_ok: false,
            target_done: None,
            early: true,
        });
        Some(seq)
    }

    /// Whether `seq` is an early write whose source write has not completed.
    pub fn awaits_source(&self, seq: u64) -> bool {
        self.inflight.iter().any(|w| w.seq == seq && w.source_pending)
    }

    /// The source write of early write `seq` completed (`ok`: in full). Returns its landing if
    /// its target write had completed too.
    pub fn source_done(&mut self, seq: u64, ok: bool) -> Option<Landed> {
        let i = self.inflight.iter().position(|w| w.seq == seq && w.source_pending)?;
        let w = &mut self.inflight[i];
        w.source_pending = false;
        w.source_ok = ok;
        let t = w.target_done?;
        Some(self.land(i, t))
    }

    /// The target write of `seq` completed (`ok`: in full). A failure makes the queue fall
    /// behind; the caller then ends the writes [`Self::fall_behind`] hands back.
    ///
    /// An early write whose source write is still in flight does not land yet: its result waits
    /// ([`Self::source_done`] lands it), and this returns None as for an unknown `seq`
    /// ([`Self::awaits_source`] tells them apart).
    pub fn landed(&mut self, seq: u64, ok: bool) -> Option<Landed> {
        let i = self.inflight.iter().position(|w| w.seq == seq)?;
        if self.inflight[i].source_pending {
            self.inflight[i].target_done = Some(ok);
            return None;
        }
        Some(self.land(i, ok))
    }

    /// The write in flight at `i` is over (`ok`: its target write took all of it).
    fn land(&mut self, i: usize, ok: bool) -> Landed {
        let w = self.inflight.swap_remove(i);
        if !w.early {
            self.loop_inflight -= 1;
        }
        self.used -= held(w.len, w.handle);
        let mirrored = ok && w.source_ok && !w.abandoned;
        if mirrored {
            self.counters.shipped_writes += 1;
            self.counters.shipped_bytes += w.len;
        }
        Landed { id: w.id, handle: w.handle, mirrored, target_ok: ok, source_ok: w.source_ok }
    }

    /// Is a target flush due? When something was written since the last one, nothing is in
    /// flight, and the queue's head belongs to a later epoch (rule 1), or the caller holds the
    /// queue to make a point, or the queue is empty and the caller lets an idle queue flush
    /// (`idle`: spaced, so that a queue that keeps emptying does not flush the pair each time).
    pub fn flush_due(&self, hold: bool, idle: bool) -> bool {
        let Some(e) = self.unflushed_epoch else { return false };
        self.flushing.is_none()
            && self.inflight.is_empty()
            && (hold || self.queue.front().map_or(idle, |h| h.epoch > e))
    }

    /// Everything queued has landed but is not flushed yet: the flush waits for the caller's
    /// idle spacing (see [`Self::flush_due`]), which the caller must wake up for.
    pub fn awaits_idle_flush(&self) -> bool {
        self.unflushed_epoch.is_some() && self.queue.is_empty() && self.inflight.is_empty() && self.flushing.is_none()
    }

    /// A target flush is starting (whatever made it due).
    pub fn flush_started(&mut self) {
        self.flushing = Some(self.inflight.is_empty());
    }

    /// The target flush completed. On success, if nothing was in flight when it started, the
    /// writes issued so far are durable: the next epoch may go. A failure is a target failure
    /// (the caller makes the queue fall behind).
    pub fn flush_done(&mut self, ok: bool) {
        let clean = self.flushing.take().unwrap_or(false);
        if ok && clean {
            self.unflushed_epoch = None;
        }
    }

    /// A background copy is starting: until every write queued before now has landed, the
    /// target is not a crash image (see the module's doc).
    pub fn copy_started(&mut self) {
        self.copy_barrier = self.next_seq;
    }

    /// The first write still queued (the next sequence number if none is): every write before
    /// it has been issued (landed, if nothing is in flight). Some after it may have been issued
    /// too, early ([`Self::push_early`]: of the same epoch as every queued write, overlapping
    /// none), so a consistent point holds every write before this one and possibly later ones
    /// of its epoch: a subset a disk could have kept.
    pub fn prefix_end(&self) -> u64 {
        self.queue.front().map(|s| s.seq).unwrap_or(self.next_seq)
    }

    /// Every write queued before the last copy started has landed, and nothing is in flight to
    /// the target: with nothing dirty or being copied, a flush now makes a crash image.
    pub fn prefix_consistent(&self) -> bool {
        self.inflight.is_empty() && self.prefix_end() >= self.copy_barrier
    }

    /// Falls behind: hands back every queued write (to be ended as ordinary writes, their
    /// buffers freed), marks those in flight as no longer mirrored (their buffers are freed when
    /// they land), and refuses new writes until [`Self::resume`]. Returns the writes handed back
    /// and the ids of those in flight.
    pub fn fall_behind(&mut self, why: BehindReason) -> (Vec<Shipment>, Vec<u64>) {
        if self.behind.is_none() {
            self.counters.fell_behind += 1;
        }
        self.behind = Some(why);
        for w in &mut self.inflight {
            w.abandoned = true;
        }
        let dropped: Vec<Shipment> = self.queue.drain(..).collect();
        self.used -= dropped.iter().map(|s| held(s.len, s.handle)).sum::<u64>();
        (dropped, self.inflight.iter().map(|w| w.id).collect())
    }

    /// Shipping resumes (the caller saw a consistent point with nothing dirty). Returns false if
    /// it was not behind.
    pub fn resume(&mut self) -> bool {
        if self.behind.take().is_none() {
            return false;
        }
        self.counters.resumed += 1;
        // The resume point is a consistent point: the next epoch starts clean.
        self.open_epoch += 1;
        self.open_used = false;
        true
    }

    /// Checks the queue's own invariants (tests and the simulator).
    pub fn check(&self) -> Result<(), String> {
        let bytes: u64 = self.queue.iter().map(|s| held(s.len, s.handle)).sum::<u64>()
            + self.inflight.iter().map(|w| held(w.len, w.handle)).sum::<u64>();
        if bytes != self.used {
            return Err(format!("buffer accounting: {} counted, {bytes} held", self.used));
        }
        if self.used > self.capacity.max(self.peak) {
            return Err("buffer over capacity".into());
        }
        if self.inflight.iter().filter(|w| !w.early).count() != self.loop_inflight {
            return Err("the loop's in-flight count drifted".into());
        }
        if self.behind.is_some() && !self.queue.is_empty() {
            return Err("writes queued while behind".into());
        }
        let epochs: Vec<u64> = self.queue.iter().map(|s| s.epoch).collect();
        if epochs.windows(2).any(|w| w[0] > w[1]) {
            return Err("queue out of epoch order".into());
        }
        if let (Some(e), Some(h)) = (self.unflushed_epoch, self.queue.front()) {
            if h.epoch < e {
                return Err(format!("a write of epoch {} queued behind epoch {e} in flight", h.epoch));
            }
        }
        // Rule 2 across the queue: a write in flight that passed a queued one (issued early)
        // must not overlap it, or the older bytes would land after the newer ones.
        for w in &self.inflight {
            if let Some(s) = self.queue.iter().find(|s| s.seq < w.seq && overlaps(w.off, w.end, s.off, s.off + s.len)) {
                return Err(format!("write {} in flight overlaps the older write {} still queued", w.seq, s.seq));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipping(cap: u64) -> ShipQueue {
        let mut q = ShipQueue::new(cap);
        assert!(q.resume());
        q
    }

    #[test]
    fn starts_behind_until_resumed() {
        let mut q = ShipQueue::new(1 << 20);
        assert_eq!(q.push(0, 0, 4096, 0), Err(None));
        assert!(q.resume());
        assert!(q.push(0, 0, 4096, 0).is_ok());
    }

    /// Rule 1: a write of the next epoch waits until the previous epoch is flushed.
    #[test]
    fn epochs_are_flushed_in_order() {
        let mut q = shipping(1 << 20);
        q.push(1, 0, 4096, 10).unwrap();
        q.push(2, 8192, 4096, 11).unwrap();
        q.device_flush();
        q.push(3, 16384, 4096, 12).unwrap();
        let a = q.next(8, false).unwrap();
        let b = q.next(8, false).unwrap();
        assert_eq!((a.id, b.id), (1, 2));
        assert_eq!(q.next(8, false), None, "epoch 1 waits for epoch 0's flush");
        assert!(!q.flush_due(false, true), "writes still in flight");
        q.landed(a.seq, true).unwrap();
        q.landed(b.seq, true).unwrap();
        assert_eq!(q.next(8, false), None);
        assert!(q.flush_due(false, false), "an epoch boundary needs no idle time");
        q.flush_started();
        assert_eq!(q.next(8, false), None, "nothing issued during a flush");
        q.flush_done(true);
        assert_eq!(q.next(8, false).unwrap().id, 3);
        assert_eq!(q.counters().epochs, 1);
    }

    /// A failed flush keeps the barrier: the next epoch still waits.
    #[test]
    fn a_failed_flush_keeps_the_barrier() {
        let mut q = shipping(1 << 20);
        q.push(1, 0, 4096, 0).unwrap();
        q.device_flush();
        q.push(2, 4096, 4096, 1).unwrap();
        let a = q.next(8, false).unwrap();
        q.landed(a.seq, true);
        q.flush_started();
        q.flush_done(false);
        assert_eq!(q.next(8, false), None);
        assert!(q.flush_due(false, true));
    }

    /// Rule 2: overlapping writes go to the target one after the other, in queue order.
    #[test]
    fn overlapping_writes_are_serialized() {
        let mut q = shipping(1 << 20);
        q.push(1, 0, 8192, 0).unwrap();
        q.push(2, 4096, 4096, 1).unwrap();
        let a = q.next(8, false).unwrap();
        assert_eq!(q.next(8, false), None);
        q.landed(a.seq, true);
        assert_eq!(q.next(8, false).unwrap().id, 2);
    }

    #[test]
    fn a_full_buffer_refuses_and_falling_behind_hands_back_the_queue() {
        let mut q = shipping(8192);
        q.push(1, 0, 4096, 0).unwrap();
        let a = q.next(8, false).unwrap();
        q.push(2, 4096, 4096, 1).unwrap();
        assert_eq!(q.push(3, 8192, 4096, 2), Err(Some(BehindReason::BufferFull)));
        let (back, flying) = q.fall_behind(BehindReason::BufferFull);
        assert_eq!(flying, vec![1]);
        assert_eq!(back.iter().map(|s| s.id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(q.used(), 4096, "the write in flight keeps its buffer");
        let l = q.landed(a.seq, true).unwrap();
        assert!(!l.mirrored, "issued before falling behind: no longer counts");
        assert_eq!(q.used(), 0);
        assert_eq!(q.push(4, 0, 4096, 3), Err(None));
        q.check().unwrap();
    }

    #[test]
    fn copies_hold_consistency_until_the_older_writes_landed() {
        let mut q = shipping(1 << 20);
        q.push(1, 0, 4096, 0).unwrap();
        q.copy_started();
        assert!(!q.prefix_consistent());
        q.push(2, 4096, 4096, 1).unwrap();
        let a = q.next(8, false).unwrap();
        assert!(!q.prefix_consistent(), "in flight");
        q.landed(a.seq, true);
        assert!(q.prefix_consistent(), "write 2 was queued after the copy started");
    }

    #[test]
    fn an_idle_queue_flushes_only_when_let() {
        let mut q = shipping(1 << 20);
        q.push(1, 0, 4096, 0).unwrap();
        let a = q.next(8, false).unwrap();
        q.landed(a.seq, true);
        assert!(!q.flush_due(false, false));
        assert!(q.flush_due(false, true));
    }

    #[test]
    fn hold_stops_issuing_and_makes_a_flush_due() {
        let mut q = shipping(1 << 20);
        q.push(1, 0, 4096, 0).unwrap();
        q.push(2, 4096, 4096, 1).unwrap();
        let a = q.next(8, true).unwrap();
        assert_eq!(a.id, 1, "nothing unflushed: holding holds nothing");
        assert_eq!(q.next(8, true), None);
        q.landed(a.seq, true);
        assert!(!q.flush_due(false, true), "same epoch queued: no boundary yet");
        assert!(q.flush_due(true, false));
    }

    /// A zeroing holds no buffer bytes (a 1 GiB discard does not fill a 64 KiB buffer), and is
    /// ordered like a write: in its epoch, after an overlapping write in flight.
    #[test]
    fn zeroings_hold_no_bytes_and_keep_their_order() {
        let mut q = ShipQueue::new(8192);
        assert!(q.resume());
        q.push(1, 0, 4096, 0).unwrap();
        q.push(2, 0, 1 << 30, ZEROES).unwrap();
        assert_eq!(q.used(), 4096);
        q.check().unwrap();
        let a = q.next(8, false).unwrap();
        assert_eq!(a.id, 1);
        assert!(q.next(8, false).is_none(), "the zeroing overlaps the write in flight");
        q.landed(a.seq, true).unwrap();
        let z = q.next(8, false).unwrap();
        assert_eq!((z.id, z.handle), (2, ZEROES));
        q.landed(z.seq, true).unwrap();
        assert_eq!(q.used(), 0);
        q.check().unwrap();
        q.push(3, 0, 1 << 30, ZEROES).unwrap();
        q.fall_behind(BehindReason::Stopped);
        assert_eq!(q.used(), 0);
        q.check().unwrap();
    }
    /// Early shipping goes only where the order allows it: its epoch the one unflushed on the
    /// target, no overlap in flight or queued, no flush, no hold, room in the buffer.
    #[test]
    fn an_early_write_goes_only_where_the_order_allows() {
        let mut q = shipping(2 * 4096);
        let a = q.push_early(1, 0, 4096, 10, 8, false).expect("an empty queue lets it go");
        assert_eq!(q.push_early(2, 0, 4096, 11, 8, false), None, "overlaps a write in flight");
        assert_eq!(q.push_early(2, 4096, 4096, 11, 1, false), None, "the in-flight limit");
        assert_eq!(q.push_early(2, 4096, 4096, 11, 8, true), None, "held for a point");
        q.device_flush();
        assert_eq!(q.push_early(2, 4096, 4096, 11, 8, false), None, "the next epoch waits for the flush");
        q.push(3, 8192, 4096, 12).unwrap();
        q.check().unwrap();
        assert!(q.next(8, false).is_none(), "epoch 1 waits for epoch 0's flush");
        assert_eq!(q.source_done(a, true), None, "its target write is in flight");
        q.landed(a, true).expect("both halves done");
        assert!(q.flush_due(false, false));
        q.flush_started();
        assert_eq!(q.push_early(2, 4096, 4096, 11, 8, false), None, "nothing during a flush");
        q.flush_done(true);
        assert_eq!(q.push_early(2, 8192, 4096, 11, 8, false), None, "overlaps a write queued before it");
        q.push_early(2, 4096, 4096, 11, 8, false).expect("queued writes of its epoch that it does not overlap do not hold it");
        assert_eq!(q.next(8, false).unwrap().id, 3, "the queued write goes next, beside it");
        q.check().unwrap();
        assert_eq!(q.push_early(4, 16384, 4096, 13, 8, false), None, "no room in the buffer");
        q.check().unwrap();
        assert_eq!(q.used(), 2 * 4096);
    }

    /// Queued writes hold an early write back when one is of an earlier epoch (rule 1) or
    /// overlaps it (rule 2), or when there are more than EARLY_PAST_QUEUED of them; otherwise it
    /// goes past them, and a consistent point's prefix still ends at the first queued one.
    #[test]
    fn an_early_write_passes_queued_writes_of_its_epoch_only() {
        let mut q = shipping(1 << 30);
        let first = q.push(1, 0, 4096, 10).unwrap();
        q.device_flush();
        assert_eq!(q.push_early(2, 8192, 4096, 11, 8, false), None, "a write of the earlier epoch is queued");
        let head = q.next(8, false).unwrap();
        assert_eq!(head.seq, first);
        q.landed(first, true).unwrap();
        assert!(q.flush_due(false, true), "epoch 0 landed: its flush");
        q.flush_started();
        q.flush_done(true);
        let queued = q.push(3, 0, 4096, 12).unwrap();
        assert_eq!(q.push_early(4, 2048, 4096, 13, 8, false), None, "overlaps a queued write");
        let early = q.push_early(4, 4096, 4096, 13, 8, false).expect("passes the queued write of its epoch");
        assert!(early > queued);
        assert_eq!(q.prefix_end(), queued, "the prefix ends at the write still queued");
        assert!(!q.prefix_consistent(), "a write is in flight");
        q.check().unwrap();
        assert_eq!(q.source_done(early, true), None);
        q.landed(early, true).expect("both halves done");
        assert!(q.prefix_consistent(), "nothing in flight: a flush now is a point with the early write and without the queued one");
        for i in 0..EARLY_PAST_QUEUED as u64 {
            q.push(10 + i, (1 << 20) + i * 4096, 4096, 100 + i).unwrap();
        }
        assert_eq!(q.push_early(5, 8192, 4096, 14, 8, false), None, "more queued than it may pass");
        q.check().unwrap();
    }

    /// An early write lands once both halves completed, in either order; a source failure
    /// ends it unmirrored (the target may hold bytes the source did not take), a target
    /// failure too, and says which.
    #[test]
    fn an_early_write_lands_with_both_halves() {
        let mut q = shipping(1 << 20);
        let a = q.push_early(1, 0, 4096, 10, 8, false).unwrap();
        assert!(q.awaits_source(a));
        assert_eq!(q.landed(a, true), None, "its source write is in flight");
        assert!(!q.flush_due(true, true), "in flight until its source write completed");
        let l = q.source_done(a, true).expect("both halves done");
        assert!(l.mirrored && l.target_ok && l.source_ok);
        assert_eq!(q.counters().shipped_writes, 1);

        let b = q.push_early(2, 0, 4096, 11, 8, false).unwrap();
        assert_eq!(q.source_done(b, false), None, "its target write is in flight");
        let l = q.landed(b, true).expect("both halves done");
        assert!(!l.mirrored && l.target_ok && !l.source_ok, "{l:?}");

        let c = q.push_early(3, 0, 4096, 12, 8, false).unwrap();
        assert_eq!(q.landed(c, false), None);
        let l = q.source_done(c, true).unwrap();
        assert!(!l.mirrored && !l.target_ok && l.source_ok, "{l:?}");
        assert_eq!(q.counters().shipped_writes, 1);
        assert_eq!(q.used(), 0);
        q.check().unwrap();
    }

    /// The loop's in-flight limit counts only the writes it issued: early ones go on the front
    /// end's ring.
    #[test]
    fn early_writes_do_not_count_in_the_loops_limit() {
        let mut q = shipping(1 << 20);
        q.push_early(1, 0, 4096, 10, usize::MAX, false).unwrap();
        q.push(2, 8192, 4096, 11).unwrap();
        assert_eq!(q.next(1, false).map(|s| s.id), Some(2));
        q.push(3, 16384, 4096, 12).unwrap();
        assert_eq!(q.next(1, false), None, "the loop's one write is in flight");
    }
}
