//! Copy jobs: each reads a run of dirty regions from the source into its buffer and writes it
//! to the target (or zeroes the target over a hole of the source), one operation in flight at a
//! time, and reports the result to the engine's state. Which regions and how many at once is
//! decided by [`crate::core::MirrorState::next_copy`] and the rate policies.

use super::{Mirror, SRC_FIXED};
use crate::core::policy;
use crate::core::Extent;
use crate::error::{Error, Result};
use crate::io::backing::AlignedBuf;
use crate::io::target::TargetOp;
use crate::io::uring::{push, Owner};
use io_uring::{opcode, types};
use std::io;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Read,
    Write,
    Zero,
}

pub(super) struct Job {
    ext: Extent,
    /// Next byte to copy; the job is done when it reaches `end`.
    pos: u64,
    end: u64,
    phase: Phase,
    /// Current chunk `[pos, pos + chunk)` and how much of it the current phase has done.
    chunk: u64,
    done: u64,
    buf: usize,
}


impl Mirror<'_> {
    /// How many regions from where the next copy starts the source holds a hole, if more than
    /// one buffer's worth, up to [`HOLE_COPY_MAX`] bytes: a full sync of a sparse source then
    /// costs its SEEK_DATA walk and a few large zeroing operations, not a job per buffer.
    fn hole_run(&self) -> Option<u64> {
        let start = self.engine.lock().state.peek_copy()?;
        let source = self.engine.source();
        if !source.knows_holes() {
            return None;
        }
        let g = self.engine.granularity();
        let a = start.checked_mul(g)?;
        let limit = a.saturating_add(HOLE_COPY_MAX).min(self.engine.size());
        // An error here is left to the copy itself, which reports it.
        let hole_end = match self.source_data(a, limit).ok()? {
            None => limit,
            Some((data, _)) => data,
        };
        let n = hole_end.saturating_sub(a) / g;
        (n > self.regions_per_copy()).then_some(n)
    }

    /// The source's next data segment in `[pos, end)`, as [`Backing::next_data`] says, but
    /// remembering the last segment found: a position inside it is data without asking again.
    /// Asking costs two lseeks, and SEEK_HOLE on some filesystems walks the file's pages up to
    /// the next hole (tmpfs: about 2 ms per call on a 1 GiB file, every copy job asking, a
    /// sync ran 8x slower). The segment may have gained holes since (a discard): a hole read
    /// as data is read as zeroes, the right contents, so it is never wrong to take it as data;
    /// it is never used to call anything a hole.
    ///
    /// [`Backing::next_data`]: crate::io::backing::Backing::next_data
    pub(super) fn source_data(&self, pos: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
        if let Some((s, e)) = self.data_seg.get() {
            if s <= pos && pos < e {
                return Ok(Some((pos, e.min(end))));
            }
        }
        // Asked up to the device's end, so that the segment found serves the next jobs too.
        let seg = self.engine.source().next_data(pos, self.engine.size())?;
        if let Some(d) = seg {
            self.data_seg.set(Some(d));
        }
        Ok(match seg {
            Some((s, _)) if s >= end => None,
            Some((s, e)) => Some((s, e.min(end))),
            None => None,
        })
    }

    fn regions_per_copy(&self) -> u64 {
        (self.cfg.buf_size as u64 / self.engine.granularity()).max(1)
    }

    /// The copy rate limit now (bytes/s, 0 = none; see [`policy::copy_limit`]), and whether
    /// the copy yields to the device's I/O, which status shows.
    fn copy_speed(&mut self) -> u64 {
        let busy = self.busy.observe(Instant::now(), self.engine.front_requests());
        let mut g = self.engine.lock();
        let limit = policy::copy_limit(
            self.engine.speed(),
            self.engine.busy_speed(),
            busy,
            g.write_barrier || g.progress.lag_forced,
        );
        g.progress.yielding = limit.yielding;
        limit.rate
    }

    pub(super) fn start_copies(&mut self) -> Result<()> {
        // The throttle's deadline wakes the loop only while copies may start (set again below
        // when throttled): one left from before a pause, a backoff or a give-up would be in the
        // past and make every wait return at once.
        self.throttled_until = None;
        if !self.backoff.may_retry(Instant::now()) {
            return Ok(());
        }
        if self.engine.paused() || self.engine.hook_running() {
            return Ok(());
        }
        {
            let mut g = self.engine.lock();
            if g.progress.gave_up.is_some() {
                return Ok(());
            }
            // Nothing to copy (async mode shipping, or in sync): no rate to work out, no region
            // to look for, and no more locks this pass. A target to reset is reset all the same
            // (a flush waits for it).
            if g.state.dirty() == 0 && !self.needs_reset {
                g.progress.yielding = false;
                return Ok(());
            }
        }
        if self.needs_reset {
            // A target is reset with nothing of its in flight.
            if self.running > 0 || self.target_flush.is_some() {
                return Ok(());
            }
            if let Err(e) = self.target.reset() {
                // (A network target's errors name it already.)
                let (name, e) = (self.target.describe(), e.to_string());
                let msg = if e.contains(&name) { e } else { format!("target {name}: {e}") };
                self.target_failed(&msg);
                return Ok(());
            }
            self.needs_reset = false;
        }
        let speed = self.copy_speed();
        // Any copy can start with a full bucket: it holds at least one buffer.
        self.bucket.refill(Instant::now(), speed, self.cfg.buf_size as u64);
        loop {
            // A copy that failed as it started (finding the source's data) backs off like any.
            if self.backoff.retry_at().is_some() || self.needs_reset {
                break;
            }
            if let Err(at) = self.bucket.admit(Instant::now()) {
                self.throttled_until = Some(at);
                break;
            }
            let buf = match self.free_bufs.pop() {
                Some(b) => b,
                None if self.bufs.len() < self.cfg.max_copies => {
                    self.bufs.push(AlignedBuf::new(self.cfg.buf_size));
                    self.bufs.len() - 1
                }
                None => break,
            };
            // Unlimited, a run of dirty regions over a hole of the source is one copy (the
            // target is zeroed over it in one operation); under a speed limit, holes count
            // like data, a buffer's worth at a time.
            let max = if speed == 0 { self.hole_run() } else { None }.unwrap_or_else(|| self.regions_per_copy());
            let ext = self.engine.lock().state.next_copy(max);
            let Some(ext) = ext else {
                self.free_bufs.push(buf);
                break;
            };
            let (a, b) = self.engine.byte_range(ext);
            self.bucket.spend(b - a);
            let slot = self.jobs.insert(Job { ext, pos: a, end: b, phase: Phase::Read, chunk: 0, done: 0, buf });
            self.running += 1;
            self.advance(slot)?;
        }
        Ok(())
    }

    /// Issues the next operation of job `slot`, or finishes it.
    fn advance(&mut self, slot: usize) -> Result<()> {
        let Some(job) = self.jobs.get_mut(slot) else { return Ok(()) };
        if job.pos >= job.end {
            return self.finish(slot, true);
        }
        let (pos, end) = (job.pos, job.end);
        let seg = match self.source_data(pos, end) {
            Ok(s) => s,
            // Not just finished: the region would be picked again at once, in a loop, if the
            // error persists. A failed copy backs off and counts towards --max-retries.
            Err(e) => return self.copy_failed(slot, "source: finding data", e),
        };
        let block = u64::from(self.target.block_size()).max(1);
        let r = match next_step(pos, end, seg, self.cfg.buf_size as u64, block) {
            Step::Zero(len) => self.issue_zero(slot, len),
            Step::Read(chunk) => {
                if let Some(job) = self.jobs.get_mut(slot) {
                    job.phase = Phase::Read;
                    job.chunk = chunk;
                    job.done = 0;
                }
                self.issue_read(slot)
            }
        };
        r.map_err(|e| Error::io("submitting a copy", e))
    }

    fn issue_zero(&mut self, slot: usize, len: u64) -> io::Result<()> {
        let Some(job) = self.jobs.get_mut(slot) else { return Ok(()) };
        job.phase = Phase::Zero;
        job.chunk = len;
        job.done = 0;
        let off = job.pos;
        // SAFETY: zeroing refers to no buffer of ours.
        unsafe { self.target.submit(&mut self.ring, TargetOp::Zero { off, len }, slot as u64) }
    }

    fn issue_read(&mut self, slot: usize) -> io::Result<()> {
        let Some(job) = self.jobs.get(slot) else { return Ok(()) };
        let off = job.pos + job.done;
        let len = (job.chunk - job.done) as u32;
        // SAFETY: `job.done < job.chunk <= buf_size`, so the pointer stays inside the job's
        // buffer, which the job owns until it finishes.
        let ptr = unsafe { self.bufs[job.buf].as_mut_ptr().add(job.done as usize) };
        let e = opcode::Read::new(types::Fixed(SRC_FIXED), ptr, len).offset(off).build();
        // SAFETY: the job's buffer is not touched until this read completes (one phase of a
        // job in flight at a time); it returns to the free list only in `finish`, after its
        // last completion, and Drop leaks every buffer while a job is running.
        unsafe { push(&mut self.ring, e, Owner::Source, slot as u64) }
    }

    fn issue_write(&mut self, slot: usize) -> io::Result<()> {
        let Some(job) = self.jobs.get(slot) else { return Ok(()) };
        let off = job.pos + job.done;
        let len = (job.chunk - job.done) as u32;
        // SAFETY: as in issue_read.
        let buf = unsafe { self.bufs[job.buf].as_ptr().add(job.done as usize) };
        // SAFETY: as in issue_read: the buffer stays the job's until the write completed.
        unsafe { self.target.submit(&mut self.ring, TargetOp::Write { off, buf, len }, slot as u64) }
    }

    fn finish(&mut self, slot: usize, ok: bool) -> Result<()> {
        let Some(job) = self.jobs.try_remove(slot) else { return Ok(()) };
        self.free_bufs.push(job.buf);
        self.running -= 1;
        // The backoff is reset by a good pair flush (target_ok) only: with a target whose
        // writes succeed and flushes fail, a reset here kept it at its first 100 ms for ever.
        self.engine.lock().state.copy_done(job.ext, ok);
        Ok(())
    }

    fn copy_failed(&mut self, slot: usize, what: &str, err: io::Error) -> Result<()> {
        let msg = match self.jobs.get(slot) {
            Some(j) => format!("{what} at byte {}: {err}", j.pos + j.done),
            None => format!("{what}: {err}"),
        };
        log::warn!("copy failed, region stays dirty: {msg}");
        self.finish(slot, false)?;
        if self.offline && self.fatal.is_none() {
            self.fatal = Some(Error::io("copy failed", io::Error::other(msg.clone())));
        }
        self.target_failed(&msg);
        Ok(())
    }

    pub(super) fn on_source(&mut self, slot: usize, res: i32) -> Result<()> {
        if self.draining {
            return self.finish(slot, false);
        }
        let Some(job) = self.jobs.get_mut(slot) else { return Ok(()) };
        if res <= 0 {
            let e = if res == 0 {
                io::Error::new(io::ErrorKind::UnexpectedEof, "source read returned no data")
            } else {
                io::Error::from_raw_os_error(-res)
            };
            return self.copy_failed(slot, "source read", e);
        }
        job.done += res as u64;
        if job.done < job.chunk {
            return self.issue_read(slot).map_err(|e| Error::io("submitting a copy", e));
        }
        job.phase = Phase::Write;
        job.done = 0;
        let ext = job.ext;
        if let Some(h) = self.hooks.after_read.as_mut() {
            h(ext);
        }
        self.issue_write(slot).map_err(|e| Error::io("submitting a copy", e))
    }

    pub(super) fn on_target(&mut self, token: u64, r: io::Result<u32>) -> Result<()> {
        let slot = token as usize;
        if self.draining {
            return self.finish(slot, false);
        }
        let Some(job) = self.jobs.get_mut(slot) else { return Ok(()) };
        match (job.phase, r) {
            (Phase::Zero, Ok(_)) => {
                let n = job.chunk;
                job.pos += n;
                self.engine.lock().progress.add_copied(n, true);
                self.advance(slot)
            }
            (Phase::Write, Ok(n)) if n > 0 => {
                job.done += n as u64;
                if job.done < job.chunk {
                    return self.issue_write(slot).map_err(|e| Error::io("submitting a copy", e));
                }
                let n = job.chunk;
                job.pos += n;
                self.checkpoints.copied(n);
                self.engine.lock().progress.add_copied(n, false);
                self.advance(slot)
            }
            (Phase::Write, Ok(_)) => {
                self.copy_failed(slot, "target write", io::Error::new(io::ErrorKind::WriteZero, "wrote nothing"))
            }
            (Phase::Zero, Err(e)) => self.copy_failed(slot, "target zeroing", e),
            (_, Err(e)) => self.copy_failed(slot, "target write", e),
            (Phase::Read, Ok(_)) => Ok(()),
        }
    }

}

