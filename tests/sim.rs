//! Deterministic simulation of the mirror with crashes.
//!
//! Drives the real decision code ([`MirrorState`], [`GroupCommit`]) with simulated media: the
//! source, the target and the bitmap each have a cache and a medium per block, and the "OS"
//! writes any cached block to its medium at any moment. Two writer queues with their own group
//! commit, the copy loop (copies read the source at an arbitrary later moment), target flushes
//! (consistent or checkpoint), lazy clearing ticks and application FLUSHes all interleave in a
//! seeded random order; completions come back in any order; bitmap flushes, copies and target
//! flushes fail at random.
//!
//! After every step the media are what a power loss would leave, so every step is a crash point
//! and is checked:
//! - the invariant: a clear bit on the bitmap's medium implies the target's medium holds the
//!   region at least as new as the source's medium;
//! - data acknowledged before a completed FLUSH started is on the source's medium;
//! - write intent: a write reaches the source only when its bit is on the bitmap's medium.
//!
//! At a consistent point the target's medium holds every write acknowledged before it. Each run
//! ends with a crash at a random step and a recovery from the media alone, which must converge
//! to target == source.
//!
//! `SIM_RUNS` sets the number of runs (default small for debug builds; CI runs the release
//! build with hundreds of thousands of crash points); `SIM_SEED` replays one run, printed on
//! failure.

#![allow(clippy::needless_range_loop)] // regions index several parallel media arrays

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ublk_mirror::core::{ActivePlan, Extent, FlushKind, GroupCommit, Intent, MemBits, MirrorState, PersistentBits};

const N: u64 = 8;
const QUEUES: usize = 2;

#[derive(Clone)]
struct Media {
    cache: Vec<u64>,
    medium: Vec<u64>,
}

