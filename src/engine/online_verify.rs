//! Online verify: compares source and target region by region while the device is live.
//!
//! A region is compared only if it is clean when its reads start and nothing touches it until
//! both reads have completed ([`crate::core::MirrorState::verify_begin`] / `verify_end`):
//! then both reads describe one state of the pair, and a difference is a real one. Since clean
//! regions are identical by the mirror's invariant, any mismatch found is a bug (or someone
//! wrote the target behind the mirror's back). Regions dirty or busy are skipped and counted.
//! The reads are throttled like the copy (the `speed` setting). Where source and target both hold
//! a hole (SEEK_DATA on each), both read as zeros: those regions are not read, and counted apart.

use crate::io::backing::AlignedBuf;
use crate::engine::verify_report::{OnlineVerify, VerifyState};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::io::uring::{self, push, Owner};
use io_uring::{opcode, types};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Mismatching regions listed at most (the count is exact).
const MAX_LISTED: usize = 1000;
/// Bytes read per side per step.
const CHUNK: u64 = 1 << 20;

/// Starts a verify of `engine`'s pair on a thread of its own. Refused while one runs, after a
/// switchover, and for targets it cannot read directly (NBD: the offline `verify` reads those).
pub fn start(engine: &Arc<Engine>) -> Result<()> {
    engine.with_target_for_verify(|target| spawn(engine, target))
}

/// The verify thread, reading the target through `target` (a duplicate of the target's
/// descriptor, owned by the thread).
fn spawn(engine: &Arc<Engine>, target: OwnedFd) -> Result<()> {
    {
        let mut g = engine.verifier().lock();
        if g.as_ref().is_some_and(|r| r.state == VerifyState::Running) {
            return Err(Error::config("a verify is already running: see `status`"));
        }
        *g = Some(OnlineVerify {
            state: VerifyState::Running,
            regions: engine.size().div_ceil(engine.granularity()),
            granularity: engine.granularity(),
            ..Default::default()
        });
    }
    let e = engine.clone();
    std::thread::Builder::new()
        .name("verify".into())
        .spawn(move || {
            let t0 = Instant::now();
            let r = run(&e, &target);
            let mut g = e.verifier().lock();
            if let Some(rep) = g.as_mut() {
                rep.elapsed_secs = t0.elapsed().as_secs_f64();
                match r {
                    Ok(()) => rep.state = VerifyState::Done,
                    Err(err) => {
                        rep.state = VerifyState::Failed;
                        rep.error = Some(err.to_string());
                    }
                }
            }
            let summary = g.clone();
            drop(g);
            if let Some(s) = summary {
                e.events().emit(
                    "verified",
                    serde_json::json!({ "state": s.state, "compared": s.compared, "skipped": s.skipped,
                                        "holes": s.holes, "mismatches": s.mismatches, "error": s.error }),
                );
            }
        })
        .map_err(|e| Error::io("verify thread", e))?;
    Ok(())
}

