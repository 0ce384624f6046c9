//! The engine on real files through io_uring: live writes while the mirror runs, the
//! write-during-copy case, interrupted and resumed syncs, sparse files.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;
use ublk_mirror::io::backing::{AlignedBuf, DirectMode};
use ublk_mirror::io::bitmap::Bitmap;
use ublk_mirror::engine::{CopyConfig, Engine, SyncMode};
use ublk_mirror::engine::mirror::{TestHooks, Mirror, RunUntil};
use ublk_mirror::engine::queue::{Completion, EngineQueue, Op, QueueRequests, RingSink, Sink};
use ublk_mirror::io::uring::Owner;
use ublk_mirror::offline::{self, VerifyOptions};

const MIB: u64 = 1 << 20;

fn verify_opts(f: &Files) -> VerifyOptions {
    VerifyOptions {
        source: f.source.clone(),
        target: f.target.clone(),
        bitmap: Some(f.bitmap.clone()),
        granularity: None,
        direct: DirectMode::Auto,
        tls: Default::default(),
    }
}

/// Several writer threads, each a queue with many requests in flight, issue random writes,
/// FUA writes, discards, write-zeroes and flushes while the mirror copies; reads are checked
/// against what the queue itself last wrote. After the writers stop, the mirror converges and
/// source, target and `verify` agree.
#[test]
fn random_concurrent_io_while_mirroring_converges() {
    const SIZE: u64 = 32 * MIB;
    let f = files(SIZE);
    fill_random(&f.source, 0, (8 * MIB) as usize, 1);
    let (engine, mut target, open) = Engine::open(&f.pair(None, Some(16 << 10))).expect("open");
    assert_eq!(open.mode, SyncMode::Full);
    let engine = Arc::new(engine);
    let cfg = CopyConfig { max_copies: 8, buf_size: 256 << 10, ..Default::default() };
    let mirror_engine = engine.clone();
    let mirror = std::thread::spawn(move || {
        let mut m = Mirror::new(mirror_engine, target.as_mut(), cfg).expect("mirror");
        m.run(RunUntil::Stopped, None).expect("mirror run")
    });

    const WRITERS: u64 = 3;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + w);
                let mut q = EngineQueue::new(engine, 16).expect("queue");
                // Each writer owns an interleaved stripe of 1 MiB slices, so the data a read
                // sees is determined by this writer alone.
                let slices: Vec<u64> = (0..SIZE / MIB).filter(|s| s % WRITERS == w).collect();
                // Expected content of each 4 KiB block this writer touched.
                let mut model: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
                let mut ops = 0u64;
                let mut flushes = 0u64;
                for round in 0..60 {
                    // A burst of concurrent requests to distinct 4 KiB blocks of this stripe.
                    let mut used = std::collections::HashSet::new();
                    for tag in 0..12u64 {
                        let slice = slices[rng.gen_range(0..slices.len())];
                        let blk = slice * MIB / 4096 + rng.gen_range(0..(MIB / 4096) - 4);
                        if !used.insert(blk) || !used.insert(blk + 1) {
                            continue;
                        }
                        let off = blk * 4096;
                        let kind = rng.gen_range(0..10);
                        let op = match kind {
                            0 => Op::Discard { off, len: 8192 },
                            1 => Op::WriteZeroes { off, len: 8192, unmap: rng.gen() },
                            _ => {
                                let mut data = AlignedBuf::new(8192);
                                rng.fill(&mut data[..]);
                                Op::Write { off, data, len: 8192, fua: kind == 2 }
                            }
                        };
                        let expect = match &op {
                            Op::Write { data, .. } => data.to_vec(),
                            _ => vec![0u8; 8192],
                        };
                        model.insert(blk, expect[..4096].to_vec());
                        model.insert(blk + 1, expect[4096..].to_vec());
                        q.submit(tag, op).expect("submit");
                        ops += 1;
                    }
                    let n = q.in_flight();
                    for c in q.wait(n, Duration::from_secs(30)).expect("completions") {
                        c.result.expect("request failed");
                    }
                    if round % 10 == 9 {
                        q.execute(Op::Flush).expect("flush");
                        flushes += 1;
                    }
                    // Read back a few blocks written so far.
                    for _ in 0..4 {
                        let k = rng.gen_range(0..model.len());
                        let (blk, want) = model.iter().nth(k).expect("model entry");
                        let (n, buf) = q.execute(Op::Read { off: blk * 4096, len: 4096 }).expect("read");
                        assert_eq!(n, 4096);
                        let got = buf.expect("read buffer");
                        assert!(got[..4096] == want[..], "read-back of block {blk} differs");
                    }
                }
                (ops, flushes)
            })
        })
        .collect();
    let mut total_ops = 0;
    for w in writers {
        let (ops, flushes) = w.join().expect("writer panicked");
        assert!(flushes > 0);
        total_ops += ops;
    }
    assert!(total_ops > 1000, "only {total_ops} requests were issued");
    wait_for("the mirror to reach a consistent point", Duration::from_secs(60), || {
        engine.status().state == "synced"
    });
    let st = engine.status();
    assert!(st.consistent_points >= 1);
    assert_eq!(st.dirty_bytes, 0);
    engine.request_stop();
    mirror.join().expect("mirror thread");
    engine.close().expect("close");
    drop(engine);

    let (s, t) = (read_all(&f.source), read_all(&f.target));
    assert_eq!(first_difference(&s, &t), None, "target differs from source");
    let v = offline::verify(&verify_opts(&f)).expect("verify");
    assert!(v.identical() && v.differing_clean.is_empty());
    let (h, runs) = Bitmap::inspect(&f.bitmap).expect("bitmap");
    assert!(runs.is_empty(), "every bit is clear after convergence, found {runs:?}");
    assert_eq!(h.state, ublk_mirror::io::bitmap::BitmapState::Clean);
}

