//! A front-end queue: serves block requests (read, write, flush, discard, write-zeroes) from the
//! source on its own io_uring, following the engine's write-intent protocol. One per submitting
//! thread, like one ublk queue; several requests may be in flight on each.
//!
//! Per request: `begin_write` -> (wait for the bitmap flush that covers its bits, shared with
//! every other request of this queue waiting for the same: group commit) -> source I/O ->
//! `end_write`. Reads and flushes do not touch the bitmap: under write intent every bit a write
//! needs was durable before the write was issued, so FLUSH is just an fdatasync of the source.

use crate::backing::AlignedBuf;
use crate::core::{ActivePlan, Extent, GroupCommit, Intent};
use crate::engine::{Engine, Gate};
use crate::uring::{self, push, Owner, Ring};
use io_uring::{opcode, types};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A block request.
pub enum Op {
    Read { off: u64, len: u32 },
    /// `fua`: the data is durable on the source when the request completes.
    Write { off: u64, data: AlignedBuf, len: u32, fua: bool },
    Flush,
    Discard { off: u64, len: u64 },
    /// `unmap`: may deallocate (a hole); otherwise the range stays allocated.
    WriteZeroes { off: u64, len: u64, unmap: bool },
}

/// A finished request. Reads return their data; writes return their buffer for reuse.
pub struct Completion {
    pub tag: u64,
    pub result: io::Result<u32>,
    pub buf: Option<AlignedBuf>,
}

struct Req {
    tag: u64,
    op: Op,
    ext: Option<Extent>,
    buf: Option<AlignedBuf>,
    done: u32,
    /// Write-blocking: the write also goes to the target.
    plan: ActivePlan,
    /// The target write is in flight; its result once done.
    tgt_pending: bool,
    tgt_ok: bool,
    /// The source side finished first: its result waits for the target's.
    src_result: Option<io::Result<u32>>,
    since: Instant,
    /// Which descriptor the request's data goes to (the target once switched over).
    file: u32,
    /// The engine's front-end descriptors, held from the first issue to the completion.
    held: Option<crate::front::Held>,
}

const SRC: u32 = 0;
const TGT: u32 = 1;

pub struct EngineQueue {
    // The ring is dropped first: it waits out in-flight operations before buffers are freed.
    ring: Ring,
    engine: Arc<Engine>,
    reqs: Vec<Option<Req>>,
    gc: GroupCommit<usize>,
    flush_seq: u64,
    out: Vec<Completion>,
    cqes: Vec<(u64, i32)>,
    has_target: bool,
    /// Writes waiting for a consistent flush to end before they begin.
    deferred: Vec<usize>,
}

impl EngineQueue {
    /// A queue on `engine`; it mirrors writes synchronously in write-blocking mode when the
    /// engine has its target attached ([`Engine::attach_target`]).
    pub fn new(engine: Arc<Engine>, depth: u32) -> io::Result<Self> {
        let ring = uring::new_ring((depth * 4 + 4).next_power_of_two())?;
        let has_target = engine.front_has_target();
        Ok(EngineQueue {
            ring,
            engine,
            reqs: Vec::new(),
            gc: GroupCommit::default(),
            flush_seq: 0,
            out: Vec::new(),
            cqes: Vec::new(),
            has_target,
            deferred: Vec::new(),
        })
    }

    pub fn in_flight(&self) -> usize {
        self.reqs.iter().filter(|r| r.is_some()).count()
    }

    /// Queues a request; its completion comes from [`Self::wait`].
    pub fn submit(&mut self, tag: u64, op: Op) -> io::Result<()> {
        let size = self.engine.size();
        let range = match &op {
            Op::Read { off, len } | Op::Write { off, len, .. } => Some((*off, *len as u64)),
            Op::Discard { off, len } | Op::WriteZeroes { off, len, .. } => Some((*off, *len)),
            Op::Flush => None,
        };
        if let Some((off, len)) = range {
            if len == 0 || off.checked_add(len).is_none_or(|e| e > size) {
                self.out.push(Completion { tag, result: Err(io::Error::from_raw_os_error(libc::EINVAL)), buf: None });
                return Ok(());
            }
        }
        let writes = matches!(op, Op::Write { .. } | Op::Discard { .. } | Op::WriteZeroes { .. });
        let ext = if writes { range.map(|(o, l)| self.engine.extent(o, l)) } else { None };
        let slot = match self.reqs.iter().position(|r| r.is_none()) {
            Some(i) => i,
            None => {
                self.reqs.push(None);
                self.reqs.len() - 1
            }
        };
        let is_write = matches!(op, Op::Write { .. });
        self.reqs[slot] = Some(Req {
            tag,
            op,
            ext,
            buf: None,
            done: 0,
            plan: ActivePlan::SourceOnly,
            tgt_pending: false,
            tgt_ok: false,
            src_result: None,
            since: Instant::now(),
            file: SRC,
            held: None,
        });
        let Some(ext) = ext else { return self.issue(slot) };
        let (intent, plan) = match range {
            Some((off, len)) => match self.engine.begin_request(ext, off, len, is_write && self.has_target, true) {
                Gate::Go(i, p) => (i, p),
                Gate::Wait => {
                    // Retried from `wait`.
                    self.deferred.push(slot);
                    return Ok(());
                }
                Gate::Target => {
                    if let Some(r) = self.reqs[slot].as_mut() {
                        r.file = TGT;
                        r.ext = None;
                    }
                    return self.issue(slot);
                }
            },
            None => (self.engine.begin_write(ext), ActivePlan::SourceOnly),
        };
        self.begin_issue(slot, intent, plan)
    }

