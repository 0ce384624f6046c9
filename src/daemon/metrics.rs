//! `ublk-mirror metrics`: every device's state in the Prometheus text exposition format
//! (version 0.0.4), for node_exporter's textfile collector.
//!
//! [`render`] is pure (snapshots in, text out) so that it is tested without the ublk driver;
//! [`collect`] asks the driver for the devices and each daemon for its status.
//!
//! Conventions the output keeps (and tests/metrics.rs checks with `promtool check metrics` and
//! the Python client's parser): every name starts with `ublk_mirror_`; values are in base
//! units (bytes, seconds, ratios); counters end in `_total`; each family has one HELP and one
//! TYPE line and its samples together; no sample has a timestamp (the textfile collector
//! refuses them). Every series of a device carries the same labels, `device`, `name`,
//! `source`, `target` (enum gauges add `state` or `mode`). A value the daemon does not have
//! (no consistent point yet, no ETA, max-lag off) is left out rather than given a made-up
//! number. A device whose daemon does not answer has `ublk_mirror_up 0` and its driver state,
//! nothing more.

use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::Value;
use std::fmt::Write as _;

/// States of a device in the ublk driver ([`crate::daemon::saved::UblkState`], lower case).
pub const UBLK_STATES: [&str; 3] = ["live", "quiesced", "dead"];

/// The fields of [`crate::engine::Status`] that become metrics, read back from its JSON (the
/// control socket's `status` member). An `Option` is absent from a daemon that predates it.
#[derive(Clone, Debug, Deserialize)]
pub struct Snapshot {
    pub state: String,
    pub mode: String,
    pub device_size: u64,
    pub granularity: u64,
    pub dirty_bytes: u64,
    pub copying_bytes: u64,
    pub bytes_copied: u64,
    pub bytes_zeroed: u64,
    pub consistent_points: u64,
    pub checkpoints: u64,
    pub last_consistent_age_secs: Option<f64>,
    pub last_consistent_unix_secs: Option<f64>,
    pub copy_errors: u64,
    pub target_flush_errors: u64,
    pub bitmap_flushes: u64,
    pub writes_in_flight: u64,
    pub progress: f64,
    pub rate: f64,
    pub eta_secs: Option<f64>,
    pub lag_secs: f64,
    pub speed: u64,
    pub busy_speed: u64,
    pub yielding: bool,
    pub max_lag_secs: Option<f64>,
    pub target_failures: u64,
    pub degraded_secs: Option<f64>,
    /// Async mode's figures (absent in other modes, and from older daemons).
    #[serde(default)]
    pub shipping: Option<ShipSnapshot>,
}

/// The fields of [`crate::engine::ShipStatus`] that become metrics.
#[derive(Clone, Debug, Deserialize)]
pub struct ShipSnapshot {
    pub buffer_bytes: u64,
    pub buffer_used_bytes: u64,
    pub shipped_bytes: u64,
    pub epochs: u64,
    pub fell_behind: u64,
}

/// One device as `metrics` reports it.
#[derive(Clone, Debug)]
pub struct Device {
    /// N of /dev/ublkbN.
    pub id: u32,
    pub name: String,
    pub source: String,
    pub target: String,
    /// The driver's state of the device (`LIVE`, `QUIESCED`, `DEAD`, any case).
    pub ublk_state: String,
    /// What its daemon said; `None`: it did not answer.
    pub status: Option<Snapshot>,
}