fn run(engine: &Engine, target: &OwnedFd) -> Result<()> {
    let gran = engine.granularity();
    let size = engine.size();
    let nregions = size.div_ceil(gran);
    let mut ring = uring::new_ring(8).map_err(|e| Error::io("io_uring setup for verify", e))?;
    let chunk = CHUNK.min(gran.max(4096)) as usize;
    let (mut a, mut b) = (AlignedBuf::new(chunk), AlignedBuf::new(chunk));
    let mut cqes = Vec::new();
    let mut pace = Pace::new(engine);
    // Held for the whole run: a reverse switchover is refused while a verify runs, and this
    // keeps the compared pair fixed all the same.
    let source = engine.source();
    // Below this byte, source or target holds data (known from the last probe): no probing.
    let mut probe_at = 0u64;
    let mut r = 0;
    while r < nregions {
        if engine.stop_requested() {
            return Err(Error::config("the mirror stopped during the verify"));
        }
        if r * gran >= probe_at {
            match both_holes(&source, target, r, gran, size)? {
                Holes::Until(next) => {
                    let bytes = (next * gran).min(size) - r * gran;
                    bump(engine, |v| {
                        v.holes += next - r;
                        v.bytes_skipped += bytes;
                    });
                    r = next;
                    continue;
                }
                Holes::DataUntil(end) => probe_at = end,
            }
        }
        if !engine.lock().state.verify_begin(r) {
            bump(engine, |v| v.skipped += 1);
            r += 1;
            continue;
        }
        let (start, end) = (r * gran, ((r + 1) * gran).min(size));
        let mut same = true;
        let mut off = start;
        while off < end && same {
            let len = ((end - off) as usize).min(chunk);
            let ra = opcode::Read::new(types::Fd(source.fd()), a.as_mut_ptr(), len as u32).offset(off).build();
            let rb = opcode::Read::new(types::Fd(target.as_raw_fd()), b.as_mut_ptr(), len as u32).offset(off).build();
            // Reads in flight write into `a` and `b`: they are not touched until both reads
            // completed, and a way out with a read in flight (a broken ring) leaks them.
            let mut pending = 0;
            for (e, owner) in [(ra, Owner::Source), (rb, Owner::Target)] {
                // SAFETY: see above; the descriptors are held (source, target) for the run.
                if let Err(e) = unsafe { push(&mut ring, e, owner, 0) } {
                    if pending > 0 {
                        std::mem::forget((a, b));
                    }
                    return Err(Error::io("verify read", e));
                }
                pending += 1;
            }
            let mut failed = None;
            while pending > 0 {
                if let Err(e) = uring::submit_and_wait(&mut ring, 1) {
                    std::mem::forget((a, b));
                    return Err(Error::io("verify reads", e));
                }
                cqes.clear();
                uring::reap(&mut ring, &mut cqes);
                for &(ud, res) in &cqes {
                    pending -= 1;
                    if res < 0 || (res as usize) < len {
                        let who = if uring::decode(ud).0 == Some(Owner::Source) { "source" } else { "target" };
                        let e = if res < 0 {
                            std::io::Error::from_raw_os_error(-res)
                        } else {
                            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read")
                        };
                        failed.get_or_insert(Error::io(format!("verify: reading the {who} at byte {off}"), e));
                    }
                }
            }
            if let Some(e) = failed {
                // The region is unwatched by the next verify_begin of another region.
                engine.lock().state.verify_end(r);
                return Err(e);
            }
            same = a[..len] == b[..len];
            off += len as u64;
        }
        // Judge only if nothing touched the region while it was read.
        let valid = engine.lock().state.verify_end(r);
        bump(engine, |v| {
            if !valid {
                v.skipped += 1;
                return;
            }
            v.compared += 1;
            v.bytes_compared += end - start;
            if !same {
                v.mismatches += 1;
                if v.mismatched.len() < MAX_LISTED {
                    v.mismatched.push(r);
                }
            }
        });
        if valid && !same {
            log::error!("online verify: region {r} (bytes {start}..{end}) differs although it is clean");
        }
        pace.account(engine, end - start);
        r += 1;
    }
    Ok(())
}

enum Holes {
    /// Regions from the one asked about up to this one (excluded) are holes on both sides.
    Until(u64),
    /// The region asked about holds data on a side; no region before this byte is a hole on
    /// both sides.
    DataUntil(u64),
}

/// Are source and target both holes from region `r` on, and up to where? A region counts as a
/// hole only if it is one whole on both sides: it then reads as zeros on both, and there is
/// nothing to compare. (A write landing after the probe makes the region dirty: it would have
/// been skipped as busy all the same.)
fn both_holes(source: &crate::io::backing::Backing, target: &OwnedFd, r: u64, gran: u64, size: u64) -> Result<Holes> {
    let pos = r * gran;
    let probe = |what: &str, got: std::io::Result<Option<(u64, u64)>>| {
        got.map_err(|e| Error::io(format!("verify: SEEK_DATA on the {what} at byte {pos}"), e))
    };
    let sides = [
        probe("source", source.next_data(pos, size))?,
        probe("target", crate::io::backing::next_data(target.as_raw_fd(), pos, size))?,
    ];
    let data_at = sides.iter().map(|d| d.map_or(size, |d| d.0)).min().unwrap_or(size);
    let first = if data_at >= size { size.div_ceil(gran) } else { data_at / gran };
    if first > r {
        return Ok(Holes::Until(first));
    }
    // Data in region r on one side at least: the regions up to the end of that data (on the
    // side where it reaches furthest) cannot be holes on both sides.
    let end = sides.iter().flatten().filter(|d| d.0 < pos + gran).map(|d| d.1).max().unwrap_or(pos + gran);
    Ok(Holes::DataUntil(end / gran * gran))
}

fn bump(engine: &Engine, f: impl FnOnce(&mut OnlineVerify)) {
    if let Some(v) = engine.verifier().lock().as_mut() {
        f(v);
    }
}

/// Keeps the compared bytes at or below the copy speed limit, if there is one, counted from
/// when that limit was set: a limit set after an unlimited stretch does not owe for it (counted
/// from the start, a limit set after 500 GiB meant a sleep of hours, with "running" shown).
/// Sleeps in steps that end on a stop.
struct Pace {
    speed: u64,
    since: Instant,
    bytes: u64,
}

impl Pace {
    fn new(engine: &Engine) -> Self {
        Pace { speed: engine.speed(), since: Instant::now(), bytes: 0 }
    }

    fn account(&mut self, engine: &Engine, bytes: u64) {
        let speed = engine.speed();
        if speed != self.speed {
            *self = Pace { speed, since: Instant::now(), bytes: 0 };
        }
        self.bytes += bytes;
        if speed == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / speed as f64);
        loop {
            let left = due.saturating_sub(self.since.elapsed());
            if left.is_zero() || engine.stop_requested() || engine.speed() != speed {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(200)));
        }
    }
}
