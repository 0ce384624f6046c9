//! Async mode (ordered shipping) on real files: writes reach the target from the replication
//! buffer instead of being copied, every consistent point is an image of the source as of some
//! moment, and a full buffer falls back to the background copy and resumes once caught up.

mod common;
use common::*;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use ublk_mirror::engine::mirror::TestHooks;
use ublk_mirror::engine::queue::{EngineQueue, Op};
use ublk_mirror::engine::{CopyConfig, CopyMode, Engine, Settings, SyncMode};
use ublk_mirror::io::backing::AlignedBuf;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

fn async_settings(buffer: u64) -> Settings {
    Settings { mode: Some(CopyMode::Async), async_buffer: buffer, ..Default::default() }
}

fn block_data(seed: u64) -> AlignedBuf {
    let mut b = AlignedBuf::new(BLOCK);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (8 * (i % 8))) as u8 ^ (i / 8) as u8;
    }
    b
}

fn write_block(q: &mut EngineQueue, blk: u64, seed: u64) -> AlignedBuf {
    let data = block_data(seed);
    let copy = block_data(seed);
    q.execute(Op::Write { off: blk * BLOCK as u64, data, len: BLOCK as u32, fua: false }).expect("write");
    copy
}

/// A live loop over `f`'s target on its own thread with `hooks`, until the engine is stopped.
fn spawn_loop(engine: &Arc<Engine>, f: &Files, hooks: impl FnOnce() -> TestHooks + Send + 'static) -> std::thread::JoinHandle<()> {
    let t = ublk_mirror::io::target::open_file_target(&f.target, ublk_mirror::io::backing::DirectMode::Auto).expect("target");
    let cfg = CopyConfig { max_copies: 8, buf_size: 256 << 10, ..Default::default() };
    spawn_loop_with_hooks(engine, Box::new(t), cfg, hooks)
}

/// A live loop with no hooks, once shipping has started (at the loop's first consistent point),
/// and a queue to write through.
fn start_shipping(engine: &Arc<Engine>, f: &Files) -> (std::thread::JoinHandle<()>, EngineQueue) {
    let mirror = spawn_shipping_loop(engine, f);
    (mirror, EngineQueue::new(engine.clone(), 8).expect("queue"))
}

/// A live loop with no hooks, once shipping has started.
fn spawn_shipping_loop(engine: &Arc<Engine>, f: &Files) -> std::thread::JoinHandle<()> {
    let mirror = spawn_loop(engine, f, TestHooks::default);
    wait_for("shipping to start", Duration::from_secs(10), || mode(engine) == "async");
    mirror
}

/// An async engine over `f` whose queue can reach the target, its live loop once shipping has
/// started, and a queue whose operations only a [`Recorder`] sees.
fn start_recorded(f: &Files) -> (Arc<Engine>, std::thread::JoinHandle<()>, ublk_mirror::engine::queue::QueueRequests, Recorder) {
    let engine = open_async_issued_by(f, 16 * MIB, Issuer::Queue);
    let mirror = spawn_shipping_loop(&engine, f);
    let q = ublk_mirror::engine::queue::QueueRequests::new(engine.clone()).expect("queue");
    (engine, mirror, q, Recorder::default())
}

/// Writes `n` blocks 64 KiB apart (block i with seed i; a failed write fails the test), then
/// flushes the device.
fn write_spread(q: &mut EngineQueue, n: u64) {
    for i in 0..n {
        write_block(q, i * 16, i);
    }
    q.execute(Op::Flush).expect("flush");
}

fn mode(engine: &Engine) -> String {
    engine.status().mode.to_string()
}

fn open_async(f: &Files, buffer: u64) -> Arc<Engine> {
    let (engine, _target, _) = Engine::open(&f.pair(Some(SyncMode::AssumeIdentical), Some(64 << 10))).expect("open");
    let engine = Arc::new(engine);
    engine.apply_settings(&async_settings(buffer));
    engine
}

/// Who issues the shipped writes to the target.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Issuer {
    /// The mirror loop (the front end cannot reach the target, as with an NBD target).
    Loop,
    /// The front end's queue, when the order lets a write go at once (a file or block device
    /// target attached to the engine, as the daemon does); the loop issues the rest.
    Queue,
}

