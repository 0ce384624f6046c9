//! A front-end queue: serves block requests (read, write, flush, discard, write-zeroes) from the
//! source through io_uring, following the engine's write-intent protocol. One per submitting
//! thread, like one ublk queue; several requests may be in flight on each.
//!
//! Per request: `begin_request` -> (wait for the bitmap flush that covers its bits, shared with
//! every other request of this queue waiting for the same: group commit) -> source I/O ->
//! `end_write`. Reads and flushes do not touch the bitmap: under write intent every bit a write
//! needs was durable before the write was issued, so FLUSH is just an fdatasync of the source.
//!
//! The protocol lives in [`QueueRequests`], which does not own a ring: it pushes its operations
//! through a [`Sink`] and is handed their completions. The device (crate::daemon::device) runs it on
//! the ublk queue's ring; [`EngineQueue`] runs it on a ring of its own, for the tests and tools
//! that drive the engine without a kernel device. Both run the same code.

use crate::io::backing::AlignedBuf;
use crate::core::{ActivePlan, Extent, GroupCommit, Intent};
use crate::engine::{DirectShip, Engine, Shipped, WriteAdmission, WriteKind};
use crate::io::uring::{self, push, Owner, Ring};
use io_uring::{opcode, squeue, types};
use slab::Slab;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A block request, with its data (for the tests and tools that own their buffers).
pub enum Op {
    Read { off: u64, len: u32 },
    /// `fua`: the data is durable on the source when the request completes.
    Write { off: u64, data: AlignedBuf, len: u32, fua: bool },
    Flush,
    Discard { off: u64, len: u64 },
    /// `unmap`: may deallocate (a hole); otherwise the range stays allocated.
    WriteZeroes { off: u64, len: u64, unmap: bool },
}

/// A block request without its data: the device's requests, whose data stays in the ublk
/// tag's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Read { off: u64, len: u32 },
    Write { off: u64, len: u32, fua: bool },
    Flush,
    Discard { off: u64, len: u64 },
    WriteZeroes { off: u64, len: u64, unmap: bool },
}

impl Request {
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Request::Read { off, len } | Request::Write { off, len, .. } => Some((off, len as u64)),
            Request::Discard { off, len } | Request::WriteZeroes { off, len, .. } => Some((off, len)),
            Request::Flush => None,
        }
    }
    fn modifies(&self) -> bool {
        matches!(self, Request::Write { .. } | Request::Discard { .. } | Request::WriteZeroes { .. })
    }
    /// Bytes a read or write transfers (0 for the others).
    fn transfer(&self) -> u32 {
        match *self {
            Request::Read { len, .. } | Request::Write { len, .. } => len,
            _ => 0,
        }
    }
}

/// A finished request. Reads of an [`Op`] return their data; writes return their buffer for
/// reuse; requests submitted in place return none.
pub struct Completion {
    pub tag: u64,
    pub result: io::Result<u32>,
    pub buf: Option<AlignedBuf>,
}

/// Where a request's data lives.
enum Data {
    /// A read of an [`Op`]: allocated when first issued.
    None,
    Owned(AlignedBuf),
    /// The caller's buffer (see [`QueueRequests::submit_in_place`]).
    InPlace(*mut u8),
}

impl Data {
    fn ptr(&mut self, len: u32) -> *mut u8 {
        match self {
            Data::InPlace(p) => *p,
            Data::Owned(b) => b.as_mut_ptr(),
            Data::None => {
                let mut b = AlignedBuf::new(len as usize);
                let p = b.as_mut_ptr();
                *self = Data::Owned(b);
                p
            }
        }
    }
}

/// A write-zeroes the source refused (EOPNOTSUPP: tmpfs has no FALLOC_FL_ZERO_RANGE, some file
/// systems and devices have neither that nor punching holes). The device advertises the
/// operation, so it must not fail it: it falls back to punching a hole (reads then return
/// zeroes; the space is given back, which NOUNMAP asked not to), then to writing zeroes (a
/// buffer never written, so its pages cost nothing). The write's intent covers the same regions
/// in every form. Returns false when nothing is left to try.
fn zeroes_fallback(r: &mut Req) -> bool {
    match r.req {
        Request::WriteZeroes { off, len, unmap: false } => {
            r.req = Request::WriteZeroes { off, len, unmap: true };
        }
        Request::WriteZeroes { off, len, unmap: true } if len <= u32::MAX as u64 => {
            r.req = Request::Write { off, len: len as u32, fua: false };
            r.data = Data::None;
            r.zeroes_written = true;
        }
        _ => return false,
    }
    log::debug!("the source refused a zeroing; trying {:?}", r.req);
    r.done = 0;
    true
}

/// Where [`QueueRequests`] sends its operations. `owner` and `slot` come back with the completion
/// (see [`QueueRequests::complete`]).
pub trait Sink {
    /// Queues `entry` for the kernel.
    ///
    /// # Safety
    ///
    /// As [`crate::io::uring::push`]: what `entry` points at stays valid until its completion is
    /// handed back (to [`QueueRequests::complete`]), or is leaked.
    unsafe fn push(&mut self, entry: squeue::Entry, owner: Owner, slot: u16) -> io::Result<()>;
}

/// A ring of one's own as the sink (user_data as in [`uring::encode`]).
pub struct RingSink<'a>(pub &'a mut Ring);

