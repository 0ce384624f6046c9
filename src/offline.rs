//! Offline commands: `sync` (bring a target in step with a source using a bitmap) and `verify`
//! (compare them, and check the bitmap's claims).

use crate::io::backing::{AlignedBuf, Backing, DirectMode};
use crate::io::bitmap::{Bitmap, PairIdentity};
use crate::engine::{CopyConfig, Engine, OpenReport, PairOptions, Status};
use crate::error::{Error, Result};
use crate::engine::mirror::{TestHooks, Mirror, RunUntil};
use crate::io::target::{BoxTarget, TargetDone, TargetOp};
use crate::io::{is_uri, open_target};
use crate::io::uring::{self, push, Owner};
use io_uring::{opcode, types};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, serde::Serialize)]
pub struct SyncReport {
    pub open: OpenReport,
    pub device_size: u64,
    pub granularity: u64,
    /// Bytes the bitmap said were dirty at the start.
    pub dirty_bytes_at_start: u64,
    pub bytes_copied: u64,
    pub bytes_zeroed: u64,
    pub seconds: f64,
    pub mib_per_sec: f64,
    pub interrupted: bool,
}

/// A progress callback and how often to call it.
pub type ProgressReport<'a> = Option<(&'a mut dyn FnMut(&Status), Duration)>;

/// Brings the target in step with the source. On success the bitmap is clean and durable.
pub fn sync(pair: &PairOptions, copy: &CopyConfig, hooks: TestHooks, progress: ProgressReport<'_>) -> Result<SyncReport> {
    let (engine, mut target, open) = Engine::open(pair)?;
    let engine = Arc::new(engine);
    let gran = engine.granularity();
    let dirty_bytes_at_start = (open.dirty_regions * gran).min(engine.size());
    let mut mirror = Mirror::new(engine.clone(), target.as_mut(), copy.clone())?;
    mirror.set_hooks(hooks);
    let report = match progress {
        Some((f, every)) => {
            let mut cb = |e: &Engine| f(&e.status());
            mirror.run(RunUntil::Synced, Some((&mut cb, every)))?
        }
        None => mirror.run(RunUntil::Synced, None)?,
    };
    drop(mirror);
    if !report.interrupted {
        // One fdatasync makes the cleared bits and the clean state durable together (the
        // mirror already flushed the bitmap after its last clearing).
        engine.close()?;
    }
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    Ok(SyncReport {
        open,
        device_size: engine.size(),
        granularity: gran,
        dirty_bytes_at_start,
        bytes_copied: report.bytes_copied,
        bytes_zeroed: report.bytes_zeroed,
        seconds: secs,
        mib_per_sec: report.bytes_copied as f64 / secs / (1 << 20) as f64,
        interrupted: report.interrupted,
    })
}

#[derive(Clone, Debug)]
pub struct VerifyOptions {
    pub source: PathBuf,
    pub target: PathBuf,
    pub bitmap: Option<PathBuf>,
    /// Region size for the report when there is no bitmap.
    pub granularity: Option<u64>,
    pub direct: DirectMode,
    /// TLS files for an `nbds://` target.
    pub tls: crate::io::nbd::tls::TlsFiles,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub device_size: u64,
    pub granularity: u64,
    pub bytes_compared: u64,
    /// Bytes not read because both sides hold a hole there (files only: SEEK_DATA).
    pub bytes_skipped: u64,
    /// Runs of differing regions: (first region, count).
    pub differing: Vec<(u64, u64)>,
    /// Runs of differing regions whose bitmap bit is clear: the bitmap claimed these were in
    /// sync. Always empty without a bitmap.
    pub differing_clean: Vec<(u64, u64)>,
    pub bitmap_dirty_regions: u64,
}

impl VerifyReport {
    pub fn identical(&self) -> bool {
        self.differing.is_empty()
    }
    pub fn differing_regions(&self) -> u64 {
        self.differing.iter().map(|r| r.1).sum()
    }
    pub fn differing_clean_regions(&self) -> u64 {
        self.differing_clean.iter().map(|r| r.1).sum()
    }
}

fn push_run(runs: &mut Vec<(u64, u64)>, r: u64) {
    match runs.last_mut() {
        Some((s, n)) if *s + *n == r => *n += 1,
        _ => runs.push((r, 1)),
    }
}

/// The target as verify reads it: a file or block device by its descriptor, anything else
/// (an NBD export) through its [`crate::io::target::Target`] implementation.
enum VerifyTarget {
    File(Backing),
    Other(BoxTarget),
}

