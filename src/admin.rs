//! The device's control plane: `add`, `recover`, `del`, `list`, `status`, in the style of
//! rublk / ublksrv.
//!
//! `add` forks a daemon before any ublk object or thread exists (START_DEV must come from the
//! process that serves the queues). The daemon reports over a pipe: `ID n` once the device
//! exists, `LIVE n` once it serves I/O, `FAIL text` otherwise; EOF means it died. The parent
//! prints the device's JSON only after `LIVE`, and on any failure deletes the half-made device,
//! so nothing is left behind. Every wait is bounded.

use crate::device;
use crate::engine::{CopyConfig, Engine, PairOptions, SyncMode};
use crate::error::{Error, Result};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const TARGET_NAME: &str = "ublk-mirror";
pub const RUN_DIR: &str = "/run/ublk-mirror";
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What `add` was asked for.
#[derive(Clone, Debug)]
pub struct AddOptions {
    /// Stable name (`/dev/disk/by-ublk-mirror/NAME`, `up`/`down`); `None`: from the source.
    pub name: Option<String>,
    pub pair: PairOptions,
    pub copy: CopyConfig,
    pub id: i32,
    pub queues: u16,
    pub depth: u16,
    pub affinity: QueueAffinity,
    pub foreground: bool,
    /// Live settings at start (speed, mode, max-lag, retries).
    pub settings: crate::engine::Settings,
    /// Where the event log goes (default `/run/ublk-mirror/ID.events`).
    pub event_log: Option<PathBuf>,
}

/// A device name from a source path: its file name, with anything but `[A-Za-z0-9._-]` as `_`.
pub fn default_name(source: &Path) -> String {
    let base = source.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let n: String = base.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if n.is_empty() { "mirror".into() } else { n }
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


/// Refuses early, with what to do, when the device cannot be made at all.
pub fn check_environment() -> Result<()> {
    if !Path::new("/dev/ublk-control").exists() {
        return Err(driver_missing());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::config("creating or changing ublk devices needs root: run with sudo"));
    }
    Ok(())
}

fn uerr(what: &'static str) -> impl Fn(libublk::UblkError) -> Error {
    move |e| Error::config(format!("{what}: {e:?}"))
}

/// The daemon's report channel: a pipe to the waiting parent, or stderr in the foreground.
struct Report(Option<File>);

impl Report {
    fn send(&mut self, line: &str) {
        match self.0.as_mut() {
            // A parent that went away cannot be told anything more.
            Some(f) => drop(f.write_all(format!("{line}\n").as_bytes())),
            None => eprintln!("ublk-mirror: {line}"),
        }
    }
    fn try_clone(&self) -> Report {
        Report(self.0.as_ref().and_then(|f| f.try_clone().ok()))
    }
}

/// `id` as libublk numbers devices (an i32, which it asserts is not negative).
fn ublk_number(id: u32) -> Result<i32> {
    i32::try_from(id)
        .map_err(|_| Error::config(format!("{id} is not a device id: ublk device ids are 0 to {}", i32::MAX)))
}

