//! Property tests against simple reference models.
//!
//! 1. The decision core ([`MirrorState`] + [`GroupCommit`]) under random interleavings of
//!    writers, bitmap flushes, copies (with their source reads at any moment), target flushes
//!    and failures, against a model of versions: what each region's latest write on the source
//!    is, what the target holds in its cache and on its medium, what the bitmap's medium can be
//!    relied on to hold. Checked after every step: write intent (no write issued before its
//!    bit is durable), the clear-bit invariant, the consistent-point guarantee; at the end,
//!    convergence.
//! 2. The engine on real files through io_uring, in each copy mode (background, write-blocking,
//!    async): random writes, discards, write-zeroes and flushes against an in-memory disk;
//!    reads must match it, and after the mirror converges source and target equal it.

#![allow(clippy::needless_range_loop)] // regions index several parallel model arrays

mod common;
use proptest::prelude::*;
use ublk_mirror::core::{ActivePlan, Extent, FlushKind, GroupCommit, Intent, MemBits, MirrorState, PersistentBits};

const N: u64 = 6;

struct Copy {
    ext: Extent,
    read: Option<Vec<u64>>,
}

#[derive(Default)]
struct Model {
    ver: u64,
    /// Latest write issued to the source (it may reach the medium at any moment after issue).
    src: Vec<u64>,
    /// Latest write completed (acknowledged) per region.
    acked: Vec<u64>,
    tgt_cache: Vec<u64>,
    tgt_medium: Vec<u64>,
    /// The bitmap medium certainly holds this bit set.
    bit_durable: Vec<bool>,
    /// Bumped whenever a bit is cleared in the cache (the medium may follow at any time).
    clear_epoch: Vec<u64>,
}

/// The target half of an active (write-blocking) write.
#[derive(Clone, Debug)]
enum TgtHalf {
    /// An ordinary write, or an active one told to write the source only.
    No,
    /// Not yet issued (waiting for intent).
    Planned { id: u64 },
    /// Issued with these versions, not yet completed.
    Pending { id: u64, vers: Vec<u64> },
    Done { id: u64, ok: bool },
}

struct Sim {
    s: MirrorState<MemBits>,
    gc: GroupCommit<usize>,
    m: Model,
    writes: Vec<Option<(Extent, bool)>>, // (extent, issued)
    tgt_half: Vec<TgtHalf>,
    /// Versions each issued write gave its regions (what its completion acknowledges).
    vers: Vec<Vec<u64>>,
    /// Most writes are active (write-blocking mode).
    active_mode: bool,
    bitmap_flush: Option<(u64, Vec<(bool, u64)>)>,
    copies: Vec<Copy>,
    target_flush: Option<(FlushKind, Vec<u64>, Vec<u64>)>,
}

impl Sim {
    fn new(lazy: bool, active_mode: bool, intent_extent: u64) -> Self {
        let mut s = MirrorState::new(N, MemBits::new(N));
        s.set_lazy_clearing(lazy);
        s.set_intent_extent(intent_extent);
        Sim {
            s,
            gc: GroupCommit::default(),
            m: Model {
                src: vec![0; N as usize],
                acked: vec![0; N as usize],
                tgt_cache: vec![0; N as usize],
                tgt_medium: vec![0; N as usize],
                bit_durable: vec![false; N as usize],
                clear_epoch: vec![0; N as usize],
                ..Default::default()
            },
            writes: Vec::new(),
            tgt_half: Vec::new(),
            vers: Vec::new(),
            active_mode,
            bitmap_flush: None,
            copies: Vec::new(),
            target_flush: None,
        }
    }

    fn issue(&mut self, w: usize) {
        let (ext, issued) = self.writes[w].expect("live write");
        assert!(!issued);
        let mut vers = Vec::new();
        for r in ext.regions() {
            assert!(self.m.bit_durable[r as usize], "write intent violated: region {r} issued before its bit was durable");
            self.m.ver += 1;
            self.m.src[r as usize] = self.m.ver;
            vers.push(self.m.ver);
        }
        self.writes[w] = Some((ext, true));
        self.vers[w] = vers.clone();
        if let TgtHalf::Planned { id } = self.tgt_half[w] {
            self.tgt_half[w] = TgtHalf::Pending { id, vers };
        }
    }

