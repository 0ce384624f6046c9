//! What a device's saved state says: the configuration a daemon saves with the driver (read
//! back by `recover`, `up` and `list`), the driver's state of a device, and the entry `add`,
//! `list`, `up` and `recover` print. Files written by earlier versions still parse: every field
//! may be absent.

use crate::engine::Settings;
use crate::error::{Error, Result};
use libublk::ctrl::UblkCtrl;
use libublk::{sys, UblkFlags};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::PathBuf;

/// A device's state in the ublk driver (the `state` of its `dev_info`, `UBLK_S_DEV_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UblkState {
    /// A daemon serves its I/O.
    Live,
    /// Its daemon died (the device has user recovery): I/O waits for `recover`.
    Quiesced,
    /// Stopped, or not started yet.
    Dead,
    /// A state this program does not know (a newer driver's, such as FAIL_IO).
    Unknown(u16),
}

impl UblkState {
    pub fn from_driver(state: u16) -> UblkState {
        match u32::from(state) {
            sys::UBLK_S_DEV_LIVE => UblkState::Live,
            sys::UBLK_S_DEV_QUIESCED => UblkState::Quiesced,
            sys::UBLK_S_DEV_DEAD => UblkState::Dead,
            _ => UblkState::Unknown(state),
        }
    }

    /// The name the JSON and the messages show (libublk's own names; every unknown state is
    /// UNKNOWN, which scripts may match).
    pub fn name(self) -> &'static str {
        match self {
            UblkState::Live => "LIVE",
            UblkState::Quiesced => "QUIESCED",
            UblkState::Dead => "DEAD",
            UblkState::Unknown(_) => "UNKNOWN",
        }
    }
}

impl std::fmt::Display for UblkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for UblkState {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// What a daemon saves in its device's libublk JSON (`target_data` of
/// /run/ublksrvd/NNNN.json), read back by `recover`, `list` and udev. Every field may be absent:
/// a device added by an older version lacks the later ones, and one of another ublk program
/// has none of them (`list` skips a device without a bitmap). A setting that is absent or
/// unreadable falls back to its default rather than refusing the recovery.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub source: Option<PathBuf>,
    #[serde(default)]
    pub target: Option<PathBuf>,
    #[serde(default)]
    pub bitmap: Option<PathBuf>,
    /// Live settings at the start (the recovered daemon's); `hook` is not among them.
    #[serde(default, deserialize_with = "lenient")]
    pub settings: Option<Settings>,
    #[serde(default, deserialize_with = "lenient")]
    pub on_consistent: Option<SavedHook>,
    /// `None` (from before `--affinity`): [`QueueAffinity::Single`], what such devices had.
    #[serde(default, deserialize_with = "lenient")]
    pub affinity: Option<QueueAffinity>,
    /// Where the daemon writes its event log (`add --event-log`, or the default), so that a
    /// recovered daemon goes on writing there. `None` (from before it was saved): the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_log: Option<PathBuf>,
    /// The TLS files of an `nbds://` target, for the recovered daemon's connections.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub tls: Option<crate::io::nbd::tls::TlsFiles>,
}

impl SavedConfig {
    /// The saved configuration of device `id` for its recovery, from its JSON. One that does not
    /// parse is another program's (the default: nothing). TLS settings that do not parse must
    /// not become "no TLS files", which would verify the server against the system's trust store
    /// instead of the CA the mirror was added with: refused.
    pub(super) fn for_recovery(id: u32, data: serde_json::Value) -> Result<SavedConfig> {
        let tls_saved = data.get("tls").is_some_and(|v| !v.is_null());
        let saved: SavedConfig = serde_json::from_value(data).unwrap_or_default();
        if tls_saved && saved.tls.is_none() {
            return Err(Error::config(format!(
                "device {id}: its saved TLS settings cannot be read: remove it (ublk-mirror del -n {id}) and add \
                 it again with its --tls-ca, --tls-cert and --tls-key"
            )));
        }
        Ok(saved)
    }

