//! The NBD target against real servers on loopback (qemu-nbd over TCP and a Unix socket, nbdkit
//! with the file and memory plugins and with filters) and against a fake hostile server
//! written here. Every wait is bounded. qemu-nbd and nbdkit must be installed
//! (scripts/deps.sh): these tests fail, never skip, without them.

mod common;
mod nbd_support;
use nbd_support::*;
use common::*;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_mirror::io::backing::{AlignedBuf, DirectMode};
use ublk_mirror::engine::{CopyConfig, Engine, PairOptions, SyncMode};
use ublk_mirror::engine::mirror::TestHooks;
use ublk_mirror::io::nbd::{tls::TlsFiles, NbdTarget};
use ublk_mirror::engine::queue::{EngineQueue, Op};
use ublk_mirror::offline::{self, VerifyOptions};
use ublk_mirror::io::target::{Target, TargetOp};
use ublk_mirror::io::uring;

// ---------------------------------------------------------------------------------------------
// Real servers

fn sync_and_check(f: &Files, uri: &str, size: u64) -> offline::SyncReport {
    let r = sync_bounded(&pair(f, uri), &CopyConfig::default(), TestHooks::default(), LIMIT).expect("sync");
    assert_eq!(r.bytes_copied + r.bytes_zeroed, size, "every byte is copied or zeroed");
    let v = verify(f, uri);
    assert!(v.identical(), "verify: {:?}", v.differing);
    assert_eq!(v.bytes_compared, size);
    r
}

#[test]
fn sync_to_qemu_nbd_over_tcp_and_unix() {
    const SIZE: u64 = 32 * MIB;
    for t in [Transport::Tcp, Transport::Unix] {
        let f = sparse_pair(SIZE, 1);
        let mut srv = Server::qemu(f.dir.path(), &f.target, t, &[]);
        let r = sync_and_check(&f, &srv.uri, SIZE);
        // Holes are not copied: they are zeroed on the target (the garbage there is gone).
        assert!(r.bytes_copied <= 4 * MIB, "{t:?}: copied {} bytes for 3.25 MiB of data", r.bytes_copied);
        assert!(r.bytes_zeroed >= 28 * MIB, "{t:?}: zeroed {}", r.bytes_zeroed);
        srv.kill(); // qemu-nbd flushed on our FLUSH; the file behind it is complete.
        assert_same_files(&f.source, &f.target);
        // A second sync, the server restarted at the same place, finds nothing to do.
        srv.start();
        let r = sync_bounded(&pair(&f, &srv.uri), &CopyConfig::default(), TestHooks::default(), LIMIT).expect("resync");
        assert_eq!((r.bytes_copied, r.bytes_zeroed), (0, 0));
    }
}

#[test]
fn sync_to_nbdkit_file_and_memory() {
    const SIZE: u64 = 16 * MIB;
    // The file plugin over a Unix socket: the file behind it must equal the source.
    let f = sparse_pair(SIZE, 2);
    let tgt = f.target.display().to_string();
    let srv = Server::nbdkit(f.dir.path(), Transport::Unix, &["file", &tgt]);
    sync_and_check(&f, &srv.uri, SIZE);
    drop(srv);
    assert_same_files(&f.source, &f.target);
    // The memory plugin over TCP, larger than the source: verify reads it back.
    let f = sparse_pair(SIZE, 3);
    let srv = Server::nbdkit(f.dir.path(), Transport::Tcp, &["memory", "32M"]);
    sync_and_check(&f, &srv.uri, SIZE);
}

/// A server without WRITE_ZEROES (nbdkit's nozero filter): holes are zeroed by writing zeroes.
/// A server with block size constraints (nbdkit's blocksize-policy filter, which fails every
/// request that breaks them): writes are split to the maximum payload.
#[test]
fn nbdkit_without_write_zeroes_and_with_block_size_constraints() {
    const SIZE: u64 = 16 * MIB;
    let f = sparse_pair(SIZE, 4);
    let tgt = f.target.display().to_string();
    let srv = Server::nbdkit(
        f.dir.path(),
        Transport::Unix,
        &[
            "--filter=nozero",
            "--filter=blocksize-policy",
            "file",
            &tgt,
            "blocksize-error-policy=error",
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
        ],
    );
    let t = NbdTarget::open(&srv.uri, &TlsFiles::default()).expect("open");
    assert_eq!(t.export().min_block, 4096);
    assert_eq!(t.export().max_payload, 65536);
    assert_eq!(t.block_size(), 4096);
    drop(t);
    let r = sync_and_check(&f, &srv.uri, SIZE);
    assert!(r.bytes_zeroed > 0);
    drop(srv);
    assert_same_files(&f.source, &f.target);
    // The request log of nbdkit would show it; the blocksize-policy filter with the error policy
    // already failed any request over 64 KiB or unaligned.
}

/// A server whose minimum block size the copies could not respect (it divides neither the
/// granularity, nor the source's size, nor the copy buffer) is refused when the pair is opened,
/// with what to change, instead of failing every copy that breaks it for ever.
#[test]
fn a_minimum_block_size_the_copies_cannot_respect_is_refused_at_open() {
    const SIZE: u64 = 16 * MIB;
    let serve = |f: &Files, min: u32| {
        let tgt = f.target.display().to_string();
        let min = format!("blocksize-minimum={min}");
        Server::nbdkit(
            f.dir.path(),
            Transport::Unix,
            &["--filter=blocksize-policy", "file", &tgt, "blocksize-error-policy=error", &min, "blocksize-preferred=65536", "blocksize-maximum=1048576"],
        )
    };
    let check = |msg: String, what: &str| {
        assert!(msg.contains("minimum block size") && msg.contains(what), "{msg}");
    };
    let refused_at_open = |p: &PairOptions, what: &str| match Engine::open(p) {
        Ok(_) => panic!("opened: {what}"),
        Err(e) => {
            check(e.to_string(), what);
            assert!(!p.bitmap.exists(), "a bitmap was created for a refused pair");
        }
    };
    // 4 KiB regions, 64 KiB blocks.
    let f = sparse_pair(SIZE, 5);
    let srv = serve(&f, 65536);
    let mut p = pair(&f, &srv.uri);
    p.granularity = Some(4096);
    refused_at_open(&p, "--granularity 64K");
    // 4 KiB copy buffers, 64 KiB blocks (the granularity is fine): refused as the copy starts.
    p.granularity = None;
    let cfg = CopyConfig { buf_size: 4096, ..CopyConfig::default() };
    match sync_bounded(&p, &cfg, TestHooks::default(), LIMIT) {
        Ok(_) => panic!("synced with 4 KiB buffers"),
        Err(e) => check(e.to_string(), "--buffer 64K"),
    }
    // With 64 KiB regions and buffers it syncs, the source's 4 KiB holes and data rounded out
    // to whole 64 KiB blocks.
    sync_bounded(&p, &CopyConfig::default(), TestHooks::default(), LIMIT).expect("sync with 64 KiB blocks");
    assert!(verify(&f, &srv.uri).identical());
    drop(srv);
    assert_same_files(&f.source, &f.target);
    // A source that ends 512 bytes into a 4 KiB block: its last copy could never be written.
    let f = sparse_pair(SIZE, 6);
    std::fs::OpenOptions::new().write(true).open(&f.source).and_then(|s| s.set_len(SIZE + 512)).expect("grow source");
    std::fs::OpenOptions::new().write(true).open(&f.target).and_then(|t| t.set_len(2 * SIZE)).expect("grow target");
    let srv = serve(&f, 4096);
    refused_at_open(&pair(&f, &srv.uri), "not a multiple of 4096");
    drop(srv);
}