/// A write that lands between the copy's source read and its target write must be copied
/// again: the to_copy bit was cleared before the copy, the write sets it again.
#[test]
fn region_written_during_its_own_copy_is_copied_again() {
    const G: u64 = 64 << 10;
    let f = files(16 * G);
    fill_random(&f.source, 0, (16 * G) as usize, 7);
    let (engine, mut target, _) = Engine::open(&f.pair(Some(SyncMode::Full), Some(G))).expect("open");
    let engine = Arc::new(engine);
    let cfg = CopyConfig { max_copies: 1, buf_size: G as usize, ..Default::default() };
    let mut m = Mirror::new(engine.clone(), target.as_mut(), cfg).expect("mirror");
    let hook_engine = engine.clone();
    let mut queue = None;
    let mut new_data = AlignedBuf::new(G as usize);
    rand::rngs::StdRng::seed_from_u64(99).fill(&mut new_data[..]);
    let expected = new_data.to_vec();
    let mut pending = Some(new_data);
    m.set_hooks(TestHooks {
        after_read: Some(Box::new(move |ext| {
            if ext.start == 5 {
                if let Some(data) = pending.take() {
                    let q = queue.get_or_insert_with(|| EngineQueue::new(hook_engine.clone(), 4).expect("queue"));
                    q.execute(Op::Write { off: 5 * G, data, len: G as u32, fua: false }).expect("write");
                }
            }
        })),
        ..Default::default()
    });
    let r = m.run(RunUntil::Synced, None).expect("run");
    drop(m);
    // 16 regions, plus region 5 once more.
    assert_eq!(r.bytes_copied, 17 * G, "region 5 must be copied twice");
    let t = read_all(&f.target);
    assert!(t[(5 * G) as usize..(6 * G) as usize] == expected[..], "target lacks the new data");
    assert_eq!(first_difference(&read_all(&f.source), &t), None);
}