    /// The saved configuration of device `c`; the default (nothing) when it has none or it is
    /// not one ublk-mirror can read.
    pub(super) fn of(c: &UblkCtrl) -> SavedConfig {
        c.get_target_data_from_json().and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default()
    }
}

/// The `--on-consistent` command as saved. Its environment names the device and the pair, so
/// the recovered daemon makes it anew.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedHook {
    pub command: String,
    #[serde(default = "hook_ms_default", deserialize_with = "hook_ms")]
    pub interval_ms: u64,
    #[serde(default = "hook_ms_default", deserialize_with = "hook_ms")]
    pub timeout_ms: u64,
}

impl SavedHook {
    pub(super) fn new(h: &crate::engine::OnConsistentCommand) -> SavedHook {
        SavedHook {
            command: h.command.clone(),
            interval_ms: h.interval.as_millis() as u64,
            timeout_ms: h.timeout.as_millis() as u64,
        }
    }
}

/// A saved hook's interval or timeout when it is absent or not a number of milliseconds.
fn hook_ms_default() -> u64 {
    60_000
}

fn hook_ms<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    Ok(lenient(d)?.unwrap_or_else(hook_ms_default))
}

/// A field that reads as `None` when it does not parse, instead of failing the whole file.
fn lenient<'de, D: Deserializer<'de>, T: serde::de::DeserializeOwned>(d: D) -> std::result::Result<Option<T>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

/// libublk's JSON file of a device (/run/ublksrvd/NNNN.json), the part of it this program reads.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ExportedDevice {
    #[serde(default)]
    pub(super) target_data: Option<SavedConfig>,
}

/// A device as `list`, `add`, `up` and `recover` print it (JSON). The fields are in the
/// alphabetical order of their keys, the order the output has always had (that of a serde_json
/// map); scripts and the VM tests read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceEntry {
    /// /dev/ublkbN.
    pub bdev: String,
    pub bitmap: Option<PathBuf>,
    pub depth: u16,
    pub dev_id: u32,
    /// The daemon's log: given by `add` and `recover`, which start a daemon.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    pub name: Option<String>,
    /// The daemon's pid as the driver has it: that of the dead daemon for a QUIESCED device.
    pub pid: i32,
    pub queues: u16,
    pub source: Option<PathBuf>,
    pub state: UblkState,
    pub target: Option<PathBuf>,
}

impl DeviceEntry {
    /// The driver's view of a device and its saved configuration.
    pub fn of(c: &UblkCtrl) -> DeviceEntry {
        let i = c.dev_info();
        DeviceEntry::from_parts(&i, c.get_bdev_path(), SavedConfig::of(c))
    }

    pub(super) fn from_parts(i: &sys::ublksrv_ctrl_dev_info, bdev: String, saved: SavedConfig) -> DeviceEntry {
        DeviceEntry {
            bdev,
            bitmap: saved.bitmap,
            depth: i.queue_depth,
            dev_id: i.dev_id,
            log: None,
            name: saved.name,
            pid: i.ublksrv_pid,
            queues: i.nr_hw_queues,
            source: saved.source,
            state: UblkState::from_driver(i.state),
            target: saved.target,
        }
    }

    /// The entry as a JSON value. Its paths came from JSON strings, so they are UTF-8 and it
    /// always serializes; were one not, the value would be null.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// Where the queue threads run (`add --affinity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueAffinity {
    /// Each queue thread pinned to one CPU of its queue's set, as rublk and ublksrv do by
    /// default. Its io_uring workers (which run I/O the file system cannot start without
    /// blocking) inherit the pin, so they share that CPU with it: requests are handed over
    /// without waking another CPU.
    Single,
    /// Queue threads and their workers float over the queue's CPUs: a write-blocking
    /// mirror's two writes (source and target) can then use two CPUs at once.
    All,
}