#[test]
fn resync_after_changes_copies_only_dirty_regions() {
    const SIZE: u64 = 32 * MIB;
    let f = files(SIZE);
    fill_random(&f.source, 0, SIZE as usize, 11);
    let srv = Server::qemu(f.dir.path(), &f.target, Transport::Tcp, &[]);
    let p = pair(&f, &srv.uri);
    sync_bounded(&p, &CopyConfig::default(), TestHooks::default(), LIMIT).expect("full sync");
    // Writes through the engine, as the device makes them: they set the bits.
    let (engine, target, open) = Engine::open(&p).expect("reopen");
    assert_eq!(open.dirty_regions, 0);
    write_regions_and_close(engine, G, &[3, 4, 100, 400]);
    drop(target);
    let v = verify(&f, &srv.uri);
    assert_eq!(v.differing, vec![(3, 2), (100, 1), (400, 1)]);
    assert!(v.differing_clean.is_empty(), "written regions are marked dirty");
    let r = sync_bounded(&p, &CopyConfig::default(), TestHooks::default(), LIMIT).expect("resync");
    assert_eq!(r.bytes_copied, 4 * G, "only the dirty regions are copied");
    assert!(verify(&f, &srv.uri).identical());
    drop(srv);
    assert_same_files(&f.source, &f.target);
}

#[test]
fn export_smaller_than_source_is_refused() {
    let f = files(32 * MIB);
    std::fs::File::options().write(true).open(&f.target).and_then(|t| t.set_len(16 * MIB)).expect("shrink");
    let srv = Server::qemu(f.dir.path(), &f.target, Transport::Unix, &[]);
    let e = sync_bounded(&pair(&f, &srv.uri), &CopyConfig::default(), TestHooks::default(), LIMIT)
        .expect_err("a smaller export must be refused")
        .to_string();
    assert!(e.contains("smaller than the source") && e.contains("nbd+unix:///exp?socket="), "{e}");
    assert!(e.contains(&format!("{}", 16 * MIB)), "{e}");
    assert!(!f.bitmap.exists(), "nothing is created");
}

#[test]
fn read_only_export_is_refused() {
    let f = files(8 * MIB);
    let srv = Server::qemu(f.dir.path(), &f.target, Transport::Tcp, &["-r"]);
    let e = sync_bounded(&pair(&f, &srv.uri), &CopyConfig::default(), TestHooks::default(), LIMIT)
        .expect_err("a read-only export must be refused")
        .to_string();
    assert!(e.contains("read-only") && e.contains(&srv.uri), "{e}");
    assert!(!f.bitmap.exists(), "nothing is created");
}

#[test]
fn unreachable_server_and_unknown_export_fail_clearly() {
    let f = files(MIB);
    let port = free_port();
    let uri = format!("nbd://127.0.0.1:{port}/x");
    let e = offline::sync(&pair(&f, &uri), &CopyConfig::default(), TestHooks::default(), None).expect_err("no server");
    let e = e.to_string();
    assert!(e.contains("cannot connect") && e.contains(&format!("127.0.0.1:{port}")), "{e}");
    let srv = Server::qemu(f.dir.path(), &f.target, Transport::Unix, &[]);
    let other = srv.uri.replace("/exp?", "/nosuch?");
    let e = offline::sync(&pair(&f, &other), &CopyConfig::default(), TestHooks::default(), None).expect_err("no export");
    assert!(e.to_string().contains("\"nosuch\""), "{e}");
    let e = offline::sync(&pair(&f, "nbd://h:99999/x"), &CopyConfig::default(), TestHooks::default(), None).expect_err("bad uri");
    assert!(e.to_string().contains("bad port"), "{e}");
    assert!(!f.bitmap.exists());
}

