//! Live operations on real files: write-blocking mode, the speed limit, pause/resume, a failing
//! target (degraded, recovered, gave up), max-lag, and the control protocol's request handling.

mod common;
use common::*;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_mirror::io::backing::AlignedBuf;
use ublk_mirror::engine::{CopyConfig, CopyMode, Engine, Settings, StatusState, SyncMode};
use ublk_mirror::engine::mirror::{Mirror, RunUntil, MAX_BACKOFF};
use ublk_mirror::engine::queue::{EngineQueue, Op};
use ublk_mirror::engine::verify_report::VerifyState;
use ublk_mirror::io::target::{BoxTarget, Target, TargetDone, TargetOp};
use ublk_mirror::io::uring::Ring;

const MIB: u64 = 1 << 20;

fn write(q: &mut EngineQueue, off: u64, len: usize, seed: u8) {
    let mut data = AlignedBuf::new(len);
    for (i, b) in data.iter_mut().enumerate() {
        *b = seed.wrapping_add((i / 512) as u8) | 1;
    }
    q.execute(Op::Write { off, data, len: len as u32, fua: false }).expect("write");
}

/// A thread writing 4 KiB blocks through a queue of `engine` until `stop`, counting its writes
/// in `count`: returns how many writes it made, each block's last seed, and what `after` (run
/// on the queue once stopped) gave.
fn spawn_writer<T: Send + 'static>(
    engine: Arc<Engine>,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    after: impl FnOnce(&mut EngineQueue, &std::collections::BTreeMap<u64, u8>) -> T + Send + 'static,
) -> std::thread::JoinHandle<(u64, std::collections::BTreeMap<u64, u8>, T)> {
    std::thread::spawn(move || {
        let mut q = EngineQueue::new(engine, 8).expect("queue");
        let mut last = std::collections::BTreeMap::new();
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let blk = (i * 37) % 2048;
            write(&mut q, blk * 4096, 4096, i as u8);
            last.insert(blk, i as u8);
            i += 1;
            count.store(i, Ordering::SeqCst);
        }
        let t = after(&mut q, &last);
        (i, last, t)
    })
}

/// Stops the mirror loop and checks that it left source and target identical.
fn stop_and_compare(engine: &Engine, mirror: std::thread::JoinHandle<()>, f: &Files) {
    engine.request_stop();
    mirror.join().expect("mirror");
    assert_eq!(read_all(&f.source), read_all(&f.target));
}

fn blocking() -> Settings {
    Settings { mode: Some(CopyMode::WriteBlocking), ..Default::default() }
}

/// Write-blocking without any mirror loop running: every write reaches the target by itself,
/// nothing becomes dirty, and the two files are identical after each batch.
#[test]
fn write_blocking_mirrors_writes_without_copying() {
    let f = files(8 * MIB);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), Some(64 << 10))).expect("open");
    let engine = Arc::new(engine);
    engine.apply_settings(&blocking());
    engine.attach_target(target.as_ref()).expect("attach");
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    for i in 0..64u64 {
        // Scattered 4 KiB .. 64 KiB writes, some spanning two regions.
        let off = (i * 7919 * 4096) % (8 * MIB - 128 * 1024);
        write(&mut q, off, 4096 << (i % 5), i as u8);
        assert_eq!(engine.status().dirty_bytes, 0, "write {i} left its region dirty");
    }
    assert_eq!(read_all(&f.source), read_all(&f.target), "target missed a write-blocking write");
    // Background again: writes become dirty.
    engine.apply_settings(&Settings { mode: Some(CopyMode::Background), ..Default::default() });
    write(&mut q, 0, 4096, 7);
    assert_eq!(engine.status().dirty_bytes, 64 << 10);
    drop(q);
    drop(target);
}

/// A target whose writes and flushes (or, `flushes_only`, only its flushes) fail while `broken`
/// is set; its reset fails too while broken, unless only flushes fail.
struct Flaky {
    inner: BoxTarget,
    broken: Arc<AtomicBool>,
    resets: u32,
    flushes_only: bool,
    /// Tokens of the flushes in flight.
    flushes: std::collections::HashSet<u64>,
}

impl Flaky {
    fn new(inner: BoxTarget, broken: Arc<AtomicBool>) -> Self {
        Flaky { inner, broken, resets: 0, flushes_only: false, flushes: Default::default() }
    }
}

impl Target for Flaky {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn describe(&self) -> String {
        "flaky".into()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn identity(&self) -> (String, u64) {
        self.inner.identity()
    }
    unsafe fn submit(&mut self, ring: &mut Ring, op: TargetOp, token: u64) -> io::Result<()> {
        if matches!(op, TargetOp::Flush) {
            self.flushes.insert(token);
        }
        // SAFETY: the caller's contract is the inner target's.
        unsafe { self.inner.submit(ring, op, token) }
    }
    fn complete(&mut self, ring: &mut Ring, sub: u64, res: i32, done: &mut Vec<TargetDone>) {
        let n = done.len();
        self.inner.complete(ring, sub, res, done);
        for d in &mut done[n..] {
            let flush = self.flushes.remove(&d.0);
            if self.broken.load(Ordering::SeqCst) && (flush || !self.flushes_only) {
                d.1 = Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
    }
    fn backing(&self) -> Option<&ublk_mirror::io::backing::Backing> {
        self.inner.backing()
    }
    fn reset(&mut self) -> io::Result<()> {
        self.resets += 1;
        if self.broken.load(Ordering::SeqCst) && !self.flushes_only {
            Err(io::Error::new(io::ErrorKind::ConnectionRefused, "still down"))
        } else {
            Ok(())
        }
    }
}

fn events(engine: &Engine) -> Vec<String> {
    engine.events().recent().iter().filter_map(|e| e["event"].as_str().map(String::from)).collect()
}

/// The most target failures that the mirror's backoff (100 ms after the first failure,
/// doubling up to MAX_BACKOFF) lets happen in any `secs` after the first: failure i+1 comes at
/// least backoff(i) after failure i, so m failures in a row, none of them the first, span at
/// least backoff(2) + .. + backoff(m). One more for a stall of the loop between a failure's
/// retry time and its count. However slow the loop, never more.
fn max_failures_in(secs: f64) -> u32 {
    let backoff = |i: u32| (Duration::from_millis(100) * 2u32.pow(i.min(16) - 1)).min(MAX_BACKOFF).as_secs_f64();
    let (mut m, mut span) = (1, 0.0);
    while span + backoff(m + 1) <= secs {
        m += 1;
        span += backoff(m);
    }
    m + 1
}

/// A loop on the caller's ring checks its copy settings as `Mirror::new` does.
#[test]
fn a_loop_on_a_given_ring_refuses_bad_settings() {
    let f = files(MIB);
    let (engine, mut target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    for cfg in [
        CopyConfig { max_copies: 0, ..Default::default() },
        CopyConfig { buf_size: 3000, ..Default::default() },
    ] {
        let ring = ublk_mirror::io::uring::new_ring(8).expect("ring");
        let err = Mirror::with_ring(ring, engine.clone(), target.as_mut(), cfg).err().expect("bad settings refused");
        assert!(err.to_string().contains("must be"), "{err}");
    }
}

/// Intent extents in a live mirror: the first write to a clean 256 KiB extent (four 64 KiB
/// regions) pays one bitmap flush for all four bits; writes to the other three pay none; the
/// next extent pays its own. Only the regions written are copied, and every bit, written or
/// extra, clears once the mirror is synced and the regions are left alone.
#[test]
fn a_live_mirror_takes_write_intent_an_extent_at_a_time() {
    let f = files(2 * MIB);
    let (engine, mut target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), Some(64 << 10))).expect("open");
    let engine = Arc::new(engine);
    let me = engine.clone();
    let cfg = CopyConfig { clear_delay: Duration::from_millis(200), intent_extent: 256 << 10, ..Default::default() };
    let mirror = std::thread::spawn(move || {
        let ring = ublk_mirror::io::uring::new_ring(64).expect("ring");
        ring.submitter().register_files(&[me.source().fd()]).expect("register");
        let mut m = Mirror::with_ring(ring, me, target.as_mut(), cfg).expect("mirror");
        m.run(RunUntil::Stopped, None).expect("run");
    });
    // The loop sets the extent size as it starts.
    wait_loop_pass(&engine, "the mirror loop's start", Instant::now(), 1, Duration::from_secs(10));
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    let flushes = || engine.status().bitmap_flushes;
    let done = || {
        let st = engine.status();
        st.bytes_copied + st.bytes_zeroed
    };
    let done0 = done();
    write(&mut q, 4096, 4096, 1);
    assert_eq!(flushes(), 1, "the first write to a clean extent");
    assert_eq!(engine.status().persistent_dirty_regions, 4, "its whole extent's bits");
    for r in 1..4u64 {
        write(&mut q, r * (64 << 10) + 8192, 4096, r as u8);
    }
    assert_eq!(flushes(), 1, "writes to the extent's other regions waited for no flush");
    write(&mut q, 4 * (64 << 10), 4096, 9);
    assert_eq!(flushes(), 2, "the next extent pays its own flush");
    assert_eq!(engine.status().persistent_dirty_regions, 8);
    wait_for("synced, every bit cleared", Duration::from_secs(20), || {
        let st = engine.status();
        st.state == "synced" && st.persistent_dirty_regions == 0
    });
    assert_eq!(done() - done0, 5 * (64 << 10), "only the five regions written were copied (or zeroed: holes)");
    engine.request_stop();
    mirror.join().expect("mirror");
    drop(q);
    assert_eq!(read_all(&f.source), read_all(&f.target));
}

/// A failing target: the application's writes all succeed, the mirror reports degraded and
/// retries with backoff (resetting the target first), and converges by itself once the target
/// works again.
#[test]
fn failing_target_degrades_then_recovers_without_failing_writes() {
    let f = files(4 * MIB);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), Some(64 << 10))).expect("open");
    let engine = Arc::new(engine);
    let broken = Arc::new(AtomicBool::new(true));
    let mut flaky = Flaky::new(target, broken.clone());
    let me = engine.clone();
    let cfg = CopyConfig { clear_delay: Duration::from_millis(200), ..Default::default() };
    let mirror = std::thread::spawn(move || {
        let ring = ublk_mirror::io::uring::new_ring(64).expect("ring");
        ring.submitter().register_files(&[me.source().fd()]).expect("register");
        {
            let mut m = Mirror::with_ring(ring, me, &mut flaky, cfg).expect("mirror");
            m.run(RunUntil::Stopped, None).expect("run");
        }
        flaky.resets
    });
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    for i in 0..16u64 {
        write(&mut q, i * 200 * 1024, 8192, i as u8);
    }
    wait_for("degraded", Duration::from_secs(10), || engine.status().state == "degraded");
    let st = engine.status();
    assert!(st.dirty_bytes + st.copying_bytes > 0 && st.target_failures > 0, "{st:?}");
    assert!(st.last_error.is_some());
    // Writes keep succeeding while degraded.
    write(&mut q, 3 * MIB, 4096, 99);
    broken.store(false, Ordering::SeqCst);
    wait_for("convergence after the target came back", Duration::from_secs(60), || engine.status().state == "synced");
    let ev = events(&engine);
    let pos = |e: &str| ev.iter().position(|x| x == e);
    assert!(pos("degraded") < pos("recovered") && pos("recovered").is_some(), "events: {ev:?}");
    engine.request_stop();
    let resets = mirror.join().expect("mirror");
    assert!(resets >= 1, "the target was never reset before a retry");
    drop(q);
    assert_eq!(read_all(&f.source), read_all(&f.target));
}