/// The most bytes one copy of a source's hole covers (one zeroing operation on the target; an
/// NBD target splits it into requests).
const HOLE_COPY_MAX: u64 = 64 << 30;

/// A copy's next operation at `pos`, below `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Zero this many bytes of the target: the source holds a hole there.
    Zero(u64),
    /// Read this many bytes of the source (then write them to the target).
    Read(u64),
}

/// The next step of a copy at `pos` (below `end`), from the source's next data segment there
/// (`Backing::next_data`'s answer), the size of a copy buffer and the target's block size.
///
/// Each step covers at least one byte of [pos, end) (given `pos < end` and `buf > 0`). Where
/// `pos`, `end` and `buf` are whole blocks (Engine::open and the mirror check it for targets
/// that need it), every step is whole blocks too: the source's data boundaries, which follow
/// its filesystem's blocks (4 KiB), are rounded out to the target's, so a hole that does not
/// cover a whole block of the target is copied as data (read as zeroes).
fn next_step(pos: u64, end: u64, seg: Option<(u64, u64)>, buf: u64, block: u64) -> Step {
    let down = |x: u64| x / block * block;
    let up = |x: u64| x.div_ceil(block).saturating_mul(block).min(end);
    match seg {
        None => Step::Zero(end - pos),
        Some((ds, _)) if down(ds.min(end)) > pos => Step::Zero(down(ds.min(end)) - pos),
        Some((_, de)) if de > pos => Step::Read((up(de) - pos).min(buf)),
        // A data segment that ends where it starts: `next_data`'s SEEK_DATA found data at
        // `pos` and its SEEK_HOLE a hole there, punched in between (a DISCARD or unmapping
        // WRITE_ZEROES through the device). The range is read as data: a read of what is a
        // hole now returns zeroes, the target's right contents. A read of 0 bytes would count
        // as a failed copy.
        Some(_) => Step::Read((end - pos).min(buf)),
    }
}

