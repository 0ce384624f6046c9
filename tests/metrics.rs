//! `ublk-mirror metrics` output read by real Prometheus parsers: `promtool check metrics`
//! (Prometheus's own text parser and its naming lint) and the Python client's parser
//! (`prometheus_client.parser`), which gives the values and labels back. Both come from
//! scripts/deps.sh (Debian packages prometheus and python3-prometheus-client); a machine
//! without them fails these tests rather than skipping them.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use ublk_mirror::engine::Engine;
use ublk_mirror::daemon::metrics::{render, Device, Snapshot};

const MIB: u64 = 1 << 20;

/// Runs `cmd` with `input` on its standard input: (success, stdout, stderr).
fn feed(mut cmd: Command, input: &str) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} ({e}): run scripts/deps.sh"));
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).expect("write to the parser");
    drop(stdin);
    let out = child.wait_with_output().expect("wait for the parser");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn promtool() -> Command {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file());
    let path = found.unwrap_or_else(|| panic!("promtool not found in PATH: run scripts/deps.sh (it installs the Debian package prometheus)"));
    let mut c = Command::new(path);
    c.args(["check", "metrics"]);
    c
}

/// `promtool check metrics` on `text`: None if it finds nothing wrong, else what it said.
fn promtool_problems(text: &str) -> Option<String> {
    let (ok, out, err) = feed(promtool(), text);
    let said = format!("{out}{err}").trim().to_string();
    (!ok || !said.is_empty()).then_some(said)
}

/// Prints the parsed families as JSON: [[family name, type, [[sample name, labels, value]...]]...].
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append([f.name, f.type, [[s.name, s.labels, s.value] for s in f.samples]])
print(json.dumps(out))
"#;

/// A Python 3 that has prometheus_client: Debian's (scripts/deps.sh installs the module for it),
/// or the first `python3` in PATH.
fn python() -> Command {
    for p in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(p).args(["-c", "import prometheus_client"]).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if ok {
            let mut c = Command::new(p);
            c.args(["-c", PARSE]);
            return c;
        }
    }
    panic!("no python3 with the prometheus_client module: run scripts/deps.sh (it installs the Debian package python3-prometheus-client)");
}

fn parse(text: &str) -> Result<Vec<Value>, String> {
    let (ok, out, err) = feed(python(), text);
    if !ok {
        return Err(err);
    }
    serde_json::from_str::<Vec<Value>>(&out).map_err(|e| format!("{e}: {out}"))
}

/// The samples named `name` whose labels include `with`: (labels, value).
fn samples<'a>(families: &'a [Value], name: &str, with: &[(&str, &str)]) -> Vec<(&'a Value, f64)> {
    families
        .iter()
        .flat_map(|f| f[2].as_array().into_iter().flatten())
        .filter(|s| s[0] == name && with.iter().all(|(k, v)| s[1][k] == *v))
        .map(|s| (&s[1], s[2].as_f64().expect("a number")))
        .collect()
}

fn one(families: &[Value], name: &str, with: &[(&str, &str)]) -> f64 {
    let found = samples(families, name, with);
    assert_eq!(found.len(), 1, "{name} {with:?}: {found:?}");
    found[0].1
}

/// A daemon's status where every optional figure is present, for a device in trouble.
fn degraded() -> Snapshot {
    Snapshot {
        state: "degraded".into(),
        mode: "write-blocking (max-lag)".into(),
        device_size: 1 << 40,
        granularity: 1 << 20,
        dirty_bytes: 5 << 30,
        copying_bytes: 32 << 20,
        bytes_copied: u64::MAX >> 12,
        bytes_zeroed: 4096,
        consistent_points: 41,
        checkpoints: 3,
        last_consistent_age_secs: Some(12.25),
        last_consistent_unix_secs: Some(1_796_000_000.125),
        copy_errors: 17,
        target_flush_errors: 2,
        bitmap_flushes: 99,
        writes_in_flight: 4,
        progress: 0.25,
        rate: 123456.5,
        eta_secs: Some(3600.0),
        lag_secs: 42.5,
        speed: 200 << 20,
        busy_speed: 4 << 20,
        yielding: true,
        max_lag_secs: Some(30.0),
        target_failures: 19,
        degraded_secs: Some(61.0),
        shipping: None,
    }
}

