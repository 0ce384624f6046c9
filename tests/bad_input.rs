//! Bad input is refused with an error that names the problem and the fix, and nothing is
//! modified: every bitmap case from the engine issue, a short target, and a resume without a
//! bitmap.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use ublk_mirror::io::bitmap::Bitmap;
use ublk_mirror::engine::{CopyConfig, Engine, PairOptions, SyncMode};
use ublk_mirror::error::BitmapProblem;
use ublk_mirror::engine::mirror::TestHooks;
use ublk_mirror::offline;

const MIB: u64 = 1 << 20;

/// A synced pair with some data and a clean bitmap.
fn synced_pair() -> Files {
    let f = files(8 * MIB);
    fill_random(&f.source, 0, MIB as usize, 21);
    offline::sync(&f.pair(None, None), &CopyConfig::default(), TestHooks::default(), None).expect("initial sync");
    f
}

fn snapshot(f: &Files) -> (Vec<u8>, Vec<u8>, Option<Vec<u8>>) {
    (read_all(&f.source), read_all(&f.target), std::fs::read(&f.bitmap).ok())
}

/// Opens the pair, expects a bitmap error of the given kind whose text names the file and a
/// fix, and checks that source, target and bitmap are untouched.
fn refused(f: &Files, pair: &PairOptions, want: impl Fn(&BitmapProblem) -> bool) -> String {
    let before = snapshot(f);
    let err = match Engine::open(pair) {
        Ok(_) => panic!("opening must fail"),
        Err(e) => e,
    };
    let msg = err.to_string();
    let problem = err.bitmap_problem().unwrap_or_else(|| panic!("not a bitmap error: {msg}"));
    assert!(want(problem), "wrong problem {problem:?}: {msg}");
    assert!(msg.contains(&pair.bitmap.display().to_string()), "error does not name the file: {msg}");
    assert!(msg.contains("fix:"), "error gives no fix: {msg}");
    assert!(snapshot(f) == before, "a refused open modified something");
    msg
}

fn corrupt(path: &std::path::Path, off: usize, bytes: &[u8]) {
    let mut b = std::fs::read(path).expect("read bitmap");
    b[off..off + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, b).expect("write bitmap");
}

#[test]
fn wrong_magic() {
    let f = synced_pair();
    corrupt(&f.bitmap, 0, b"NOTMINE!");
    let m = refused(&f, &f.pair(None, None), |p| *p == BitmapProblem::BadMagic);
    assert!(m.contains("not a ublk-mirror bitmap"));
}

#[test]
fn truncated_file() {
    let f = synced_pair();
    let len = std::fs::metadata(&f.bitmap).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f.bitmap).unwrap().set_len(len - 4096).unwrap();
    refused(&f, &f.pair(None, None), |p| matches!(p, BitmapProblem::Truncated { .. }));
}

#[test]
fn shorter_than_a_header() {
    let f = synced_pair();
    std::fs::write(&f.bitmap, b"UBLKMIRB").unwrap();
    refused(&f, &f.pair(None, None), |p| matches!(p, BitmapProblem::Truncated { need: 4096, .. }));
}

#[test]
fn checksum_mismatch() {
    let f = synced_pair();
    // Flip a byte of the recorded device size without fixing the checksum.
    let mut b = std::fs::read(&f.bitmap).unwrap();
    b[41] ^= 0x10;
    std::fs::write(&f.bitmap, b).unwrap();
    let m = refused(&f, &f.pair(None, None), |p| *p == BitmapProblem::Checksum);
    assert!(m.contains("--full"), "the fix names the explicit full resync: {m}");
}

#[test]
fn another_pairs_bitmap() {
    let f = synced_pair();
    let g = files(8 * MIB);
    let mut other = g.pair(None, None);
    other.bitmap = f.bitmap.clone();
    let before_g = (read_all(&g.source), read_all(&g.target));
    let m = refused(&f, &other, |p| matches!(p, BitmapProblem::WrongPair { role: "source", .. }));
    assert!(m.contains("another pair"));
    assert!((read_all(&g.source), read_all(&g.target)) == before_g);
}

#[test]
fn same_path_but_a_different_file() {
    let f = synced_pair();
    // Replace the target by a new file at the same path, of the same size. ext4 (and xfs)
    // hand the freed inode number back to the next file created: the new file must be told
    // apart all the same (by its generation and birth time).
    let reused = replace_at_the_same_inode(&f);
    refused(&f, &f.pair(None, None), |p| matches!(p, BitmapProblem::WrongPair { role: "target", .. }));
    // The case that matters must have been exercised: a new file at the old inode number.
    assert!(reused, "the file system of {} gave the new file a new inode number: this test needs one that reuses them (ext4, xfs)", f.target.display());
}

