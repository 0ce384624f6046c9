//! The ublk device: /dev/ublkbN served from the source, with the engine's write-intent protocol
//! on every write and the mirror loop running alongside.
//!
//! Data plane (libublk 0.4.8, callback style): one thread and one io_uring per queue. Each
//! completion on the queue's ring (a new request from the driver, or one of our operations)
//! goes to the queue's [`QueueRequests`], the same protocol code the engine tests drive on a ring of
//! their own (crate::engine::queue); what it finishes is committed back to the driver at once.
//! Forwarding a read costs one SQE; a write whose bit is already durable one SQE, otherwise it
//! first waits for a bitmap fdatasync on the same ring, shared by the queue's writes that
//! arrive meanwhile (group commit). Source and target are plain descriptors taken from the
//! engine per request (see [`crate::engine::front`]): a switchover replaces them under live I/O and must
//! know when the old ones are no longer used (a fixed-file slot keeps its file open in the
//! kernel until every request issued before its update has completed, and each idle ublk tag
//! keeps one pending).

use crate::engine::{CopyConfig, Engine, MirrorNext};
use crate::engine::mirror::{Mirror, RunUntil};
use crate::engine::queue::{Request, QueueRequests, Sink};
use crate::io::uring::Owner;
use libublk::helpers::IoBuf;
use libublk::io::{BufDesc, BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, UblkError, UblkIORes, UblkUringData};
use crate::core::policy::{Backoff, MAX_BACKOFF, MIN_BACKOFF};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Raw `op_flags` bits (tested in place, not shifted).
pub const IO_F_FUA: u32 = 1 << 13;
pub const IO_F_NOUNMAP: u32 = 1 << 15;

/// The ublk queue's ring as the sink of its [`QueueRequests`]. libublk routes a completion by its
/// user_data: the low 16 bits are a tag, and the target-I/O bit sends it to our handler; the
/// request's slot goes where libublk expects the tag (the handler does not read it as one) and
/// the owner in the target-data bits.
struct QueueSink<'a, 'b>(&'a UblkQueue<'b>);

impl Sink for QueueSink<'_, '_> {
    /// The caller keeps what `entry` points at valid until its completion comes back through
    /// `on_cqe` (the trait's contract); libublk's submit takes the entry as it is.
    unsafe fn push(&mut self, entry: io_uring::squeue::Entry, owner: Owner, slot: u16) -> std::io::Result<()> {
        let entry = entry.user_data(UblkIOCtx::build_user_data(slot, 0, owner as u32, true));
        // It fails only when the submission queue is full and submitting it fails; a transient
        // failure (interrupted, out of resources for the moment) gets a few more tries before
        // the request fails.
        let mut tries = 0;
        loop {
            match self.0.ublk_submit_sqe_sync(entry.clone()) {
                Ok(()) => return Ok(()),
                Err(UblkError::IOError(e))
                    if tries < 3 && matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) =>
                {
                    tries += 1;
                }
                Err(e) => return Err(std::io::Error::other(format!("queue ring: {e:?}"))),
            }
        }
    }
}

fn owner_of(user_data: u64) -> Option<Owner> {
    // build_user_data shifts the target data in 32 bits: 8 of them survive, bits 24..32.
    Owner::from_code((user_data >> 24) & 0xff)
}

/// The request the driver sent in `iod`, or the error to fail it with.
fn request_of(iod: &sys::ublksrv_io_desc, buf_len: usize) -> Result<Request, i32> {
    let op = iod.op_flags & 0xff;
    let flags = iod.op_flags;
    // Under write intent every bit a completed write needed is durable already, so a FLUSH is
    // only a durability flush of the data. It carries no range: the block layer's flush
    // request has the start sector (sector_t)-1 (blk_rq_init), which must not be checked.
    if op == sys::UBLK_IO_OP_FLUSH {
        return Ok(Request::Flush);
    }
    // A shift would drop the high bits of a start sector beyond 2^55 and give a small offset
    // that passes the queue's bound check: refused instead. (The block layer bounds requests
    // by the capacity, so only a driver bug sends one; the queue refuses any past the end.)
    let off = iod.start_sector.checked_mul(512).ok_or(-libc::EINVAL)?;
    // Below 2^41: nr_sectors is a u32.
    let len = u64::from(iod.nr_sectors) << 9;
    let transfer = || if len <= buf_len as u64 { Ok(len as u32) } else { Err(-libc::EINVAL) };
    Ok(match op {
        sys::UBLK_IO_OP_READ => Request::Read { off, len: transfer()? },
        sys::UBLK_IO_OP_WRITE => Request::Write { off, len: transfer()?, fua: flags & IO_F_FUA != 0 },
        sys::UBLK_IO_OP_DISCARD => Request::Discard { off, len },
        sys::UBLK_IO_OP_WRITE_ZEROES => Request::WriteZeroes { off, len, unmap: flags & IO_F_NOUNMAP == 0 },
        _ => return Err(-libc::EOPNOTSUPP),
    })
}