impl Media {
    fn new() -> Self {
        Media { cache: vec![0; N as usize], medium: vec![0; N as usize] }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WState {
    Waiting,
    Issued,
}

struct Write {
    ext: Extent,
    vers: Vec<u64>,
    state: WState,
    /// An active (write-blocking) write: its id, and once its target half landed, whether it
    /// succeeded.
    active: Option<(u64, Option<bool>)>,
}

struct Copy {
    ext: Extent,
    read: Option<Vec<u64>>,
}

enum Flush {
    Bitmap { q: usize, seq: u64, snap: Vec<bool> },
    App { snap: Vec<u64>, acked: Vec<u64> },
    /// The mirror's flush of the pair: the target and the source (see mirror.rs).
    Pair { kind: FlushKind, snap: Vec<u64>, src_snap: Vec<u64>, acked: Vec<u64> },
}

struct Sim {
    rng: StdRng,
    s: MirrorState<MemBits>,
    gc: Vec<GroupCommit<usize>>,
    src: Media,
    tgt: Media,
    bm_medium: Vec<bool>,
    writes: Vec<Option<Write>>,
    copies: Vec<Copy>,
    evs: Vec<Flush>,
    target_flush_pending: bool,
    ver: u64,
    acked: Vec<u64>,
    flushed_acked: Vec<u64>,
    budget: u32,
    steps: u64,
    consistent_points: u64,
    /// Write-blocking mode: most writes are active.
    active_mode: bool,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut s = MirrorState::new(N, MemBits::new(N));
        s.set_lazy_clearing(rng.gen());
        let active_mode = rng.gen_ratio(1, 2);
        let mut sim = Sim {
            budget: rng.gen_range(5..40),
            rng,
            s,
            gc: (0..QUEUES).map(|_| GroupCommit::default()).collect(),
            src: Media::new(),
            tgt: Media::new(),
            bm_medium: vec![false; N as usize],
            writes: Vec::new(),
            copies: Vec::new(),
            evs: Vec::new(),
            target_flush_pending: false,
            ver: 0,
            acked: vec![0; N as usize],
            flushed_acked: vec![0; N as usize],
            steps: 0,
            consistent_points: 0,
            active_mode: false,
        };
        sim.active_mode = active_mode;
        sim
    }

    fn fail_p(&mut self) -> bool {
        self.rng.gen_ratio(1, 12)
    }

    fn issue(&mut self, w: usize) {
        let Some(wr) = self.writes[w].as_mut() else { return };
        // Versions are given when the data lands in the source's cache, so that later data is
        // always a higher version (two overlapping writes may be issued in any order).
        wr.vers.clear();
        for r in wr.ext.regions() {
            assert!(self.bm_medium[r as usize], "write intent: region {r} written before its bit was on the medium");
            self.ver += 1;
            self.src.cache[r as usize] = self.ver;
            wr.vers.push(self.ver);
        }
        wr.state = WState::Issued;
    }

    fn start_bitmap_flush(&mut self, q: usize) {
        let seq = self.s.bitmap_flush_started();
        self.gc[q].started(seq);
        let snap = (0..N).map(|r| self.s.pbits().get(r)).collect();
        self.evs.push(Flush::Bitmap { q, seq, snap });
    }

    fn new_write(&mut self) {
        self.budget -= 1;
        let start = self.rng.gen_range(0..N);
        let count = self.rng.gen_range(1..=2u64).min(N - start);
        let ext = Extent { start, count };
        let vers = Vec::new();
        let q = self.rng.gen_range(0..QUEUES);
        let w = self.writes.len();
        let active = self.active_mode && self.rng.gen_ratio(3, 4);
        // Byte ranges are whole regions: two writes to one region overlap.
        let (intent, plan) = if active {
            self.s.begin_active_write(ext, start * 100, count * 100)
        } else {
            (self.s.begin_write(ext), ActivePlan::SourceOnly)
        };
        let active = match plan {
            ActivePlan::Target { id } => Some((id, None)),
            ActivePlan::SourceOnly => None,
        };
        self.writes.push(Some(Write { ext, vers, state: WState::Waiting, active }));
        match intent {
            Intent::Ready => self.issue(w),
            Intent::Wait { seq } => {
                if self.gc[q].wait(seq, w) {
                    self.start_bitmap_flush(q);
                }
            }
        }
    }

    /// The target half of an issued active write lands (or fails), at any moment after issue
    /// and in any order with copies: a late one may overwrite newer data in the target's cache.
    fn land_target_half(&mut self) {
        let pending: Vec<usize> = (0..self.writes.len())
            .filter(|&i| matches!(&self.writes[i], Some(w) if w.state == WState::Issued && matches!(w.active, Some((_, None)))))
            .collect();
        if pending.is_empty() {
            return;
        }
        let w = pending[self.rng.gen_range(0..pending.len())];
        let ok = !self.fail_p();
        let Some(wr) = self.writes[w].as_mut() else { return };
        if ok {
            for (i, r) in wr.ext.regions().enumerate() {
                self.tgt.cache[r as usize] = wr.vers[i];
            }
        }
        if let Some((_, done)) = wr.active.as_mut() {
            *done = Some(ok);
        }
    }

    fn end(&mut self, wr: Write, source_ok: bool) {
        match wr.active {
            Some((id, done)) => {
                self.s.end_active_write(id, source_ok, done.unwrap_or(false));
            }
            None => {
                self.s.end_write(wr.ext);
            }
        }
    }

    fn complete_write(&mut self) {
        let issued: Vec<usize> = (0..self.writes.len())
            .filter(|&i| {
                matches!(&self.writes[i], Some(w) if w.state == WState::Issued && !matches!(w.active, Some((_, None))))
            })
            .collect();
        if issued.is_empty() {
            return;
        }
        let w = issued[self.rng.gen_range(0..issued.len())];
        let Some(wr) = self.writes[w].take() else { return };
        for (i, r) in wr.ext.regions().enumerate() {
            // Acknowledged: the application now relies on it (after a FLUSH, durably).
            self.acked[r as usize] = self.acked[r as usize].max(wr.vers[i]);
        }
        self.end(wr, true);
    }

    fn complete_event(&mut self) {
        if self.evs.is_empty() {
            return;
        }
        let i = self.rng.gen_range(0..self.evs.len());
        let ok = !self.fail_p();
        match self.evs.swap_remove(i) {
            Flush::Bitmap { q, seq, snap } => {
                if ok {
                    // fdatasync wrote every page at some moment after it started: a bit unchanged
                    // since then is on the medium as it is. A bit changed since may have been
                    // written before or after the change, unless a later write (of the new
                    // value) already reached the medium, which an earlier one cannot undo.
                    for r in 0..N as usize {
                        let now = self.s.pbits().get(r as u64);
                        if now == snap[r] {
                            self.bm_medium[r] = now;
                        } else if self.bm_medium[r] != now {
                            self.bm_medium[r] = if self.rng.gen() { now } else { snap[r] };
                        }
                    }
                }
                self.s.bitmap_flush_done(seq, ok);
                let s = &self.s;
                let step = self.gc[q].completed(ok, |x| s.intent_durable(x));
                for w in step.ready {
                    self.issue(w);
                }
                for w in step.failed {
                    // Never issued: the write fails with EIO and changes nothing.
                    if let Some(wr) = self.writes[w].take() {
                        self.end(wr, false);
                    }
                }
                if step.start_flush {
                    self.start_bitmap_flush(q);
                }
            }
            Flush::App { snap, acked } => {
                if ok {
                    for r in 0..N as usize {
                        self.src.medium[r] = self.src.medium[r].max(snap[r]);
                        self.flushed_acked[r] = self.flushed_acked[r].max(acked[r]);
                    }
                }
            }
            Flush::Pair { kind, snap, src_snap, acked } => {
                if ok {
                    for r in 0..N as usize {
                        self.tgt.medium[r] = self.tgt.medium[r].max(snap[r]);
                        self.src.medium[r] = self.src.medium[r].max(src_snap[r]);
                    }
                } else {
                    // Linux drops pages whose writeback failed and reports the error once: any
                    // target page not yet on the medium may be gone for good.
                    for r in 0..N as usize {
                        if self.rng.gen() {
                            self.tgt.cache[r] = self.tgt.medium[r];
                        }
                    }
                }
                let out = self.s.target_flush_done(ok);
                self.target_flush_pending = false;
                if ok && kind == FlushKind::Consistent {
                    assert!(out.consistent);
                    self.consistent_points += 1;
                    for r in 0..N as usize {
                        assert!(
                            self.tgt.medium[r] >= acked[r],
                            "consistent point: region {r} lacks a write acknowledged before it"
                        );
                    }
                }
            }
        }
    }

    fn writeback(&mut self) {
        let r = self.rng.gen_range(0..N) as usize;
        match self.rng.gen_range(0..3) {
            0 => self.src.medium[r] = self.src.cache[r],
            1 => self.tgt.medium[r] = self.tgt.cache[r],
            _ => self.bm_medium[r] = self.s.pbits().get(r as u64),
        }
    }

    fn mirror_step(&mut self) {
        match self.rng.gen_range(0..5) {
            0 if self.copies.len() < 3 => {
                let max = self.rng.gen_range(1..=3);
                if let Some(ext) = self.s.next_copy(max) {
                    self.copies.push(Copy { ext, read: None });
                }
            }
            1 if !self.copies.is_empty() => {
                let i = self.rng.gen_range(0..self.copies.len());
                let c = &mut self.copies[i];
                if c.read.is_none() {
                    c.read = Some(c.ext.regions().map(|r| self.src.cache[r as usize]).collect());
                }
            }
            2 if !self.copies.is_empty() => {
                let i = self.rng.gen_range(0..self.copies.len());
                if self.copies[i].read.is_some() {
                    let c = self.copies.swap_remove(i);
                    let ok = !self.fail_p();
                    if ok {
                        for (r, v) in c.ext.regions().zip(c.read.unwrap_or_default()) {
                            self.tgt.cache[r as usize] = v;
                        }
                    }
                    self.s.copy_done(c.ext, ok);
                }
            }
            3 if !self.target_flush_pending && (self.s.consistent_point_due() || self.s.checkpoint_possible()) => {
                let kind = self.s.target_flush_started();
                self.target_flush_pending = true;
                self.evs.push(Flush::Pair {
                    kind,
                    snap: self.tgt.cache.clone(),
                    src_snap: self.src.cache.clone(),
                    acked: self.acked.clone(),
                });
            }
            4 => {
                self.s.clear_tick();
            }
            _ => {}
        }
    }

    fn step(&mut self) {
        match self.rng.gen_range(0..10) {
            0 | 1 if self.budget > 0 => self.new_write(),
            2 => self.complete_write(),
            7 if self.active_mode => self.land_target_half(),
            3 | 4 => self.complete_event(),
            5 => self.writeback(),
            6 if self.rng.gen_ratio(1, 3) => {
                self.evs.push(Flush::App { snap: self.src.cache.clone(), acked: self.acked.clone() })
            }
            _ => self.mirror_step(),
        }
        self.steps += 1;
        self.check_media();
    }

    /// What a power loss at this instant would leave must be recoverable.
    fn check_media(&self) {
        self.s.check_invariants().unwrap_or_else(|e| panic!("core invariant: {e}"));
        for r in 0..N as usize {
            assert!(
                self.bm_medium[r] || self.tgt.medium[r] >= self.src.medium[r],
                "region {r}: bit clear on the medium, target medium {} older than source medium {}",
                self.tgt.medium[r],
                self.src.medium[r]
            );
            assert!(
                self.src.medium[r] >= self.flushed_acked[r],
                "region {r}: data acknowledged before a completed FLUSH is not on the source medium"
            );
        }
    }

    /// Power loss: only media survive. Recovery resyncs exactly the bits set on the bitmap's
    /// medium, with the real decision code, and must end with target == source.
    fn crash_and_recover(&mut self) {
        let mut bits = MemBits::new(N);
        for r in 0..N {
            if self.bm_medium[r as usize] {
                bits.set(r);
            }
        }
        let src = self.src.medium.clone();
        let mut tgt = self.tgt.medium.clone();
        let mut s = MirrorState::new(N, bits);
        for _ in 0..100 {
            while let Some(ext) = s.next_copy(N) {
                for r in ext.regions() {
                    tgt[r as usize] = src[r as usize];
                }
                s.copy_done(ext, true);
            }
            if s.consistent_point_due() {
                s.target_flush_started();
                s.target_flush_done(true);
            }
            if s.is_synced() {
                break;
            }
        }
        assert!(s.is_synced(), "recovery did not converge");
        assert_eq!(s.persistent_count(), 0, "bits left after recovery");
        assert_eq!(tgt, src, "after recovery the target differs from the source");
    }
}

fn run(seed: u64, steps: u64) -> (u64, u64) {
    let mut sim = Sim::new(seed);
    let crash_at = sim.rng.gen_range(1..=steps);
    for _ in 0..crash_at {
        sim.step();
    }
    sim.crash_and_recover();
    (sim.steps, sim.consistent_points)
}

#[test]
fn crashes_anywhere_are_recoverable() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(seed) = env("SIM_SEED") {
        run(seed, 400);
        return;
    }
    let runs = env("SIM_RUNS").unwrap_or(if cfg!(debug_assertions) { 2_000 } else { 20_000 });
    let base = env("SIM_BASE").unwrap_or(0x5eed);
    let t0 = std::time::Instant::now();
    let (mut points, mut consistent) = (0u64, 0u64);
    for i in 0..runs {
        let seed = base + i;
        match std::panic::catch_unwind(|| run(seed, 400)) {
            Ok((p, c)) => {
                points += p;
                consistent += c;
            }
            Err(e) => {
                eprintln!("simulation failed with seed {seed}: replay with SIM_SEED={seed} cargo test --test sim");
                std::panic::resume_unwind(e);
            }
        }
    }
    println!(
        "sim: {runs} runs, {points} crash points checked, {consistent} consistent points, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(points >= runs, "runs did nothing");
    assert!(consistent > 0, "no run reached a consistent point: the simulation is not exercising the mirror");
}