/// [`open_async`], with the target attached to the front end for [`Issuer::Queue`].
fn open_async_issued_by(f: &Files, buffer: u64, who: Issuer) -> Arc<Engine> {
    let engine = open_async(f, buffer);
    if who == Issuer::Queue {
        let t = ublk_mirror::io::target::open_file_target(&f.target, ublk_mirror::io::backing::DirectMode::Auto).expect("target");
        engine.attach_target(&t).expect("attach");
    }
    engine
}

/// The writes the queues issued, against who should have issued them: all by the loop, or
/// (queue) at least one by the queue.
fn check_issuer(engine: &Engine, who: Issuer) {
    let ship = engine.status().shipping.expect("async figures");
    match who {
        Issuer::Loop => assert_eq!(ship.issued_by_queues, 0, "a queue without the target issued writes: {ship:?}"),
        Issuer::Queue => assert!(ship.issued_by_queues > 0, "the queue issued no write itself: {ship:?}"),
    }
}

/// Writes reach the target from the buffer: nothing is copied, every byte written is shipped,
/// each flush of the device closes an epoch, and the pair ends identical.
#[test]
fn async_ships_writes_in_place_of_copies() {
    ships_writes_in_place_of_copies(Issuer::Loop);
}

#[test]
fn async_ships_writes_in_place_of_copies_from_the_queue() {
    ships_writes_in_place_of_copies(Issuer::Queue);
}

fn ships_writes_in_place_of_copies(who: Issuer) {
    let f = files(8 * MIB);
    let engine = open_async_issued_by(&f, 16 * MIB, who);
    let (mirror, mut q) = start_shipping(&engine, &f);
    for i in 0..256u64 {
        write_block(&mut q, (i * 7919) % 2048, i);
        if i % 16 == 15 {
            q.execute(Op::Flush).expect("flush");
        }
    }
    q.settle(Duration::from_secs(10)).expect("settle");
    wait_for("synced", Duration::from_secs(20), || engine.status().state == "synced");
    let s = engine.status();
    let ship = s.shipping.clone().expect("async figures");
    assert_eq!(s.bytes_copied, 0, "a region was copied instead of shipped: {s:?}");
    assert_eq!(ship.shipped_bytes, 256 * BLOCK as u64, "{ship:?}");
    assert_eq!(ship.epochs, 16, "{ship:?}");
    assert_eq!(ship.fell_behind, 0, "{ship:?}");
    assert_eq!(ship.buffer_used_bytes, 0);
    assert!(ship.buffer_peak_bytes > 0 && ship.buffer_peak_bytes <= 16 * MIB);
    // Points come at epoch boundaries (and at most one per SHIP_IDLE_GAP of 100 ms besides, when
    // the queue empties within an epoch), not after every landing: each would be a flush of the
    // pair, and one after every few writes holds the shipping back (38 to 48 points for these 16
    // epochs when landings made points due).
    let idle_points = (s.elapsed_secs / 0.1).ceil() as u64;
    assert!(s.consistent_points >= 2 && s.consistent_points <= ship.epochs + 2 + idle_points, "{s:?}");
    check_issuer(&engine, who);
    drop(q);
    engine.request_stop();
    mirror.join().expect("mirror");
    // Most epoch flushes go to the target alone and clear nothing; the pair flushes among them
    // (and the one at the stop) clear every shipped region's bit.
    assert_eq!(engine.status().persistent_dirty_regions, 0, "bits left set after an orderly stop");
    assert_eq!(read_all(&f.source), read_all(&f.target));
}