    /// Retries the writes deferred by a consistent flush (after half a second they go ahead as
    /// ordinary writes).
    fn retry_deferred(&mut self) -> io::Result<()> {
        for slot in std::mem::take(&mut self.deferred) {
            let Some(req) = self.reqs[slot].as_ref() else { continue };
            let (ext, (off, len), is_write) = match (req.ext, &req.op) {
                (Some(e), Op::Write { off, len, .. }) => (e, (*off, *len as u64), true),
                (Some(e), Op::Discard { off, len } | Op::WriteZeroes { off, len, .. }) => (e, (*off, *len), false),
                _ => {
                    debug_assert!(false, "only writes are deferred");
                    continue;
                }
            };
            let may_wait = req.since.elapsed() < Duration::from_millis(500);
            match self.engine.begin_request(ext, off, len, is_write && self.has_target, may_wait) {
                Gate::Go(intent, plan) => self.begin_issue(slot, intent, plan)?,
                Gate::Wait => self.deferred.push(slot),
                Gate::Target => {
                    if let Some(r) = self.reqs[slot].as_mut() {
                        r.file = TGT;
                        r.ext = None;
                    }
                    self.issue(slot)?;
                }
            }
        }
        Ok(())
    }

    fn begin_issue(&mut self, slot: usize, intent: Intent, plan: ActivePlan) -> io::Result<()> {
        if let Some(r) = self.reqs[slot].as_mut() {
            r.plan = plan;
        }
        match intent {
            Intent::Ready => self.issue(slot),
            Intent::Wait { seq } => {
                if self.gc.wait(seq, slot) {
                    self.start_bitmap_flush()?;
                }
                Ok(())
            }
        }
    }