/// `--max-retries`: after that many failures in a row the mirror stops trying, says so, and
/// the device's writes still succeed.
#[test]
fn mirroring_gives_up_after_max_retries() {
    let f = files(2 * MIB);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    engine.apply_settings(&Settings { max_retries: 2, ..Default::default() });
    let broken = Arc::new(AtomicBool::new(true));
    let mut flaky = Flaky::new(target, broken);
    let me = engine.clone();
    let mirror = std::thread::spawn(move || {
        let ring = ublk_mirror::io::uring::new_ring(64).expect("ring");
        ring.submitter().register_files(&[me.source().fd()]).expect("register");
        let mut m = Mirror::with_ring(ring, me, &mut flaky, CopyConfig::default()).expect("mirror");
        m.run(RunUntil::Stopped, None).expect("run");
    });
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    write(&mut q, 0, 4096, 1);
    wait_for("stopped", Duration::from_secs(20), || engine.status().state == "stopped");
    let given_up = Instant::now();
    let failures = engine.status().target_failures;
    assert_eq!(failures, 3, "gave up after {failures} failures, max_retries 2");
    // The device's writes still succeed, and dirty a region that a mirror still trying would copy.
    write(&mut q, 64 << 10, 4096, 2);
    // The retry the last failure scheduled was due MAX_BACKOFF after it at the latest: the loop
    // has passed that time (and been woken since) without trying again.
    wait_loop_pass(&engine, "a mirror loop pass after the retry would have been due", given_up + MAX_BACKOFF, 0, Duration::from_secs(20));
    let st = engine.status();
    assert_eq!((st.state, st.target_failures), (StatusState::Stopped, failures), "it kept retrying after giving up: {st:?}");
    assert!(events(&engine).contains(&"stopped".to_string()));
    engine.request_stop();
    mirror.join().expect("mirror");
}

/// A clean device whose target breaks: the consistent flush that fails is tried again only
/// after the backoff (100 ms, doubling), and never once mirroring gave up. Nothing is dirty,
/// so only the flush path can fail here (it used to retry at once, in a tight loop).
#[test]
fn a_failing_flush_of_a_clean_device_backs_off_and_gives_up() {
    for max_retries in [0, 2] {
        let f = files(2 * MIB);
        let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
        let engine = Arc::new(engine);
        engine.apply_settings(&Settings { max_retries, ..Default::default() });
        let broken = Arc::new(AtomicBool::new(true));
        let mut flaky = Flaky::new(target, broken);
        let me = engine.clone();
        let mirror = std::thread::spawn(move || {
            let mut m = Mirror::new(me, &mut flaky, CopyConfig::default()).expect("mirror");
            m.run(RunUntil::Stopped, None).expect("run");
            drop(m);
            flaky.resets
        });
        wait_for("the first failure", Duration::from_secs(20), || engine.status().target_failures > 0);
        let t0 = Instant::now();
        let base = engine.status().target_failures;
        // A second, with the loop woken every 10 ms (at least 50 passes, each a chance to flush
        // again), and a whole pass after it.
        let passes = wait_loop_pass(&engine, "a second of mirror loop passes", t0 + Duration::from_secs(1), 50, Duration::from_secs(20));
        let failures = engine.status().target_failures;
        let secs = t0.elapsed().as_secs_f64();
        // Attempts (a reset, which fails, or a flush) 100, 300, 700, 1500, 3100 ms after the
        // first failure.
        let more = failures - base;
        assert!(more <= max_failures_in(secs), "{more} failures in {secs:.2}s ({passes} loop passes): no backoff");
        if max_retries == 2 {
            wait_for("stopped", Duration::from_secs(20), || engine.status().state == "stopped");
            let given_up = Instant::now();
            let at_stop = engine.status().target_failures;
            assert_eq!(at_stop, 3, "gave up after {at_stop} failures, max_retries 2");
            // Past the time of the retry the last failure scheduled (MAX_BACKOFF at the latest).
            wait_loop_pass(&engine, "a mirror loop pass after the retry would have been due", given_up + MAX_BACKOFF, 0, Duration::from_secs(20));
            let st = engine.status();
            assert_eq!((st.state, st.target_failures), (StatusState::Stopped, at_stop), "it kept flushing after giving up: {st:?}");
        } else {
            wait_for("a retry", Duration::from_secs(20), || engine.status().target_failures >= 2);
        }
        engine.request_stop();
        let resets = mirror.join().expect("mirror");
        assert!(resets >= 1, "the target was never reset before a retry");
    }
}