impl Sink for RingSink<'_> {
    unsafe fn push(&mut self, entry: squeue::Entry, owner: Owner, slot: u16) -> io::Result<()> {
        // SAFETY: the caller's contract is push's.
        unsafe { push(self.0, entry, owner, slot as u64) }
    }
}

struct Req {
    tag: u64,
    req: Request,
    data: Data,
    ext: Option<Extent>,
    done: u32,
    /// Write-blocking: the write also goes to the target.
    plan: ActivePlan,
    /// The target write is in flight; its result once done.
    tgt_pending: bool,
    tgt_ok: bool,
    /// The source side finished first: its result waits for the target's.
    src_result: Option<io::Result<u32>>,
    /// When the request was first deferred (by a consistent flush or a switchover).
    deferred_since: Option<Instant>,
    /// The engine let the write begin (it must be ended, whatever happens).
    begun: bool,
    /// Which descriptor the request's data goes to (the target once switched over).
    file: u32,
    /// The engine's front-end descriptors, held from the first issue to the completion.
    held: Option<crate::engine::front::FdsHold>,
    /// A discard the source refused: it completes, but the data stayed as it was (async mode
    /// must not ship it as a zeroing).
    unchanged: bool,
    /// A write-zeroes the source refused, carried out as a write of zeroes (async mode ships
    /// it as a zeroing, not as a copy of up to 1 GiB of zeroes).
    zeroes_written: bool,
    /// Async mode: the copy of a shipped write's bytes, taken before it began (and kept while it
    /// waits to begin) or when it was first issued, and not shipped early; it is queued when the
    /// source write completes.
    ship_copy: Option<AlignedBuf>,
    /// Async mode: shipped early (its target write issued with its source write, see
    /// [`Engine::ship_early`]): its queue entry, and its slot in `ships` once issued.
    early: Option<u64>,
    ship_slot: Option<usize>,
    /// Async mode: the engine was asked whether the write may go early (once a write).
    early_asked: bool,
}

const SRC: u32 = 0;
const TGT: u32 = 1;
/// Deferred writes ask the engine again after a nap: the first after NAP_MIN, then twice as
/// long each time, up to NAP_MAX, while some stay deferred.
const NAP_MIN: Duration = Duration::from_micros(500);
const NAP_MAX: Duration = Duration::from_millis(10);
/// How long a write waits for a consistent flush before it goes ahead as an ordinary write.
const MAX_DEFER: Duration = Duration::from_millis(500);

/// The nap timer: a timerfd whose expiry a read on the ring waits for. (A ring Timeout would
/// complete with -ETIME, which reads as a failure to whatever reports failed completions,
/// libublk's own queue loop for one.)
struct NapTimer {
    fd: nix::sys::timerfd::TimerFd,
    /// The read's destination: boxed, so that it stays put while the read is in flight.
    buf: Box<[u8; 8]>,
    pending: bool,
    next: Duration,
}

/// A shipped write this queue issued to the target itself, with its source write (async mode,
/// see [`Engine::ship_early`]): it may outlive its request, which completes when the source
/// write does.
///
/// Its two halves are reported to the engine together when they can be: the target half
/// waits for the source half (the application's write has not completed yet), and both go in
/// one hold of the state's lock ([`Engine::ship_early_done`]). A source half that completes
/// first is reported with the next thing the queue asks the engine: the next write's beginning
/// ([`Engine::begin_request_with_copy`], before its overlap checks, so that a write that
/// follows this one on the queue does not see it in flight on the source) or its own target
/// half, whichever comes first. The application's completion does not wait for the report
/// (its write's epoch was fixed at issue).
struct ShipOut {
    ship: DirectShip,
    /// Bytes the target took so far (a file may take a write in parts).
    done: u64,
    /// The descriptors the write goes to, held until its target write completed (a
    /// switchover waits for it).
    held: Option<crate::engine::front::FdsHold>,
    /// The request's slot in `reqs` while its source write is in flight, so that its
    /// completion can find this entry.
    req: usize,
    /// The source half completed first: the write's id and whether it succeeded.
    source: Option<(u64, bool)>,
    /// ... and was reported on its own (see `QueueRequests::unreported`).
    source_reported: bool,
    /// The target half completed first: `None` if the target took all of it, else why not.
    landed: Option<Option<String>>,
}

/// The requests of one queue and the write-intent protocol they follow.
///
/// A failure to queue an operation (a broken ring, or a full one that cannot submit) fails the
/// request it belongs to with EIO, after ending what the engine began for it: nothing is left waiting for a
/// completion that cannot come.
pub struct QueueRequests {
    engine: Arc<Engine>,
    /// The requests in flight, by slot: the slot travels in their operations' user_data.
    reqs: Slab<Req>,
    gc: GroupCommit<usize>,
    flush_seq: u64,
    out: Vec<Completion>,
    has_target: bool,
    /// Writes waiting (a consistent flush, a switchover) before they begin.
    deferred: Vec<usize>,
    nap: NapTimer,
    /// Shipped writes in flight to the target from this queue, by slot (in their user_data).
    ships: Slab<ShipOut>,
    /// Shipped writes the engine let go early, issued to the target before the queue returns
    /// to its caller, so in the same submission as their source writes (see
    /// [`QueueRequests::issue_ships`]).
    to_ship: Vec<(DirectShip, usize)>,
    /// The last write that began here was planned for shipping (async mode, shipping): the
    /// next is copied before it asks to begin, so that the question whether it may go early
    /// can be asked with the same hold of the lock (see [`Self::gate`]).
    shipping_seen: bool,
    /// Slots in `ships` whose source half completed and is not reported yet: reported with the
    /// next write's beginning (see [`ShipOut`]).
    unreported: Vec<usize>,
    /// Their reports, taken from `unreported` when a write begins (kept to reuse its memory).
    reports: Vec<(u64, bool)>,
}