/// Opens the device to recover and reads the pair it was serving from its saved configuration.
fn prepare_recover(
    id: u32,
    direct: crate::backing::DirectMode,
) -> Result<(UblkCtrl, PairOptions, String, Option<crate::engine::Settings>, bool, QueueAffinity)> {
    let number = ublk_number(id)?;
    let old = UblkCtrl::new_simple(number)
        .map_err(|_| Error::config(format!("no ublk device {id} (see `ublk-mirror list`)")))?;
    let info = old.dev_info();
    if info.flags & sys::UBLK_F_USER_RECOVERY as u64 == 0 {
        return Err(Error::config(format!("device {id} was not created with user recovery")));
    }
    if info.state != sys::UBLK_S_DEV_QUIESCED as u16 {
        return Err(Error::config(format!(
            "device {id} is {}, not waiting for a new daemon (QUIESCED): nothing to recover",
            state_name(info.state)
        )));
    }
    let data = old
        .get_target_data_from_json()
        .ok_or_else(|| Error::config(format!("device {id}: its saved configuration is missing")))?;
    let path = |k: &str| data[k].as_str().map(PathBuf::from);
    let (Some(source), Some(target), Some(bitmap)) = (path("source"), path("target"), path("bitmap")) else {
        return Err(Error::config(format!("device {id} is not a ublk-mirror device")));
    };
    let name = data["name"].as_str().map(String::from).unwrap_or_else(|| default_name(&source));
    // The bitmap has the last word on the pair: a switchover records itself there (and
    // `--reverse` the swapped pair) before the device changes what it serves.
    let mut switched = false;
    let (source, target) = match crate::bitmap::Bitmap::read_header(&bitmap) {
        Ok(h) if h.state == crate::bitmap::BitmapState::SwitchedOver => {
            log::info!("device {id} was switched over to {}: serving it alone", h.pair.target);
            switched = true;
            (source, target)
        }
        Ok(h) if Path::new(&h.pair.source) == crate::bitmap::absolute(&target) && Path::new(&h.pair.target) == crate::bitmap::absolute(&source) => {
            log::info!("device {id}: its pair was reversed by a switchover: source {}, target {}", h.pair.source, h.pair.target);
            (target, source)
        }
        _ => (source, target),
    };
    let mut settings: Option<crate::engine::Settings> = serde_json::from_value(data["settings"].clone()).ok();
    if let (Some(s), Some(cmd)) = (settings.as_mut(), data["on_consistent"]["command"].as_str()) {
        let ms = |k: &str| Duration::from_millis(data["on_consistent"][k].as_u64().unwrap_or(60_000));
        s.hook = Some(crate::engine::Hook {
            command: cmd.to_string(),
            interval: ms("interval_ms"),
            timeout: ms("timeout_ms"),
            env: vec![
                ("UBLK_MIRROR_SOURCE".into(), source.display().to_string()),
                ("UBLK_MIRROR_TARGET".into(), target.display().to_string()),
            ],
        });
    }
    let pair = PairOptions {
        source,
        target,
        bitmap,
        mode: Some(SyncMode::Resume),
        granularity: None,
        direct,
        source_writable: true,
    };
    let r = old.start_user_recover().map_err(uerr("start recovery"))?;
    if r < 0 {
        return Err(Error::config(format!(
            "device {id}: the kernel refused recovery ({}); is the old daemon still alive?",
            std::io::Error::from_raw_os_error(-r)
        )));
    }
    // Saved by `add` (a device added before the setting existed gets the default).
    let affinity = serde_json::from_value(data["affinity"].clone()).unwrap_or(QueueAffinity::Single);
    let ctrl = UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(number)
        .nr_queues(info.nr_hw_queues)
        .depth(info.queue_depth)
        .io_buf_bytes(info.max_io_buf_bytes)
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV | affinity.dev_flags())
        .build()
        .map_err(uerr("recover"))?;
    Ok((ctrl, pair, name, settings, switched, affinity))
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
    fn dev_flags(self) -> UblkFlags {
        match self {
            QueueAffinity::Single => UblkFlags::UBLK_DEV_F_SINGLE_CPU_AFFINITY,
            QueueAffinity::All => UblkFlags::empty(),
        }
    }
}