/// A full sync interrupted halfway (the process dies: nothing closed or flushed at the end)
/// resumes from the bitmap and does not copy again what was checkpointed.
#[test]
fn interrupted_full_sync_resumes_without_recopying() {
    const SIZE: u64 = 64 * MIB;
    let f = files(SIZE);
    fill_random(&f.source, 0, SIZE as usize, 3);
    let cfg = CopyConfig {
        max_copies: 4,
        buf_size: MIB as usize,
        checkpoint_bytes: 4 * MIB,
        checkpoint_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let hooks = TestHooks { stop_after_bytes: Some(32 * MIB), ..Default::default() };
    let first = offline::sync(&f.pair(None, None), &cfg, hooks, None).expect("first sync");
    assert!(first.interrupted);
    // No copy starts past the limit: at most the copies in flight at that moment add to it.
    let most = 32 * MIB + cfg.max_copies as u64 * cfg.buf_size as u64;
    assert!(first.bytes_copied >= 32 * MIB && first.bytes_copied <= most, "{}", first.bytes_copied);
    let (_, runs) = Bitmap::inspect(&f.bitmap).expect("bitmap");
    let dirty: u64 = runs.iter().map(|r| r.1).sum::<u64>() * (64 << 10);
    // At least one checkpoint completed (the hook waits for one), and a checkpoint starts only
    // after 4 MiB were copied: those are clear. How many more depends on how fast the target
    // flushed, so only the bounds that hold whatever the timing are checked.
    assert!(dirty <= SIZE - 4 * MIB, "no progress was kept: {dirty} bytes dirty");
    assert!(dirty >= SIZE - first.bytes_copied, "bits of uncopied regions must be set");

    let second = offline::sync(&f.pair(None, None), &cfg, TestHooks::default(), None).expect("resume");
    assert_eq!(second.open.mode, SyncMode::Resume);
    assert_eq!(second.bytes_copied, dirty, "the resume copies exactly the dirty regions");
    assert!(second.bytes_copied < SIZE, "the resume did not copy everything again");
    assert_eq!(first_difference(&read_all(&f.source), &read_all(&f.target)), None);
    let v = offline::verify(&verify_opts(&f)).expect("verify");
    assert!(v.identical());
}

/// Holes of a sparse source are not read and become holes of the target.
#[test]
fn sparse_source_gives_sparse_target() {
    use std::os::unix::fs::MetadataExt;
    const SIZE: u64 = 64 * MIB;
    let f = files(SIZE);
    // Pre-fill the target with garbage, which the holes must erase.
    fill_random(&f.target, 0, SIZE as usize, 5);
    fill_random(&f.source, 3 * MIB, (2 * MIB) as usize, 6);
    fill_random(&f.source, 40 * MIB + 4096, 8192, 8);
    let r = offline::sync(&f.pair(None, None), &CopyConfig::default(), TestHooks::default(), None).expect("sync");
    assert!(r.bytes_copied <= 3 * MIB, "copied {} bytes for 2 MiB of data", r.bytes_copied);
    assert_eq!(r.bytes_copied + r.bytes_zeroed, SIZE);
    assert_eq!(first_difference(&read_all(&f.source), &read_all(&f.target)), None);
    let allocated = std::fs::metadata(&f.target).expect("stat").blocks() * 512;
    assert!(allocated <= 4 * MIB, "target allocates {allocated} bytes: it did not stay sparse");
}

/// Resync after a few regions changed copies those regions only.
#[test]
fn resync_copies_only_dirty_regions() {
    const SIZE: u64 = 32 * MIB;
    const G: u64 = 64 << 10;
    let f = files(SIZE);
    fill_random(&f.source, 0, SIZE as usize, 11);
    offline::sync(&f.pair(None, None), &CopyConfig::default(), TestHooks::default(), None).expect("full");
    let (engine, _target, open) = Engine::open(&f.pair(None, None)).expect("reopen");
    assert_eq!(open.dirty_regions, 0);
    write_regions_and_close(engine, G, &[3, 4, 100, 400]);
    drop(_target);
    let v = offline::verify(&verify_opts(&f)).expect("verify");
    assert_eq!(v.differing, vec![(3, 2), (100, 1), (400, 1)]);
    assert!(v.differing_clean.is_empty(), "written regions are marked dirty");
    let r = offline::sync(&f.pair(None, None), &CopyConfig::default(), TestHooks::default(), None).expect("resync");
    assert_eq!(r.bytes_copied, 4 * G);
    assert!(offline::verify(&verify_opts(&f)).expect("verify").identical());
}

/// A source on tmpfs (which older kernels refuse O_DIRECT on; `auto` then falls back, see the
/// unit test in backing.rs) mirrors to a disk file.
#[test]
fn source_on_tmpfs_syncs() {
    let (_shm, f) = files_with_source_on_tmpfs(4 * MIB);
    fill_random(&f.source, 0, MIB as usize, 2);
    let r = offline::sync(&f.pair(None, None), &CopyConfig::default(), TestHooks::default(), None).expect("auto");
    assert!(r.open.target_direct);
    assert_eq!(r.bytes_copied, MIB);
    assert_eq!(first_difference(&read_all(&f.source), &read_all(&f.target)), None);
}

/// A sink over a ring of its own that accepts only `allow` more operations, then refuses (as
/// a broken ring would).
struct Refusing {
    ring: ublk_mirror::io::uring::Ring,
    allow: usize,
}

impl Sink for Refusing {
    unsafe fn push(&mut self, e: io_uring::squeue::Entry, owner: Owner, slot: u16) -> std::io::Result<()> {
        if self.allow == 0 {
            return Err(std::io::Error::other("refused"));
        }
        self.allow -= 1;
        // SAFETY: the caller's contract is RingSink's.
        unsafe { RingSink(&mut self.ring).push(e, owner, slot) }
    }
}

/// Runs `reqs` on `sink` until a completion comes out (bounded).
fn next_completion(reqs: &mut QueueRequests, sink: &mut Refusing) -> Completion {
    let ts = io_uring::types::Timespec::new().nsec(100_000_000);
    // 30 s: a completion may wait for a real fdatasync of the bitmap on a loaded disk.
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if let Some(c) = reqs.completions().next() {
            return c;
        }
        match sink.ring.submitter().submit_with_args(1, &io_uring::types::SubmitArgs::new().timespec(&ts)) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) => panic!("ring: {e}"),
        }
        let mut cqes = Vec::new();
        ublk_mirror::io::uring::reap(&mut sink.ring, &mut cqes);
        for (ud, res) in cqes {
            let (Some(owner), slot) = ublk_mirror::io::uring::decode(ud) else { panic!("foreign completion {ud:#x}") };
            reqs.complete(sink, owner, slot as u16, res);
        }
    }
    panic!("no completion within 30 s");
}