    fn start_bitmap_flush(&mut self) -> io::Result<()> {
        let seq = self.engine.bitmap_flush_start();
        self.gc.started(seq);
        self.flush_seq = seq;
        let e = opcode::Fsync::new(types::Fd(self.engine.bitmap_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        push(&mut self.ring, e, Owner::Bitmap, 0)
    }

    fn issue(&mut self, slot: usize) -> io::Result<()> {
        let engine = self.engine.clone();
        let Some(req) = self.reqs[slot].as_mut() else { return Ok(()) };
        // As on the device (see crate::device): descriptors first, then for a read or flush the
        // question which one; a write was gated before it gets here.
        let held = req.held.get_or_insert_with(|| {
            let h = engine.front_enter();
            if matches!(req.op, Op::Read { .. } | Op::Flush) && engine.serving_target() {
                req.file = TGT;
            }
            h
        });
        let fds = held.fds;
        let f = types::Fd(if req.file == TGT { fds.target } else { fds.source });
        let done = req.done;
        if let (Op::Write { off, data, len, .. }, ActivePlan::Target { .. }, 0, false) =
            (&req.op, req.plan, done, req.tgt_pending)
        {
            // The same buffer to the target, at the same time as to the source.
            let e = opcode::Write::new(types::Fd(fds.target), data.as_ptr(), *len).offset(*off).build();
            req.tgt_pending = true;
            push(&mut self.ring, e, Owner::Target, slot as u64)?;
        }
        let Some(req) = self.reqs[slot].as_mut() else { return Ok(()) };
        let e = match &mut req.op {
            Op::Read { off, len } => {
                let buf = req.buf.get_or_insert_with(|| AlignedBuf::new(*len as usize));
                // SAFETY: done < len <= buf.len(); the buffer lives in the request until its
                // completion is handed out.
                let p = unsafe { buf.as_mut_ptr().add(done as usize) };
                opcode::Read::new(f, p, *len - done).offset(*off + done as u64).build()
            }
            Op::Write { off, data, len, fua } => {
                // SAFETY: as for reads; `data` is owned by the request.
                let p = unsafe { data.as_ptr().add(done as usize) };
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(f, p, *len - done).offset(*off + done as u64).rw_flags(flags).build()
            }
            Op::Flush => opcode::Fsync::new(f).flags(types::FsyncFlags::DATASYNC).build(),
            Op::Discard { off, len } => opcode::Fallocate::new(f, *len)
                .offset(*off)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            Op::WriteZeroes { off, len, unmap } => {
                let mode = if *unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(f, *len).offset(*off).mode(mode).build()
            }
        };
        push(&mut self.ring, e, Owner::Front, slot as u64)
    }

    /// Waits until at least `min` completions are available (or `timeout` passes) and returns
    /// all available ones.
    pub fn wait(&mut self, min: usize, timeout: Duration) -> io::Result<Vec<Completion>> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.out.len() >= min {
                return Ok(std::mem::take(&mut self.out));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} requests still in flight after {timeout:?}", self.in_flight()),
                ));
            }
            self.retry_deferred()?;
            let left = if self.deferred.is_empty() { left } else { left.min(Duration::from_millis(1)) };
            let ts = types::Timespec::new().sec(left.as_secs()).nsec(left.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            self.cqes.clear();
            uring::reap(&mut self.ring, &mut self.cqes);
            let cqes = std::mem::take(&mut self.cqes);
            for &(ud, res) in &cqes {
                self.dispatch(ud, res)?;
            }
            self.cqes = cqes;
        }
    }

    /// Runs one request to completion.
    pub fn execute(&mut self, op: Op) -> io::Result<(u32, Option<AlignedBuf>)> {
        const TAG: u64 = u64::MAX;
        self.submit(TAG, op)?;
        let mut others = Vec::new();
        let got = loop {
            let mut got = None;
            for c in self.wait(1, Duration::from_secs(60))? {
                if c.tag == TAG {
                    got = Some(c);
                } else {
                    others.push(c);
                }
            }
            if let Some(c) = got {
                break c;
            }
        };
        self.out.extend(others);
        got.result.map(|n| (n, got.buf))
    }

    fn dispatch(&mut self, ud: u64, res: i32) -> io::Result<()> {
        match uring::decode(ud) {
            (Some(Owner::Bitmap), _) => {
                let ok = res >= 0;
                self.engine.bitmap_flush_done(self.flush_seq, ok);
                if !ok {
                    log::error!(
                        "bitmap fdatasync failed: {}; failing the writes that needed it",
                        io::Error::from_raw_os_error(-res)
                    );
                }
                let engine = self.engine.clone();
                let step = self.gc.completed(ok, |s| engine.intent_durable(s));
                for slot in step.ready {
                    self.issue(slot)?;
                }
                for slot in step.failed {
                    // Never issued to the source: the write intent could not be made durable.
                    self.complete(slot, Err(io::Error::from_raw_os_error(libc::EIO)));
                }
                if step.start_flush {
                    self.start_bitmap_flush()?;
                }
                Ok(())
            }
            (Some(Owner::Front), slot) => {
                let slot = slot as usize;
                let Some(req) = self.reqs.get_mut(slot).and_then(|r| r.as_mut()) else { return Ok(()) };
                if res < 0 {
                    self.complete(slot, Err(io::Error::from_raw_os_error(-res)));
                    return Ok(());
                }
                let want = match &req.op {
                    Op::Read { len, .. } | Op::Write { len, .. } => *len,
                    _ => 0,
                };
                req.done += res as u32;
                if want > 0 && req.done < want {
                    if res == 0 {
                        self.complete(slot, Err(io::Error::from_raw_os_error(libc::EIO)));
                        return Ok(());
                    }
                    return self.issue(slot);
                }
                let n = req.done;
                self.complete(slot, Ok(n));
                Ok(())
            }
            (Some(Owner::Target), slot) => {
                let slot = slot as usize;
                let Some(req) = self.reqs.get_mut(slot).and_then(|r| r.as_mut()) else { return Ok(()) };
                req.tgt_pending = false;
                let want = match &req.op {
                    Op::Write { len, .. } => *len as i32,
                    _ => 0,
                };
                // A short target write counts as failed: the region is copied instead.
                req.tgt_ok = res == want;
                if let Some(r) = req.src_result.take() {
                    self.complete(slot, r);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn complete(&mut self, slot: usize, result: io::Result<u32>) {
        if let Some(req) = self.reqs[slot].as_mut() {
            if req.tgt_pending {
                req.src_result = Some(result);
                return;
            }
        }
        let Some(mut req) = self.reqs[slot].take() else { return };
        if let Some(h) = req.held.take() {
            self.engine.front_exit(h);
        }
        if let Some(ext) = req.ext {
            self.engine.end_write_planned(ext, req.plan, result.is_ok(), req.tgt_ok);
        }
        let buf = match req.op {
            Op::Write { data, .. } => Some(data),
            _ => req.buf,
        };
        self.out.push(Completion { tag: req.tag, result, buf });
    }
}