/// Kills the server from the mirror's thread after `after` copies were read.
fn kill_hook(pid: u32, after: usize) -> TestHooks {
    let mut n = 0;
    TestHooks {
        after_read: Some(Box::new(move |_| {
            n += 1;
            if n == after {
                // SIGKILL: the server vanishes without a goodbye, as in a crash.
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        })),
        ..Default::default()
    }
}

/// The server dies in the middle of a resync: the sync fails with an error naming the server;
/// once it is back, the next sync copies what was dirty (not everything) and the pair is
/// identical.
#[test]
fn server_killed_during_resync_then_resume() {
    const SIZE: u64 = 32 * MIB;
    let f = files(SIZE);
    fill_random(&f.source, 0, SIZE as usize, 21);
    let mut srv = Server::qemu(f.dir.path(), &f.target, Transport::Unix, &[]);
    let p = pair(&f, &srv.uri);
    sync_bounded(&p, &CopyConfig::default(), TestHooks::default(), LIMIT).expect("full sync");
    // Dirty 128 scattered regions (8 MiB of the 32).
    let (engine, target, _) = Engine::open(&p).expect("reopen");
    let engine = Arc::new(engine);
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    for i in 0..128u64 {
        let mut data = AlignedBuf::new(G as usize);
        data.fill(i as u8 ^ 0x5a);
        q.execute(Op::Write { off: i * 4 * G, data, len: G as u32, fua: false }).expect("write");
    }
    drop(q);
    engine.close().expect("close");
    drop((engine, target));
    let cfg = CopyConfig { max_copies: 4, buf_size: G as usize, ..Default::default() };
    let e = sync_bounded(&p, &cfg, kill_hook(srv.pid().expect("pid"), 10), LIMIT)
        .expect_err("the server died: the sync must fail")
        .to_string();
    assert!(e.contains(&format!("NBD server {}", srv.uri)), "the error names the server: {e}");
    srv.kill();
    srv.start();
    let r = sync_bounded(&p, &cfg, TestHooks::default(), LIMIT).expect("resume");
    assert_eq!(r.open.mode, SyncMode::Resume);
    assert!(r.bytes_copied <= 128 * G && r.bytes_copied > 0, "copied {}", r.bytes_copied);
    assert!(r.bytes_copied < SIZE);
    assert!(verify(&f, &srv.uri).identical());
    drop(srv);
    assert_same_files(&f.source, &f.target);
}

/// Opens `p` in async mode with a replication buffer of `buffer` bytes, runs its mirror loop on
/// a thread, and waits for shipping to start. Returns the engine, the loop's thread and the
/// target's block size.
fn start_async_mirror(p: &PairOptions, buffer: u64) -> (Arc<Engine>, std::thread::JoinHandle<()>, u32) {
    use ublk_mirror::engine::mirror::{Mirror, RunUntil};
    use ublk_mirror::engine::{CopyMode, Settings};
    let (engine, mut target, _) = Engine::open(p).expect("reopen");
    let block = target.block_size();
    let engine = Arc::new(engine);
    engine.apply_settings(&Settings { mode: Some(CopyMode::Async), async_buffer: buffer, ..Default::default() });
    let e2 = engine.clone();
    let mirror = std::thread::spawn(move || {
        let cfg = CopyConfig { max_copies: 8, buf_size: G as usize, ..Default::default() };
        let mut m = Mirror::new(e2, target.as_mut(), cfg).expect("mirror");
        m.run(RunUntil::Stopped, None).expect("run");
    });
    wait_for("shipping", LIMIT, || engine.status().mode == "async");
    (engine, mirror, block)
}

/// Stops the loop [`start_async_mirror`] started and closes the engine.
fn stop_async_mirror(engine: Arc<Engine>, mirror: std::thread::JoinHandle<()>) {
    engine.request_stop();
    mirror.join().expect("mirror");
    engine.close().expect("close");
}

/// Async mode over NBD: the writes reach the export from the replication buffer (pipelined,
/// FLUSH only at epoch boundaries), nothing is copied, and the export ends identical.
#[test]
fn async_mode_ships_writes_to_an_nbd_export() {
    const SIZE: u64 = 16 * MIB;
    let f = files(SIZE);
    fill_random(&f.source, 0, SIZE as usize, 31);
    let srv = Server::qemu(f.dir.path(), &f.target, Transport::Unix, &[]);
    let p = pair(&f, &srv.uri);
    sync_bounded(&p, &CopyConfig::default(), TestHooks::default(), LIMIT).expect("full sync");
    let (engine, mirror, _) = start_async_mirror(&p, 16 * MIB);
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    for i in 0..256u64 {
        let mut data = AlignedBuf::new(4096);
        data.fill((i as u8) ^ 0xa5);
        q.execute(Op::Write { off: (i * 7919 % 4096) * 4096, data, len: 4096, fua: i % 32 == 31 }).expect("write");
        if i % 16 == 15 {
            q.execute(Op::Flush).expect("flush");
        }
    }
    wait_for("synced", LIMIT, || engine.status().state == "synced");
    let s = engine.status();
    let ship = s.shipping.clone().expect("async figures");
    assert_eq!(s.bytes_copied, 0, "copied instead of shipped: {s:?}");
    assert_eq!(ship.shipped_bytes, 256 * 4096, "{ship:?}");
    assert_eq!(ship.epochs, 16, "a flush or a FUA write closes an epoch: {ship:?}");
    drop(q);
    stop_async_mirror(engine, mirror);
    assert!(verify(&f, &srv.uri).identical());
    drop(srv);
    assert_same_files(&f.source, &f.target);
}

/// Async mode to an export with a 4 KiB minimum block size, under a device whose blocks are
/// smaller: a 512-byte write cannot be shipped (the server would refuse it, failing the queue),
/// so it goes to the copy; aligned writes are shipped; the queue never falls behind and the
/// pair ends identical.
#[test]
fn async_mode_leaves_writes_the_target_cannot_take_to_the_copy() {
    const SIZE: u64 = 8 * MIB;
    let f = files(SIZE);
    fill_random(&f.source, 0, SIZE as usize, 33);
    let tgt = f.target.display().to_string();
    let args = ["--filter=blocksize-policy", "file", tgt.as_str(), "blocksize-error-policy=error", "blocksize-minimum=4096", "blocksize-preferred=65536"];
    let srv = Server::nbdkit(f.dir.path(), Transport::Unix, &args);
    let p = pair(&f, &srv.uri);
    sync_bounded(&p, &CopyConfig::default(), TestHooks::default(), LIMIT).expect("full sync");
    let (engine, mirror, block) = start_async_mirror(&p, 4 * MIB);
    assert_eq!(block, 4096);
    let mut q = EngineQueue::new(engine.clone(), 8).expect("queue");
    for i in 0..16u64 {
        let mut data = AlignedBuf::new(4096);
        data.fill(i as u8 ^ 0x77);
        // Every other write is 512 bytes at a 512-byte offset inside a 4 KiB block.
        let (off, len) = if i % 2 == 0 { (i * 65536, 4096) } else { (i * 65536 + 512, 512) };
        q.execute(Op::Write { off, data, len, fua: false }).expect("write");
        q.execute(Op::Flush).expect("flush");
    }
    wait_for("synced", LIMIT, || engine.status().state == "synced");
    let s = engine.status();
    let ship = s.shipping.clone().expect("async figures");
    assert_eq!(ship.fell_behind, 0, "a write the target refuses was shipped: {s:?}");
    assert_eq!(ship.shipped_writes, 8, "{ship:?}");
    assert!(s.bytes_copied >= 8 * 4096, "the unaligned writes' regions were not copied: {s:?}");
    drop(q);
    stop_async_mirror(engine, mirror);
    drop(srv);
    assert_same_files(&f.source, &f.target);
}

/// The server dies in the middle of the initial full sync. An NBD target publishes its flushes
/// (flush_publishes), so the mirror makes no checkpoint flushes and no bit was cleared: the
/// next sync copies everything again, and completes.
#[test]
fn server_killed_during_full_sync_then_rerun() {
    const SIZE: u64 = 32 * MIB;
    let f = files(SIZE);
    fill_random(&f.source, 0, SIZE as usize, 22);
    let mut srv = Server::qemu(f.dir.path(), &f.target, Transport::Tcp, &[]);
    let p = pair(&f, &srv.uri);
    let cfg = CopyConfig { max_copies: 4, buf_size: 256 << 10, ..Default::default() };
    let e = sync_bounded(&p, &cfg, kill_hook(srv.pid().expect("pid"), 20), LIMIT)
        .expect_err("the server died: the sync must fail")
        .to_string();
    assert!(e.contains(&srv.uri), "the error names the server: {e}");
    srv.kill();
    srv.start();
    let r = sync_bounded(&p, &cfg, TestHooks::default(), LIMIT).expect("rerun");
    assert_eq!(r.open.mode, SyncMode::Resume);
    assert_eq!(r.bytes_copied, SIZE, "no checkpoint to an NBD target: everything is copied again");
    assert!(verify(&f, &srv.uri).identical());
}

/// reset(): nothing to do on a working connection; Err (quickly) while the server is down;
/// reconnects once it is back; refuses an export whose size changed.
#[test]
fn reset_reconnects_and_checks_the_export() {
    let f = files(8 * MIB);
    let mut srv = Server::qemu(f.dir.path(), &f.target, Transport::Unix, &[]);
    let mut d = Driver::new(NbdTarget::open(&srv.uri, &TlsFiles::default()).expect("open"));
    let data = vec![7u8; 256 << 10];
    let r = d.run(&[write(MIB, &data), TargetOp::Flush], LIMIT);
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");
    d.t.reset().expect("reset on a working connection");

    srv.kill();
    let r = d.run(&[write(0, &data)], LIMIT);
    let e = err_text(&r[0]);
    assert!(e.contains(&srv.uri), "{e}");
    assert!(d.t.broken().is_some());
    // While broken, operations fail at once.
    let r = d.run(&[TargetOp::Flush], LIMIT);
    assert!(err_text(&r[0]).contains("NBD server"));
    let t0 = Instant::now();
    let e = d.t.reset().expect_err("the server is down");
    // RESET_TIMEOUT (1 s) plus room for a loaded machine; blocking on the dead server would
    // take OPEN_TIMEOUT (10 s) or for ever.
    assert!(t0.elapsed() < Duration::from_secs(5), "reset blocked {:?}", t0.elapsed());
    assert!(e.to_string().contains(&srv.uri), "{e}");

    srv.start();
    d.t.reset().expect("reconnect");
    assert!(d.t.broken().is_none());
    let mut back = vec![0u8; 256 << 10];
    let r = d.run(&[read(MIB, &mut back)], LIMIT);
    assert_eq!(r[0].as_ref().ok(), Some(&(256 << 10)));
    assert!(back.iter().all(|&b| b == 7), "the data written before the restart is there");

    // Another export size behind the same URI: refused.
    srv.kill();
    let _ = d.run(&[TargetOp::Flush], LIMIT);
    std::fs::File::options().write(true).open(&f.target).and_then(|t| t.set_len(4 * MIB)).expect("shrink");
    srv.start();
    let e = d.t.reset().expect_err("the export changed");
    assert!(e.to_string().contains("size changed"), "{e}");
}

/// The mirror loop restarts on a new ring with the same target (the supervisor does, after a
/// loop failure): what the target had posted on the old ring (its receive, its timer) will
/// never complete, so it drops the connection and the reset reconnects; operations on the new
/// ring complete. A target on whose ring nothing was posted yet keeps its connection.
#[test]
fn a_new_ring_gets_a_new_connection() {
    let f = files(8 * MIB);
    let srv = Server::qemu(f.dir.path(), &f.target, Transport::Unix, &[]);
    let mut d = Driver::new(NbdTarget::open(&srv.uri, &TlsFiles::default()).expect("open"));
    let data = vec![9u8; 64 << 10];
    let r = d.run(&[write(0, &data), TargetOp::Flush], LIMIT);
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");
    d.ring = uring::new_ring(64).expect("ring");
    assert!(d.t.ring_changed(), "the receive posted on the old ring is lost: the target must reconnect");
    d.t.reset().expect("reconnect");
    let mut back = vec![0u8; 64 << 10];
    // Without the reconnect the read is never answered (no receive posted): the Driver aborts.
    let r = d.run(&[read(0, &mut back)], Duration::from_secs(20));
    assert!(r[0].is_ok() && back == data, "{r:?}");
    let mut fresh = NbdTarget::open(&srv.uri, &TlsFiles::default()).expect("open");
    assert!(!fresh.ring_changed(), "a fresh target reconnected for nothing");
}

/// A reconnect to an export whose minimum block size grew is refused (the copies were laid out
/// for the old one); a smaller one is taken.
#[test]
fn reset_refuses_a_larger_minimum_block_size() {
    let f = files(8 * MIB);
    let tgt = f.target.display().to_string();
    let args = |min: u32| -> Vec<String> {
        let min = format!("blocksize-minimum={min}");
        ["--filter=blocksize-policy", "file", &tgt, "blocksize-error-policy=error", &min, "blocksize-preferred=65536"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let a = args(4096);
    let mut srv = Server::nbdkit(f.dir.path(), Transport::Unix, &a.iter().map(String::as_str).collect::<Vec<_>>());
    let mut d = Driver::new(NbdTarget::open(&srv.uri, &TlsFiles::default()).expect("open"));
    assert_eq!(d.t.block_size(), 4096);
    let restart = |srv: &mut Server, d: &mut Driver, min: u32| {
        srv.kill();
        let _ = d.run(&[TargetOp::Flush], LIMIT);
        assert!(d.t.broken().is_some());
        let n = srv.args.len();
        srv.args.truncate(n - 6);
        srv.args.extend(args(min));
        srv.start();
    };
    restart(&mut srv, &mut d, 512);
    d.t.reset().expect("a smaller minimum block size is taken");
    assert_eq!(d.t.block_size(), 512);
    // Back to the size at open: taken too.
    restart(&mut srv, &mut d, 4096);
    d.t.reset().expect("the minimum block size at open is taken");
    restart(&mut srv, &mut d, 65536);
    let e = d.t.reset().expect_err("a larger minimum block size");
    assert!(e.to_string().contains("minimum block size grew from 4096 to 65536"), "{e}");
}

/// Operations split by the maximum payload, many in flight, reads into the caller's buffers,
/// misaligned and out-of-range operations refused.
#[test]
fn target_operations_on_qemu_nbd() {
    let f = files(64 * MIB);
    fill_random(&f.target, 56 * MIB, (8 * MIB) as usize, 9); // for the zeroing to erase
    let srv = Server::qemu(f.dir.path(), &f.target, Transport::Tcp, &[]);
    let mut d = Driver::new(NbdTarget::open(&srv.uri, &TlsFiles::default()).expect("open"));
    assert_eq!(d.t.size(), 64 * MIB);
    assert!(d.t.flush_publishes());
    let (name, fp) = d.t.identity();
    assert_eq!(name, srv.uri);
    assert_eq!(fp, 64 * MIB);
    // 40 MiB in one write (more than the 32 MiB maximum payload), 16 writes of 1 MiB at once.
    let mut big = vec![0u8; 40 << 20];
    for (i, b) in big.iter_mut().enumerate() {
        *b = (i / 4096) as u8;
    }
    let small: Vec<Vec<u8>> = (0..16).map(|i| vec![i as u8 + 1; MIB as usize]).collect();
    let mut ops = vec![write(0, &big)];
    ops.extend(small.iter().enumerate().map(|(i, b)| write(40 * MIB + i as u64 * MIB, b)));
    ops.push(TargetOp::Zero { off: 56 * MIB, len: 8 * MIB });
    let r = d.run(&ops, LIMIT);
    assert_eq!(r[0].as_ref().ok(), Some(&(40 << 20)));
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");
    assert!(d.run(&[TargetOp::Flush], LIMIT)[0].is_ok());
    let mut back = vec![0xffu8; 56 << 20];
    let r = d.run(&[read(0, &mut back[..40 << 20])], LIMIT);
    assert!(r[0].is_ok());
    let (head, tail) = back.split_at_mut(40 << 20);
    let mut reads: Vec<TargetOp> = Vec::new();
    for (i, chunk) in tail.chunks_mut(MIB as usize).enumerate() {
        reads.push(read(40 * MIB + i as u64 * MIB, chunk));
    }
    let r = d.run(&reads, LIMIT);
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");
    assert!(head == &big[..], "40 MiB read back");
    for (i, chunk) in tail.chunks(MIB as usize).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8 + 1), "1 MiB write {i} read back");
    }
    // Refused before anything is sent, with the reason.
    let buf = vec![0u8; 4096];
    let r = d.run(&[write(64 * MIB - 2048, &buf), TargetOp::Zero { off: 64 * MIB, len: 512 }], LIMIT);
    assert!(err_text(&r[0]).contains("beyond the export's end"));
    assert!(err_text(&r[1]).contains("beyond the export's end"));
    assert!(d.t.broken().is_none(), "refused operations leave the connection alone");
    drop(d);
    drop(srv);
    let t = read_all(&f.target);
    assert!(t[56 << 20..].iter().all(|&b| b == 0));
}