impl Device {
    /// A device from its entry in [`crate::daemon::saved::list`] and its daemon's reply to `status`
    /// (the reply's pair wins: a reverse switchover swaps it). A reply without a readable
    /// status counts as no answer; the error says why.
    pub fn from_replies(listed: &Value, reply: std::result::Result<&Value, String>) -> (Device, Option<String>) {
        let id = listed["dev_id"].as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or(u32::MAX);
        let text = |v: &Value, k: &str| v[k].as_str().map(String::from);
        let mut d = Device {
            id,
            name: text(listed, "name").unwrap_or_default(),
            source: text(listed, "source").unwrap_or_default(),
            target: text(listed, "target").unwrap_or_default(),
            ublk_state: text(listed, "state").unwrap_or_default(),
            status: None,
        };
        let reply = match reply {
            Ok(r) => r,
            Err(e) => return (d, Some(e)),
        };
        match Snapshot::deserialize(&reply["status"]) {
            Ok(s) => {
                d.status = Some(s);
                for (field, k) in [(&mut d.name, "name"), (&mut d.source, "source"), (&mut d.target, "target")] {
                    if let Some(v) = text(reply, k) {
                        *field = v;
                    }
                }
                (d, None)
            }
            Err(e) => (
                d,
                Some(format!(
                    "device {id}: its daemon's status cannot be read ({e}); a daemon of another \
                     version? `ublk-mirror status -n {id} --json` shows what it sends"
                )),
            ),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

#[derive(Clone, Copy)]
enum Num {
    U(u64),
    F(f64),
}

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Num::U(n) => write!(f, "{n}"),
            Num::F(x) if x.is_nan() => f.write_str("NaN"),
            Num::F(x) if x == f64::INFINITY => f.write_str("+Inf"),
            Num::F(x) if x == f64::NEG_INFINITY => f.write_str("-Inf"),
            // Debug: the shortest text that reads back as the same number (an exponent for
            // very large or small ones), which Go's and Python's parsers both take.
            Num::F(x) => write!(f, "{x:?}"),
        }
    }
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// HELP text as the format wants it: backslash and newline escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn labels(d: &Device, extra: Option<(&str, &str)>) -> String {
    let mut s = format!(
        "{{device=\"ublkb{}\",name=\"{}\",source=\"{}\",target=\"{}\"",
        d.id,
        escape_label(&d.name),
        escape_label(&d.source),
        escape_label(&d.target)
    );
    if let Some((k, v)) = extra {
        let _ = write!(s, ",{k}=\"{}\"", escape_label(v));
    }
    s.push('}');
    s
}

/// One family: HELP, TYPE, then its samples (label set, value).
fn family(out: &mut String, name: &str, kind: Kind, help: &str, samples: impl IntoIterator<Item = (String, Num)>) {
    let kind = match kind {
        Kind::Gauge => "gauge",
        Kind::Counter => "counter",
    };
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (l, v) in samples {
        let _ = writeln!(out, "{name}{l} {v}");
    }
}

/// An enum as gauges: one series per value in `known` (plus `current` if it is not among
/// them), 1 for `current`, 0 for the others (node_exporter's md state does the same).
fn one_hot<'a>(d: &'a Device, label: &'a str, known: &'a [&'a str], current: &'a str) -> impl Iterator<Item = (String, Num)> + 'a {
    let unknown = (!known.contains(&current)).then_some(current);
    known.iter().copied().chain(unknown).map(move |v| (labels(d, Some((label, v))), Num::U((v == current) as u64)))
}