/// The mirror's bitmap flushes (of the bits it clears) fail: they are tried again once a second,
/// not in a loop, and a stop still ends (the clears are given up: their bits stay set).
#[test]
fn failing_bitmap_flushes_back_off_and_do_not_hold_the_stop() {
    let f = files(2 * MIB);
    let (engine, mut target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    let attempts = Arc::new(AtomicU64::new(0));
    let seen = attempts.clone();
    let me = engine.clone();
    let mirror = std::thread::spawn(move || {
        let cfg = CopyConfig { clear_delay: Duration::from_millis(100), ..Default::default() };
        let mut m = Mirror::new(me, target.as_mut(), cfg).expect("mirror");
        m.set_hooks(ublk_mirror::engine::mirror::TestHooks {
            bitmap_flush_result: Some(Box::new(move |_| {
                seen.fetch_add(1, Ordering::SeqCst);
                -libc::EIO
            })),
            ..Default::default()
        });
        m.run(RunUntil::Stopped, None).expect("run");
    });
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    write(&mut q, 0, 4096, 1);
    wait_for("a failed bitmap flush", Duration::from_secs(20), || attempts.load(Ordering::SeqCst) > 0);
    let t0 = Instant::now();
    let base = attempts.load(Ordering::SeqCst);
    // 1.5 s, with the loop woken every 10 ms (at least 50 passes, each a chance to flush the
    // bitmap again), and a whole pass after it.
    let passes = wait_loop_pass(&engine, "1.5 s of mirror loop passes", t0 + Duration::from_millis(1500), 50, Duration::from_secs(20));
    let more = attempts.load(Ordering::SeqCst) - base;
    let secs = t0.elapsed().as_secs_f64();
    // One attempt a second (BITMAP_RETRY, counted from the last one's failure): at most one
    // more than the whole seconds in the window, however slow the loop was.
    assert!(more <= 1 + secs as u64, "{more} bitmap flushes in {secs:.2}s ({passes} loop passes): no backoff");
    wait_for("a retry", Duration::from_secs(20), || attempts.load(Ordering::SeqCst) > base);
    assert!(engine.status().last_error.is_some_and(|e| e.contains("bitmap flush")));
    engine.request_stop();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(mirror.join()).expect("send"));
    rx.recv_timeout(Duration::from_secs(20)).expect("the stop hangs on the failing bitmap").expect("mirror");
    drop(q);
    assert_eq!(read_all(&f.source), read_all(&f.target));
}

/// Flushes fail while the copies' writes succeed: the backoff still doubles (a successful copy
/// used to reset it, so it stayed at 100 ms, recopying the backlog ten times a second).
#[test]
fn failing_flushes_back_off_although_copies_succeed() {
    let f = files(2 * MIB);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    let broken = Arc::new(AtomicBool::new(true));
    let mut t = Flaky { flushes_only: true, ..Flaky::new(target, broken.clone()) };
    let me = engine.clone();
    let mirror = std::thread::spawn(move || {
        let mut m = Mirror::new(me, &mut t, CopyConfig::default()).expect("mirror");
        m.run(RunUntil::Stopped, None).expect("run");
    });
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    write(&mut q, 0, 4096, 1);
    wait_for("the first failure", Duration::from_secs(20), || engine.status().target_failures > 0);
    let t0 = Instant::now();
    let base = engine.status().target_failures;
    // 2 s, with the loop woken every 10 ms (at least 50 passes), and a whole pass after it.
    let passes = wait_loop_pass(&engine, "2 s of mirror loop passes", t0 + Duration::from_secs(2), 50, Duration::from_secs(20));
    let more = engine.status().target_failures - base;
    let secs = t0.elapsed().as_secs_f64();
    // Attempts 0.1, 0.3, 0.7, 1.5, 3.1 s after the first failure (plus each copy's time): at
    // most 5 in 2 s; at a constant 100 ms it would be about 20.
    assert!(
        more <= max_failures_in(secs),
        "{more} failures in {secs:.2}s ({passes} loop passes): the backoff does not grow"
    );
    assert!(more >= 1, "no retry in {secs:.2}s");
    broken.store(false, Ordering::SeqCst);
    wait_for("synced once flushes work", Duration::from_secs(20), || engine.status().state == "synced");
    drop(q);
    stop_and_compare(&engine, mirror, &f);
}

/// A pause that comes while the speed limit holds the copy back: the mirror thread sleeps (it
/// used to spin on the throttle's deadline, past by then, for the whole pause).
#[test]
fn a_pause_under_the_speed_limit_does_not_spin() {
    let f = files(8 * MIB);
    fill_random(&f.source, 0, (8 * MIB) as usize, 17);
    let (engine, mut target, _) = Engine::open(&f.pair(Some(SyncMode::Full), None)).expect("open");
    let engine = Arc::new(engine);
    let speed = 2 * MIB;
    engine.apply_settings(&Settings { speed, ..Default::default() });
    let me = engine.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let mirror = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() }).expect("send tid");
        let mut m = Mirror::new(me, target.as_mut(), CopyConfig::default()).expect("mirror");
        m.run(RunUntil::Stopped, None).expect("run");
    });
    let tid = rx.recv_timeout(Duration::from_secs(10)).expect("tid");
    // The thread's user + system time in clock ticks (fields 14 and 15 of its stat).
    let cpu_ticks = || -> u64 {
        let st = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
        let rest = st.rsplit(')').next().expect("stat format");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    };
    wait_for("the copy to be throttled", Duration::from_secs(20), || engine.status().bytes_copied >= 2 * MIB);
    engine.apply_settings(&Settings { speed, paused: true, ..Default::default() });
    wait_for("copies in flight to end", Duration::from_secs(20), || engine.status().copying_bytes == 0);
    let (c0, p0, t0) = (cpu_ticks(), engine.loop_passes(), Instant::now());
    // A measurement window, not a wait for something: a spin has no event of its own. It is
    // judged by the loop's passes, which a spin drives up by hundreds of thousands a second
    // (so even a thread given a sliver of a CPU shows it), and by the thread's CPU time.
    std::thread::sleep(Duration::from_millis(1500));
    let (ticks, passes, secs) = (cpu_ticks() - c0, engine.loop_passes() - p0, t0.elapsed().as_secs_f64());
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let busy = ticks as f64 / hz / secs;
    // Nothing wakes an idle paused loop but its timers (the lazy clearing tick, 2.5 s here).
    assert!(passes <= 10, "the paused mirror loop made {passes} passes in {secs:.2}s: it spins");
    assert!(busy < 0.2, "the paused mirror thread used {:.0}% of a CPU", busy * 100.0);
    // And it sleeps, it is not stuck: woken, it makes a pass, and copies nothing.
    wait_loop_pass(&engine, "a pass of the paused mirror loop", Instant::now(), 0, Duration::from_secs(20));
    let st = engine.status();
    assert!(st.state == "paused" && st.dirty_bytes > 0 && st.copying_bytes == 0, "{st:?}");
    engine.apply_settings(&Settings::default());
    wait_for("synced after resume", Duration::from_secs(30), || engine.status().state == "synced");
    engine.request_stop();
    mirror.join().expect("mirror");
    assert_eq!(read_all(&f.source), read_all(&f.target));
}