// ---------------------------------------------------------------------------------------------
// A fake, hostile server

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    None,
    /// Answers with a cookie that was never sent.
    WrongCookie,
    /// Answers the request twice.
    DuplicateReply,
    /// Sends half the data of a read, then closes.
    ShortRead,
    /// Sends half a reply header, then closes.
    EofMidHeader,
    BadMagic,
    StructuredReply,
    /// Reads requests, never answers.
    Silent,
    /// Errors the request (EIO) and goes on.
    IoError,
    // Handshake faults.
    AbsurdSize,
    BadGreeting,
    OversizedOptionReply,
}

const FAKE_SIZE: u64 = 4 * MIB;

/// Starts a fake server on 127.0.0.1 for one connection; it misbehaves as `fault` says at the
/// request numbered `at` (0-based). Returns the URI.
fn fake_server(fault: Fault, at: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let Ok((s, _)) = l.accept() else { return };
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let _ = serve(s, fault, at);
    });
    format!("nbd://127.0.0.1:{port}/fake")
}

fn serve(mut s: TcpStream, fault: Fault, at: usize) -> io::Result<()> {
    if greet(&mut s, fault)? {
        serve_requests(s, fault, at)?;
    }
    Ok(())
}

/// The fixed-newstyle handshake of an export of `FAKE_SIZE` bytes (64 KiB largest request),
/// or the handshake faults. Returns whether the transmission phase follows.
fn greet(s: &mut TcpStream, fault: Fault) -> io::Result<bool> {
    if fault == Fault::BadGreeting {
        s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n")?;
        return Ok(false);
    }
    s.write_all(&0x4e42_444d_4147_4943u64.to_be_bytes())?;
    s.write_all(&0x4948_4156_454f_5054u64.to_be_bytes())?;
    s.write_all(&3u16.to_be_bytes())?;
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags)?;
    let mut oh = [0u8; 16];
    s.read_exact(&mut oh)?;
    let olen = u32::from_be_bytes([oh[12], oh[13], oh[14], oh[15]]) as usize;
    let mut odata = vec![0u8; olen];
    s.read_exact(&mut odata)?;
    let opt_reply = |s: &mut TcpStream, t: u32, p: &[u8], len: u32| -> io::Result<()> {
        s.write_all(&0x0003_e889_0455_65a9u64.to_be_bytes())?;
        s.write_all(&7u32.to_be_bytes())?;
        s.write_all(&t.to_be_bytes())?;
        s.write_all(&len.to_be_bytes())?;
        s.write_all(p)
    };
    if fault == Fault::OversizedOptionReply {
        opt_reply(s, 3, &[], 1 << 30)?;
        return Ok(false);
    }
    let size = if fault == Fault::AbsurdSize { u64::MAX - 511 } else { FAKE_SIZE };
    let mut info = vec![0u8, 0];
    info.extend_from_slice(&size.to_be_bytes());
    info.extend_from_slice(&(1u16 | 4 | 64).to_be_bytes()); // HAS_FLAGS, SEND_FLUSH, WRITE_ZEROES
    opt_reply(s, 3, &info, info.len() as u32)?;
    let mut bs = vec![0u8, 3];
    for v in [512u32, 4096, 64 << 10] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    opt_reply(s, 3, &bs, bs.len() as u32)?;
    opt_reply(s, 1, &[], 0)?;
    Ok(true)
}