/// Discards and write-zeroes are shipped too, as zeroings in their epochs: nothing is copied,
/// they hold no buffer bytes (a discard far larger than the buffer does not make it fall
/// behind), the zeroed ranges (written before, and holding garbage on the target) read as
/// zeroes there, and the pair ends identical.
#[test]
fn discards_and_write_zeroes_are_shipped_as_zeroings() {
    let f = files(8 * MIB);
    // Garbage on the target where the source is zero (the pair is declared identical): only a
    // zeroing shipped to the target makes it equal again.
    fill_random(&f.target, 0, (8 * MIB) as usize, 7);
    fill_random(&f.source, 0, (8 * MIB) as usize, 7);
    let engine = open_async(&f, MIB);
    let (mirror, mut q) = start_shipping(&engine, &f);
    write_spread(&mut q, 64);
    // 4 MiB discarded (four times the buffer), then 1 MiB zeroed, then writes over both.
    q.execute(Op::Discard { off: 2 * MIB, len: 4 * MIB }).expect("discard");
    q.execute(Op::WriteZeroes { off: 0, len: MIB, unmap: false }).expect("write-zeroes");
    q.execute(Op::Flush).expect("flush");
    for i in 0..8u64 {
        write_block(&mut q, 512 + i * 64, 1000 + i);
    }
    q.execute(Op::Flush).expect("flush");
    wait_for("synced", Duration::from_secs(20), || engine.status().state == "synced");
    let s = engine.status();
    let ship = s.shipping.clone().expect("async figures");
    assert_eq!(s.bytes_copied, 0, "a region was copied instead of shipped: {s:?}");
    assert_eq!(ship.fell_behind, 0, "a zeroing filled the buffer: {ship:?}");
    assert_eq!(ship.shipped_writes, 64 + 2 + 8, "{ship:?}");
    assert_eq!(ship.epochs, 3, "{ship:?}");
    drop(q);
    engine.request_stop();
    mirror.join().expect("mirror");
    let (src, tgt) = (read_all(&f.source), read_all(&f.target));
    // (The writes after the discard went to 2 MiB to 3.75 MiB.)
    assert!(src[4 * MIB as usize..6 * MIB as usize].iter().all(|&b| b == 0), "the discard did not zero the source");
    assert_eq!(first_difference(&src, &tgt), None, "source and target differ");
}

/// A write-zeroes the source refuses (tmpfs has no FALLOC_FL_ZERO_RANGE) falls back to
/// punching a hole (queue.rs, zeroes_fallback), and is still shipped as a zeroing: the target's
/// range, garbage before, reads as zeroes, and nothing is copied.
#[test]
fn a_write_zeroes_that_fell_back_is_shipped_as_a_zeroing() {
    let (_shm, f) = files_with_source_on_tmpfs(4 * MIB);
    // Declared identical, and identical: the same data on both sides.
    fill_random(&f.source, 0, (4 * MIB) as usize, 11);
    fill_random(&f.target, 0, (4 * MIB) as usize, 11);
    let engine = open_async(&f, MIB);
    let (mirror, mut q) = start_shipping(&engine, &f);
    q.execute(Op::WriteZeroes { off: MIB, len: MIB, unmap: false }).expect("write-zeroes on tmpfs");
    q.execute(Op::Flush).expect("flush");
    wait_for("synced", Duration::from_secs(20), || engine.status().state == "synced");
    let s = engine.status();
    let ship = s.shipping.clone().expect("async figures");
    // (A copy of the range would zero the target: a hole on the source is copied as a zeroing.)
    assert_eq!((s.bytes_copied, s.bytes_zeroed), (0, 0), "the zeroed range was copied instead of shipped: {s:?}");
    assert_eq!((ship.shipped_writes, ship.fell_behind), (1, 0), "{ship:?}");
    drop(q);
    engine.request_stop();
    mirror.join().expect("mirror");
    let (src, tgt) = (read_all(&f.source), read_all(&f.target));
    assert!(src[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0), "the fallback did not zero the source");
    assert_eq!(first_difference(&src, &tgt), None, "source and target differ");
}

/// A fingerprint of a device image made of 4 KiB blocks that can be updated a block at a time:
/// the XOR of a hash of each block with its index.
fn block_hash(blk: u64, data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    blk.hash(&mut h);
    data.hash(&mut h);
    h.finish()
}

fn image_hash(bytes: &[u8]) -> u64 {
    bytes.chunks(BLOCK).enumerate().fold(0, |acc, (i, b)| acc ^ block_hash(i as u64, b))
}

