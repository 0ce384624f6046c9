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
}

impl SavedConfig {
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