/// The exposition of `devices` (in the order given; the caller sorts them). With no device it
/// is `ublk_mirror_devices 0` and the other families' HELP and TYPE lines.
pub fn render(devices: &[Device]) -> String {
    let mut out = String::new();
    family(&mut out, "ublk_mirror_devices", Kind::Gauge, "ublk-mirror devices the ublk driver has.", [(String::new(), Num::U(devices.len() as u64))]);
    family(
        &mut out,
        "ublk_mirror_up",
        Kind::Gauge,
        "1 if the device's daemon answered on its control socket; 0 if not (its other metrics are then absent; ublk_mirror_ublk_state says whether the daemon died).",
        devices.iter().map(|d| (labels(d, None), Num::U(d.status.is_some() as u64))),
    );
    family(
        &mut out,
        "ublk_mirror_ublk_state",
        Kind::Gauge,
        "The device in the ublk driver, 1 for its current state: live (served), quiesced (its daemon died: I/O waits for `ublk-mirror recover`), dead.",
        devices.iter().flat_map(|d| {
            let now = d.ublk_state.to_ascii_lowercase();
            let known = UBLK_STATES.iter().copied();
            let extra = (!UBLK_STATES.contains(&now.as_str())).then(|| now.clone());
            known.map(String::from).chain(extra).map(move |v| (labels(d, Some(("state", &v))), Num::U((v == now) as u64)))
        }),
    );
    let live = || devices.iter().filter_map(|d| d.status.as_ref().map(|s| (d, s)));
    family(
        &mut out,
        "ublk_mirror_state",
        Kind::Gauge,
        "The mirror, 1 for its current state: synced (the target holds every completed write), syncing, paused, degraded (the target fails; retrying), failed (the copy loop failed and restarts), stopped (gave up after --max-retries), switched-over.",
        live().flat_map(|(d, s)| one_hot(d, "state", &crate::engine::STATES, &s.state)),
    );
    family(
        &mut out,
        "ublk_mirror_copy_mode",
        Kind::Gauge,
        "How writes reach the target, 1 for the current mode: background (copied behind the source), write-blocking (written to both before completing), write-blocking (max-lag) (switched on by --max-lag), async (shipped to the target in order from a replication buffer), async (behind) (fell back to the background copy until caught up).",
        live().flat_map(|(d, s)| one_hot(d, "mode", &crate::engine::MODES, &s.mode)),
    );
    // Families of one value per answering device; None leaves the device's sample out.
    type Get = fn(&Snapshot) -> Option<Num>;
    let plain: [(&str, Kind, &str, Get); 29] = [
        ("ublk_mirror_device_size_bytes", Kind::Gauge, "Size of the device (and of the mirrored part of the target).", |s| Some(Num::U(s.device_size))),
        ("ublk_mirror_bitmap_granularity_bytes", Kind::Gauge, "Size of the region one bit of the dirty bitmap stands for.", |s| Some(Num::U(s.granularity))),
        ("ublk_mirror_dirty_bytes", Kind::Gauge, "Bytes in regions written on the source and not yet copied to the target (not counting those being copied).", |s| Some(Num::U(s.dirty_bytes))),
        ("ublk_mirror_copying_bytes", Kind::Gauge, "Bytes in regions being copied to the target now.", |s| Some(Num::U(s.copying_bytes))),
        ("ublk_mirror_lag_seconds", Kind::Gauge, "How long the target has been behind the source (0 when synced).", |s| Some(Num::F(s.lag_secs))),
        ("ublk_mirror_copy_rate_bytes_per_second", Kind::Gauge, "Copy rate over the last seconds (data copied and holes zeroed).", |s| Some(Num::F(s.rate))),
        ("ublk_mirror_sync_progress_ratio", Kind::Gauge, "Share of this sync episode's work done, 0 to 1 (1 when synced).", |s| Some(Num::F(s.progress))),
        ("ublk_mirror_sync_eta_seconds", Kind::Gauge, "Time to synced at the current rate (absent when synced, paused or not copying).", |s| s.eta_secs.map(Num::F)),
        ("ublk_mirror_copied_bytes_total", Kind::Counter, "Bytes of data copied to the target since the daemon started (a region copied again counts again).", |s| Some(Num::U(s.bytes_copied))),
        ("ublk_mirror_zeroed_bytes_total", Kind::Counter, "Bytes of holes zeroed on the target since the daemon started.", |s| Some(Num::U(s.bytes_zeroed))),
        ("ublk_mirror_consistent_points_total", Kind::Counter, "Consistent points (the target held every completed write, made durable) since the daemon started.", |s| Some(Num::U(s.consistent_points))),
        ("ublk_mirror_last_consistent_timestamp_seconds", Kind::Gauge, "When the last consistent point was made, in seconds since the Unix epoch (absent before the first).", |s| s.last_consistent_unix_secs.map(Num::F)),
        ("ublk_mirror_last_consistent_age_seconds", Kind::Gauge, "Age of the last consistent point when the metrics were read (absent before the first; prefer time() - ublk_mirror_last_consistent_timestamp_seconds, which does not go stale).", |s| s.last_consistent_age_secs.map(Num::F)),
        ("ublk_mirror_checkpoints_total", Kind::Counter, "Checkpoints (copy progress made durable on the target and in the bitmap) since the daemon started.", |s| Some(Num::U(s.checkpoints))),
        ("ublk_mirror_copy_errors_total", Kind::Counter, "Failed copies to the target since the daemon started.", |s| Some(Num::U(s.copy_errors))),
        ("ublk_mirror_target_flush_errors_total", Kind::Counter, "Failed flushes of the target since the daemon started.", |s| Some(Num::U(s.target_flush_errors))),
        ("ublk_mirror_target_failures", Kind::Gauge, "Failures of the target in a row (copies, flushes or the copy loop); 0 once it works again.", |s| Some(Num::U(s.target_failures))),
        ("ublk_mirror_degraded_seconds", Kind::Gauge, "How long the target has been failing (absent while it works).", |s| s.degraded_secs.map(Num::F)),
        ("ublk_mirror_bitmap_flushes_total", Kind::Counter, "Writes of the dirty bitmap made durable since the daemon started.", |s| Some(Num::U(s.bitmap_flushes))),
        ("ublk_mirror_writes_in_flight", Kind::Gauge, "Writes to the device under way.", |s| Some(Num::U(s.writes_in_flight))),
        ("ublk_mirror_speed_limit_bytes_per_second", Kind::Gauge, "Copy bandwidth limit, --speed (0: none).", |s| Some(Num::U(s.speed))),
        ("ublk_mirror_busy_speed_limit_bytes_per_second", Kind::Gauge, "Copy bandwidth limit while the device serves I/O, --busy-speed (0: none).", |s| Some(Num::U(s.busy_speed))),
        ("ublk_mirror_yielding", Kind::Gauge, "1 while the copy is held to --busy-speed because the device serves I/O.", |s| Some(Num::U(s.yielding as u64))),
        ("ublk_mirror_max_lag_seconds", Kind::Gauge, "--max-lag: write-blocking goes on when the target is behind for longer (absent when off).", |s| s.max_lag_secs.map(Num::F)),
        ("ublk_mirror_async_buffer_bytes", Kind::Gauge, "Async mode: size of the replication buffer, --async-buffer (absent in other modes).", |s| s.shipping.as_ref().map(|x| Num::U(x.buffer_bytes))),
        ("ublk_mirror_async_buffer_used_bytes", Kind::Gauge, "Async mode: bytes of writes in the replication buffer, not yet on the target.", |s| s.shipping.as_ref().map(|x| Num::U(x.buffer_used_bytes))),
        ("ublk_mirror_shipped_bytes_total", Kind::Counter, "Async mode: bytes of writes shipped to the target from the replication buffer since the daemon started.", |s| s.shipping.as_ref().map(|x| Num::U(x.shipped_bytes))),
        ("ublk_mirror_async_epochs_total", Kind::Counter, "Async mode: epochs (writes between two flushes of the device) since the daemon started.", |s| s.shipping.as_ref().map(|x| Num::U(x.epochs))),
        ("ublk_mirror_async_fell_behind_total", Kind::Counter, "Async mode: times shipping fell back to the background copy (buffer full, target failing).", |s| s.shipping.as_ref().map(|x| Num::U(x.fell_behind))),
    ];
    for (name, kind, help, get) in plain {
        family(&mut out, name, kind, help, live().filter_map(|(d, s)| get(s).map(|v| (labels(d, None), v))));
    }
    out
}

