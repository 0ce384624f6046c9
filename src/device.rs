//! The ublk device: /dev/ublkbN served from the source, with the engine's write-intent protocol
//! on every write and the mirror loop running alongside.
//!
//! Data plane (libublk 0.4.8, async style): one thread and one io_uring per queue, one task per
//! tag. Forwarding a request costs one SQE on the queue's ring. The bitmap is a fixed file there
//! (slot 0 is libublk's /dev/ublkcN); source and target are plain descriptors taken from the
//! engine per request (see [`crate::front`]), because a switchover replaces them under live I/O
//! and must know when the old ones are no longer used (a fixed-file slot keeps its file open in
//! the kernel until every request issued before its update has completed, and each idle ublk
//! tag keeps one pending). A write to a region whose bit is not yet durable first waits for a
//! bitmap fdatasync issued on the same ring; writes of the same queue that arrive meanwhile
//! share it (group commit).

use crate::engine::{CopyConfig, Engine, Gate, MirrorNext};
use crate::core::{ActivePlan, Intent};
use crate::mirror::{Mirror, RunUntil};
use io_uring::{opcode, squeue, types};
use libublk::helpers::IoBuf;
use libublk::io::{BufDesc, UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, UblkError, UblkUringData};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

const BITMAP: types::Fixed = types::Fixed(1);

/// Raw `op_flags` bits (tested in place, not shifted).
pub const IO_F_FUA: u32 = 1 << 13;
pub const IO_F_NOUNMAP: u32 = 1 << 15;

async fn submit(sqe: squeue::Entry) -> i32 {
    match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
        Ok(r) => r,
        Err(e) => {
            log::error!("queue ring: submission failed: {e:?}");
            -libc::EIO
        }
    }
}

/// Group commit of bitmap flushes within one queue: at most one fdatasync of the bitmap in
/// flight; writers that need a later one wait for it to finish, then one of them starts the
/// next. A flush covers every bit set before it started (see `MirrorState`), so any number of
/// concurrent first writes share at most two flushes.
#[derive(Default)]
struct QueueCommit {
    inner: RefCell<CommitState>,
}

#[derive(Default)]
struct CommitState {
    in_flight: bool,
    generation: u64,
    waiters: Vec<Waker>,
}