/// Three devices: one from a real engine (its Status through the control socket's JSON, as
/// `metrics` gets it), named with every character the format escapes; one in trouble; one
/// whose daemon did not answer. Returns them with the real engine's status as JSON.
fn devices(f: &Files) -> (Vec<Device>, Value) {
    let (engine, _target, _open) = Engine::open(&f.pair(None, Some(65536))).expect("open");
    let engine = std::sync::Arc::new(engine);
    let info = json!({ "dev_id": 0, "bdev": "/dev/ublkb0", "name": "we\"ird\\name\nline 2" });
    let reply = ublk_mirror::daemon::control::handle(&json!({ "cmd": "status" }), &engine, &info);
    let listed = json!({ "dev_id": 0, "name": "stale", "source": "/old", "target": "/old", "state": "LIVE" });
    let (real, problem) = Device::from_replies(&listed, Ok(&reply));
    assert!(problem.is_none(), "{problem:?}");
    let trouble = Device {
        id: 1,
        name: "db".into(),
        source: "/dev/sdb".into(),
        target: "nbd://backup:10809/db".into(),
        ublk_state: "LIVE".into(),
        status: Some(degraded()),
    };
    let listed = json!({ "dev_id": 7, "name": "gone", "source": "/dev/sdc", "target": "/m/sdc.img", "state": "QUIESCED" });
    let (silent, problem) = Device::from_replies(&listed, Err("no daemon is serving device 7".into()));
    assert!(problem.is_some());
    (vec![real, trouble, silent], reply["status"].clone())
}

#[test]
fn promtool_and_the_python_parser_read_the_metrics_back() {
    let f = files(8 * MIB);
    let (devs, real) = devices(&f);
    let text = render(&devs);
    if let Some(p) = promtool_problems(&text) {
        panic!("promtool check metrics: {p}\n{text}");
    }
    let fams = parse(&text).unwrap_or_else(|e| panic!("the Python parser refused the metrics: {e}\n{text}"));

    // Every family: our prefix, a type, and counters (only they) with _total samples.
    let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
    assert_eq!(fams.len(), types, "families parsed");
    for fam in &fams {
        let name = fam[0].as_str().expect("name");
        assert!(name.starts_with("ublk_mirror_"), "{name}");
        for s in fam[2].as_array().expect("samples") {
            let sname = s[0].as_str().expect("sample name");
            match fam[1].as_str() {
                Some("counter") => assert_eq!(sname, format!("{name}_total")),
                Some("gauge") => assert_eq!(sname, name),
                t => panic!("{name}: type {t:?}"),
            }
        }
    }

    assert_eq!(one(&fams, "ublk_mirror_devices", &[]), 3.0);
    // The real engine: a new bitmap, so everything is dirty; the labels come back unescaped.
    let weird = [("device", "ublkb0"), ("name", "we\"ird\\name\nline 2")];
    let (labels, up) = samples(&fams, "ublk_mirror_up", &weird)[0];
    assert_eq!(up, 1.0);
    assert_eq!(labels["source"], json!(f.source), "the daemon's pair, not the listed one");
    assert_eq!(one(&fams, "ublk_mirror_dirty_bytes", &weird), real["dirty_bytes"].as_f64().expect("dirty"));
    assert_eq!(one(&fams, "ublk_mirror_dirty_bytes", &weird), (8 * MIB) as f64);
    assert_eq!(one(&fams, "ublk_mirror_device_size_bytes", &weird), (8 * MIB) as f64);
    assert_eq!(one(&fams, "ublk_mirror_bitmap_granularity_bytes", &weird), 65536.0);
    let state = real["state"].as_str().expect("state");
    assert_eq!(one(&fams, "ublk_mirror_state", &[("device", "ublkb0"), ("state", state)]), 1.0);
    let states = samples(&fams, "ublk_mirror_state", &[("device", "ublkb0")]);
    assert_eq!(states.iter().map(|s| s.1).sum::<f64>(), 1.0, "one state at a time: {states:?}");
    assert_eq!(states.len(), ublk_mirror::engine::STATES.len());
    assert!(samples(&fams, "ublk_mirror_last_consistent_timestamp_seconds", &weird).is_empty(), "no consistent point yet");

    // The device in trouble: every figure, as given.
    let db = [("device", "ublkb1"), ("target", "nbd://backup:10809/db")];
    let d = degraded();
    for (name, want) in [
        ("ublk_mirror_dirty_bytes", d.dirty_bytes as f64),
        ("ublk_mirror_copying_bytes", d.copying_bytes as f64),
        ("ublk_mirror_lag_seconds", d.lag_secs),
        ("ublk_mirror_copy_rate_bytes_per_second", d.rate),
        ("ublk_mirror_copied_bytes_total", d.bytes_copied as f64),
        ("ublk_mirror_consistent_points_total", d.consistent_points as f64),
        ("ublk_mirror_last_consistent_timestamp_seconds", 1_796_000_000.125),
        ("ublk_mirror_last_consistent_age_seconds", 12.25),
        ("ublk_mirror_copy_errors_total", 17.0),
        ("ublk_mirror_target_flush_errors_total", 2.0),
        ("ublk_mirror_target_failures", 19.0),
        ("ublk_mirror_degraded_seconds", 61.0),
        ("ublk_mirror_sync_eta_seconds", 3600.0),
        ("ublk_mirror_max_lag_seconds", 30.0),
        ("ublk_mirror_yielding", 1.0),
    ] {
        assert_eq!(one(&fams, name, &db), want, "{name}");
    }
    assert_eq!(one(&fams, "ublk_mirror_state", &[("device", "ublkb1"), ("state", "degraded")]), 1.0);
    assert_eq!(one(&fams, "ublk_mirror_state", &[("device", "ublkb1"), ("state", "synced")]), 0.0);
    assert_eq!(one(&fams, "ublk_mirror_copy_mode", &[("device", "ublkb1"), ("mode", "write-blocking (max-lag)")]), 1.0);

    // The silent daemon: up 0, its driver state, nothing else.
    let gone = [("device", "ublkb7"), ("name", "gone")];
    assert_eq!(one(&fams, "ublk_mirror_up", &gone), 0.0);
    assert_eq!(one(&fams, "ublk_mirror_ublk_state", &[("device", "ublkb7"), ("state", "quiesced")]), 1.0);
    assert!(samples(&fams, "ublk_mirror_state", &gone).is_empty());
    assert!(samples(&fams, "ublk_mirror_dirty_bytes", &gone).is_empty());
}