/// The target fails while a switchover holds writes: the switchover gives up at once (writes
/// resume) instead of holding them until its limit.
#[test]
fn a_target_failing_during_a_switchover_releases_the_writes() {
    let f = files(2 * MIB);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    engine.attach_target(target.as_ref()).expect("attach");
    let broken = Arc::new(AtomicBool::new(false));
    let mut flaky = Flaky::new(target, broken.clone());
    let me = engine.clone();
    let hook_broken = broken.clone();
    let mirror = std::thread::spawn(move || {
        let mut m = Mirror::new(me, &mut flaky, CopyConfig::default()).expect("mirror");
        // The copy of the write below fails only after the switchover has begun holding writes.
        m.set_hooks(ublk_mirror::engine::mirror::TestHooks {
            after_read: Some(Box::new(move |_| {
                if hook_broken.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(300));
                }
            })),
            ..Default::default()
        });
        m.run(RunUntil::Stopped, None).expect("run");
        drop(m);
    });
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    wait_for("synced", Duration::from_secs(20), || engine.status().state == "synced");
    broken.store(true, Ordering::SeqCst);
    write(&mut q, 0, 4096, 1);
    let t0 = Instant::now();
    let e = engine.switchover(Duration::from_secs(30), false).expect_err("a switchover onto a failing target");
    let secs = t0.elapsed().as_secs_f64();
    assert!(e.to_string().contains("failed during the switchover"), "{e}");
    assert!(secs < 15.0, "writes were held {secs:.1}s, waiting for a failed target");
    // Writes go on, to the source, with the region dirty.
    write(&mut q, 4096, 4096, 2);
    assert_ne!(engine.status().state, "switched-over");
    engine.request_stop();
    mirror.join().expect("mirror");
}

/// Pause stops copying (writes are still tracked), resume continues to synced.
#[test]
fn pause_and_resume() {
    let f = files(4 * MIB);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    engine.apply_settings(&Settings { paused: true, ..Default::default() });
    let mirror = spawn_loop(&engine, target, CopyConfig::default());
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    write(&mut q, MIB, 64 << 10, 3);
    // The write woke the loop; once it has made a whole pass since, it would have started the
    // copy were it not paused.
    wait_loop_pass(&engine, "a mirror loop pass after the write", Instant::now(), 0, Duration::from_secs(20));
    let st = engine.status();
    assert_eq!((st.state, st.bytes_copied, st.copying_bytes), (StatusState::Paused, 0, 0), "{st:?}");
    assert_eq!(st.dirty_bytes, 64 << 10);
    engine.apply_settings(&Settings::default());
    wait_for("synced after resume", Duration::from_secs(20), || engine.status().state == "synced");
    engine.request_stop();
    mirror.join().expect("mirror");
    assert_eq!(read_all(&f.source), read_all(&f.target));
}

/// The copy never runs faster than the speed limit (a lower bound on the time, which a noisy
/// machine cannot break; the upper side is checked in the VM scenario).
#[test]
fn speed_limit_bounds_the_copy_rate() {
    let f = files(8 * MIB);
    fill_random(&f.source, 0, (8 * MIB) as usize, 5);
    let (engine, mut target, _) = Engine::open(&f.pair(Some(SyncMode::Full), None)).expect("open");
    let engine = Arc::new(engine);
    let speed = 4 * MIB;
    engine.apply_settings(&Settings { speed, ..Default::default() });
    let t0 = Instant::now();
    let mut m = Mirror::new(engine.clone(), target.as_mut(), CopyConfig::default()).expect("mirror");
    let r = m.run(RunUntil::Synced, None).expect("run");
    let secs = t0.elapsed().as_secs_f64();
    let rate = r.bytes_copied as f64 / secs;
    assert_eq!(r.bytes_copied, 8 * MIB);
    // The bucket may start with up to one buffer (1 MiB) of credit.
    let min_secs = (8 * MIB - MIB) as f64 / speed as f64;
    assert!(secs >= min_secs * 0.95, "8 MiB at {speed} B/s took only {secs:.2}s ({rate:.0} B/s)");
    drop(m);
    assert_eq!(read_all(&f.source), read_all(&f.target));
}

/// While the device serves requests the copy yields to `busy_speed`; once it is idle the copy
/// runs at full speed again. A writer keeps 16 MiB dirty ahead of a mirror held to 1 MiB/s; the
/// same writer against a mirror without the limit lets it copy far more. The writer makes
/// `burst` writes of `len` bytes (each at a 64 KiB boundary), then sleeps `gap`.
struct Busy {
    /// Bytes copied over the whole measurement, and its length.
    copied: u64,
    secs: f64,
    /// Bytes copied between two samples (at most 200 ms apart) that both said "yielding", and
    /// the time they cover: what the limit has to hold, whatever a stalled writer let through.
    held_copied: u64,
    held_secs: f64,
    yielded: bool,
    yielding_at_end: bool,
}

fn copied_while_busy(busy_speed: u64, burst: u32, gap: Duration, len: usize) -> Busy {
    let f = files(16 * MIB);
    // Dense data: every copy moves whole regions (a hole would be skipped, not copied).
    fill_random(&f.source, 0, (16 * MIB) as usize, 21);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    engine.apply_settings(&Settings { busy_speed, ..Default::default() });
    let mirror = spawn_loop(&engine, target, CopyConfig::default());
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    // Dirty everything first, then keep the device busy with rewrites for two seconds.
    for blk in 0..256u64 {
        write(&mut q, blk * 64 * 1024, 4096, blk as u8);
    }
    // The mirror judges the request rate per 250 ms window: measure from the third window on
    // (the first ones judged the burst of first writes).
    let warm = Instant::now() + Duration::from_millis(600);
    let slots = 16 * MIB / len.max(64 << 10) as u64;
    let mut measured = None;
    let mut last: Option<(u64, bool, Instant)> = None;
    let (mut held_copied, mut held_secs, mut yielded) = (0u64, 0f64, false);
    let mut i = 0u64;
    loop {
        let now = Instant::now();
        if now >= warm && measured.is_none() {
            measured = Some((engine.status().bytes_copied, now));
        }
        if measured.is_some_and(|(_, t0)| t0.elapsed() >= Duration::from_secs(2)) {
            break;
        }
        for _ in 0..burst {
            let off = ((i * 97) % slots) * (16 * MIB / slots);
            write(&mut q, off, len, i as u8);
            i += 1;
        }
        std::thread::sleep(gap);
        if measured.is_some() {
            let st = engine.status();
            let sample = (st.bytes_copied, st.yielding, Instant::now());
            if let Some((c, y, t)) = last {
                let dt = sample.2 - t;
                if y && sample.1 && dt <= Duration::from_millis(200) {
                    held_copied += sample.0 - c;
                    held_secs += dt.as_secs_f64();
                }
            }
            yielded |= sample.1;
            last = Some(sample);
        }
    }
    let (c0, t0) = measured.expect("measured");
    let st = engine.status();
    let copied = st.bytes_copied - c0;
    let secs = t0.elapsed().as_secs_f64();
    // Idle now: the copy catches up at full speed.
    wait_for("synced once idle", Duration::from_secs(20), || engine.status().state == "synced");
    assert!(!engine.status().yielding, "still yielding on an idle device");
    engine.request_stop();
    mirror.join().expect("mirror");
    assert_eq!(read_all(&f.source), read_all(&f.target));
    Busy { copied, secs, held_copied, held_secs, yielded, yielding_at_end: st.yielding }
}

#[test]
fn busy_device_holds_the_copy_to_busy_speed() {
    // Bursts of 8 writes every 20 ms: about 100 requests per 250 ms window, so a writer stalled
    // for 150 ms still keeps a window busy (32).
    let busy = copied_while_busy(MIB, 8, Duration::from_millis(20), 4096);
    assert!(busy.held_secs >= 0.5, "status said the copy yields for only {:.2}s of 2", busy.held_secs);
    // At most the rate plus the bucket's start credit (one 1 MiB buffer) and one copy's overdraw.
    let bound = (busy.held_secs * MIB as f64) as u64 + 2 * MIB;
    assert!(
        busy.held_copied <= bound,
        "copied {} bytes in {:.2}s while yielding, more than {bound}",
        busy.held_copied,
        busy.held_secs
    );
    let free = copied_while_busy(0, 8, Duration::from_millis(20), 4096);
    assert!(!free.yielded, "yielding with busy_speed 0");
    let free_rate = free.copied as f64 / free.secs;
    assert!(
        free_rate > 3.0 * MIB as f64,
        "without the limit the copy moved only {free_rate:.0} B/s (limit 1 MiB/s): the test proves nothing"
    );
    // A trickle (at most 40 requests/s, under the 128/s threshold) does not hold the copy back.
    // Each of its writes dirties 1 MiB, so that a copy held to 1 MiB/s would fall behind while a
    // free one keeps up. Judged at the end: under load the mirror may judge a window that still
    // holds the tail of the first burst after the warm-up (and rightly call it busy); a trickle
    // alone never fills a window (at most 10 requests in 250 ms, against 32).
    let trickle = copied_while_busy(MIB, 1, Duration::from_millis(25), MIB as usize);
    assert!(!trickle.yielding_at_end, "a trickle of requests made the copy yield");
    let trickle_rate = trickle.copied as f64 / trickle.secs;
    assert!(trickle_rate > 3.0 * MIB as f64, "under a trickle the copy moved only {trickle_rate:.0} B/s");
}