impl QueueCommit {
    /// Resolves when the flush in flight now has completed.
    async fn flush_done(&self) {
        let gen = self.inner.borrow().generation;
        std::future::poll_fn(|cx| {
            let mut s = self.inner.borrow_mut();
            if s.generation != gen || !s.in_flight {
                Poll::Ready(())
            } else {
                s.waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Makes the intent sequence `seq` durable: 0, or -EIO if the bitmap cannot be flushed (the
    /// write is then failed without touching the source).
    async fn ensure(&self, engine: &Engine, seq: u64) -> i32 {
        loop {
            if engine.intent_durable(seq) {
                return 0;
            }
            if self.inner.borrow().in_flight {
                self.flush_done().await;
                continue;
            }
            self.inner.borrow_mut().in_flight = true;
            let start = engine.bitmap_flush_start();
            let r = submit(opcode::Fsync::new(BITMAP).flags(types::FsyncFlags::DATASYNC).build()).await;
            engine.bitmap_flush_done(start, r >= 0);
            let waiters = {
                let mut s = self.inner.borrow_mut();
                s.in_flight = false;
                s.generation += 1;
                std::mem::take(&mut s.waiters)
            };
            waiters.into_iter().for_each(Waker::wake);
            if r < 0 {
                log::error!("bitmap fdatasync failed ({}): failing a write", std::io::Error::from_raw_os_error(-r));
                return -libc::EIO;
            }
        }
    }
}

/// Sleeps on the queue's ring (the task yields; other tags keep being served).
async fn ring_sleep(d: std::time::Duration) {
    let ts = types::Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos());
    // -ETIME is the normal completion of a timeout.
    let _ = submit(opcode::Timeout::new(&ts).build()).await;
}

async fn rw_on(file: types::Fd, write: bool, fua: bool, off: u64, len: u64, buf: &IoBuf<u8>) -> i32 {
    if len > buf.len() as u64 {
        return -libc::EINVAL;
    }
    let mut done = 0u64;
    while done < len {
        // SAFETY: done < len <= buf.len(), and the buffer outlives the awaited operation.
        let p = unsafe { buf.as_mut_ptr().add(done as usize) };
        let n = (len - done) as u32;
        let sqe = if write {
            let flags = if fua { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(file, p, n).offset(off + done).rw_flags(flags).build()
        } else {
            opcode::Read::new(file, p, n).offset(off + done).build()
        };
        match submit(sqe).await {
            r if r < 0 => return r,
            0 => return -libc::EIO,
            r => done += r as u64,
        }
    }
    len as i32
}

async fn handle(q: &UblkQueue<'_>, tag: u16, buf: &IoBuf<u8>, engine: &Engine, commit: &QueueCommit, has_target: bool) -> i32 {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let flags = iod.op_flags;
    let off = iod.start_sector << 9;
    let len = (iod.nr_sectors as u64) << 9;
    match op {
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_FLUSH => {
            // Descriptors first, then the question which one: a request that still sees the
            // source here is waited for by the switchover before the source goes away. A read
            // that started on the source just before the switch returns the same data (writes
            // were held until both agreed).
            let h = engine.front_enter();
            let switched = engine.serving_target();
            let file = types::Fd(if switched { h.fds.target } else { h.fds.source });
            let r = if op == sys::UBLK_IO_OP_READ {
                rw_on(file, false, false, off, len, buf).await
            } else {
                // Under write intent every bit a completed write needed is already durable, so
                // a FLUSH is only a durability flush of the data (the target once switched).
                let r = submit(opcode::Fsync::new(file).flags(types::FsyncFlags::DATASYNC).build()).await;
                if r < 0 && !switched {
                    engine.set_source_flush_failed();
                }
                if engine.source_flush_failed() && !switched { -libc::EIO } else { r }
            };
            engine.front_exit(h);
            return r;
        }
        sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {}
        _ => return -libc::EOPNOTSUPP,
    }
    if len == 0 || off + len > engine.size() {
        return -libc::EINVAL;
    }
    let ext = engine.extent(off, len);
    // Write-blocking mode mirrors writes (not discards or write-zeroes: those stay dirty and
    // the copy turns them into holes or zeroes on the target). During a consistent flush such
    // a write waits for it (at most half a second before it goes ahead as an ordinary write);
    // during a switchover every write waits (the switchover bounds that).
    let mirror_ok = op == sys::UBLK_IO_OP_WRITE && has_target;
    let t0 = std::time::Instant::now();
    let mut nap = std::time::Duration::from_micros(500);
    let (intent, plan, mirrored) = loop {
        let may_wait = t0.elapsed() < std::time::Duration::from_millis(500);
        match engine.begin_request(ext, off, len, mirror_ok, may_wait) {
            Gate::Go(i, p) => break (i, p, true),
            Gate::Target => break (Intent::Ready, ActivePlan::SourceOnly, false),
            Gate::Wait => {
                ring_sleep(nap).await;
                nap = (nap * 2).min(std::time::Duration::from_millis(10));
            }
        }
    };
    // Taken after the gate: a write waiting at a switchover's barrier must not hold the
    // descriptors the switchover is about to replace. A write let go on the source is in
    // flight for the engine, so no switchover can replace them before it ends.
    let h = engine.front_enter();
    let (source, target) = (types::Fd(h.fds.source), types::Fd(h.fds.target));
    let file = if mirrored { source } else { target };
    let mut res = match intent {
        Intent::Ready => 0,
        Intent::Wait { seq } => commit.ensure(engine, seq).await,
    };
    let mut target_ok = false;
    if res == 0 {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        res = match op {
            sys::UBLK_IO_OP_WRITE if plan != ActivePlan::SourceOnly => {
                // Both at once from the same buffer; the write completes when both have. The
                // target needs no FUA: its durability comes with the mirror's pair flush.
                let fua = flags & IO_F_FUA != 0;
                let (s, t) = smol::future::zip(
                    rw_on(source, true, fua, off, len, buf),
                    rw_on(target, true, false, off, len, buf),
                )
                .await;
                target_ok = t >= 0;
                if t < 0 {
                    log::debug!("write-blocking: target write at {off} failed ({}); region stays dirty", std::io::Error::from_raw_os_error(-t));
                }
                s
            }
            sys::UBLK_IO_OP_WRITE => rw_on(file, true, flags & IO_F_FUA != 0, off, len, buf).await,
            sys::UBLK_IO_OP_DISCARD => {
                let mode = keep | libc::FALLOC_FL_PUNCH_HOLE;
                submit(opcode::Fallocate::new(file, len).offset(off).mode(mode).build()).await
            }
            _ => {
                let mode = if flags & IO_F_NOUNMAP != 0 {
                    keep | libc::FALLOC_FL_ZERO_RANGE
                } else {
                    keep | libc::FALLOC_FL_PUNCH_HOLE
                };
                submit(opcode::Fallocate::new(file, len).offset(off).mode(mode).build()).await
            }
        };
    }
    engine.front_exit(h);
    // Whatever happened (even a write that failed halfway), the region may have changed.
    if mirrored {
        engine.end_write_planned(ext, plan, res >= 0, target_ok);
    }
    if res < 0 {
        log::warn!("source error at byte {off} (+{len}): {}", std::io::Error::from_raw_os_error(-res));
    }
    res
}

/// Keeps a tag's buffer on small pages. The buffers come from the allocator, which may place
/// them in a heap region that transparent huge pages back (seen in the VM: 16 MiB of huge pages
/// in an idle daemon), so that the first 4 KiB request of each tag faults in 2 MiB. With small
/// pages a queue's resident memory follows the request sizes actually used. (This did not change
/// the 4k throughput measured in the VM; see bench/README.md.)
fn no_huge_pages(buf: &IoBuf<u8>) {
    let (p, len) = (buf.as_mut_ptr() as *mut libc::c_void, buf.len());
    // SAFETY: [p, p+len) is this tag's buffer, 4096-aligned, owned by the caller and not yet
    // shared with the kernel or any other code (it is registered with the driver right after);
    // MADV_DONTNEED only drops its (meaningless, never written) contents, and the range covers
    // whole pages of this allocation only.
    let r = unsafe {
        if libc::madvise(p, len, libc::MADV_NOHUGEPAGE) == 0 {
            libc::madvise(p, len, libc::MADV_DONTNEED)
        } else {
            -1
        }
    };
    if r != 0 {
        log::debug!("madvise of a queue buffer: {}", std::io::Error::last_os_error());
    }
}

async fn io_task(q: &UblkQueue<'_>, tag: u16, engine: &Engine, commit: &QueueCommit, has_target: bool) -> Result<(), UblkError> {
    let buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    no_huge_pages(&buf);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), -1, Some(&buf)).await?;
    loop {
        let res = handle(q, tag, &buf, engine, commit, has_target).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res).await?;
    }
}

/// Body of one queue thread.
pub fn queue_main(qid: u16, dev: &UblkDev, engine: Arc<Engine>, has_target: bool) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!("queue {qid}: setup failed: {e:?}");
            // Without this, START_DEV would wait forever for this queue's buffers (and DEL would
            // then hang); reporting a failed registration makes the start fail instead.
            dev.notify_buffer_registration_complete(true);
            return;
        }
    };
    let commit = Rc::new(QueueCommit::default());
    let exe = smol::LocalExecutor::new();
    let tasks: Vec<_> = q
        .tags()
        .map(|tag| {
            let (q, engine, commit) = (q.clone(), engine.clone(), commit.clone());
            exe.spawn(async move {
                match io_task(&q, tag, &engine, &commit, has_target).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => log::error!("queue {qid} tag {tag}: {e:?}"),
                }
            })
        })
        .collect();
    smol::block_on(exe.run(async {
        let run_ops = || while exe.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            log::error!("queue {qid}: event loop: {e:?}");
        }
    }));
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