/// A copy of a finished write's `len` bytes, for the replication queue.
fn copy_out(engine: &Engine, d: &Data, len: u32) -> Option<AlignedBuf> {
    let src = match d {
        Data::Owned(o) => o.as_ptr(),
        Data::InPlace(p) => *p as *const u8,
        // Not for a write (submit gives Owned, submit_in_place InPlace): nothing to ship.
        Data::None => return None,
    };
    let mut b = engine.ship_buffer(len as usize);
    // SAFETY: the write's buffer holds at least `len` bytes (checked in submit for an owned
    // buffer, submit_in_place's contract for the caller's) and stays valid until the request's
    // completion is handed out, which happens after this copy; `b` is a buffer of at least
    // `len` bytes that nothing else holds (taken from the pool or allocated), so the two do not
    // overlap.
    unsafe { std::ptr::copy_nonoverlapping(src, b.as_mut_ptr(), len as usize) };
    Some(b)
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl QueueRequests {
    /// A queue's requests on `engine`; they mirror writes synchronously in write-blocking mode when the
    /// engine has its target attached ([`Engine::attach_target`]).
    pub fn new(engine: Arc<Engine>) -> io::Result<Self> {
        use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};
        let fd = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_CLOEXEC).map_err(io::Error::from)?;
        let has_target = engine.front_has_target();
        Ok(QueueRequests {
            engine,
            reqs: Slab::new(),
            gc: GroupCommit::default(),
            flush_seq: 0,
            out: Vec::new(),
            has_target,
            deferred: Vec::new(),
            nap: NapTimer { fd, buf: Box::new([0; 8]), pending: false, next: NAP_MIN },
            ships: Slab::new(),
            to_ship: Vec::new(),
            shipping_seen: false,
            unreported: Vec::new(),
            reports: Vec::new(),
        })
    }

    /// Requests in flight, and shipped writes still in flight to the target from this queue
    /// (their buffers and descriptors are in use until they land).
    pub fn in_flight(&self) -> usize {
        self.reqs.len() + self.ships.len() + self.to_ship.len()
    }

    /// Requests in flight (the device's tags not yet completed).
    pub fn requests_in_flight(&self) -> usize {
        self.reqs.len()
    }

    /// Queues a request with its own data; its completion comes from [`Self::completions`].
    pub fn submit(&mut self, sink: &mut impl Sink, tag: u64, op: Op) {
        let (req, data) = match op {
            Op::Read { off, len } => (Request::Read { off, len }, Data::None),
            Op::Write { off, data, len, fua } => {
                if (len as usize) > data.len() {
                    self.out.push(Completion { tag, result: Err(io::Error::from_raw_os_error(libc::EINVAL)), buf: Some(data) });
                    return;
                }
                (Request::Write { off, len, fua }, Data::Owned(data))
            }
            Op::Flush => (Request::Flush, Data::None),
            Op::Discard { off, len } => (Request::Discard { off, len }, Data::None),
            Op::WriteZeroes { off, len, unmap } => (Request::WriteZeroes { off, len, unmap }, Data::None),
        };
        self.start(sink, tag, req, data)
    }

    /// Queues a request whose data is at `buf` (read into it, or written from it).
    ///
    /// # Safety
    /// For a read or write, `buf` must point to at least the request's length in bytes, valid
    /// for writes (reads) or reads (writes), and nothing else may use that memory until the
    /// request's completion has come out of [`Self::completions`].
    pub unsafe fn submit_in_place(&mut self, sink: &mut impl Sink, tag: u64, req: Request, buf: *mut u8) {
        self.start(sink, tag, req, Data::InPlace(buf))
    }

    fn start(&mut self, sink: &mut impl Sink, tag: u64, req: Request, data: Data) {
        let range = req.range();
        let bad = match range {
            Some((off, len)) => len == 0 || off.checked_add(len).is_none_or(|e| e > self.engine.size()),
            None => false,
        };
        if bad || self.in_flight() > u16::MAX as usize {
            let buf = match data {
                Data::Owned(b) => Some(b),
                _ => None,
            };
            let e = if bad { io::Error::from_raw_os_error(libc::EINVAL) } else { io::Error::from_raw_os_error(libc::EBUSY) };
            self.out.push(Completion { tag, result: Err(e), buf });
            return;
        }
        let ext = if req.modifies() { range.map(|(o, l)| self.engine.extent(o, l)) } else { None };
        if req == Request::Flush {
            // Async mode: the writes completed before this FLUSH arrived form an epoch; those
            // completing from now on belong to the next.
            self.engine.ship_device_flush();
        }
        let r = Req {
            tag,
            req,
            data,
            ext,
            done: 0,
            plan: ActivePlan::SourceOnly,
            tgt_pending: false,
            tgt_ok: false,
            src_result: None,
            deferred_since: None,
            begun: false,
            file: SRC,
            held: None,
            unchanged: false,
            zeroes_written: false,
            ship_copy: None,
            early: None,
            ship_slot: None,
            early_asked: false,
        };
        // Slots fit in 16 bits (checked above): they travel in completions' user_data.
        let slot = self.reqs.insert(r);
        if ext.is_none() {
            self.issue(sink, slot)
        } else {
            self.gate(sink, slot)
        }
        self.issue_ships(sink);
    }

    /// Issues the shipped writes the engine handed back ([`Self::issue`]) to the target.
    fn issue_ships(&mut self, sink: &mut impl Sink) {
        for (ship, req) in std::mem::take(&mut self.to_ship) {
            let held = Some(self.engine.front_hold());
            let slot = self.ships.insert(ShipOut { ship, done: 0, held, req, source: None, source_reported: false, landed: None });
            if let Some(r) = self.reqs.get_mut(req) {
                r.ship_slot = Some(slot);
            }
            self.issue_ship(sink, slot);
        }
    }

    /// Issues (the rest of) the target write of the shipped write in `slot`; a failure to
    /// queue it is a failed target write.
    fn issue_ship(&mut self, sink: &mut impl Sink, slot: usize) {
        let Some(j) = self.ships.get(slot) else { return };
        let fd = j.held.as_ref().map_or(-1, |h| h.fds.target);
        let s = &j.ship;
        let r = if fd < 0 {
            Err(io::Error::other("the target is not reachable from the device's queue"))
        } else {
            // SAFETY: done < len, so the pointer stays inside the buffered write.
            let p = unsafe { s.buf.add(j.done as usize) };
            let e = opcode::Write::new(types::Fd(fd), p, (s.len - j.done) as u32).offset(s.off + j.done).build();
            // SAFETY: the buffer is the engine's (`ship_bufs`, under the handle) until this
            // write's landing is reported (ship_early_done or ship_direct_landed, after its
            // completion) or abandon_in_flight leaks it; the descriptor is held (`held`) until
            // its completion.
            unsafe { sink.push(e, Owner::Ship, slot as u16) }
        };
        if let Err(e) = r {
            let msg = format!("queuing the target write of a shipped write at byte {}: {e}", s.off);
            self.ship_ended(slot, Some(msg));
        }
    }

    /// The target write of the shipped write in `slot` is over (`error`: it failed): reported
    /// to the engine with its source half if that completed, else kept for it.
    fn ship_ended(&mut self, slot: usize, error: Option<String>) {
        let Some(j) = self.ships.get_mut(slot) else { return };
        if let Some(h) = j.held.take() {
            self.engine.front_exit(h);
        }
        match j.source {
            Some(_) if j.source_reported => {
                let j = self.ships.remove(slot);
                self.engine.ship_direct_landed(j.ship.seq, error);
            }
            Some((id, ok)) => {
                let j = self.ships.remove(slot);
                self.unreported.retain(|&s| s != slot);
                self.engine.ship_early_done(id, j.ship.seq, ok, error);
            }
            None => j.landed = Some(error),
        }
    }

    /// The source write of early write `id` (request slot `req`) completed (`ok`): reported to
    /// the engine with its target half if that completed, else kept for it.
    fn early_source_done(&mut self, id: u64, seq: u64, ship_slot: Option<usize>, req: usize, ok: bool) {
        let found = ship_slot.filter(|&s| self.ships.get(s).is_some_and(|j| j.req == req && j.ship.seq == seq));
        let Some((s, j)) = found.and_then(|s| Some((s, self.ships.get_mut(s)?))) else {
            // Its target write never went out (it could not be queued, and was reported so): no
            // job of this write is kept, or its halves would be reported twice.
            debug_assert!(
                !self.ships.iter().any(|(_, j)| j.req == req && j.ship.seq == seq),
                "early write {seq}'s target job is kept but not in its slot"
            );
            return self.engine.ship_early_source_done(id, ok);
        };
        match j.landed.take() {
            Some(error) => {
                self.ships.remove(s);
                self.engine.ship_early_done(id, seq, ok, error);
            }
            None => {
                j.source = Some((id, ok));
                self.unreported.push(s);
            }
        }
    }

    /// Asks the engine whether the write in `slot` may begin, and begins it if so.
    fn gate(&mut self, sink: &mut impl Sink, slot: usize) {
        // Source halves of early writes that completed before their target halves: reported
        // with this beginning, before its overlap checks (see ShipOut).
        self.reports.clear();
        for s in self.unreported.drain(..) {
            if let Some(j) = self.ships.get_mut(s) {
                if let (Some(half), false) = (j.source, j.source_reported) {
                    j.source_reported = true;
                    self.reports.push(half);
                }
            }
        }
        let Some(r) = self.reqs.get_mut(slot) else { return };
        let (Some(ext), Some((off, len))) = (r.ext, r.req.range()) else { return };
        let may_wait = r.deferred_since.is_none_or(|t| t.elapsed() < MAX_DEFER);
        let kind = match r.req {
            Request::Write { .. } if self.has_target => WriteKind::MirrorableWrite,
            Request::Write { .. } => WriteKind::Write,
            _ => WriteKind::Other,
        };
        // Async mode, a queue that can reach the target: a write that is likely to be shipped
        // is copied first (or its copy reused, after a wait), and the engine may let it go
        // early in the same hold of its lock as its beginning.
        let copy = match (kind, r.req) {
            (WriteKind::MirrorableWrite, Request::Write { len, .. }) if self.shipping_seen && !r.early_asked && self.ships.len() + self.to_ship.len() < u16::MAX as usize => {
                r.ship_copy.take().or_else(|| copy_out(&self.engine, &r.data, len))
            }
            _ => None,
        };
        let (admission, early) = self.engine.begin_request_with_copy(ext, off, len, kind, may_wait, copy, &self.reports);
        let asked = early.is_some();
        match early {
            Some(Ok(ship)) => {
                r.early = Some(ship.seq);
                r.early_asked = true;
                self.to_ship.push((ship, slot));
            }
            Some(Err(b)) => r.ship_copy = Some(b),
            None => {}
        }
        if let WriteAdmission::Go(intent, plan) = admission {
            self.shipping_seen = matches!(plan, ActivePlan::Ship { .. });
            // Asked, and refused, with its intent durable: not asked again at issue (the engine
            // has seen the same state).
            r.early_asked |= asked && intent == Intent::Ready && self.shipping_seen;
            if !self.shipping_seen {
                // Not shipped: the copy is not needed.
                if let Some(b) = r.ship_copy.take() {
                    self.engine.recycle_ship_bufs([b]);
                }
            }
        }
        match admission {
            WriteAdmission::Go(intent, plan) => {
                r.plan = plan;
                r.begun = true;
                match intent {
                    Intent::Ready => self.issue(sink, slot),
                    Intent::Wait { seq } => {
                        if self.gc.wait(seq, slot) {
                            self.start_bitmap_flush(sink);
                        }
                    }
                }
            }
            WriteAdmission::Wait => {
                r.deferred_since.get_or_insert_with(Instant::now);
                self.deferred.push(slot);
                self.arm_nap(sink)
            }
            WriteAdmission::Target => {
                // Switched over: the write goes to the target alone, outside the protocol (a
                // copy taken for shipping is not needed).
                if let Some(b) = r.ship_copy.take() {
                    self.engine.recycle_ship_bufs([b]);
                }
                r.file = TGT;
                r.ext = None;
                self.issue(sink, slot)
            }
        }
    }

    fn arm_nap(&mut self, sink: &mut impl Sink) {
        use nix::sys::time::TimeSpec;
        use nix::sys::timerfd::{Expiration, TimerSetTimeFlags};
        if self.nap.pending {
            return;
        }
        let armed = self
            .nap
            .fd
            .set(Expiration::OneShot(TimeSpec::from_duration(self.nap.next)), TimerSetTimeFlags::empty())
            .map_err(io::Error::from)
            .and_then(|()| {
                use std::os::fd::{AsFd, AsRawFd};
                let fd = types::Fd(self.nap.fd.as_fd().as_raw_fd());
                let e = opcode::Read::new(fd, self.nap.buf.as_mut_ptr(), 8).build();
                // SAFETY: the 8-byte buffer and the timerfd belong to `self.nap`, which lives
                // as long as these requests; `nap.pending` keeps a second read off the buffer
                // until this one completes, and abandon_in_flight leaks both if it never does.
                unsafe { sink.push(e, Owner::Nap, 0) }
            });
        match armed {
            Ok(()) => self.nap.pending = true,
            Err(e) => {
                // Without the timer nobody would ask again: the writes fail instead (they have
                // not begun, nothing reached the source or the bitmap for them).
                log::error!("queue timer: {e}; failing {} deferred writes", self.deferred.len());
                for slot in std::mem::take(&mut self.deferred) {
                    self.finish(slot, Err(eio()));
                }
            }
        }
    }

    fn start_bitmap_flush(&mut self, sink: &mut impl Sink) {
        let seq = self.engine.bitmap_flush_start();
        self.gc.started(seq);
        self.flush_seq = seq;
        let e = opcode::Fsync::new(types::Fd(self.engine.bitmap_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        // SAFETY: an fdatasync refers to no memory; the bitmap's file is held open by the
        // engine, which these requests hold an Arc of.
        if let Err(e) = unsafe { sink.push(e, Owner::Bitmap, 0) } {
            log::error!("queue ring: cannot queue a bitmap flush: {e}");
            self.bitmap_flush_ended(sink, false);
        }
    }

    /// The bitmap flush in flight ended: the writes it made ready go, those it failed fail.
    fn bitmap_flush_ended(&mut self, sink: &mut impl Sink, ok: bool) {
        self.engine.bitmap_flush_done(self.flush_seq, ok);
        let engine = self.engine.clone();
        let step = self.gc.completed(ok, |s| engine.intent_durable(s));
        for slot in step.ready {
            self.issue(sink, slot);
        }
        for slot in step.failed {
            // Never issued to the source: the write intent could not be made durable.
            self.finish(slot, Err(eio()));
        }
        if step.start_flush {
            self.start_bitmap_flush(sink);
        }
    }

    fn issue(&mut self, sink: &mut impl Sink, slot: usize) {
        let engine = &self.engine;
        let Some(r) = self.reqs.get_mut(slot) else { return };
        // Descriptors first, then for a read or flush the question which one: a request that
        // still sees the source here is waited for by a switchover before the source goes
        // away (a read that began on the source just before the switch returns the same data:
        // writes were held until both agreed). A write was gated before it gets here; one let
        // go on the source is in flight for the engine, so no switchover replaces the
        // descriptors before it ends.
        let held = r.held.get_or_insert_with(|| {
            let h = engine.front_enter();
            if matches!(r.req, Request::Read { .. } | Request::Flush) && engine.serving_target() {
                r.file = TGT;
            }
            h
        });
        let fds = held.fds;
        let f = types::Fd(if r.file == TGT { fds.target } else { fds.source });
        let done = r.done;
        let slot16 = slot as u16;
        let e = match r.req {
            Request::Read { off, len } => {
                // SAFETY: done < len, and the buffer holds len bytes (owned by the request, or
                // the caller's by the contract of submit_in_place) until the completion.
                let p = unsafe { r.data.ptr(len).add(done as usize) };
                opcode::Read::new(f, p, len - done).offset(off + done as u64).build()
            }
            Request::Write { off, len, fua } => {
                let base = r.data.ptr(len);
                if let (ActivePlan::Ship { id }, 0, false, false) = (r.plan, done, r.early_asked, r.zeroes_written) {
                    // Async mode: the bytes are copied now unless they were before it began
                    // (the data is in the request's buffer from the start and does not change
                    // while it is in flight), and the target write goes with the source write
                    // if the engine lets it; otherwise the copy is queued when the source write
                    // completes. Ship slots fit in 16 bits.
                    r.early_asked = true;
                    if let Some(b) = r.ship_copy.take().or_else(|| copy_out(engine, &r.data, len)) {
                        if self.has_target && self.ships.len() + self.to_ship.len() < u16::MAX as usize {
                            match engine.ship_early(id, b) {
                                Ok(ship) => {
                                    r.early = Some(ship.seq);
                                    self.to_ship.push((ship, slot));
                                }
                                Err(b) => r.ship_copy = Some(b),
                            }
                        } else {
                            r.ship_copy = Some(b);
                        }
                    }
                }
                if let (ActivePlan::Target { .. }, 0, false) = (r.plan, done, r.tgt_pending) {
                    // The same buffer to the target, at the same time as to the source. The
                    // target needs no FUA: its durability comes with the mirror's pair flush.
                    let e = opcode::Write::new(types::Fd(fds.target), base, len).offset(off).build();
                    // SAFETY: as for the source write below; the request stays in its slot
                    // until both halves completed (tgt_pending).
                    match unsafe { sink.push(e, Owner::Target, slot16) } {
                        Ok(()) => r.tgt_pending = true,
                        // The write goes on to the source alone; with tgt_ok false its region
                        // stays dirty and the copy follows.
                        Err(e) => log::error!("queue ring: cannot queue a target write: {e}"),
                    }
                }
                // SAFETY: as for reads.
                let p = unsafe { base.add(done as usize) };
                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(f, p, len - done).offset(off + done as u64).rw_flags(flags).build()
            }
            Request::Flush => opcode::Fsync::new(f).flags(types::FsyncFlags::DATASYNC).build(),
            Request::Discard { off, len } => opcode::Fallocate::new(f, len)
                .offset(off)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            Request::WriteZeroes { off, len, unmap } => {
                let mode = if unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(f, len).offset(off).mode(mode).build()
            }
        };
        // SAFETY: the request's buffer (its own, or the caller's by submit_in_place's contract)
        // stays in its slot until this operation's completion frees the slot, or is leaked by
        // abandon_in_flight; its descriptors are held by `held` until then (crate::engine::front).
        if let Err(e) = unsafe { sink.push(e, Owner::Front, slot16) } {
            log::error!("queue ring: cannot queue a request: {e}");
            // Its target write, if it was to go early, is not issued either (the application
            // is told the write failed): it ends as a failed target write.
            if let Some(seq) = self.reqs.get(slot).and_then(|r| r.early) {
                if let Some(i) = self.to_ship.iter().position(|(s, _)| s.seq == seq) {
                    let (s, _) = self.to_ship.swap_remove(i);
                    self.engine.ship_direct_landed(s.seq, Some("its source write could not be queued".into()));
                }
            }
            self.finish(slot, Err(eio()));
        }
    }

    /// Gives up on the requests still in flight (their ring is gone or broken): their buffers,
    /// which the kernel may still write into or read from, are leaked rather than freed.
    pub fn abandon_in_flight(&mut self) {
        let n = self.in_flight();
        if n == 0 && !self.nap.pending {
            return;
        }
        log::error!("{n} requests still in flight on a queue that stops: their buffers are leaked");
        std::mem::forget(std::mem::take(&mut self.reqs));
        // Shipped writes: their buffers are the engine's (leaked there); their holds stay taken,
        // as the requests' do, since the kernel may still use the descriptors. Those not issued
        // yet are reported as failed target writes; like the ones in flight, they stay in
        // flight for the engine while their source write's completion is not reported (the
        // requests are abandoned too): no consistent point, their regions dirty, as after a
        // crash. A half the queue kept for its pair is reported first: the engine then knows
        // what completed (a target error starts its failure handling); no write finishes by it,
        // since its other half is still unknown, so no buffer is freed here.
        let mut ships = std::mem::take(&mut self.ships);
        for (_, j) in ships.iter_mut() {
            if let (Some((id, ok)), false) = (j.source, j.source_reported) {
                self.engine.ship_early_source_done(id, ok);
            }
            if let Some(error) = j.landed.take() {
                self.engine.ship_direct_landed(j.ship.seq, error);
            }
        }
        self.unreported.clear();
        self.engine.leak_ship_bufs(ships.iter().map(|(_, j)| j.ship.handle));
        std::mem::forget(ships);
        for (s, _) in std::mem::take(&mut self.to_ship) {
            self.engine.ship_direct_landed(s.seq, Some("the queue stopped before its target write was issued".into()));
        }
        self.deferred.clear();
        self.gc = GroupCommit::default();
        if self.nap.pending {
            std::mem::forget(std::mem::replace(&mut self.nap.buf, Box::new([0; 8])));
            self.nap.pending = false;
        }
    }

    /// Takes the finished requests.
    pub fn completions(&mut self) -> std::vec::Drain<'_, Completion> {
        self.out.drain(..)
    }

    /// Handles the completion of an operation this pushed (`owner`, `slot` as pushed).
    pub fn complete(&mut self, sink: &mut impl Sink, owner: Owner, slot: u16, res: i32) {
        self.complete_one(sink, owner, slot as usize, res);
        // A write that completed may have handed back a shipped write to issue.
        self.issue_ships(sink);
    }

    fn complete_one(&mut self, sink: &mut impl Sink, owner: Owner, slot: usize, res: i32) {
        match owner {
            Owner::Bitmap => {
                if res < 0 {
                    log::error!(
                        "bitmap fdatasync failed: {}; failing the writes that needed it",
                        io::Error::from_raw_os_error(-res)
                    );
                }
                self.bitmap_flush_ended(sink, res >= 0);
            }
            Owner::Nap => {
                // Still "pending" while the writes ask again, so that those deferred anew do not
                // arm the timer before the next nap's length is known.
                let before = self.deferred.len();
                for slot in std::mem::take(&mut self.deferred) {
                    self.gate(sink, slot);
                }
                self.nap.pending = false;
                // Back off while writes stay held (a switchover may hold them for seconds).
                self.nap.next = if self.deferred.len() < before { NAP_MIN } else { (self.nap.next * 2).min(NAP_MAX) };
                if !self.deferred.is_empty() {
                    self.arm_nap(sink);
                }
            }
            Owner::Front => {
                let Some(r) = self.reqs.get_mut(slot) else { return };
                if res == -libc::EOPNOTSUPP {
                    // A discard is a hint the source may not take: the data stays as it was,
                    // which a discard allows (the device does not promise zeroes after one).
                    if matches!(r.req, Request::Discard { .. }) {
                        r.unchanged = true;
                        return self.finish(slot, Ok(0));
                    }
                    if zeroes_fallback(r) {
                        return self.issue(sink, slot);
                    }
                }
                if res < 0 {
                    let result = self.result_of(slot, res);
                    self.finish(slot, result);
                    return;
                }
                let want = r.req.transfer();
                r.done += res as u32;
                if want > 0 && r.done < want {
                    if res == 0 {
                        self.finish(slot, Err(eio()));
                        return;
                    }
                    return self.issue(sink, slot);
                }
                let result = if r.req == Request::Flush { self.result_of(slot, 0) } else { Ok(r.done) };
                self.finish(slot, result);
            }
            Owner::Target => {
                let Some(r) = self.reqs.get_mut(slot) else { return };
                r.tgt_pending = false;
                // A short target write counts as failed: the region is copied instead.
                r.tgt_ok = res >= 0 && res as u32 == r.req.transfer();
                if !r.tgt_ok {
                    log::debug!("write-blocking: target write failed ({res}); the region stays dirty");
                }
                if let Some(result) = r.src_result.take() {
                    self.finish(slot, result);
                }
            }
            Owner::Ship => {
                let Some(j) = self.ships.get_mut(slot) else { return };
                let left = j.ship.len - j.done;
                match res {
                    n if n > 0 && (n as u64) < left => {
                        j.done += n as u64;
                        self.issue_ship(sink, slot);
                    }
                    n if n > 0 => self.ship_ended(slot, None),
                    n => {
                        let why = if n < 0 { io::Error::from_raw_os_error(-n).to_string() } else { "wrote nothing".into() };
                        let msg = format!("target write of a shipped write at byte {}: {why}", j.ship.off);
                        self.ship_ended(slot, Some(msg));
                    }
                }
            }
            Owner::Source | Owner::Wake => {}
        }
    }

    /// The result of a request whose last operation ended with `res` (< 0: an error). A failed
    /// FLUSH of the source fails every later one too: Linux reports a writeback error to one
    /// fdatasync only, and the mirror's own fdatasync may be the one that took it (see the
    /// engine).
    fn result_of(&self, slot: usize, res: i32) -> io::Result<u32> {
        let Some(r) = self.reqs.get(slot) else { return Ok(0) };
        if r.req == Request::Flush && r.file == SRC {
            if res < 0 {
                self.engine.set_source_flush_failed();
            }
            if self.engine.source_flush_failed() {
                return Err(eio());
            }
        }
        if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            Ok(0)
        }
    }

    fn finish(&mut self, slot: usize, result: io::Result<u32>) {
        if let Some(r) = self.reqs.get_mut(slot) {
            if r.tgt_pending {
                r.src_result = Some(result);
                return;
            }
        }
        let Some(r) = self.reqs.try_remove(slot) else { return };
        if let Some(h) = r.held {
            self.engine.front_exit(h);
        }
        match (r.begun, r.ext, r.plan) {
            (true, Some(_), ActivePlan::Ship { id }) => {
                // Queued for the target before the write completes: the application may count on
                // it from the completion on. The bytes are copied (the request's buffer goes back
                // to the driver with the completion). An early write's bytes went to the target
                // when it was issued: only its source half is left to report.
                if let Some(seq) = r.early {
                    self.early_source_done(id, seq, r.ship_slot, slot, result.is_ok());
                } else {
                    // A discard or write-zeroes that took effect leaves zeroes: shipped as a
                    // zeroing.
                    let data = match (&result, r.req, &r.data) {
                        (Ok(_), Request::Write { .. }, _) if r.zeroes_written => Shipped::Zeroes,
                        (Ok(_), Request::Write { .. }, _) if r.ship_copy.is_some() => r.ship_copy.map_or(Shipped::Nothing, Shipped::Bytes),
                        (Ok(_), Request::Write { len, .. }, d) => copy_out(&self.engine, d, len).map_or(Shipped::Nothing, Shipped::Bytes),
                        (Ok(_), Request::Discard { .. }, _) if !r.unchanged => Shipped::Zeroes,
                        (Ok(_), Request::WriteZeroes { .. }, _) => Shipped::Zeroes,
                        _ => Shipped::Nothing,
                    };
                    self.engine.ship_written(id, result.is_ok(), data);
                }
                if let (Ok(_), Request::Write { fua: true, .. }) = (&result, r.req) {
                    self.engine.ship_device_flush();
                }
            }
            // Whatever happened (even a write that failed halfway), the region may have changed.
            (true, Some(ext), plan) => self.engine.end_write_planned(ext, plan, result.is_ok(), r.tgt_ok),
            _ => {}
        }
        if let (Err(e), Some((off, len))) = (&result, r.req.range()) {
            log::warn!("{} error at byte {off} (+{len}): {e}", if r.file == TGT { "target" } else { "source" });
        }
        let buf = match r.data {
            Data::Owned(b) => Some(b),
            _ => None,
        };
        self.out.push(Completion { tag: r.tag, result, buf });
    }
}