/// A header written when fingerprints were the inode number alone still opens for the same
/// files, and is upgraded to full fingerprints by the open.
#[test]
fn inode_only_fingerprints_of_an_older_header_are_accepted_and_upgraded() {
    use std::os::unix::fs::MetadataExt;
    let f = synced_pair();
    let full = Bitmap::read_header(&f.bitmap).expect("header").pair;
    let (sino, tino) = (std::fs::metadata(&f.source).unwrap().ino(), std::fs::metadata(&f.target).unwrap().ino());
    assert!(full.source_fingerprint != sino && full.target_fingerprint != tino, "no full fingerprints here: {full:?}");
    inode_only_header(&f, None);
    // verify --bitmap takes it for this pair too.
    let opts = offline::VerifyOptions {
        source: f.source.clone(),
        target: f.target.clone(),
        bitmap: Some(f.bitmap.clone()),
        granularity: None,
        direct: ublk_mirror::io::backing::DirectMode::Auto,
        tls: Default::default(),
    };
    assert!(offline::verify(&opts).expect("verify --bitmap with an older header").identical());
    let (engine, _target, _) = Engine::open(&f.pair(None, None)).expect("an older header of the same pair opens");
    engine.close().expect("close");
    drop(engine);
    let now = Bitmap::read_header(&f.bitmap).expect("header").pair;
    assert_eq!((now.source_fingerprint, now.target_fingerprint), (full.source_fingerprint, full.target_fingerprint));
}

#[test]
fn source_changed_size() {
    let f = synced_pair();
    std::fs::OpenOptions::new().write(true).open(&f.source).unwrap().set_len(16 * MIB).unwrap();
    std::fs::OpenOptions::new().write(true).open(&f.target).unwrap().set_len(16 * MIB).unwrap();
    refused(&f, &f.pair(None, None), |p| matches!(p, BitmapProblem::SizeMismatch { .. }));
}

#[test]
fn granularity_mismatch() {
    let f = synced_pair();
    refused(&f, &f.pair(Some(SyncMode::Resume), Some(128 << 10)), |p| {
        matches!(p, BitmapProblem::GranularityMismatch { recorded: 65536, requested: 131072 })
    });
}

#[test]
fn read_only_bitmap() {
    let f = synced_pair();
    std::fs::set_permissions(&f.bitmap, std::fs::Permissions::from_mode(0o444)).unwrap();
    let m = refused(&f, &f.pair(None, None), |p| *p == BitmapProblem::ReadOnly);
    assert!(m.contains("chmod"));
}

#[test]
fn unreadable_bitmap() {
    let f = synced_pair();
    std::fs::set_permissions(&f.bitmap, std::fs::Permissions::from_mode(0o200)).unwrap();
    refused(&f, &f.pair(None, None), |p| *p == BitmapProblem::Unreadable);
}

#[test]
fn bitmap_is_a_directory() {
    let f = synced_pair();
    let mut p = f.pair(None, None);
    p.bitmap = f.dir.path().to_path_buf();
    let before = snapshot(&f);
    let e = Engine::open(&p).err().expect("must fail");
    assert_eq!(e.bitmap_problem(), Some(&BitmapProblem::Unreadable), "{e}");
    assert!(snapshot(&f) == before);
}

#[test]
fn bitmap_in_use_by_another_mirror() {
    let f = synced_pair();
    let (held, _t, _) = Engine::open(&f.pair(None, None)).expect("first user");
    let m = refused(&f, &f.pair(None, None), |p| *p == BitmapProblem::InUse);
    assert!(m.contains("another ublk-mirror"));
    // Nor may an explicit --full replace it under the live user.
    let e = Engine::open(&f.pair(Some(SyncMode::Full), None)).err().expect("must fail");
    assert_eq!(e.bitmap_problem(), Some(&BitmapProblem::InUse));
    drop(held);
}

#[test]
fn explicit_full_rebuilds_a_damaged_bitmap() {
    let f = synced_pair();
    corrupt(&f.bitmap, 0, b"NOTMINE!");
    let r = offline::sync(&f.pair(Some(SyncMode::Full), None), &CopyConfig::default(), TestHooks::default(), None)
        .expect("--full rebuilds");
    assert!(r.open.created_bitmap);
    assert_eq!(r.bytes_copied + r.bytes_zeroed, 8 * MIB);
    let (h, runs) = Bitmap::inspect(&f.bitmap).expect("valid again");
    assert!(runs.is_empty() && h.device_size == 8 * MIB);
}