/// Max-lag: a mirror paused (so the dirty set cannot drain) switches to write-blocking once
/// the target has been behind for longer than the limit.
#[test]
fn max_lag_switches_to_write_blocking() {
    let f = files(4 * MIB);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    engine.apply_settings(&Settings { paused: true, max_lag_ms: 500, ..Default::default() });
    engine.attach_target(target.as_ref()).expect("attach");
    let mirror = spawn_loop(&engine, target, CopyConfig::default());
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    write(&mut q, 0, 4096, 1);
    wait_for("max-lag to switch modes", Duration::from_secs(10), || engine.status().mode == "write-blocking (max-lag)");
    // Not before the lag passed the limit (said by the event: a stalled test thread could not
    // see the mode before the switch).
    let on = engine.events().recent().into_iter().find(|e| e["event"] == "write-blocking-on").expect("write-blocking-on event");
    assert!(on["lag_secs"].as_f64().is_some_and(|l| l >= 0.5), "switched early: {on}");
    // New writes to clean regions no longer add to the dirty set.
    let dirty = engine.status().dirty_bytes;
    write(&mut q, 2 * MIB, 4096, 2);
    assert_eq!(engine.status().dirty_bytes, dirty);
    // Resume: synced, and back to background.
    engine.apply_settings(&Settings { max_lag_ms: 500, ..Default::default() });
    wait_for("back to background once synced", Duration::from_secs(20), || {
        let s = engine.status();
        s.state == "synced" && s.mode == "background"
    });
    let ev = events(&engine);
    assert!(ev.contains(&"write-blocking-on".into()) && ev.contains(&"write-blocking-off".into()), "{ev:?}");
    drop(q);
    stop_and_compare(&engine, mirror, &f);
}

/// Requests the control socket passes on: malformed ones get an error reply naming the problem.
#[test]
fn control_requests() {
    use serde_json::json;
    use ublk_mirror::daemon::control::handle;
    let f = files(MIB);
    let (engine, _target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    let info = json!({ "dev_id": 0 });
    let err = |req: serde_json::Value| {
        let r = handle(&req, &engine, &info);
        assert_eq!(r["ok"], json!(false), "{req} was accepted: {r}");
        r["error"].as_str().unwrap_or_default().to_string()
    };
    assert!(err(json!({})).contains("no \"cmd\""));
    assert!(err(json!({ "cmd": "format-disk" })).contains("unknown command"));
    assert!(err(json!({ "cmd": "set", "speed": -1 })).contains("speed"));
    assert!(err(json!({ "cmd": "set", "mode": "fast" })).contains("write-blocking"));
    assert!(err(json!({ "cmd": "set", "colour": "red" })).contains("unknown setting"));
    assert!(err(json!([1, 2])).contains("cmd"));
    let r = handle(&json!({ "cmd": "set", "speed": 1048576, "mode": "write-blocking" }), &engine, &info);
    assert_eq!(r["ok"], json!(true), "{r}");
    assert_eq!(r["settings"]["speed"], json!(1048576));
    assert!(engine.write_blocking_now());
    let r = handle(&json!({ "cmd": "pause" }), &engine, &info);
    assert_eq!(r["settings"]["paused"], json!(true));
    let r = handle(&json!({ "cmd": "status" }), &engine, &info);
    assert_eq!(r["status"]["mode"], json!("write-blocking"));
    assert_eq!(r["status"]["speed"], json!(1048576));
    let ev = events(&engine);
    assert_eq!(ev, vec!["settings", "paused"]);
}

/// Write-blocking with a live mirror and nothing else to wake it: the writes' regions stay
/// clean, and the mirror still notices that a consistent point (and clearing) is due.
#[test]
fn write_blocking_reaches_consistent_points() {
    let f = files(4 * MIB);
    let (engine, mut target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    engine.apply_settings(&blocking());
    engine.attach_target(target.as_ref()).expect("attach");
    let me = engine.clone();
    let cfg = CopyConfig { clear_delay: Duration::from_millis(200), ..Default::default() };
    let mirror = std::thread::spawn(move || {
        let mut m = Mirror::new(me, target.as_mut(), cfg).expect("mirror");
        m.run(RunUntil::Stopped, None).expect("run");
    });
    wait_for("the first consistent point", Duration::from_secs(10), || engine.status().state == "synced");
    let points = engine.status().consistent_points;
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    write(&mut q, MIB, 8192, 4);
    wait_for("a consistent point after the write", Duration::from_secs(10), || {
        let s = engine.status();
        s.state == "synced" && s.consistent_points > points
    });
    wait_for("its bit cleared", Duration::from_secs(10), || engine.status().persistent_dirty_regions == 0);
    assert_eq!(engine.status().bytes_copied, 0);
    drop(q);
    stop_and_compare(&engine, mirror, &f);
}

/// Switchover under a write load: writes are held for a moment, the target catches up, and
/// from then on the device's reads and writes go to the target (the old source no longer
/// changes); the bitmap then refuses the old pair.
#[test]
fn switchover_moves_the_device_onto_the_target() {
    let f = files(8 * MIB);
    fill_random(&f.source, 0, (8 * MIB) as usize, 9);
    let (engine, mut target, _) = Engine::open(&f.pair(Some(SyncMode::Full), None)).expect("open");
    let engine = Arc::new(engine);
    engine.attach_target(target.as_ref()).expect("attach");
    let me = engine.clone();
    let mirror = std::thread::spawn(move || {
        {
            let mut m = Mirror::new(me, target.as_mut(), CopyConfig::default()).expect("mirror");
            m.run(RunUntil::Stopped, None).expect("run");
        }
        // Returned so that its descriptor, which the writer's ring uses, stays open.
        target
    });
    wait_for("initial sync", Duration::from_secs(30), || engine.status().state == "synced");
    // A writer keeps writing during the switchover; each block's last content is remembered.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(engine.clone(), stop.clone(), count.clone(), |q, last| {
        // Read blocks back through the queue (from the target now).
        let mut seen = Vec::new();
        for (&blk, _) in last.iter().take(64) {
            let (_, buf) = q.execute(Op::Read { off: blk * 4096, len: 4096 }).expect("read");
            seen.push((blk, buf.expect("data")[0]));
        }
        seen
    });
    let writes_before = |n: u64| {
        let c = count.clone();
        move || c.load(Ordering::SeqCst) >= n
    };
    wait_for("20 writes before the switchover", Duration::from_secs(30), writes_before(20));
    engine.switchover(Duration::from_secs(30), false).expect("switchover");
    assert_eq!(engine.status().state, "switched-over");
    let source_after_switch = read_all(&f.source);
    let at_switch = count.load(Ordering::SeqCst);
    wait_for("20 writes after the switchover", Duration::from_secs(30), writes_before(at_switch + 20));
    stop.store(true, Ordering::SeqCst);
    let (writes, last, seen) = writer.join().expect("writer");
    let _target = mirror.join().expect("mirror");
    assert!(writes > 20, "only {writes} writes: the test proves nothing");
    assert_eq!(read_all(&f.source), source_after_switch, "the old source changed after the switchover");
    let tgt = read_all(&f.target);
    for (blk, v) in last {
        let want = v | 1;
        assert_eq!(tgt[(blk * 4096) as usize], want, "block {blk}: the target lacks the last write");
    }
    for (blk, b) in seen {
        assert_eq!(b, tgt[(blk * 4096) as usize], "block {blk}: a read after the switchover did not come from the target");
    }
    assert!(events(&engine).contains(&"switched-over".to_string()));
    drop(engine);
    let e = Engine::open(&f.pair(None, None)).err().expect("the old pair must be refused after a switchover");
    assert!(e.to_string().contains("switched over"), "{e}");
}

