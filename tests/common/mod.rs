#![allow(dead_code)]
//! Helpers shared by the integration tests: files on a real filesystem, patterns, waits.

use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use ublk_mirror::io::backing::DirectMode;
use ublk_mirror::engine::{PairOptions, SyncMode};

/// Runs a live mirror loop over `target` on its own thread, until the engine is stopped.
pub fn spawn_loop(
    engine: &std::sync::Arc<ublk_mirror::engine::Engine>,
    target: ublk_mirror::io::target::BoxTarget,
    cfg: ublk_mirror::engine::CopyConfig,
) -> std::thread::JoinHandle<()> {
    spawn_loop_with_hooks(engine, target, cfg, ublk_mirror::engine::mirror::TestHooks::default)
}

/// [`spawn_loop`] with the loop's test hooks from `hooks` (made on the loop's thread).
pub fn spawn_loop_with_hooks(
    engine: &std::sync::Arc<ublk_mirror::engine::Engine>,
    mut target: ublk_mirror::io::target::BoxTarget,
    cfg: ublk_mirror::engine::CopyConfig,
    hooks: impl FnOnce() -> ublk_mirror::engine::mirror::TestHooks + Send + 'static,
) -> std::thread::JoinHandle<()> {
    use ublk_mirror::engine::mirror::{Mirror, RunUntil};
    let engine = engine.clone();
    std::thread::spawn(move || {
        let mut m = Mirror::new(engine, target.as_mut(), cfg).expect("mirror");
        m.set_hooks(hooks());
        m.run(RunUntil::Stopped, None).expect("run");
    })
}

pub struct Files {
    pub dir: tempfile::TempDir,
    pub source: PathBuf,
    pub target: PathBuf,
    pub bitmap: PathBuf,
}

/// A source and target of `size` bytes (sparse) in a fresh directory under /var/tmp (a real
/// filesystem with O_DIRECT and holes, unlike tmpfs).
pub fn files(size: u64) -> Files {
    let dir = tempfile::Builder::new().prefix("ublk-mirror-test").tempdir_in("/var/tmp").expect("tempdir");
    let source = dir.path().join("source.img");
    let target = dir.path().join("target.img");
    let bitmap = dir.path().join("bitmap");
    for p in [&source, &target] {
        std::fs::File::create(p).and_then(|f| f.set_len(size)).expect("create image");
    }
    Files { dir, source, target, bitmap }
}

/// Files as [`files`], the source on tmpfs (/dev/shm: no O_DIRECT, no FALLOC_FL_ZERO_RANGE).
/// The returned directory holds the source: keep it as long as the files.
pub fn files_with_source_on_tmpfs(size: u64) -> (tempfile::TempDir, Files) {
    let shm = std::path::Path::new("/dev/shm");
    assert!(shm.is_dir(), "/dev/shm (tmpfs) is missing on this machine: this test needs it");
    let dir = tempfile::tempdir_in(shm).expect("tmpfs dir");
    let mut f = files(size);
    let src = dir.path().join("source.img");
    std::fs::File::create(&src).and_then(|x| x.set_len(size)).expect("create");
    f.source = src;
    (dir, f)
}

impl Files {
    pub fn pair(&self, mode: Option<SyncMode>, granularity: Option<u64>) -> PairOptions {
        PairOptions {
            source: self.source.clone(),
            target: self.target.clone(),
            bitmap: self.bitmap.clone(),
            mode,
            granularity,
            direct: DirectMode::Auto,
            source_writable: true,
            tls: Default::default(),
        }
    }
}

/// Fills `[off, off+len)` of `path` with seeded random bytes.
pub fn fill_random(path: &Path, off: u64, len: usize, seed: u64) {
    use std::os::unix::fs::FileExt;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; len];
    rng.fill(&mut buf[..]);
    let f = std::fs::OpenOptions::new().write(true).open(path).expect("open for fill");
    f.write_all_at(&buf, off).expect("fill");
    f.sync_all().expect("sync fill");
}

pub fn read_all(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read file")
}

/// Polls `cond` every 10 ms; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for the mirror loop of `engine` to have looked at the state after `after`: until then
/// and then until a whole pass of the loop that began after it has ended (its pass counter,
/// [`ublk_mirror::engine::Engine::loop_passes`], read after `after`, has gone up by 2), and,
/// from the start, until the loop has made at least `min_passes` passes. It wakes the loop
/// every 10 ms meanwhile, so that it passes even with nothing to do. How a test sees that
/// something did NOT happen, and cannot pass by being slow: whatever the loop would have done
/// by `after` (a retry whose time had come, a copy of a region dirty by then, a flush) it has
/// done or begun once this returns. `timeout` is counted from `after` (or from now, if later).
/// Returns the passes made since the call.
pub fn wait_loop_pass(
    engine: &ublk_mirror::engine::Engine,
    what: &str,
    after: Instant,
    min_passes: u64,
    timeout: Duration,
) -> u64 {
    let start = engine.loop_passes();
    let mut base = None;
    let timeout = timeout + after.saturating_duration_since(Instant::now());
    wait_for(what, timeout, || {
        // The counter is read after the clock: a base read before `after` proves nothing.
        if Instant::now() >= after {
            let n = engine.loop_passes();
            if n >= start + min_passes && n >= *base.get_or_insert(n) + 2 {
                return true;
            }
        }
        engine.wake();
        false
    });
    engine.loop_passes() - start
}

pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Writes 4 KiB at byte 8192 of each region of `regions` (of `granularity` bytes, filled with
/// the region number) through a front-end queue, as the device does (setting the bits), then
/// closes the engine in order.
pub fn write_regions_and_close(engine: ublk_mirror::engine::Engine, granularity: u64, regions: &[u64]) {
    use ublk_mirror::engine::queue::{EngineQueue, Op};
    let engine = std::sync::Arc::new(engine);
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    for &r in regions {
        let mut data = ublk_mirror::io::backing::AlignedBuf::new(4096);
        data.fill(r as u8);
        q.execute(Op::Write { off: r * granularity + 8192, data, len: 4096, fua: false }).expect("write");
    }
    drop(q);
    engine.close().expect("close");
}