/// When the ring refuses an operation (the bitmap flush a first write needs, the write itself,
/// or the timer a held write waits on), the request fails with EIO, nothing reaches the source,
/// and the engine does not count the write as in flight any more (otherwise the mirror would
/// wait for it for ever).
#[test]
fn a_refused_operation_fails_its_request_and_ends_the_write() {
    let f = files(4 * MIB);
    let (engine, _target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), Some(64 << 10))).expect("open");
    let engine = Arc::new(engine);
    let before = read_all(&f.source);
    for allow in [0, 1] {
        // allow 0: the bitmap flush is refused; allow 1: the flush runs, the write is refused.
        let mut sink = Refusing { ring: ublk_mirror::io::uring::new_ring(16).expect("ring"), allow };
        let mut reqs = QueueRequests::new(engine.clone()).expect("requests");
        let off = (1 + allow as u64) * MIB;
        let mut data = AlignedBuf::new(4096);
        data.iter_mut().for_each(|b| *b = 0xa5);
        reqs.submit(&mut sink, 7, Op::Write { off, data, len: 4096, fua: false });
        let c = next_completion(&mut reqs, &mut sink);
        assert_eq!(c.tag, 7);
        let err = c.result.expect_err("a refused operation must fail its request");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "allow {allow}: {err}");
        assert_eq!(engine.lock().state.writes_in_flight(), 0, "allow {allow}: the failed write is still in flight");
        assert_eq!(reqs.in_flight(), 0);
    }
    // A write held back (here by a switchover's barrier) whose retry timer the ring refuses: it
    // never began, so it fails without being ended in the engine (ending it would be a bug too).
    engine.lock().write_barrier = true;
    let mut sink = Refusing { ring: ublk_mirror::io::uring::new_ring(16).expect("ring"), allow: 0 };
    let mut reqs = QueueRequests::new(engine.clone()).expect("requests");
    reqs.submit(&mut sink, 9, Op::Write { off: 3 * MIB, data: AlignedBuf::new(4096), len: 4096, fua: false });
    let c = next_completion(&mut reqs, &mut sink);
    assert_eq!(c.result.expect_err("held write without a timer").raw_os_error(), Some(libc::EIO));
    assert_eq!(engine.lock().state.writes_in_flight(), 0);
    engine.lock().write_barrier = false;
    assert_eq!(read_all(&f.source), before, "a refused write reached the source");
    // The queue machinery is fine otherwise: the same engine takes a write through a ring that
    // accepts everything.
    let mut q = EngineQueue::new(engine.clone(), 4).expect("queue");
    let mut data = AlignedBuf::new(4096);
    data.iter_mut().for_each(|b| *b = 0x5a);
    q.execute(Op::Write { off: MIB, data, len: 4096, fua: false }).expect("write after the failures");
    assert_eq!(read_all(&f.source)[MIB as usize], 0x5a);
}

/// The real bitmap files under the lifecycle code, with a look at what is under the bitmap's
/// name after each step: a full sync's bitmap has every bit set (on the file, durably: the temp
/// file was fsynced before the rename) the moment it gets its name, and an existing bitmap
/// stays in place, intact, until then.
struct Watched<'a> {
    files: ublk_mirror::io::bitmap::BitmapFiles<'a>,
    path: &'a std::path::Path,
    /// The runs of set bits under the name after each step (None: no bitmap there).
    seen: Vec<(&'static str, Option<Runs>)>,
}