/// At every consistent point the target is a crash image of the source (docs/crash-safety.md,
/// rule 11): for some epoch `e` (the writes between two device flushes), it holds every write
/// of the epochs before `e` and a subset of `e`'s (each block shows its content as of `e`'s
/// start or one of `e`'s writes to it), and no block ever goes back to an older write from one
/// point to the next. The loop issues the queue in order, so its points are also prefixes: the
/// source after some number of the (sequential) writes, a number that never goes back. Early
/// writes from the device's queue may pass writes of their epoch still queued for the loop, so
/// that a point made in the middle of an epoch (the loop's hold) may hold a later write
/// without an earlier one, as a disk may after a power loss. Device flushes every few writes
/// make epochs; some writes overwrite blocks written just before (rule 2 of the shipping order).
#[test]
fn every_consistent_point_is_a_past_state_of_the_source() {
    consistent_points_are_past_states(Issuer::Loop);
}

#[test]
fn every_consistent_point_is_a_past_state_of_the_source_from_the_queue() {
    consistent_points_are_past_states(Issuer::Queue);
}

fn consistent_points_are_past_states(who: Issuer) {
    const SIZE: u64 = MIB;
    const WRITES: usize = 3000;
    const EPOCH: usize = 7;
    let nblocks = (SIZE / BLOCK as u64) as usize;
    let f = files(SIZE);
    // Larger than all the writes (12 MiB): the queue never falls behind, whatever the pace.
    let engine = open_async_issued_by(&f, 16 * MIB, who);
    // Each point's target, as a fingerprint per block.
    let seen = Arc::new(Mutex::new(Vec::<Vec<u64>>::new()));
    let (s2, path) = (seen.clone(), f.target.clone());
    let mirror = spawn_loop(&engine, &f, move || TestHooks {
        at_consistent_point: Some(Box::new(move || {
            let img = std::fs::read(&path).expect("read target");
            s2.lock().unwrap().push(img.chunks(BLOCK).enumerate().map(|(i, b)| block_hash(i as u64, b)).collect());
        })),
        ..Default::default()
    });
    wait_for("shipping to start", Duration::from_secs(10), || mode(&engine) == "async");
    let points_before = seen.lock().unwrap().len();
    // The model: each block's versions (write number, fingerprint; write 0 is the zeroed
    // start), and the source after k writes, by image fingerprint.
    let zero = vec![0u8; BLOCK];
    let mut versions: Vec<Vec<(usize, u64)>> = (0..nblocks).map(|b| vec![(0, block_hash(b as u64, &zero))]).collect();
    let mut h = image_hash(&vec![0u8; SIZE as usize]);
    let mut states = std::collections::HashMap::new();
    states.insert(h, 0usize);
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    let mut x = 12345u64;
    for k in 1..=WRITES {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        // Often the block just written again, else anywhere.
        let blk = if x % 4 == 0 { (x >> 20) % 4 } else { (x >> 20) % nblocks as u64 };
        let data = write_block(&mut q, blk, x);
        let fp = block_hash(blk, &data);
        // Every block's list starts with its zeroed version: the last is its current content.
        let before = versions[blk as usize].last().expect("a block's first version").1;
        h ^= before ^ fp;
        versions[blk as usize].push((k, fp));
        states.insert(h, k);
        // Writes 1..=7 are epoch 1, 8..=14 epoch 2, ...: a FLUSH after every seventh.
        if k % EPOCH == 0 {
            q.execute(Op::Flush).expect("flush");
        }
    }
    q.settle(Duration::from_secs(10)).expect("settle");
    wait_for("synced", Duration::from_secs(60), || engine.status().state == "synced");
    drop(q);
    engine.request_stop();
    mirror.join().expect("mirror");
    let seen = seen.lock().unwrap().clone();
    let points = &seen[points_before..];
    assert!(points.len() >= 5, "only {} consistent points while shipping", points.len());
    // The write a block shows (its number), if the block holds one of its versions.
    let shown = |b: usize, fp: u64| versions[b].iter().find(|v| v.1 == fp).map(|v| v.0);
    let epoch_of = |k: usize| k.div_ceil(EPOCH);
    let mut last_shown = vec![0usize; nblocks];
    let (mut last_prefix, mut mid_epoch) = (0, 0);
    for (i, p) in points.iter().enumerate() {
        let ks: Vec<usize> = (0..nblocks)
            .map(|b| shown(b, p[b]).unwrap_or_else(|| panic!("consistent point {i}: block {b} holds data never written to it")))
            .collect();
        // The epoch e: the latest whose write a block shows; every block then shows its last
        // write before e or a write of e.
        let e = ks.iter().map(|&k| epoch_of(k)).max().unwrap_or(0);
        let start = e.saturating_sub(1) * EPOCH;
        for (b, &k) in ks.iter().enumerate() {
            let base = versions[b].iter().rev().find(|v| v.0 <= start).map_or(0, |v| v.0);
            assert!(k >= base, "consistent point {i}: block {b} shows write {k}, older than write {base} of an epoch before {e}: not a crash image");
            assert!(k >= last_shown[b], "consistent point {i}: block {b} went back from write {} to {k}", last_shown[b]);
        }
        last_shown = ks;
        let img = p.iter().fold(0, |acc, &fp| acc ^ fp);
        match states.get(&img) {
            Some(&k) => {
                assert!(k >= last_prefix, "consistent point {i}: the target went back from write {last_prefix} to {k}");
                last_prefix = k;
            }
            None => {
                assert!(matches!(who, Issuer::Queue), "consistent point {i}: the loop issued out of order (no past state of the source)");
                mid_epoch += 1;
            }
        }
    }
    assert_eq!(last_shown, (0..nblocks).map(|b| versions[b].last().map_or(0, |v| v.0)).collect::<Vec<_>>(), "the last consistent point holds every write");
    eprintln!("{} consistent points, {mid_epoch} of them a subset of an epoch rather than a prefix", points.len());
    assert_eq!(read_all(&f.source), read_all(&f.target));
    let s = engine.status();
    assert_eq!(s.bytes_copied, 0, "{s:?}");
    check_issuer(&engine, who);
}