/// The transmission phase: requests served from memory, misbehaving as `fault` says at the
/// request numbered `at`.
fn serve_requests(mut s: TcpStream, fault: Fault, at: usize) -> io::Result<()> {
    let mut mem = vec![0u8; FAKE_SIZE as usize];
    let mut n = 0usize;
    loop {
        let mut h = [0u8; 28];
        s.read_exact(&mut h)?;
        let cmd = u16::from_be_bytes([h[6], h[7]]);
        let cookie = &h[8..16];
        let off = u64::from_be_bytes(h[16..24].try_into().expect("8 bytes")) as usize;
        let len = u32::from_be_bytes(h[24..28].try_into().expect("4 bytes")) as usize;
        let mut error = 0u32;
        if (cmd <= 1 && len > 64 << 10) || off % 512 != 0 || len % 512 != 0 || off + len > mem.len() {
            error = 22; // a constraint broken: EINVAL, which the tests look for
        }
        if cmd == 1 {
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            if error == 0 {
                mem[off..off + len].copy_from_slice(&data);
            }
        }
        if cmd == 2 {
            return Ok(());
        }
        if cmd == 6 && error == 0 {
            mem[off..off + len].fill(0);
        }
        let this = n;
        n += 1;
        let header = |magic: u32, err: u32, cookie: &[u8]| {
            let mut r = magic.to_be_bytes().to_vec();
            r.extend_from_slice(&err.to_be_bytes());
            r.extend_from_slice(cookie);
            r
        };
        let ok = header(0x6744_6698, error, cookie);
        let data = if cmd == 0 && error == 0 { mem[off..off + len].to_vec() } else { Vec::new() };
        if this != at || fault == Fault::None {
            s.write_all(&ok)?;
            s.write_all(&data)?;
            continue;
        }
        match fault {
            Fault::WrongCookie => s.write_all(&header(0x6744_6698, 0, &[0xde, 0xad, 0, 0, 0, 0, 0, 9]))?,
            Fault::DuplicateReply => {
                s.write_all(&ok)?;
                s.write_all(&data)?;
                s.write_all(&ok)?;
                s.write_all(&data)?;
            }
            Fault::ShortRead => {
                s.write_all(&ok)?;
                s.write_all(&data[..data.len() / 2])?;
                return close_gracefully(s);
            }
            Fault::EofMidHeader => {
                s.write_all(&ok[..8])?;
                return close_gracefully(s);
            }
            Fault::BadMagic => s.write_all(&header(0x1234_5678, 0, cookie))?,
            Fault::StructuredReply => s.write_all(&header(0x668e_33ef, 0, cookie))?,
            Fault::IoError => s.write_all(&header(0x6744_6698, 5, cookie))?,
            Fault::Silent => {
                // Keep the connection open, answer nothing, until the client goes.
                let mut sink = [0u8; 4096];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                return Ok(());
            }
            _ => unreachable!("handshake faults end earlier"),
        }
    }
}