/// Runs the mirror loop on its own thread until the engine is asked to stop. A reverse
/// switchover parks the loop and hands it its new target; the loop then starts again on the
/// new pair (with a new ring, so nothing of the old pair stays registered).
pub fn spawn_mirror(
    engine: Arc<Engine>,
    mut target: crate::target::BoxTarget,
    mut cfg: CopyConfig,
) -> std::thread::JoinHandle<crate::Result<()>> {
    std::thread::Builder::new()
        .name("mirror".into())
        .spawn(move || loop {
            engine.set_mirror_running(true);
            let r = Mirror::new(engine.clone(), target.as_mut(), cfg.clone()).and_then(|mut m| m.run(RunUntil::Stopped, None));
            engine.set_mirror_running(false);
            r?;
            match engine.mirror_next() {
                MirrorNext::Stop => return Ok(()),
                MirrorNext::Same => {}
                MirrorNext::Target(t) => {
                    target = t;
                    // The --on-consistent command's environment names the reversed pair.
                    if let Some(h) = cfg.on_consistent.as_mut() {
                        for (k, _) in h.env.iter_mut() {
                            match k.as_str() {
                                "UBLK_MIRROR_SOURCE" => *k = "UBLK_MIRROR_TARGET".into(),
                                "UBLK_MIRROR_TARGET" => *k = "UBLK_MIRROR_SOURCE".into(),
                                _ => {}
                            }
                        }
                    }
                }
            }
        })
        .unwrap_or_else(|e| {
            // Thread creation fails only when the process is out of resources; the daemon
            // cannot serve a mirror without it.
            log::error!("cannot start the mirror thread: {e}");
            std::process::exit(1)
        })
}