type Runs = Vec<(u64, u64)>;

impl Watched<'_> {
    fn look(&mut self, step: &'static str) {
        let runs = Bitmap::inspect(self.path).ok().map(|(_, runs)| runs);
        self.seen.push((step, runs));
    }
}

impl ublk_mirror::core::lifecycle::BitmapFiles for Watched<'_> {
    type Bits = Bitmap;
    fn exists(&self) -> bool {
        self.files.exists()
    }
    fn write_temp(&mut self, fill: ublk_mirror::core::lifecycle::Fill) -> ublk_mirror::Result<()> {
        let r = self.files.write_temp(fill);
        self.look("write_temp");
        r
    }
    fn sync_temp(&mut self) -> ublk_mirror::Result<()> {
        let r = self.files.sync_temp();
        self.look("sync_temp");
        r
    }
    fn rename_temp(&mut self) -> ublk_mirror::Result<()> {
        let r = self.files.rename_temp();
        self.look("rename_temp");
        r
    }
    fn sync_dir(&mut self) -> ublk_mirror::Result<()> {
        let r = self.files.sync_dir();
        self.look("sync_dir");
        r
    }
    fn discard_temp(&mut self) {
        self.files.discard_temp()
    }
    fn open(&mut self, created: bool) -> ublk_mirror::Result<Bitmap> {
        self.files.open(created)
    }
    fn sync(&mut self, bits: &Bitmap) -> ublk_mirror::Result<()> {
        self.files.sync(bits)
    }
}