/// `switchover --reverse` under a writer: the target becomes the device's data and the old
/// source the mirror's target. Every write reaches both afterwards (through the restarted
/// mirror, or directly in write-blocking mode); the bitmap records the reversed pair, so the
/// old order is refused and the new one resumes with nothing to copy.
fn reverse_switchover(settings: Settings) {
    let f = files(8 * MIB);
    fill_random(&f.source, 0, (8 * MIB) as usize, 13);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::Full), None)).expect("open");
    let engine = Arc::new(engine);
    engine.apply_settings(&settings);
    engine.attach_target(target.as_ref()).expect("attach");
    let mirror = ublk_mirror::daemon::device::spawn_mirror(engine.clone(), target, CopyConfig::default());
    wait_for("initial sync", Duration::from_secs(30), || engine.status().state == "synced");
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(engine.clone(), stop.clone(), count.clone(), |_, _| ());
    let writes_before = |n: u64| {
        let c = count.clone();
        move || c.load(Ordering::SeqCst) >= n
    };
    wait_for("20 writes before the switchover", Duration::from_secs(30), writes_before(20));
    let before = engine.status().bytes_copied;
    engine.switchover(Duration::from_secs(30), true).expect("switchover --reverse");
    let pair = engine.pair();
    assert_eq!(pair.source, f.target.to_string_lossy(), "the target did not become the source");
    assert_eq!(pair.target, f.source.to_string_lossy(), "the source did not become the target");
    assert_ne!(engine.status().state, "switched-over");
    let at_switch = count.load(Ordering::SeqCst);
    wait_for("20 writes after the switchover", Duration::from_secs(30), writes_before(at_switch + 20));
    stop.store(true, Ordering::SeqCst);
    let (writes, last, ()) = writer.join().expect("writer");
    assert!(writes > 20, "only {writes} writes: the test proves nothing");
    wait_for("synced after the reverse", Duration::from_secs(30), || engine.status().state == "synced");
    if settings.mode == Some(CopyMode::WriteBlocking) {
        assert_eq!(engine.status().bytes_copied, before, "write-blocking writes were copied instead of mirrored");
    }
    engine.request_stop();
    mirror.join().expect("mirror thread").expect("mirror loop");
    engine.close().expect("close");
    drop(engine);
    let (src, tgt) = (read_all(&f.source), read_all(&f.target));
    for (blk, v) in last {
        let want = v | 1;
        assert_eq!(tgt[(blk * 4096) as usize], want, "block {blk}: the new source lacks the last write");
    }
    assert!(src == tgt, "the old source (now the target) differs from the new source after syncing");
    let e = Engine::open(&f.pair(None, None)).err().expect("the old order must be refused after --reverse");
    assert!(e.to_string().contains("another pair"), "{e}");
    let mut swapped = f.pair(None, None);
    std::mem::swap(&mut swapped.source, &mut swapped.target);
    let (_, _, rep) = Engine::open(&swapped).expect("the reversed pair opens");
    assert_eq!(rep.dirty_regions, 0, "the reversed pair had dirty regions after an orderly stop");
}

#[test]
fn reverse_switchover_background() {
    reverse_switchover(Settings::default());
}

#[test]
fn reverse_switchover_write_blocking() {
    reverse_switchover(blocking());
}

/// Online verify: a clean region corrupted behind the mirror's back is found; regions written
/// during the verify are skipped, not reported.
#[test]
fn online_verify_finds_a_corrupted_clean_region() {
    use std::os::unix::fs::FileExt;
    let f = files(8 * MIB);
    fill_random(&f.source, 0, (8 * MIB) as usize, 11);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::Full), Some(64 << 10))).expect("open");
    let engine = Arc::new(engine);
    engine.attach_target(target.as_ref()).expect("attach");
    let mirror = spawn_loop(&engine, target, CopyConfig::default());
    wait_for("initial sync", Duration::from_secs(30), || engine.status().state == "synced");
    let run_verify = |engine: &Arc<Engine>| {
        ublk_mirror::engine::online_verify::start(engine).expect("start");
        wait_for("verify", Duration::from_secs(60), || engine.verifier().report().is_some_and(|r| r.state != VerifyState::Running));
        engine.verifier().report().expect("report")
    };
    let r = run_verify(&engine);
    assert_eq!((r.state, r.mismatches, r.compared), (VerifyState::Done, 0, 128), "{r:?}");
    // Corrupt region 77 of the target directly.
    let t = std::fs::OpenOptions::new().write(true).open(&f.target).expect("target");
    t.write_all_at(b"garbage", 77 * 65536 + 100).expect("corrupt");
    t.sync_all().expect("sync");
    // A dirty region (the mirror paused, so it stays dirty) is skipped, not compared.
    engine.apply_settings(&Settings { paused: true, ..Default::default() });
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    write(&mut q, 5 * 65536, 4096, 1);
    let r = run_verify(&engine);
    assert_eq!(r.mismatched, vec![77], "{r:?}");
    assert_eq!((r.skipped, r.compared), (1, 127), "{r:?}");
    engine.request_stop();
    mirror.join().expect("mirror");
    drop(q);
}

/// Online verify of a sparse 1 TiB pair: where both sides hold a hole nothing is read (reading
/// 1 TiB here would take hours), data on one side only is compared and found.
#[test]
fn online_verify_skips_holes_on_both_sides_only() {
    use std::os::unix::fs::FileExt;
    const SIZE: u64 = 1 << 40;
    let f = files(SIZE);
    let data = [0, SIZE / 2 + 3 * MIB, SIZE - MIB];
    for (i, &o) in data.iter().enumerate() {
        fill_random(&f.source, o, MIB as usize, 20 + i as u64);
    }
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::Full), Some(MIB))).expect("open");
    let engine = Arc::new(engine);
    engine.attach_target(target.as_ref()).expect("attach");
    let mirror = spawn_loop(&engine, target, CopyConfig::default());
    wait_for("initial sync", Duration::from_secs(60), || engine.status().state == "synced");
    let run_verify = |engine: &Arc<Engine>| {
        ublk_mirror::engine::online_verify::start(engine).expect("start");
        wait_for("verify", Duration::from_secs(60), || engine.verifier().report().is_some_and(|r| r.state != VerifyState::Running));
        engine.verifier().report().expect("report")
    };
    let regions = SIZE / MIB;
    let r = run_verify(&engine);
    assert_eq!((r.state, r.mismatches, r.compared, r.skipped), (VerifyState::Done, 0, 3, 0), "{r:?}");
    assert_eq!((r.holes, r.bytes_skipped), (regions - 3, SIZE - 3 * MIB), "{r:?}");
    // Garbage in a hole of the target only: that region holds data on one side, and is read.
    let t = std::fs::OpenOptions::new().write(true).open(&f.target).expect("target");
    let bad = regions / 3;
    t.write_all_at(b"garbage", bad * MIB + 100).expect("corrupt");
    t.sync_all().expect("sync");
    let r = run_verify(&engine);
    assert_eq!((r.mismatched.clone(), r.compared, r.holes), (vec![bad], 4, regions - 4), "{r:?}");
    engine.request_stop();
    mirror.join().expect("mirror");
}