impl QueueAffinity {
    pub(super) fn dev_flags(self) -> UblkFlags {
        match self {
            QueueAffinity::Single => UblkFlags::UBLK_DEV_F_SINGLE_CPU_AFFINITY,
            QueueAffinity::All => UblkFlags::empty(),
        }
    }
}

/// Checks a user-given name: it becomes a path component under /dev/disk/by-ublk-mirror.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "device name {name:?} is not valid: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}
/// All ublk-mirror devices (those with a bitmap in their saved configuration).
pub fn list() -> Vec<DeviceEntry> {
    let out = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let o = out.clone();
    UblkCtrl::for_each_dev_id(move |id| {
        // (libublk asserts a non-negative id: ublk_number refuses what would wrap.)
        if let Some(c) = crate::daemon::start::ublk_number(id).ok().and_then(|n| UblkCtrl::new_simple(n).ok()) {
            let d = DeviceEntry::of(&c);
            if d.bitmap.is_some() {
                o.borrow_mut().push(d);
            }
        }
    });
    let v = out.borrow().clone();
    v
}

/// The ublk-mirror device with this name, if any.
pub fn find_by_name(name: &str) -> Option<DeviceEntry> {
    list().into_iter().find(|d| d.name.as_deref() == Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    /// The device JSON as it was built before [`DeviceEntry`] (a `json!` object over the
    /// untyped saved configuration): the reference for the printed shape.
    fn untyped_entry(i: &sys::ublksrv_ctrl_dev_info, bdev: &str, data: &serde_json::Value, log: Option<&str>) -> String {
        let mut v = json!({
            "dev_id": i.dev_id,
            "bdev": bdev,
            "name": data["name"],
            "state": UblkState::from_driver(i.state).name(),
            "source": data["source"], "target": data["target"], "bitmap": data["bitmap"],
            "queues": i.nr_hw_queues, "depth": i.queue_depth, "pid": i.ublksrv_pid,
        });
        if let Some(log) = log {
            v["log"] = json!(log);
        }
        serde_json::to_string_pretty(&v).expect("a JSON value prints")
    }

    fn dev_info(state: u32) -> sys::ublksrv_ctrl_dev_info {
        sys::ublksrv_ctrl_dev_info {
            nr_hw_queues: 2,
            queue_depth: 128,
            state: state as u16,
            dev_id: 7,
            ublksrv_pid: 4242,
            ..Default::default()
        }
    }

    /// The configuration `serve` saves, as it wrote it before [`SavedConfig`].
    fn saved_now() -> serde_json::Value {
        json!({
            "name": "disk", "source": "/dev/sda", "target": "/srv/disk.img", "bitmap": "/var/lib/m/disk.bitmap",
            "settings": Settings { speed: 5, busy_speed: 1, paused: false, mode: None, max_lag_ms: 0, max_retries: 3, async_buffer: 0, hook: None },
            "on_consistent": { "command": "snap", "interval_ms": 1000, "timeout_ms": 2000 },
            "affinity": QueueAffinity::All,
        })
    }

    #[test]
    fn device_entry_prints_as_the_untyped_json_did() {
        let older = json!({ "source": "/a", "target": "/b", "bitmap": "/c" });
        let foreign = json!({ "backing_file": "/x", "direct_io": 1 });
        for data in [saved_now(), older, foreign, serde_json::Value::Null] {
            let saved: SavedConfig = serde_json::from_value(data.clone()).unwrap_or_default();
            for state in [sys::UBLK_S_DEV_LIVE, sys::UBLK_S_DEV_QUIESCED, sys::UBLK_S_DEV_DEAD, 3] {
                let i = dev_info(state);
                let mut d = DeviceEntry::from_parts(&i, "/dev/ublkb7".into(), saved.clone());
                let printed = serde_json::to_string_pretty(&d).expect("prints");
                assert_eq!(printed, untyped_entry(&i, "/dev/ublkb7", &data, None), "{data}");
                assert_eq!(serde_json::to_string_pretty(&d.to_json()).expect("prints"), printed);
                d.log = Some("/run/ublk-mirror/daemon-9.log".into());
                let printed = serde_json::to_string_pretty(&d).expect("prints");
                assert_eq!(printed, untyped_entry(&i, "/dev/ublkb7", &data, Some("/run/ublk-mirror/daemon-9.log")));
                // What the VM scenarios grep for.
                assert!(printed.contains(&format!("\"state\": \"{}\"", d.state)) && printed.contains("\"pid\": 4242"));
            }
        }
        let list = vec![DeviceEntry::from_parts(&dev_info(1), "/dev/ublkb7".into(), serde_json::from_value(saved_now()).expect("parses"))];
        let untyped = json!([serde_json::from_str::<serde_json::Value>(&untyped_entry(&dev_info(1), "/dev/ublkb7", &saved_now(), None)).expect("json")]);
        assert_eq!(serde_json::to_string_pretty(&list).expect("prints"), serde_json::to_string_pretty(&untyped).expect("prints"));
    }

    #[test]
    fn ublk_states_keep_their_names() {
        let names: Vec<String> = (0..5).map(|s| UblkState::from_driver(s).to_string()).collect();
        assert_eq!(names, ["DEAD", "LIVE", "QUIESCED", "UNKNOWN", "UNKNOWN"]);
        assert_eq!(UblkState::from_driver(3), UblkState::Unknown(3));
        assert_eq!(json!(UblkState::Quiesced), json!("QUIESCED"));
    }

    #[test]
    fn saved_configuration_reads_every_version_and_writes_the_same_json() {
        let v = saved_now();
        let saved: SavedConfig = serde_json::from_value(v.clone()).expect("current format");
        assert_eq!(saved.name.as_deref(), Some("disk"));
        assert_eq!(saved.bitmap.as_deref(), Some(Path::new("/var/lib/m/disk.bitmap")));
        assert_eq!(saved.settings.as_ref().map(|s| (s.speed, s.max_retries)), Some((5, 3)));
        assert_eq!(saved.on_consistent, Some(SavedHook { command: "snap".into(), interval_ms: 1000, timeout_ms: 2000 }));
        assert_eq!(saved.affinity, Some(QueueAffinity::All));
        assert_eq!(serde_json::to_value(&saved).expect("writes"), v, "the file serve writes is unchanged");
        let none = SavedConfig { on_consistent: None, ..saved.clone() };
        assert_eq!(serde_json::to_value(&none).expect("writes")["on_consistent"], serde_json::Value::Null);

        // Older files: no name, settings, hook or affinity; settings without busy_speed.
        let old: SavedConfig = serde_json::from_value(json!({ "source": "/a", "target": "/b", "bitmap": "/c" })).expect("old");
        assert_eq!((old.name, old.settings, old.on_consistent, old.affinity), (None, None, None, None));
        let s = json!({ "speed": 1, "paused": true, "mode": null, "max_lag_ms": 0, "max_retries": 0 });
        let old: SavedConfig = serde_json::from_value(json!({ "source": "/a", "target": "/b", "bitmap": "/c", "settings": s })).expect("old");
        assert_eq!(old.settings.map(|s| (s.busy_speed, s.paused)), Some((0, true)));

        // An unreadable setting falls back to its default instead of failing the file.
        let odd = json!({ "source": "/a", "target": "/b", "bitmap": "/c", "settings": 5, "affinity": "some",
                          "on_consistent": { "command": "c", "interval_ms": "soon" } });
        let odd: SavedConfig = serde_json::from_value(odd).expect("odd settings");
        assert_eq!((odd.settings, odd.affinity), (None, None));
        assert_eq!(odd.on_consistent, Some(SavedHook { command: "c".into(), interval_ms: 60_000, timeout_ms: 60_000 }));
        let no_command: SavedConfig = serde_json::from_value(json!({ "on_consistent": { "interval_ms": 5 } })).expect("parses");
        assert_eq!(no_command.on_consistent, None);

        // libublk's whole file, as udev_name reads it.
        let file = json!({ "dev_info": { "dev_id": 7 }, "target": { "tgt_type": "ublk-mirror" }, "target_data": v });
        let exported: ExportedDevice = serde_json::from_value(file).expect("file");
        assert_eq!(exported.target_data.and_then(|t| t.name).as_deref(), Some("disk"));
        let exported: ExportedDevice = serde_json::from_value(json!({ "dev_info": {} })).expect("no target data");
        assert!(exported.target_data.is_none());
    }

    /// The event log's path is saved, so that a recovered daemon writes on where `add` said;
    /// a configuration from before it was saved reads as the default (None).
    #[test]
    fn the_event_log_path_is_kept_for_recovery() {
        let v = json!({ "source": "/a", "target": "/b", "bitmap": "/c", "event_log": "/var/log/m.events" });
        let saved: SavedConfig = serde_json::from_value(v).expect("parses");
        assert_eq!(saved.event_log.as_deref(), Some(Path::new("/var/log/m.events")));
        let back = serde_json::to_value(&saved).expect("writes");
        assert_eq!(back["event_log"], "/var/log/m.events");
        let old: SavedConfig = serde_json::from_value(json!({ "source": "/a", "target": "/b", "bitmap": "/c" })).expect("old");
        assert_eq!(old.event_log, None);
    }

    /// The TLS files of an nbds:// target are kept for the recovered daemon's connections; a
    /// configuration without them (older, or a plain target) has none, and writes none.
    #[test]
    fn tls_files_are_kept_for_recovery() {
        let v = json!({ "source": "/a", "target": "nbds://h/e", "bitmap": "/c",
                        "tls": { "ca": "/etc/t/ca.pem", "cert": "/etc/t/c.pem", "key": "/etc/t/k.pem" } });
        let saved: SavedConfig = serde_json::from_value(v.clone()).expect("parses");
        let tls = saved.tls.clone().expect("tls");
        assert_eq!(tls.ca.as_deref(), Some(Path::new("/etc/t/ca.pem")));
        assert_eq!(tls.key.as_deref(), Some(Path::new("/etc/t/k.pem")));
        assert_eq!(serde_json::to_value(&saved).expect("writes")["tls"], v["tls"]);
        let old: SavedConfig = serde_json::from_value(json!({ "source": "/a", "target": "/b", "bitmap": "/c" })).expect("old");
        assert_eq!(old.tls, None);
        assert!(serde_json::to_value(&old).expect("writes").get("tls").is_none());
    }

    /// Recovery refuses saved TLS settings it cannot read (they must not fall back to the
    /// system's trust store), and takes good ones, none, or a configuration of another program.
    #[test]
    fn recovery_refuses_unreadable_tls_settings() {
        let base = json!({ "source": "/a", "target": "nbds://h/e", "bitmap": "/c" });
        for bad in [json!("/etc/t/ca.pem"), json!({ "ca": 7 }), json!([1, 2])] {
            let mut v = base.clone();
            v["tls"] = bad.clone();
            let e = SavedConfig::for_recovery(3, v).expect_err(&format!("unreadable TLS settings {bad} accepted")).to_string();
            assert!(e.contains("saved TLS settings cannot be read") && e.contains("del -n 3"), "{e}");
        }
        let mut v = base.clone();
        v["tls"] = json!({ "ca": "/etc/t/ca.pem" });
        let tls = SavedConfig::for_recovery(3, v).expect("good TLS settings").tls.expect("tls");
        assert_eq!(tls.ca.as_deref(), Some(Path::new("/etc/t/ca.pem")));
        assert_eq!(SavedConfig::for_recovery(3, base.clone()).expect("no TLS").tls, None);
        let mut v = base;
        v["tls"] = serde_json::Value::Null;
        assert_eq!(SavedConfig::for_recovery(3, v).expect("null TLS").tls, None);
        assert_eq!(SavedConfig::for_recovery(3, json!({ "x": 1 })).expect("another program's"), SavedConfig::default());
    }
}