#[test]
fn a_full_sync_bitmap_has_every_bit_set_when_it_gets_its_name() {
    use ublk_mirror::io::bitmap::{BitmapFiles, Expect, PairIdentity};
    use ublk_mirror::core::lifecycle::{open_bitmap, SyncMode as Mode};
    const SIZE: u64 = 8 * MIB + 4096; // a last region that is not whole
    const G: u64 = 64 << 10;
    let f = files(SIZE);
    let pair = PairIdentity {
        source: f.source.display().to_string(),
        source_fingerprint: 1,
        target: f.target.display().to_string(),
        target_fingerprint: 2,
    };
    let nregions = SIZE.div_ceil(G);
    let open = |seen_before: Option<Vec<(u64, u64)>>| {
        let expect = Expect { pair: &pair, device_size: SIZE, granularity: None };
        let mut w = Watched {
            files: BitmapFiles::new(&f.bitmap, pair.clone(), SIZE, G, expect),
            path: &f.bitmap,
            seen: Vec::new(),
        };
        let opened = open_bitmap(&mut w, Mode::Full).expect("open");
        assert!(opened.created);
        assert_eq!(opened.state.dirty(), nregions, "a full sync copies every region");
        let at = |step: &str| w.seen.iter().find(|s| s.0 == step).map(|s| s.1.clone()).expect("step ran");
        // Before the rename the name still shows what was there (nothing, or the old bitmap).
        assert_eq!(at("write_temp"), seen_before);
        assert_eq!(at("sync_temp"), seen_before);
        // From the rename on, every bit is set in the file the name points to.
        assert_eq!(at("rename_temp"), Some(vec![(0, nregions)]), "the bitmap got its name before its bits were set");
        assert_eq!(at("sync_dir"), Some(vec![(0, nregions)]));
        drop(opened);
    };
    open(None);
    // Again over the existing bitmap, after part of it was cleared: the old one (with its
    // cleared bits) stays under the name until the new one, complete, replaces it.
    {
        let expect = Expect { pair: &pair, device_size: SIZE, granularity: None };
        let mut files = BitmapFiles::new(&f.bitmap, pair.clone(), SIZE, G, expect);
        let mut opened = open_bitmap(&mut files, Mode::Resume).expect("resume");
        assert!(!opened.created);
        for r in 0..nregions / 2 {
            ublk_mirror::core::PersistentBits::clear(opened.state.pbits_mut(), r);
        }
        opened.state.pbits().sync().expect("sync");
    }
    open(Some(vec![(nregions / 2, nregions - nregions / 2)]));
    // Nothing is left beside it.
    let leftovers: Vec<_> = std::fs::read_dir(f.dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// A write to a region whose bit is clear waits for a bitmap flush before it reaches the
/// source; a second write to that region does not.
#[test]
fn a_first_write_to_a_clean_region_flushes_the_bitmap_once() {
    const G: u64 = 64 << 10;
    let f = files(4 * MIB);
    let (engine, _t, open) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    assert_eq!(open.dirty_regions, 0);
    let engine = Arc::new(engine);
    assert_eq!(engine.status().bitmap_flushes, 0);
    let mut q = EngineQueue::new(engine.clone(), 4).expect("queue");
    let write = |q: &mut EngineQueue, off: u64| {
        let mut data = AlignedBuf::new(4096);
        data.fill(7);
        q.execute(Op::Write { off, data, len: 4096, fua: false }).expect("write");
    };
    write(&mut q, 3 * G);
    assert_eq!(engine.status().bitmap_flushes, 1, "the first write to a clean region flushes the bitmap");
    write(&mut q, 3 * G + 4096);
    assert_eq!(engine.status().bitmap_flushes, 1, "its bit was durable already");
    let (_, runs) = Bitmap::inspect(&f.bitmap).expect("bitmap");
    assert_eq!(runs, vec![(3, 1)]);
}

/// `lock_waits` (status) counts a wait for the state lock: a thread that finds it held by
/// another counts one, an uncontended lock counts none.
#[test]
fn a_wait_for_the_state_lock_is_counted() {
    let f = files(4 * MIB);
    let (engine, _t, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    let before = engine.lock_waits();
    drop(engine.lock());
    assert_eq!(engine.lock_waits(), before, "an uncontended lock counted as a wait");
    let held = engine.lock();
    let other = engine.clone();
    let waiter = std::thread::spawn(move || {
        drop(other.lock());
    });
    // The waiter counts before it blocks; the lock is held until the count shows (or 10 s),
    // and released before any assertion: a panic while holding it would poison it, and the
    // engine aborts on a poisoned lock.
    let t0 = std::time::Instant::now();
    while engine.lock_waits() != before + 1 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(held);
    waiter.join().expect("waiter");
    assert_eq!(engine.lock_waits(), before + 1, "a wait for the held lock was not counted");
    assert_eq!(engine.status().lock_waits, before + 1, "status reports the count");
}

/// The bitmap file truncated by another process while the mirror uses it: the daemon survives
/// (without `io::sigbus` the next access to the truncated pages of the mapping raises SIGBUS,
/// whose default action ends the process, this test's too), writes keep completing, the loss is
/// reported (a `bitmap-lost` event, `last_error`), the mirror still brings the target level with
/// the source from its state in memory, and the file is marked so that no later open trusts it.
#[test]
fn a_bitmap_truncated_in_use_is_survived_and_never_trusted_again() {
    let f = files(8 * MIB);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), Some(64 << 10))).expect("open");
    let engine = Arc::new(engine);
    let mirror = spawn_loop(&engine, target, CopyConfig::default());
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    let write = |q: &mut EngineQueue, blk: u64, v: u8| {
        let mut d = AlignedBuf::new(4096);
        d.fill(v);
        q.execute(Op::Write { off: blk * 4096, data: d, len: 4096, fua: false }).expect("a write failed");
    };
    write(&mut q, 0, 1);
    std::fs::OpenOptions::new().write(true).open(&f.bitmap).and_then(|b| b.set_len(0)).expect("truncate the bitmap");
    // Writes to other regions: each sets its bit through the mapping, past the file's new end.
    for i in 1..64u64 {
        write(&mut q, i * 16, i as u8);
    }
    let reported = || engine.events().recent().iter().any(|e| e.to_string().contains("\"bitmap-lost\""));
    wait_for("the loss to be reported", Duration::from_secs(10), reported);
    let s = engine.status();
    assert!(s.last_error.as_deref().is_some_and(|e| e.contains("shrank or became unreadable")), "{s:?}");
    wait_for("synced", Duration::from_secs(20), || engine.status().state == "synced");
    drop(q);
    engine.request_stop();
    mirror.join().expect("mirror");
    assert_eq!(engine.events().recent().iter().filter(|e| e.to_string().contains("\"bitmap-lost\"")).count(), 1);
    drop(engine);
    assert_eq!(first_difference(&read_all(&f.source), &read_all(&f.target)), None, "source and target differ");
    let e = Engine::open(&f.pair(None, None)).err().expect("a lost bitmap was opened");
    assert!(e.to_string().contains("while a mirror used it") && e.to_string().contains("--full"), "{e}");
}