    fn begin(&mut self, ext: Extent, active: bool) {
        let w = self.writes.len();
        self.writes.push(Some((ext, false)));
        self.vers.push(Vec::new());
        let intent = if active {
            // Byte ranges are whole regions here: writes to one region overlap.
            let (intent, plan) = self.s.begin_active_write(ext, ext.start * 100, ext.count * 100);
            self.tgt_half.push(match plan {
                ActivePlan::Target { id } => TgtHalf::Planned { id },
                // begin_active_write never plans shipping (begin_shipped_write does).
                ActivePlan::SourceOnly | ActivePlan::Ship { .. } => TgtHalf::No,
            });
            intent
        } else {
            self.tgt_half.push(TgtHalf::No);
            self.s.begin_write(ext)
        };
        match intent {
            Intent::Ready => self.issue(w),
            Intent::Wait { seq } => {
                if self.gc.wait(seq, w) {
                    self.start_bitmap_flush();
                }
            }
        }
    }

    /// Ends write `w` (its intent failed, or its I/O completed).
    fn end(&mut self, w: usize, source_ok: bool) {
        let (ext, _) = self.writes[w].take().expect("live");
        match std::mem::replace(&mut self.tgt_half[w], TgtHalf::No) {
            TgtHalf::No => {
                self.s.end_write(ext);
            }
            TgtHalf::Planned { id } => {
                self.s.end_active_write(id, source_ok, false);
            }
            TgtHalf::Done { id, ok } => {
                self.s.end_active_write(id, source_ok, ok);
            }
            TgtHalf::Pending { .. } => unreachable!("ended with its target write in flight"),
        }
    }

    fn step(&mut self, op: u8, a: u8, b: u8) {
        let before: Vec<bool> = (0..N).map(|r| self.s.pbits().get(r)).collect();
        self.apply(op, a, b);
        if std::env::var_os("MODEL_TRACE").is_some() {
            eprintln!(
                "op {:2} a {a:3} b {b:3}: src {:?} acked {:?} tcache {:?} tmed {:?} dirty {} writes {:?} halves {:?}",
                op % 12, self.m.src, self.m.acked, self.m.tgt_cache, self.m.tgt_medium, self.s.dirty(), self.writes, self.tgt_half
            );
        }
        // A bit cleared in the cache may reach the medium at any moment: from now on the
        // medium cannot be relied on to hold it.
        for r in 0..N {
            if before[r as usize] && !self.s.pbits().get(r) {
                self.m.clear_epoch[r as usize] += 1;
                self.m.bit_durable[r as usize] = false;
            }
        }
        self.check();
    }

    fn apply(&mut self, op: u8, a: u8, b: u8) {
        match op % 12 {
            0 | 1 | 10 => {
                let start = a as u64 % N;
                let count = (1 + b as u64 % 2).min(N - start);
                self.begin(Extent { start, count }, op % 12 == 10 || (self.active_mode && b % 2 == 0));
            }
            11 => {
                // The target half of an issued active write completes (possibly failing). It
                // may land before or after copies and flushes of its region.
                let pending: Vec<usize> =
                    (0..self.writes.len()).filter(|&i| matches!(self.tgt_half[i], TgtHalf::Pending { .. })).collect();
                if let Some(&w) = pending.get(a as usize % pending.len().max(1)) {
                    let TgtHalf::Pending { id, vers } = self.tgt_half[w].clone() else { unreachable!() };
                    let ok = b % 8 != 0;
                    if ok {
                        let (ext, _) = self.writes[w].expect("live");
                        for (r, v) in ext.regions().zip(vers) {
                            self.m.tgt_cache[r as usize] = v;
                        }
                    }
                    self.tgt_half[w] = TgtHalf::Done { id, ok };
                }
            }
            2 => {
                // Complete an issued write (an active one once its target half is done).
                let issued: Vec<usize> = (0..self.writes.len())
                    .filter(|&i| {
                        matches!(self.writes[i], Some((_, true))) && !matches!(self.tgt_half[i], TgtHalf::Pending { .. })
                    })
                    .collect();
                if let Some(&w) = issued.get(a as usize % issued.len().max(1)) {
                    let (ext, _) = self.writes[w].expect("live");
                    for (r, &v) in ext.regions().zip(&self.vers[w]) {
                        let a = &mut self.m.acked[r as usize];
                        *a = (*a).max(v);
                    }
                    self.end(w, true);
                }
            }
            3 => {
                if let Some((seq, snap)) = self.bitmap_flush.take() {
                    let ok = b % 8 != 0;
                    if ok {
                        for r in 0..N as usize {
                            let (set, epoch) = snap[r];
                            if set && epoch == self.m.clear_epoch[r] {
                                self.m.bit_durable[r] = true;
                            }
                        }
                    }
                    self.s.bitmap_flush_done(seq, ok);
                    let s = &self.s;
                    let step = self.gc.completed(ok, |q| s.intent_durable(q));
                    for w in step.ready {
                        self.issue(w);
                    }
                    for w in step.failed {
                        self.end(w, false);
                    }
                    if step.start_flush {
                        self.start_bitmap_flush();
                    }
                }
            }
            4 => {
                if let Some(ext) = self.s.next_copy(1 + a as u64 % 3) {
                    self.copies.push(Copy { ext, read: None });
                }
            }
            5 => {
                let n = self.copies.len();
                if n > 0 {
                    let c = &mut self.copies[a as usize % n];
                    if c.read.is_none() {
                        c.read = Some(c.ext.regions().map(|r| self.m.src[r as usize]).collect());
                    }
                }
            }
            6 => {
                let n = self.copies.len();
                if n > 0 && self.copies[a as usize % n].read.is_some() {
                    let c = self.copies.remove(a as usize % n);
                    let ok = b % 8 != 0;
                    if ok {
                        for (r, v) in c.ext.regions().zip(c.read.expect("read")) {
                            self.m.tgt_cache[r as usize] = v;
                        }
                    }
                    self.s.copy_done(c.ext, ok);
                }
            }
            7 => {
                if self.target_flush.is_none() && (self.s.consistent_point_due() || self.s.checkpoint_possible()) {
                    let kind = self.s.target_flush_started();
                    self.target_flush = Some((kind, self.m.tgt_cache.clone(), self.m.acked.clone()));
                }
            }
            9 => {
                self.s.clear_tick();
            }
            _ => {
                if let Some((kind, snap, acked)) = self.target_flush.take() {
                    let ok = b % 8 != 0;
                    if ok {
                        for r in 0..N as usize {
                            self.m.tgt_medium[r] = self.m.tgt_medium[r].max(snap[r]);
                        }
                    }
                    let out = self.s.target_flush_done(ok);
                    if ok && kind == FlushKind::Consistent {
                        assert!(out.consistent);
                        for r in 0..N as usize {
                            assert!(
                                self.m.tgt_medium[r] >= acked[r],
                                "consistent point: region {r} lacks a write acknowledged before it"
                            );
                        }
                    }
                }
            }
        }
    }

