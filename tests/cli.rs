//! The offline commands as a user runs them: output, exit statuses, errors.

mod common;
use common::*;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = bin().args(args).output().expect("run ublk-mirror");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn sync_verify_show_round_trip() {
    let f = files(16 * MIB);
    fill_random(&f.source, 2 * MIB, (3 * MIB) as usize, 1);
    let (code, out, err) = run(&["sync", "-s", s(&f.source), "-t", s(&f.target), "-b", s(&f.bitmap)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("copied 3.0 MiB") && out.contains("zeroed 13.0 MiB of holes"), "summary: {out}");
    assert!(out.contains("MiB/s"));
    // Not a terminal: plain progress lines, no bar.
    assert!(err.contains("sync: "), "progress lines on stderr: {err}");

    let (code, out, _) = run(&["verify", "-s", s(&f.source), "-t", s(&f.target), "-b", s(&f.bitmap)]);
    assert_eq!(code, 0);
    assert!(out.contains("identical"));

    let (code, out, _) = run(&["bitmap", "show", s(&f.bitmap), "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["dirty_regions"], 0);
    assert_eq!(v["header"]["device_size"], 16 * MIB);
    assert_eq!(v["header"]["granularity"], 65536);
    assert_eq!(v["header"]["state"], "clean");
    assert_eq!(v["header"]["pair"]["source"], s(&f.source));

    // A second sync copies nothing.
    let (code, out, _) = run(&["sync", "-s", s(&f.source), "-t", s(&f.target), "-b", s(&f.bitmap), "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["bytes_copied"], 0);
    assert_eq!(v["open"]["mode"], "resume");
}

#[test]
fn verify_reports_differences_and_bitmap_bugs() {
    let f = files(4 * MIB);
    fill_random(&f.source, 0, (4 * MIB) as usize, 2);
    assert_eq!(run(&["sync", "-s", s(&f.source), "-t", s(&f.target), "-b", s(&f.bitmap)]).0, 0);
    // Change the target behind the mirror's back: regions 3 and 40 differ, their bits are clear.
    fill_random(&f.target, 3 * 65536 + 100, 10, 3);
    fill_random(&f.target, 40 * 65536, 4096, 4);
    let (code, out, _) = run(&["verify", "-s", s(&f.source), "-t", s(&f.target)]);
    assert_eq!(code, 3, "differences without a bitmap: exit 3\n{out}");
    assert!(out.contains("2 regions") && out.contains("regions 3..3") && out.contains("regions 40..40"), "{out}");
    let (code, out, _) = run(&["verify", "-s", s(&f.source), "-t", s(&f.target), "-b", s(&f.bitmap)]);
    assert_eq!(code, 4, "differences in clean regions: exit 4\n{out}");
    assert!(out.contains("BUG") && out.contains("sync --full"), "{out}");
    let (code, out, _) = run(&["verify", "-s", s(&f.source), "-t", s(&f.target), "-b", s(&f.bitmap), "--json"]);
    assert_eq!(code, 4);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["differing_clean"], serde_json::json!([[3, 1], [40, 1]]));
    // The explicit repair.
    assert_eq!(run(&["sync", "-s", s(&f.source), "-t", s(&f.target), "-b", s(&f.bitmap), "--full"]).0, 0);
    assert_eq!(run(&["verify", "-s", s(&f.source), "-t", s(&f.target), "-b", s(&f.bitmap)]).0, 0);
}

#[test]
fn errors_are_clear_and_exit_1() {
    let f = files(4 * MIB);
    std::fs::OpenOptions::new().write(true).open(&f.target).unwrap().set_len(MIB).unwrap();
    let (code, out, err) = run(&["sync", "-s", s(&f.source), "-t", s(&f.target), "-b", s(&f.bitmap)]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("smaller than the source"), "{err}");
    assert!(!f.bitmap.exists());
    std::fs::OpenOptions::new().write(true).open(&f.target).unwrap().set_len(4 * MIB).unwrap();
    let (code, _, err) = run(&["sync", "-s", s(&f.source), "-t", s(&f.target), "-b", s(&f.bitmap), "-g", "3000"]);
    assert_eq!(code, 1);
    assert!(err.contains("power of two"), "{err}");
    let (code, _, err) = run(&["sync", "-s", s(&f.source), "-t", s(&f.target), "-b", s(&f.bitmap), "--full", "--assume-synced"]);
    assert_eq!(code, 2, "usage errors exit 2: {err}");
    std::fs::write(&f.bitmap, b"garbage garbage").unwrap();
    let (code, _, err) = run(&["bitmap", "show", s(&f.bitmap)]);
    assert_eq!(code, 1);
    assert!(err.contains("bitmap") && err.contains("fix:"), "{err}");
}

#[test]
fn assume_synced_copies_nothing() {
    let f = files(4 * MIB);
    fill_random(&f.source, 0, MIB as usize, 5);
    let (code, out, _) = run(&["sync", "-s", s(&f.source), "-t", s(&f.target), "-b", s(&f.bitmap), "--assume-synced", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["bytes_copied"], 0);
    // The user was wrong: verify says so (the bitmap claims clean).
    assert_eq!(run(&["verify", "-s", s(&f.source), "-t", s(&f.target), "-b", s(&f.bitmap)]).0, 4);
}

/// On a machine without the ublk driver (as this one), asking a device for its status names the
/// missing driver and what to do, not the control socket it could not reach.
#[test]
fn status_without_the_driver_names_the_driver() {
    assert!(
        !std::path::Path::new("/dev/ublk-control").exists(),
        "this test checks a machine without the ublk driver; this one has it"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
        .args(["status", "-n", "0"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("ublk driver is not loaded") && err.contains("modprobe ublk_drv"), "{err}");
    assert!(err.contains("scripts/try-in-vm.sh"), "{err}");
}

/// Without the driver `metrics` fails with the same advice as `status` and prints nothing on
/// standard output: a textfile-collector job that redirects it into a file must not publish an
/// empty or partial exposition as if it were the truth.
#[test]
fn metrics_without_the_driver_fails_and_prints_nothing() {
    assert!(
        !std::path::Path::new("/dev/ublk-control").exists(),
        "this test checks a machine without the ublk driver; this one has it"
    );
    let (code, out, err) = run(&["metrics"]);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("ublk driver is not loaded") && err.contains("modprobe ublk_drv"), "{err}");
}