/// What the daemon-kill barrier rests on (docs/crash-safety.md): a file registered on an
/// io_uring keeps its open file description, and so the flock on it, after the process closed
/// its own descriptor, until the ring is gone. The device's queue rings and the mirror's ring
/// register the bitmap, so the next daemon's lock waits for every operation of a killed one.
#[test]
fn a_ring_that_registered_the_bitmap_holds_its_lock() {
    use std::os::fd::AsRawFd;
    let try_lock = |f: &std::fs::File| {
        // SAFETY: flock on a descriptor this closure's caller keeps open; no memory is passed.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    };
    let f = files(MIB);
    drop(Engine::open(&f.pair(None, None)).expect("create the bitmap"));
    let a = std::fs::File::open(&f.bitmap).expect("open");
    assert!(try_lock(&a));
    let ring = ublk_mirror::io::uring::new_ring(4).expect("ring");
    ring.submitter().register_files(&[a.as_raw_fd()]).expect("register");
    drop(a);
    let b = std::fs::File::open(&f.bitmap).expect("open again");
    assert!(!try_lock(&b), "the lock went with the descriptor although the ring holds the file");
    drop(ring);
    // The ring is torn down asynchronously.
    wait_for("the lock to be free once the ring is gone", Duration::from_secs(10), || try_lock(&b));
}

/// WRITE_ZEROES, which the device advertises, works whatever the source's file system supports:
/// tmpfs refuses FALLOC_FL_ZERO_RANGE (the request then punches a hole), ext4 takes it. With
/// and without NOUNMAP; the zeroes read back, the rest is untouched, and a sync carries them
/// to the target.
#[test]
fn write_zeroes_work_on_every_source_kind() {
    for dir in ["/dev/shm", "/var/tmp"] {
        for unmap in [false, true] {
            let d = tempfile::Builder::new().prefix("ublk-mirror-test").tempdir_in(dir).expect("tempdir");
            let mut f = files(4 * MIB);
            f.source = d.path().join("source.img");
            std::fs::File::create(&f.source).and_then(|x| x.set_len(4 * MIB)).expect("create");
            fill_random(&f.source, 0, (4 * MIB) as usize, 9);
            offline::sync(&f.pair(None, None), &CopyConfig::default(), TestHooks::default(), None).expect("full sync");
            let (engine, _t, _) = Engine::open(&f.pair(None, None)).expect("open");
            let engine = Arc::new(engine);
            let mut q = EngineQueue::new(engine.clone(), 4).expect("queue");
            let (off, len) = (MIB + 64 * 1024, 256 * 1024);
            q.execute(Op::WriteZeroes { off, len, unmap })
                .unwrap_or_else(|e| panic!("write-zeroes (unmap {unmap}) on {dir}: {e}"));
            let (_, buf) = q.execute(Op::Read { off, len: len as u32 }).expect("read back");
            assert!(buf.expect("data").iter().all(|&b| b == 0), "{dir}, unmap {unmap}: not zeroes");
            drop(q);
            engine.close().expect("close");
            drop(engine);
            let src = read_all(&f.source);
            assert!(src[off as usize..(off + len) as usize].iter().all(|&b| b == 0));
            assert!(src[..off as usize].iter().any(|&b| b != 0), "the zeroing went too far");
            offline::sync(&f.pair(None, None), &CopyConfig::default(), TestHooks::default(), None).expect("resync");
            assert_eq!(first_difference(&src, &read_all(&f.target)), None, "{dir}, unmap {unmap}: the target differs");
        }
    }
}

/// A sink for a source that has neither FALLOC_FL_ZERO_RANGE nor FALLOC_FL_PUNCH_HOLE (some
/// file systems and devices): every fallocate is answered EOPNOTSUPP without reaching the
/// kernel; the rest goes to the ring. It records the opcode of each operation.
struct NoFallocate {
    ring: ublk_mirror::io::uring::Ring,
    refused: Vec<(Owner, u16)>,
    opcodes: Vec<u8>,
}

impl Sink for NoFallocate {
    unsafe fn push(&mut self, e: io_uring::squeue::Entry, owner: Owner, slot: u16) -> std::io::Result<()> {
        let code = e.get_opcode() as u8;
        self.opcodes.push(code);
        if code == io_uring::opcode::Fallocate::CODE {
            self.refused.push((owner, slot));
            return Ok(());
        }
        // SAFETY: the caller's contract is RingSink's.
        unsafe { RingSink(&mut self.ring).push(e, owner, slot) }
    }
}

/// On a source that refuses both ways of zeroing a range in place, a WRITE_ZEROES (with or
/// without NOUNMAP) ends as a write of zeroes: it succeeds, the range reads back as zeroes,
/// and a sync carries them to the target.
#[test]
fn write_zeroes_fall_back_to_writing_zeroes() {
    use io_uring::opcode;
    let f = files(4 * MIB);
    fill_random(&f.source, 0, (4 * MIB) as usize, 11);
    offline::sync(&f.pair(None, None), &CopyConfig::default(), TestHooks::default(), None).expect("full sync");
    let (engine, _t, _) = Engine::open(&f.pair(None, None)).expect("open");
    let engine = Arc::new(engine);
    for (i, unmap) in [false, true].into_iter().enumerate() {
        let mut sink = NoFallocate { ring: ublk_mirror::io::uring::new_ring(16).expect("ring"), refused: vec![], opcodes: vec![] };
        let mut reqs = QueueRequests::new(engine.clone()).expect("requests");
        let (off, len) = ((1 + i as u64) * MIB + 4096, 192 * 1024);
        reqs.submit(&mut sink, 5, Op::WriteZeroes { off, len, unmap });
        let ts = io_uring::types::Timespec::new().nsec(100_000_000);
        let t0 = std::time::Instant::now();
        let c = loop {
            assert!(t0.elapsed() < Duration::from_secs(30), "unmap {unmap}: no completion within 30 s");
            if let Some(c) = reqs.completions().next() {
                break c;
            }
            for (owner, slot) in std::mem::take(&mut sink.refused) {
                reqs.complete(&mut sink, owner, slot, -libc::EOPNOTSUPP);
            }
            match sink.ring.submitter().submit_with_args(1, &io_uring::types::SubmitArgs::new().timespec(&ts)) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) => panic!("ring: {e}"),
            }
            let mut cqes = Vec::new();
            ublk_mirror::io::uring::reap(&mut sink.ring, &mut cqes);
            for (ud, res) in cqes {
                let (Some(owner), slot) = ublk_mirror::io::uring::decode(ud) else { panic!("foreign completion {ud:#x}") };
                reqs.complete(&mut sink, owner, slot as u16, res);
            }
        };
        assert_eq!(c.tag, 5);
        c.result.unwrap_or_else(|e| panic!("unmap {unmap}: the write-zeroes failed: {e}"));
        let tried = sink.opcodes.iter().filter(|&&o| o == opcode::Fallocate::CODE).count();
        assert_eq!(tried, if unmap { 1 } else { 2 }, "unmap {unmap}: fallocates tried ({:?})", sink.opcodes);
        assert!(sink.opcodes.contains(&opcode::Write::CODE), "unmap {unmap}: no write of zeroes ({:?})", sink.opcodes);
        let src = read_all(&f.source);
        assert!(src[off as usize..(off + len) as usize].iter().all(|&b| b == 0), "unmap {unmap}: not zeroes");
        assert!(src[off as usize - 4096..off as usize].iter().any(|&b| b != 0), "the zeroing began too early");
        assert!(src[(off + len) as usize..(off + len) as usize + 4096].iter().any(|&b| b != 0), "the zeroing went too far");
    }
    engine.close().expect("close");
    drop(engine);
    offline::sync(&f.pair(None, None), &CopyConfig::default(), TestHooks::default(), None).expect("resync");
    assert_eq!(first_difference(&read_all(&f.source), &read_all(&f.target)), None, "the target differs");
}

/// Verify reports its progress: bytes done (compared or skipped as holes) only grow, and end at
/// the device's size.
#[test]
fn verify_reports_progress_up_to_the_whole_device() {
    let f = files(64 * MIB);
    fill_random(&f.source, 0, (16 * MIB) as usize, 3);
    fill_random(&f.target, 0, (16 * MIB) as usize, 3);
    let mut seen: Vec<(u64, u64)> = Vec::new();
    let mut cb = |r: &offline::VerifyReport| seen.push((r.bytes_compared, r.bytes_skipped));
    let opts = VerifyOptions { bitmap: None, ..verify_opts(&f) };
    let r = offline::verify_with_progress(&opts, Some((&mut cb, Duration::ZERO))).expect("verify");
    assert!(r.identical());
    assert_eq!((r.bytes_compared, r.bytes_skipped), (16 * MIB, 48 * MIB));
    assert!(seen.len() >= 4, "reported {} times", seen.len());
    let done: Vec<u64> = seen.iter().map(|(c, s)| c + s).collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "progress went back: {done:?}");
    assert!(done.iter().any(|&d| d > 0 && d < 64 * MIB), "no report in between: {done:?}");
}