    fn start_bitmap_flush(&mut self) {
        let seq = self.s.bitmap_flush_started();
        self.gc.started(seq);
        let snap = (0..N).map(|r| (self.s.pbits().get(r), self.m.clear_epoch[r as usize])).collect();
        self.bitmap_flush = Some((seq, snap));
    }

    fn check(&self) {
        self.s.check_invariants().unwrap_or_else(|e| panic!("core invariant: {e}"));
        for r in 0..N {
            let i = r as usize;
            assert!(
                self.s.pbits().get(r) || self.m.tgt_medium[i] >= self.m.src[i],
                "region {r}: bit clear but target medium {} older than source {}",
                self.m.tgt_medium[i],
                self.m.src[i]
            );
        }
    }

    /// Lets every operation finish successfully and the mirror converge.
    fn converge(&mut self) {
        for _ in 0..10_000 {
            let idle = self.writes.iter().all(|w| w.is_none())
                && self.copies.is_empty()
                && self.bitmap_flush.is_none()
                && self.target_flush.is_none()
                && self.s.is_synced();
            if idle {
                break;
            }
            for op in [3u8, 11, 2, 4, 5, 6, 7, 8] {
                self.step(op, 0, 1);
            }
        }
        // Lazy clearing: untouched eligible bits go within two ticks.
        self.step(9, 0, 0);
        self.step(9, 0, 0);
        assert!(self.s.is_synced(), "did not converge");
        for r in 0..N {
            let i = r as usize;
            assert!(!self.s.pbits().get(r), "bit {r} still set after convergence");
            assert_eq!(self.m.tgt_medium[i], self.m.src[i], "region {r} not mirrored");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(2000), .. ProptestConfig::default() })]

    #[test]
    fn core_keeps_the_invariants(
        lazy in any::<bool>(),
        active in any::<bool>(),
        extent_log in 0u32..3,
        ops in prop::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 1..300),
    ) {
        let mut sim = Sim::new(lazy, active, 1 << extent_log);
        for (op, a, b) in ops {
            sim.step(op, a, b);
        }
        sim.converge();
    }
}

mod engine_vs_memory {
    use super::common::*;
    use proptest::prelude::*;
    use std::sync::Arc;
    use std::time::Duration;
    use ublk_mirror::io::backing::AlignedBuf;
    use ublk_mirror::engine::{CopyConfig, CopyMode, Engine, Settings, StatusMode, SyncMode};
    use ublk_mirror::engine::mirror::{Mirror, RunUntil};
    use ublk_mirror::engine::queue::{EngineQueue, Op};

    const BLK: u64 = 4096;
    const BLOCKS: u64 = 64;