/// Runs in the daemon: opens the pair, adds (or recovers) the device and serves it until it is
/// stopped. Returns when the device is gone.
fn serve(opts: &AddOptions, recover: Option<u32>, report: &mut Report) -> Result<()> {
    let (ctrl, pair, name, saved, switched, affinity) = match recover {
        Some(id) => prepare_recover(id, opts.pair.direct)?,
        None => {
            let name = opts.name.clone().unwrap_or_else(|| default_name(&opts.pair.source));
            check_name(&name)?;
            if let Some(d) = find_by_name(&name) {
                return Err(Error::config(format!(
                    "a device named {name} exists already ({}): choose another --name",
                    d["bdev"].as_str().unwrap_or("?")
                )));
            }
            // Open and check the pair first: a refused bitmap or a short target must not leave
            // a device behind. The engine is opened again below (after ADD) for real.
            let (_, target, _) = Engine::open(&opts.pair)?;
            opts.copy.check_block(target.block_size().into())?;
            drop(target);
            // libublk's builder, failing to add an id that exists, deletes that device when it
            // drops: check first (a race with another `add` of the same id remains).
            if opts.id >= 0 && device_exists(opts.id as u32) {
                return Err(Error::config(format!(
                    "device id {} is in use (see `ublk-mirror list`): choose another -n or omit it",
                    opts.id
                )));
            }
            let mut pair = opts.pair.clone();
            // The first open made or validated the bitmap (and set it up for the chosen mode):
            // the second only resumes from it.
            pair.mode = Some(SyncMode::Resume);
            pair.granularity = None;
            let ctrl = UblkCtrlBuilder::default()
                .name(TARGET_NAME)
                .id(opts.id)
                .nr_queues(opts.queues)
                .depth(opts.depth)
                .io_buf_bytes(512 << 10)
                .ctrl_flags((sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV | opts.affinity.dev_flags())
                .build()
                .map_err(|e| {
                    let hint = if opts.id >= 0 {
                        format!(" with id {} (is that id in use? see `ublk-mirror list`)", opts.id)
                    } else {
                        String::new()
                    };
                    Error::config(format!("cannot add the device{hint}: {e:?}"))
                })?;
            (ctrl, pair, name, None, false, opts.affinity)
        }
    };
    // A recovered daemon serves with the settings the device was added with.
    let settings = saved.unwrap_or_else(|| opts.settings.clone());
    let info = ctrl.dev_info();
    let id = info.dev_id;
    report.send(&format!("ID {id}"));
    // The kernel drops flags it does not know without an error: check what it granted.
    let want = sys::UBLK_F_USER_RECOVERY as u64;
    if info.flags & want != want {
        return Err(Error::config(format!("the kernel did not grant user recovery (flags {:#x})", info.flags)));
    }
    let (engine, target) = if switched {
        (Engine::open_switched(&pair.bitmap, &pair.target, pair.direct)?, None)
    } else {
        let (engine, target, open) = Engine::open(&pair)?;
        log::info!("device {id}: {:?}, {} dirty regions", open.mode, open.dirty_regions);
        engine.attach_target(target.as_ref())?;
        (engine, Some((target, open)))
    };
    let engine = Arc::new(engine);
    engine.apply_settings(&settings);
    let events_path = Path::new(RUN_DIR).join(format!("{id}.events"));
    if let Err(e) = engine.events().open(opts.event_log.as_deref().unwrap_or(&events_path)) {
        log::warn!("event log: {e}");
    }
    let started = match &target {
        Some((_, open)) => serde_json::json!({
            "dev_id": id, "mode": open.mode, "dirty_regions": open.dirty_regions, "granularity": open.granularity,
        }),
        None => serde_json::json!({ "dev_id": id, "switched_over": true }),
    };
    engine.events().emit(if recover.is_some() { "recovered-daemon" } else { "started" }, started);
    let mut copy = opts.copy.clone();
    if let Some(h) = settings.hook.clone() {
        copy.on_consistent = Some(h);
    }
    if let Some(h) = copy.on_consistent.as_mut() {
        h.env.push(("UBLK_MIRROR_DEVICE".into(), id.to_string()));
    }
    let hook_json = copy.on_consistent.as_ref().map(|h| {
        serde_json::json!({
            "command": h.command,
            "interval_ms": h.interval.as_millis() as u64,
            "timeout_ms": h.timeout.as_millis() as u64,
        })
    });
    // After a switchover there is nothing to mirror.
    let mirror = target.map(|(t, _)| device::spawn_mirror(engine.clone(), t, copy));
    let stop_control = Arc::new(AtomicBool::new(false));
    let info = serde_json::json!({
        "dev_id": id, "bdev": format!("/dev/ublkb{id}"), "name": name,
        "source": pair.source, "target": pair.target, "bitmap": pair.bitmap,
        "event_log": opts.event_log.clone().unwrap_or(events_path.clone()),
    });
    let control = crate::control::spawn_server(id, engine.clone(), info, stop_control.clone());
    let control = match control {
        Ok(c) => c,
        Err(e) => {
            engine.request_stop();
            if let Some(m) = mirror {
                let _ = m.join();
            }
            return Err(e);
        }
    };

    let data = serde_json::json!({
        "name": name, "source": pair.source, "target": pair.target, "bitmap": pair.bitmap,
        "settings": settings,
        "on_consistent": hook_json,
        "affinity": affinity,
    });
    let tgt_engine = engine.clone();
    let tgt_init = move |dev: &mut UblkDev| -> std::result::Result<(), libublk::UblkError> {
        let max_io = dev.dev_info.max_io_buf_bytes;
        let t = &mut dev.tgt;
        t.dev_size = tgt_engine.size();
        // Room for two operations per tag (a write-blocking write goes to source and target)
        // and the queue's bitmap flush and timer.
        t.cq_depth = t.cq_depth.saturating_mul(2);
        t.sq_depth = t.sq_depth.saturating_mul(2);
        t.params = device::params(&tgt_engine, max_io);
        // The bitmap as a fixed file of every queue ring (libublk registers `fds` on each): the
        // bitmap's lock, which the next daemon takes before it trusts the bitmap, is then held
        // until every queue ring of this daemon is gone, that is until every source write it
        // issued has completed, even after a kill (docs/crash-safety.md, "daemon kill").
        let n = t.nr_fds as usize;
        if n < t.fds.len() {
            t.fds[n] = tgt_engine.bitmap_fd();
            t.nr_fds += 1;
        }
        dev.set_target_json(data);
        Ok(())
    };
    let q_engine = engine.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| device::queue_main(qid, dev, q_engine.clone());
    let mut live = report.try_clone();
    let on_live = move |c: &UblkCtrl| live.send(&format!("LIVE {}", c.dev_info().dev_id));
    let served = ctrl.run_target(tgt_init, q_fn, on_live);
    engine.request_stop();
    let mirrored = mirror.map(|m| m.join()).unwrap_or(Ok(Ok(())));
    stop_control.store(true, Ordering::SeqCst);
    let _ = control.join();
    if let Err(e) = served {
        // Queue threads may still hold /dev/ublkcN: a DEL from here could wait on ourselves.
        // Whoever waits for this process (the parent, or `del`) deletes the device.
        ctrl.disown();
        return Err(Error::config(format!("serving the device failed: {e:?}")));
    }
    match mirrored {
        Ok(Ok(())) => engine.close()?,
        Ok(Err(e)) => log::error!("mirror loop: {e}"),
        Err(_) => log::error!("mirror thread panicked"),
    }
    Ok(())
}

pub fn state_name(state: u16) -> &'static str {
    match state as u32 {
        sys::UBLK_S_DEV_DEAD => "DEAD",
        sys::UBLK_S_DEV_LIVE => "LIVE",
        sys::UBLK_S_DEV_QUIESCED => "QUIESCED",
        _ => "UNKNOWN",
    }
}