#[test]
fn short_target_is_refused_and_nothing_is_created() {
    let f = files(8 * MIB);
    std::fs::OpenOptions::new().write(true).open(&f.target).unwrap().set_len(4 * MIB).unwrap();
    let before = snapshot(&f);
    let e = Engine::open(&f.pair(None, None)).err().expect("must fail");
    let m = e.to_string();
    assert!(m.contains("smaller than the source") && m.contains("truncate -s"), "{m}");
    assert!(!f.bitmap.exists(), "no bitmap may be left behind");
    assert!(snapshot(&f) == before);
}

#[test]
fn missing_source_and_resume_without_bitmap() {
    let f = files(MIB);
    let mut p = f.pair(None, None);
    p.source = f.dir.path().join("nope.img");
    let m = Engine::open(&p).err().expect("must fail").to_string();
    assert!(m.contains("nope.img") && m.contains("fix:"), "{m}");
    let m = Engine::open(&f.pair(Some(SyncMode::Resume), None)).err().expect("must fail").to_string();
    assert!(m.contains("does not exist") && m.contains("--sync resume"), "{m}");
    assert!(!f.bitmap.exists());
}

#[test]
fn same_file_as_source_and_target() {
    let f = files(MIB);
    let mut p = f.pair(None, None);
    p.target = f.source.clone();
    let m = Engine::open(&p).err().expect("must fail").to_string();
    assert!(m.contains("same file"), "{m}");
    assert!(!f.bitmap.exists());
}

#[test]
fn bad_granularity() {
    let f = files(MIB);
    for g in [1000u64, 2048, 128 << 20] {
        let m = Engine::open(&f.pair(None, Some(g))).err().expect("must fail").to_string();
        assert!(m.contains("power of two from 4 KiB to 64 MiB"), "{m}");
    }
    assert!(!f.bitmap.exists());
}

/// Rewrites the bitmap's header as a version before full fingerprints wrote it: the inode
/// numbers of source and target as their fingerprints; with `created`, that creation time.
fn inode_only_header(f: &Files, created: Option<u64>) {
    use std::os::unix::fs::MetadataExt;
    let (sino, tino) = (std::fs::metadata(&f.source).unwrap().ino(), std::fs::metadata(&f.target).unwrap().ino());
    corrupt(&f.bitmap, 72, &sino.to_le_bytes());
    corrupt(&f.bitmap, 80, &tino.to_le_bytes());
    if let Some(t) = created {
        corrupt(&f.bitmap, 64, &t.to_le_bytes());
    }
    let b = std::fs::read(&f.bitmap).unwrap();
    corrupt(&f.bitmap, 2144, &crc32fast::hash(&b[..2144]).to_le_bytes());
}

/// Replaces the target by a new file of the same size at the same path and the same inode
/// number (ext4 and xfs give the lowest free number: new files that get another are kept
/// aside until one gets it; at most 10 s). Returns whether it got it.
fn replace_at_the_same_inode(f: &Files) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(&f.target).unwrap().ino();
    let len = std::fs::metadata(&f.target).unwrap().len();
    // The directory first: made after the removal, it could take the freed number itself.
    let aside = tempfile::tempdir_in(f.target.parent().unwrap()).expect("dir");
    std::fs::remove_file(&f.target).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut n = 0;
    loop {
        std::fs::File::create(&f.target).and_then(|t| t.set_len(len)).unwrap();
        if std::fs::metadata(&f.target).unwrap().ino() == ino {
            // The files kept aside go with `aside`; the target stays.
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        n += 1;
        std::fs::rename(&f.target, aside.path().join(n.to_string())).unwrap();
    }
}

/// An older header (inode-only fingerprints) does not let through a target made anew at the
/// same inode number after the bitmap: the file's birth time is after the bitmap's creation.
#[test]
fn an_older_header_refuses_a_file_born_after_it_at_the_same_inode() {
    let f = synced_pair();
    let created = Bitmap::read_header(&f.bitmap).expect("header").created;
    // The new file is born in a later second than the bitmap (its header counts in seconds).
    // 50 ms into that second: a file's birth time comes from the kernel's coarse clock, which
    // may lag the clock read here by a tick, and would then still be in the bitmap's second.
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let after = (created + 1) as f64 + 0.05;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while now() < after && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(now() >= after, "the clock did not pass the bitmap's creation second");
    assert!(replace_at_the_same_inode(&f), "the file system did not give the inode number back: this test needs ext4 or xfs");
    inode_only_header(&f, None);
    refused(&f, &f.pair(None, None), |p| matches!(p, BitmapProblem::WrongPair { role: "target", .. }));
}