/// EOF after what was written: closing with unread requests in the socket would reset the
/// connection (RST), and the client could lose the last bytes sent.
fn close_gracefully(s: TcpStream) -> io::Result<()> {
    s.shutdown(std::net::Shutdown::Write)?;
    let mut sink = [0u8; 4096];
    while matches!((&s).read(&mut sink), Ok(n) if n > 0) {}
    Ok(())
}

#[test]
fn fake_server_works_when_honest() {
    let uri = fake_server(Fault::None, 0);
    let mut d = Driver::new(NbdTarget::open(&uri, &TlsFiles::default()).expect("open"));
    assert_eq!(d.t.size(), FAKE_SIZE);
    let data: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    // 1 MiB becomes 16 requests of the server's 64 KiB maximum, which it checks.
    let r = d.run(&[write(MIB, &data), TargetOp::Zero { off: 0, len: MIB }, TargetOp::Flush], LIMIT);
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");
    let mut back = vec![0u8; MIB as usize];
    let r = d.run(&[read(MIB, &mut back)], LIMIT);
    assert!(r[0].is_ok(), "{r:?}");
    assert!(back == data);
    // Not a multiple of the minimum block size (512): refused before sending.
    let r = d.run(&[write(100, &data[..512])], LIMIT);
    assert!(err_text(&r[0]).contains("not aligned"));
}

#[test]
fn hostile_handshakes_fail_open_clearly() {
    for (fault, want) in [
        (Fault::AbsurdSize, "absurd export size"),
        (Fault::BadGreeting, "not an NBD server"),
        (Fault::OversizedOptionReply, "oversized option reply"),
    ] {
        let uri = fake_server(fault, 0);
        let t0 = Instant::now();
        let e = match NbdTarget::open(&uri, &TlsFiles::default()) {
            Ok(_) => panic!("{fault:?}: the handshake must fail"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want) && e.contains(&uri), "{fault:?}: {e}");
        // Failing at once, not at OPEN_TIMEOUT (10 s); the margin is for a loaded machine.
        assert!(t0.elapsed() < Duration::from_secs(8), "{fault:?} took {:?}", t0.elapsed());
    }
    // Through sync: nothing created.
    let f = files(MIB);
    let uri = fake_server(Fault::AbsurdSize, 0);
    let e = offline::sync(&pair(&f, &uri), &CopyConfig::default(), TestHooks::default(), None).expect_err("absurd");
    assert!(e.to_string().contains("absurd export size"), "{e}");
    assert!(!f.bitmap.exists());
}

#[test]
fn hostile_replies_fail_operations_clearly() {
    for (fault, want) in [
        (Fault::WrongCookie, "matches no request in flight"),
        (Fault::DuplicateReply, "matches no request in flight"),
        (Fault::ShortRead, "in the middle of a reply (short read)"),
        (Fault::EofMidHeader, "in the middle of a reply"),
        (Fault::BadMagic, "bad reply magic 0x12345678"),
        (Fault::StructuredReply, "structured reply"),
    ] {
        let uri = fake_server(fault, 1);
        let mut d = Driver::new(NbdTarget::open(&uri, &TlsFiles::default()).expect("open"));
        let data = vec![1u8; 64 << 10];
        let mut a = vec![0u8; 64 << 10];
        let mut b = vec![0u8; 64 << 10];
        // Request 0 is a write; request 1, where the fault is, a read; 2 another read.
        let r = d.run(&[write(0, &data)], LIMIT);
        assert!(r[0].is_ok(), "{fault:?}: {r:?}");
        let r = d.run(&[read(0, &mut a), read(64 << 10, &mut b)], LIMIT);
        // Every operation in flight fails, with the server and the problem named. (After a
        // duplicate reply, the first read may have completed before the problem showed.)
        for (i, x) in r.iter().enumerate() {
            if fault == Fault::DuplicateReply && i == 0 && x.is_ok() {
                continue;
            }
            let e = err_text(x);
            assert!(e.contains(&format!("NBD server {uri}")), "{fault:?}: {e}");
            if !(fault == Fault::DuplicateReply) {
                assert!(e.contains(want), "{fault:?} op {i}: want {want:?}, got {e}");
            }
        }
        assert!(d.t.broken().is_some_and(|b| b.contains(want)), "{fault:?}: {:?}", d.t.broken());
        // Later operations fail at once; reset() cannot reconnect (the fake serves once).
        let r = d.run(&[TargetOp::Flush], Duration::from_secs(5));
        assert!(err_text(&r[0]).contains(want));
        assert!(d.t.reset().is_err());
    }
}