/// The parent's side of the handshake: the device id once LIVE.
fn wait_live(child: libc::pid_t, mut pipe: File, recover: bool) -> Result<u32> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut id: Option<u32> = None;
    let mut text = String::new();
    let outcome: std::result::Result<u32, String> = loop {
        if let Some(pos) = text.find('\n') {
            let line: String = text.drain(..=pos).collect();
            let line = line.trim().to_string();
            match line.split_once(' ') {
                Some(("ID", n)) => id = n.parse().ok(),
                Some(("LIVE", n)) => break n.parse().map_err(|_| line.clone()),
                Some(("FAIL", msg)) => break Err(msg.to_string()),
                _ => break Err(format!("unexpected report from the daemon: {line}")),
            }
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now()).as_millis() as i32;
        let mut pfd = libc::pollfd { fd: pipe.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        if left == 0 || unsafe { libc::poll(&mut pfd, 1, left) } == 0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child, libc::SIGKILL) };
            break Err(format!("the device did not come up within {}s", START_TIMEOUT.as_secs()));
        }
        let mut b = [0u8; 512];
        match pipe.read(&mut b) {
            Ok(0) | Err(_) => break Err("the daemon exited before the device was live (see its log)".into()),
            Ok(n) => text.push_str(&String::from_utf8_lossy(&b[..n])),
        }
    };
    match outcome {
        Ok(id) => Ok(id),
        Err(msg) => {
            let mut st = 0;
            // SAFETY: reaping our own child; once it is gone /dev/ublkcN is closed and DEL
            // cannot wait on it.
            unsafe { libc::waitpid(child, &mut st, 0) };
            // A failed add leaves nothing behind; a failed recover leaves the device QUIESCED
            // so that it can be retried.
            if let (false, Some(id)) = (recover, id) {
                if let Ok(c) = UblkCtrl::new_simple(id as i32) {
                    let _ = c.kill_dev();
                    let _ = c.del_dev();
                }
            }
            Err(Error::config(msg))
        }
    }
}