/// A buffer too small for the writes made while the mirror is paused falls behind (the
/// background copy takes the regions), and shipping resumes once the copy has caught up.
#[test]
fn a_full_buffer_falls_behind_and_resumes() {
    full_buffer_falls_behind_and_resumes(Issuer::Loop);
}

/// As above with the target attached: a paused mirror holds the queue's shipping too.
#[test]
fn a_full_buffer_falls_behind_and_resumes_from_the_queue() {
    full_buffer_falls_behind_and_resumes(Issuer::Queue);
}

fn full_buffer_falls_behind_and_resumes(who: Issuer) {
    let f = files(8 * MIB);
    let engine = open_async_issued_by(&f, 64 << 10, who);
    let (mirror, mut q) = start_shipping(&engine, &f);
    engine.apply_settings(&Settings { paused: true, ..async_settings(64 << 10) });
    for i in 0..32u64 {
        write_block(&mut q, i * 16, i);
    }
    let s = engine.status();
    assert_eq!(s.mode, "async (behind)", "{s:?}");
    let ship = s.shipping.clone().expect("async figures");
    assert_eq!(ship.behind_reason, Some("buffer-full"));
    assert_eq!(ship.fell_behind, 1);
    assert_eq!(ship.buffer_used_bytes, 0, "the queue was handed back to the bitmap");
    assert!(s.dirty_bytes > 0);
    engine.apply_settings(&async_settings(64 << 10));
    wait_for("shipping to resume", Duration::from_secs(20), || mode(&engine) == "async");
    wait_for("synced", Duration::from_secs(20), || engine.status().state == "synced");
    let s = engine.status();
    assert!(s.bytes_copied > 0, "the background copy took the regions: {s:?}");
    assert_eq!(s.shipping.clone().map(|x| x.resumed), Some(2), "{s:?}");
    // Shipping again: a new write is shipped, not copied.
    let copied = s.bytes_copied;
    write_block(&mut q, 5, 99);
    q.settle(Duration::from_secs(10)).expect("settle");
    wait_for("synced", Duration::from_secs(20), || engine.status().state == "synced");
    assert_eq!(engine.status().bytes_copied, copied);
    check_issuer(&engine, who);
    drop(q);
    engine.request_stop();
    mirror.join().expect("mirror");
    assert_eq!(read_all(&f.source), read_all(&f.target));
    let ev: Vec<String> = engine.events().recent().iter().map(|e| e.to_string()).collect();
    let has = |what: &str| ev.iter().any(|e| e.contains(what));
    assert!(has("\"async-behind\"") && has("buffer-full") && has("\"async-resumed\""), "{ev:?}");
}