fn commit(q: &UblkQueue<'_>, bufs: &[IoBuf<u8>], tag: u16, res: i32) {
    let Some(buf) = bufs.get(tag as usize) else { return };
    if let Err(e) = q.complete_io_cmd_unified(tag, BufDesc::Slice(buf.as_slice()), Ok(UblkIORes::Result(res))) {
        log::error!("queue {}: committing tag {tag}: {e:?}", q.get_qid());
    }
}

/// Keeps a tag's buffer on small pages. The buffers come from the allocator, which may place
/// them in a heap region that transparent huge pages back, so that the first 4 KiB request of
/// each tag would fault in 2 MiB. With small pages a queue's resident memory follows the request
/// sizes actually used (measurements in bench/README.md).
fn no_huge_pages(buf: &IoBuf<u8>) {
    use nix::sys::mman::{madvise, MmapAdvise};
    let len = buf.len();
    let Some(p) = std::ptr::NonNull::new(buf.as_mut_ptr().cast::<std::ffi::c_void>()) else { return };
    // SAFETY: [p, p+len) is this tag's buffer, 4096-aligned, owned by the caller and not yet
    // shared with the kernel or any other code (it is registered with the driver right after);
    // MADV_DONTNEED only drops its (meaningless, never written) contents, and the range covers
    // whole pages of this allocation only.
    let r = unsafe { madvise(p, len, MmapAdvise::MADV_NOHUGEPAGE).and_then(|()| madvise(p, len, MmapAdvise::MADV_DONTNEED)) };
    if let Err(e) = r {
        log::debug!("madvise of a queue buffer: {}", std::io::Error::from(e));
    }
}

/// One completion on the queue's ring: a new request from the driver, or one of our operations.
fn on_cqe(q: &UblkQueue<'_>, bufs: &[IoBuf<u8>], reqs: &mut QueueRequests, user_data: u64, res: i32) {
    let mut sink = QueueSink(q);
    // Both kinds carry a 16-bit number in the low bits: the driver's tag, or our slot.
    let n = (user_data & 0xffff) as u16;
    if user_data & UblkUringData::Target as u64 != 0 {
        if let Some(owner) = owner_of(user_data) {
            reqs.complete(&mut sink, owner, n, res);
        }
    } else if res == sys::UBLK_IO_RES_OK as i32 {
        let Some(buf) = bufs.get(n as usize) else { return };
        match request_of(q.get_iod(n), buf.len()) {
            // SAFETY: the tag's buffer holds max_io_buf_bytes (request_of refused longer
            // transfers); the driver does not reuse the tag, and nothing else here touches its
            // buffer, until we commit the tag, which happens only once its completion came out
            // of `reqs`.
            Ok(req) => unsafe { reqs.submit_in_place(&mut sink, n as u64, req, buf.as_mut_ptr()) },
            Err(res) => commit(q, bufs, n, res),
        }
    }
    // Any other result of a driver command (UBLK_IO_RES_ABORT: the queue is stopping) brings
    // no request; libublk counts those commands itself.
    for c in reqs.completions() {
        let res = match c.result {
            Ok(n) => n as i32,
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        };
        commit(q, bufs, c.tag as u16, res);
    }
}