/// `add` and `recover`: serve in the foreground, or fork a daemon and return its JSON once live.
pub fn start(opts: &AddOptions, recover: Option<u32>) -> Result<Option<serde_json::Value>> {
    check_environment()?;
    if opts.foreground {
        serve(opts, recover, &mut Report(None))?;
        return Ok(None);
    }
    std::fs::create_dir_all(RUN_DIR).map_err(|e| Error::io(format!("creating {RUN_DIR}"), e))?;
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(Error::io("pipe", std::io::Error::last_os_error()));
    }
    // Fork before any ublk object or thread exists: START_DEV must come from the process that
    // serves the queues, and fork copies only the calling thread.
    // SAFETY: the process is single-threaded here.
    match unsafe { libc::fork() } {
        -1 => Err(Error::io("fork", std::io::Error::last_os_error())),
        0 => {
            // SAFETY: fds[1] is the pipe's write end, owned from here on by this File.
            let w = unsafe { File::from_raw_fd(fds[1]) };
            let log = format!("{RUN_DIR}/daemon-{}.log\0", std::process::id());
            // SAFETY: descriptor juggling in the new child: detach from the terminal and the
            // caller's pipes; stdout and stderr go to the daemon's log. `log` is NUL-terminated.
            unsafe {
                libc::close(fds[0]);
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                libc::dup2(null, 0);
                let lfd = libc::open(log.as_ptr().cast(), libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND, 0o600);
                let out = if lfd >= 0 { lfd } else { null };
                libc::dup2(out, 1);
                libc::dup2(out, 2);
            }
            let mut report = Report(Some(w));
            let code = match serve(opts, recover, &mut report) {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{e}");
                    report.send(&format!("FAIL {}", e.to_string().replace('\n', " ")));
                    1
                }
            };
            std::process::exit(code)
        }
        child => {
            // SAFETY: closing our copy of the write end, so that EOF means the daemon died.
            unsafe { libc::close(fds[1]) };
            // SAFETY: fds[0] is the read end, owned from here on by this File.
            let id = wait_live(child, unsafe { File::from_raw_fd(fds[0]) }, recover.is_some())?;
            let c = UblkCtrl::new_simple(id as i32).map_err(uerr("open device"))?;
            let mut v = device_json(&c);
            v["log"] = serde_json::json!(format!("{RUN_DIR}/daemon-{child}.log"));
            Ok(Some(v))
        }
    }
}

pub fn device_json(c: &UblkCtrl) -> serde_json::Value {
    let i = c.dev_info();
    let data = c.get_target_data_from_json().unwrap_or_default();
    serde_json::json!({
        "dev_id": i.dev_id,
        "bdev": c.get_bdev_path(),
        "name": data["name"],
        "state": state_name(i.state),
        "source": data["source"], "target": data["target"], "bitmap": data["bitmap"],
        "queues": i.nr_hw_queues, "depth": i.queue_depth, "pid": i.ublksrv_pid,
    })
}

/// The live status, asked of the daemon over its control socket.
pub fn read_status(id: u32) -> Result<serde_json::Value> {
    crate::control::request(id, &serde_json::json!({ "cmd": "status" })).map_err(|e| {
        // No daemon to ask: say why, when the reason is that there can be no device at all.
        if !Path::new("/dev/ublk-control").exists() {
            driver_missing()
        } else {
            e
        }
    })
}

/// The ublk driver is not loaded: what to do about it.
fn driver_missing() -> Error {
    Error::config(
        "the ublk driver is not loaded (/dev/ublk-control is missing): run `modprobe ublk_drv` as \
         root (Linux 6.0 or newer with CONFIG_BLK_DEV_UBLK). On a machine without it, the source \
         tree's `scripts/try-in-vm.sh` runs the device in a VM",
    )
}

/// Asked of sysfs, not of libublk (which complains on stderr about a missing device).
fn device_exists(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}


fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
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
    match status["state"].as_str() {
        Some("stopped") => Some(format!("device {id}: mirroring has stopped ({err}); it will not get synced")),
        Some("failed") => Some(format!(
            "device {id}: the mirror loop failed ({err}) and is being restarted; nothing mirrors \
             meanwhile: retry once `ublk-mirror status -n {id}` no longer says failed"
        )),
        Some("paused") => Some(format!("device {id}: the mirror is paused: `ublk-mirror resume -n {id}` first")),
        _ => None,
    }
}

pub fn wait_synced(id: u32, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        match read_status(id) {
            Ok(v) if v["status"]["state"] == "synced" => return Ok(()),
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
        // SAFETY: signalling a process by pid.
        unsafe { libc::kill(pid, libc::SIGKILL) };
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

/// All ublk-mirror devices.
pub fn list() -> Vec<serde_json::Value> {
    let out = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let o = out.clone();
    UblkCtrl::for_each_dev_id(move |id| {
        if let Ok(c) = UblkCtrl::new_simple(id as i32) {
            let v = device_json(&c);
            if !v["bitmap"].is_null() {
                o.borrow_mut().push(v);
            }
        }
    });
    let v = out.borrow().clone();
    v
}

/// The ublk-mirror device with this name, if any.
pub fn find_by_name(name: &str) -> Option<serde_json::Value> {
    list().into_iter().find(|d| d["name"] == name)
}

/// `up`: make the named device serve: recover it if its daemon died, do nothing if it is live,
/// add it otherwise (what a service manager's start does).
pub fn up(opts: &AddOptions) -> Result<Option<serde_json::Value>> {
    check_environment()?;
    let name = opts.name.clone().unwrap_or_else(|| default_name(&opts.pair.source));
    match find_by_name(&name) {
        Some(d) if d["state"] == "QUIESCED" => {
            let id = d["dev_id"].as_u64().unwrap_or(u64::MAX) as u32;
            start(opts, Some(id))
        }
        Some(d) if d["state"] == "LIVE" => Ok(Some(d)),
        Some(d) => Err(Error::config(format!(
            "device {name} is {}: delete it (ublk-mirror down --name {name}) and start again",
            d["state"].as_str().unwrap_or("?")
        ))),
        None => start(opts, None),
    }
}

/// `down`: delete the named device (optionally after a consistent point).
pub fn down(name: &str, wait: Option<Duration>) -> Result<()> {
    check_environment()?;
    match find_by_name(name) {
        Some(d) => delete(d["dev_id"].as_u64().unwrap_or(u64::MAX) as u32, wait),
        None => Ok(()),
    }
}

/// For udev: the name of the ublk-mirror device behind kernel name `ublkbN`, from libublk's
/// saved configuration (no ublk command is sent).
pub fn udev_name(kernel: &str) -> Option<String> {
    let id: u32 = kernel.strip_prefix("ublkb")?.parse().ok()?;
    let text = std::fs::read_to_string(format!("/run/ublksrvd/{id:04}.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let name = v["target_data"]["name"].as_str()?;
    check_name(name).ok()?;
    Some(name.to_string())
}

/// For udev: the names of the configured mirrors (`DIR/NAME.conf`) whose `SOURCE=` is this block
/// device, given its kernel name and its current symlinks (relative to /dev, as udev's `$links`).
pub fn udev_source(config_dir: &Path, kernel: &str, links: &[String]) -> Vec<String> {
    let mut paths: Vec<String> = vec![format!("/dev/{kernel}")];
    paths.extend(links.iter().map(|l| format!("/dev/{l}")));
    let Ok(dir) = std::fs::read_dir(config_dir) else { return Vec::new() };
    let mut names = Vec::new();
    for e in dir.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("conf") {
            continue;
        }
        let Some(name) = p.file_stem().and_then(|x| x.to_str()).map(String::from) else { continue };
        if check_name(&name).is_err() {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&p) else { continue };
        // The last assignment wins, as in a shell (and systemd's EnvironmentFile).
        let source = text
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("SOURCE="))
            .map(|v| v.trim().trim_matches('"').to_string());
        if source.is_some_and(|s| paths.contains(&s)) {
            names.push(name);
        }
    }
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

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