/// Compares source and target region by region, reading both through io_uring.
pub fn verify(opts: &VerifyOptions) -> Result<VerifyReport> {
    verify_with_progress(opts, None)
}

/// A verify's progress callback and how often to call it.
pub type VerifyProgress<'a> = Option<(&'a mut dyn FnMut(&VerifyReport), Duration)>;

/// [`verify`], calling `progress` with the report so far at most once per interval (the bytes
/// done are `bytes_compared + bytes_skipped`, of `device_size`).
pub fn verify_with_progress(opts: &VerifyOptions, mut progress: VerifyProgress<'_>) -> Result<VerifyReport> {
    let source = Backing::open(&opts.source, "source", false, opts.direct)?;
    let mut target = if is_uri(&opts.target) {
        VerifyTarget::Other(open_target(&opts.target, opts.direct, &opts.tls)?)
    } else {
        crate::io::check_no_tls(&opts.target, &opts.tls)?;
        VerifyTarget::File(Backing::open(&opts.target, "target", false, opts.direct)?)
    };
    let (target_size, target_identity) = match &target {
        VerifyTarget::File(b) => (b.size, b.identity.clone()),
        VerifyTarget::Other(t) => (t.size(), t.identity()),
    };
    let size = source.size;
    if target_size < size {
        return Err(Error::config(format!(
            "target {} is smaller than the source ({} < {size} bytes): they cannot be identical",
            opts.target.display(),
            target_size
        )));
    }
    let (granularity, bits) = match &opts.bitmap {
        Some(p) => {
            let (h, runs) = Bitmap::inspect(p)?;
            let pair = PairIdentity {
                source: source.identity.0.clone(),
                source_fingerprint: source.identity.1,
                target: target_identity.0.clone(),
                target_fingerprint: target_identity.1,
            };
            if !crate::io::bitmap::same_pair(&h, &pair) || h.device_size != size {
                return Err(Error::Bitmap {
                    path: p.clone(),
                    problem: crate::error::BitmapProblem::WrongPair {
                        role: "pair",
                        recorded: format!("{} -> {}", h.pair.source, h.pair.target),
                        given: format!("{} -> {}", pair.source, pair.target),
                    },
                    what: format!(
                        "it belongs to {} -> {} ({} bytes), not to this pair",
                        h.pair.source, h.pair.target, h.device_size
                    ),
                    fix: "give this pair's bitmap, or verify without --bitmap".into(),
                });
            }
            let mut set = crate::core::pagebits::PagedBits::new(h.nregions as usize);
            for (s, n) in runs {
                set.fill(s as usize, (s + n) as usize, true);
            }
            (h.granularity, Some(set))
        }
        None => {
            let g = opts.granularity.unwrap_or_else(|| crate::io::bitmap::default_granularity(size));
            crate::io::bitmap::check_granularity(g)?;
            (g, None)
        }
    };
    let chunk = granularity.max(1 << 20) as usize;
    const DEPTH: usize = 4;
    // Reads in flight write into `bufs` (a slot's pair is not touched until both of its reads
    // completed); a return with reads in flight (a broken ring) leaks them. A target behind a
    // protocol leaks its own buffers in that case (its Drop).
    let mut bufs: Vec<(AlignedBuf, AlignedBuf)> =
        (0..DEPTH).map(|_| (AlignedBuf::new(chunk), AlignedBuf::new(chunk))).collect();
    let mut ring = uring::new_ring(16).map_err(|e| Error::io("io_uring setup", e))?;
    // Per slot: offset, length, and how many of the two reads are still pending.
    let mut slots: Vec<Option<(u64, usize, u8)>> = vec![None; DEPTH];
    // After a read error: no new reads; the ones in flight are waited for (they write into
    // `bufs`), then the error is returned.
    let mut failed: Option<Error> = None;
    let mut tdone: Vec<TargetDone> = Vec::new();
    let mut events: Vec<(bool, usize, std::io::Result<usize>)> = Vec::new();
    let mut next = 0u64;
    let mut report = VerifyReport {
        device_size: size,
        granularity,
        bitmap_dirty_regions: bits.as_ref().map(|b| b.count_ones() as u64).unwrap_or(0),
        ..Default::default()
    };
    let mut ready: Vec<(u64, usize, usize)> = Vec::new();
    let mut cqes = Vec::new();
    let mut reported = std::time::Instant::now();
    loop {
        if let Some((f, every)) = progress.as_mut() {
            if reported.elapsed() >= *every {
                f(&report);
                reported = std::time::Instant::now();
            }
        }
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.is_some() || next >= size || failed.is_some() {
                continue;
            }
            // Where both sides hold a hole there is nothing to compare: skip to the region of
            // the next data on either side (a file's holes cost two lseeks, not a read).
            if let VerifyTarget::File(t) = &target {
                let data_at = |b: &Backing| -> Result<u64> {
                    Ok(b.next_data(next, size).map_err(|e| Error::io("SEEK_DATA", e))?.map_or(size, |d| d.0))
                };
                let until = data_at(&source)?.min(data_at(t)?);
                let until = if until >= size { size } else { until / granularity * granularity };
                if until > next {
                    report.bytes_skipped += until - next;
                    next = until;
                    if next >= size {
                        continue;
                    }
                }
            }
            let len = ((size - next) as usize).min(chunk);
            let (a, b) = &mut bufs[i];
            let ra = opcode::Read::new(types::Fd(source.fd()), a.as_mut_ptr(), len as u32).offset(next).build();
            // SAFETY: see `bufs`; the source is held open for the whole function.
            let pushed = unsafe { push(&mut ring, ra, Owner::Source, i as u64) }.and_then(|()| match &mut target {
                VerifyTarget::File(t) => {
                    let rb = opcode::Read::new(types::Fd(t.fd()), b.as_mut_ptr(), len as u32).offset(next).build();
                    // SAFETY: as above.
                    unsafe { push(&mut ring, rb, Owner::Target, i as u64) }
                }
                VerifyTarget::Other(t) => {
                    let op = TargetOp::Read { off: next, buf: b.as_mut_ptr(), len: len as u32 };
                    // SAFETY: as above.
                    unsafe { t.submit(&mut ring, op, i as u64) }
                }
            });
            if let Err(e) = pushed {
                std::mem::forget(bufs);
                return Err(Error::io("submit read", e));
            }
            *slot = Some((next, len, 2));
            next += len as u64;
        }
        if slots.iter().all(|s| s.is_none()) {
            break;
        }
        if let Err(e) = uring::submit_and_wait(&mut ring, 1) {
            std::mem::forget(bufs);
            return Err(Error::io("verify reads", e));
        }
        cqes.clear();
        uring::reap(&mut ring, &mut cqes);
        // Completions as (from the source?, slot, bytes read); a target behind a protocol turns
        // its own completions into finished reads.
        for &(ud, res) in &cqes {
            let (owner, sub) = uring::decode(ud);
            match (&mut target, owner) {
                (VerifyTarget::Other(t), Some(Owner::Target)) => {
                    t.complete(&mut ring, sub, res, &mut tdone);
                    events.extend(tdone.drain(..).map(|(tok, r)| (false, tok as usize, r.map(|n| n as usize))));
                }
                _ => {
                    let r = if res < 0 { Err(std::io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) };
                    events.push((owner == Some(Owner::Source), sub as usize, r));
                }
            }
        }
        for (from_source, i, r) in events.drain(..) {
            let Some((off, len, pending)) = slots.get_mut(i).and_then(|s| s.as_mut()) else { continue };
            let who = if from_source { &opts.source } else { &opts.target };
            let err = match r {
                Err(e) => Some(e),
                Ok(n) if n < *len => Some(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read")),
                Ok(_) => None,
            };
            if let Some(e) = err {
                failed.get_or_insert(Error::io(format!("reading {} at byte {off}", who.display()), e));
            }
            *pending -= 1;
            if *pending == 0 {
                if failed.is_some() {
                    slots[i] = None;
                } else {
                    ready.push((*off, *len, i));
                }
            }
        }
        ready.sort_unstable();
        for (off, len, i) in ready.drain(..) {
            let (a, b) = &bufs[i];
            let mut pos = 0usize;
            while pos < len {
                let end = (pos + granularity as usize).min(len);
                if a[pos..end] != b[pos..end] {
                    let r = (off + pos as u64) / granularity;
                    push_run(&mut report.differing, r);
                    if let Some(bits) = &bits {
                        if !bits.get(r as usize) {
                            push_run(&mut report.differing_clean, r);
                        }
                    }
                }
                pos = end;
            }
            report.bytes_compared += len as u64;
            slots[i] = None;
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    // Runs were pushed in completion order; merge them into order.
    for runs in [&mut report.differing, &mut report.differing_clean] {
        runs.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for &(s, n) in runs.iter() {
            match merged.last_mut() {
                Some((ms, mn)) if *ms + *mn == s => *mn += n,
                _ => merged.push((s, n)),
            }
        }
        *runs = merged;
    }
    Ok(report)
}