/// [`QueueRequests`] on a ring of its own: the engine's front end without a kernel device.
pub struct EngineQueue {
    ring: Ring,
    reqs: QueueRequests,
    cqes: Vec<(u64, i32)>,
    ready: Vec<Completion>,
}

impl EngineQueue {
    /// A queue on `engine` with room for `depth` requests in flight (more are queued too).
    pub fn new(engine: Arc<Engine>, depth: u32) -> io::Result<Self> {
        let ring = uring::new_ring((depth * 4 + 4).next_power_of_two())?;
        Ok(EngineQueue { ring, reqs: QueueRequests::new(engine)?, cqes: Vec::new(), ready: Vec::new() })
    }

    pub fn in_flight(&self) -> usize {
        self.reqs.in_flight()
    }

    /// Queues a request; its completion comes from [`Self::wait`].
    pub fn submit(&mut self, tag: u64, op: Op) -> io::Result<()> {
        self.reqs.submit(&mut RingSink(&mut self.ring), tag, op);
        self.ready.extend(self.reqs.completions());
        Ok(())
    }

    /// Waits until at least `min` completions are available (or `timeout` passes) and returns
    /// all available ones.
    pub fn wait(&mut self, min: usize, timeout: Duration) -> io::Result<Vec<Completion>> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ready.len() >= min {
                return Ok(std::mem::take(&mut self.ready));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} requests still in flight after {timeout:?}", self.in_flight()),
                ));
            }
            let ts = types::Timespec::new().sec(left.as_secs()).nsec(left.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            self.cqes.clear();
            uring::reap(&mut self.ring, &mut self.cqes);
            for &(ud, res) in &self.cqes {
                let (Some(owner), slot) = uring::decode(ud) else { continue };
                self.reqs.complete(&mut RingSink(&mut self.ring), owner, slot as u16, res);
            }
            self.ready.extend(self.reqs.completions());
        }
    }

    /// Handles completions until nothing of this queue is in flight, requests and the shipped
    /// writes it issued to the target (async mode) alike, or `timeout` passes. A device's queue
    /// thread always waits on its ring; a caller of this one that stops submitting calls this
    /// so that its shipped writes land.
    pub fn settle(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.in_flight() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} requests or shipped writes still in flight after {timeout:?}", self.in_flight()),
                ));
            }
            match self.wait(usize::MAX, left.min(Duration::from_millis(50))) {
                Err(e) if e.kind() != io::ErrorKind::TimedOut => return Err(e),
                Ok(done) => self.ready.extend(done),
                Err(_) => {}
            }
        }
        Ok(())
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
        self.ready.extend(others);
        got.result.map(|n| (n, got.buf))
    }
}

impl Drop for EngineQueue {
    /// Closing a ring does not wait for its operations: wait for them (bounded), so that no
    /// buffer is freed under the kernel; what does not end in time is leaked instead.
    fn drop(&mut self) {
        let t0 = Instant::now();
        while self.in_flight() > 0 && t0.elapsed() < Duration::from_secs(10) {
            // Returns (TimedOut) after 100 ms, having handled whatever completed meanwhile;
            // any other error is a broken ring: nothing more will complete.
            match self.wait(usize::MAX, Duration::from_millis(100)) {
                Err(e) if e.kind() != io::ErrorKind::TimedOut => break,
                _ => {}
            }
        }
        self.reqs.abandon_in_flight();
    }
}