/// An online verify paced by the speed limit: a limit lowered in its course paces the rest from
/// then on (counted from the verify's start, it meant one long sleep with nothing compared),
/// and a stop ends it within a sleep step.
#[test]
fn online_verify_follows_a_lowered_speed_limit_and_stops() {
    let f = files(64 * MIB);
    fill_random(&f.source, 0, (64 * MIB) as usize, 12);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::Full), None)).expect("open");
    let engine = Arc::new(engine);
    engine.attach_target(target.as_ref()).expect("attach");
    let mirror = spawn_loop(&engine, target, CopyConfig::default());
    wait_for("initial sync", Duration::from_secs(60), || engine.status().state == "synced");
    engine.apply_settings(&Settings { speed: 16 * MIB, ..Default::default() });
    ublk_mirror::engine::online_verify::start(&engine).expect("start");
    let compared = || engine.verifier().report().expect("report").bytes_compared;
    wait_for("16 MiB compared", Duration::from_secs(30), || compared() >= 16 * MIB);
    let t0 = Instant::now();
    engine.apply_settings(&Settings { speed: MIB, ..Default::default() });
    let c0 = compared();
    // Waited for by its count, not for a time: 2 MiB more compared.
    wait_for("2 MiB compared at 1 MiB/s", Duration::from_secs(60), || compared() >= c0 + 2 * MIB);
    let secs = t0.elapsed().as_secs_f64();
    let r = engine.verifier().report().expect("report");
    assert_eq!(r.state, VerifyState::Running, "{r:?}");
    // Not faster than the limit, from when it was set: one region (64 KiB) goes at once, each
    // further one is due 1/16 s after the one before; the one being compared when it was set
    // may end after it too. A lower bound on the time, which a slow machine cannot break.
    let regions = 2 * MIB / (64 << 10);
    assert!(secs >= (regions - 2) as f64 / 16.0, "2 MiB compared in {secs:.2}s at 1 MiB/s");
    // Nor owing for the 16 MiB compared before the limit (at 1 MiB/s, a 15 s sleep with
    // nothing compared): about 2 s, with room for a loaded machine.
    assert!(secs < 8.0, "2 MiB compared in {secs:.2}s at 1 MiB/s: the new limit was counted from the verify's start");
    let t0 = Instant::now();
    engine.request_stop();
    wait_for("the verify to end", Duration::from_secs(20), || engine.verifier().report().is_some_and(|r| r.state != VerifyState::Running));
    assert!(t0.elapsed() < Duration::from_secs(5), "the verify took {:?} to see the stop", t0.elapsed());
    mirror.join().expect("mirror");
}

/// A control socket served on a private path for an engine over a 1 MiB pair.
struct ControlServer {
    _files: Files,
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    server: std::thread::JoinHandle<()>,
}

impl ControlServer {
    fn start() -> Self {
        let f = files(MIB);
        let (engine, _target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
        let engine = Arc::new(engine);
        let dir = tempfile::tempdir_in("/var/tmp").expect("dir");
        let path = dir.path().join("0.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let server = ublk_mirror::daemon::control::spawn_server_at(path.clone(), engine, serde_json::json!({ "dev_id": 0 }), stop.clone())
            .expect("serve");
        ControlServer { _files: f, dir, path, stop, server }
    }

    /// Stops the server and waits for its thread. Returns the socket's directory, which
    /// lives on with the caller (so that whether the socket is left behind can be seen).
    fn stop(self) -> tempfile::TempDir {
        self.stop.store(true, Ordering::SeqCst);
        self.server.join().expect("server");
        self.dir
    }
}

/// The control socket itself: mode 0600; malformed, oversized and silent clients get an error
/// or a timeout and the next client is served.
#[test]
fn control_socket_survives_bad_clients() {
    use serde_json::json;
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    use ublk_mirror::daemon::control;
    let c = ControlServer::start();
    let path = c.path.clone();
    let mode = std::fs::metadata(&path).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let raw = |bytes: &[u8]| -> String {
        let mut c = UnixStream::connect(&path).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let _ = c.write_all(bytes);
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    };
    assert!(raw(b"this is not json\n").contains("not JSON"));
    assert!(raw(&vec![b'x'; control::MAX_REQUEST + 10]).contains("larger than"));
    // A client that connects and says nothing is dropped after the server's read timeout.
    let silent = UnixStream::connect(&path).expect("connect");
    let t0 = Instant::now();
    let r = control::request_at(&path, 0, &json!({ "cmd": "status" }), Duration::from_secs(10)).expect("status after bad clients");
    // The server's 2 s read timeout, with room for a loaded machine; under the request's own
    // 10 s limit, so a server that never drops the client still fails here.
    assert!(t0.elapsed() < Duration::from_secs(9), "a silent client held the socket for {:?}", t0.elapsed());
    assert_eq!(r["ok"], json!(true));
    assert!(r["status"]["state"].is_string());
    drop(silent);
    let _dir = c.stop();
    assert!(path.parent().is_some_and(|d| d.exists()), "the socket's directory is gone: the check below proves nothing");
    assert!(!path.exists(), "socket left behind");
}

/// A client is answered when it connects, not at the accept loop's next tick: `status --watch
/// --interval 0.1` and monitoring that polls get an answer per request in a fraction of a
/// millisecond. 40 requests one after the other; a server that looks for connections every
/// 100 ms takes about 4 s for them.
#[test]
fn control_socket_answers_without_a_tick() {
    use serde_json::json;
    use ublk_mirror::daemon::control;
    let c = ControlServer::start();
    let path = c.path.clone();
    let t0 = Instant::now();
    for _ in 0..40 {
        let r = control::request_at(&path, 0, &json!({ "cmd": "status" }), Duration::from_secs(10)).expect("status");
        assert_eq!(r["ok"], json!(true));
    }
    let took = t0.elapsed();
    // 40 local round trips: milliseconds; the bound leaves a loaded machine 50 ms each.
    assert!(took < Duration::from_secs(2), "40 status requests took {took:?}: the server answers late");
    let _dir = c.stop();
}

/// --on-consistent: the command runs after a consistent point with its sequence number, sees
/// the target as of that point, and nothing is copied to the target while it runs.
#[test]
fn on_consistent_command_sees_a_still_target() {
    let f = files(4 * MIB);
    let dir = tempfile::tempdir_in("/var/tmp").expect("dir");
    let snap = dir.path().join("snap");
    let seq = dir.path().join("seq");
    // While this file exists a run of the command holds on (at most 20 s): the test decides
    // how long the command runs, not a sleep that a loaded machine could outlast.
    let hold = dir.path().join("hold");
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    let hook = ublk_mirror::engine::OnConsistentCommand {
        command: format!(
            "cp \"$UBLK_MIRROR_TARGET\" {s}.tmp && mv {s}.tmp {s} && echo $UBLK_MIRROR_CONSISTENT_SEQ >> {q} && \
             i=0; while [ -e {h} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done",
            s = snap.display(),
            q = seq.display(),
            h = hold.display()
        ),
        interval: Duration::ZERO,
        timeout: Duration::from_secs(20),
        env: vec![("UBLK_MIRROR_TARGET".into(), f.target.display().to_string())],
    };
    let cfg = CopyConfig { on_consistent: Some(hook), ..Default::default() };
    let mirror = spawn_loop(&engine, target, cfg);
    wait_for("the first run of the command", Duration::from_secs(20), || snap.exists());
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    // Wait for the first run to end, then write A: the next consistent point's run copies it.
    wait_for("the first run to end", Duration::from_secs(20), || !engine.hook_running());
    std::fs::remove_file(&snap).expect("rm");
    std::fs::write(&hold, b"").expect("hold");
    write(&mut q, MIB, 4096, 0x41);
    wait_for("a run after A", Duration::from_secs(20), || snap.exists());
    assert!(engine.hook_running());
    // B while the command runs: it stays dirty until the command has ended, although the loop
    // looked at it (the write woke it).
    let copied = engine.status().bytes_copied;
    write(&mut q, 2 * MIB, 4096, 0x42);
    wait_loop_pass(&engine, "a mirror loop pass after B", Instant::now(), 0, Duration::from_secs(20));
    let st = engine.status();
    assert!(engine.hook_running(), "the command ended early: {st:?}");
    assert!(
        st.dirty_bytes > 0 && st.copying_bytes == 0 && st.bytes_copied == copied,
        "copied while the command ran: {st:?}"
    );
    let image = read_all(&snap);
    assert_eq!(image[MIB as usize], 0x41 | 1, "the snapshot lacks A");
    assert_eq!(image[2 * MIB as usize], 0, "the snapshot has B, written after its consistent point");
    std::fs::remove_file(&hold).expect("rm hold");
    wait_for("synced after the command", Duration::from_secs(20), || engine.status().state == "synced");
    let seqs = std::fs::read_to_string(&seq).expect("seq file");
    let nums: Vec<u64> = seqs.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert!(nums.len() >= 2 && nums.windows(2).all(|w| w[0] < w[1]), "sequence numbers {nums:?}");
    assert!(engine.events().recent().iter().any(|e| e["event"] == "on-consistent"));
    engine.request_stop();
    mirror.join().expect("mirror");
    drop(q);
}

/// A stop waits for a running --on-consistent command, up to HOOK_STOP_GRACE, then kills it:
/// the loop returns within the grace, with no command left running and the kill reported.
#[test]
fn a_stop_kills_an_on_consistent_command_after_the_grace() {
    use ublk_mirror::engine::mirror::HOOK_STOP_GRACE;
    let f = files(2 * MIB);
    let dir = tempfile::tempdir_in("/var/tmp").expect("dir");
    let pidfile = dir.path().join("pid");
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    let hook = ublk_mirror::engine::OnConsistentCommand {
        // The shell waits for a child of its own: killing the shell alone would leave it.
        command: format!("sleep 120 & echo $! > {p}.tmp && mv {p}.tmp {p}; wait", p = pidfile.display()),
        interval: Duration::ZERO,
        timeout: Duration::from_secs(100),
        env: vec![],
    };
    let cfg = CopyConfig { on_consistent: Some(hook), ..Default::default() };
    let mirror = spawn_loop(&engine, target, cfg);
    wait_for("the command to start", Duration::from_secs(20), || pidfile.exists());
    let pid: i32 = std::fs::read_to_string(&pidfile).expect("pid").trim().parse().expect("a pid");
    assert!(engine.hook_running());
    let t0 = Instant::now();
    engine.request_stop();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(mirror.join()).expect("send"));
    let joined = rx.recv_timeout(HOOK_STOP_GRACE + Duration::from_secs(20));
    joined.expect("the stop did not end the command within its grace").expect("mirror");
    let secs = t0.elapsed().as_secs_f64();
    assert!(secs >= HOOK_STOP_GRACE.as_secs_f64() * 0.95, "the stop did not wait for the command ({secs:.1}s)");
    // The shell's child was killed with it; orphaned, it is reaped by init (a zombie until
    // then, which counts as gone).
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|st| st.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
    };
    let t1 = Instant::now();
    while running() && t1.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!running(), "the command's child (pid {pid}) still runs after the mirror stopped");
    assert!(!engine.hook_running());
    let ev = engine.events().recent();
    let last = ev.iter().rev().find(|e| e["event"] == "on-consistent").expect("an on-consistent event");
    assert!(last["status"].as_str().is_some_and(|s| s.contains("after the mirror was stopped")), "{last}");
}

