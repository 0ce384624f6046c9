//! Host benchmark: does asking a live mirror for its status slow the writes of its device?
//!
//! ```text
//! status_latency [SIZE_GIB [SECS [ROUNDS]]]      (defaults: 2048 GiB, 8 s, 4 rounds)
//! ```
//!
//! Builds what the daemon runs below the ublk device, on real cores: a sparse SIZE pair on
//! /var/tmp, the engine with its mirror loop (every write dirties a region the loop then
//! copies), the control socket, and one writer doing 4 KiB random writes at queue depth 1
//! through the engine's request path (`EngineQueue`: the queue code the ublk queue runs, on
//! its own io_uring). Each round measures the writer twice, in an order that alternates:
//! `idle` (nobody asks for the status) and `watch` (a client asks over the control socket every
//! 100 ms, a new connection each time, as `status --watch --interval 0.1` does). Prints p50 and
//! p99 per phase, the p99 ratio watch/idle per round and its median, and how many answers the
//! client got. The guest side of bench/scale-vm.sh measures the same through the real device
//! under qemu; this one separates the daemon's share from the cost of an emulated CPU.

use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_mirror::io::backing::{AlignedBuf, DirectMode};
use ublk_mirror::engine::{CopyConfig, Engine, PairOptions, SyncMode};
use ublk_mirror::engine::mirror::{Mirror, RunUntil};
use ublk_mirror::engine::queue::{EngineQueue, Op};

fn arg(i: usize, default: u64) -> u64 {
    std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One phase: QD1 4 KiB random writes for `secs`; the latencies in µs, sorted.
fn phase(q: &mut EngineQueue, rng: &mut rand::rngs::StdRng, size: u64, secs: u64) -> Vec<u64> {
    let blocks = size / 4096;
    let mut lat = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let mut data = AlignedBuf::new(4096);
        data.iter_mut().for_each(|b| *b = rng.gen());
        let off = rng.gen_range(0..blocks) * 4096;
        let t = Instant::now();
        if let Err(e) = q.execute(Op::Write { off, data, len: 4096, fua: false }) {
            eprintln!("status_latency: write at {off}: {e}");
            std::process::exit(2);
        }
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    lat
}

fn main() {
    let size = arg(1, 2048) << 30;
    let secs = arg(2, 8);
    let rounds = arg(3, 4);
    let dir = tempfile::Builder::new().prefix("status-latency").tempdir_in("/var/tmp").expect("temporary directory in /var/tmp");
    let (source, target, bitmap) = (dir.path().join("src"), dir.path().join("tgt"), dir.path().join("bm"));
    for p in [&source, &target] {
        std::fs::File::create(p).and_then(|f| f.set_len(size)).expect("sparse image");
    }
    let pair = PairOptions {
        source,
        target,
        bitmap,
        mode: Some(SyncMode::AssumeIdentical),
        granularity: None,
        direct: DirectMode::Auto,
        source_writable: true,
        tls: Default::default(),
    };
    let (engine, mut tgt, _) = Engine::open(&pair).expect("open the pair");
    let engine = Arc::new(engine);
    let mirror = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            let mut m = Mirror::new(engine, tgt.as_mut(), CopyConfig::default()).expect("mirror");
            m.run(RunUntil::Stopped, None).expect("mirror loop");
        })
    };
    let sock = dir.path().join("0.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let server = ublk_mirror::daemon::control::spawn_server_at(sock.clone(), engine.clone(), json!({ "dev_id": 0 }), stop.clone())
        .expect("control socket");
    let watching = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (watching, answers, stop, sock) = (watching.clone(), answers.clone(), stop.clone(), sock.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if watching.load(Ordering::SeqCst) {
                    let r = ublk_mirror::daemon::control::request_at(&sock, 0, &json!({ "cmd": "status" }), Duration::from_secs(5));
                    if r.is_ok() {
                        answers.fetch_add(1, Ordering::SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut q = EngineQueue::new(engine.clone(), 4).expect("queue");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    println!("size {} GiB, {} s per phase, {} rounds, 4 KiB random writes QD1, status every 100 ms in `watch`", size >> 30, secs, rounds);
    println!("round mode   writes  p50 us  p99 us  answers");
    let mut ratios = Vec::new();
    let mut p50s = Vec::new();
    for round in 0..rounds {
        let mut p99 = [0u64; 2];
        let mut p50 = [0u64; 2];
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for watch in order {
            watching.store(watch, Ordering::SeqCst);
            let before = answers.load(Ordering::SeqCst);
            let lat = phase(&mut q, &mut rng, size, secs);
            let got = answers.load(Ordering::SeqCst) - before;
            let i = watch as usize;
            p50[i] = percentile(&lat, 0.50);
            p99[i] = percentile(&lat, 0.99);
            println!(
                "{round:<5} {:<6} {:>7} {:>7} {:>7} {:>8}",
                if watch { "watch" } else { "idle" },
                lat.len(),
                p50[i],
                p99[i],
                got
            );
        }
        ratios.push(p99[1] as f64 / p99[0].max(1) as f64);
        p50s.push(p50[1] as f64 / p50[0].max(1) as f64);
    }
    watching.store(false, Ordering::SeqCst);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    println!("p99 watch/idle per round: {}", per_round.join(" "));
    println!("p99 watch/idle median {:.3}; p50 watch/idle median {:.3}", median(&mut ratios), median(&mut p50s));
    stop.store(true, Ordering::SeqCst);
    engine.request_stop();
    mirror.join().expect("mirror loop");
    watcher.join().expect("watcher");
    server.join().expect("control socket");
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM")).map(str::to_string))
        .unwrap_or_default();
    println!("{peak}");
}
