//! Host benchmark: the CPU each copy mode adds to a write, below the ublk device.
//!
//! ```text
//! write_modes [DIR [SECS [ROUNDS [SIZE_MIB]]]]   (defaults: /dev/shm, 4 s, 5 rounds, 1024 MiB)
//! WRITE_MODES=plain,background,write-blocking,async   (the default; also async-loop)
//! ```
//!
//! One thread writes 4 KiB at random offsets, 32 in flight, for SECS per phase, as a ublk queue
//! thread does: `plain` straight to a file through io_uring (what a loop server does per
//! write), the others through the engine's request path (`EngineQueue`, the queue code the
//! device runs) with the mirror loop on its own thread, in each copy mode. Each mode has its
//! own pair of SIZE_MIB files in DIR (tmpfs by default: no device latency, so what is measured
//! is CPU); after each phase the benchmark waits until the mirror is synced, so that one
//! phase's copying does not run in the next. The order of the modes rotates per round. Prints
//! writes per second per phase, and per mode the median of the per-round ratios to `plain`
//! with their spread. Run it under `perf record -g` with one mode to see where its time goes.

use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_mirror::engine::mirror::{Mirror, RunUntil};
use ublk_mirror::engine::queue::{EngineQueue, Op};
use ublk_mirror::engine::{CopyConfig, CopyMode, Engine, PairOptions, Settings, SyncMode};
use ublk_mirror::io::backing::{AlignedBuf, DirectMode};

const QD: usize = 32;
const BLOCK: u64 = 4096;

fn arg(i: usize) -> Option<String> {
    std::env::args().nth(i)
}

fn num(i: usize, default: u64) -> u64 {
    arg(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("write_modes: {what}: {e}");
    std::process::exit(2)
}

/// A mode under test: its engine and mirror loop, or the plain file.
// One value per mode for the whole run: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Setup {
    Plain { file: std::fs::File, ring: io_uring::IoUring },
    Mirrored { engine: Arc<Engine>, queue: EngineQueue, mirror: Option<std::thread::JoinHandle<()>> },
}

/// A file of `size` bytes, allocated (a disk's blocks exist; on tmpfs, a first write to a
/// hole would also pay for the page, which would be measured as the mode's cost).
fn allocated(p: &std::path::Path, size: u64) {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::create(p).unwrap_or_else(|e| fail("creating a file", e));
    fallocate(f.as_raw_fd(), FallocateFlags::empty(), 0, size as i64).unwrap_or_else(|e| fail("allocating a file", e));
}

fn setup(dir: &std::path::Path, mode: &str, size: u64) -> Setup {
    let source = dir.join(format!("{mode}.src"));
    allocated(&source, size);
    if mode == "plain" {
        let file = std::fs::OpenOptions::new().write(true).open(&source).unwrap_or_else(|e| fail("opening", e));
        let ring = io_uring::IoUring::new(64).unwrap_or_else(|e| fail("io_uring", e));
        // A registered file, as the engine's queues use: no descriptor lookup per write.
        {
            use std::os::unix::io::AsRawFd;
            ring.submitter().register_files(&[file.as_raw_fd()]).unwrap_or_else(|e| fail("registering the file", e));
        }
        return Setup::Plain { file, ring };
    }
    let target = dir.join(format!("{mode}.tgt"));
    allocated(&target, size);
    let pair = PairOptions {
        source,
        target,
        bitmap: dir.join(format!("{mode}.bm")),
        mode: Some(SyncMode::AssumeIdentical),
        granularity: None,
        direct: DirectMode::Auto,
        source_writable: true,
        tls: Default::default(),
    };
    let (engine, mut tgt, _) = Engine::open(&pair).unwrap_or_else(|e| fail("opening the pair", e));
    let engine = Arc::new(engine);
    let copy_mode = match mode {
        "background" => CopyMode::Background,
        "write-blocking" => CopyMode::WriteBlocking,
        "async" | "async-loop" => CopyMode::Async,
        other => fail("unknown mode (plain, background, write-blocking, async, async-loop)", other),
    };
    // As the daemon does for a file target: write-blocking writes, and async mode's shipped
    // writes when the order lets them go at once, leave from the queue. `async-loop` leaves
    // every shipped write to the mirror loop (as for an NBD target).
    if mode == "write-blocking" || mode == "async" {
        engine.attach_target(tgt.as_ref()).unwrap_or_else(|e| fail("attaching the target", e));
    }
    engine.apply_settings(&Settings { mode: Some(copy_mode), ..Default::default() });
    let mirror = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            let mut m = Mirror::new(engine, tgt.as_mut(), CopyConfig::default()).unwrap_or_else(|e| fail("mirror", e));
            if let Err(e) = m.run(RunUntil::Stopped, None) {
                fail("mirror loop", e);
            }
        })
    };
    let queue = EngineQueue::new(engine.clone(), QD as u32).unwrap_or_else(|e| fail("queue", e));
    Setup::Mirrored { engine, queue, mirror: Some(mirror) }
}

