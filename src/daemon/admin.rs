//! The commands that find, wait for and stop running devices: `status`, `del` (with
//! `--wait-synced`), `list`, and the service manager's `up` and `down`. Starting a daemon is
//! [`crate::daemon::start`]'s.

use crate::daemon::saved::{find_by_name, DeviceEntry, UblkState};
use crate::daemon::start::{check_environment,  default_name, device_exists, driver_missing, start, uerr, ublk_number, AddOptions};
use crate::engine::StatusState;
use crate::error::{Error, Result};
use libublk::ctrl::UblkCtrl;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::Path;
use std::time::{Duration, Instant};

/// The live status, asked of the daemon over its control socket.
pub fn read_status(id: u32) -> Result<serde_json::Value> {
    crate::daemon::control::request(id, &serde_json::json!({ "cmd": "status" })).map_err(|e| {
        // No daemon to ask: say why, when the reason is that there can be no device at all.
        if !Path::new("/dev/ublk-control").exists() {
            driver_missing()
        } else {
            e
        }
    })
}

fn pid_alive(pid: i32) -> bool {
    // No signal: only checks that the process exists (and may be signalled by us).
    pid > 0 && kill(Pid::from_raw(pid), None).is_ok()
}

/// Is `pid` a live ublk-mirror process (this program's binary, or one named ublk-mirror, e.g.
/// an older build replaced since it started)? The driver keeps the pid of a daemon that died
/// (a QUIESCED device): the number may belong to an unrelated process by now, which `del` must
/// neither wait for nor kill.
fn is_daemon(pid: i32) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else { return false };
    if std::fs::read_link("/proc/self/exe").is_ok_and(|me| me == exe) {
        return true;
    }
    // A replaced binary reads as "NAME (deleted)".
    exe.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("ublk-mirror"))
}

/// Waits (at most `limit`) until the daemon says synced. The status is the daemon's live
/// state, so a "synced" seen after this call started accounts for every write completed before.
/// Why waiting for device `id` to get synced is pointless now, if it is: nothing mirrors (the
/// mirror gave up, its loop failed and waits to restart, or it is paused).
pub fn not_mirroring(id: u32, status: &serde_json::Value) -> Option<String> {
    let err = status["last_error"].as_str().unwrap_or("?");
    match mirror_state(status)? {
        StatusState::Stopped => Some(format!("device {id}: mirroring has stopped ({err}); it will not get synced")),
        StatusState::Failed => Some(format!(
            "device {id}: the mirror loop failed ({err}) and is being restarted; nothing mirrors \
             meanwhile: retry once `ublk-mirror status -n {id}` no longer says failed"
        )),
        StatusState::Paused => Some(format!("device {id}: the mirror is paused: `ublk-mirror resume -n {id}` first")),
        _ => None,
    }
}

/// The mirror's state in a daemon's `status` member; `None` if absent or unknown (a newer
/// daemon's).
fn mirror_state(status: &serde_json::Value) -> Option<StatusState> {
    let name = status["state"].as_str()?;
    StatusState::ALL.into_iter().find(|s| s.name() == name)
}

pub fn wait_synced(id: u32, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        match read_status(id) {
            Ok(v) if mirror_state(&v["status"]) == Some(StatusState::Synced) => return Ok(()),
            Ok(v) if not_mirroring(id, &v["status"]).is_some() => {
                return Err(Error::config(not_mirroring(id, &v["status"]).unwrap_or_default()))
            }
            Err(_) if !device_exists(id) => return Err(Error::config(format!("no ublk device {id}"))),
            // A daemon being recovered is not listening yet: give it a moment.
            Err(e) if t0.elapsed() > Duration::from_secs(2) => return Err(e),
            _ => {}
        }
        if t0.elapsed() > limit {
            return Err(Error::config(format!(
                "device {id} did not reach a consistent point within {}s",
                limit.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `del`: optionally wait for a consistent point, stop the device, wait for its daemon (bounded;
/// killed after the bound), delete it.
pub fn delete(id: u32, wait: Option<Duration>) -> Result<()> {
    check_environment()?;
    if !device_exists(id) {
        return Err(Error::config(format!("no ublk device {id} (see `ublk-mirror list`)")));
    }
    let c = UblkCtrl::new_simple(ublk_number(id)?).map_err(uerr("open device"))?;
    if let Some(limit) = wait {
        wait_synced(id, limit)?;
    }
    let pid = c.dev_info().ublksrv_pid;
    let _ = c.kill_dev();
    let t0 = Instant::now();
    while is_daemon(pid) && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if is_daemon(pid) {
        log::warn!("daemon {pid} did not exit within 30 s of the stop; killing it");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Err(e) = c.del_dev() {
        // ENOENT: the daemon deleted its own device on the way out.
        if device_exists(id) {
            return Err(Error::config(format!("deleting device {id}: {e:?}")));
        }
    }
    Ok(())
}

/// `up`: make the named device serve: recover it if its daemon died, do nothing if it is live,
/// add it otherwise (what a service manager's start does).
pub fn up(opts: &AddOptions) -> Result<Option<DeviceEntry>> {
    check_environment()?;
    let name = opts.name.clone().unwrap_or_else(|| default_name(&opts.pair.source));
    match find_by_name(&name) {
        Some(d) => match d.state {
            UblkState::Quiesced => start(opts, Some(d.dev_id)),
            UblkState::Live => Ok(Some(d)),
            state => Err(Error::config(format!(
                "device {name} is {state}: delete it (ublk-mirror down --name {name}) and start again"
            ))),
        },
        None => start(opts, None),
    }
}

/// `down`: delete the named device (optionally after a consistent point).
pub fn down(name: &str, wait: Option<Duration>) -> Result<()> {
    check_environment()?;
    match find_by_name(name) {
        Some(d) => delete(d.dev_id, wait),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mirror_states_by_name() {
        for s in StatusState::ALL {
            assert_eq!(mirror_state(&json!({ "state": s.name() })), Some(s));
        }
        assert_eq!(mirror_state(&json!({ "state": "later" })), None);
        assert_eq!(mirror_state(&serde_json::Value::Null), None);
        assert!(not_mirroring(1, &json!({ "state": "paused" })).is_some_and(|m| m.contains("paused")));
        assert!(not_mirroring(1, &json!({ "state": "stopped", "last_error": "e" })).is_some_and(|m| m.contains("stopped (e)")));
        assert!(not_mirroring(1, &json!({ "state": "failed" })).is_some_and(|m| m.contains("failed (?)")));
        assert_eq!(not_mirroring(1, &json!({ "state": "syncing" })), None);
    }

    #[test]
    fn is_daemon_knows_this_program_and_nothing_else() {
        assert!(is_daemon(std::process::id() as i32), "this very binary");
        let mut other = std::process::Command::new("sleep").arg("30").spawn().expect("spawn sleep");
        let pid = other.id() as i32;
        assert!(pid_alive(pid));
        assert!(!is_daemon(pid), "a sleep taken for the daemon");
        other.kill().expect("kill");
        other.wait().expect("wait");
        assert!(!is_daemon(pid), "a reaped process");
        assert!(!is_daemon(0) && !is_daemon(-1));
    }
}