/// Every ublk-mirror device, sorted by id, with its daemon's status where it answers, and a
/// message for each that does not. Errors only when the devices cannot be listed at all.
pub fn collect() -> Result<(Vec<Device>, Vec<String>)> {
    crate::daemon::start::check_environment()?;
    let mut listed = crate::daemon::saved::list();
    listed.sort_by_key(|d| d.dev_id);
    let mut devices = Vec::new();
    let mut problems = Vec::new();
    for l in &listed {
        let reply = crate::daemon::admin::read_status(l.dev_id).map_err(|e: Error| e.to_string());
        let (d, problem) = Device::from_replies(&l.to_json(), reply.as_ref().map_err(Clone::clone));
        devices.push(d);
        problems.extend(problem);
    }
    Ok((devices, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(state: &str) -> Snapshot {
        Snapshot {
            state: state.into(),
            mode: "background".into(),
            device_size: 1 << 30,
            granularity: 65536,
            dirty_bytes: 3 << 16,
            copying_bytes: 0,
            bytes_copied: 12345,
            bytes_zeroed: 0,
            consistent_points: 7,
            checkpoints: 2,
            last_consistent_age_secs: Some(1.5),
            last_consistent_unix_secs: Some(1.7e9),
            copy_errors: 0,
            target_flush_errors: 0,
            bitmap_flushes: 9,
            writes_in_flight: 0,
            progress: 0.5,
            rate: 1e6,
            eta_secs: None,
            lag_secs: 2.0,
            speed: 0,
            busy_speed: 4 << 20,
            yielding: false,
            max_lag_secs: None,
            target_failures: 0,
            degraded_secs: None,
            shipping: None,
        }
    }

    /// Async mode's figures are exported from a real status (read back through its JSON, as
    /// the control socket sends it), and absent in other modes.
    #[test]
    fn async_figures_become_metrics_only_in_async_mode() {
        let f = tempfile::tempdir().expect("dir");
        let (src, tgt) = (f.path().join("s"), f.path().join("t"));
        for p in [&src, &tgt] {
            std::fs::File::create(p).and_then(|x| x.set_len(1 << 20)).expect("file");
        }
        let pair = crate::engine::PairOptions {
            source: src,
            target: tgt,
            bitmap: f.path().join("b"),
            mode: Some(crate::engine::SyncMode::AssumeIdentical),
            granularity: None,
            direct: crate::io::backing::DirectMode::Auto,
            source_writable: true,
            tls: Default::default(),
        };
        let (engine, _t, _) = crate::engine::Engine::open(&pair).expect("open");
        let read = |e: &crate::engine::Engine| -> Snapshot {
            serde_json::from_value(serde_json::to_value(e.status()).expect("json")).expect("snapshot")
        };
        let out = render(&[device(0, Some(read(&engine)))]);
        assert!(!out.lines().any(|l| l.starts_with("ublk_mirror_async_buffer_bytes{")), "{out}");
        engine.apply_settings(&crate::engine::Settings {
            mode: Some(crate::engine::CopyMode::Async),
            async_buffer: 8 << 20,
            ..Default::default()
        });
        let out = render(&[device(0, Some(read(&engine)))]);
        assert!(out.contains("ublk_mirror_async_buffer_bytes{device=\"ublkb0\",name=\"d\",source=\"/s\",target=\"/t\"} 8388608\n"), "{out}");
        assert!(out.lines().any(|l| l.starts_with("ublk_mirror_shipped_bytes_total{") && l.ends_with(" 0")), "{out}");
        assert!(out.lines().any(|l| l.starts_with("ublk_mirror_copy_mode{") && l.contains("mode=\"async (behind)\"") && l.ends_with(" 1")), "{out}");
    }

    fn device(id: u32, status: Option<Snapshot>) -> Device {
        Device { id, name: "d".into(), source: "/s".into(), target: "/t".into(), ublk_state: "LIVE".into(), status }
    }

    #[test]
    fn escaping_covers_what_the_format_names() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(escape_help("a\\b\nc\""), "a\\\\b\\nc\"");
    }

    #[test]
    fn numbers_read_back() {
        for (n, s) in [(Num::U(u64::MAX), "18446744073709551615"), (Num::F(f64::NAN), "NaN"), (Num::F(f64::INFINITY), "+Inf"),
            (Num::F(f64::NEG_INFINITY), "-Inf"), (Num::F(0.5), "0.5"), (Num::F(2.0), "2.0"), (Num::F(1e300), "1e300")]
        {
            assert_eq!(n.to_string(), s);
        }
    }

    #[test]
    fn state_is_one_hot_and_an_unknown_state_is_kept() {
        let out = render(&[device(0, Some(snapshot("synced"))), device(1, Some(snapshot("resharding")))]);
        let ones: Vec<&str> = out.lines().filter(|l| l.starts_with("ublk_mirror_state{") && l.ends_with(" 1")).collect();
        assert_eq!(ones.len(), 2, "{out}");
        assert!(ones[0].contains("device=\"ublkb0\"") && ones[0].contains("state=\"synced\""), "{out}");
        assert!(ones[1].contains("state=\"resharding\""), "{out}");
        let zeros = out.lines().filter(|l| l.starts_with("ublk_mirror_state{") && l.ends_with(" 0")).count();
        assert_eq!(zeros, 2 * crate::engine::STATES.len() - 1, "{out}");
    }

    #[test]
    fn a_silent_daemon_is_up_0_and_nothing_more() {
        let out = render(&[device(3, None)]);
        assert!(out.contains("ublk_mirror_devices 1\n"), "{out}");
        assert!(out.contains("ublk_mirror_up{device=\"ublkb3\",name=\"d\",source=\"/s\",target=\"/t\"} 0\n"), "{out}");
        assert!(out.contains("ublk_mirror_ublk_state{device=\"ublkb3\",name=\"d\",source=\"/s\",target=\"/t\",state=\"live\"} 1\n"), "{out}");
        let samples: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(samples.len(), 1 + 1 + UBLK_STATES.len(), "{out}");
    }

    #[test]
    fn no_device_gives_families_and_a_zero() {
        let out = render(&[]);
        let samples: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(samples, ["ublk_mirror_devices 0"]);
        assert!(out.contains("# TYPE ublk_mirror_dirty_bytes gauge\n"));
    }

    #[test]
    fn a_reply_without_a_status_is_no_answer() {
        let listed = serde_json::json!({ "dev_id": 2, "name": "n", "source": "/a", "target": "/b", "state": "LIVE" });
        let (d, problem) = Device::from_replies(&listed, Ok(&serde_json::json!({ "ok": true })));
        assert!(d.status.is_none() && problem.is_some_and(|p| p.contains("device 2")));
        let (d, problem) = Device::from_replies(&listed, Err("no daemon".into()));
        assert!(d.status.is_none() && problem.as_deref() == Some("no daemon") && d.source == "/a");
        let (d, problem) = Device::from_replies(&serde_json::json!(null), Err("x".into()));
        assert!(d.status.is_none() && problem.is_some() && d.name.is_empty());
    }
}