/// Body of one queue thread.
pub fn queue_main(qid: u16, dev: &UblkDev, engine: Arc<Engine>) {
    let bufs = Rc::new(dev.alloc_queue_io_bufs());
    bufs.iter().for_each(no_huge_pages);
    let setup = QueueRequests::new(engine).map_err(|e| format!("{e}")).and_then(|reqs| {
        let q = UblkQueue::new(qid, dev).map_err(|e| format!("{e:?}"))?;
        let q = q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))).map_err(|e| format!("{e:?}"))?;
        Ok((q, reqs))
    });
    let (q, mut reqs) = match setup {
        Ok(x) => x,
        Err(e) => {
            log::error!("queue {qid}: setup failed: {e}");
            // START_DEV waits for every queue's buffers (and DEL would then hang): reporting the
            // registration as failed makes the start fail instead.
            dev.notify_buffer_registration_complete(true);
            return;
        }
    };
    // libublk's wait_and_handle_io() would do, except that it ends the queue on any error of
    // the ring wait, EINTR included (a signal handled on this thread, should the daemon ever
    // install a handler; stop and continue do not interrupt the wait on 6.12, the VM scenario
    // device-fio-kill checks that the device keeps serving). Only the queue going down (or a
    // broken ring) ends this loop.
    let clean = loop {
        match q.flush_and_wake_io_tasks(|user_data, cqe, _| on_cqe(&q, &bufs, &mut reqs, user_data, cqe.result()), 1) {
            Ok(_) => {}
            Err(UblkError::IOError(e)) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(UblkError::QueueIsDown) => break true,
            Err(e) => {
                log::error!("queue {qid}: {e:?}");
                break false;
            }
        }
    };
    if clean && reqs.in_flight() > 0 && reqs.requests_in_flight() == 0 {
        drain_ships(&q, &bufs, &mut reqs);
    }
    for tag in q.tags() {
        q.unregister_io_buf(tag);
    }
    if !clean || reqs.in_flight() > 0 {
        // The kernel may still use these buffers: our operations in flight, or (after a
        // broken ring) the driver's commands of idle tags, which point at them too.
        reqs.abandon_in_flight();
        std::mem::forget(bufs);
    }
}

/// How long a queue that went down waits for its shipped writes still in flight.
const SHIP_DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// The queue went down with no request left but shipped target writes still in flight (async
/// mode's early writes outlive their requests): their completions are reaped from the ring,
/// which libublk no longer waits on once its commands are done, for at most [`SHIP_DRAIN`], so
/// that their landings are reported (the loop's last flush can then be a consistent point)
/// rather than abandoned. Driver commands completing meanwhile carry no request and are left.
fn drain_ships(q: &UblkQueue<'_>, bufs: &[IoBuf<u8>], reqs: &mut QueueRequests) {
    let deadline = Instant::now() + SHIP_DRAIN;
    let n = reqs.in_flight();
    while reqs.in_flight() > 0 && Instant::now() < deadline {
        let cqes: Vec<(u64, i32)> = libublk::with_task_io_ring_mut(|ring| {
            let ts = io_uring::types::Timespec::new().nsec(100_000_000);
            let args = io_uring::types::SubmitArgs::new().timespec(&ts);
            // A timeout (ETIME) or an interruption only ends this wait: the loop checks again.
            let _ = ring.submitter().submit_with_args(1, &args);
            ring.completion().map(|c| (c.user_data(), c.result())).collect()
        });
        for (user_data, res) in cqes {
            if user_data & UblkUringData::Target as u64 != 0 {
                on_cqe(q, bufs, reqs, user_data, res);
            }
        }
    }
    if reqs.in_flight() > 0 {
        log::warn!("{} of {n} shipped writes still in flight {SHIP_DRAIN:?} after the queue went down", reqs.in_flight());
    } else {
        log::debug!("{n} shipped writes landed after the queue went down");
    }
}