/// An --on-consistent command sees the target hold still in async mode too: a write made while
/// it runs stays queued (not shipped) until it has ended, and its snapshot is the image of its
/// consistent point.
#[test]
fn shipping_waits_for_the_on_consistent_command() {
    shipping_waits_for_the_command(Issuer::Loop);
}

/// As above with the target attached: the queue does not ship while the command runs either.
#[test]
fn shipping_waits_for_the_on_consistent_command_from_the_queue() {
    shipping_waits_for_the_command(Issuer::Queue);
}

fn shipping_waits_for_the_command(who: Issuer) {
    let f = files(4 * MIB);
    let dir = tempfile::tempdir_in("/var/tmp").expect("dir");
    let snap = dir.path().join("snap");
    // While this file exists a run of the command holds on (at most 20 s).
    let hold = dir.path().join("hold");
    let engine = open_async_issued_by(&f, 16 * MIB, who);
    let hook = ublk_mirror::engine::OnConsistentCommand {
        command: format!(
            "cp \"$UBLK_MIRROR_TARGET\" {s}.tmp && mv {s}.tmp {s} && \
             i=0; while [ -e {h} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done",
            s = snap.display(),
            h = hold.display()
        ),
        interval: Duration::ZERO,
        timeout: Duration::from_secs(20),
        env: vec![("UBLK_MIRROR_TARGET".into(), f.target.display().to_string())],
    };
    let t = ublk_mirror::io::target::open_file_target(&f.target, ublk_mirror::io::backing::DirectMode::Auto).expect("target");
    let mirror = common::spawn_loop(&engine, Box::new(t), CopyConfig { on_consistent: Some(hook), ..Default::default() });
    wait_for("shipping to start", Duration::from_secs(10), || mode(&engine) == "async");
    wait_for("the first run to end", Duration::from_secs(20), || snap.exists() && !engine.hook_running());
    std::fs::remove_file(&snap).expect("rm");
    std::fs::write(&hold, b"").expect("hold");
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    let a = write_block(&mut q, 256, 0x41);
    q.settle(Duration::from_secs(10)).expect("settle");
    wait_for("a run after A", Duration::from_secs(20), || snap.exists());
    assert!(engine.hook_running());
    let shipped = engine.status().shipping.expect("async").shipped_bytes;
    let b = write_block(&mut q, 512, 0x42);
    wait_loop_pass(&engine, "a mirror loop pass after B", std::time::Instant::now(), 0, Duration::from_secs(20));
    let st = engine.status();
    let ship = st.shipping.clone().expect("async");
    assert!(engine.hook_running(), "the command ended early: {st:?}");
    assert_eq!(ship.shipped_bytes, shipped, "shipped while the command ran: {st:?}");
    assert_eq!(ship.queued_writes, 1, "{st:?}");
    let image = read_all(&snap);
    assert_eq!(&image[256 * BLOCK..257 * BLOCK], &a[..], "the snapshot lacks A");
    assert!(image[512 * BLOCK..513 * BLOCK].iter().all(|&x| x == 0), "the snapshot has B");
    std::fs::remove_file(&hold).expect("rm hold");
    wait_for("synced after the command", Duration::from_secs(20), || engine.status().state == "synced");
    assert_eq!(&read_all(&f.target)[512 * BLOCK..513 * BLOCK], &b[..]);
    assert_eq!(engine.status().bytes_copied, 0);
    engine.request_stop();
    mirror.join().expect("mirror");
    drop(q);
}