#[test]
fn server_error_fails_one_operation_only() {
    let uri = fake_server(Fault::IoError, 1);
    let mut d = Driver::new(NbdTarget::open(&uri, &TlsFiles::default()).expect("open"));
    let data = vec![1u8; 4096];
    let r = d.run(&[write(0, &data)], LIMIT);
    assert!(r[0].is_ok());
    let r = d.run(&[write(8192, &data)], LIMIT);
    let e = err_text(&r[0]);
    assert!(e.contains("write of 4096 bytes at byte 8192 failed") && e.contains("NBD error 5"), "{e}");
    assert!(d.t.broken().is_none());
    let r = d.run(&[TargetOp::Flush], LIMIT);
    assert!(r[0].is_ok(), "the connection still works: {r:?}");
}

#[test]
fn silent_server_times_out() {
    let uri = fake_server(Fault::Silent, 0);
    let mut t = NbdTarget::open(&uri, &TlsFiles::default()).expect("open");
    t.set_request_timeout(Duration::from_secs(2));
    let mut d = Driver::new(t);
    let data = vec![1u8; 4096];
    let t0 = Instant::now();
    let r = d.run(&[write(0, &data), TargetOp::Flush], Duration::from_secs(20));
    for x in &r {
        let e = err_text(x);
        assert!(e.contains("no reply from the server") && e.contains(&uri), "{e}");
    }
    // The 2 s request timeout (and the 1 s tick that checks it), with room for a loaded
    // machine; the default request timeout would take far longer.
    assert!(t0.elapsed() < Duration::from_secs(12), "took {:?}", t0.elapsed());
}

/// What a server that stopped reading found in its connection once it read again.
#[derive(Debug, Default)]
struct Drained {
    requests: usize,
    /// NBD_CMD_DISC seen among them.
    disc: bool,
    /// A complete header with the wrong magic: bytes of two writes interleaved.
    bad_magic: bool,
    /// A write's payload holds bytes the client did not write (another write's, interleaved).
    foreign: bool,
}

/// A fake server for three connections in turn: the first and the third stop reading after the
/// handshake, until the test sends on the returned `release`, then read what reached them and
/// report it (`Drained`); the second serves honestly. `stalled` gets an event for each stalled
/// connection once its receive queue holds `STALL_BYTES`: the client's requests are flowing and
/// nothing reads them. Of the 32 MiB `fill_until_stalled` writes, no more than the two sockets'
/// buffers can leave the client (a few MiB: a receive buffer grows only as its reader reads), so
/// its sends stay in flight in the kernel from then on.
struct StallingServer {
    uri: String,
    stalled: std::sync::mpsc::Receiver<usize>,
    release: std::sync::mpsc::Sender<()>,
    drained: std::sync::mpsc::Receiver<Drained>,
}

const STALL_BYTES: usize = 32 << 10;

fn stalling_server() -> StallingServer {
    use std::sync::mpsc::channel;
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let (stalled_tx, stalled) = channel();
    let (release, release_rx) = channel::<()>();
    let (drained_tx, drained) = channel();
    let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
    std::thread::spawn(move || {
        for i in 0..3 {
            let Ok((s, _)) = l.accept() else { return };
            let (stalled_tx, release_rx, drained_tx) = (stalled_tx.clone(), release_rx.clone(), drained_tx.clone());
            // Each connection on a thread of its own: the client reconnects while the first one
            // is still stalled.
            std::thread::spawn(move || stall_or_serve(s, i, stalled_tx, &release_rx, drained_tx));
        }
    });
    StallingServer { uri: format!("nbd://127.0.0.1:{port}/fake"), stalled, release, drained }
}

fn stall_or_serve(
    mut s: TcpStream,
    i: usize,
    stalled_tx: std::sync::mpsc::Sender<usize>,
    release_rx: &std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    drained_tx: std::sync::mpsc::Sender<Drained>,
) {
    use std::os::fd::AsRawFd;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    if !matches!(greet(&mut s, Fault::None), Ok(true)) {
        return;
    }
    if i == 1 {
        let _ = serve_requests(s, Fault::None, 0);
        return;
    }
    // Stopped: wait (bounded) for the client's bytes to pile up unread.
    let t0 = Instant::now();
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int, through a pointer to a live local int, on a
        // descriptor this thread owns.
        let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut queued) };
        if rc == 0 && queued as usize >= STALL_BYTES {
            let _ = stalled_tx.send(i);
            break;
        }
        if rc != 0 || t0.elapsed() > Duration::from_secs(20) {
            return; // the test times out waiting for the event and says so
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if !release_rx.lock().is_ok_and(|r| r.recv_timeout(Duration::from_secs(60)).is_ok()) {
        return;
    }
    let mut d = Drained::default();
    let mut h = [0u8; 28];
    // To the client's end of the stream (or a half-sent request at its end).
    while s.read_exact(&mut h).is_ok() {
        d.requests += 1;
        if u32::from_be_bytes([h[0], h[1], h[2], h[3]]) != 0x2560_9513 {
            d.bad_magic = true;
            break;
        }
        let cmd = u16::from_be_bytes([h[6], h[7]]);
        d.disc |= cmd == 2;
        if cmd == 1 {
            // The payload, to its end or to the stream's: the client writes only 7s.
            let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]) as usize;
            let mut payload = Vec::new();
            let n = (&mut s).take(len as u64).read_to_end(&mut payload);
            d.foreign |= payload.iter().any(|&b| b != 7);
            if n.is_err() || payload.len() != len {
                break;
            }
        }
    }
    let _ = drained_tx.send(d);
}