#[cfg(test)]
mod tests {
    use super::{next_step, Step};

    /// Every step covers at least one byte and stays within [pos, end), whatever the source's
    /// answer, including a data segment that ends where it starts (a hole punched between the
    /// SEEK_DATA and the SEEK_HOLE): a read of 0 bytes would count as a failed copy.
    #[test]
    fn every_step_makes_progress() {
        const MIB: u64 = 1 << 20;
        let cases = [
            (0, MIB, None, Step::Zero(MIB)),
            (0, MIB, Some((4096, MIB)), Step::Zero(4096)),
            (0, MIB, Some((0, 8192)), Step::Read(8192)),
            (0, 4 * MIB, Some((0, 4 * MIB)), Step::Read(MIB)),
            // The race: data at pos, then the hole found at pos too.
            (0, MIB, Some((0, 0)), Step::Read(MIB)),
            (8192, 3 * MIB, Some((8192, 8192)), Step::Read(MIB)),
            (8192, 12288, Some((8192, 8192)), Step::Read(4096)),
        ];
        for (pos, end, seg, want) in cases {
            assert_eq!(next_step(pos, end, seg, MIB, 512), want, "pos {pos}, end {end}, segment {seg:?}");
        }
    }

    /// With a target that takes only whole 64 KiB blocks, the 4 KiB holes and data of the
    /// source are rounded out to whole blocks: data in a block makes the whole block a read.
    #[test]
    fn steps_are_whole_target_blocks() {
        const B: u64 = 64 << 10;
        const MIB: u64 = 1 << 20;
        let cases = [
            // Data from 4 KiB into the first block: the block is read, hole and all.
            (0, MIB, Some((4096, MIB)), Step::Read(MIB)),
            // Data from 4 KiB into the second block: the first is zeroed.
            (0, MIB, Some((B + 4096, MIB)), Step::Zero(B)),
            // Data ends 4 KiB into a block: up to that block's end.
            (0, MIB, Some((0, 3 * B + 4096)), Step::Read(4 * B)),
            // ... but not past the end of the copy.
            (0, 2 * B, Some((0, B + 4096)), Step::Read(2 * B)),
            (B, 4 * B, Some((B, B)), Step::Read(3 * B)),
        ];
        for (pos, end, seg, want) in cases {
            assert_eq!(next_step(pos, end, seg, MIB, B), want, "pos {pos}, end {end}, segment {seg:?}");
        }
    }
}
