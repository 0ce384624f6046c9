//! The pair flush (target flush and source fdatasync together), the consistent points it
//! marks, and the bitmap flushes that make the cleared bits durable.

use super::{Mirror, SRC_FIXED};
use crate::core::FlushKind;
use crate::error::{Error, Result};
use crate::io::target::TargetOp;
use crate::io::uring::{push, Owner};
use io_uring::{opcode, types};
use std::io;
use std::time::Instant;

/// The pair flush's target half: a token no copy slot reaches.
pub(super) const FLUSH_TOKEN: u64 = (1 << 40) - 1;
/// The pair flush's source half: a sub-identifier no copy slot reaches.
pub(super) const SRC_FLUSH_SLOT: usize = (1 << 40) - 1;

impl Mirror<'_> {
    pub(super) fn maybe_flush(&mut self, stopping: bool) -> Result<()> {
        // With a flush in flight the state's is in flight too: nothing awaits an idle flush.
        self.ship_idle_wait = false;
        if self.target_flush.is_some() {
            return Ok(());
        }
        self.consistent_after = None;
        let mut ship_due = false;
        let due = {
            let g = self.engine.lock();
            // For next_timeout, this pass (nothing changes the state in between): asked here,
            // under this lock, rather than under one more.
            self.ship_idle_wait = g.state.ship_awaits_idle_flush();
            // A failed target is flushed again only once its backoff has passed and it was reset
            // (start_copies does both), and never once mirroring gave up (it then never resets):
            // a clean device with a broken target must not re-issue its failing consistent flush
            // in a tight loop, counting failures past max_retries. An offline copy that
            // ends on an error still tries its draining checkpoint (its last chance to keep the
            // progress made; if the target is what failed, that flush fails too, harmlessly).
            if self.needs_reset && self.fatal.is_none() {
                false
            } else if !self.offline && {
                let now = Instant::now();
                g.state.ship_flush_due(self.ship_spacing.hold(now), self.ship_spacing.idle_flush(now))
            } {
                // Async mode: an epoch (or a held part of one) is on the target: make it durable.
                ship_due = true;
                true
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
        // The flush that starts now is the one awaited, if any.
        self.ship_idle_wait = false;
        // Async mode's epoch flushes need the source's fdatasync only to clear bits (see
        // ShipSpacing): most go to the target alone.
        let with_source = self.ship_spacing.with_source(Instant::now(), ship_due, stopping);
        let kind = {
            let mut g = self.engine.lock();
            if with_source {
                g.state.target_flush_started()
            } else {
                g.state.target_only_flush_started()
            }
        };
        self.target_flush = Some(kind);
        self.flush_with_source = with_source;
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
        self.flush_parts = if with_source { 2 } else { 1 };
        self.flush_error = None;
        // SAFETY: a flush refers to no memory; the source is a fixed file of this ring.
        unsafe { self.target.submit(&mut self.ring, TargetOp::Flush, FLUSH_TOKEN) }
            .map_err(|e| Error::io("submitting a target flush", e))?;
        if !with_source {
            return Ok(());
        }
        let e = opcode::Fsync::new(types::Fixed(SRC_FIXED)).flags(types::FsyncFlags::DATASYNC).build();
        // SAFETY: as above.
        unsafe { push(&mut self.ring, e, Owner::Source, SRC_FLUSH_SLOT as u64) }
            .map_err(|e| Error::io("submitting a source flush", e))
    }

    /// One part of the pair flush completed; the flush is done when both are.
    pub(super) fn on_flush_part(&mut self, r: io::Result<u32>, what: &str) -> Result<()> {
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
        self.ship_spacing.flushed(Instant::now(), self.flush_with_source);
        self.update_ship_gate();
        self.ship_point(out.resumed);
        if out.consistent {
            if let Some(h) = self.hooks.at_consistent_point.as_mut() {
                h();
            }
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