/// A target write the queue issued itself fails (the descriptor the front end was given
/// refuses writes: the target opened read-only): the queue falls behind, the failure is handled
/// as the loop's own would be (counted, `degraded` and `async-behind` events), the background
/// copy takes the regions, and no application write fails.
#[test]
fn a_failed_target_write_from_the_queue_falls_behind_to_the_copy() {
    use ublk_mirror::io::backing::{Backing, DirectMode};
    let f = files(8 * MIB);
    let engine = open_async(&f, 16 * MIB);
    let ro = Backing::open(&f.target, "target", false, DirectMode::Auto).expect("the target, read-only");
    engine.attach_target(&ublk_mirror::io::target::FileTarget::new(ro)).expect("attach");
    let (mirror, mut q) = start_shipping(&engine, &f);
    write_spread(&mut q, 64);
    q.settle(Duration::from_secs(10)).expect("settle");
    wait_for("the failed write to make the queue fall behind", Duration::from_secs(10), || {
        engine.status().shipping.is_some_and(|s| s.fell_behind >= 1)
    });
    wait_for("synced", Duration::from_secs(30), || engine.status().state == "synced");
    let s = engine.status();
    let ship = s.shipping.clone().expect("async figures");
    assert!(ship.issued_by_queues > 0, "{ship:?}");
    assert!(s.bytes_copied > 0, "the background copy did not take the regions: {s:?}");
    let ev: Vec<String> = engine.events().recent().iter().map(|e| e.to_string()).collect();
    let has = |what: &str| ev.iter().any(|e| e.contains(what));
    assert!(has("\"async-behind\"") && has("target-failed"), "{ev:?}");
    assert!(ev.iter().any(|e| e.contains("\"degraded\"") && e.contains("shipped write")), "the failure was not handled by the loop: {ev:?}");
    drop(q);
    engine.request_stop();
    mirror.join().expect("mirror");
    assert_eq!(read_all(&f.source), read_all(&f.target));
}

/// A sink that only records what was pushed (owner, slot): the test completes the operations
/// itself, in the order it chooses, with the results it chooses. Nothing reaches the kernel.
#[derive(Default)]
struct Recorder(Vec<(ublk_mirror::io::uring::Owner, u16)>);

impl ublk_mirror::engine::queue::Sink for Recorder {
    unsafe fn push(&mut self, _: io_uring::squeue::Entry, owner: ublk_mirror::io::uring::Owner, slot: u16) -> std::io::Result<()> {
        self.0.push((owner, slot));
        Ok(())
    }
}

impl Recorder {
    fn take(&mut self, owner: ublk_mirror::io::uring::Owner) -> Option<u16> {
        let i = self.0.iter().position(|&(o, _)| o == owner)?;
        Some(self.0.remove(i).1)
    }
}

/// The queue reports an early write's two halves to the engine together, when the second
/// completes, whichever it is: until then the write is in flight for the engine (no point, no
/// landing), though the application's write completes with its source half; a failed target
/// half makes the queue fall behind in either order. And no target write goes before its
/// intent is durable, whether the engine lets it go early when it begins (its intent durable
/// already) or once its intent's bitmap flush completed.
#[test]
fn an_early_write_is_reported_when_both_halves_completed_in_either_order() {
    use ublk_mirror::io::uring::Owner;
    for (source_first, target_ok) in [(true, true), (true, false), (false, true), (false, false)] {
        let case = format!("source first: {source_first}, target ok: {target_ok}");
        let f = files(8 * MIB);
        let (engine, mirror, mut q, mut sink) = start_recorded(&f);
        // Two writes in extents of the bitmap (4 MiB) whose bits are clean: each waits for its
        // intent. The first goes early when it is issued, the second (the queue has seen
        // shipping) is copied before it begins.
        for (tag, off) in [(1, 0), (2, 6 * MIB)] {
            q.submit(&mut sink, tag, Op::Write { off, data: block_data(tag), len: BLOCK as u32, fua: false });
            let bm = sink.take(Owner::Bitmap).unwrap_or_else(|| panic!("{case}: write {tag} did not wait for its intent"));
            assert!(sink.take(Owner::Ship).is_none(), "{case}: write {tag} went to the target before its intent was durable");
            q.complete(&mut sink, Owner::Bitmap, bm, 0);
            let src = sink.take(Owner::Front).expect("the source write");
            let tgt = sink.take(Owner::Ship).unwrap_or_else(|| panic!("{case}: write {tag} did not go early"));
            q.complete(&mut sink, Owner::Front, src, BLOCK as i32);
            q.complete(&mut sink, Owner::Ship, tgt, BLOCK as i32);
            assert_eq!(q.completions().count(), 1);
        }
        // The write under test: in the first's extent, whose bits are durable: it begins and
        // goes early in one question to the engine.
        q.submit(&mut sink, 7, Op::Write { off: 16 * BLOCK as u64, data: block_data(7), len: BLOCK as u32, fua: false });
        assert!(sink.take(Owner::Bitmap).is_none(), "{case}: the intent was not durable already");
        let src = sink.take(Owner::Front).expect("the source write");
        let tgt = sink.take(Owner::Ship).unwrap_or_else(|| panic!("{case}: the write did not go early: {:?}", engine.status().shipping));
        let tgt_res = if target_ok { BLOCK as i32 } else { -libc::EIO };
        let halves = [(Owner::Front, src, BLOCK as i32), (Owner::Ship, tgt, tgt_res)];
        let (first, second) = if source_first { (halves[0], halves[1]) } else { (halves[1], halves[0]) };
        q.complete(&mut sink, first.0, first.1, first.2);
        let done: Vec<_> = q.completions().map(|c| (c.tag, c.result.ok())).collect();
        assert_eq!(done, if source_first { vec![(7, Some(BLOCK as u32))] } else { vec![] }, "{case}");
        let s = engine.status();
        let ship = s.shipping.clone().expect("async figures");
        assert_eq!((s.active_writes, ship.in_flight_writes, ship.fell_behind), (1, 1, 0), "{case}: reported after one half: {s:?}");
        q.complete(&mut sink, second.0, second.1, second.2);
        if !source_first {
            let done: Vec<_> = q.completions().map(|c| (c.tag, c.result.ok())).collect();
            assert_eq!(done, vec![(7, Some(BLOCK as u32))], "{case}");
        }
        let s = engine.status();
        let ship = s.shipping.clone().expect("async figures");
        assert_eq!((s.active_writes, ship.in_flight_writes), (0, 0), "{case}: not reported after both halves: {s:?}");
        assert_eq!(ship.fell_behind, u64::from(!target_ok), "{case}: {ship:?}");
        assert_eq!(q.in_flight(), 0, "{case}");
        engine.request_stop();
        mirror.join().expect("mirror");
    }
}