/// Device parameters from the source: size, block sizes, discard.
pub fn params(engine: &Engine, max_io_buf_bytes: u32) -> sys::ublk_params {
    let src = engine.source();
    let lbs_shift = src.logical_block.trailing_zeros() as u8;
    let pbs_shift = src.physical_block.trailing_zeros().max(lbs_shift as u32) as u8;
    sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            // A volatile cache: the kernel sends FLUSH, and FUA only comes with it.
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: lbs_shift,
            physical_bs_shift: pbs_shift,
            io_opt_shift: pbs_shift,
            io_min_shift: lbs_shift,
            max_sectors: max_io_buf_bytes >> 9,
            dev_sectors: engine.size() >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_granularity: src.physical_block.max(4096),
            max_discard_sectors: (1 << 30) >> 9,
            max_write_zeroes_sectors: (1 << 30) >> 9,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Runs the mirror loop on its own thread until the engine is asked to stop, and supervises
/// it: a loop that ends with an error (its ring cannot be set up, a broken ring...) is restarted
/// after a backoff, as failed copies are retried, and the failure counts toward
/// `--max-retries`; meanwhile status says `failed` (see [`Engine::mirror_loop_failed`]). Once
/// mirroring gave up, the thread waits for the stop. A reverse switchover parks the loop and
/// hands it its new target; the loop then starts again on the new pair (with a new ring, so
/// nothing of the old pair stays registered).
pub fn spawn_mirror(
    engine: Arc<Engine>,
    target: crate::io::target::BoxTarget,
    cfg: CopyConfig,
) -> std::thread::JoinHandle<crate::Result<()>> {
    std::thread::Builder::new()
        .name("mirror".into())
        .spawn(move || supervise(engine, target, cfg))
        .unwrap_or_else(|e| {
            // Thread creation fails only when the process is out of resources; the daemon
            // cannot serve a mirror without it.
            log::error!("cannot start the mirror thread: {e}");
            std::process::exit(1)
        })
}

/// The mirror thread's body (see [`spawn_mirror`]). Returns at the stop: the last loop's error,
/// if it ended with one.
fn supervise(engine: Arc<Engine>, mut target: crate::io::target::BoxTarget, mut cfg: CopyConfig) -> crate::Result<()> {
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    loop {
        engine.set_mirror_running(true);
        let r = Mirror::new(engine.clone(), target.as_mut(), cfg.clone()).and_then(|mut m| {
            engine.mirror_loop_started();
            m.run(RunUntil::Stopped, None)
        });
        engine.set_mirror_running(false);
        if let Err(e) = r {
            if engine.stop_requested() {
                return Err(e);
            }
            // A target that worked since the last failure starts the backoff anew.
            if engine.lock().progress.target_failures == 0 {
                backoff.succeeded();
            }
            let wait = backoff.failed(Instant::now());
            let retry = engine.mirror_loop_failed(&e, wait);
            // Counted from here: the report above may take a moment (its log and events).
            let until = Instant::now() + wait;
            // Until the retry is due (for ever once given up), unless asked to stop, or to
            // park for a switchover (whose decision is taken below).
            engine.wait_retry_or_park(retry.then_some(until));
            if engine.stop_requested() {
                return Err(e);
            }
            if !engine.mirror_should_return() {
                continue;
            }
        }
        match engine.mirror_next() {
            MirrorNext::Stop => return Ok(()),
            MirrorNext::Same => {}
            MirrorNext::Target(t) => {
                target = t;
                // The --on-consistent command's environment names the reversed pair.
                if let Some(h) = cfg.on_consistent.as_mut() {
                    h.swap_pair();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(op: u32, start_sector: u64, nr_sectors: u32) -> sys::ublksrv_io_desc {
        sys::ublksrv_io_desc { op_flags: op, nr_sectors, start_sector, addr: 0 }
    }

    /// A start sector whose byte offset does not fit in 64 bits is refused (EINVAL), never
    /// wrapped to a small offset that the queue's bound check would let through.
    #[test]
    fn a_start_sector_beyond_64_bit_bytes_is_refused() {
        for op in [sys::UBLK_IO_OP_READ, sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_OP_DISCARD, sys::UBLK_IO_OP_WRITE_ZEROES] {
            for start in [(1u64 << 55) + 8, 1 << 63, u64::MAX] {
                let r = request_of(&desc(op, start, 8), 1 << 20);
                assert_eq!(r, Err(-libc::EINVAL), "op {op}, start sector {start}");
            }
        }
        // The block layer's own flush request has no position: its start sector is
        // (sector_t)-1, and mkfs's fsync fails with EINVAL if that is checked.
        for start in [0, u64::MAX] {
            assert_eq!(request_of(&desc(sys::UBLK_IO_OP_FLUSH, start, 0), 1 << 20), Ok(Request::Flush));
        }
        let last = (u64::MAX >> 9) - 7;
        assert_eq!(
            request_of(&desc(sys::UBLK_IO_OP_WRITE, last, 8), 1 << 20),
            Ok(Request::Write { off: last << 9, len: 4096, fua: false }),
            "the last sector whose byte offset fits"
        );
    }
}
