//! Async mode's shipping: the loop issues the writes of the replication queue to the target in
//! the order [`crate::core::ship`] allows, and reports each landing to the engine's state. The
//! flushes at epoch boundaries are the pair flushes of `flush`, made due by
//! [`crate::core::MirrorState::ship_flush_due`].

use super::Mirror;
use crate::core::ship::{BehindReason, ZEROES};
use crate::error::{Error, Result};
use crate::io::target::TargetOp;
use std::io;
use std::time::Instant;

/// Target tokens of shipped writes: this bit set, the queue's sequence number in the bits below
/// (copy jobs' slots stay far below it, and the pair flush's token is above every such value).
pub(super) const SHIP_TOKEN: u64 = 1 << 39;
const SEQ_MASK: u64 = SHIP_TOKEN - 1;

/// A shipped write in flight to the target.
pub(super) struct ShipJob {
    seq: u64,
    off: u64,
    len: u64,
    /// Bytes the target took so far (a file may take a write in parts).
    done: u64,
    /// The buffered bytes: the engine's `ship_bufs` keeps them until the write landed (null
    /// for a zeroing: `handle` is [`ZEROES`]).
    buf: *const u8,
    pub(super) handle: u64,
}

impl Mirror<'_> {
    /// Issues the queued writes that may go now. Nothing is shipped while the target waits
    /// for its reset or its backoff (the queue has fallen behind then anyway), nor while the
    /// mirror is paused or an --on-consistent command runs (it sees the target hold still; the
    /// queue fills meanwhile, and falls behind when full).
    pub(super) fn start_shipping(&mut self) -> Result<()> {
        // A target write a queue issued itself failed: handled as the loop's own would be (the
        // queue fell behind already).
        if let Some(msg) = self.engine.take_ship_direct_failure() {
            self.target_failed(&msg);
        }
        if self.needs_reset
            || self.backoff.retry_at().is_some()
            || self.draining
            || self.engine.paused()
            || self.engine.hook_running()
        {
            return Ok(());
        }
        let hold = self.ship_spacing.hold(Instant::now());
        // What may go now, taken under one lock (the front end's queues take it for every write).
        let batch: Vec<_> = {
            let mut g = self.engine.lock();
            let mut v = Vec::new();
            while let Some(s) = g.state.ship_next(self.cfg.max_copies, hold) {
                // A queued write's buffer stays in ship_bufs until it lands (ship_landed); a
                // zeroing has none.
                let buf = if s.handle == ZEROES {
                    Some(std::ptr::null())
                } else {
                    g.ship_bufs.get(s.handle as usize).map(|b| b.as_ptr())
                };
                v.push((s, buf));
            }
            v
        };
        for next in batch {
            let (s, Some(buf)) = next else {
                // Cannot happen (the queue and ship_bufs change together under the lock); if it
                // did, the write ends as an ordinary one (copied later).
                log::error!("async: queued write {} has no buffer", next.0.seq);
                self.landed.push((next.0.seq, false));
                self.report_landed();
                continue;
            };
            let token = SHIP_TOKEN | (s.seq & SEQ_MASK);
            self.ships.insert(token, ShipJob { seq: s.seq, off: s.off, len: s.len, done: 0, buf, handle: s.handle });
            self.issue_ship(token).map_err(|e| Error::io("submitting a shipped write", e))?;
        }
        Ok(())
    }

    fn issue_ship(&mut self, token: u64) -> io::Result<()> {
        let Some(j) = self.ships.get(&token) else { return Ok(()) };
        if j.handle == ZEROES {
            let op = TargetOp::Zero { off: j.off, len: j.len };
            // SAFETY: a zeroing refers to no buffer.
            return unsafe { self.target.submit(&mut self.ring, op, token) };
        }
        // SAFETY: done < len, so the pointer stays inside the buffered write.
        let buf = unsafe { j.buf.add(j.done as usize) };
        let op = TargetOp::Write { off: j.off + j.done, buf, len: (j.len - j.done) as u32 };
        // SAFETY: the buffer is the engine's (ship_bufs) until this write landed: the queue
        // frees it only in ship_landed, after the completion, and Drop leaks it if the write
        // is still in flight when the loop goes.
        unsafe { self.target.submit(&mut self.ring, op, token) }
    }

    /// A shipped write's target operation completed.
    pub(super) fn on_shipped(&mut self, token: u64, r: io::Result<u32>) -> Result<()> {
        let Some(j) = self.ships.get_mut(&token) else { return Ok(()) };
        // A zeroing succeeds whole (its result counts no bytes).
        let whole = j.handle == ZEROES && r.is_ok();
        match r {
            _ if whole => {
                let seq = j.seq;
                self.ships.remove(&token);
                self.landed.push((seq, true));
                Ok(())
            }
            Ok(n) if n > 0 && j.done + (n as u64) < j.len => {
                j.done += n as u64;
                self.issue_ship(token).map_err(|e| Error::io("submitting a shipped write", e))
            }
            Ok(n) if n > 0 => {
                let seq = j.seq;
                self.ships.remove(&token);
                // Reported with the others of this batch of completions (report_landed).
                self.landed.push((seq, true));
                Ok(())
            }
            r => {
                let seq = j.seq;
                let msg = match r {
                    Err(e) => format!("target write of a shipped write at byte {}: {e}", j.off),
                    Ok(_) => format!("target write of a shipped write at byte {}: wrote nothing", j.off),
                };
                self.ships.remove(&token);
                self.landed.push((seq, false));
                self.report_landed();
                self.target_failed(&msg);
                Ok(())
            }
        }
    }

    /// Reports the landings (and failures) collected since the last call to the state, under
    /// one lock, and frees what it no longer holds. The loop calls it after each batch of
    /// completions, before it looks at what to ship or flush next.
    pub(super) fn report_landed(&mut self) {
        if self.landed.is_empty() {
            return;
        }
        let mut fell = None;
        let mut bufs = std::mem::take(&mut self.landed_bufs);
        {
            let mut g = self.engine.lock();
            for (seq, ok) in self.landed.drain(..) {
                let out = g.state.ship_landed(seq, ok);
                crate::engine::Engine::take_ship_bufs(&mut g, out.freed.iter().copied(), &mut bufs);
                fell = fell.or(out.fell_behind);
            }
            self.engine.announce_pair_change(&g);
        }
        self.engine.recycle_ship_bufs(bufs.drain(..));
        self.landed_bufs = bufs;
        if let Some(why) = fell {
            self.engine.ship_fell_behind(why);
        }
    }

    /// The ship gate for the engine as of now (see [`crate::engine::ShipGate`]).
    pub(super) fn ship_gate(&self) -> crate::engine::ShipGate {
        crate::engine::ShipGate { spacing: self.ship_spacing.clone() }
    }

    /// A flush completed: the gate's spacing counts from it too.
    pub(super) fn update_ship_gate(&self) {
        if self.gate_open {
            self.engine.lock().ship_gate = Some(self.ship_gate());
        }
    }

    /// No queue issues shipped writes from now on (the loop stops); the loop ships what they
    /// leave queued.
    pub(super) fn close_ship_gate(&mut self) {
        if std::mem::take(&mut self.gate_open) {
            self.engine.lock().ship_gate = None;
        }
    }

    /// Makes the queue fall behind (a target failure); records it once.
    pub(super) fn ship_fall_behind(&mut self, why: BehindReason) {
        let was = {
            let mut g = self.engine.lock();
            let (freed, was) = g.state.ship_fall_behind(why);
            self.engine.free_ship_bufs(&mut g, freed);
            was
        };
        if was {
            self.engine.ship_fell_behind(why);
        }
    }

    /// A flush completed (the spacing counts from it: `ShipSpacing::flushed`); it may have
    /// resumed shipping.
    pub(super) fn ship_point(&mut self, resumed: bool) {
        if resumed {
            log::info!("async: caught up; shipping resumes");
            self.engine.events().emit("async-resumed", serde_json::json!({}));
        }
    }
}