/// The mirror loop itself fails (here by the test fault: its setup and its run fail while a
/// file exists). The device keeps serving; status says `failed` with the error, never
/// `syncing`; events say so; the supervisor restarts the loop with backoff, counting each
/// failure; once the fault is gone the loop runs again and the pair converges. With
/// `--max-retries`, it gives up (`stopped`).
#[test]
fn a_failing_mirror_loop_is_reported_restarted_and_gives_up() {
    let f = files(8 * MIB);
    fill_random(&f.source, 0, (4 * MIB) as usize, 21);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::Full), None)).expect("open");
    let engine = Arc::new(engine);
    let fault = f.dir.path().join("fault");
    engine.set_mirror_fault(Some(fault.clone()));
    let mirror = ublk_mirror::daemon::device::spawn_mirror(engine.clone(), target, CopyConfig::default());
    wait_for("initial sync", Duration::from_secs(30), || engine.status().state == "synced");

    // The running loop fails at its next wake-up (a write wakes it).
    std::fs::write(&fault, b"").expect("fault file");
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    write(&mut q, 5 * MIB, 8192, 3);
    wait_for("the failure reported", Duration::from_secs(10), || engine.status().state == "failed");
    let st = engine.status();
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("injected fault")), "{st:?}");
    assert!(st.degraded_secs.is_some(), "a failed loop is a degraded pair: {st:?}");
    // Writes go on; nothing mirrors them, and status does not pretend it does.
    write(&mut q, 6 * MIB, 8192, 4);
    let st = engine.status();
    assert_eq!(st.state, "failed", "{st:?}");
    assert!(st.dirty_bytes > 0, "{st:?}");
    // The supervisor tries again (the setup fails while the fault lasts): failures count.
    wait_for("a restart that failed", Duration::from_secs(10), || engine.status().target_failures >= 2);
    let ev = events(&engine);
    assert!(ev.contains(&"mirror-failed".to_string()) && ev.contains(&"degraded".to_string()), "{ev:?}");

    // The fault goes: the loop runs again, copies what was written, and the target works.
    std::fs::remove_file(&fault).expect("remove fault");
    wait_for("synced after the restart", Duration::from_secs(30), || engine.status().state == "synced");
    let st = engine.status();
    assert_eq!(st.target_failures, 0, "{st:?}");
    assert!(st.degraded_secs.is_none(), "{st:?}");
    let ev = events(&engine);
    let last = |e: &str| ev.iter().rposition(|x| x == e);
    assert!(last("mirror-failed") < last("mirror-restarted") && last("mirror-restarted") < last("recovered"), "{ev:?}");

    // With --max-retries 2 the third failure in a row gives up for good.
    engine.apply_settings(&Settings { max_retries: 2, ..Default::default() });
    std::fs::write(&fault, b"").expect("fault file");
    write(&mut q, 7 * MIB, 4096, 5);
    wait_for("given up", Duration::from_secs(20), || engine.status().state == "stopped");
    assert_eq!(engine.status().target_failures, 3);
    assert!(events(&engine).contains(&"stopped".to_string()));
    // The device still serves.
    write(&mut q, 0, 4096, 6);
    drop(q);
    engine.request_stop();
    let r = mirror.join().expect("mirror thread");
    assert!(r.is_err_and(|e| e.to_string().contains("injected fault")), "the last loop's error is reported at the stop");
    assert_eq!(engine.status().target_failures, 3, "it kept trying after giving up");
}

/// The mirror loop's wake-ups: each one after the loop took the last makes a pass, and those
/// that come while one is pending are not written again (each write to the eventfd is a system
/// call of a device's queue).
#[test]
fn each_wake_up_makes_a_pass_and_pending_ones_are_written_once() {
    let f = files(8 * MIB);
    let (engine, target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), None)).expect("open");
    let engine = Arc::new(engine);
    // No lazy clearing: its tick would make passes of its own.
    let mirror = spawn_loop(&engine, target, CopyConfig { clear_delay: Duration::ZERO, ..Default::default() });
    wait_for("synced", Duration::from_secs(10), || engine.status().state == "synced");
    for i in 0..20 {
        let p0 = engine.loop_passes();
        engine.wake();
        wait_for(&format!("a pass after wake-up {i}"), Duration::from_secs(10), || engine.loop_passes() > p0);
    }
    // A burst: the loop takes a wake-up only after a system call and a pass, so nearly all of
    // these find one pending.
    let w0 = engine.loop_wakeups();
    for _ in 0..10_000 {
        engine.wake();
    }
    let written = engine.loop_wakeups() - w0;
    assert!(written < 1000, "{written} of 10000 wake-ups in a burst were written");
    let p0 = engine.loop_passes();
    engine.wake();
    wait_for("a pass after the burst", Duration::from_secs(10), || engine.loop_passes() > p0);
    engine.request_stop();
    mirror.join().expect("mirror");
}
