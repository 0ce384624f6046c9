//! Real disk sizes: a 16 TiB pair with scattered data (16383 GiB: the largest file ext4 takes
//! with 4 KiB blocks), synced, shown, resynced after a few writes and verified, in time and
//! memory that follow the data and the bitmap. A test binary of its own, so that the peak
//! memory measured is this test's.

mod common;
use common::*;
use std::time::{Duration, Instant};
use ublk_mirror::io::bitmap::Bitmap;
use ublk_mirror::engine::{CopyConfig, Engine, SyncMode};
use ublk_mirror::engine::mirror::TestHooks;
use ublk_mirror::offline::{self, VerifyOptions};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16383 << 30;

/// This process's peak resident memory: VmHWM, the high-water mark of its own address space.
/// (getrusage's ru_maxrss is no good here: Linux carries it across execve, so a test binary
/// started by cargo would report cargo's own peak.)
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/self/status");
    kib * 1024
}

#[test]
fn a_16_tib_sparse_pair_syncs_resyncs_and_verifies() {
    let f = files(SIZE);
    // 1 MiB at the start, at the end, and at seven places between.
    let offsets: Vec<u64> = (0..9).map(|i| (SIZE - MIB) / 8 * i / MIB * MIB).collect();
    for (i, &o) in offsets.iter().enumerate() {
        fill_random(&f.source, o, MIB as usize, i as u64 + 1);
    }
    let data = offsets.len() as u64 * MIB;

    let t0 = Instant::now();
    let full = offline::sync(&f.pair(None, None), &CopyConfig::default(), TestHooks::default(), None).expect("full sync");
    let took = t0.elapsed();
    assert_eq!(full.open.mode, SyncMode::Full);
    // 64 KiB regions would make a 32 MiB bitmap: the default granularity grows with the device.
    let g = full.granularity;
    assert_eq!(g, 256 << 10, "the granularity chosen for 16 TiB");
    let nregions = SIZE / g;
    assert!(nregions <= ublk_mirror::io::bitmap::MAX_DEFAULT_REGIONS);
    let bitmap_bytes = nregions / 8;
    assert_eq!(full.bytes_copied, data, "a full sync copies the data, and only the data");
    assert_eq!(full.bytes_copied + full.bytes_zeroed, SIZE);
    // Measured: 0.8 s in a release build, 8 s in a debug build (a job per MiB of hole took
    // about 12 minutes).
    assert!(took < Duration::from_secs(90), "full sync of a sparse 16 TiB pair took {took:?}");

    // A few writes through the engine: exactly those regions are dirty, and shown as runs.
    let (engine, _t, open) = Engine::open(&f.pair(None, None)).expect("reopen");
    assert_eq!(open.dirty_regions, 0);
    let written = [0, nregions / 2, nregions - 1];
    write_regions_and_close(engine, g, &written);
    let (h, runs) = Bitmap::inspect(&f.bitmap).expect("bitmap show");
    assert_eq!(h.nregions, nregions);
    assert_eq!(runs, written.iter().map(|&r| (r, 1)).collect::<Vec<_>>());

    let t0 = Instant::now();
    let re = offline::sync(&f.pair(None, None), &CopyConfig::default(), TestHooks::default(), None).expect("resync");
    assert_eq!(re.open.mode, SyncMode::Resume);
    assert_eq!(re.bytes_copied + re.bytes_zeroed, written.len() as u64 * g, "a resync copies the dirty regions only");
    assert!(t0.elapsed() < Duration::from_secs(60), "resync of 3 regions took {:?}", t0.elapsed());

    let t0 = Instant::now();
    let v = offline::verify(&VerifyOptions {
        source: f.source.clone(),
        target: f.target.clone(),
        bitmap: Some(f.bitmap.clone()),
        granularity: None,
        direct: ublk_mirror::io::backing::DirectMode::Auto,
        tls: Default::default(),
    })
    .expect("verify");
    assert!(v.identical(), "{:?}", v.differing);
    assert!(v.bytes_compared >= data && v.bytes_compared <= data + 16 * MIB, "compared {}", v.bytes_compared);
    assert!(v.bytes_skipped >= SIZE - data - 16 * MIB, "skipped only {}", v.bytes_skipped);
    assert!(t0.elapsed() < Duration::from_secs(60), "verify took {:?}", t0.elapsed());

    // `bitmap show --json` of a scattered dirty set: every 100th region (671k runs) set in the
    // file, as a crash during a random-write load leaves it. The runs come out in full.
    let bits = ublk_mirror::io::bitmap::HEADER_SIZE;
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&f.bitmap).expect("open bitmap");
        let mut bytes = vec![0u8; (nregions / 8) as usize];
        for r in (0..nregions).step_by(100) {
            bytes[(r / 8) as usize] |= 1 << (r % 8);
        }
        file.write_all_at(&bytes, bits).expect("write bits");
    }
    let (h, runs) = Bitmap::inspect(&f.bitmap).expect("bitmap show");
    let nruns = nregions.div_ceil(100);
    assert_eq!(runs.len() as u64, nruns);
    struct Count(u64, Vec<u8>);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            // The end of the output, to check it.
            self.1.extend_from_slice(b);
            let keep = self.1.len().saturating_sub(256);
            self.1.drain(..keep);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut out = Count(0, Vec::new());
    ublk_mirror::io::bitmap::write_show_json(&h, &runs, &mut out).expect("show --json");
    let tail = String::from_utf8_lossy(&out.1);
    let last = (nruns - 1) * 100;
    assert!(tail.contains(&format!("\"start\": {last}")) && tail.trim_end().ends_with('}'), "end of the JSON: {tail}");
    assert!(out.0 > nruns * 40, "{} bytes of JSON for {nruns} runs", out.0);
    drop(runs);

    // Memory: the bitmap is 8 MiB here; the goal is 3 x the bitmap + 32 MiB (56 MiB). The
    // state's sets keep whole pages of set or clear bits as one entry each (pagebits), so what
    // remains is the bitmap's mapping, the copy buffers and the program. Measured: 20 MiB.
    let rss = peak_rss();
    let bound = 3 * bitmap_bytes + 32 * MIB;
    assert!(rss <= bound, "peak RSS {} MiB > {} MiB (3 x the bitmap + 32 MiB)", rss / MIB, bound / MIB);
    println!("16 TiB pair: peak RSS {} MiB, bitmap {} MiB", rss / MIB, bitmap_bytes / MIB);
}