/// Submits 32 MiB of writes (far beyond what the socket buffers of both ends hold) and drives
/// the ring until the server reports requests piling up unread: a send of the target's is then
/// in flight in the kernel, reading buffers of the target (request headers) and of the caller.
fn fill_until_stalled(d: &mut Driver, srv: &StallingServer, conn: usize) {
    // The kernel may still read this after the ring is gone: it is never freed.
    let data: &'static [u8] = Box::leak(vec![7u8; 4 << 20].into_boxed_slice());
    for i in 0..8 {
        // SAFETY: `data` is never freed (leaked above); the target is the ring's only user.
        if let Err(e) = unsafe { d.t.submit(&mut d.ring, write(0, data), i) } {
            panic!("submitting write {i}: {e}");
        }
    }
    let t0 = Instant::now();
    let mut done = Vec::new();
    loop {
        match srv.stalled.try_recv() {
            Ok(c) => {
                assert_eq!(c, conn, "the wrong connection stalled");
                break;
            }
            Err(_) => assert!(t0.elapsed() < Duration::from_secs(20), "the server's receive queue never filled"),
        }
        d.poll(Duration::from_millis(10), &mut done);
        assert!(done.is_empty(), "a write completed although the server reads nothing: {done:?}");
    }
}

/// Sends in flight in the kernel when the ring goes: the mirror loop restarting on a new ring
/// (`ring_changed`) drops the connection, leaving what the kernel may still read, and the
/// reset connects anew and works; a target dropped with a send in flight (the ring gone first,
/// as when the loop ends) returns at once and sends no goodbye into the middle of a request.
#[test]
fn sends_in_flight_when_the_ring_goes() {
    let srv = stalling_server();
    let mut d = Driver::new(NbdTarget::open(&srv.uri, &TlsFiles::default()).expect("open"));
    fill_until_stalled(&mut d, &srv, 0);
    d.ring = uring::new_ring(64).expect("ring");
    assert!(d.t.ring_changed(), "sends were in flight on the old ring: the target must reconnect");
    d.t.reset().expect("reconnect to the second connection");
    srv.release.send(()).expect("server thread");
    let first = srv.drained.recv_timeout(LIMIT).expect("the first connection's report");
    assert!(first.requests > 0 && !first.bad_magic && !first.foreign && !first.disc, "first connection: {first:?}");
    let data = vec![5u8; 64 << 10];
    let mut back = vec![0u8; 64 << 10];
    let r = d.run(&[write(4096, &data), TargetOp::Flush], LIMIT);
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");
    let r = d.run(&[read(4096, &mut back)], LIMIT);
    assert!(r[0].is_ok() && back == data, "{r:?}");

    let mut d = Driver::new(NbdTarget::open(&srv.uri, &TlsFiles::default()).expect("open the third connection"));
    fill_until_stalled(&mut d, &srv, 2);
    let Driver { ring, t } = d;
    drop(ring);
    let t0 = Instant::now();
    drop(t);
    let took = t0.elapsed();
    srv.release.send(()).expect("server thread");
    let third = srv.drained.recv_timeout(LIMIT).expect("the third connection's report");
    assert!(third.requests > 0 && !third.bad_magic && !third.foreign && !third.disc, "dropped with a send in flight: {third:?}");
    // Nothing to wait for: a goodbye into the full socket would block for its 1 s timeout.
    assert!(took < Duration::from_millis(500), "dropping the target took {took:?}");
}

/// A hostile server under a running sync: the sync fails with the problem named, no panic, no
/// hang.
#[test]
fn hostile_server_under_sync() {
    let f = files(FAKE_SIZE);
    fill_random(&f.source, 0, FAKE_SIZE as usize, 31);
    for fault in [Fault::BadMagic, Fault::WrongCookie, Fault::EofMidHeader] {
        let _ = std::fs::remove_file(&f.bitmap);
        let uri = fake_server(fault, 5);
        let e = sync_bounded(&pair(&f, &uri), &CopyConfig::default(), TestHooks::default(), LIMIT)
            .expect_err("the sync must fail")
            .to_string();
        assert!(e.contains(&format!("NBD server {uri}")), "{fault:?}: {e}");
    }
}

/// verify through a server that breaks in the middle: an error naming the server, after the
/// reads in flight were waited for; no panic, no hang.
#[test]
fn verify_through_a_hostile_server_fails_cleanly() {
    let f = files(FAKE_SIZE);
    fill_random(&f.source, 0, FAKE_SIZE as usize, 41);
    for fault in [Fault::ShortRead, Fault::BadMagic] {
        let uri = fake_server(fault, 6);
        let t0 = Instant::now();
        let e = offline::verify(&VerifyOptions {
            source: f.source.clone(),
            target: PathBuf::from(&uri),
            bitmap: None,
            granularity: None,
            direct: DirectMode::Auto,
            tls: Default::default(),
        })
        .expect_err("verify must fail")
        .to_string();
        assert!(e.contains(&format!("NBD server {uri}")) && e.contains("reading"), "{fault:?}: {e}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{fault:?} took {:?}", t0.elapsed());
    }
}

/// An IPv6 address in brackets, end to end (nbdkit listening on ::1).
#[test]
fn ipv6_uri_connects() {
    require("nbdkit", "nbdkit");
    let port = TcpListener::bind("[::1]:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("this machine has no IPv6 loopback (::1), which this test needs");
    let dir = tempfile::Builder::new().prefix("ublk-mirror-test").tempdir_in("/var/tmp").expect("tempdir");
    let mut srv = Server {
        program: "nbdkit",
        args: ["-f", "-p", &port.to_string(), "-i", "::1", "memory", "8M"].iter().map(|s| s.to_string()).collect(),
        child: None,
        uri: format!("nbd://[::1]:{port}/exp"),
        socket: None,
        port: None,
        log: dir.path().join("nbdkit.log"),
    };
    // Readiness through the client itself (the helper probes 127.0.0.1).
    let child = Command::new("nbdkit").args(&srv.args).stdin(Stdio::null()).spawn().expect("nbdkit");
    srv.child = Some(child);
    let t0 = Instant::now();
    let t = loop {
        match NbdTarget::open(&srv.uri, &TlsFiles::default()) {
            Ok(t) => break t,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(10), "nbdkit on ::1 did not come up: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_eq!(t.describe(), srv.uri);
    let mut d = Driver::new(t);
    let data = vec![9u8; 64 << 10];
    let mut back = vec![0u8; 64 << 10];
    assert!(d.run(&[write(4096, &data), TargetOp::Flush], LIMIT).iter().all(|r| r.is_ok()));
    assert!(d.run(&[read(4096, &mut back)], LIMIT)[0].is_ok());
    assert!(back == data);
}