    #[derive(Clone, Debug)]
    enum Req {
        Write { blk: u64, n: u64, seed: u8, fua: bool },
        Discard { blk: u64, n: u64 },
        Zero { blk: u64, n: u64, unmap: bool },
        Flush,
        Read { blk: u64, n: u64 },
    }

    fn req() -> impl Strategy<Value = Req> {
        let span = (0..BLOCKS).prop_flat_map(|b| (Just(b), 1..=(BLOCKS - b).min(8)));
        prop_oneof![
            4 => (span.clone(), any::<u8>(), any::<bool>()).prop_map(|((blk, n), seed, fua)| Req::Write { blk, n, seed, fua }),
            1 => span.clone().prop_map(|(blk, n)| Req::Discard { blk, n }),
            1 => (span.clone(), any::<bool>()).prop_map(|((blk, n), unmap)| Req::Zero { blk, n, unmap }),
            1 => Just(Req::Flush),
            2 => span.prop_map(|(blk, n)| Req::Read { blk, n }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

        #[test]
        fn engine_matches_an_in_memory_disk(
            // (mode, the target attached to the front end): write-blocking needs it; async mode
            // runs both ways (shipped writes issued by the loop, or by the queue when it can).
            (mode, attach) in prop_oneof![
                Just((CopyMode::Background, false)),
                Just((CopyMode::WriteBlocking, true)),
                Just((CopyMode::Async, false)),
                Just((CopyMode::Async, true)),
            ],
            reqs in prop::collection::vec(req(), 1..60),
        ) {
            let f = files(BLOCKS * BLK);
            let (engine, mut target, _) = Engine::open(&f.pair(Some(SyncMode::Full), Some(8192))).expect("open");
            let engine = Arc::new(engine);
            // Write-blocking: writes also go to the target from the queue's ring. Async: they
            // are shipped from the replication buffer once the first sync is done, by the queue
            // too when attached.
            if attach {
                engine.attach_target(target.as_ref()).expect("attach");
            }
            engine.apply_settings(&Settings { mode: Some(mode), ..Default::default() });
            let me = engine.clone();
            let mirror = std::thread::spawn(move || {
                let cfg = CopyConfig { max_copies: 2, buf_size: 16384, ..Default::default() };
                Mirror::new(me, target.as_mut(), cfg).expect("mirror").run(RunUntil::Stopped, None).expect("run")
            });
            if mode == CopyMode::Async {
                wait_for("shipping to start", Duration::from_secs(30), || engine.status().mode == StatusMode::Async);
            }
            let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
            let mut model = vec![0u8; (BLOCKS * BLK) as usize];
            for r in &reqs {
                let op = match r.clone() {
                    Req::Write { blk, n, seed, fua } => {
                        let mut data = AlignedBuf::new((n * BLK) as usize);
                        for (i, b) in data.iter_mut().enumerate() {
                            *b = seed.wrapping_add((i / 512) as u8) | 1;
                        }
                        model[(blk * BLK) as usize..((blk + n) * BLK) as usize].copy_from_slice(&data);
                        Op::Write { off: blk * BLK, data, len: (n * BLK) as u32, fua }
                    }
                    Req::Discard { blk, n } | Req::Zero { blk, n, .. } => {
                        model[(blk * BLK) as usize..((blk + n) * BLK) as usize].fill(0);
                        match r {
                            Req::Zero { unmap, .. } => Op::WriteZeroes { off: blk * BLK, len: n * BLK, unmap: *unmap },
                            _ => Op::Discard { off: blk * BLK, len: n * BLK },
                        }
                    }
                    Req::Flush => Op::Flush,
                    Req::Read { blk, n } => Op::Read { off: blk * BLK, len: (n * BLK) as u32 },
                };
                let (_, buf) = q.execute(op).expect("request");
                if let Req::Read { blk, n } = r {
                    let want = &model[(blk * BLK) as usize..((blk + n) * BLK) as usize];
                    prop_assert!(&buf.expect("data")[..want.len()] == want, "read differs from the model");
                }
            }
            drop(q);
            wait_for("convergence", Duration::from_secs(30), || engine.status().state == "synced");
            // The first modifying request finds every region clean: in async mode it is shipped.
            if mode == CopyMode::Async && reqs.iter().any(|r| !matches!(r, Req::Flush | Req::Read { .. })) {
                let shipped = engine.status().shipping.map_or(0, |s| s.shipped_writes);
                prop_assert!(shipped > 0, "async mode shipped nothing");
            }
            engine.request_stop();
            mirror.join().expect("mirror thread");
            prop_assert!(read_all(&f.source) == model, "source differs from the model");
            prop_assert!(read_all(&f.target) == model, "target differs from the model");
        }
    }
}

/// `PROPTEST_CASES` overrides the default number of cases (for longer runs by hand).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