#[test]
fn no_device_is_valid_metrics_too() {
    let text = render(&[]);
    if let Some(p) = promtool_problems(&text) {
        panic!("promtool check metrics: {p}\n{text}");
    }
    let fams = parse(&text).expect("parse");
    assert_eq!(one(&fams, "ublk_mirror_devices", &[]), 0.0);
}

/// The parsers are not taking anything: broken variants of real output are refused (and so a
/// mistake in the renderer would fail the test above).
#[test]
fn the_parsers_refuse_broken_metrics() {
    let f = files(8 * MIB);
    let text = render(&devices(&f).0);
    assert!(promtool_problems(&text).is_none());
    let without_help: String = text.lines().filter(|l| !l.starts_with("# HELP ublk_mirror_dirty_bytes ")).map(|l| format!("{l}\n")).collect();
    let broken = [
        ("no HELP", without_help),
        ("a counter without _total", text.replace("ublk_mirror_copy_errors_total", "ublk_mirror_copy_errors")),
        ("a gauge with _total", text.replace("ublk_mirror_dirty_bytes", "ublk_mirror_dirty_bytes_total")),
        ("a bad name", text.replace("ublk_mirror_lag_seconds", "ublk-mirror_lag_seconds")),
        ("a non-base unit", text.replace("ublk_mirror_lag_seconds", "ublk_mirror_lag_milliseconds")),
        ("an unescaped newline in a label", text.replace("name\\nline 2", "name\nline 2")),
        ("a family split in two", format!("{text}# HELP ublk_mirror_up again\n# TYPE ublk_mirror_up gauge\nublk_mirror_up{{device=\"ublkb9\"}} 1\n")),
        ("a value that is not a number", text.replace("ublk_mirror_devices 3", "ublk_mirror_devices three")),
    ];
    for (what, t) in &broken {
        assert_ne!(t, &text, "{what}: the mutation changed nothing");
        assert!(promtool_problems(t).is_some(), "promtool took {what}:\n{t}");
    }
    // The Python parser is lenient about names and layout (promtool is not), strict about syntax.
    for (what, t) in broken.iter().filter(|(w, _)| w.starts_with("an unescaped") || w.starts_with("a value")) {
        assert!(parse(t).is_err(), "the Python parser took {what}:\n{t}");
    }
}