/// A write that rewrites the block of an early write whose source half completed while its
/// target half is still in flight (an application appending to a log rewrites its last block
/// as soon as the previous write completes) is shipped as usual: the queue reports the source
/// half before the rewrite begins, so the rewrite does not find it in flight on the source (an
/// overlap would end both as ordinary writes, their regions copied).
#[test]
fn a_rewrite_after_the_source_half_completed_is_shipped() {
    use ublk_mirror::io::uring::Owner;
    let f = files(8 * MIB);
    let (engine, mirror, mut q, mut sink) = start_recorded(&f);
    let off = 16 * BLOCK as u64;
    q.submit(&mut sink, 1, Op::Write { off, data: block_data(1), len: BLOCK as u32, fua: false });
    if let Some(bm) = sink.take(Owner::Bitmap) {
        q.complete(&mut sink, Owner::Bitmap, bm, 0);
    }
    let src = sink.take(Owner::Front).expect("the source write");
    let tgt = sink.take(Owner::Ship).unwrap_or_else(|| panic!("the write did not go early: {:?}", engine.status().shipping));
    q.complete(&mut sink, Owner::Front, src, BLOCK as i32);
    assert_eq!(q.completions().count(), 1, "the write completes with its source half");
    // The rewrite, while the first write's target half is in flight.
    q.submit(&mut sink, 2, Op::Write { off, data: block_data(2), len: BLOCK as u32, fua: false });
    let s = engine.status();
    assert_eq!(s.active_writes, 2, "the rewrite was not planned for shipping (or the first write ended): {s:?}");
    let src2 = sink.take(Owner::Front).expect("the rewrite's source write");
    q.complete(&mut sink, Owner::Front, src2, BLOCK as i32);
    q.complete(&mut sink, Owner::Ship, tgt, BLOCK as i32);
    assert_eq!(q.completions().count(), 1);
    assert_eq!(q.in_flight(), 0);
    // The loop ships the rewrite (it overlapped the first write's target half in flight, so it
    // did not go early), and nothing is copied.
    wait_for("synced", Duration::from_secs(30), || engine.status().state == "synced");
    let s = engine.status();
    assert_eq!(s.bytes_copied, 0, "the writes were copied, not shipped: {s:?}");
    assert_eq!(s.shipping.as_ref().map(|x| x.shipped_writes), Some(2), "{s:?}");
    engine.request_stop();
    mirror.join().expect("mirror");
}