fn wait_synced(engine: &Engine, mode: &str) {
    let mode = mode.strip_suffix("-loop").unwrap_or(mode);
    let t0 = Instant::now();
    while engine.status().state != "synced" || engine.status().mode != mode {
        if t0.elapsed() > Duration::from_secs(120) {
            fail("waiting for the mirror", format!("{mode} not synced after 120 s: {:?}", engine.status()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Random 4 KiB writes, QD outstanding, for `secs`: writes completed.
fn phase(s: &mut Setup, rng: &mut rand::rngs::StdRng, size: u64, secs: u64) -> u64 {
    let blocks = size / BLOCK;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut done = 0u64;
    match s {
        Setup::Plain { file, ring } => {
            let _ = file;
            let mut bufs: Vec<AlignedBuf> = (0..QD).map(|_| AlignedBuf::new(BLOCK as usize)).collect();
            let fd = io_uring::types::Fixed(0);
            let mut inflight = 0;
            let mut free: Vec<usize> = (0..QD).collect();
            loop {
                let stop = Instant::now() >= end;
                while let Some(i) = if stop { None } else { free.pop() } {
                    bufs[i][0] = rng.gen();
                    let off = rng.gen_range(0..blocks) * BLOCK;
                    let e = io_uring::opcode::Write::new(fd, bufs[i].as_mut_ptr(), BLOCK as u32).offset(off).build().user_data(i as u64);
                    // SAFETY: bufs[i] is not touched again until its completion is reaped below
                    // (the index goes back to `free` only then), and `bufs` outlives the loop,
                    // which ends only when nothing is in flight.
                    unsafe { ring.submission().push(&e) }.unwrap_or_else(|_| fail("queueing", "the ring is full"));
                    inflight += 1;
                }
                if inflight == 0 {
                    return done;
                }
                ring.submit_and_wait(1).unwrap_or_else(|e| fail("io_uring", e));
                for c in ring.completion() {
                    if c.result() != BLOCK as i32 {
                        fail("a plain write", c.result());
                    }
                    free.push(c.user_data() as usize);
                    inflight -= 1;
                    done += 1;
                }
            }
        }
        Setup::Mirrored { queue, .. } => {
            let mut spare: Vec<AlignedBuf> = (0..QD).map(|_| AlignedBuf::new(BLOCK as usize)).collect();
            let mut tag = 0u64;
            loop {
                let stop = Instant::now() >= end;
                while let Some(mut data) = if stop { None } else { spare.pop() } {
                    data[0] = rng.gen();
                    let off = rng.gen_range(0..blocks) * BLOCK;
                    queue.submit(tag, Op::Write { off, data, len: BLOCK as u32, fua: false }).unwrap_or_else(|e| fail("submitting", e));
                    tag += 1;
                }
                if stop {
                    // What is left in flight: the last requests, and shipped writes the queue
                    // issued (no completion of a request comes for those).
                    queue.settle(Duration::from_secs(60)).unwrap_or_else(|e| fail("settling", e));
                    for c in queue.wait(0, Duration::ZERO).unwrap_or_else(|e| fail("waiting", e)) {
                        c.result.unwrap_or_else(|e| fail("a write", e));
                        done += 1;
                    }
                    return done;
                }
                for c in queue.wait(1, Duration::from_secs(60)).unwrap_or_else(|e| fail("waiting", e)) {
                    if let Err(e) = c.result {
                        fail("a write", e);
                    }
                    spare.push(c.buf.unwrap_or_else(|| AlignedBuf::new(BLOCK as usize)));
                    done += 1;
                }
            }
        }
    }
}

/// What the phase cost the engine: loop passes, bitmap flushes, consistent points, checkpoints,
/// bytes copied, times shipping fell behind, writes shipped and how many of them the queue
/// issued itself (early; differences are printed per phase).
fn counters(s: &Setup) -> [u64; 8] {
    let Setup::Mirrored { engine, .. } = s else { return [0; 8] };
    let st = engine.status();
    let (behind, shipped, by_queues) = st.shipping.as_ref().map_or((0, 0, 0), |x| (x.fell_behind, x.shipped_writes, x.issued_by_queues));
    [st.loop_passes, st.bitmap_flushes, st.consistent_points, st.checkpoints, st.bytes_copied, behind, shipped, by_queues]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let dir = arg(1).unwrap_or_else(|| "/dev/shm".into());
    let secs = num(2, 4);
    let rounds = num(3, 5) as usize;
    let size = num(4, 1024) << 20;
    let modes: Vec<String> = std::env::var("WRITE_MODES")
        .unwrap_or_else(|_| "plain,background,write-blocking,async".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let tmp = tempfile::Builder::new().prefix("write-modes").tempdir_in(&dir).unwrap_or_else(|e| fail(&format!("a directory in {dir}"), e));
    let mut setups: Vec<Setup> = modes.iter().map(|m| setup(tmp.path(), m, size)).collect();
    for (s, m) in setups.iter().zip(&modes) {
        if let Setup::Mirrored { engine, .. } = s {
            wait_synced(engine, m);
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    println!("{dir}: {} MiB per file, 4 KiB random writes QD{QD}, {secs} s per phase, {rounds} rounds", size >> 20);
    println!("per phase: loop passes, bitmap flushes, consistent points, checkpoints, bytes copied, fell behind, writes shipped, of them issued by the queue");
    // One unmeasured phase per mode first: the first seconds of each are slower (the pool of
    // buffers, the page cache's lists, the CPU's clock), which would fall to the first round.
    for (s, m) in setups.iter_mut().zip(&modes) {
        phase(s, &mut rng, size, secs.min(2));
        if let Setup::Mirrored { engine, .. } = s {
            wait_synced(engine, m);
        }
    }
    let mut rates = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        for k in 0..modes.len() {
            let i = (k + round) % modes.len();
            let before = counters(&setups[i]);
            let n = phase(&mut setups[i], &mut rng, size, secs);
            let during = counters(&setups[i]);
            if let Setup::Mirrored { engine, .. } = &setups[i] {
                wait_synced(engine, &modes[i]);
            }
            let rate = n as f64 / secs as f64;
            let d: Vec<String> = during.iter().zip(&before).map(|(a, b)| (a - b).to_string()).collect();
            println!("round {round} {:<15} {:>9.0} writes/s  {}", modes[i], rate, d.join(" "));
            rates[i].push(rate);
        }
    }
    let base = modes.iter().position(|m| m == "plain");
    for (i, m) in modes.iter().enumerate() {
        let mut r = rates[i].clone();
        let med = median(&mut r);
        match base {
            Some(b) if b != i => {
                let mut ratios: Vec<f64> = rates[i].iter().zip(&rates[b]).map(|(x, y)| x / y).collect();
                let rm = median(&mut ratios);
                println!(
                    "{m:<15} median {med:>9.0} writes/s, {rm:.3} of plain (per round {:.3}..{:.3})",
                    ratios[0],
                    ratios[ratios.len() - 1]
                );
            }
            _ => println!("{m:<15} median {med:>9.0} writes/s"),
        }
    }
    for s in &mut setups {
        if let Setup::Mirrored { engine, queue, mirror } = s {
            let _ = queue;
            engine.request_stop();
            if let Some(h) = mirror.take() {
                h.join().unwrap_or_else(|_| fail("mirror loop", "panicked"));
            }
        }
    }
}
